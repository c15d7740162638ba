-- weighted_random and least_loaded read a bounded window of candidates through an index,
-- as smooth does (migration 0015), instead of every available operator of their source.
--
-- weighted_random is a race of exponential clocks: each weight row holds when its
-- operator's next turn falls (`smooth_start + 1 / weight`, the order of the existing
-- index), drawn as an exponential wait of rate `weight` past the source's clock. The
-- earliest turn among the available operators wins, which happens with probability
-- weight / (total available weight), independently of every earlier contact (the waits
-- are memoryless); the clock moves to that turn and the winner draws their next one. While
-- an operator is unavailable the trigger of migration 0013 keeps their row as start -
-- clock, what was left of their wait, which is again exponential: nothing to redraw.
--
-- least_loaded orders by open load per unit of weight, then the larger weight, then who
-- waited longest, then id. The load and the last assignment are the operator's, so each
-- least_loaded weight row keeps a copy of them for its index, written by a trigger in the
-- statement that changes the operator. Only operators weighted on some least_loaded
-- source (`operators.least_loaded_sources`) pay for it: for everyone else the trigger's
-- condition is false and nothing runs.

-- Where a weighted_random operator's next turn lies past the clock, as the start the index
-- orders by (turn = start + 1 / weight): an exponential wait of rate `weight`.
CREATE FUNCTION race_draw(weight integer) RETURNS double precision
LANGUAGE sql VOLATILE AS $$
    SELECT -ln(1 - random()) / weight - 1::double precision / weight
$$;

ALTER TABLE operators ADD COLUMN least_loaded_sources integer NOT NULL DEFAULT 0;
ALTER TABLE source_weights
    ADD COLUMN least_loaded boolean NOT NULL DEFAULT false,
    ADD COLUMN open_load integer,
    ADD COLUMN last_assigned_at timestamptz;

UPDATE source_weights w
SET least_loaded     = true,
    open_load        = o.open_load,
    last_assigned_at = o.last_assigned_at
FROM sources s, operators o
WHERE s.id = w.source_id AND s.strategy = 'least_loaded' AND o.id = w.operator_id;

UPDATE operators o
SET least_loaded_sources = t.n
FROM (SELECT operator_id, count(*)::integer FROM source_weights WHERE least_loaded
      GROUP BY operator_id) AS t (id, n)
WHERE o.id = t.id;

UPDATE source_weights w
SET smooth_start = CASE WHEN w.available THEN s.smooth_clock ELSE 0 END + race_draw(w.weight)
FROM sources s
WHERE s.id = w.source_id AND s.strategy = 'weighted_random';

-- A source's available least_loaded operators in the strategy's order.
CREATE INDEX source_weights_least_loaded
    ON source_weights (source_id, (open_load::double precision / weight), weight DESC,
                       last_assigned_at NULLS FIRST, operator_id)
    WHERE available AND least_loaded;

-- A new weight row: available or not, owed nothing (smooth), a fresh wait
-- (weighted_random), the operator's load (least_loaded).
CREATE OR REPLACE FUNCTION weight_availability() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT o.is_active AND o.ready AND o.open_load < o.max_load, o.open_load, o.last_assigned_at
    INTO NEW.available, NEW.open_load, NEW.last_assigned_at
    FROM operators o
    WHERE o.id = NEW.operator_id;
    SELECT CASE WHEN NEW.available THEN s.smooth_clock ELSE 0 END
           + CASE WHEN s.strategy = 'weighted_random' THEN race_draw(NEW.weight) ELSE 0 END,
           s.strategy = 'least_loaded'
    INTO NEW.smooth_start, NEW.least_loaded
    FROM sources s
    WHERE s.id = NEW.source_id;
    IF NOT NEW.least_loaded THEN
        NEW.open_load := NULL;
        NEW.last_assigned_at := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION least_loaded_weight_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE operators SET least_loaded_sources = least_loaded_sources + 1
        WHERE id = NEW.operator_id;
    ELSE
        UPDATE operators SET least_loaded_sources = least_loaded_sources - 1
        WHERE id = OLD.operator_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER source_weights_least_loaded_added
AFTER INSERT ON source_weights
FOR EACH ROW WHEN (NEW.least_loaded)
EXECUTE FUNCTION least_loaded_weight_counted();

CREATE TRIGGER source_weights_least_loaded_removed
AFTER DELETE ON source_weights
FOR EACH ROW WHEN (OLD.least_loaded)
EXECUTE FUNCTION least_loaded_weight_counted();

CREATE FUNCTION least_loaded_load_copied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE source_weights
    SET open_load = NEW.open_load, last_assigned_at = NEW.last_assigned_at
    WHERE operator_id = NEW.id AND least_loaded;
    RETURN NULL;
END;
$$;

CREATE TRIGGER operators_least_loaded
AFTER UPDATE OF open_load, last_assigned_at ON operators
FOR EACH ROW
WHEN (NEW.least_loaded_sources > 0
      AND (OLD.open_load, OLD.last_assigned_at) IS DISTINCT FROM (NEW.open_load, NEW.last_assigned_at))
EXECUTE FUNCTION least_loaded_load_copied();
