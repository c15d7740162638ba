"""Applies migrations/NNNN_name.sql files in order, each once, one process at a time.
They ship inside the package (`worker.migrations`); LEADROUTER_MIGRATIONS_DIR overrides."""

import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from worker import log
from worker.errors import UserError
from worker.settings import mask_url
from worker.sql import Q, quote_identifier

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
logger = log.get(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Traversable


def packaged() -> Traversable:
    """The migrations this install carries (the repository's migrations/ folder)."""
    return files("worker.migrations")


def discover(directory: Traversable) -> list[Migration]:
    """The migrations of a directory in order; refuses misnamed files and gaps."""
    if not directory.is_dir():
        raise UserError(f"migrations directory {directory} does not exist")
    found = []
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".sql"):
            continue
        match = _FILE.match(path.name)
        if not match:
            raise UserError(f"migration file {path.name} is not named NNNN_snake_case.sql")
        found.append(Migration(int(match[1]), path.name, path))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise UserError(f"migration versions must run 1, 2, 3… without gaps; found {versions}")
    return found


async def ensure_database(url: str) -> bool:
    """Create the URL's database when it does not exist. Returns whether it created it."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        # An identifier cannot be a parameter; the name comes from configuration.
        await maintenance.execute(f"CREATE DATABASE {quote_identifier(name)}")
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another process created it first (a simultaneous CREATE DATABASE can also
        # surface as a unique violation on pg_database).
        return False
    except asyncpg.InsufficientPrivilegeError:
        raise UserError(
            f"database {name!r} does not exist and this role may not create it "
            f"({mask_url(url)}); create it or grant CREATEDB"
        ) from None
    finally:
        await maintenance.close()
    logger.info("database_created", database=name)
    return True


async def drop_database(url: str) -> None:
    """Drop the URL's database if it exists, connections and all (the demo's and the
    bench's own databases, and the tests')."""
    parts = urlsplit(url)
    conn = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        name = quote_identifier(parts.path.lstrip("/"))
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def migrate(url: str, directory: Traversable | None = None) -> list[str]:
    """Apply pending migrations (by default those of the package); returns the names of
    those applied now."""
    migrations = discover(directory or packaged())
    await ensure_database(url)
    conn = await asyncpg.connect(url)
    applied_now = []
    try:
        await conn.execute(Q.migrations_lock)
        await conn.execute(Q.create_migrations_table)
        done = {r["version"] for r in await conn.fetch(Q.applied_migrations)}
        for migration in migrations:
            if migration.version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(migration.path.read_text(encoding="utf-8"))
                    await conn.execute(Q.record_migration, migration.version, migration.name)
            except asyncpg.RaiseError as exc:  # the migration's own check of existing data
                hint = f" ({exc.hint})" if exc.hint else ""
                refusal = f"migration {migration.name} refused: {exc.message}{hint}"
                raise UserError(refusal) from None
            logger.info("migration_applied", migration=migration.name)
            applied_now.append(migration.name)
        await conn.execute(Q.migrations_unlock)
    finally:
        await conn.close()
    return applied_now
