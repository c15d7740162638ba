"""Whatever text the database or the dead-letter queue holds (names, ids, keys, errors,
bodies), every table and line a command prints shows it as text: markup is not read
(`[/]` used to crash rich, `[link=…]` made a link) and control characters are shown
escaped, never sent to the terminal. The real commands run; only their data source is
replaced, so that hypothesis can choose what it holds."""

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import admin, cli
from worker import dlq as dead
from worker import stats as stats_module
from worker.stats import OperatorShare, SourceStats
from worker.terminal import cell, shown

MARKUP = ["[/]", "[link=x]y[/]", "[red]x", "[/bold]", ":smile:"]
CONTROL = ["\x1b[2J", "\x1b]8;;x\x07", "\u202e", "\u2066", "\x9b", "\x7f"]
hostile = st.one_of(
    st.text(),
    st.text(st.characters(codec="utf-8", exclude_categories=())),  # surrogates too
    st.lists(st.sampled_from([*MARKUP, *CONTROL, "\\", "\n", "\r", "\t", "\u200b", "a", " "])).map(
        "".join
    ),
    st.sampled_from(MARKUP + CONTROL),
)


class Row(dict[str, Any]):
    """A row whose every column holds the same text."""

    def __init__(self, text: str) -> None:
        super().__init__(id=text, name=text, external_id=text, load=1, max_load=1)
        self.text = text

    def get(self, key: str, default: Any = None) -> Any:
        return self.text


class NoPool:
    async def __aenter__(self) -> "NoPool":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def entry(text: str) -> SimpleNamespace:
    return SimpleNamespace(
        id=text,
        reason=text,
        error=text,
        routing_key=text,
        source=text,
        message_id=text,
        age_seconds=1.0,
        headers={"x-leadrouter-error": text},
        properties={"type": text},
        undecodable=(text,),
        body_size=len(text),
        text=text,
    )


@pytest.fixture
def holding(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every admin read and dlq read returns rows full of the text put in the list."""
    held: list[str] = [""]

    async def pool(_settings: Any) -> NoPool:
        return NoPool()

    async def rows(*_args: Any, **_kwargs: Any) -> list[Row]:
        return [Row(held[0])]

    async def one(*_args: Any, **_kwargs: Any) -> Any:
        return Row(held[0]), 1

    async def lead(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        return {"external_id": held[0], "name": held[0], "contacts": [Row(held[0])]}

    async def entries(*_args: Any, **_kwargs: Any) -> list[SimpleNamespace]:
        return [entry(held[0])]

    async def one_entry(*_args: Any, **_kwargs: Any) -> SimpleNamespace:
        return entry(held[0])

    async def count(*_args: Any, **_kwargs: Any) -> int:
        return 1

    async def collect(*_args: Any, **_kwargs: Any) -> list[SourceStats]:
        text = held[0]
        share = OperatorShare(1, text, False, 1, 0.5, 1, 0.5, 1, 1, 2)
        return [SourceStats(text, text, 1, 1, [share])]

    monkeypatch.setenv("LEADROUTER_LOG_LEVEL", "CRITICAL")
    monkeypatch.setattr(cli, "_pool", pool)
    for name in ("list_operators", "list_sources", "show_weights", "list_contacts", "list_leads"):
        monkeypatch.setattr(admin, name, rows)
    monkeypatch.setattr(admin, "update_operator", one)
    monkeypatch.setattr(admin, "show_lead", lead)
    monkeypatch.setattr(dead, "list_entries", entries)
    monkeypatch.setattr(dead, "show", one_entry)
    monkeypatch.setattr(dead, "count", count)
    monkeypatch.setattr(stats_module, "collect", collect)
    yield held


COMMANDS = [
    ["operators", "list"],
    ["operators", "update", "1", "--name", "x"],
    ["sources", "list"],
    ["weights", "show", "tg"],
    ["contacts", "list"],
    ["leads", "list"],
    ["leads", "show", "tg:1"],
    ["dlq", "list"],
    ["dlq", "show", "abc"],
    ["stats"],
]


def only_printable(output: str) -> bool:
    return all(ch.isprintable() or ch == "\n" for ch in output)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(command=st.sampled_from(COMMANDS), text=hostile)
def test_every_command_shows_any_text_as_text(
    holding: list[str], capsys: pytest.CaptureFixture[str], command: list[str], text: str
) -> None:
    holding[0] = text
    code = cli.main(command)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert only_printable(out), repr(out)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("text", MARKUP + CONTROL)
def test_markup_is_shown_verbatim_and_controls_escaped(
    holding: list[str], capsys: pytest.CaptureFixture[str], command: list[str], text: str
) -> None:
    holding[0] = text
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert shown(text) in out.replace("\n", ""), out
    assert only_printable(out)


@pytest.mark.parametrize("text", MARKUP + CONTROL)
def test_json_output_keeps_the_text_exactly(
    holding: list[str], capsys: pytest.CaptureFixture[str], text: str
) -> None:
    holding[0] = text
    assert cli.main(["operators", "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)[0]["name"] == text
    assert only_printable(out.rstrip("\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ann", "Ann"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\u202eb", "a\\u202eb"),
        ("a\u2068b", "a\\u2068b"),
        ("\x9b\x7f\x00", "\\x9b\\x7f\\x00"),
        ("line\nbreak\ttab\r", "line\\nbreak\\ttab\\r"),
        ("\ud800", "\\ud800"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("Łódź 東京 😀", "Łódź 東京 😀"),
        ("[/]", "[/]"),
    ],
)
def test_shown(text: str, expected: str) -> None:
    assert shown(text) == expected


def test_a_cell_is_never_markup() -> None:
    assert cell("[link=https://evil.example]x[/link]").plain == (
        "[link=https://evil.example]x[/link]"
    )
    assert not cell("[bold]x[/bold]").spans


def test_a_warning_shows_the_name_as_text(
    holding: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def over(*_args: Any, **_kwargs: Any) -> Any:
        return {"id": 1, "name": "[/]\x1b[2J", "load": 3, "max_load": 1}, 0

    monkeypatch.setattr(admin, "update_operator", over)
    assert cli.main(["operators", "update", "1", "--max-load", "1"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: operator 1 ([/]\\x1b[2J) keeps their 3 open contacts")
    assert err.count("\n") == 1 and only_printable(err.rstrip("\n"))
