-- All SQL of leadrouter. Each query is headed by `-- name: NAME` and a line that
-- says what it does and lists its asyncpg parameters.

-- name: lock_source
-- Serialise all routing of one source until commit ($1 source id).
SELECT pg_advisory_xact_lock(1280, $1::integer);

-- name: source_by_key
-- A source by its slug ($1 key).
SELECT id, key, name, description, strategy, affinity_hours FROM sources WHERE key = $1;

-- name: sources_by_ids
-- Sources by id, in lock order ($1 source ids).
SELECT id, key, strategy, affinity_hours FROM sources WHERE id = ANY($1::bigint[]) ORDER BY id;

-- name: contact_exists_for_message
-- Whether an inbound message already made its contact ($1 inbound message id).
SELECT EXISTS (SELECT 1 FROM contacts WHERE inbound_message_id = $1);

-- name: upsert_lead
-- Create a lead or refresh the fields the message carries; race-free ($1 external_id,
-- $2 name, $3 email, $4 phone).
INSERT INTO leads AS l (external_id, name, email, phone)
VALUES ($1, $2, $3, $4)
ON CONFLICT (external_id) DO UPDATE
SET name       = COALESCE(EXCLUDED.name, l.name),
    email      = COALESCE(EXCLUDED.email, l.email),
    phone      = COALESCE(EXCLUDED.phone, l.phone),
    updated_at = now()
RETURNING id;

-- name: insert_contact
-- A new open, unassigned contact; nothing when the message id is known ($1 lead id,
-- $2 source id, $3 message text, $4 inbound message id).
INSERT INTO contacts (lead_id, source_id, message, inbound_message_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT (inbound_message_id) DO NOTHING
RETURNING id, created_at;

-- name: queued_contacts
-- The oldest unassigned open contacts of a source ($1 source id, $2 limit).
SELECT c.id, c.lead_id, l.external_id AS lead_external_id, c.inbound_message_id, c.created_at
FROM contacts c
JOIN leads l ON l.id = c.lead_id
WHERE c.source_id = $1 AND c.status = 'open' AND c.operator_id IS NULL
ORDER BY c.id
LIMIT $2;

-- name: candidates
-- Operators who may take a contact of a source now ($1 source id).
SELECT o.id, w.weight, o.open_load, o.max_load, o.last_assigned_at, w.smooth_lag
FROM source_weights w
JOIN operators o ON o.id = w.operator_id
WHERE w.source_id = $1 AND o.is_active AND o.open_load < o.max_load
ORDER BY o.id;

-- name: claim_operator
-- Take one unit of an operator's capacity if it is still free; the row lock makes
-- this atomic across sources ($1 operator id).
UPDATE operators
SET open_load = open_load + 1, last_assigned_at = now()
WHERE id = $1 AND is_active AND open_load < max_load
RETURNING id;

-- name: update_smooth_lags
-- Store the smooth strategy's state after an assignment ($1 source id, $2 operator ids,
-- $3 lags).
UPDATE source_weights w
SET smooth_lag = t.lag
FROM unnest($2::bigint[], $3::double precision[]) AS t (operator_id, lag)
WHERE w.source_id = $1 AND w.operator_id = t.operator_id;

-- name: affinity_operator
-- The operator of the lead's latest other assigned contact through the source within
-- the affinity window ($1 lead id, $2 source id, $3 contact id, $4 hours).
SELECT operator_id
FROM contacts
WHERE lead_id = $1 AND source_id = $2 AND id <> $3 AND operator_id IS NOT NULL
  AND created_at >= now() - make_interval(hours => $4)
ORDER BY created_at DESC
LIMIT 1;

-- name: release_operator
-- Give back one unit of an operator's capacity ($1 operator id).
UPDATE operators SET open_load = open_load - 1 WHERE id = $1 AND open_load > 0;

-- name: assign_contact
-- Hand a queued contact to an operator ($1 contact id, $2 operator id).
UPDATE contacts
SET operator_id = $2, assigned_at = now()
WHERE id = $1 AND status = 'open' AND operator_id IS NULL
RETURNING assigned_at;

-- name: contact_for_close
-- A contact and the sources whose routing its close may affect ($1 contact id).
SELECT c.id, c.source_id, c.operator_id, c.status,
       array(SELECT w.source_id FROM source_weights w WHERE w.operator_id = c.operator_id)
           AS operator_source_ids
FROM contacts c
WHERE c.id = $1;

