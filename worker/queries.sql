-- All SQL of leadrouter. Each query is headed by `-- name: NAME` and a line that
-- says what it does and lists its asyncpg parameters.
--
-- Advisory locks are (namespace, id), the namespaces named in worker/locks.py
-- (LockSpace): 1280 a source's routing, 1281 migrating, 1282 `leadrouter apply`, 1283
-- expiring a source's offers, 1284 a source's timers (and id 0: changing overflow
-- settings), 1285 an operator's schedule.

-- name: source_by_key
-- A source by its slug ($1 key).
SELECT id, key, name, description, strategy, affinity_hours, accept_timeout, expire_to_away
FROM sources WHERE key = $1;

-- name: sources_by_ids
-- Sources by id, in lock order ($1 source ids).
SELECT id, key, strategy, affinity_hours, accept_timeout, queue_order, receives_overflow
FROM sources WHERE id = ANY($1::bigint[]) ORDER BY id;

-- name: claim_pending_events
-- Lock a batch of unpublished events for one relay; other relays skip them, and rows
-- their writer is still publishing itself are left to it until their lease lapses
-- ($1 limit).
SELECT id, event_id, routing_key, payload::text AS payload
FROM outbox
WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < now())
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: prune_published_events
-- Forget events published longer ago than the retention, among the $2 oldest rows (ids
-- grow with time, so this never scans the whole table); pending rows are left alone
-- ($1 retention in hours, $2 how many rows to look at).
DELETE FROM outbox
WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT $2)
  AND published_at < now() - make_interval(secs => $1::double precision * 3600);

-- name: mark_events_published
-- Record the broker's confirm for a batch of events ($1 outbox ids).
UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[]);

-- name: sources_with_backlog
-- Sources that have queued contacts and someone who could take one, for the sweep.
SELECT DISTINCT c.source_id
FROM contacts c
WHERE c.status = 'open' AND c.operator_id IS NULL
  AND EXISTS (SELECT 1 FROM source_weights w JOIN operators o ON o.id = w.operator_id
              WHERE w.source_id = c.source_id AND o.is_active AND o.ready
                AND o.open_load < o.max_load)
ORDER BY c.source_id;

-- name: sources_of_operators
-- The sources these operators are weighted for ($1 operator ids).
SELECT DISTINCT source_id FROM source_weights WHERE operator_id = ANY($1::bigint[]);

-- name: operator_source_ids
-- The sources an operator is weighted for ($1 operator id).
SELECT source_id FROM source_weights WHERE operator_id = $1 ORDER BY source_id;

-- name: insert_operator
-- A new operator ($1 name, $2 is_active, $3 max_load).
INSERT INTO operators (name, is_active, max_load) VALUES ($1, $2, $3)
RETURNING id, name, is_active, max_load, open_load AS load;

-- name: list_operators
-- Every operator with its current load, presence and schedule.
SELECT id, name, is_active, max_load, open_load AS load, presence, shift, time_zone, leave
FROM operators
ORDER BY id;

-- name: operator_by_id
-- One operator with its current load ($1 id).
SELECT id, name, is_active, max_load, open_load AS load FROM operators WHERE id = $1;

-- name: update_operator
-- Change an operator; NULL keeps a field ($1 id, $2 name, $3 max_load, $4 is_active).
UPDATE operators
SET name      = COALESCE($2, name),
    max_load  = COALESCE($3, max_load),
    is_active = COALESCE($4, is_active)
WHERE id = $1
RETURNING id, name, is_active, max_load, open_load AS load;

-- name: insert_source
-- A new source ($1 key, $2 name, $3 description, $4 strategy, $5 affinity hours,
-- $6 accept timeout in seconds, 0: offers off, $7 offers lapsed in a row that set an
-- operator away, 0: never).
INSERT INTO sources (key, name, description, strategy, affinity_hours, accept_timeout,
                     expire_to_away)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id, key, name, description, strategy, affinity_hours, accept_timeout, expire_to_away;

-- name: update_source
-- Change a source; NULL keeps a field, $5 says whether to set affinity hours to $6, $7 the
-- accept timeout in seconds (0: offers off; offers pending then still run their course). A new
-- strategy starts afresh, under the source's lock (a batch that read the old strategy while
-- waiting for that lock may still store its state once after): what the smooth strategy
-- owed operators before is forgotten, weighted_random draws everyone's wait
-- (migration 0021), least_loaded rows get their operators' load and are counted
-- ($1 key, $2 name, $3 description, $4 strategy, $5 set affinity, $6 affinity hours,
-- $7 accept timeout, $8 offers lapsed in a row that set an operator away, 0: never).
WITH old AS (
    SELECT id, strategy, pg_advisory_xact_lock(1280, id::integer) AS locked
    FROM sources
    WHERE key = $1
), updated AS (
    UPDATE sources s
    SET name           = COALESCE($2, s.name),
        description    = COALESCE($3, s.description),
        strategy       = COALESCE($4, s.strategy),
        affinity_hours = CASE WHEN $5::boolean THEN $6::integer ELSE s.affinity_hours END,
        accept_timeout = COALESCE($7::integer, s.accept_timeout),
        expire_to_away = COALESCE($8::integer, s.expire_to_away)
    FROM old
    WHERE s.id = old.id
    RETURNING s.id, s.key, s.name, s.description, s.strategy, s.affinity_hours,
              s.accept_timeout, s.expire_to_away, s.strategy <> old.strategy AS strategy_changed
), reset AS (
    UPDATE source_weights w
    SET smooth_start     = CASE WHEN w.available THEN s.smooth_clock ELSE 0 END
                           + CASE WHEN u.strategy = 'weighted_random' THEN race_draw(w.weight)
                                  ELSE 0 END,
        least_loaded     = u.strategy = 'least_loaded',
        open_load        = CASE WHEN u.strategy = 'least_loaded' THEN o.open_load END,
        last_assigned_at = CASE WHEN u.strategy = 'least_loaded' THEN o.last_assigned_at END
    FROM updated u, sources s, operators o
    WHERE w.source_id = u.id AND u.strategy_changed AND s.id = u.id AND o.id = w.operator_id
    RETURNING w.operator_id, w.least_loaded
), counted AS (
    UPDATE operators o
    SET least_loaded_sources = o.least_loaded_sources + CASE WHEN r.least_loaded THEN 1 ELSE -1 END
    FROM reset r, old
    WHERE o.id = r.operator_id AND r.least_loaded <> (old.strategy = 'least_loaded')
)
SELECT id, key, name, description, strategy, affinity_hours, accept_timeout, expire_to_away
FROM updated;

-- name: list_sources
-- Every source, with its queueing settings (the overflow target by key).
SELECT s.id, s.key, s.name, s.description, s.strategy, s.affinity_hours, s.accept_timeout,
       s.expire_to_away, s.queue_order,
       t.key AS overflow_to, s.overflow_after, s.alert_after, s.history
FROM sources s LEFT JOIN sources t ON t.id = s.overflow_to
ORDER BY s.id;

