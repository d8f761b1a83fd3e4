//! The hostile-input suite (issue 9, items 6, 7 and 9): each input an attacker or a broken client
//! sends gets a typed 4xx with a stable `code` and the `field` at fault, and writes nothing — no
//! record in Kafka, no row in PostgreSQL, the idempotency store untouched. Slow clients cannot
//! deny service to others. Everything runs against the real edge / API over real HTTP and the real
//! PostgreSQL, Redis and broker; waits are bounded waits on conditions.

use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use futures::StreamExt;
use rdkafka::Message;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{drop_db, fresh_db, key, services_up, wait_for, ApiEnv, TestEnv, KAFKA};

const SAMPLES: &str = "/v1/health/samples:batch";
const CHANGES: &str = "/v1/domain-changes:batch";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hr(id: &str) -> Value {
    let start = (Utc::now() - chrono::Duration::minutes(5)).to_rfc3339();
    let end = (Utc::now() - chrono::Duration::minutes(4)).to_rfc3339();
    json!({"source": "watch", "source_kind": "watch", "source_record_id": id, "metric": "heart_rate",
           "start": start, "end": end, "value": 61, "unit": "bpm", "time_zone": "Europe/Berlin"})
}

fn privacy_change(id: &str, allowed: bool, occurred_at: chrono::DateTime<Utc>) -> Value {
    json!({"change_id": id, "kind": "privacy_updated", "occurred_at": occurred_at.to_rfc3339(),
           "privacy": {"health_upload_allowed": allowed, "blocked_metrics": []}})
}

/// `(code, field)` of an error body.
fn code_field(body: &Value) -> (String, Option<String>) {
    (body["error"]["code"].as_str().unwrap_or("").to_owned(), body["error"]["field"].as_str().map(str::to_owned))
}

/// Rows the edge stored for `user`: requests (idempotency), privacy, accepted offsets.
async fn rows_of(pool: &sqlx::PgPool, user: &str) -> (i64, i64, i64) {
    let count = |table: &'static str| {
        let pool = pool.clone();
        let user = user.to_owned();
        async move {
            let (n,): (i64,) =
                sqlx::query_as(&format!("SELECT count(*) FROM {table} WHERE user_id = $1")).bind(user).fetch_one(&pool).await.unwrap();
            n
        }
    };
    (count("ingest_requests").await, count("user_privacy").await, count("ingest_user_offsets").await)
}

/// Kafka records of `user` on every input topic.
async fn records_of(env: &TestEnv, user: &str) -> usize {
    let t = env.topics();
    let mut n = 0;
    for topic in [&t.hot, &t.cold, &t.change, &t.domain] {
        n += env.read(topic).await.iter().filter(|m| key(m) == user).count();
    }
    n
}

/// A metric's value from a Prometheus text page (0 when absent).
fn gauge(text: &str, name: &str) -> i64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok())).map(|v| v as i64).unwrap_or(0)
}

/// Reads an HTTP/1.1 response head (status) from a raw connection, or `None` if it closes first.
async fn read_status(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return if buf.is_empty() { None } else { parse_response(&buf) };
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let len =
                head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))).unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                return parse_response(&buf);
            }
        }
    }
}

fn parse_response(buf: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Opens a connection and sends an upload's header announcing `Content-Length: 100000`, then one
/// byte of body: the start of a slow-body attack.
async fn slow_upload(base: &str, token: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.expect("connecting to the edge");
    let head = format!(
        "POST {SAMPLES} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    s
}

mod input;
mod slow;
mod small;
