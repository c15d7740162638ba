"""Configuration, from LEADROUTER_* environment variables (or a secrets directory)."""

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.log import Format, Level

# Docker/Kubernetes secrets: a file per setting, e.g. /run/secrets/leadrouter_amqp_url.
_SECRETS_DIR = Path("/run/secrets")


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LEADROUTER_",
        secrets_dir=_SECRETS_DIR if _SECRETS_DIR.is_dir() else None,
        extra="ignore",
    )

    database_url: str = "postgresql://postgres@127.0.0.1:5432/leadrouter"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"

    inbound_exchange: str = "leads.inbound"
    inbound_queue: str = "leadrouter.inbound"
    events_exchange: str = "leads.events"
    dead_exchange: str = "leads.dead"
    dead_queue: str = "leadrouter.dead"

    # Deliveries after which the broker dead-letters a message that keeps failing.
    delivery_limit: int = Field(default=10, ge=1)
    # Micro-batching: up to batch_size messages per transaction, concurrent_batches
    # transactions at once; prefetch covers them and the next batch arriving meanwhile.
    # Chosen by `leadrouter bench` (README, Performance): one transaction at a time was
    # as fast at 200/s and full load, and kept p99 lower at 1,500/s. More than one: the
    # others start only at low load (Consumer._batcher), as under load batches of many
    # sources would only overlap on their locks.
    prefetch: int = Field(default=400, ge=1)
    batch_size: int = Field(default=200, ge=1)
    concurrent_batches: int = Field(default=1, ge=1)
    # Wait this long for a batch to fill when fewer messages are waiting (0: take what
    # is there; batches then form by themselves under load).
    batch_linger_seconds: float = Field(default=0.0, ge=0, le=1)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    pool_size: int = Field(default=8, ge=1)

    outbox_batch: int = Field(default=500, ge=1)
    outbox_concurrency: int = Field(default=2, ge=1)
    outbox_sweep_seconds: float = Field(default=5.0, gt=0)
    # How long the relays leave the events a worker committed to that worker, which
    # publishes them itself right after commit; a worker that died is covered after this.
    outbox_lease_seconds: float = Field(default=10.0, gt=0)
    # Published events are kept this long (to inspect or replay by hand), then deleted.
    outbox_retention_hours: float = Field(default=168.0, gt=0)
    # Each contact's history (`contacts explain`): recorded with every decision about it,
    # in its transaction (off: nothing is recorded), kept this long, then deleted.
    history: bool = True
    history_retention_hours: float = Field(default=168.0, gt=0)
    backlog_sweep_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=5.0, gt=0)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)

    # /metrics, /healthz, /readyz; port 0 turns the server off. Bind 0.0.0.0 in a container.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    # How often the worker checks PostgreSQL and RabbitMQ; it stops taking messages while
    # PostgreSQL is unreachable.
    health_interval_seconds: float = Field(default=1.0, gt=0)

    # uvloop: about a tenth less worker CPU than asyncio and 7 % more messages/s, measured
    # with `leadrouter bench` (README, Performance).
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    log_level: Annotated[Level, BeforeValidator(_upper)] = "INFO"
    # auto: console on a terminal, JSON lines otherwise.
    log_format: Format = "auto"

    # None: the migrations the package carries; a directory of NNNN_name.sql files overrides.
    migrations_dir: Path | None = None

    def masked(self) -> dict[str, object]:
        """The settings as they may be logged: URLs without passwords."""
        data = self.model_dump()
        data["database_url"] = mask_url(self.database_url)
        data["amqp_url"] = mask_url(self.amqp_url)
        if self.migrations_dir is not None:
            data["migrations_dir"] = str(self.migrations_dir)
        return data


def mask_url(url: str) -> str:
    """Replace the password of a URL with ***, in the user part and in a `password=`
    query parameter (libpq accepts both); works for multi-host libpq URLs too, and for a
    comma-separated list of URLs (the nodes of a RabbitMQ cluster)."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(_mask_one(u) for u in urls)
    return _mask_one(url)


# A comma followed by a scheme starts another URL; libpq's host lists have no scheme.
_URL_LIST = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(value: str) -> list[str]:
    """The URLs of a comma-separated list (one URL: itself), blanks around them removed."""
    return [url.strip() for url in _URL_LIST.split(value)]


def _mask_one(url: str) -> str:
    parts = urlsplit(url)
    masked = parts
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        masked = masked._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hosts}")
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    masked = masked._replace(query=query)
    # Untouched when there is nothing to hide (urlunsplit would drop an empty host's //).
    return url if masked == parts else urlunsplit(masked)
