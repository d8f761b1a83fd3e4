//! The WebSocket gateway: `GET /v1/realtime?token=<jwt>` (or an `Authorization: Bearer` header).
//!
//! The token is verified at connect; the connection joins its own user's Redis channel only
//! (`vitals:user:<sub>`), so no client can receive another user's envelopes. Any number of
//! gateway instances can run: the sink publishes to Redis, every instance with a connection of
//! that user receives it. Per connection:
//! * envelopes are JSON `RealtimeEnvelope`s (`payload` is the row as a JSON string);
//! * duplicates (a replay, a sink failover) are suppressed by (event entity, version): an
//!   envelope whose version is not newer than the last one sent for that entity is dropped;
//! * a bounded buffer: a client that does not keep up is disconnected with close code 4008
//!   ("slow consumer"), and should re-read the API and reconnect;
//! * Redis down degrades realtime only: connections stay open, the hub reconnects with backoff;
//! * one user holds at most `max_connections_per_user` connections on one instance (beyond it the
//!   upgrade is refused with 429 `too_many_connections`);
//! * a connection is closed with code 4001 ("token expired") when its token stops being accepted
//!   (`exp` + the verifier's leeway): reconnect with a fresh token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn, Instrument};
use vitals_auth::ApiError;

use crate::Api;

/// Close code for a client that fell too far behind.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a connection whose token expired.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Arc<str>>,
    slow: Arc<AtomicBool>,
    kick: Arc<Notify>,
}

#[derive(Debug, Default)]
pub struct HubMetrics {
    pub connections: AtomicU64,
    pub delivered: AtomicU64,
    pub slow_disconnects: AtomicU64,
    pub redis_reconnects: AtomicU64,
}

/// One gateway instance's fan-out from Redis to its WebSocket connections.
pub struct Hub {
    subs: Mutex<HashMap<String, Vec<Subscriber>>>,
    sink: tokio::sync::Mutex<Option<redis::aio::PubSubSink>>,
    next_id: AtomicU64,
    /// Per-connection buffer (envelopes) before a client counts as slow.
    pub buffer: usize,
    /// Connections one user may hold on this instance.
    pub max_connections_per_user: usize,
    /// Connections (upgraded or upgrading) per user.
    held: Arc<Mutex<HashMap<String, usize>>>,
    pub metrics: HubMetrics,
}

/// One of a user's connection slots, given back when dropped (a failed upgrade included).
pub struct ConnectionSlot {
    held: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.user);
            }
        }
    }
}

fn channel(user: &str) -> String {
    format!("vitals:user:{user}")
}

impl Hub {
    /// Starts the hub: a task keeps one Redis pub/sub connection (reconnecting with backoff) and
    /// routes each user's messages to that user's connections.
    pub fn start(client: redis::Client, buffer: usize, max_connections_per_user: usize) -> Result<Arc<Hub>, redis::RedisError> {
        let hub = Hub::with_limit(buffer, max_connections_per_user);
        let h = Arc::clone(&hub);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match client.get_async_pubsub().await {
                    Ok(ps) => {
                        let (mut sink, mut stream) = ps.split();
                        let users: Vec<String> = h.subs.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
                        let mut ok = true;
                        for u in users {
                            ok &= sink.subscribe(channel(&u)).await.is_ok();
                        }
                        if ok {
                            *h.sink.lock().await = Some(sink);
                            backoff = Duration::from_millis(100);
                            while let Some(msg) = stream.next().await {
                                let ch = msg.get_channel_name().to_owned();
                                if let (Some(user), Ok(payload)) = (ch.strip_prefix("vitals:user:"), msg.get_payload::<String>()) {
                                    h.route(user, payload.into());
                                }
                            }
                            *h.sink.lock().await = None;
                        }
                        warn!("realtime: Redis connection lost; reconnecting");
                    }
                    Err(e) => warn!(error = %e, "realtime: Redis unavailable; retrying"),
                }
                h.metrics.redis_reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Ok(hub)
    }

    /// WebSocket connections open (or upgrading) on this instance now.
    pub fn open_connections(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
    }

    /// A hub with no Redis connection yet (what [`Hub::start`] builds on).
    pub fn new(buffer: usize) -> Arc<Hub> {
        Hub::with_limit(buffer, usize::MAX)
    }

    fn with_limit(buffer: usize, max_connections_per_user: usize) -> Arc<Hub> {
        Arc::new(Hub {
            subs: Mutex::new(HashMap::new()),
            sink: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            buffer,
            max_connections_per_user,
            held: Arc::default(),
            metrics: HubMetrics::default(),
        })
    }

