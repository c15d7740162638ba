-- End customers, recognised across sources by external_id.
CREATE TABLE leads (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    external_id text        NOT NULL UNIQUE CHECK (length(external_id) BETWEEN 1 AND 256),
    name        text CHECK (length(name) <= 256),
    email       text CHECK (length(email) <= 256),
    phone       text CHECK (length(phone) <= 256),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
