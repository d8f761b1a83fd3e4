-- Task snapshots: the newest published snapshot of each task (processor × partition), an
-- object in the S3-compatible store. Written only by the task's current owner (its epoch is the
-- one in processor_epochs) and only forward in (epoch, seq, position): an old owner cannot
-- replace a newer pointer. See docs/processors.md, "Snapshots and restore".
CREATE TABLE processor_snapshots (
    processor       TEXT        NOT NULL,
    partition       INT         NOT NULL,
    epoch           BIGINT      NOT NULL,
    seq             BIGINT      NOT NULL,
    -- Sum of the checkpoint's next offsets: grows with every checkpoint that read something.
    position        BIGINT      NOT NULL,
    object_key      TEXT        NOT NULL,
    -- Input topic -> next offset, as in the snapshot's checkpoint.
    offsets         JSONB       NOT NULL,
    stream_time_ms  BIGINT      NOT NULL,
    bytes           BIGINT      NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (processor, partition)
);

-- Every restore of a task from a snapshot, with how long it took (pointer lookup, download,
-- import; the replay from the snapshot's offsets comes after).
CREATE TABLE processor_restores (
    id              BIGSERIAL   PRIMARY KEY,
    processor       TEXT        NOT NULL,
    partition       INT         NOT NULL,
    -- The restoring owner's epoch.
    epoch           BIGINT      NOT NULL,
    snapshot_epoch  BIGINT      NOT NULL,
    snapshot_seq    BIGINT      NOT NULL,
    object_key      TEXT        NOT NULL,
    offsets         JSONB       NOT NULL,
    bytes           BIGINT      NOT NULL,
    restore_ms      BIGINT      NOT NULL,
    restored_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX processor_restores_task ON processor_restores (processor, partition, restored_at);
