"""Bodies are UTF-8 JSON without a byte order mark: anything else is invalid_json."""

import asyncio
import json

import aio_pika
import asyncpg
import pytest

from tests.helpers import lead, setup_source
from tests.raw_amqp import dead_letters, publish_raw
from worker.app import Worker
from worker.errors import ERROR_HEADER, REASON_HEADER
from worker.settings import Settings


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
async def test_a_body_not_in_utf8_is_invalid_json(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    encoding: str,
) -> None:
    """json.loads would read these (it guesses the encoding of bytes); the contract says
    UTF-8 without a byte order mark."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    body = json.dumps(lead("tg", "bom:1")).encode(encoding)
    app = Worker(settings)
    await app.start()
    try:
        await asyncio.to_thread(publish_raw, settings, "lead.contact", body, "bom-1")
        [letter] = await dead_letters(settings, 1)
    finally:
        await app.stop()
    headers = letter.headers or {}
    assert headers[REASON_HEADER] == "invalid_json"
    assert "UTF-8" in str(headers[ERROR_HEADER])
    assert letter.body == body
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0
