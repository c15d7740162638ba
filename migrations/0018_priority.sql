-- Priority, queue order, overflow to another source's team, and waiting alerts. All off
-- by default: priority 0 everywhere, first in first out, no overflow, no alert.
--
-- A contact's priority (0-9, higher first). The backlog index now orders each source's
-- queued contacts by priority, then id; it replaces `contacts_queued`, and still serves
-- every query that looked a source's backlog up by `source_id`. Newest first (`lifo`)
-- reads it one priority at a time, backwards within each.
ALTER TABLE contacts ADD COLUMN priority smallint NOT NULL DEFAULT 0
    CHECK (priority BETWEEN 0 AND 9);
CREATE INDEX contacts_queued_order ON contacts (source_id, priority DESC, id)
    WHERE status = 'open' AND operator_id IS NULL;
DROP INDEX contacts_queued;

-- Per source: the backlog's order; after `overflow_after` seconds in the queue a contact
-- may also go to `overflow_to`'s operators; after `alert_after` seconds still queued it
-- emits contact.waiting. `receives_overflow`: some source overflows into this one (kept
-- by the CLI and `apply`, which change overflow settings under one lock), so routing
-- reads overflowed contacts only where there can be any. The timers process each
-- source's queued contacts in id order under its routing lock, so a watermark (the last
-- contact id handled) says what is done: a contact is alerted, or overflowed, once.
ALTER TABLE sources
    ADD COLUMN queue_order text NOT NULL DEFAULT 'fifo' CHECK (queue_order IN ('fifo', 'lifo')),
    ADD COLUMN overflow_to bigint REFERENCES sources (id),
    ADD COLUMN overflow_after integer CHECK (overflow_after > 0),
    ADD COLUMN alert_after integer CHECK (alert_after > 0),
    ADD COLUMN receives_overflow boolean NOT NULL DEFAULT false,
    ADD COLUMN alerted_through bigint NOT NULL DEFAULT 0,
    ADD COLUMN overflowed_through bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT sources_overflow_pair CHECK ((overflow_to IS NULL) = (overflow_after IS NULL)),
    ADD CONSTRAINT sources_overflow_elsewhere CHECK (overflow_to <> id);

-- Which other sources' operators a queued contact may go to now: one row per hop of an
-- overflow chain (A -> B -> C gives rows for B, then C). `forwarded`: passed on along the
-- target's own overflow setting already. Rows of contacts no longer queued are deleted
-- by the timers.
CREATE TABLE contact_overflows (
    contact_id    bigint      NOT NULL REFERENCES contacts (id),
    source_id     bigint      NOT NULL REFERENCES sources (id),
    priority      smallint    NOT NULL,
    overflowed_at timestamptz NOT NULL DEFAULT now(),
    forwarded     boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (source_id, contact_id)
);
CREATE INDEX contact_overflows_contact ON contact_overflows (contact_id);

-- The two new events, beside today's.
ALTER TABLE outbox DROP CONSTRAINT outbox_routing_key_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_routing_key_check CHECK (routing_key IN (
    'contact.assigned', 'contact.queued', 'contact.closed', 'contact.offered',
    'contact.declined', 'contact.expired', 'contact.answer_rejected',
    'contact.overflowed', 'contact.waiting'));
