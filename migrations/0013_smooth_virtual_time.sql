-- The smooth strategy as virtual time, so that a contact changes the state of the one
-- operator who takes it instead of every operator of the source. Per source, the clock V
-- advances by 1 / (total weight of its available operators) per contact; per weight row,
-- `smooth_start` S is where that operator's next contact starts in the same units. What
-- an operator is owed is weight * (V - S), which is what `smooth_lag` held. While an
-- operator is unavailable its row holds S - V instead (what it is owed, frozen), turned
-- back into S when it becomes available again: it is owed only for the contacts routed
-- while it was available, as before.
ALTER TABLE sources ADD COLUMN smooth_clock double precision NOT NULL DEFAULT 0;
ALTER TABLE source_weights ADD COLUMN smooth_start double precision NOT NULL DEFAULT 0;

-- Every clock starts at 0, so S = V - lag / weight = -lag / weight, available or not.
UPDATE source_weights SET smooth_start = -smooth_lag / weight WHERE smooth_lag <> 0;

CREATE OR REPLACE FUNCTION operator_availability_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE source_weights w
    SET available    = NEW.is_active AND NEW.open_load < NEW.max_load,
        smooth_start = CASE WHEN NEW.is_active AND NEW.open_load < NEW.max_load
                            THEN w.smooth_start + s.smooth_clock
                            ELSE w.smooth_start - s.smooth_clock END
    FROM sources s
    WHERE w.operator_id = NEW.id AND s.id = w.source_id;
    RETURN NULL;
END;
$$;

-- A new weight starts owed nothing: S = V when available, S - V = 0 when not.
CREATE OR REPLACE FUNCTION weight_availability() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT o.is_active AND o.open_load < o.max_load INTO NEW.available
    FROM operators o
    WHERE o.id = NEW.operator_id;
    SELECT CASE WHEN NEW.available THEN s.smooth_clock ELSE 0 END INTO NEW.smooth_start
    FROM sources s
    WHERE s.id = NEW.source_id;
    RETURN NEW;
END;
$$;
