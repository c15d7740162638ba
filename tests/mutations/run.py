"""The mutation check: each mutation in mutations.toml breaks one promise of the code on
purpose (an SQL guard removed, an ack moved before the commit...); the tests named with
it must then fail. A mutation they survive is a promise no test holds, and the check
fails.

    python tests/mutations/run.py            # every mutation (a few minutes)
    python tests/mutations/run.py --list     # their names and what each breaks
    python tests/mutations/run.py NAME ...   # some of them

The repository is copied to a scratch directory (tracked and untracked files, not what
.gitignore leaves out), the selected tests are run there once unmutated (they must pass),
then each mutation is applied to the copy, its tests run, and the file put back. The
original checkout is never changed. Every mutation's `old` text must occur exactly once
in its file: when the code changed, the check fails before running anything, saying
which mutation to update. Exit status: 0 all caught, 1 some survived, 2 the check itself
could not run (text not found, tests failing unmutated)."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = Path(__file__).with_name("mutations.toml")
TEST_TIMEOUT_SECONDS = 60  # per test: a mutation that hangs a test fails it
RUN_TIMEOUT_SECONDS = 300  # per mutation


@dataclass(frozen=True)
class Edit:
    old: str
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    breaks: str
    file: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


def load(path: Path = MUTATIONS) -> list[Mutation]:
    data = tomllib.loads(path.read_text())
    mutations = []
    for item in data["mutation"]:
        edits = item.get("edit") or [{"old": item["old"], "new": item["new"]}]
        mutations.append(
            Mutation(
                name=item["name"],
                breaks=item["breaks"],
                file=item["file"],
                edits=tuple(Edit(e["old"], e["new"]) for e in edits),
                tests=tuple(item["tests"]),
            )
        )
    names = [m.name for m in mutations]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"mutations.toml: names used twice: {sorted(duplicates)}")
    return mutations


def problems(mutations: list[Mutation], root: Path) -> list[str]:
    """Mutations whose text is not found exactly once, or whose tests do not exist."""
    found = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            found.append(f"{m.name}: {m.file} does not exist")
            continue
        text = path.read_text()
        for n, edit in enumerate(m.edits, 1):
            count = text.count(edit.old)
            if count != 1:
                found.append(
                    f"{m.name}: edit {n}'s old text occurs {count} times in {m.file}, not once"
                    " (the code changed: update tests/mutations/mutations.toml)"
                )
            if edit.old == edit.new:
                found.append(f"{m.name}: edit {n} changes nothing")
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                found.append(f"{m.name}: test file {test.split('::')[0]} does not exist")
    return found


def scratch_copy(root: Path) -> Path:
    """The working tree as git sees it (tracked and untracked, not ignored files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    target = Path(tempfile.mkdtemp(prefix="leadrouter-mutations-"))
    for name in filter(None, listed):
        source = root / os.fsdecode(name)
        if source.is_file():  # deleted but still tracked: skip
            dest = target / os.fsdecode(name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    return target


def pytest(copy: Path, tests: list[str], quiet_fail: bool = True) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}  # the copy's modules, not the checkout's
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--timeout={TEST_TIMEOUT_SECONDS}",
        *tests,
    ]
    try:
        result = subprocess.run(
            command,
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return 1, f"timed out after {RUN_TIMEOUT_SECONDS}s: {exc.stdout!r:.500}"
    return result.returncode, result.stdout + result.stderr


def imports_from(copy: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    out = subprocess.run(
        [sys.executable, "-c", "import worker; print(worker.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return Path(out.strip()).resolve()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()

    mutations = load()
    if args.list:
        for m in mutations:
            print(f"{m.name:32} {m.file:28} {m.breaks}")
        return 0
    unknown = set(args.names) - {m.name for m in mutations}
    if unknown:
        print(f"no such mutation: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.names:
        mutations = [m for m in mutations if m.name in args.names]
    found = problems(mutations, ROOT)
    if found:
        print("mutation check cannot run:", *found, sep="\n  ", file=sys.stderr)
        return 2

    copy = scratch_copy(ROOT)
    try:
        if not imports_from(copy).is_relative_to(copy.resolve()):
            print(f"the tests would not import the copy's code ({copy})", file=sys.stderr)
            return 2
        selected = list(dict.fromkeys(t for m in mutations for t in m.tests))
        started = time.monotonic()
        code, output = pytest(copy, selected)
        if code != 0:
            print("the selected tests fail without any mutation:", file=sys.stderr)
            print(output[-4000:], file=sys.stderr)
            return 2
        print(
            f"unmutated: {len(selected)} test selections pass ({time.monotonic() - started:.0f}s)"
        )

        survived, broken = [], []
        for m in mutations:
            path = copy / m.file
            original = path.read_text()
            mutated = original
            for edit in m.edits:
                mutated = mutated.replace(edit.old, edit.new, 1)
            path.write_text(mutated)
            started = time.monotonic()
            try:
                code, output = pytest(copy, list(m.tests))
            finally:
                path.write_text(original)
            seconds = time.monotonic() - started
            if code == 1:
                verdict = "caught"
            elif code == 0:
                verdict = "SURVIVED"
                survived.append(m.name)
            else:  # 2-5: interrupted, internal error, usage error, nothing collected
                verdict = f"ERROR (pytest exit {code})"
                broken.append((m.name, output[-2000:]))
            print(f"{verdict:10} {m.name:32} {seconds:5.0f}s  {m.breaks}", flush=True)
        for name, output in broken:
            print(f"\n{name}:\n{output}", file=sys.stderr)
        if survived:
            print(f"\n{len(survived)} mutation(s) survived: {', '.join(survived)}")
            return 1
        if broken:
            return 2
        print(f"\nall {len(mutations)} mutations caught")
        return 0
    finally:
        shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
