-- Channels/bots that leads come from; bots publish with the slug `key`.
CREATE TABLE sources (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key         text        NOT NULL UNIQUE CHECK (key ~ '^[a-z0-9][a-z0-9._-]{0,127}$'),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    description text        NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    strategy    text        NOT NULL DEFAULT 'weighted_random'
                CHECK (strategy IN ('weighted_random', 'smooth', 'least_loaded')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