-- name: close_contact
-- Close an open contact; nothing when it is already closed ($1 contact id).
UPDATE contacts c
SET status = 'closed', closed_at = now()
FROM leads l, sources s
WHERE c.id = $1 AND c.status = 'open' AND l.id = c.lead_id AND s.id = c.source_id
RETURNING c.id, c.operator_id, c.inbound_message_id, c.closed_at,
          l.id AS lead_id, l.external_id AS lead_external_id, s.key AS source_key;

-- name: insert_event
-- Write an event to the outbox ($1 event id, $2 contact id, $3 routing key, $4 payload).
INSERT INTO outbox (event_id, contact_id, routing_key, payload)
VALUES ($1, $2, $3, $4::jsonb);

-- name: notify_outbox
-- Wake the relays when this transaction commits.
SELECT pg_notify('leadrouter_outbox', '');

-- name: claim_pending_events
-- Lock a batch of unpublished events for one relay; other relays skip them ($1 limit).
SELECT id, event_id, routing_key, payload::text AS payload
FROM outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: mark_events_published
-- Record the broker's confirm for a batch of events ($1 outbox ids).
UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[]);

-- name: sources_with_backlog
-- Sources that have queued contacts and someone who could take one, for the sweep.
SELECT DISTINCT c.source_id
FROM contacts c
WHERE c.status = 'open' AND c.operator_id IS NULL
  AND EXISTS (SELECT 1 FROM source_weights w JOIN operators o ON o.id = w.operator_id
              WHERE w.source_id = c.source_id AND o.is_active AND o.open_load < o.max_load)
ORDER BY c.source_id;

-- name: operator_source_ids
-- The sources an operator is weighted for ($1 operator id).
SELECT source_id FROM source_weights WHERE operator_id = $1 ORDER BY source_id;

-- name: insert_operator
-- A new operator ($1 name, $2 is_active, $3 max_load).
INSERT INTO operators (name, is_active, max_load) VALUES ($1, $2, $3)
RETURNING id, name, is_active, max_load, open_load AS load;

-- name: list_operators
-- Every operator with its current load.
SELECT id, name, is_active, max_load, open_load AS load FROM operators ORDER BY id;

-- name: update_operator
-- Change an operator; NULL keeps a field ($1 id, $2 name, $3 max_load, $4 is_active).
UPDATE operators
SET name      = COALESCE($2, name),
    max_load  = COALESCE($3, max_load),
    is_active = COALESCE($4, is_active)
WHERE id = $1
RETURNING id, name, is_active, max_load, open_load AS load;

-- name: insert_source
-- A new source ($1 key, $2 name, $3 description, $4 strategy, $5 affinity hours).
INSERT INTO sources (key, name, description, strategy, affinity_hours) VALUES ($1, $2, $3, $4, $5)
RETURNING id, key, name, description, strategy, affinity_hours;

-- name: update_source
-- Change a source; NULL keeps a field, $5 says whether to set affinity hours to $6
-- ($1 key, $2 name, $3 description, $4 strategy, $5 set affinity, $6 affinity hours).
UPDATE sources
SET name           = COALESCE($2, name),
    description    = COALESCE($3, description),
    strategy       = COALESCE($4, strategy),
    affinity_hours = CASE WHEN $5::boolean THEN $6::integer ELSE affinity_hours END
WHERE key = $1
RETURNING id, key, name, description, strategy, affinity_hours;

-- name: list_sources
-- Every source.
SELECT id, key, name, description, strategy, affinity_hours FROM sources ORDER BY id;

-- name: delete_weights
-- Remove all weights of a source ($1 source id).
DELETE FROM source_weights WHERE source_id = $1;

-- name: insert_weights
-- Weights of a source ($1 source id, $2 operator ids, $3 weights).
INSERT INTO source_weights (source_id, operator_id, weight)
SELECT $1, operator_id, weight FROM unnest($2::bigint[], $3::integer[]) AS t (operator_id, weight);

-- name: missing_operators
-- Which of the given operator ids do not exist ($1 operator ids).
SELECT id FROM unnest($1::bigint[]) AS t (id)
WHERE NOT EXISTS (SELECT 1 FROM operators o WHERE o.id = t.id)
ORDER BY id;

-- name: show_weights
-- A source's weights with operator names ($1 source id).
SELECT w.operator_id, o.name AS operator_name, w.weight
FROM source_weights w JOIN operators o ON o.id = w.operator_id
WHERE w.source_id = $1
ORDER BY w.operator_id;

-- name: list_contacts
-- Contacts filtered by source key, operator, status and unassigned; NULL means any
-- ($1 source key, $2 operator id, $3 status, $4 only unassigned, $5 limit).
SELECT c.id, l.external_id AS lead_external_id, s.key AS source, c.operator_id, c.status,
       c.created_at, c.assigned_at, c.closed_at
