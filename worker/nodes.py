"""Connecting to a RabbitMQ cluster: LEADROUTER_AMQP_URL may list several nodes of one
cluster, comma-separated (`amqp://u:p@mq1:5672/,amqp://u:p@mq2:5672/`). Connections go to
the first node that answers; a robust connection whose node goes away moves on to the
next node at once, and waits (aio-pika's `reconnect_interval`) only after every node has
refused in turn. With one URL everything behaves as aio-pika's own.

A comma inside one URL (in a password, say) is written %2C. Connection parameters
(`?heartbeat=`, `?reconnect_interval=`) are read from the first URL and apply to all."""

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from worker import log
from worker.settings import mask_url, split_urls

logger = log.get(__name__)
# How long one node may take to accept a connection before the next one is tried.
CONNECT_TIMEOUT_SECONDS = 10.0


def node_urls(amqp_url: str) -> list[str]:
    """The node URLs of a LEADROUTER_AMQP_URL, in order."""
    return split_urls(amqp_url)


class ClusterConnection(RobustConnection):
    """A robust connection over several nodes: aio-pika reconnects to `self.url` and
    sleeps `self.reconnect_interval` after each attempt; here the URL is the node to try
    next, and the pause is nothing until every node has failed once since the last
    connection. Channels, their declarations and consumers are restored by aio-pika on
    whichever node it reached."""

    def __init__(self, nodes: Sequence[URL], first: int = 0, **kwargs: Any) -> None:
        self._nodes = list(nodes)
        self._node = first
        self._failed = 0  # attempts failed (or connections lost) since the last success
        self._interval = 5.0
        super().__init__(self._nodes[first], **kwargs)

    @property
    def url(self) -> URL:
        return self._nodes[self._node]

    @url.setter
    def url(self, value: URL) -> None:  # set by Connection.__init__ and update_secret
        self._nodes[self._node] = URL(value)

    @property
    def reconnect_interval(self) -> float:
        return 0.0 if self._failed < len(self._nodes) else self._interval

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:  # RobustConnection.__init__
        self._interval = float(value)

    @property
    def node(self) -> str:
        """The node this connection uses (or tries next), password masked."""
        return mask_url(str(self.url))

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Called when a connection is lost and when an attempt fails: the next attempt
        # goes to the next node.
        if not (self._close_called or self.is_closed):
            lost = self.node
            self._failed += 1
            self._node = (self._node + 1) % len(self._nodes)
            if len(self._nodes) > 1:
                logger.warning(
                    "amqp_node_unavailable",
                    node=lost,
                    next_node=self.node,
                    wait_seconds=self.reconnect_interval,
                )
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        if self._failed and len(self._nodes) > 1:
            logger.info("amqp_node_connected", node=self.node)
        self._failed = 0


async def connect_robust(
    amqp_url: str, connect_seconds: float = CONNECT_TIMEOUT_SECONDS, **kwargs: Any
) -> ClusterConnection:
    """A robust connection to the first node that answers (tried in the given order);
    raises the last node's error when none does."""
    nodes = [URL(url) for url in node_urls(amqp_url)]
    error: BaseException | None = None
    for first in range(len(nodes)):
        connection = ClusterConnection(nodes, first, **kwargs)
        try:
            await connection.connect(timeout=connect_seconds)
        except CONNECTION_EXCEPTIONS as exc:
            error = exc
            with contextlib.suppress(Exception):
                await connection.close()
            continue  # logged by the connection (amqp_node_unavailable)
        return connection
    assert error is not None, "no AMQP URL"
    raise error


async def connect(
    amqp_url: str, connect_seconds: float = CONNECT_TIMEOUT_SECONDS, **kwargs: Any
) -> AbstractConnection:
    """A plain connection (the CLI's one-shot commands) to the first node that answers."""
    urls = node_urls(amqp_url)
    error: BaseException | None = None
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=connect_seconds, **kwargs)
        except CONNECTION_EXCEPTIONS as exc:
            error = exc
            if len(urls) > 1:
                logger.warning("amqp_node_unavailable", node=mask_url(url), error=_name(exc))
    assert error is not None, "no AMQP URL"
    raise error


def _name(exc: BaseException) -> str:
    return type(exc).__name__
