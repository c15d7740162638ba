-- Returning-lead affinity: a lead that wrote to the same source within this many hours
-- goes back to the operator who had it, if available. NULL: off.
ALTER TABLE sources ADD COLUMN affinity_hours integer CHECK (affinity_hours > 0);
CREATE INDEX contacts_lead_source_recent ON contacts (lead_id, source_id, created_at DESC)
    WHERE operator_id IS NOT NULL;