FROM contacts c
JOIN leads l ON l.id = c.lead_id
JOIN sources s ON s.id = c.source_id
WHERE ($1::text IS NULL OR s.key = $1)
  AND ($2::bigint IS NULL OR c.operator_id = $2)
  AND ($3::text IS NULL OR c.status = $3)
  AND (NOT $4::boolean OR c.operator_id IS NULL)
ORDER BY c.id
LIMIT $5;

-- name: migrations_lock
-- Only one process migrates at a time; held for the session.
SELECT pg_advisory_lock(1281, 0);

-- name: migrations_unlock
-- Let the next migrating process in.
SELECT pg_advisory_unlock(1281, 0);

-- name: create_migrations_table
-- Where applied migrations are recorded.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
-- Versions already applied.
SELECT version FROM schema_migrations ORDER BY version;

-- name: record_migration
-- Mark a migration applied ($1 version, $2 file name).
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);

-- name: stats_rows
-- Per source and operator (weighted now, or assigned contacts in the window): the
-- weight, contacts assigned since $2, open now, load and limit ($1 source key or NULL,
-- $2 since).
WITH pairs AS (
    SELECT source_id, operator_id FROM source_weights
    UNION
    SELECT source_id, operator_id FROM contacts
    WHERE operator_id IS NOT NULL AND assigned_at >= $2
)
SELECT s.key AS source, s.strategy, o.id AS operator_id, o.name AS operator_name,
       o.is_active, o.open_load AS load, o.max_load, COALESCE(w.weight, 0) AS weight,
       (SELECT count(*) FROM contacts c
        WHERE c.source_id = p.source_id AND c.operator_id = p.operator_id
          AND c.assigned_at >= $2) AS assigned,
       (SELECT count(*) FROM contacts c
        WHERE c.source_id = p.source_id AND c.operator_id = p.operator_id
          AND c.status = 'open') AS open_now
FROM pairs p
JOIN sources s ON s.id = p.source_id
JOIN operators o ON o.id = p.operator_id
LEFT JOIN source_weights w ON w.source_id = p.source_id AND w.operator_id = p.operator_id
WHERE $1::text IS NULL OR s.key = $1
ORDER BY s.key, o.id;

-- name: stats_sources
-- Every source (or one) with its queued contacts now ($1 source key or NULL).
SELECT s.key AS source, s.strategy,
       (SELECT count(*) FROM contacts c
        WHERE c.source_id = s.id AND c.status = 'open' AND c.operator_id IS NULL) AS queued_now
FROM sources s
WHERE $1::text IS NULL OR s.key = $1
ORDER BY s.key;

-- name: count_contacts
-- How many contacts exist, and how many are closed (demo progress).
SELECT count(*) AS total, count(*) FILTER (WHERE status = 'closed') AS closed FROM contacts;

-- name: count_pending_events
-- Events not yet confirmed by the broker.
SELECT count(*) FROM outbox WHERE published_at IS NULL;

-- name: assigned_contact_ids
-- Ids of open, assigned contacts, oldest first ($1 limit).
SELECT id FROM contacts WHERE status = 'open' AND operator_id IS NOT NULL ORDER BY id LIMIT $1;

-- name: health_counts
-- The backlog and the unpublished outbox, for the gauges (and as the readiness probe).
SELECT (SELECT count(*) FROM contacts WHERE status = 'open' AND operator_id IS NULL) AS queued,
       (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS outbox_pending;

-- name: list_leads
-- Leads, newest first, with their contact counts ($1 limit).
SELECT l.id, l.external_id, l.name, l.created_at, l.updated_at,
       count(c.id) AS contacts, count(c.id) FILTER (WHERE c.status = 'open') AS open_contacts
FROM leads l
LEFT JOIN contacts c ON c.lead_id = l.id
GROUP BY l.id
ORDER BY l.id DESC
LIMIT $1;

-- name: lead_by_external_id
-- One lead ($1 external id).
SELECT id, external_id, name, email, phone, created_at, updated_at
FROM leads WHERE external_id = $1;

-- name: lead_contacts
-- Every contact of a lead across sources, with who handled it ($1 lead id).
SELECT c.id, s.key AS source, c.operator_id, o.name AS operator_name, c.status,
       c.created_at, c.assigned_at, c.closed_at
FROM contacts c
JOIN sources s ON s.id = c.source_id
LEFT JOIN operators o ON o.id = c.operator_id
WHERE c.lead_id = $1
ORDER BY c.id;

-- name: lock_apply
-- One `leadrouter apply` at a time, until commit: two applies of one file must not both
-- create an operator, as operator names are not unique.
SELECT pg_advisory_xact_lock(1282, 0);
