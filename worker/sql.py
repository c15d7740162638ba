"""Loads the named queries of queries.sql: `-- name: NAME` heads each one."""

import re
from functools import cache
from importlib.resources import files

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a file of named queries into {name: sql}; comments stay in the SQL."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        sql = body.strip()
        if not sql.rstrip(";").strip() or all(
            line.startswith("--") for line in sql.splitlines() if line.strip()
        ):
            raise ValueError(f"query {name!r} has no SQL")
        queries[name] = sql
    return queries


@cache
def queries() -> dict[str, str]:
    return parse(files("worker").joinpath("queries.sql").read_text(encoding="utf-8"))


class _Queries:
    """Attribute access to the queries: `Q.assign_contacts`."""

    def __getattr__(self, name: str) -> str:
        try:
            return queries()[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None


Q = _Queries()


def quote_identifier(name: str) -> str:
    """A database name as a quoted SQL identifier. Only for names from configuration:
    CREATE/DROP DATABASE take no parameters."""
    return '"' + name.replace('"', '""') + '"'
