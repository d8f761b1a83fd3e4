-- The ledger of `vitals dlq replay` (issue 9, item 10): one row per source record written back to
-- its lane, so that replaying the same dead letter again (or another dead letter of the same
-- source record: several processors read one lane, and a processor that crashed between producing
-- and checkpointing writes its dead letters twice) writes nothing more.
--
-- A row is inserted before the produce (an intent: target_offset NULL, scan_from = the end of the
-- target partition just before) and completed after the broker's acknowledgement. A run that
-- finds a row still in doubt (a crash between the two) reads the target partition from scan_from
-- for the copy's `vitals-replay-of` header: found, the row is completed; not found, it is removed
-- and the record is replayed again.
CREATE TABLE dlq_replays (
    source_topic     TEXT        NOT NULL,
    source_partition INT         NOT NULL,
    source_offset    BIGINT      NOT NULL,
    -- The dead letter it was replayed from (the first one selected, when several name the source).
    dlq_topic        TEXT        NOT NULL,
    dlq_partition    INT         NOT NULL,
    dlq_offset       BIGINT      NOT NULL,
    target_topic     TEXT        NOT NULL,
    target_partition INT         NOT NULL,
    scan_from        BIGINT      NOT NULL,
    target_offset    BIGINT,
    requested_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    replayed_at      TIMESTAMPTZ,
    PRIMARY KEY (source_topic, source_partition, source_offset)
);
CREATE INDEX dlq_replays_in_doubt ON dlq_replays (dlq_topic) WHERE target_offset IS NULL;
