-- The total weight of each source's available operators (what the smooth clock advances
-- by), kept without a sum over the team: `sources.available_weight` as of its last fold,
-- plus the changes appended since by a trigger whenever a weight row's part of it changes
-- (availability flips, a weight changes, a row is added or removed). Appending never
-- waits: updating the source's row instead would make a transaction that fills or frees
-- an operator shared by many sources wait for each of their routings. Routing folds the
-- changes it sees into the total under the source's lock (`routing_state`).
ALTER TABLE sources ADD COLUMN available_weight bigint NOT NULL DEFAULT 0;

CREATE TABLE available_weight_changes (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id bigint NOT NULL,
    delta     bigint NOT NULL
);
CREATE INDEX available_weight_changes_source ON available_weight_changes (source_id);

UPDATE sources s
SET available_weight = coalesce(
    (SELECT sum(w.weight) FROM source_weights w WHERE w.source_id = s.id AND w.available), 0);

CREATE FUNCTION available_weight_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint := 0;
    source bigint;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.available THEN
        delta := delta + NEW.weight;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') AND OLD.available THEN
        delta := delta - OLD.weight;
    END IF;
    IF TG_OP = 'DELETE' THEN
        source := OLD.source_id;
    ELSE
        source := NEW.source_id;
    END IF;
    IF delta <> 0 THEN
        INSERT INTO available_weight_changes (source_id, delta) VALUES (source, delta);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER source_weights_available_weight_rows
AFTER INSERT OR DELETE ON source_weights
FOR EACH ROW
EXECUTE FUNCTION available_weight_changed();

CREATE TRIGGER source_weights_available_weight_changes
AFTER UPDATE OF available, weight ON source_weights
FOR EACH ROW
WHEN (OLD.available IS DISTINCT FROM NEW.available OR OLD.weight IS DISTINCT FROM NEW.weight)
EXECUTE FUNCTION available_weight_changed();
