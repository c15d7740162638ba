"""README.md: its links stay inside the repository and point at files that exist, it
says how to install, check the version and complete the command in a shell, and its
module map (and docs/architecture.md's) names every module of the tree."""

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


def _modules() -> set[str]:
    """The worker's modules and files, as the module maps name them."""
    worker = ROOT / "worker"
    return {p.stem for p in worker.glob("*.py")} | {p.stem for p in (worker / "tools").glob("*")}


def test_the_module_map_names_every_module_of_the_tree() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Development") :]
    block = section[: section.index("```", section.index("```") + 3)]
    named = set(re.findall(r"[a-z_]+", block))
    expected = _modules() - {"__init__", "__pycache__"}
    assert not expected - named, f"modules the README's map leaves out: {expected - named}"
    assert "worker/tools/" in block


def test_the_architecture_table_names_every_module_where_it_lives() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text[text.index("## Where each piece lives") : text.index("## Finding your way in")]
    listed = set(re.findall(r"`([a-z_/]+)\.(?:py|sql)`", table))
    worker = ROOT / "worker"
    expected = {p.stem for p in worker.glob("*.py")} | {
        f"tools/{p.stem}" for p in (worker / "tools").glob("*.py")
    }
    expected |= {"queries", "tools/reference"}
    expected -= {"__init__", "tools/__init__"}
    assert not expected - listed, f"modules the table leaves out: {expected - listed}"
    assert not {m for m in listed - expected if not m.startswith("schemas/")}, listed - expected
