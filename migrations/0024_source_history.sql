-- Contacts' history per source: a source whose decisions are not worth their cost stops
-- recording them (`leadrouter sources history KEY off`). On for every source, as before;
-- LEADROUTER_HISTORY=off still turns recording off everywhere.
ALTER TABLE sources ADD COLUMN history boolean NOT NULL DEFAULT true;
