-- Projection tables, written only by the projection sink (sinks/). One row per projection key,
-- replaced only by a record with a newer processor version (version_epoch, version_seq), so a
-- re-emitted, replayed or zombie record never wins. A retraction keeps the row with deleted =
-- true and its version, so a late older upsert cannot resurrect it; reads skip deleted rows.
-- `body` is the processor's record as JSON (what the read API returns); the typed columns are
-- what reads filter and order on.
CREATE TABLE proj_rollup_day (
    user_id        TEXT        NOT NULL,
    entity_id      TEXT        NOT NULL,   -- metric|local_date
    metric         TEXT        NOT NULL,
    day            DATE        NOT NULL,   -- local date
    at_ms          BIGINT,
    version_epoch  BIGINT      NOT NULL,
    version_seq    BIGINT      NOT NULL,
    deleted        BOOLEAN     NOT NULL,
    body           JSONB       NOT NULL,
    source_offsets JSONB       NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, entity_id)
);
CREATE INDEX proj_rollup_day_range ON proj_rollup_day (user_id, metric, day);

CREATE TABLE proj_sleep_night (
    user_id        TEXT        NOT NULL,
    entity_id      TEXT        NOT NULL,   -- night date
    metric         TEXT,
    day            DATE        NOT NULL,   -- local date of the final wake
    at_ms          BIGINT,                 -- final wake
    version_epoch  BIGINT      NOT NULL,
    version_seq    BIGINT      NOT NULL,
    deleted        BOOLEAN     NOT NULL,
    body           JSONB       NOT NULL,
    source_offsets JSONB       NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, entity_id)
);
CREATE INDEX proj_sleep_night_range ON proj_sleep_night (user_id, day);

CREATE TABLE proj_session_impact (
    user_id        TEXT        NOT NULL,
    entity_id      TEXT        NOT NULL,   -- session id
    metric         TEXT,                   -- product id
    day            DATE,
    at_ms          BIGINT,                 -- session start
    version_epoch  BIGINT      NOT NULL,
    version_seq    BIGINT      NOT NULL,
    deleted        BOOLEAN     NOT NULL,
    body           JSONB       NOT NULL,
    source_offsets JSONB       NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, entity_id)
);
CREATE INDEX proj_session_impact_start ON proj_session_impact (user_id, at_ms);

CREATE TABLE proj_product_impact (
    user_id        TEXT        NOT NULL,
    entity_id      TEXT        NOT NULL,   -- product id
    metric         TEXT,
    day            DATE,
    at_ms          BIGINT,
    version_epoch  BIGINT      NOT NULL,
    version_seq    BIGINT      NOT NULL,
    deleted        BOOLEAN     NOT NULL,
    body           JSONB       NOT NULL,
    source_offsets JSONB       NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, entity_id)
);

-- The sink's consumed position, committed in the same transaction as the rows it covers. On
-- assignment the sink seeks here (Kafka's own committed offsets are never used).
CREATE TABLE sink_offsets (
    sink         TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition    INT         NOT NULL,
    next_offset  BIGINT      NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, topic, partition)
);

-- How far into a user's input each projection has been computed *and applied*: from the
-- processors' per-user progress markers, written in the same transaction as the rows before
-- them. Compared with ingest_user_offsets it says fresh / stale / pending.
CREATE TABLE projection_progress (
    user_id      TEXT        NOT NULL,
    projection   TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition    INT         NOT NULL,
    next_offset  BIGINT      NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, projection, topic, partition)
);

-- For chained projections (product_impact reads session_impact's output): the last offset of
-- each user's records in that output, recorded by the sink as it applies them. It plays the part
-- ingest_user_offsets plays for the lanes: product_impact is fresh for a user once its progress
-- is past every one of them.
CREATE TABLE projection_inputs (
    user_id      TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition    INT         NOT NULL,
    last_offset  BIGINT      NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, topic, partition)
);
