"""Every advisory lock leadrouter takes is in a namespace named in worker/locks.py."""

import re
from pathlib import Path

from worker.locks import LockSpace
from worker.sql import queries

ROOT = Path(__file__).resolve().parents[2]
CALL = re.compile(r"pg_(?:try_)?advisory\w*\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def test_each_query_locks_in_its_namespace() -> None:
    used = {
        name: sorted({int(args.split(",")[0]) for args in CALL.findall(sql)})
        for name, sql in queries().items()
        if "advisory" in sql
    }
    assert used == {
        "update_source": [LockSpace.SOURCE],
        "lock_sources_by_keys": [LockSpace.SOURCE],
        "lock_sources_in_order": [LockSpace.SOURCE],
        "migrations_lock": [LockSpace.MIGRATIONS],
        "migrations_unlock": [LockSpace.MIGRATIONS],
        "lock_apply": [LockSpace.APPLY],
        "lock_overflow_settings": [LockSpace.TIMERS],
        "try_lock_source_timers": [LockSpace.TIMERS],
        "try_lock_offer_deadlines": [LockSpace.OFFER_DEADLINES],
        "try_lock_schedule": [LockSpace.SCHEDULE],
    }


def test_no_advisory_lock_outside_the_named_namespaces() -> None:
    """Everywhere else (Python, the tests) a two-key lock's namespace is a parameter
    given a LockSpace, never a number of its own; single-key locks are only the tests'
    and the bench's reference pipeline's (a key space apart)."""
    numbered = {}
    for path in [*ROOT.glob("worker/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        for args in CALL.findall(path.read_text(encoding="utf-8")):
            first = args.split(",")[0].strip()
            if "," in args and not first.startswith("$"):
                numbered.setdefault(str(path.relative_to(ROOT)), []).append(args)
    assert not numbered
    values = {int(m) for m in LockSpace}
    assert len(values) == len(LockSpace)
