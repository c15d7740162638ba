"""The URL checks the CLI makes before connecting: they refuse what the client libraries
would refuse with a traceback, and accept every form those libraries take."""

import pytest

from worker.cli import _amqp_url_problem, _database_url_problem, main


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/leadrouter",
        "postgres://user:secret@h1:5432,h2:5433/db",
        "postgresql:///db?host=/var/run/postgresql",
        "postgresql://[::1]:5432/db",
        "postgresql://[::1]/db",
        "postgresql://user:p%40ss@host/db?sslmode=require&password=x",
    ],
)
def test_database_urls_libpq_takes(url: str) -> None:
    assert _database_url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://user:secret@127.0.0.1:notaport/db", "the port is not a number"),
        ("postgresql://user:secret@h1:5432,h2:x/db", "the port is not a number"),
        ("postgresql://[::1/db", "malformed"),
        ("postgresql://h/db?a=1&&=", "malformed"),
        ("mysql://user:secret@h/db", "expected postgresql://"),
        ("nonsense", "expected postgresql://"),
    ],
)
def test_database_urls_refused(url: str, says: str) -> None:
    problem = _database_url_problem(url)
    assert problem is not None and says in problem
    assert "secret" not in problem


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqps://user:secret@mq/vhost",
        "amqp://mq",
        "amqp://h/%2f",
    ],
)
def test_amqp_urls_aio_pika_takes(url: str) -> None:
    assert _amqp_url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://guest:secret@127.0.0.1:notaport/", "malformed"),
        ("amqp://guest:secret@127.0.0.1:70000/", "malformed"),
        ("amqp:/nohost", "no host"),
        ("amqp://guest:secret@[::1/", "malformed"),
        ("http://guest:secret@127.0.0.1:5672/", "expected amqp://"),
    ],
)
def test_amqp_urls_refused(url: str, says: str) -> None:
    problem = _amqp_url_problem(url)
    assert problem is not None and says in problem
    assert "secret" not in problem


@pytest.mark.parametrize("name", ["LEADROUTER_DATABASE_URL", "LEADROUTER_DEAD_QUEUE"])
def test_a_setting_that_is_not_utf8_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # What os.environ holds for a variable set to bytes that are not UTF-8.
    monkeypatch.setenv(name, "postgresql://u:secret@h/db\udcff")
    assert main(["operators", "list"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: invalid setting: {name}: not valid UTF-8\n"


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:secret@mq1:5672/,amqp://u:secret@mq2:5672/,amqp://u:secret@mq3:5672/",
        "amqp://mq1/, amqp://mq2/",
        "amqp://u:a%2Cb@mq1/,amqps://u:a%2Cb@mq2/vhost",
    ],
)
def test_amqp_node_lists_are_taken(url: str) -> None:
    assert _amqp_url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://u:secret@mq1/,amqp://u:secret@mq2:notaport/", "malformed"),
        ("amqp://u:secret@mq1/,http://u:secret@mq2/", "expected amqp://"),
    ],
)
def test_each_node_of_a_list_is_checked(url: str, says: str) -> None:
    problem = _amqp_url_problem(url)
    assert problem is not None and says in problem
    assert "secret" not in problem


def test_a_failover_database_url_is_taken() -> None:
    url = "postgresql://u:secret@db1:5432,db2:5432/leadrouter?target_session_attrs=read-write"
    assert _database_url_problem(url) is None
