-- The bench's reference pipeline (bench_reference.py, next to this file), not leadrouter's:
-- the minimal distribution transaction issue 6 measures leadrouter against. Loaded like
-- worker/queries.sql (worker/sql.py), as `R.<name>`.

-- name: reference_schema
-- Its tables, in the bench's throwaway database.
CREATE TABLE reference_operators (
    id        bigint PRIMARY KEY,
    source    text NOT NULL,
    open_load integer NOT NULL DEFAULT 0
);
CREATE INDEX ON reference_operators (source);
CREATE TABLE reference_contacts (
    message_id  text PRIMARY KEY,
    source      text NOT NULL,
    operator_id bigint REFERENCES reference_operators,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- name: reference_add_operators
-- Operators, each working one source ($1 ids, $2 source keys).
INSERT INTO reference_operators (id, source) SELECT * FROM unnest($1::bigint[], $2::text[]);

-- name: reference_lock_sources
-- Serialise the batch's sources until commit, in ascending order ($1 keys, sorted).
SELECT pg_advisory_xact_lock(hashtext(key)) FROM unnest($1::text[]) AS key;

-- name: reference_lock_operators
-- The operators of these sources, locked in id order ($1 keys).
SELECT id, source, open_load FROM reference_operators
WHERE source = ANY($1::text[])
ORDER BY id
FOR UPDATE;

-- name: reference_insert_contacts
-- The batch's contacts; nothing for a known message id ($1 message ids, $2 sources,
-- $3 operator ids).
INSERT INTO reference_contacts (message_id, source, operator_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id, operator_id;

-- name: reference_claim_operators
-- Count the new contacts against their operators ($1 operator ids, $2 counts).
UPDATE reference_operators o SET open_load = o.open_load + c.n
FROM unnest($1::bigint[], $2::integer[]) AS c(id, n)
WHERE o.id = c.id;
