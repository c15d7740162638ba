"""CLI input checks that need no database: weights parsing and click's argument errors."""

import pytest

from worker.cli import _parse_weights, main
from worker.errors import UserError


def test_parse_weights() -> None:
    assert _parse_weights(["1=10", "2=30"]) == {1: 10, 2: 30}
    assert _parse_weights(["7=1", "3=2", "5=3"]) == {7: 1, 3: 2, 5: 3}


def test_parse_no_weights() -> None:
    assert _parse_weights([]) == {}


def test_parse_weights_bounds() -> None:
    assert _parse_weights([f"{2**63 - 1}={2**31 - 1}"]) == {2**63 - 1: 2**31 - 1}


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["1=0"], "positive"),
        (["1=-3"], "positive"),
        (["x=1"], "OPERATOR_ID=WEIGHT"),
        (["1"], "OPERATOR_ID=WEIGHT"),
        (["1="], "OPERATOR_ID=WEIGHT"),
        (["=1"], "OPERATOR_ID=WEIGHT"),
        (["1=x"], "OPERATOR_ID=WEIGHT"),
        (["1=1.5"], "OPERATOR_ID=WEIGHT"),
        (["1=1=2"], "OPERATOR_ID=WEIGHT"),
        (["1=1", "1=2"], "twice"),
        (["2=1", "3=1", "2=1"], "twice"),
        (["0=1"], "operator id"),
        (["-1=1"], "operator id"),
        ([f"{2**63}=1"], "operator id"),
        (["99999999999999999999999999=1"], "operator id"),
        ([f"1={2**31}"], "positive"),
        (["1=99999999999999999999999"], "positive"),
    ],
)
def test_parse_weights_rejects(pairs: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        _parse_weights(pairs)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["operators", "add", "NAME", "--max-load", "abc"], "abc"),
        (["frobnicate"], "frobnicate"),
        (["contacts", "close", "0"], "0"),
        (["contacts", "close", "abc"], "abc"),
        (["operators", "update", "-5"], ""),
        (["contacts", "list", "--status", "pending"], "pending"),
        (["sources", "add", "web", "--strategy", "nope"], "nope"),
        (["operators", "add"], "NAME"),
        (["--no-such-option"], "--no-such-option"),
        (["demo", "--leads", "0"], "0"),
    ],
)
def test_usage_errors_need_no_database(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    mentions: str,
) -> None:
    # Were a connection attempted, it would go to a closed port and fail differently.
    monkeypatch.setenv("LEADROUTER_DATABASE_URL", "postgresql://u:pw@127.0.0.1:1/none")
    monkeypatch.setenv("LEADROUTER_AMQP_URL", "amqp://u:pw@127.0.0.1:1/")
    assert main(argv) != 0
    line = one_error_line(capsys)
    assert mentions in line
    assert "cannot reach" not in line


def test_weights_set_rejects_bad_pairs_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LEADROUTER_DATABASE_URL", "postgresql://u:pw@127.0.0.1:1/none")
    assert main(["weights", "set", "web", "1=10", "1=0"]) == 2
    line = one_error_line(capsys)
    assert "cannot reach" not in line


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert "Usage:" in captured.out
    for command in ("migrate", "worker", "operators", "sources", "weights", "contacts"):
        assert command in captured.out
    assert captured.err == ""


@pytest.mark.parametrize("group", ["operators", "sources", "weights", "contacts"])
def test_group_help(capsys: pytest.CaptureFixture[str], group: str) -> None:
    assert main([group, "--help"]) == 0
    assert "Usage:" in capsys.readouterr().out


def test_no_command_is_not_a_multiline_error(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    err = capsys.readouterr().err.splitlines()
    assert not err or not err[0].startswith("error:") or len(err) == 1, err


def test_an_invalid_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LEADROUTER_PREFETCH", "many")
    assert main(["operators", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: invalid setting: LEADROUTER_PREFETCH:")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"leadrouter, version {version('leadrouter')}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "--since", "5x"],
        ["stats", "--since", "99999999w"],
        ["operators", "add", "X", "--max-load", "-1"],
        ["operators", "update", "1", "--max-load", "-1"],
        ["weights", "set", "web", "1=0"],
        ["weights", "set", "web", "x"],
        ["dlq", "replay"],
        ["dlq", "replay", "--all", "--reason", "invalid_json"],
        ["publish", "--source", "Not A Slug", "--external-id", "x"],
    ],
)
def test_a_malformed_command_line_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """README: 2 for a malformed command line, whether click or our own check finds it."""
    monkeypatch.setenv("LEADROUTER_DATABASE_URL", "postgresql://u:pw@127.0.0.1:1/none")
    monkeypatch.setenv("LEADROUTER_AMQP_URL", "amqp://u:pw@127.0.0.1:1/")
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "cannot reach" not in line
