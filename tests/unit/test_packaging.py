"""The wheel carries everything the CLI reads at run time: the migrations, the named
queries, the demo's routing file and the contract files. (`.ci/run` also installs it in a
fresh virtualenv outside the checkout and runs `leadrouter migrate` and `leadrouter demo`.)"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("worker", "schemas", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("leadrouter-*.whl")
    return zipfile.ZipFile(built)


@pytest.mark.slow
def test_the_wheel_carries_what_the_cli_reads(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    wanted = {f"worker/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")}
    wanted |= {"worker/queries.sql", "worker/tools/reference.sql", "worker/tools/demo_routing.toml"}
    wanted |= {f"schemas/{p.name}" for p in (ROOT / "schemas").glob("*.json")}
    wanted |= {"schemas/asyncapi.yaml"}
    assert len(wanted) > 10
    assert wanted <= names, f"missing from the wheel: {sorted(wanted - names)}"


@pytest.mark.slow
def test_the_wheel_installs_no_top_level_migrations(wheel: zipfile.ZipFile) -> None:
    """Only worker/ and schemas/ land in site-packages; migrations/ lives inside worker/."""
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"worker", "schemas"}


@pytest.mark.slow
def test_the_wheel_has_the_version_command(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "leadrouter = worker.cli:main" in wheel.read(entry_points).decode()
