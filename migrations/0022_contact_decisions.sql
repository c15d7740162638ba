-- The history of each contact: one row per decision about it (offered, assigned,
-- declined, expired, requeued, overflowed, queued, closed, answer_rejected, waiting),
-- written in the transaction that made the decision, by the statement that writes its
-- event. `detail` is compact JSON (worker/decisions.py): the operator and source, and
-- for a routing decision the candidates read with their numbers and who was skipped and
-- why. No foreign key: checking one per row would cost the routing transaction, and
-- contacts are never deleted. Pruned by age (LEADROUTER_HISTORY_RETENTION_HOURS), in id
-- order like the outbox.
CREATE TABLE contact_decisions (
    id         bigserial PRIMARY KEY,
    contact_id bigint      NOT NULL,
    kind       text        NOT NULL,
    at         timestamptz NOT NULL,
    detail     json        NOT NULL
);
CREATE INDEX contact_decisions_contact ON contact_decisions (contact_id, id);