-- name: set_source_history
-- Record a source's decisions from now on, or not ($1 key, $2 on); no row: no source.
UPDATE sources SET history = $2 WHERE key = $1 RETURNING key, history;

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
-- Per source and operator (weighted now, or assigned or offered contacts in the window):
-- the weight, contacts assigned since $2 (accepted, for a source that makes offers: a
-- pending offer is no assignment yet), open now, load and limit, presence and shift,
-- whether they take work now, and the offers made since $2: how many, how they ended,
-- and the median seconds to accept ($1 source key or NULL, $2 since).
WITH pairs AS (
    SELECT source_id, operator_id FROM source_weights
    UNION
    SELECT source_id, operator_id FROM contacts
    WHERE operator_id IS NOT NULL AND assigned_at >= $2
    UNION
    SELECT source_id, operator_id FROM offers WHERE offered_at >= $2
)
SELECT s.key AS source, s.strategy, o.id AS operator_id, o.name AS operator_name,
       o.is_active, o.open_load AS load, o.max_load, COALESCE(w.weight, 0) AS weight,
       o.presence, o.shift, o.time_zone, o.scheduled, o.is_active AND o.ready AS available,
       (SELECT count(*) FROM contacts c
        WHERE c.source_id = p.source_id AND c.operator_id = p.operator_id
          AND c.assigned_at >= $2 AND c.offer_expires_at IS NULL) AS assigned,
       (SELECT count(*) FROM contacts c
        WHERE c.source_id = p.source_id AND c.operator_id = p.operator_id
          AND c.status = 'open') AS open_now,
       f.offered, f.accepted, f.declined, f.expired, f.accept_seconds
FROM pairs p
JOIN sources s ON s.id = p.source_id
JOIN operators o ON o.id = p.operator_id
LEFT JOIN source_weights w ON w.source_id = p.source_id AND w.operator_id = p.operator_id
CROSS JOIN LATERAL (
    SELECT count(*) AS offered,
           count(*) FILTER (WHERE f.outcome = 'accepted') AS accepted,
           count(*) FILTER (WHERE f.outcome = 'declined') AS declined,
           count(*) FILTER (WHERE f.outcome = 'expired') AS expired,
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM f.answered_at - f.offered_at)
           ) FILTER (WHERE f.outcome = 'accepted') AS accept_seconds
    FROM offers f
    WHERE f.source_id = p.source_id AND f.operator_id = p.operator_id AND f.offered_at >= $2
) AS f
WHERE $1::text IS NULL OR s.key = $1
ORDER BY s.key, o.id;

-- name: stats_sources
-- Every source (or one) with its accept timeout, its queued contacts now, how long the
-- oldest has waited (seconds, 0 when none), and its contacts since $2 that overflowed or
-- were alerted ($1 source key or NULL, $2 since).
SELECT s.key AS source, s.strategy, s.accept_timeout, s.queue_order,
       (SELECT count(*) FROM contacts c
        WHERE c.source_id = s.id AND c.status = 'open' AND c.operator_id IS NULL) AS queued_now,
       coalesce(extract(epoch FROM statement_timestamp() - (
           SELECT min(c.created_at) FROM contacts c
           WHERE c.source_id = s.id AND c.status = 'open' AND c.operator_id IS NULL
       )), 0)::double precision AS oldest_queued_seconds,
       (SELECT count(*) FROM contacts c JOIN outbox o ON o.contact_id = c.id
        WHERE c.source_id = s.id AND c.created_at >= $2
          AND o.routing_key = 'contact.overflowed') AS overflowed,
       (SELECT count(*) FROM contacts c JOIN outbox o ON o.contact_id = c.id
        WHERE c.source_id = s.id AND c.created_at >= $2
          AND o.routing_key = 'contact.waiting') AS waiting_alerts
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

-- name: sources_by_keys
-- The sources a batch names ($1 keys).
SELECT id, key, strategy, affinity_hours, accept_timeout, queue_order, receives_overflow
FROM sources WHERE key = ANY($1::text[]);

-- name: lock_sources_by_keys
-- The sources a batch of new contacts names, each one's routing serialised until commit
-- (one round trip instead of two). The locks are taken in ascending id order, as
-- everywhere: PostgreSQL evaluates a select list after ORDER BY unless ORDER BY
-- refers to it (SELECT reference, "ORDER BY") ($1 keys).
SELECT id, key, strategy, affinity_hours, accept_timeout, queue_order, receives_overflow,
       pg_advisory_xact_lock(1280, id::integer) AS locked
FROM sources
WHERE key = ANY($1::text[])
ORDER BY id;

-- name: lock_sources_in_order
-- Serialise the routing of these sources until commit, taking the locks in the order
-- given, which callers make ascending ($1 source ids).
SELECT pg_advisory_xact_lock(1280, id) FROM unnest($1::integer[]) AS id;

