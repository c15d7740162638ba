-- Replaced by sources.smooth_clock and source_weights.smooth_start (0013).
ALTER TABLE source_weights DROP COLUMN smooth_lag;
