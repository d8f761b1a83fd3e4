-- Ingest edge state: request idempotency, privacy settings (from the domain-changes lane) and,
-- per user, how far into each input partition the edge has accepted data (for freshness).

-- One row per (user, request id). `in_flight` rows are leased: a crashed edge's lease expires and
-- a retry may take the request over. Final responses are stored and replayed verbatim.
CREATE TABLE ingest_requests (
    user_id       TEXT        NOT NULL,
    request_id    TEXT        NOT NULL,
    endpoint      TEXT        NOT NULL,
    payload_hash  TEXT        NOT NULL,
    state         TEXT        NOT NULL CHECK (state IN ('in_flight', 'done')),
    status_code   INT,
    response      JSONB,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, request_id)
);
CREATE INDEX ingest_requests_created_at ON ingest_requests (created_at);

-- The user's privacy settings as last accepted on the domain-changes lane. No row = no consent
-- yet (unless the edge is configured not to require consent).
CREATE TABLE user_privacy (
    user_id                TEXT        PRIMARY KEY,
    health_upload_allowed  BOOLEAN     NOT NULL,
    blocked_metrics        TEXT[]      NOT NULL DEFAULT '{}',
    occurred_at_ms         BIGINT      NOT NULL,
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Highest offset the edge has had acknowledged for each user in each input partition. Projections
-- carry the offsets they have consumed; comparing the two says fresh / stale / pending.
CREATE TABLE ingest_user_offsets (
    user_id      TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition    INT         NOT NULL,
    last_offset  BIGINT      NOT NULL,
    accepted_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, topic, partition)
);