-- name: record_contacts
-- Lock the operators this batch chose, ascending, before anything else (lock order:
-- operators, then leads); create leads or refresh the fields messages carry, one row per
-- external id in ascending order so concurrent batches lock them in the same order; then
-- the new open contacts, ids in the order given, nothing for a known message id, each
-- with its operator or none (queued); the operators' capacity taken for what was
-- inserted (`claimed` is false where it would be exceeded: a concurrent transaction took
-- it since routing read it, which the caller turns into a retry of the whole
-- transaction) and the smooth strategy's state stored, only under those operators' row
-- locks as the trigger of migration 0013 writes it, in one statement (stored as decided:
-- for a contact skipped here, which takes a concurrent message with the same id, the
-- operator counts as paid) ($1 external ids, $2 names, $3 e-mails, $4 phones; per
-- contact: $5 external ids, $6 source ids, $7 operator ids or NULL, $8 message texts,
-- $9 inbound message ids; smooth starts: $10 source ids, $11 operator ids, $12 starts;
-- smooth clocks: $13 source ids, $14 clocks; per contact: $15 priorities, $16 accept
-- timeouts in seconds (0: assigned; above 0, for a source that makes offers, offered: a
-- deadline, attempt 1 and the offer's row, see worker/offers.py)).
WITH locked AS MATERIALIZED (
    SELECT o.id FROM operators o
    WHERE o.id = ANY($7::bigint[]) OR o.id = ANY($11::bigint[])
    ORDER BY o.id
    FOR UPDATE
), lead_rows AS (
    INSERT INTO leads AS l (external_id, name, email, phone)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
    WHERE (SELECT count(*) FROM locked) >= 0  -- after the operators' locks
    ON CONFLICT (external_id) DO UPDATE
    SET name       = COALESCE(EXCLUDED.name, l.name),
        email      = COALESCE(EXCLUDED.email, l.email),
        phone      = COALESCE(EXCLUDED.phone, l.phone),
        updated_at = now()
    RETURNING id, external_id
), contact_rows AS (
    INSERT INTO contacts (lead_id, source_id, operator_id, assigned_at, message,
                          inbound_message_id, priority, offer_expires_at, offer_attempt)
    SELECT lead_rows.id, t.source_id, t.operator_id,
           CASE WHEN t.operator_id IS NOT NULL THEN now() END, t.message, t.message_id,
           t.priority,
           CASE WHEN t.operator_id IS NOT NULL AND t.timeout > 0
                THEN statement_timestamp() + make_interval(secs => t.timeout::double precision)
           END,
           CASE WHEN t.operator_id IS NOT NULL AND t.timeout > 0 THEN 1 ELSE 0 END
    FROM unnest($5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::text[],
                $15::smallint[], $16::integer[])
        WITH ORDINALITY
        AS t (external_id, source_id, operator_id, message, message_id, priority, timeout, n)
    JOIN lead_rows USING (external_id)
    ORDER BY t.n
    ON CONFLICT (inbound_message_id) DO NOTHING
    RETURNING id, lead_id, source_id, operator_id, inbound_message_id, created_at, assigned_at,
              offer_attempt AS attempt, offer_expires_at
), recorded AS (
    INSERT INTO offers (contact_id, attempt, source_id, operator_id, offered_at, expires_at)
    SELECT id, attempt, source_id, operator_id, statement_timestamp(), offer_expires_at
    FROM contact_rows
    WHERE offer_expires_at IS NOT NULL
), claimed AS (
    UPDATE operators o
    SET open_load = o.open_load + t.n, last_assigned_at = now()
    FROM (SELECT operator_id, count(*)::integer FROM contact_rows
          WHERE operator_id IS NOT NULL GROUP BY operator_id) AS t (id, n)
    WHERE o.id = t.id AND o.is_active AND o.ready AND o.open_load + t.n <= o.max_load
      AND o.id IN (SELECT id FROM locked)
    RETURNING o.id
), starts AS (
    UPDATE source_weights w
    SET smooth_start = t.start
    FROM unnest($10::bigint[], $11::bigint[], $12::double precision[])
        AS t (source_id, operator_id, start)
    WHERE w.source_id = t.source_id AND w.operator_id = t.operator_id
      AND t.operator_id IN (SELECT id FROM locked)
      AND w.available  -- else the trigger keeps it (a drawn turn's operator filled meanwhile)
), clocks AS (
    UPDATE sources s
    SET smooth_clock = t.clock
    FROM unnest($13::bigint[], $14::double precision[]) AS t (id, clock)
    WHERE s.id = t.id
)
SELECT c.*, c.operator_id IS NULL OR c.operator_id IN (SELECT id FROM claimed) AS claimed
FROM contact_rows c
ORDER BY c.id;

-- name: contacts_for_close
-- Contacts to close and the sources whose routing their closes may affect ($1 ids).
SELECT c.id, c.source_id, c.operator_id,
       array(SELECT w.source_id FROM source_weights w WHERE w.operator_id = c.operator_id)
           AS operator_source_ids
FROM contacts c
WHERE c.id = ANY($1::bigint[]);

-- name: close_contacts
-- Close the open ones of these contacts, ending a pending offer ($1 contact ids).
UPDATE contacts c
SET status = 'closed', closed_at = now(), offer_expires_at = NULL, offer_source_id = NULL
FROM leads l, sources s
WHERE c.id = ANY($1::bigint[]) AND c.status = 'open' AND l.id = c.lead_id AND s.id = c.source_id
RETURNING c.id, c.operator_id, c.inbound_message_id, c.closed_at,
          l.id AS lead_id, l.external_id AS lead_external_id, s.key AS source_key;

-- name: release_operators
-- Give back capacity, in ascending operator order ($1 operator ids, $2 units each).
UPDATE operators o
SET open_load = GREATEST(o.open_load - t.n, 0)
FROM unnest($1::bigint[], $2::integer[]) AS t (id, n)
WHERE o.id = t.id;

-- name: routing_state
-- What routing these sources decides on, read under their locks in one round trip, a row
-- each, told apart by `kind`. No operator is locked here: the write locks and claims the
-- operators it chose, and the database re-checks their capacity there. First the changes
-- to the sources' total available weight are folded into `sources.available_weight`
-- (migration 0016; only the holder of a source's lock does this).
-- 'clock': per source with an available operator, the smooth clock (`start`; for
--   weighted_random the race's, migration 0021), the total weight of its available
--   operators (`weight`) and, unless read whole, the window its candidates were read in:
--   `read_limit` and, for smooth, `bound` (the clock after this batch's contacts, and one
--   more);
-- 'candidate': an available operator of a source with their weight, load and smooth
--   start; read whole ($5) or only the first `read_limit` in the strategy's order
--   (smooth and weighted_random: by start + 1 / weight, twice the source's contacts to
--   route, plus 8, for smooth only those whose start is below `bound`; least_loaded: by
--   load per weight, the source's contacts plus the whole batch's plus 8, as every
--   contact of the batch, whatever its source, may raise the load of an operator read
--   here): who can be chosen within this batch, whatever the size of the team (the
--   caller checks that it was enough);
-- 'queued': a source's oldest queued contacts, as many as its available operators could
--   take (at most $3, the clock row's `take`), each with the operators its offers skip
--   (`skip`, empty unless the source makes offers); only a source that has any sums its
--   operators' free capacity (NULL `take` otherwise);
-- 'queued': a source's first queued contacts in its order (priority, then oldest first,
--   or newest first for a `lifo` source: one priority at a time, backwards), as many as
--   its available operators could take (at most $3, the clock row's `take`); only a
--   source that has any sums its operators' free capacity (NULL `take` otherwise);
-- 'known': those of the batch's inbound message ids that already made a contact (one
--   index probe per id: the plan cached for `= ANY($2)` while the table was small, in a
--   new database, is a sequential scan, kept until the next ANALYZE)
-- ($1 source ids, $2 inbound message ids, $3 most queued contacts per source, per source
-- aligned with $1: $4 new contacts to route, $5 whether to read every candidate).
WITH folded AS (
    DELETE FROM available_weight_changes c
    WHERE c.source_id = ANY($1::bigint[])
    RETURNING c.source_id, c.delta
), totals AS (
    UPDATE sources s
    SET available_weight = s.available_weight + f.delta
    FROM (SELECT source_id, sum(delta) AS delta FROM folded GROUP BY source_id) AS f
    WHERE s.id = f.source_id
    RETURNING s.id, s.available_weight
), src AS MATERIALIZED (
    SELECT t.id, t.arriving, t.whole, s.queue_order = 'lifo' AS lifo, s.smooth_clock AS clock,
           coalesce(totals.available_weight, s.available_weight) AS weight, s.strategy
    FROM unnest($1::bigint[], $4::integer[], $5::boolean[]) AS t (id, arriving, whole)
    JOIN sources s ON s.id = t.id
    LEFT JOIN totals ON totals.id = t.id
), takes AS (
    SELECT src.id AS source_id, src.lifo,
           least($3::integer,
                 (SELECT sum(o.max_load - o.open_load)
                  FROM source_weights w JOIN operators o ON o.id = w.operator_id
                  WHERE w.source_id = src.id AND w.available))::integer AS take
    FROM src
    WHERE src.weight > 0
      AND EXISTS (SELECT 1 FROM contacts c
                  WHERE c.source_id = src.id AND c.status = 'open' AND c.operator_id IS NULL)
), queued AS MATERIALIZED (
    -- The lead's external id looked up per contact (the planner, not knowing how few
    -- `take` is, would otherwise hash the whole leads table: 8 ms at 20,000 leads).
    SELECT q.source_id, q.id, q.priority, q.offer_skip,
           (SELECT l.external_id FROM leads l WHERE l.id = q.lead_id) AS external_id
    FROM takes
    CROSS JOIN LATERAL (
        (SELECT c.id, c.source_id, c.lead_id, c.priority, c.offer_skip
         FROM contacts c
         WHERE NOT takes.lifo
           AND c.source_id = takes.source_id AND c.status = 'open' AND c.operator_id IS NULL
         ORDER BY c.priority DESC, c.id
         LIMIT takes.take)
        UNION ALL
        (SELECT n.id, n.source_id, n.lead_id, n.priority, n.offer_skip
         FROM generate_series(9, 0, -1) AS p (priority)
         CROSS JOIN LATERAL (
             SELECT c.id, c.source_id, c.lead_id, c.priority, c.offer_skip
             FROM contacts c
             WHERE c.source_id = takes.source_id AND c.priority = p.priority
               AND c.status = 'open' AND c.operator_id IS NULL
             ORDER BY c.id DESC
             LIMIT takes.take
         ) AS n
         WHERE takes.lifo
         LIMIT takes.take)
    ) AS q
), windows AS MATERIALIZED (
    SELECT src.id, src.clock, src.weight, takes.take, src.strategy,
           CASE WHEN NOT src.whole AND src.strategy = 'least_loaded'
                THEN n.k + n.batch + 8
                WHEN NOT src.whole THEN 2 * n.k + 8 END AS read_limit,
           CASE WHEN NOT src.whole AND src.strategy = 'smooth'
                THEN src.clock + (n.k + 1)::double precision / src.weight END AS bound
    FROM src
    CROSS JOIN LATERAL (
        SELECT src.arriving + (SELECT count(*) FROM queued WHERE queued.source_id = src.id)
            AS k,
               (SELECT sum(arriving) FROM src) + (SELECT count(*) FROM queued) AS batch
    ) AS n
    LEFT JOIN takes ON takes.source_id = src.id
    WHERE src.weight > 0
)
SELECT 'clock' AS kind, id AS source_id, NULL::bigint AS id, weight, NULL::integer AS open_load,
       NULL::integer AS max_load, NULL::timestamptz AS last_assigned_at, clock AS start,
       bound, read_limit, take, NULL::text AS lead_external_id, NULL::text AS message_id,
       NULL::bigint[] AS skip, NULL::smallint AS priority
FROM windows
UNION ALL
SELECT 'candidate', windows.id, c.operator_id, c.weight, c.open_load, c.max_load,
       c.last_assigned_at, c.smooth_start, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM windows
CROSS JOIN LATERAL (
    (SELECT w.operator_id, w.weight, o.open_load, o.max_load, o.last_assigned_at, w.smooth_start
     FROM source_weights w
     JOIN operators o ON o.id = w.operator_id
     WHERE windows.strategy <> 'least_loaded' AND w.source_id = windows.id AND w.available
       AND (windows.bound IS NULL OR w.smooth_start < windows.bound)
     ORDER BY w.smooth_start + 1::double precision / w.weight, w.weight DESC, w.operator_id
     LIMIT windows.read_limit)
    UNION ALL
    (SELECT w.operator_id, w.weight, o.open_load, o.max_load, o.last_assigned_at, w.smooth_start
     FROM source_weights w
     JOIN operators o ON o.id = w.operator_id
     WHERE windows.strategy = 'least_loaded' AND w.source_id = windows.id AND w.available
       AND w.least_loaded
     ORDER BY w.open_load::double precision / w.weight, w.weight DESC,
              w.last_assigned_at NULLS FIRST, w.operator_id
     LIMIT windows.read_limit)
) AS c
UNION ALL
SELECT 'queued', source_id, id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, external_id, NULL,
       offer_skip, priority
FROM queued
UNION ALL
SELECT 'known', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, c.inbound_message_id,
       NULL, NULL
FROM unnest($2::text[]) AS m (id)
CROSS JOIN LATERAL (
    SELECT inbound_message_id FROM contacts WHERE inbound_message_id = m.id LIMIT 1
) AS c;

-- name: previous_operators
-- For each contact (or contact to be: its id is below zero), the operator of its lead's
-- latest other assigned contact through the same source within the source's affinity
-- window, and, if that operator is still weighted and available for the source, what
-- routing needs to give it to them (NULL weight otherwise) ($1 contact ids, $2 lead
-- external ids, $3 source ids, $4 hours).
SELECT p.contact_id, p.source_id, p.operator_id, w.weight, w.smooth_start AS start, o.open_load,
       o.max_load, o.last_assigned_at
FROM (
    SELECT DISTINCT ON (q.id) q.id AS contact_id, q.source_id, c.operator_id
    FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::integer[])
        AS q (id, lead_external_id, source_id, hours)
    JOIN leads l ON l.external_id = q.lead_external_id
    JOIN contacts c
      ON c.lead_id = l.id AND c.source_id = q.source_id AND c.id <> q.id
     AND c.operator_id IS NOT NULL AND c.created_at >= now() - make_interval(hours => q.hours)
    ORDER BY q.id, c.created_at DESC
) AS p
LEFT JOIN source_weights w
  ON w.source_id = p.source_id AND w.operator_id = p.operator_id AND w.available
LEFT JOIN operators o ON o.id = w.operator_id;

-- name: assign_contacts
-- Take the operators' capacity (their rows locked here, ascending, with those whose smooth
-- state is stored, before the claim and that state), hand them the queued contacts, and
-- store the smooth strategy's state, in one statement; an operator whose capacity would be exceeded claims nothing and gets none ($1 contact
-- ids, $2 operator ids, $3 operator ids once each, ascending, $4 units each; smooth
-- starts: $5 source ids, $6 operator ids, $7 starts; smooth clocks: $8 source ids,
-- $9 clocks; per contact of $1: $10 the accept timeout in seconds, 0 assigns it, above 0,
-- for a source that makes offers, offers it: a deadline, the next attempt and the
-- offer's row, see worker/offers.py; $11 the source routing it, its own or, overflowed,
-- another).
WITH locked AS MATERIALIZED (
    SELECT o.id FROM operators o
    WHERE o.id = ANY($3::bigint[]) OR o.id = ANY($6::bigint[])
    ORDER BY o.id
    FOR UPDATE
), claimed AS (
    UPDATE operators o
    SET open_load = o.open_load + t.n, last_assigned_at = now()
    FROM unnest($3::bigint[], $4::integer[]) AS t (id, n)
    WHERE o.id = t.id AND o.is_active AND o.ready AND o.open_load + t.n <= o.max_load
      AND o.id IN (SELECT id FROM locked)
    RETURNING o.id
), starts AS (
    UPDATE source_weights w
    SET smooth_start = t.start
    FROM unnest($5::bigint[], $6::bigint[], $7::double precision[])
        AS t (source_id, operator_id, start)
    WHERE w.source_id = t.source_id AND w.operator_id = t.operator_id
      AND t.operator_id IN (SELECT id FROM locked)
      AND w.available  -- else the trigger keeps it (a drawn turn's operator filled meanwhile)
), clocks AS (
    UPDATE sources s
    SET smooth_clock = t.clock
    FROM unnest($8::bigint[], $9::double precision[]) AS t (id, clock)
    WHERE s.id = t.id
), given AS (
    -- Open as `closed_at IS NULL` (the same, by the contacts' CHECK), not `status = 'open'`:
    -- that would let the planner drive the join from the backlog's partial index, which it
    -- believes nearly empty when the backlog was made in this very transaction (offers taken
    -- back in bulk), and look through all contacts given for each of them: 25 s instead of
    -- 0.3 s for 10,000 contacts.
    UPDATE contacts c
    SET operator_id      = t.operator_id,
        assigned_at      = now(),
        offer_expires_at = CASE WHEN t.timeout > 0 THEN statement_timestamp()
                                + make_interval(secs => t.timeout::double precision) END,
        offer_attempt    = c.offer_attempt + (t.timeout > 0)::integer,
        offer_source_id  = CASE WHEN t.timeout > 0 AND t.source_id <> c.source_id
                                THEN t.source_id END
    FROM unnest($1::bigint[], $2::bigint[], $10::integer[], $11::bigint[])
             AS t (id, operator_id, timeout, source_id),
         leads l
    WHERE c.id = t.id AND c.closed_at IS NULL AND c.operator_id IS NULL AND l.id = c.lead_id
      AND t.operator_id IN (SELECT id FROM claimed)
    RETURNING c.id, c.lead_id, l.external_id AS lead_external_id, c.inbound_message_id,
              c.created_at, c.assigned_at, c.source_id, c.operator_id,
              c.offer_attempt AS attempt, c.offer_expires_at,
              coalesce(c.offer_source_id, c.source_id) AS offered_by
), recorded AS (
    INSERT INTO offers (contact_id, attempt, source_id, operator_id, offered_at, expires_at)
    SELECT id, attempt, offered_by, operator_id, statement_timestamp(), offer_expires_at
    FROM given
    WHERE offer_expires_at IS NOT NULL
)
SELECT * FROM given;

-- name: insert_events
-- Events of a batch. A writer that publishes them itself after commit leases them for
-- $5 seconds from now (not from the transaction's start, which lock waits may have made
-- long ago); NULL leaves them to the relays at once. An event id written before (a
-- rejected answer's, derived from its message id, when the message comes again) is
-- written once, and so is its decision. With history on, each contact event's decision
-- goes to contact_decisions in the same statement, all of a transaction's at this
-- statement's time, but for sources with history off (empty $7: history off everywhere,
-- LEADROUTER_HISTORY) ($1 event ids, $2 contact ids, $3 routing keys, $4 JSON payloads,
-- $5 lease seconds, $6 offer attempts: 0 for a contact never offered, $7 JSON decisions
-- or NULL).
WITH written AS (
    INSERT INTO outbox (event_id, contact_id, routing_key, payload, lease_until, attempt)
    SELECT t.event_id, t.contact_id, t.routing_key, t.payload::json,
           statement_timestamp() + make_interval(secs => $5::double precision), t.attempt
    FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $6::integer[])
        AS t (event_id, contact_id, routing_key, payload, attempt)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING id, event_id
), decided AS (
    INSERT INTO contact_decisions (contact_id, kind, at, detail)
    SELECT t.contact_id, substr(t.routing_key, 9), statement_timestamp(), t.detail::json
    FROM unnest($1::uuid[], $2::bigint[], $3::text[], $7::text[])
        WITH ORDINALITY AS t (event_id, contact_id, routing_key, detail, n)
    WHERE t.detail IS NOT NULL AND t.event_id IN (SELECT event_id FROM written)
      AND t.detail::json ->> 'source' NOT IN (SELECT key FROM sources WHERE NOT history)
    ORDER BY t.n
)
SELECT id, event_id FROM written;

-- name: insert_decisions
-- The decisions of events written by COPY (offers expired in bulk), but for sources with
-- history off ($1 contact ids, $2 routing keys, $3 JSON decisions or NULL).
INSERT INTO contact_decisions (contact_id, kind, at, detail)
SELECT t.contact_id, substr(t.routing_key, 9), statement_timestamp(), t.detail::json
FROM unnest($1::bigint[], $2::text[], $3::text[])
    WITH ORDINALITY AS t (contact_id, routing_key, detail, n)
WHERE t.detail IS NOT NULL
  AND t.detail::json ->> 'source' NOT IN (SELECT key FROM sources WHERE NOT history)
ORDER BY t.n;

-- name: contact_history
-- A contact's decisions in order, with the names the ids in them stand for; no row when
-- there is no such contact, and one with NULL id when it has no decision ($1 contact id).
SELECT c.id AS contact_id, s.key AS source, c.status, d.id, d.kind, d.at, d.detail::text
FROM contacts c
JOIN sources s ON s.id = c.source_id
LEFT JOIN contact_decisions d ON d.contact_id = c.id
WHERE c.id = $1
ORDER BY d.id;

-- name: offer_outcomes
-- How each offer of a contact ended, to tell why its skip list skips someone
-- ($1 contact id).
SELECT attempt, operator_id, outcome, reason
FROM offers WHERE contact_id = $1 ORDER BY attempt;

-- name: prune_decisions
-- Forget decisions older than the retention, among the $2 oldest rows (ids grow with
-- time, so this never scans the whole table) ($1 retention in hours, $2 how many rows
-- to look at).
DELETE FROM contact_decisions
WHERE id IN (SELECT id FROM contact_decisions ORDER BY id LIMIT $2)
  AND at < now() - make_interval(secs => $1::double precision * 3600);

-- name: notify_outbox
-- Wake the workers' relays at commit: events were written for them to claim.
SELECT pg_notify('leadrouter_outbox', '');

-- Offers (worker/offers.py): a source with an accept timeout offers each contact it
-- routes; the operator accepts or declines on leads.inbound, and the workers keep the
-- deadlines (the offers migration describes the columns).

-- name: answer_state
-- What answers to offers are judged on, per answer: its contact's state, whether the
-- offer's deadline has passed, and how the latest offer of that contact to the answering
-- operator ended, if there was one ($1 contact ids, $2 answering operator ids).
SELECT t.contact_id AS id, t.operator_id AS answering, c.status, c.operator_id,
       c.lead_id, l.external_id AS lead_external_id, s.key AS source_key,
       c.inbound_message_id, statement_timestamp() AS at,
       c.offer_expires_at IS NOT NULL AS offered,
       coalesce(c.offer_expires_at <= statement_timestamp(), false) AS lapsed,
       (SELECT o.outcome FROM offers o
        WHERE o.contact_id = t.contact_id AND o.operator_id = t.operator_id
        ORDER BY o.attempt DESC LIMIT 1) AS last_outcome
FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS t (contact_id, operator_id, n)
JOIN contacts c ON c.id = t.contact_id
JOIN leads l ON l.id = c.lead_id
JOIN sources s ON s.id = c.source_id
ORDER BY t.n;

-- name: accept_offers
-- The operators take the contacts offered to them: no deadline any more, assigned from
-- now, and their offers' rows say so ($1 contact ids).
WITH accepted AS (
    UPDATE contacts c
    SET offer_expires_at = NULL, offer_source_id = NULL, assigned_at = statement_timestamp()
    FROM leads l, sources s
    WHERE c.id = ANY($1::bigint[]) AND c.offer_expires_at IS NOT NULL
      AND l.id = c.lead_id AND s.id = c.source_id
    RETURNING c.id, c.lead_id, l.external_id AS lead_external_id, s.key AS source_key,
              c.source_id, c.operator_id, c.inbound_message_id, c.created_at, c.assigned_at,
              c.offer_attempt AS attempt
), answered AS (
    UPDATE offers o
    SET outcome = 'accepted', answered_at = statement_timestamp()
    FROM accepted a
    WHERE o.contact_id = a.id AND o.attempt = a.attempt
)
SELECT * FROM accepted ORDER BY id;

-- name: withdraw_offers
-- Take pending offers back from their operators (declined, or lapsed): each contact
-- queues again with its operator added to its skip list, which starts over (without
-- that operator, unless nobody else is weighted) once it holds everyone weighted on the
-- source that made the offer (`offered_by`: the contact's own, or the one it overflowed
-- to); the offers' rows say how they ended. Queued again, a contact behind its source's
-- timers' watermarks moves them back, so that it is alerted or overflows like the
-- others (once: those events and rows are unique per contact). The caller gives back
-- the capacity ($1 contact ids, $2 outcome: declined or expired, $3 reasons or NULL, per
-- contact).
WITH taken AS (
    SELECT c.id, c.operator_id, c.offer_attempt, t.reason,
           coalesce(c.offer_source_id, c.source_id) AS offered_by
    FROM unnest($1::bigint[], $3::text[]) AS t (id, reason)
    JOIN contacts c ON c.id = t.id
    WHERE c.offer_expires_at IS NOT NULL  -- under the sources' locks: no row lock needed
), withdrawn AS (
    UPDATE contacts c
    SET operator_id = NULL, assigned_at = NULL, offer_expires_at = NULL,
        offer_source_id = NULL,
        offer_skip = CASE
            WHEN EXISTS (SELECT 1 FROM source_weights w
                         WHERE w.source_id = t.offered_by
                           AND w.operator_id <> ALL (c.offer_skip || t.operator_id))
                THEN c.offer_skip || t.operator_id
            WHEN EXISTS (SELECT 1 FROM source_weights w
                         WHERE w.source_id = t.offered_by AND w.operator_id <> t.operator_id)
                THEN ARRAY[t.operator_id]
            ELSE ARRAY[]::bigint[] END
    FROM taken t, leads l, sources s
    WHERE c.id = t.id AND l.id = c.lead_id AND s.id = c.source_id
    RETURNING c.id, t.operator_id, t.offer_attempt AS attempt, t.reason, c.lead_id,
              l.external_id AS lead_external_id, s.key AS source_key, c.source_id,
              t.offered_by, c.inbound_message_id, c.created_at, statement_timestamp() AS at
), rewound AS (
    UPDATE sources s
    SET alerted_through    = least(s.alerted_through, w.first - 1),
        overflowed_through = least(s.overflowed_through, w.first - 1)
    FROM (SELECT source_id, min(id) AS first FROM withdrawn GROUP BY source_id) AS w
    WHERE s.id = w.source_id
      AND (s.alerted_through >= w.first OR s.overflowed_through >= w.first)
), answered AS (
    UPDATE offers o
    SET outcome = $2, answered_at = statement_timestamp(), reason = w.reason
    FROM withdrawn w
    WHERE o.contact_id = w.id AND o.attempt = w.attempt
)
SELECT * FROM withdrawn ORDER BY id;

-- name: give_back_shares
-- A declined or lapsed offer does not use up the operator's smooth share: their smooth
-- start moves back by what it advanced, under their row lock (the caller released them
-- first). Only for smooth sources: a weighted_random turn drawn is a draw like any
-- other, owed nothing (migration 0021) ($1 source ids, $2 operator ids, $3 offers each).
UPDATE source_weights w
SET smooth_start = w.smooth_start - t.n::double precision / w.weight
FROM unnest($1::bigint[], $2::bigint[], $3::integer[]) AS t (source_id, operator_id, n),
     sources s
WHERE w.source_id = t.source_id AND w.operator_id = t.operator_id
  AND s.id = t.source_id AND s.strategy = 'smooth';

-- name: offer_deadlines
-- For the workers' deadline keeper: the sources with offers past their deadline, and
-- how many seconds until the soonest one still ahead (NULL: none).
SELECT array(SELECT DISTINCT source_id FROM contacts
             WHERE offer_expires_at <= statement_timestamp()) AS due,
       extract(epoch FROM (SELECT min(offer_expires_at) FROM contacts
                           WHERE offer_expires_at > statement_timestamp())
                          - statement_timestamp())::double precision AS next_in;

-- name: try_lock_offer_deadlines
-- One worker at a time expires a source's offers, until commit; the others skip it.
-- Returns the sources this transaction got, in the order given ($1 source ids, ascending).
SELECT id FROM unnest($1::integer[]) WITH ORDINALITY AS t (id, n)
WHERE pg_try_advisory_xact_lock(1283, t.id)
ORDER BY t.n;

-- name: due_offers
-- These sources' offers past their deadline, under their locks ($1 source ids, $2 limit).
SELECT id, source_id FROM contacts
WHERE offer_expires_at <= statement_timestamp() AND source_id = ANY($1::bigint[])
ORDER BY id
LIMIT $2;

-- name: overflowed_queued
-- Queued contacts of other sources that may go to these sources' operators (they
-- overflowed to them), per source in its order (priority, then oldest or, $2, newest
-- first), as many as its available operators could take (at most $3), with their own
-- source's key and the operators its offers skip ($1 source ids, $2 newest first,
-- aligned with $1, $3 most per source).
SELECT t.source_id, c.id, c.priority, c.home_key, c.offer_skip AS skip,
       l.external_id AS lead_external_id, k.take
