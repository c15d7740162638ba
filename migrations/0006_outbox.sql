-- Transactional outbox: events are written with the state change and published
-- by the relay after commit. One row per (contact, state change), enforced here.
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    contact_id   bigint      NOT NULL REFERENCES contacts (id),
    routing_key  text        NOT NULL
                 CHECK (routing_key IN ('contact.assigned', 'contact.queued', 'contact.closed')),
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    UNIQUE (contact_id, routing_key)
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;
