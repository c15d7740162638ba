"""Settings and mask_url: passwords never appear in what may be logged."""

import os

import pytest

from worker.settings import Settings, mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql://leadrouter:s3cret@db.example.com:5432/leadrouter",
            "postgresql://leadrouter:***@db.example.com:5432/leadrouter",
        ),
        (
            "postgresql://leadrouter:s3cret@db.example.com/leadrouter",
            "postgresql://leadrouter:***@db.example.com/leadrouter",
        ),
        (
            "postgresql://leadrouter:s3cret@[::1]:5432/leadrouter",
            "postgresql://leadrouter:***@[::1]:5432/leadrouter",
        ),
        (
            "postgresql://leadrouter:s3cret@[2001:db8::7]/leadrouter?sslmode=require",
            "postgresql://leadrouter:***@[2001:db8::7]/leadrouter?sslmode=require",
        ),
        ("amqp://guest:s3cret@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqp://guest:s3cret@rabbit/", "amqp://guest:***@rabbit/"),
        (
            "amqps://app:s3cret@rabbit.example.com:5671/%2F",
            "amqps://app:***@rabbit.example.com:5671/%2F",
        ),
        ("amqp://guest:s3cret@[fe80::1]:5672/vhost", "amqp://guest:***@[fe80::1]:5672/vhost"),
        ("amqp://:s3cret@rabbit/", "amqp://:***@rabbit/"),
        ("amqp://guest:@rabbit/", "amqp://guest:***@rabbit/"),
    ],
)
def test_mask_url_hides_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cret" not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:s3cret%40with%3Aescapes@host/db",
        "postgresql://user:p@ss:s3cret@host/db",
        "postgresql://user:s3cret@host:5432/db?application_name=lr",
        "amqp://user:s3cret@host:5672/vhost?heartbeat=30",
    ],
)
def test_mask_url_password_never_survives(url: str) -> None:
    masked = mask_url(url)
    assert "s3cret" not in masked
    assert masked.startswith(url.split("://")[0] + "://user:***@host")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/leadrouter",
        "postgresql://127.0.0.1/leadrouter",
        "postgresql:///leadrouter?host=/var/run/postgresql",
        "amqp://guest@rabbit/",
        "amqp://rabbit:5672/",
        "amqp://[::1]:5672/",
    ],
)
def test_mask_url_leaves_passwordless_urls(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_multi_host() -> None:
    masked = mask_url("postgresql://u:s3cret@h1:5432,h2:5433/db")
    assert "s3cret" not in masked
    assert "h2:5433" in masked


def clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LEADROUTER_"):
            monkeypatch.delenv(name)


def test_defaults_point_at_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    defaults = Settings()
    assert "127.0.0.1:5432" in defaults.database_url
    assert "127.0.0.1:5672" in defaults.amqp_url
    assert defaults.inbound_exchange == "leads.inbound"
    assert defaults.inbound_queue == "leadrouter.inbound"
    assert defaults.events_exchange == "leads.events"
    assert defaults.dead_exchange == "leads.dead"
    assert defaults.dead_queue == "leadrouter.dead"
    assert defaults.delivery_limit >= 1


def test_masked_hides_env_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    monkeypatch.setenv("LEADROUTER_DATABASE_URL", "postgresql://lr:pg-pa55word@db:5432/leadrouter")
    monkeypatch.setenv("LEADROUTER_AMQP_URL", "amqp://lr:mq-pa55word@[::1]:5672/prod")
    monkeypatch.setenv("LEADROUTER_MIGRATIONS_DIR", "/srv/migrations")
    loaded = Settings()
    assert loaded.database_url == "postgresql://lr:pg-pa55word@db:5432/leadrouter"
    assert loaded.amqp_url == "amqp://lr:mq-pa55word@[::1]:5672/prod"
    masked = loaded.masked()
    text = repr(masked)
    assert "pg-pa55word" not in text
    assert "mq-pa55word" not in text
    assert masked["database_url"] == "postgresql://lr:***@db:5432/leadrouter"
    assert masked["amqp_url"] == "amqp://lr:***@[::1]:5672/prod"
    assert set(masked) == set(Settings.model_fields)
    assert masked["migrations_dir"] == "/srv/migrations"


def test_migrations_default_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    assert Settings().migrations_dir is None
    assert Settings().masked()["migrations_dir"] is None


def test_masked_keeps_other_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADROUTER_INBOUND_QUEUE", "custom.inbound")
    monkeypatch.setenv("LEADROUTER_DELIVERY_LIMIT", "4")
    masked = Settings().masked()
    assert masked["inbound_queue"] == "custom.inbound"
    assert masked["delivery_limit"] == 4
