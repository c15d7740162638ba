"""Loads files of named queries (`-- name: NAME` heads each one): the runtime's
queries.sql as `Q`, and any other such file (the bench's reference.sql) the same way."""

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
def queries(package: str = "worker", resource: str = "queries.sql") -> dict[str, str]:
    """The named queries of `resource`, a file of the package `package`."""
    return parse(files(package).joinpath(resource).read_text(encoding="utf-8"))


class Queries:
    """Attribute access to a file's queries: `Q.assign_contacts`."""

    def __init__(self, package: str, resource: str) -> None:
        self._package = package
        self._resource = resource

    def __getattr__(self, name: str) -> str:
        try:
            return queries(self._package, self._resource)[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in {self._resource}") from None


Q = Queries("worker", "queries.sql")


def quote_identifier(name: str) -> str:
    """A database name as a quoted SQL identifier. Only for names from configuration:
    CREATE/DROP DATABASE take no parameters."""
    return '"' + name.replace('"', '""') + '"'
