"""Running the `leadrouter` command as a subprocess, as a person or a script does."""

import json
import subprocess
import sys
from typing import Any

from worker.settings import Settings
from worker.tools.processes import worker_env


def leadrouter(
    settings: Settings, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def as_json(settings: Settings, *args: str) -> Any:
    return json.loads(leadrouter(settings, *args, "--json").stdout)


def fails_cleanly(settings: Settings, *args: str, expect: str) -> None:
    result = leadrouter(settings, *args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expect in lines[0]
