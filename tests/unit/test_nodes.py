"""The node list of LEADROUTER_AMQP_URL: how it is split and masked, and the order in
which a connection that lost its node tries the others (without waiting until every one
has failed)."""

import asyncpg
from yarl import URL

from worker.nodes import ClusterConnection, node_urls
from worker.retry import is_transient, read_only
from worker.settings import mask_url

NODES = "amqp://u:p1@mq1:5672/,amqp://u:p2@mq2:5672/, amqp://u:p3@mq3:5672/v?heartbeat=5"


def test_node_urls_split_on_the_comma_before_each_url() -> None:
    assert node_urls(NODES) == [
        "amqp://u:p1@mq1:5672/",
        "amqp://u:p2@mq2:5672/",
        "amqp://u:p3@mq3:5672/v?heartbeat=5",
    ]
    assert node_urls("amqp://u:p@mq1/?name=a,b") == ["amqp://u:p@mq1/?name=a,b"]


def test_every_password_of_a_list_is_masked() -> None:
    masked = mask_url(NODES)
    assert "p1" not in masked and "p2" not in masked and "p3" not in masked
    assert masked.count("u:***@") == 3
    # A libpq host list is one URL.
    assert mask_url("postgresql://u:pw@db1,db2/x") == "postgresql://u:***@db1,db2/x"


async def test_a_lost_node_is_followed_by_the_others_at_once_then_the_interval() -> None:
    nodes = [URL(u) for u in node_urls(NODES)]
    connection = ClusterConnection(nodes, 1, reconnect_interval=3)
    assert connection.url == nodes[1]
    assert connection.reconnect_interval == 0  # connected: a loss is acted on at once
    tried = []
    for _ in range(3):
        lost = connection.loop.create_future()
        lost.set_exception(ConnectionError("refused"))
        await connection._on_connection_close(lost)
        tried.append((str(connection.url), connection.reconnect_interval))
    assert tried == [
        (str(nodes[2]), 0),  # the next node, without a pause
        (str(nodes[0]), 0),
        (str(nodes[1]), 3),  # every node failed once: now the interval
    ]
    await connection.close()


def test_failover_errors_are_transient() -> None:
    assert is_transient(asyncpg.exceptions.TargetServerAttributeNotMatched("no primary"))
    error = asyncpg.ReadOnlySQLTransactionError("read-only")
    assert is_transient(error) and read_only(error)
    assert not read_only(asyncpg.UniqueViolationError("dup"))
    # A session the shutting-down primary ended while the pool held it.
    ended = "cannot switch to state 15; another operation (2) is in progress"
    assert is_transient(asyncpg.exceptions.InternalClientError(ended))
    assert not is_transient(asyncpg.exceptions.InternalClientError("something else"))
