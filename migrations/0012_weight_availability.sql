-- Whether each weighted operator can take a contact now (active and below max_load),
-- kept on the weight row itself so that routing finds a source's available operators
-- through an index instead of joining and filtering its whole team. Kept exact by
-- triggers in the transaction that changes an operator (which holds the operator's row
-- lock), touching only that operator's weight rows: one per source they are weighted on.
ALTER TABLE source_weights ADD COLUMN available boolean NOT NULL DEFAULT false;

UPDATE source_weights w
SET available = o.is_active AND o.open_load < o.max_load
FROM operators o
WHERE o.id = w.operator_id;

CREATE FUNCTION operator_availability_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE source_weights
    SET available = NEW.is_active AND NEW.open_load < NEW.max_load
    WHERE operator_id = NEW.id;
    RETURN NULL;
END;
$$;

-- Fires only when availability flips (filling up, freed, switched on or off, a limit
-- changed across the load), not on every claim.
CREATE TRIGGER operators_availability
AFTER UPDATE OF is_active, open_load, max_load ON operators
FOR EACH ROW
WHEN ((OLD.is_active AND OLD.open_load < OLD.max_load)
      IS DISTINCT FROM (NEW.is_active AND NEW.open_load < NEW.max_load))
EXECUTE FUNCTION operator_availability_changed();

CREATE FUNCTION weight_availability() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT o.is_active AND o.open_load < o.max_load INTO NEW.available
    FROM operators o
    WHERE o.id = NEW.operator_id;
    RETURN NEW;
END;
$$;

CREATE TRIGGER source_weights_availability
BEFORE INSERT ON source_weights
FOR EACH ROW
EXECUTE FUNCTION weight_availability();
