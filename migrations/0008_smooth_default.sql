-- New sources route by smooth weighted round robin unless told otherwise.
ALTER TABLE sources ALTER COLUMN strategy SET DEFAULT 'smooth';
