import pytest

# Lines the fault suite wants printed at the end of the run, outside pytest's capture.
SUMMARIES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARIES:
        terminalreporter.write_line(line)
