-- What a sink has read of interval attempts whose progress markers it has not read yet (issue 10:
-- one acknowledgement wait per processor interval). A marker is believed only if the sink read
-- every row it vouches for (`vitals_schemas::vouch`); rows and their marker usually commit in one
-- batch and leave nothing here, but when a batch boundary or a restart falls between them, the
-- count read so far is committed with the sink's offsets, in the same transaction.
CREATE TABLE sink_vouches (
    sink      TEXT   NOT NULL,
    topic     TEXT   NOT NULL,
    partition INT    NOT NULL,
    user_id   TEXT   NOT NULL,
    interval  TEXT   NOT NULL,
    rows      BIGINT NOT NULL,
    PRIMARY KEY (sink, topic, partition, user_id, interval)
);