FROM unnest($1::bigint[], $2::boolean[]) AS t (source_id, lifo)
CROSS JOIN LATERAL (
    SELECT least($3::integer,
                 (SELECT sum(o.max_load - o.open_load)
                  FROM source_weights w JOIN operators o ON o.id = w.operator_id
                  WHERE w.source_id = t.source_id AND w.available))::integer AS take
) AS k
CROSS JOIN LATERAL (
    SELECT c.id, c.priority, c.lead_id, c.offer_skip, s.key AS home_key
    FROM contact_overflows f
    JOIN contacts c ON c.id = f.contact_id
    JOIN sources s ON s.id = c.source_id
    WHERE f.source_id = t.source_id AND c.status = 'open' AND c.operator_id IS NULL
    ORDER BY f.priority DESC, CASE WHEN t.lifo THEN -f.contact_id ELSE f.contact_id END
    LIMIT k.take
) AS c
JOIN leads l ON l.id = c.lead_id;

-- name: source_queueing
-- A source's queueing settings and what every source overflows to, for the cycle check
-- ($1 source id).
SELECT s.id, s.key, s.queue_order, s.overflow_to, s.overflow_after, s.alert_after
FROM sources s WHERE s.id = $1;

-- name: overflow_targets
-- Every source that overflows, and where to.
SELECT id, key, overflow_to FROM sources WHERE overflow_to IS NOT NULL;

