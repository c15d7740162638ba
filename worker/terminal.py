"""Text for a terminal: whatever a lead, a bot, an operator or a file wrote is shown as
it is, never obeyed. Every table and line the CLI prints goes through `shown`."""

from typing import Any

from rich.text import Text


def shown(value: Any) -> str:
    """str(value) with each character a terminal could act on, or that hides or reorders
    text, written out as a Python escape (`\\x1b`, `\\u202e`): C0 and C1 controls, DEL,
    line breaks and tabs, bidi overrides and isolates and the other format characters,
    separators other than the space, surrogates and unassigned code points."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def cell(value: Any) -> Text:
    """A table cell: shown, and a Text, which rich never reads as markup (`[/]`, `[link=…]`)."""
    return Text(shown(value))
