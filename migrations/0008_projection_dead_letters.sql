-- Dead letters as freshness sees them (issue 9, item 3): the sink consumes the dead-letter topic
-- and records, in the same transaction as its offsets (so exactly once), one row per dead letter
-- with the user and the projection it was withheld from. A read of that projection for that user
-- says `degraded`, with the count and the reasons, until the source record has been replayed
-- (`vitals dlq replay`, ledger `dlq_replays`) — a dead-lettered record never counts as processed.
CREATE TABLE projection_dead_letters (
    dlq_topic        TEXT        NOT NULL,
    dlq_partition    INT         NOT NULL,
    dlq_offset       BIGINT      NOT NULL,
    user_id          TEXT        NOT NULL,
    projection       TEXT        NOT NULL,
    stage            TEXT        NOT NULL,
    code             TEXT        NOT NULL,
    reason           TEXT        NOT NULL,
    source_topic     TEXT        NOT NULL,
    source_partition INT         NOT NULL,
    source_offset    BIGINT      NOT NULL,
    recorded_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
CREATE INDEX projection_dead_letters_user ON projection_dead_letters (user_id, projection);
