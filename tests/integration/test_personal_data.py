"""Nothing a message says reaches the worker's log or a dead letter's headers: personal
data planted in unknown keys, wrong-typed and over-long fields, invalid JSON, the routing
key and the positions that make an error, sent to a real worker process whose whole
output (at DEBUG) is then searched."""

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from tests.helpers import EventCollector, lead, setup_source
from tests.raw_amqp import dead_letters, publish_raw
from worker.errors import ERROR_HEADER, REASON_HEADER
from worker.settings import Settings
from worker.tools.processes import spawn_worker

EMAIL = "marker.ann@example.com"
PHONE = "+49 151 99887766"
DIGITS = "4915199887766"
MARKERS = (EMAIL, PHONE, DIGITS, "marker.ann", "99887766")


def raw(text: str) -> bytes:
    return text.encode()


# (routing key, body): each must be dead-lettered.
CASES: list[tuple[str, bytes | dict[str, Any]]] = [
    # unknown keys at several depths
    ("lead.contact", {**lead("tg", "pd:1"), EMAIL: PHONE}),
    ("lead.contact", {**lead("tg", "pd:2"), "lead": {"external_id": "pd:2", PHONE: EMAIL}}),
    ("lead.contact", {**lead("tg", "pd:3"), "message": {EMAIL: {PHONE: 1}}}),
    ("contact.close", {"contact_id": 1, DIGITS: [EMAIL]}),
    # wrong-typed fields
    ("lead.contact", lead("tg", [EMAIL])),  # type: ignore[arg-type]
    ("lead.contact", lead("tg", "pd:4", name={PHONE: EMAIL})),
    ("lead.contact", {"source": "tg", "lead": EMAIL}),
    ("contact.close", {"contact_id": EMAIL}),
    ("contact.close", {"contact_id": 1, "message_id": [PHONE]}),
    ("lead.contact", [EMAIL, PHONE]),
    (EMAIL, {"contact_id": 1}),
    # over-long and malformed fields
    ("lead.contact", lead("tg", "pd:5", name=EMAIL * 20)),
    ("lead.contact", {**lead("tg", "pd:6"), "message": PHONE * 1000}),
    ("lead.contact", lead("tg", "pd:7", email=PHONE)),
    ("lead.contact", lead("tg", "pd:8", phone=EMAIL)),
    ("lead.contact", lead(EMAIL, "pd:9")),
    ("contact.close", {"contact_id": 1, "message_id": EMAIL * 20}),
    # error-provoking positions: an unknown source or contact that is personal data
    ("lead.contact", lead(DIGITS, "pd:10")),
    ("contact.close", {"contact_id": int(DIGITS)}),
    # the routing key
    ("lead." + DIGITS, lead("tg", "pd:11")),
    # invalid JSON just after, or at, the personal data
    ("lead.contact", raw('{"source": "tg", "lead": {"external_id": "' + EMAIL + '\\q"}}')),
    ("lead.contact", raw('{"' + EMAIL + '" ' + PHONE + "}")),
    ("lead.contact", raw('{"source": "' + EMAIL + '\x01"}')),
    ("contact.close", raw('{"contact_id": 1} ' + PHONE)),
    ("contact.close", raw('{"contact_id": 1, "x": "' + EMAIL) + b'\xff"}'),
    ("contact.close", b"\xef\xbb\xbf" + raw('{"contact_id": 1, "x": "' + EMAIL + '"}')),
    ("contact.close", json.dumps({"contact_id": 1, "x": EMAIL}).encode("utf-16")),
    ("contact.close", raw('{"' + EMAIL + '": 1' + "9" * 5000 + "}")),
]


async def test_no_personal_data_in_logs_or_dead_letter_headers(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    await setup_source(pool, "tg", [("a", 100, 1)])
    log_file = tmp_path / "worker.log"
    with log_file.open("wb") as out:
        proc = spawn_worker(settings.model_copy(update={"log_level": "DEBUG"}), out)
    try:
        for n, (routing_key, body) in enumerate(CASES):
            await asyncio.to_thread(publish_raw, settings, routing_key, body, f"pd-{n}")
        # A valid lead full of personal data is handled, and not logged either.
        valid = lead("tg", "pd:ok", name="Ann Marker", email=EMAIL, phone=PHONE)
        await asyncio.to_thread(publish_raw, settings, "lead.contact", valid, "pd-ok")

        [assigned] = await events.wait_for("contact.assigned", 1)
        assert assigned.data.inbound_message_id == "pd-ok"
        dead = await dead_letters(settings, len(CASES))
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0

    assert sorted(m.message_id or "" for m in dead) == sorted(f"pd-{n}" for n in range(len(CASES)))
    log = log_file.read_text()
    assert log.count('"event": "dead_lettered"') == len(CASES), log
    assert "<unknown key>" in log and "<unknown routing key>" in log
    for message in dead:
        headers = message.headers or {}
        assert headers[REASON_HEADER] and headers[ERROR_HEADER]
        shown = repr(headers)
        for marker in MARKERS:
            assert marker not in shown, (message.message_id, headers)
    for marker in MARKERS:
        assert marker not in log, marker
