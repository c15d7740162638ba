-- Operators are identified by name (routing files, weights by name): one name, one
-- operator. A database that already holds two operators of one name is refused with
-- the names and ids to rename (`leadrouter operators update ID --name NEW`); nothing
-- changes until then, and `leadrouter migrate` can simply be run again.
DO $$
DECLARE
    clashes text;
BEGIN
    SELECT string_agg(format('%L (ids %s)', name, ids), ', ' ORDER BY name)
    INTO clashes
    FROM (
        SELECT name, string_agg(id::text, ', ' ORDER BY id) AS ids
        FROM operators
        GROUP BY name
        HAVING count(*) > 1
    ) AS duplicates;
    IF clashes IS NOT NULL THEN
        RAISE EXCEPTION 'operator names must be unique, and these are not: %', clashes
            USING HINT = 'rename all but one of each with `leadrouter operators update ID '
                         '--name NEW`, then run `leadrouter migrate` again';
    END IF;
END
$$;
ALTER TABLE operators ADD CONSTRAINT operators_name_key UNIQUE (name);
