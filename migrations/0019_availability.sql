-- Presence, shifts and leave. An operator takes work only while active, online, on
-- shift and not on leave: `ready` folds the last three into one flag, which the
-- availability triggers of the weight rows read next to is_active and the load, so that
-- routing finds the available operators through the same index at the same cost.
--   presence:        set by `operator.presence` messages and `operators presence`;
--   shift/time_zone: a weekly schedule (worker/schedule.py) in an IANA zone, NULL = always;
--   leave:           date ranges in that zone ("2026-12-24..2026-12-31", comma-separated);
--   scheduled:       on shift and not on leave, as of the last evaluation;
--   schedule_due_at: when `scheduled` may change next (the schedule task's timer).
ALTER TABLE operators
    ADD COLUMN presence text NOT NULL DEFAULT 'online'
        CHECK (presence IN ('online', 'away', 'offline')),
    ADD COLUMN shift text CHECK (length(shift) <= 2000),
    ADD COLUMN time_zone text CHECK (length(time_zone) <= 64),
    ADD COLUMN leave text CHECK (length(leave) <= 4000),
    ADD COLUMN scheduled boolean NOT NULL DEFAULT true,
    ADD COLUMN schedule_due_at timestamptz,
    ADD COLUMN ready boolean GENERATED ALWAYS AS (presence = 'online' AND scheduled) STORED;

CREATE INDEX operators_schedule_due ON operators (schedule_due_at)
    WHERE schedule_due_at IS NOT NULL;

CREATE OR REPLACE FUNCTION operator_availability_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE source_weights w
    SET available    = NEW.is_active AND NEW.ready AND NEW.open_load < NEW.max_load,
        smooth_start = CASE WHEN NEW.is_active AND NEW.ready AND NEW.open_load < NEW.max_load
                            THEN w.smooth_start + s.smooth_clock
                            ELSE w.smooth_start - s.smooth_clock END
    FROM sources s
    WHERE w.operator_id = NEW.id AND s.id = w.source_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION weight_availability() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT o.is_active AND o.ready AND o.open_load < o.max_load INTO NEW.available
    FROM operators o
    WHERE o.id = NEW.operator_id;
    SELECT CASE WHEN NEW.available THEN s.smooth_clock ELSE 0 END INTO NEW.smooth_start
    FROM sources s
    WHERE s.id = NEW.source_id;
    RETURN NEW;
END;
$$;

-- A generated column is never in an UPDATE's SET list, so the trigger names the columns
-- it is computed from.
DROP TRIGGER operators_availability ON operators;
CREATE TRIGGER operators_availability
AFTER UPDATE OF is_active, open_load, max_load, presence, scheduled ON operators
FOR EACH ROW
WHEN ((OLD.is_active AND OLD.ready AND OLD.open_load < OLD.max_load)
      IS DISTINCT FROM (NEW.is_active AND NEW.ready AND NEW.open_load < NEW.max_load))
EXECUTE FUNCTION operator_availability_changed();

-- Events about an operator (operator.presence_changed) name no contact, and a contact
-- handed back (contact.requeued) is queued and assigned again: one row per contact,
-- routing key and offer attempt holds only for the events that happen once per contact
-- or per offer. Every event row still has its own event id.
ALTER TABLE outbox ALTER COLUMN contact_id DROP NOT NULL;
DROP INDEX outbox_one_per_change;
CREATE UNIQUE INDEX outbox_one_per_change ON outbox (contact_id, routing_key, attempt)
    WHERE routing_key IN ('contact.closed', 'contact.offered', 'contact.declined',
                          'contact.expired', 'contact.overflowed', 'contact.waiting');
ALTER TABLE outbox DROP CONSTRAINT outbox_routing_key_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_routing_key_check CHECK (routing_key IN (
    'contact.assigned', 'contact.queued', 'contact.closed', 'contact.offered',
    'contact.declined', 'contact.expired', 'contact.answer_rejected',
    'contact.overflowed', 'contact.waiting', 'contact.requeued',
    'operator.presence_changed'));