    /// Takes one of `user`'s connection slots, or `None` when they hold them all.
    pub fn try_connect(&self, user: &str) -> Option<ConnectionSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(user.to_owned()).or_insert(0);
        if *n >= self.max_connections_per_user {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot { held: Arc::clone(&self.held), user: user.to_owned() })
    }

    fn route(&self, user: &str, payload: Arc<str>) {
        let subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        for s in subs.get(user).into_iter().flatten() {
            if s.tx.try_send(Arc::clone(&payload)).is_err() && !s.slow.swap(true, Ordering::Relaxed) {
                s.kick.notify_one();
            }
        }
    }

    async fn join(&self, user: &str) -> (u64, mpsc::Receiver<Arc<str>>, Arc<AtomicBool>, Arc<Notify>) {
        let (tx, rx) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (slow, kick) = (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()));
        let first = {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            let list = subs.entry(user.to_owned()).or_default();
            list.push(Subscriber { id, tx, slow: Arc::clone(&slow), kick: Arc::clone(&kick) });
            list.len() == 1
        };
        if first {
            if let Some(sink) = self.sink.lock().await.as_mut() {
                if let Err(e) = sink.subscribe(channel(user)).await {
                    warn!(error = %e, "realtime: subscribe failed (resubscribed on reconnect)");
                }
            }
        }
        (id, rx, slow, kick)
    }

    async fn leave(&self, user: &str, id: u64) {
        let last = {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            let list = subs.entry(user.to_owned()).or_default();
            list.retain(|s| s.id != id);
            let empty = list.is_empty();
            if empty {
                subs.remove(user);
            }
            empty
        };
        if last {
            if let Some(sink) = self.sink.lock().await.as_mut() {
                let _ = sink.unsubscribe(channel(user)).await;
            }
        }
    }

    /// Whether the hub currently holds a Redis subscription connection.
    pub async fn connected(&self) -> bool {
        self.sink.lock().await.is_some()
    }
}

#[derive(Deserialize)]
pub struct ConnectQuery {
    token: Option<String>,
}

pub async fn upgrade(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<ConnectQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let Some(hub) = api.realtime.clone() else {
        return Err(ApiError::unavailable("realtime_disabled", "this instance does not serve realtime", 30));
    };
    // Browsers cannot set headers on a WebSocket: the token may come as a query parameter.
    let auth = match (&q.token, headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        (Some(t), _) => Some(format!("Bearer {t}")),
        (None, h) => h.map(str::to_owned),
    };
    let verified = api.verifier.verify(auth.as_deref())?;
    let Some(slot) = hub.try_connect(&verified.user) else {
        return Err(ApiError::too_many_requests(
            "too_many_connections",
            format!("at most {} realtime connections per user; close one first", hub.max_connections_per_user),
            5,
        ));
    };
    Ok(ws.on_upgrade(move |socket| serve(hub, verified.user, verified.accepted_until, slot, socket)))
}

/// The version of an envelope's entity, for duplicate suppression.
#[derive(Deserialize)]
struct Versioned {
    event_type: String,
    entity_id: String,
    version_epoch: i64,
    version_seq: i64,
    #[serde(default)]
    traceparent: Option<String>,
}

/// Per connection: the newest version sent of each entity. An envelope is sent only when its
/// version is newer (a replay, a second sink during a failover, or Redis redelivery send the same
/// or an older one).
#[derive(Default)]
struct Seen(HashMap<(String, String), (i64, i64)>);

/// Whether an envelope is sent, and the trace it continues.
enum Admit {
    Send(Option<String>),
    Drop,
}

impl Seen {
    #[cfg(test)]
    fn admit(&mut self, payload: &str) -> bool {
        matches!(self.admit_traced(payload), Admit::Send(_))
    }

    fn admit_traced(&mut self, payload: &str) -> Admit {
        let Ok(v) = serde_json::from_str::<Versioned>(payload) else { return Admit::Send(None) };
        // Deletions and upserts of an entity share its version line.
        let projection = v.event_type.rsplit_once('.').map(|(p, _)| p.to_owned()).unwrap_or(v.event_type);
        let key = (projection, v.entity_id);
        let version = (v.version_epoch, v.version_seq);
        if self.0.get(&key).is_some_and(|held| *held >= version) {
            return Admit::Drop;
        }
        self.0.insert(key, version);
        Admit::Send(v.traceparent)
    }
}

