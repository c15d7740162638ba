-- The worker publishes the events it commits itself, right after commit, without a claim
-- round trip; until lease_until the relays leave those rows alone. A row whose lease
-- lapses unpublished (its worker died, the broker was away) is claimed like any other.
-- Rows written without a lease (admin actions) are claimed at once.
ALTER TABLE outbox ADD COLUMN lease_until timestamptz;