-- name: lock_overflow_settings
-- One change of overflow settings at a time, until commit, so that two changes cannot
-- make a cycle together.
SELECT pg_advisory_xact_lock(1284, 0);

-- name: store_queueing
-- Store a source's queueing settings; when its overflow changed, forget where its
-- contacts had overflowed to (they follow the new setting from the start; each emits
-- contact.overflowed once all the same); then mark which sources receive overflow
-- ($1 source id, $2 queue order, $3 overflow target id, $4 overflow seconds, $5 alert
-- seconds, $6 whether the overflow changed).
WITH updated AS (
    UPDATE sources
    SET queue_order = $2, overflow_to = $3, overflow_after = $4, alert_after = $5,
        overflowed_through = CASE WHEN $6::boolean THEN 0 ELSE overflowed_through END
    WHERE id = $1
    RETURNING id
), forgotten AS (
    DELETE FROM contact_overflows f
    USING contacts c
    WHERE $6::boolean AND c.id = f.contact_id AND c.source_id = $1
)
SELECT id FROM updated;

-- name: mark_receiving_sources
-- Which sources some source overflows to (routing reads overflowed contacts only there).
UPDATE sources s
SET receives_overflow = r.receives
FROM (SELECT t.id, EXISTS (SELECT 1 FROM sources o WHERE o.overflow_to = t.id) AS receives
      FROM sources t) AS r
