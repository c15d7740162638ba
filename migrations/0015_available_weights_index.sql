-- A source's available operators in the smooth strategy's order: earliest virtual finish
-- (start + 1 / weight, in double precision as routing computes it) first, ties to the
-- larger weight, then the lower id. Routing reads the first few of them from this index.
CREATE INDEX source_weights_available
    ON source_weights (source_id, (smooth_start + 1::double precision / weight), weight DESC, operator_id)
    INCLUDE (smooth_start)
    WHERE available;
