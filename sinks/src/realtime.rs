//! Realtime envelopes: after each commit the sink announces the rows that changed (newest
//! versions only: the database said so) on the user's Redis channel `vitals:user:<id>`, where any
//! WebSocket gateway instance holding a connection of that user picks them up.
//!
//! Redis is never in the pipeline's way: envelopes go through a bounded queue to a publisher
//! task; when Redis is down or slow the queue fills and envelopes are dropped (counted), never
//! waited for. Clients recover by re-reading the API (ETag makes that cheap).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;
use vitals_schemas::RealtimeEnvelope;

use crate::postgres::Applied;

/// The Redis channel of a user.
pub fn channel(user_id: &str) -> String {
    format!("vitals:user:{user_id}")
}

/// The envelope announcing an applied row.
pub fn envelope(a: &Applied) -> RealtimeEnvelope {
    RealtimeEnvelope {
        v: 1,
        user_id: a.user_id.clone(),
        event_type: format!("{}.{}", a.projection.name(), if a.deleted { "deleted" } else { "upserted" }),
        entity_id: a.entity_id.clone(),
        version_epoch: a.version.0,
        version_seq: a.version.1,
        payload: if a.deleted { "null".into() } else { a.body.to_string() },
        traceparent: a.trace.clone(),
    }
}

#[derive(Debug, Default)]
pub struct PublisherMetrics {
    pub published: AtomicU64,
    pub dropped: AtomicU64,
    pub errors: AtomicU64,
}

impl PublisherMetrics {
    /// The publisher's counters (on the sink's `/metrics`): what an operator reads while Redis is
    /// down (envelopes dropped, never delivered late) and after.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, v) in [
            ("published_total", "Realtime envelopes published to Redis.", &self.published),
            ("dropped_total", "Realtime envelopes dropped (Redis down or slow, queue full): clients re-read instead.", &self.dropped),
            ("publish_errors_total", "Failed Redis connections or PUBLISH commands.", &self.errors),
        ] {
            let _ = writeln!(
                out,
                "# HELP vitals_realtime_envelopes_{name} {help}\n# TYPE vitals_realtime_envelopes_{name} counter\nvitals_realtime_envelopes_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// The sink's side of realtime: cheap, non-blocking [`Publisher::announce`].
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<(String, String)>,
    pub metrics: Arc<PublisherMetrics>,
}

impl Publisher {
    /// Starts the publisher task on the current tokio runtime.
    pub fn spawn(client: redis::Client, queue: usize) -> Result<Publisher, redis::RedisError> {
        let (tx, mut rx) = mpsc::channel::<(String, String)>(queue);
        let metrics = Arc::new(PublisherMetrics::default());
        let m = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut conn: Option<redis::aio::MultiplexedConnection> = None;
            let mut backoff = Duration::from_millis(100);
            while let Some((channel, payload)) = rx.recv().await {
                if conn.is_none() {
                    match tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection()).await {
                        Ok(Ok(c)) => {
                            conn = Some(c);
                            backoff = Duration::from_millis(100);
                        }
                        _ => {
                            m.errors.fetch_add(1, Ordering::Relaxed);
                            m.dropped.fetch_add(1, Ordering::Relaxed);
                            // Down: drop what queued meanwhile rather than deliver it late.
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            while rx.try_recv().is_ok() {
                                m.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let sent: Result<Result<i64, redis::RedisError>, _> =
                    tokio::time::timeout(Duration::from_secs(2), redis::cmd("PUBLISH").arg(&channel).arg(&payload).query_async(c)).await;
                match sent {
                    Ok(Ok(_)) => {
                        m.published.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        if let Ok(Err(e)) = other {
                            warn!(error = %e, "realtime publish failed; reconnecting");
                        }
                        m.errors.fetch_add(1, Ordering::Relaxed);
                        m.dropped.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
        });
        Ok(Publisher { tx, metrics })
    }

    /// Queues envelopes for the rows a commit changed; drops (and counts) what does not fit.
    pub fn announce(&self, applied: &[Applied]) {
        for a in applied {
            let env = envelope(a);
            let json = serde_json::to_string(&env).unwrap_or_default();
            if self.tx.try_send((channel(&a.user_id), json)).is_err() {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