WHERE s.id = r.id AND s.receives_overflow IS DISTINCT FROM r.receives;

-- name: timer_sources
-- The sources with a timer: waiting alerts, overflow, or overflowed contacts to forget.
SELECT id, receives_overflow FROM sources
WHERE alert_after IS NOT NULL OR overflow_to IS NOT NULL OR receives_overflow
ORDER BY id;

-- name: try_lock_source_timers
-- This worker keeps the source's timers now, until commit; another one already does
-- when false ($1 source id).
SELECT pg_try_advisory_xact_lock(1284, $1::integer) AS mine;

-- name: source_timers
-- A source's timer settings and watermarks, read under its routing lock ($1 source id).
SELECT s.id, s.key, s.alert_after, s.overflow_after, s.alerted_through, s.overflowed_through,
       s.receives_overflow, t.id AS target_id, t.key AS target_key
FROM sources s
LEFT JOIN sources t ON t.id = s.overflow_to
WHERE s.id = $1;

-- name: queued_after
-- A source's queued contacts after contact id $2, in id order (one index range per
-- priority), at most $3, with how long each has waited ($1 source id, $2 contact id,
-- $3 limit).
SELECT c.id, c.lead_id, c.inbound_message_id, c.priority, c.created_at,
       l.external_id AS lead_external_id,
       extract(epoch FROM statement_timestamp() - c.created_at)::double precision AS waited
