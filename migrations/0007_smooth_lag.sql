-- State of the `smooth` strategy: how many contacts each operator is owed (positive) or
-- ahead (negative) relative to their exact share of the source. Updated under the
-- source's advisory lock; reset to 0 when the source's weights are replaced.
ALTER TABLE source_weights ADD COLUMN smooth_lag double precision NOT NULL DEFAULT 0;
