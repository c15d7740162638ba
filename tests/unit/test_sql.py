"""The files of named queries (the runtime's worker/queries.sql, the bench's
worker/tools/reference.sql): each parses, documents its parameters, and matches the code
that uses it."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.sql import Q, parse, queries
from worker.tools.bench_reference import R

WORKER = Path(__file__).resolve().parents[2] / "worker"
PARAM = re.compile(r"\$(\d+)")


@dataclass(frozen=True)
class SqlFile:
    path: Path
    package: str
    attribute: str  # the Queries object the code reads it through: Q.<name>, R.<name>
    users: tuple[Path, ...]  # the modules that may use it

    def __str__(self) -> str:
        return self.path.name

    def references(self, path: Path) -> list[str]:
        return re.findall(rf"\b{self.attribute}\.(\w+)", path.read_text(encoding="utf-8"))


SQL_FILES = [
    SqlFile(
        WORKER / "queries.sql",
        "worker",
        "Q",
        tuple(sorted(WORKER.glob("*.py")) + sorted((WORKER / "tools").glob("*.py"))),
    ),
    SqlFile(
        WORKER / "tools" / "reference.sql",
        "worker.tools",
        "R",
        (WORKER / "tools" / "bench_reference.py",),
    ),
]
each_file = pytest.mark.parametrize("sql_file", SQL_FILES, ids=str)


def real_queries(sql_file: SqlFile = SQL_FILES[0]) -> dict[str, str]:
    return parse(sql_file.path.read_text(encoding="utf-8"))


def description(sql: str) -> str:
    """The comment lines that open a query, joined."""
    lines = []
    for line in sql.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line.removeprefix("--").strip())
    return " ".join(lines)


def code(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))


def used_params(sql: str) -> set[int]:
    return {int(n) for n in PARAM.findall(code(sql))}


@each_file
def test_real_file_parses(sql_file: SqlFile) -> None:
    parsed = real_queries(sql_file)
    assert parsed
    assert parsed == queries(sql_file.package, sql_file.path.name)
    for name, sql in parsed.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert code(sql).strip(), name
        assert "-- name:" not in sql, name


def test_attribute_access() -> None:
    parsed = real_queries()
    name = next(iter(parsed))
    assert getattr(Q, name) == parsed[name]
    with pytest.raises(AttributeError, match="no_such_query"):
        _ = Q.no_such_query
    reference = real_queries(SQL_FILES[1])
    name = next(iter(reference))
    assert getattr(R, name) == reference[name]
    assert not set(reference) & set(real_queries()), "the bench's SQL is not the runtime's"


@each_file
def test_every_query_has_a_description(sql_file: SqlFile) -> None:
    text = sql_file.path.read_text(encoding="utf-8").splitlines()
    missing = []
    for i, line in enumerate(text):
        if line.startswith("-- name:"):
            following = text[i + 1] if i + 1 < len(text) else ""
            if not re.match(r"^-- \S", following) or following.startswith("-- name:"):
                missing.append(line.removeprefix("-- name:").strip())
    assert not missing, f"queries without a description line: {missing}"
    for name, sql in real_queries(sql_file).items():
        assert description(sql), name


@each_file
def test_parameters_run_from_one_without_gaps(sql_file: SqlFile) -> None:
    bad = {}
    for name, sql in real_queries(sql_file).items():
        params = used_params(sql)
        if params and params != set(range(1, max(params) + 1)):
            bad[name] = sorted(params)
    assert not bad, f"parameters with gaps: {bad}"


@each_file
def test_descriptions_list_the_parameters(sql_file: SqlFile) -> None:
    bad = {}
    for name, sql in real_queries(sql_file).items():
        text = description(sql)
        used = used_params(sql)
        if "($1" in text:
            documented = {int(n) for n in PARAM.findall(text)}
            if documented != used:
                bad[name] = {"documented": sorted(documented), "used": sorted(used)}
        elif used:
            bad[name] = {"documented": [], "used": sorted(used)}
    assert not bad, f"descriptions that do not match the parameters: {bad}"


@each_file
def test_no_string_formatting_placeholders(sql_file: SqlFile) -> None:
    for name, sql in real_queries(sql_file).items():
        sql_code = code(sql)
        assert "%s" not in sql_code, name
        assert not re.search(r"\{\w*\}", sql_code), name


@each_file
def test_every_referenced_query_exists(sql_file: SqlFile) -> None:
    parsed = real_queries(sql_file)
    missing: dict[str, list[str]] = {}
    for path in sql_file.users:
        for name in sql_file.references(path):
            if name not in parsed:
                missing.setdefault(name, []).append(path.name)
    assert not missing, f"names without a query in {sql_file}: {missing}"


@each_file
def test_every_query_is_used(sql_file: SqlFile) -> None:
    referenced: set[str] = set()
    for path in sql_file.users:
        referenced.update(sql_file.references(path))
    assert referenced, f"found no {sql_file.attribute}.<name> references at all"
    unused = sorted(set(real_queries(sql_file)) - referenced)
    assert not unused, f"queries in {sql_file} that no module uses: {unused}"


# --- parse -------------------------------------------------------------------------


def test_parse_splits_named_queries() -> None:
    text = (
        "-- preamble comment\n\n"
        "-- name: one\n-- The first ($1 id).\nSELECT $1;\n\n"
        "-- name: two\nSELECT 2;\n"
    )
    assert parse(text) == {"one": "-- The first ($1 id).\nSELECT $1;", "two": "SELECT 2;"}


def test_parse_of_nothing() -> None:
    assert parse("") == {}
    assert parse("-- only a comment\n") == {}


def test_parse_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: q\nSELECT 1;\n-- name: q\nSELECT 2;\n")


@pytest.mark.parametrize(
    "body",
    ["", "\n\n", ";", "  ;  \n", "-- just a comment\n", "-- a\n-- b\n\n"],
    ids=["empty", "blank", "semicolon", "spaced_semicolon", "comment", "comments"],
)
def test_parse_rejects_empty_queries(body: str) -> None:
    with pytest.raises(ValueError, match="no SQL"):
        parse(f"-- name: first\nSELECT 1;\n-- name: empty\n{body}")
    with pytest.raises(ValueError, match="no SQL"):
        parse(f"-- name: empty\n{body}\n-- name: last\nSELECT 1;\n")


def test_parse_header_must_be_a_whole_line() -> None:
    parsed = parse("-- name: q\nSELECT 1; -- name: not_a_header\n")
    assert list(parsed) == ["q"]