FROM generate_series(0, 9) AS p (priority)
CROSS JOIN LATERAL (
    SELECT c.id, c.lead_id, c.inbound_message_id, c.priority, c.created_at
    FROM contacts c
    WHERE c.source_id = $1 AND c.priority = p.priority
      AND c.status = 'open' AND c.operator_id IS NULL AND c.id > $2
    ORDER BY c.id
    LIMIT $3
) AS c
JOIN leads l ON l.id = c.lead_id
ORDER BY c.id
LIMIT $3;

-- name: advance_timers
-- Record how far the source's alerts and overflow got ($1 source id, $2 alerted through,
-- $3 overflowed through).
UPDATE sources SET alerted_through = $2, overflowed_through = $3 WHERE id = $1;

-- name: overflow_contacts
-- Let these contacts also go to the target's operators ($1 contact ids, $2 priorities,
-- $3 target source id).
INSERT INTO contact_overflows (contact_id, source_id, priority)
SELECT t.id, $3, t.priority FROM unnest($1::bigint[], $2::smallint[]) AS t (id, priority)
ON CONFLICT DO NOTHING;

-- name: forward_overflows
-- Overflow chains: contacts that overflowed to this source and have waited its own
-- overflow time since, still queued, may also go to its target (never back to their own
-- source) ($1 source id, $2 seconds, $3 target source id). Returns the contacts passed on.
WITH due AS (
    UPDATE contact_overflows f
    SET forwarded = true
    FROM contacts c
    WHERE f.source_id = $1 AND NOT f.forwarded
      AND f.overflowed_at <= statement_timestamp() - make_interval(secs => $2::double precision)
      AND c.id = f.contact_id AND c.status = 'open' AND c.operator_id IS NULL
    RETURNING f.contact_id, f.priority, c.source_id AS home
)
INSERT INTO contact_overflows (contact_id, source_id, priority)
SELECT contact_id, $3, priority FROM due WHERE home <> $3
ON CONFLICT DO NOTHING
RETURNING contact_id;

-- name: forget_overflows
-- Overflow rows of closed contacts ($1 source the rows point to). An offered or assigned
-- one keeps its row: a declined or lapsed offer, or a hand-back, queues it again, still
-- overflowed (routing reads only queued ones).
DELETE FROM contact_overflows f
USING contacts c
WHERE f.source_id = $1 AND c.id = f.contact_id AND c.status <> 'open';

-- name: insert_timer_events
-- The timers' events; one per contact and kind, ever: a second is dropped, and so is its
-- decision; none for sources with history off ($1 event ids, $2 contact ids, $3 routing
-- keys, $4 JSON payloads, $5 JSON decisions or NULL; empty: history off).
WITH written AS (
    INSERT INTO outbox (event_id, contact_id, routing_key, payload)
    SELECT t.event_id, t.contact_id, t.routing_key, t.payload::json
    FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[])
        AS t (event_id, contact_id, routing_key, payload)
    ON CONFLICT (contact_id, routing_key, attempt)
        WHERE routing_key IN ('contact.overflowed', 'contact.waiting')
    DO NOTHING
    RETURNING event_id
)
INSERT INTO contact_decisions (contact_id, kind, at, detail)
SELECT t.contact_id, substr(t.routing_key, 9), statement_timestamp(), t.detail::json
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $5::text[])
    WITH ORDINALITY AS t (event_id, contact_id, routing_key, detail, n)
WHERE t.detail IS NOT NULL AND t.event_id IN (SELECT event_id FROM written)
  AND t.detail::json ->> 'source' NOT IN (SELECT key FROM sources WHERE NOT history)
ORDER BY t.n;

-- name: oldest_queued
-- Per source, how long its oldest queued contact has waited, in seconds (0: none), one
-- index probe per priority.
SELECT s.key,
       coalesce(extract(epoch FROM statement_timestamp() - o.oldest), 0)::double precision
           AS seconds
FROM sources s
CROSS JOIN LATERAL (
    SELECT min(c.created_at) AS oldest
    FROM generate_series(0, 9) AS p (priority)
    CROSS JOIN LATERAL (
        SELECT c.created_at FROM contacts c
        WHERE c.source_id = s.id AND c.priority = p.priority
          AND c.status = 'open' AND c.operator_id IS NULL
        ORDER BY c.id
        LIMIT 1
    ) AS c
) AS o
ORDER BY s.key;

-- name: overflow_backlog
-- Sources receiving overflow with an overflowed contact still queued and an available
-- operator, for the timers' safety net.
SELECT DISTINCT f.source_id
FROM contact_overflows f
JOIN contacts c ON c.id = f.contact_id
WHERE c.status = 'open' AND c.operator_id IS NULL
  AND EXISTS (SELECT 1 FROM source_weights w WHERE w.source_id = f.source_id AND w.available)
ORDER BY f.source_id;

-- name: queueing_shown
-- A source's queueing settings as the CLI shows them ($1 source id).
SELECT s.queue_order, t.key AS overflow_to, s.overflow_after, s.alert_after
FROM sources s LEFT JOIN sources t ON t.id = s.overflow_to
WHERE s.id = $1;

-- name: operator_scope
-- The sources an operator's availability matters to: those they are weighted for, and
-- those of their open contacts (what a requeue hands back); NULL if there is no such
-- operator ($1 operator id).
SELECT array(SELECT source_id FROM source_weights WHERE operator_id = o.id
              UNION
              SELECT source_id FROM contacts WHERE operator_id = o.id AND status = 'open')
           AS source_ids
FROM operators o
WHERE o.id = $1;

-- name: lock_operator_availability
-- An operator's presence and schedule, locked until commit ($1 operator id).
SELECT id, name, is_active, presence, scheduled, ready, shift, time_zone, leave,
       schedule_due_at
FROM operators
WHERE id = $1
FOR UPDATE;

-- name: set_operator_availability
-- Store an operator's presence and schedule, and when the schedule changes next
-- ($1 operator id, $2 presence, $3 shift, $4 time zone, $5 leave, $6 scheduled,
-- $7 next change).
UPDATE operators
SET presence = $2, shift = $3, time_zone = $4, leave = $5, scheduled = $6,
    schedule_due_at = $7,
    presence_changed_at = CASE WHEN presence = $2 THEN presence_changed_at ELSE now() END
WHERE id = $1
RETURNING is_active AND ready AS available;