async fn serve(hub: Arc<Hub>, user: String, accepted_until: u64, _slot: ConnectionSlot, mut socket: WebSocket) {
    let (id, mut rx, _slow, kick) = hub.join(&user).await;
    hub.metrics.connections.fetch_add(1, Ordering::Relaxed);
    info!(user = %user, "realtime client connected");
    let mut seen = Seen::default();
    // The token's end, on the wall clock (its `exp` is one), turned into a timer.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let left = Duration::from_secs(accepted_until + 1).saturating_sub(now);
    let expired = tokio::time::sleep(left);
    tokio::pin!(expired);
    loop {
        tokio::select! {
            _ = &mut expired => {
                let frame = CloseFrame { code: CLOSE_TOKEN_EXPIRED, reason: "token expired; reconnect with a fresh token".into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
                break;
            }
            _ = kick.notified() => {
                hub.metrics.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                let frame = CloseFrame { code: CLOSE_SLOW_CONSUMER, reason: "slow consumer: too many envelopes pending; re-read and reconnect".into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
                break;
            }
            msg = rx.recv() => {
                let Some(payload) = msg else { break };
                let Admit::Send(trace) = seen.admit_traced(&payload) else { continue };
                // The upload's last hop: a child of the sink span that applied the row.
                let span = match trace.as_deref() {
                    Some(tp) => {
                        let span = tracing::trace_span!(
                            target: vitals_schemas::trace::TARGET,
                            "realtime.deliver",
                            user = vitals_schemas::trace::user(&user).as_str()
                        );
                        vitals_schemas::trace::continue_from(&span, Some(tp));
                        span
                    }
                    None => tracing::Span::none(),
                };
                let sent = socket.send(Message::Text(payload.to_string().into())).instrument(span).await;
                if sent.is_err() {
                    break;
                }
                hub.metrics.delivered.fetch_add(1, Ordering::Relaxed);
            }
            incoming = socket.recv() => {
                match incoming {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {} // clients have nothing to say; pings are answered by axum
                }
            }
        }
    }
    hub.leave(&user, id).await;
    info!(user = %user, "realtime client disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(event: &str, entity: &str, e: i64, s: i64) -> String {
        serde_json::json!({"v": 1, "user_id": "u", "event_type": event, "entity_id": entity, "version_epoch": e, "version_seq": s, "payload": "{}"}).to_string()
    }

    #[test]
    fn duplicates_and_older_versions_are_suppressed_per_entity() {
        let mut seen = Seen::default();
        assert!(seen.admit(&env("rollup_day.upserted", "steps|2026-11-01", 1, 5)));
        assert!(!seen.admit(&env("rollup_day.upserted", "steps|2026-11-01", 1, 5)), "the same version again");
        assert!(!seen.admit(&env("rollup_day.upserted", "steps|2026-11-01", 1, 4)), "an older one");
        assert!(seen.admit(&env("rollup_day.deleted", "steps|2026-11-01", 2, 1)), "a newer deletion");
        assert!(!seen.admit(&env("rollup_day.upserted", "steps|2026-11-01", 1, 9)), "an upsert older than the deletion");
        assert!(seen.admit(&env("sleep_night.upserted", "steps|2026-11-01", 1, 1)), "another projection's entity");
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_is_flagged_once_and_others_are_unaffected() {
        let hub = Hub::new(2);
        let (_a, mut rx_a, slow_a, kick_a) = hub.join("u").await;
        let (_b, mut rx_b, slow_b, _) = hub.join("u").await;
        let (_c, mut rx_c, _, _) = hub.join("other").await;
        for i in 0..2 {
            hub.route("u", format!("m{i}").into());
            assert_eq!(rx_b.recv().await.as_deref(), Some(format!("m{i}").as_str()), "b keeps up");
        }
        hub.route("u", "m2".into()); // a's buffer (2) is full now
        assert!(slow_a.load(Ordering::Relaxed) && !slow_b.load(Ordering::Relaxed));
        tokio::time::timeout(std::time::Duration::from_secs(5), kick_a.notified()).await.expect("a is kicked");
        assert_eq!(rx_a.recv().await.as_deref(), Some("m0"), "what was buffered is still in order");
        assert!(rx_c.try_recv().is_err(), "another user's connection gets nothing");
        assert_eq!(hub.subs.lock().unwrap().len(), 2);
    }
}
