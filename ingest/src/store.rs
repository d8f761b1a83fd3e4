//! The edge's durable state in PostgreSQL (tables in `migrations/0001_ingest.sql`): request
//! idempotency with leases, privacy settings and the per-user accepted offsets. Two round
//! trips per request: [`claim`] before anything is produced, [`finish`] after the acks.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use vitals_schemas::PrivacySettings;

/// What to do with a request, given its id and payload hash.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// First time (or a crashed attempt's lease expired): process it.
    Proceed,
    /// Already answered: send this again.
    Replay { status: u16, body: Value },
    /// Another attempt with this id is being processed right now.
    InFlight,
    /// The id was used for a different payload or endpoint.
    Mismatch,
}

/// What [`claim`] learnt in its one round trip: what to do with the request, and the user's
/// privacy settings (if any were ever accepted).
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub begin: Begin,
    pub privacy: Option<PrivacySettings>,
}

/// inserted; the stored request's endpoint, payload hash, state, status, response, lease
/// expired; the privacy settings' upload flag and blocked metrics.
type ClaimRow =
    (bool, Option<String>, Option<String>, Option<String>, Option<i32>, Option<Value>, Option<bool>, Option<bool>, Option<Vec<String>>);

/// Claims `(user, request_id)` for processing, or says why not, and reads the user's privacy
/// settings — one statement, one round trip. The stored row is read from the statement's
/// snapshot: a row another attempt committed after it began reads as absent, i.e. in flight
/// (the client retries), exactly as when that attempt released it between two statements.
pub async fn claim(pool: &PgPool, user: &str, request_id: &str, endpoint: &str, hash: &str, lease: Duration) -> Result<Claim, sqlx::Error> {
    let lease_ms = lease.as_millis() as i64;
    let (inserted, ep, h, state, status, body, expired, allowed, blocked): ClaimRow = sqlx::query_as(
        "WITH ins AS (
           INSERT INTO ingest_requests (user_id, request_id, endpoint, payload_hash, state, lease_until)
           VALUES ($1, $2, $3, $4, 'in_flight', now() + $5 * interval '1 millisecond')
           ON CONFLICT (user_id, request_id) DO NOTHING
           RETURNING 1
         )
         SELECT EXISTS (SELECT 1 FROM ins), r.endpoint, r.payload_hash, r.state, r.status_code, r.response,
                r.lease_until < now(), p.health_upload_allowed, p.blocked_metrics
         FROM (VALUES (1)) AS one (x)
         LEFT JOIN ingest_requests r ON r.user_id = $1 AND r.request_id = $2
         LEFT JOIN user_privacy p ON p.user_id = $1",
    )
    .bind(user)
    .bind(request_id)
    .bind(endpoint)
    .bind(hash)
    .bind(lease_ms)
    .fetch_one(pool)
    .await?;
    let privacy =
        allowed.map(|health_upload_allowed| PrivacySettings { health_upload_allowed, blocked_metrics: blocked.unwrap_or_default() });
    // The stored row's columns are NOT NULL: all present (a row) or all absent (none).
    let stored = ep.zip(h).zip(state).map(|((ep, h), state)| (ep, h, state));
    let begin = match (inserted, stored) {
        (true, _) => Begin::Proceed,
        // Released between the other attempt's claim and ours: let the client retry.
        (false, None) => Begin::InFlight,
        (false, Some((ep, h, _))) if ep != endpoint || h != hash => Begin::Mismatch,
        (false, Some((_, _, state))) if state == "done" => {
            Begin::Replay { status: status.unwrap_or(200) as u16, body: body.unwrap_or(Value::Null) }
        }
        (false, Some(_)) if expired == Some(true) => {
            let taken = sqlx::query(
                "UPDATE ingest_requests SET lease_until = now() + $3 * interval '1 millisecond'
                 WHERE user_id = $1 AND request_id = $2 AND state = 'in_flight' AND lease_until < now()",
            )
            .bind(user)
            .bind(request_id)
            .bind(lease_ms)
            .execute(pool)
            .await?;
            if taken.rows_affected() == 1 {
                Begin::Proceed
            } else {
                Begin::InFlight
            }
        }
        (false, Some(_)) => Begin::InFlight,
    };
    Ok(Claim { begin, privacy })
}

/// Forgets an attempt that produced no final answer (e.g. 503), so that a retry can proceed.
pub async fn release(pool: &PgPool, user: &str, request_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM ingest_requests WHERE user_id = $1 AND request_id = $2 AND state = 'in_flight'")
        .bind(user)
        .bind(request_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Where one accepted record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Everything that becomes true when a request is answered, in one statement (so one
/// transaction and one round trip): the stored response, the user's accepted offsets and
/// (domain changes) the new privacy settings. Every data-modifying `WITH` part runs to
/// completion whether or not the final `SELECT` reads it.
pub async fn finish(
    pool: &PgPool,
    user: &str,
    request_id: &str,
    status: u16,
    body: &Value,
    landed: &[Landed],
    privacy: Option<(&PrivacySettings, i64)>,
) -> Result<(), sqlx::Error> {
    let topics: Vec<&str> = landed.iter().map(|l| l.topic.as_str()).collect();
    let partitions: Vec<i32> = landed.iter().map(|l| l.partition).collect();
    let offsets: Vec<i64> = landed.iter().map(|l| l.offset).collect();
    let no_blocked = Vec::new();
    let (allowed, blocked, occurred_at_ms) = match privacy {
        Some((p, t)) => (p.health_upload_allowed, &p.blocked_metrics, t),
        None => (false, &no_blocked, 0),
    };
    sqlx::query(
        "WITH done AS (
           UPDATE ingest_requests SET state = 'done', status_code = $3, response = $4
           WHERE user_id = $1 AND request_id = $2
           RETURNING 1
         ), offsets AS (
           INSERT INTO ingest_user_offsets (user_id, topic, partition, last_offset)
           SELECT $1, t, p, max(o) FROM UNNEST($5::text[], $6::int[], $7::bigint[]) AS x(t, p, o) GROUP BY t, p
           ON CONFLICT (user_id, topic, partition) DO UPDATE
             SET last_offset = GREATEST(ingest_user_offsets.last_offset, EXCLUDED.last_offset), accepted_at = now()
           RETURNING 1
         ), privacy AS (
           INSERT INTO user_privacy (user_id, health_upload_allowed, blocked_metrics, occurred_at_ms)
           SELECT $1, $9::boolean, $10::text[], $11::bigint WHERE $8::boolean
           ON CONFLICT (user_id) DO UPDATE
             SET health_upload_allowed = EXCLUDED.health_upload_allowed, blocked_metrics = EXCLUDED.blocked_metrics,
                 occurred_at_ms = EXCLUDED.occurred_at_ms, updated_at = now()
             WHERE user_privacy.occurred_at_ms <= EXCLUDED.occurred_at_ms
           RETURNING 1
         )
         SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM offsets), (SELECT count(*) FROM privacy)",
    )
    .bind(user)
    .bind(request_id)
    .bind(status as i32)
    .bind(body)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(privacy.is_some())
    .bind(allowed)
    .bind(blocked)
    .bind(occurred_at_ms)
    .execute(pool)
    .await?;
    Ok(())
}
