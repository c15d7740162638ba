-- Foreign keys off the two tables every routing transaction writes most, as offers and
-- history (contact_decisions) already have none: leads, sources, operators and contacts are
-- never deleted, and the code only writes ids it has just read or written. Each key
-- checked a row per write: an event's check of its contact also locked that contact's
-- row (a page write), and a contact updated twice in one transaction (an offer taken
-- back and made again, as a bulk expiry does) had all three of its keys checked again.
-- Together they were about a fifth of the database's time in expiring 10,000 offers.
ALTER TABLE outbox DROP CONSTRAINT outbox_contact_id_fkey;
ALTER TABLE contacts
    DROP CONSTRAINT contacts_lead_id_fkey,
    DROP CONSTRAINT contacts_source_id_fkey,
    DROP CONSTRAINT contacts_operator_id_fkey;

-- Room on each page for an offer's one update (pending -> how it ended), so that it stays
-- on its page and no index is written again (a HOT update).
ALTER TABLE offers SET (fillfactor = 80);
