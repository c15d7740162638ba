"""migrate.discover: numbered plain .sql files, 1..n without gaps, named NNNN_snake.sql."""

import re
from pathlib import Path

import pytest

from worker.errors import UserError
from worker.migrate import Migration, discover, packaged

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def make(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("SELECT 1;\n", encoding="utf-8")
    return directory


def test_real_migrations_pass() -> None:
    found = discover(MIGRATIONS)
    assert found, "no migrations found"
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    for migration in found:
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", migration.name), migration.name
        assert migration.path == MIGRATIONS / migration.name
        assert int(migration.name[:4]) == migration.version
        assert migration.path.read_text(encoding="utf-8").strip(), migration.name


def test_real_migrations_are_all_sql_files() -> None:
    sql_files = sorted(p.name for p in MIGRATIONS.iterdir() if p.suffix == ".sql")
    assert [m.name for m in discover(MIGRATIONS)] == sql_files


def test_discover_orders_by_version(tmp_path: Path) -> None:
    directory = make(tmp_path / "m", "0003_c.sql", "0001_a.sql", "0002_b_2.sql")
    assert discover(directory) == [
        Migration(1, "0001_a.sql", directory / "0001_a.sql"),
        Migration(2, "0002_b_2.sql", directory / "0002_b_2.sql"),
        Migration(3, "0003_c.sql", directory / "0003_c.sql"),
    ]


def test_discover_ignores_other_files(tmp_path: Path) -> None:
    directory = make(tmp_path / "m", "0001_a.sql", "README.md", "notes.txt")
    assert [m.name for m in discover(directory)] == ["0001_a.sql"]


def test_empty_directory(tmp_path: Path) -> None:
    assert discover(make(tmp_path / "m")) == []


@pytest.mark.parametrize(
    "name",
    [
        "1_init.sql",
        "001_init.sql",
        "00001_init.sql",
        "0002-init.sql",
        "0002_Init.sql",
        "0002_init-table.sql",
        "0002_.sql",
        "0002.sql",
        "init.sql",
        "0002_in it.sql",
    ],
)
def test_misnamed_file(tmp_path: Path, name: str) -> None:
    directory = make(tmp_path / "m", "0001_a.sql", name)
    with pytest.raises(UserError, match="NNNN_snake_case"):
        discover(directory)


@pytest.mark.parametrize(
    "names",
    [
        ("0001_a.sql", "0003_c.sql"),
        ("0002_b.sql",),
        ("0000_zero.sql", "0001_a.sql"),
        ("0001_a.sql", "0001_again.sql"),
        ("0001_a.sql", "0002_b.sql", "0004_d.sql"),
    ],
    ids=["gap", "no_first", "zero", "duplicate", "late_gap"],
)
def test_gaps_and_duplicates(tmp_path: Path, names: tuple[str, ...]) -> None:
    directory = make(tmp_path / "m", *names)
    with pytest.raises(UserError, match="without gaps"):
        discover(directory)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "file.sql"
    path.write_text("SELECT 1;", encoding="utf-8")
    with pytest.raises(UserError):
        discover(path)


def test_the_package_carries_the_repository_migrations() -> None:
    """`leadrouter migrate` without LEADROUTER_MIGRATIONS_DIR uses worker.migrations, which
    is this folder (installed into the package by pyproject.toml's package-dir)."""
    assert [m.name for m in discover(packaged())] == [m.name for m in discover(MIGRATIONS)]
