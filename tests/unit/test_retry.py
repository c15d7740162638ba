"""is_transient (wait and retry, never dead-letter) and backoff."""

import aiormq.exceptions
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.retry import backoff, is_transient

TRANSIENT: list[BaseException] = [
    ConnectionRefusedError(),
    ConnectionResetError(),
    TimeoutError(),
    OSError(),
    asyncpg.exceptions.DeadlockDetectedError(),
    asyncpg.exceptions.SerializationError(),
    asyncpg.exceptions.CannotConnectNowError(),
    asyncpg.exceptions.AdminShutdownError(),
    asyncpg.exceptions.TooManyConnectionsError(),
    asyncpg.exceptions.ConnectionDoesNotExistError(),
    aiormq.exceptions.AMQPConnectionError(),
    aiormq.exceptions.ChannelClosed(),
    # States of the deployment, which hit every message alike: they wait, not burn the
    # delivery limit (found by review).
    asyncpg.exceptions.UndefinedTableError(),
    asyncpg.exceptions.InvalidPasswordError(),
    asyncpg.exceptions.ReadOnlySQLTransactionError(),
    asyncpg.exceptions.InsufficientPrivilegeError(),
    asyncpg.exceptions.LockNotAvailableError(),
]

PERMANENT: list[BaseException] = [
    ValueError(),
    RuntimeError(),
    KeyError(),
    asyncpg.exceptions.UniqueViolationError(),
    asyncpg.exceptions.CheckViolationError(),
    asyncpg.exceptions.CharacterNotInRepertoireError(),
]


def name(exc: BaseException) -> str:
    return type(exc).__name__


@pytest.mark.parametrize("exc", TRANSIENT, ids=name)
def test_transient(exc: BaseException) -> None:
    assert is_transient(exc) is True


@pytest.mark.parametrize("exc", PERMANENT, ids=name)
def test_not_transient(exc: BaseException) -> None:
    assert is_transient(exc) is False


def test_channel_invalid_state_is_transient() -> None:
    assert is_transient(aiormq.exceptions.ChannelInvalidStateError()) is True


def test_interface_error_is_transient_only_when_closed() -> None:
    assert is_transient(asyncpg.exceptions.InterfaceError("connection is closed")) is True
    assert is_transient(asyncpg.exceptions.InterfaceError("pool is closing")) is True
    assert is_transient(asyncpg.exceptions.InterfaceError("bad argument")) is False


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=0, max_value=1000),
    cap=st.floats(min_value=0.001, max_value=3600, allow_nan=False),
)
def test_backoff_within_cap(attempt: int, cap: float) -> None:
    delay = backoff(attempt, cap)
    assert 0 <= delay <= cap
    assert delay <= 0.05 * 2**attempt


def test_backoff_grows() -> None:
    first = [backoff(1, 60.0) for _ in range(200)]
    later = [backoff(8, 60.0) for _ in range(200)]
    assert max(first) <= 0.1
    assert max(later) > 1.0


def test_backoff_after_very_many_attempts() -> None:
    assert 0 <= backoff(1024, 5.0) <= 5.0
