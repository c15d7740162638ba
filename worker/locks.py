"""The advisory-lock key namespaces, named in one place.

Every advisory lock leadrouter takes has two keys, `(namespace, id)`; the namespace says
what is locked. The statements in queries.sql write it as a literal (SQL cannot read
these constants); tests/unit/test_locks.py holds every advisory lock there, in the code
and in the tests to the namespaces below, so a new one must be named here first.
Single-key advisory locks (one bigint) are a separate key space in PostgreSQL; leadrouter
takes none (the bench's reference pipeline does, in its own throwaway database)."""

from enum import IntEnum


class LockSpace(IntEnum):
    # (1280, source id), until commit: one routing transaction per source at a time; the
    # lock order of distribution.py starts with these, in ascending source id.
    SOURCE = 1280
    # (1281, 0), for the session: one process migrates a database at a time.
    MIGRATIONS = 1281
    # (1282, 0), until commit: one `leadrouter apply` at a time.
    APPLY = 1282
    # (1283, source id), until commit, tried without waiting: one worker at a time
    # expires the source's lapsed offers (worker/offers.py); the others skip the source.
    OFFER_DEADLINES = 1283
    # (1284, source id), until commit: one worker keeps a source's timers (timers.py) at a
    # time, taken before the source's routing lock; (1284, 0), until commit: one change of
    # overflow settings at a time (source_queueing.py).
    TIMERS = 1284
    # (1285, operator id), until commit, tried and never waited for: one worker
    # evaluates an operator's schedule at a time (worker/availability.py).
    SCHEDULE = 1285
