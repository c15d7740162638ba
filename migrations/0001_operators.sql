-- People who handle contacts. open_load is the number of their open contacts,
-- maintained in the same transaction as every assignment and close, so that a
-- conditional UPDATE can claim capacity atomically across sources.
CREATE TABLE operators (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text        NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    is_active        boolean     NOT NULL DEFAULT true,
    max_load         integer     NOT NULL DEFAULT 10 CHECK (max_load >= 0),
    open_load        integer     NOT NULL DEFAULT 0 CHECK (open_load >= 0),
    last_assigned_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
