-- Issue 11, item 4: the raw archive of the input lanes in the S3-compatible store
-- (`vitals archive`, src/archive.rs).

-- One data key per user. Archived records are sealed with their user's key and name only its
-- random key_id, never the user: deleting a user's row here makes every archived record of
-- theirs unreadable (crypto-shredding) without rewriting an object. Records without a key
-- (no user) are sealed with the key of user_id ''.
CREATE TABLE archive_keys (
    user_id    TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL UNIQUE,
    key        BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Per input partition: the archive holds offsets [start_offset, next_offset) less the
-- recorded gaps. Advanced only by compare-and-set on next_offset, in the transaction that
-- records the segment, so a second archiver of the same partition cannot write a second copy.
CREATE TABLE archive_positions (
    topic        TEXT NOT NULL,
    partition    INT NOT NULL,
    start_offset BIGINT NOT NULL,
    next_offset  BIGINT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- One object per segment: records first_offset..next_offset of one partition, of one UTC day
-- of their timestamps.
CREATE TABLE archive_segments (
    topic        TEXT NOT NULL,
    partition    INT NOT NULL,
    first_offset BIGINT NOT NULL,
    next_offset  BIGINT NOT NULL,
    records      INT NOT NULL,
    bytes        BIGINT NOT NULL,
    day          DATE NOT NULL,
    object_key   TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, first_offset)
);

-- Offsets the lane no longer held when the archiver reached them (deleted by retention before
-- they were archived). A read across one is refused, never silently short.
CREATE TABLE archive_gaps (
    topic       TEXT NOT NULL,
    partition   INT NOT NULL,
    from_offset BIGINT NOT NULL,
    to_offset   BIGINT NOT NULL,
    found_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, from_offset)
);
