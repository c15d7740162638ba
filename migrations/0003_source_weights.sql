-- An operator's share of one source's traffic.
CREATE TABLE source_weights (
    source_id   bigint  NOT NULL REFERENCES sources (id) ON DELETE CASCADE,
    operator_id bigint  NOT NULL REFERENCES operators (id) ON DELETE CASCADE,
    weight      integer NOT NULL CHECK (weight > 0),
    PRIMARY KEY (source_id, operator_id)
);
CREATE INDEX source_weights_operator ON source_weights (operator_id);
