//! Sends a plan to the edge: one HS256 token per user, users in parallel up to `concurrency`, each
//! user's requests strictly in order, an optional global request rate, and retries that reuse the
//! request id and body (503 → after `Retry-After`, 409 → after a short wait, transport errors →
//! with backoff), all bounded.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use serde_json::Value;

use super::{plan_user, user_id, SimConfig, SimReport, Upload, SAMPLES_PATH};

const MAX_UNAVAILABLE_RETRIES: u32 = 10;
const MAX_CONFLICT_RETRIES: u32 = 20;
const MAX_TRANSPORT_RETRIES: u32 = 5;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
const TOKEN_TTL_SECS: u64 = 6 * 3600;

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    items: AtomicU64,
    accepted: AtomicU64,
    accepted_samples: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
    bytes: AtomicU64,
}

/// Spaces requests evenly at `rate` per second over all users.
struct RateLimiter {
    interval: Duration,
    next: Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    fn new(rate: f64) -> RateLimiter {
        RateLimiter { interval: Duration::from_secs_f64(1.0 / rate), next: Mutex::new(tokio::time::Instant::now()) }
    }

    async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// Uploads [`plan_user`] of every user (see the module docs); fails on the first request that
/// fails for good, with the edge's answer in the error.
pub async fn run(cfg: &SimConfig, http: &reqwest::Client) -> anyhow::Result<SimReport> {
    let started = Instant::now();
    let stats = Stats::default();
    let limiter = cfg.rate.filter(|r| r.is_finite() && *r > 0.0).map(RateLimiter::new);
    let base = cfg.base_url.trim_end_matches('/').to_owned();
    futures::stream::iter(0..cfg.users)
        .map(Ok::<usize, anyhow::Error>)
        .try_for_each_concurrent(cfg.concurrency.max(1), |i| {
            let (stats, limiter, base) = (&stats, limiter.as_ref(), base.as_str());
            async move {
                let owned = cfg.clone();
                let uploads = tokio::task::spawn_blocking(move || plan_user(&owned, i)).await.context("planning a simulated user")?;
                let user = user_id(cfg, i);
                let token = vitals_auth::mint_hs256(&cfg.jwt_secret, &cfg.jwt_issuer, &cfg.jwt_audience, &user, TOKEN_TTL_SECS);
                for up in &uploads {
                    send(http, base, &token, up, stats, limiter).await?;
                }
                tracing::debug!(user, requests = uploads.len(), "simulated user uploaded");
                Ok(())
            }
        })
        .await?;
    let elapsed = started.elapsed();
    let accepted_samples = stats.accepted_samples.load(Relaxed);
    Ok(SimReport {
        requests: stats.requests.load(Relaxed),
        items_sent: stats.items.load(Relaxed),
        accepted: stats.accepted.load(Relaxed),
        rejected: stats.rejected.load(Relaxed),
        retries: stats.retries.load(Relaxed),
        elapsed,
        samples_per_sec: if elapsed.as_secs_f64() > 0.0 { accepted_samples as f64 / elapsed.as_secs_f64() } else { 0.0 },
        bytes_sent: stats.bytes.load(Relaxed),
    })
}

/// `Retry-After` in seconds (an HTTP date is not used by the edge; it falls back to 1 s).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
        .min(MAX_RETRY_AFTER)
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    up: &Upload,
    stats: &Stats,
    limiter: Option<&RateLimiter>,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&up.body)?;
    stats.items.fetch_add(up.items().len() as u64, Relaxed);
    let url = format!("{base}{}", up.endpoint);
    let what = || format!("POST {} for {} (request {})", up.endpoint, up.user, up.request_id());
    let (mut unavailable, mut conflicts, mut transport) = (0u32, 0u32, 0u32);
    loop {
        if let Some(l) = limiter {
            l.acquire().await;
        }
        stats.requests.fetch_add(1, Relaxed);
        stats.bytes.fetch_add(body.len() as u64, Relaxed);
        let sent =
            http.post(&url).bearer_auth(token).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone()).send().await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                transport += 1;
                if transport > MAX_TRANSPORT_RETRIES {
                    return Err(anyhow!(e).context(format!("{}: no answer after {MAX_TRANSPORT_RETRIES} retries", what())));
                }
                stats.retries.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, request = what(), "transport error; retrying");
                tokio::time::sleep(Duration::from_millis(200 << transport.min(6))).await;
                continue;
            }
        };
        let status = resp.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let wait = retry_after(resp.headers());
            let text = resp.text().await.unwrap_or_default();
            unavailable += 1;
            if unavailable > MAX_UNAVAILABLE_RETRIES {
                bail!("{}: still 503 after {MAX_UNAVAILABLE_RETRIES} retries: {text}", what());
            }
            stats.retries.fetch_add(1, Relaxed);
            tracing::debug!(request = what(), wait_ms = wait.as_millis() as u64, "503; retrying after Retry-After");
            tokio::time::sleep(wait).await;
            continue;
        }
        if status == StatusCode::CONFLICT {
            let text = resp.text().await.unwrap_or_default();
            conflicts += 1;
            if conflicts > MAX_CONFLICT_RETRIES {
                bail!("{}: still 409 after {MAX_CONFLICT_RETRIES} retries: {text}", what());
            }
            stats.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis((250 * u64::from(conflicts)).min(2000))).await;
            continue;
        }
        let text = resp.text().await.with_context(|| format!("{}: reading the answer", what()))?;
        if !(status.is_success() || status == StatusCode::UNPROCESSABLE_ENTITY) {
            bail!("{}: {status}: {text}", what());
        }
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let rejected = answer.get("rejected").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        if status == StatusCode::UNPROCESSABLE_ENTITY && rejected.is_empty() {
            // Not a per-item answer: the request itself was refused.
            bail!("{}: {status}: {text}", what());
        }
        let accepted = answer.get("accepted").and_then(Value::as_u64).unwrap_or(0);
        stats.accepted.fetch_add(accepted, Relaxed);
        if up.endpoint == SAMPLES_PATH {
            stats.accepted_samples.fetch_add(accepted, Relaxed);
        }
        if !rejected.is_empty() {
            stats.rejected.fetch_add(rejected.len() as u64, Relaxed);
            let first = serde_json::to_string(&rejected[..rejected.len().min(5)]).unwrap_or_default();
            tracing::warn!(request = what(), %status, rejected = rejected.len(), first = %first, "the edge rejected simulated items (a simulator bug)");
        }
        return Ok(());
    }
}
