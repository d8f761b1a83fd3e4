-- Progress per processor owner (issue 8, item 4). A user's position in projection_progress is
-- (epoch, next_offset) and moves only forward in that order (sinks/src/progress.rs): a new owner
-- that replays from an older checkpoint (a newer epoch, a lower offset) replaces the previous
-- owner's position, so its rows, computed from less input, are not served as fresh; a zombie (an
-- older epoch) changes nothing. Positions stored before this have epoch 0: the next record of any
-- owner is newer.
ALTER TABLE projection_progress ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
