"""README.md: its links stay inside the repository and point at files that exist, and it
says how to install, check the version and complete the command in a shell."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve_inside_the_repository() -> None:
    problems = []
    for target in LINK.findall(README.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (ROOT / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT):
            problems.append(f"{target} leaves the repository")
        elif not path.exists():
            problems.append(f"{target} does not exist")
    assert not problems, problems


def test_install_version_and_completion_are_documented() -> None:
    text = README.read_text(encoding="utf-8")
    assert "pipx install" in text
    assert "leadrouter --version" in text
    assert "_LEADROUTER_COMPLETE=" in text


def test_the_publisher_snippet_is_the_tested_example() -> None:
    """The README's aio-pika snippet is a verbatim part of examples/aio_pika_publisher.py,
    which tests/integration/test_publisher_example.py runs against the worker."""
    text = README.read_text(encoding="utf-8")
    [snippet] = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert "message_id=message_id" in snippet
    assert snippet in (ROOT / "examples" / "aio_pika_publisher.py").read_text(encoding="utf-8")


def test_code_fences_stand_on_lines_of_their_own() -> None:
    fences = [line for line in README.read_text(encoding="utf-8").splitlines() if "```" in line]
    assert all(re.fullmatch(r"```\w*", line) for line in fences), fences
    assert len(fences) % 2 == 0
