-- The backlog tool's own SQL (python -m worker.tools.backlog), for its throwaway database.

-- name: fill_backlog
-- $1 queued contacts of source $2, priorities 0-9 at random (seeded), each with a lead of
-- its own, created one millisecond apart in the past ($1 how many, $2 source id).
WITH leads_made AS (
    INSERT INTO leads (external_id)
    SELECT 'backlog:' || n FROM generate_series(1, $1::integer) AS n
    RETURNING id, external_id
)
INSERT INTO contacts (lead_id, source_id, message, inbound_message_id, priority, created_at)
SELECT l.id, $2::bigint, '', 'backlog-' || l.external_id,
       (abs(hashtext(l.external_id)) % 10)::smallint,
       now() - make_interval(secs => ($1::integer - substr(l.external_id, 9)::integer) / 1000.0)
FROM leads_made l
ORDER BY substr(l.external_id, 9)::integer;

-- name: give_one_place
-- Room for one more contact for the operator ($1 operator id).
UPDATE operators SET max_load = open_load + 1 WHERE id = $1;

-- name: drained_now
-- In the drain's own transaction: the lowest priority it assigned, and the highest still
-- queued with how many are ($1 source id).
SELECT (SELECT min(priority) FROM contacts
        WHERE source_id = $1 AND assigned_at = now()) AS lowest_assigned,
       (SELECT count(*) FROM contacts
        WHERE source_id = $1 AND assigned_at = now()) AS assigned,
       max(priority) AS highest_left, count(*) AS left
FROM contacts WHERE source_id = $1 AND status = 'open' AND operator_id IS NULL;

-- name: set_max_load
-- ($1 operator id, $2 max load).
UPDATE operators SET max_load = $2 WHERE id = $1;