-- name: requeue_open_contacts
-- Hand an operator's open contacts of these sources back to the queue, in their old
-- place (the backlog is ordered by id), and give back the capacity; the operator's row
-- must be locked ($1 operator id, $2 source ids).
WITH handed AS (
    UPDATE contacts c
    SET operator_id = NULL, assigned_at = NULL, offer_skip = ARRAY[]::bigint[]  -- as if new
    FROM leads l, sources s
    WHERE c.operator_id = $1 AND c.status = 'open' AND c.source_id = ANY($2::bigint[])
      AND c.offer_expires_at IS NULL
      AND l.id = c.lead_id AND s.id = c.source_id
    RETURNING c.id, c.lead_id, c.source_id, c.inbound_message_id,
              l.external_id AS lead_external_id, s.key AS source_key
), rewound AS (  -- as withdraw_offers: handed back, they are alerted and overflow too
    UPDATE sources s
    SET alerted_through    = least(s.alerted_through, w.first - 1),
        overflowed_through = least(s.overflowed_through, w.first - 1)
    FROM (SELECT source_id, min(id) AS first FROM handed GROUP BY source_id) AS w
    WHERE s.id = w.source_id
      AND (s.alerted_through >= w.first OR s.overflowed_through >= w.first)
), released AS (
    UPDATE operators o
    SET open_load = GREATEST(o.open_load - (SELECT count(*) FROM handed)::integer, 0)
    WHERE o.id = $1 AND EXISTS (SELECT 1 FROM handed)
)
SELECT handed.*, statement_timestamp() AS requeued_at FROM handed ORDER BY id;

-- name: due_schedules
-- Operators whose schedule may have changed by now, earliest first ($1 limit).
SELECT id FROM operators
WHERE schedule_due_at <= clock_timestamp()
ORDER BY schedule_due_at
LIMIT $1;

-- name: try_lock_schedule
-- One worker evaluates an operator's schedule at a time; the others skip it (until
-- commit) ($1 operator id).
SELECT pg_try_advisory_xact_lock(1285, $1::integer);

-- name: next_schedule_due
-- The earliest time any operator's schedule may change, NULL if none will.
SELECT min(schedule_due_at) FROM operators;

-- name: notify_schedule
-- Wake the workers' schedule tasks at commit: a shift or leave was set.
SELECT pg_notify('leadrouter_schedule', '');

-- name: pending_offers_of
-- An operator's pending offers of these sources ($1 operator id, $2 source ids).
SELECT id FROM contacts
WHERE operator_id = $1 AND status = 'open' AND offer_expires_at IS NOT NULL
  AND source_id = ANY($2::bigint[])
ORDER BY id;

-- name: expired_in_a_row
-- Of these operators, the online ones whose latest offers of source $2 since their
-- presence last changed, as many as its `expire_to_away`, all lapsed unanswered
-- ($1 operator ids, $2 source id).
SELECT o.id
FROM operators o
JOIN sources s ON s.id = $2 AND s.expire_to_away > 0
WHERE o.id = ANY($1::bigint[]) AND o.presence = 'online'
  AND (SELECT count(*) FILTER (WHERE f.outcome = 'expired')
       FROM (SELECT outcome FROM offers
             WHERE operator_id = o.id AND source_id = s.id
               AND offered_at >= o.presence_changed_at AND outcome IS NOT NULL
             ORDER BY offered_at DESC
             LIMIT s.expire_to_away) AS f) = s.expire_to_away
ORDER BY o.id;

-- name: available_operators_per_source
-- Per source, how many of its weighted operators are available to take work now
-- (active, online, on shift, not on leave), whatever their load.
SELECT s.key AS source, count(o.id) FILTER (WHERE o.is_active AND o.ready) AS available
FROM sources s
LEFT JOIN source_weights w ON w.source_id = s.id
LEFT JOIN operators o ON o.id = w.operator_id
GROUP BY s.key
ORDER BY s.key;

-- name: lock_still_queued
-- Lock those of these contacts that are still queued, ascending, and return them: a
-- routing that takes one of them meanwhile (its overflow target's) waits for the timers'
-- commit, or the timers leave it out ($1 contact ids).
SELECT id FROM contacts
WHERE id = ANY($1::bigint[]) AND status = 'open' AND operator_id IS NULL
ORDER BY id
FOR UPDATE;

-- name: simulation_contacts
-- What `simulate` replays: the contacts created in the period [$1, $2), those created
-- before it and still open at its start, and those created since $3 (the longest
-- affinity window before the period), with whether each overflowed and how many of its
-- offers lapsed; times in microseconds since the epoch, in the order of
-- worker.simulator.Record's fields ($1 period start, $2 period end, $3 affinity look-back
-- start).
SELECT c.id, c.source_id, l.external_id AS lead, c.priority,
       (extract(epoch FROM c.created_at) * 1000000)::bigint AS created,
       (extract(epoch FROM c.assigned_at) * 1000000)::bigint AS assigned,
       (extract(epoch FROM c.closed_at) * 1000000)::bigint AS closed, c.operator_id,
       EXISTS (SELECT 1 FROM contact_overflows f WHERE f.contact_id = c.id) AS overflowed,
       (SELECT count(*) FROM offers f
        WHERE f.contact_id = c.id AND f.outcome = 'expired')::integer AS expired
FROM contacts c
JOIN leads l ON l.id = c.lead_id
WHERE c.created_at < $2
  AND (c.created_at >= $3 OR c.closed_at IS NULL OR c.closed_at > $1)
ORDER BY c.id;

-- name: simulation_weights
-- Every weight, for `simulate`'s picture of the routing as it is.
SELECT source_id, operator_id, weight FROM source_weights ORDER BY source_id, operator_id;

-- name: seed_simulation_contacts
-- The simulate bench's recorded traffic (worker/tools/simulate_bench.py), in a scratch
-- database: contacts spread evenly over the seconds before now, round robin over the
-- sources, each with one of the leads made here and an operator weighted on its source;
-- one in ten was given its operator up to five minutes after it came; those of the last
-- half hour are still open, the others closed 1 to 31 minutes after being given one ($1
-- contacts, $2 seconds, $3 source ids, $4 leads).
WITH leads_made AS (
    INSERT INTO leads (external_id)
    SELECT 'sim:' || i FROM generate_series(1, $4::integer) AS i
    RETURNING id, external_id
), traffic AS (
    SELECT i, ($3::bigint[])[1 + i % cardinality($3::bigint[])] AS source_id,
           now() - make_interval(secs => $2::double precision)
               + make_interval(secs => i * $2::double precision / $1::integer) AS created,
           CASE WHEN i % 10 = 0 THEN random() * 300 ELSE 0 END AS waited,
           60 + random() * 1800 AS handled
    FROM generate_series(1, $1::integer) AS i
), traffic_open AS (
    SELECT *, created > now() - interval '30 minutes' AS open FROM traffic
)
INSERT INTO contacts (lead_id, source_id, operator_id, status, inbound_message_id,
                      created_at, assigned_at, closed_at)
SELECT l.id, t.source_id,
       (SELECT w.operator_id FROM source_weights w WHERE w.source_id = t.source_id
        ORDER BY w.operator_id OFFSET (t.i / 7) % 10 LIMIT 1),
       CASE WHEN t.open THEN 'open' ELSE 'closed' END, 'sim-' || t.i, t.created,
       t.created + make_interval(secs => t.waited),
       CASE WHEN NOT t.open THEN t.created + make_interval(secs => t.waited + t.handled) END
FROM traffic_open t
JOIN leads_made l ON l.external_id = 'sim:' || (1 + t.i % $4::integer);
