//! The edge's durable state in PostgreSQL (tables in `migrations/0001_ingest.sql`): request
//! idempotency with leases, privacy settings and the per-user accepted offsets.

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

/// endpoint, payload hash, state, status, response, lease expired.
type StoredRequest = (String, String, String, Option<i32>, Option<Value>, bool);

/// Claims `(user, request_id)` for processing, or says why not.
pub async fn begin(pool: &PgPool, user: &str, request_id: &str, endpoint: &str, hash: &str, lease: Duration) -> Result<Begin, sqlx::Error> {
    let lease_ms = lease.as_millis() as i64;
    let inserted = sqlx::query(
        "INSERT INTO ingest_requests (user_id, request_id, endpoint, payload_hash, state, lease_until)
         VALUES ($1, $2, $3, $4, 'in_flight', now() + $5 * interval '1 millisecond')
         ON CONFLICT (user_id, request_id) DO NOTHING",
    )
    .bind(user)
    .bind(request_id)
    .bind(endpoint)
    .bind(hash)
    .bind(lease_ms)
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Begin::Proceed);
    }
    let row: Option<StoredRequest> = sqlx::query_as(
        "SELECT endpoint, payload_hash, state, status_code, response, lease_until < now()
         FROM ingest_requests WHERE user_id = $1 AND request_id = $2",
    )
    .bind(user)
    .bind(request_id)
    .fetch_optional(pool)
    .await?;
    let Some((ep, h, state, status, body, expired)) = row else {
        // Released between our insert and select: let the client retry.
        return Ok(Begin::InFlight);
    };
    if ep != endpoint || h != hash {
        return Ok(Begin::Mismatch);
    }
    if state == "done" {
        return Ok(Begin::Replay { status: status.unwrap_or(200) as u16, body: body.unwrap_or(Value::Null) });
    }
    if expired {
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
            return Ok(Begin::Proceed);
        }
    }
    Ok(Begin::InFlight)
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

/// Everything that becomes true when a request is answered, in one transaction: the stored
/// response, the user's accepted offsets and (domain changes) the new privacy settings.
pub async fn finish(
    pool: &PgPool,
    user: &str,
    request_id: &str,
    status: u16,
    body: &Value,
    landed: &[Landed],
    privacy: Option<(&PrivacySettings, i64)>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE ingest_requests SET state = 'done', status_code = $3, response = $4 WHERE user_id = $1 AND request_id = $2")
        .bind(user)
        .bind(request_id)
        .bind(status as i32)
        .bind(body)
        .execute(&mut *tx)
        .await?;
    if !landed.is_empty() {
        let topics: Vec<&str> = landed.iter().map(|l| l.topic.as_str()).collect();
        let partitions: Vec<i32> = landed.iter().map(|l| l.partition).collect();
        let offsets: Vec<i64> = landed.iter().map(|l| l.offset).collect();
        sqlx::query(
            "INSERT INTO ingest_user_offsets (user_id, topic, partition, last_offset)
             SELECT $1, t, p, max(o) FROM UNNEST($2::text[], $3::int[], $4::bigint[]) AS x(t, p, o) GROUP BY t, p
             ON CONFLICT (user_id, topic, partition) DO UPDATE
               SET last_offset = GREATEST(ingest_user_offsets.last_offset, EXCLUDED.last_offset), accepted_at = now()",
        )
        .bind(user)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .execute(&mut *tx)
        .await?;
    }
    if let Some((p, occurred_at_ms)) = privacy {
        sqlx::query(
            "INSERT INTO user_privacy (user_id, health_upload_allowed, blocked_metrics, occurred_at_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id) DO UPDATE
               SET health_upload_allowed = EXCLUDED.health_upload_allowed, blocked_metrics = EXCLUDED.blocked_metrics,
                   occurred_at_ms = EXCLUDED.occurred_at_ms, updated_at = now()
               WHERE user_privacy.occurred_at_ms <= EXCLUDED.occurred_at_ms",
        )
        .bind(user)
        .bind(p.health_upload_allowed)
        .bind(&p.blocked_metrics)
        .bind(occurred_at_ms)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// The user's privacy settings, if any were ever accepted.
pub async fn privacy(pool: &PgPool, user: &str) -> Result<Option<PrivacySettings>, sqlx::Error> {
    let row: Option<(bool, Vec<String>)> =
        sqlx::query_as("SELECT health_upload_allowed, blocked_metrics FROM user_privacy WHERE user_id = $1")
            .bind(user)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(health_upload_allowed, blocked_metrics)| PrivacySettings { health_upload_allowed, blocked_metrics }))
}
