-- A source's available operators in the smooth strategy's order: earliest virtual finish
-- (start + 1 / weight) first, ties to the larger weight, then the lower id. Routing reads
-- the first few of them, and the total of their weights, from this index alone.
CREATE INDEX source_weights_available
    ON source_weights (source_id, (smooth_start + 1.0 / weight), weight DESC, operator_id)
    INCLUDE (smooth_start)
    WHERE available;
