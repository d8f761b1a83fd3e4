-- Processor ownership epochs: bumped every time a task takes a partition, so versions
-- (epoch, seq) written by a newer owner always beat a previous (possibly zombie) owner's.
CREATE TABLE processor_epochs (
    processor   TEXT        NOT NULL,
    partition   INT         NOT NULL,
    epoch       BIGINT      NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (processor, partition)
);
