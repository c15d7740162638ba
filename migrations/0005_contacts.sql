-- One appeal of a lead through a source. operator_id is NULL while queued.
-- inbound_message_id is unique: a redelivered message can never make a second contact.
CREATE TABLE contacts (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lead_id            bigint      NOT NULL REFERENCES leads (id),
    source_id          bigint      NOT NULL REFERENCES sources (id),
    operator_id        bigint REFERENCES operators (id),
    status             text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    message            text        NOT NULL DEFAULT '' CHECK (length(message) <= 10000),
    inbound_message_id text        NOT NULL UNIQUE CHECK (length(inbound_message_id) BETWEEN 1 AND 256),
    created_at         timestamptz NOT NULL DEFAULT now(),
    assigned_at        timestamptz,
    closed_at          timestamptz,
    CHECK ((operator_id IS NULL) = (assigned_at IS NULL)),
    CHECK ((status = 'closed') = (closed_at IS NOT NULL))
);
-- The backlog, oldest first per source.
CREATE INDEX contacts_queued ON contacts (source_id, id) WHERE status = 'open' AND operator_id IS NULL;
CREATE INDEX contacts_operator_open ON contacts (operator_id) WHERE status = 'open';
CREATE INDEX contacts_lead ON contacts (lead_id);
