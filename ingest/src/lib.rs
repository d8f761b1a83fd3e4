//! `vitals-ingest`: the edge phones upload to.
//!
//! A request goes through: JWT auth ([`vitals_auth`]) → the user's concurrency slot → bounded body read
//! within a deadline → a global in-flight permit (only now: a slow body holds no permit) → strict
//! JSON envelope →
//! privacy/consent → request idempotency ([`store`]) → per-item validation and unit normalisation
//! ([`request`], pure) → lane routing (HOT / COLD / CHANGE, domain changes) → Avro encoding via the
//! schema registry → produce keyed by user and wait for every broker ack ([`writer`]) → store the
//! response and the user's accepted offsets → 2xx. A 2xx therefore means every accepted item is
//! durably in Kafka; when the broker or registry cannot take it, 503 with `Retry-After`.
//!
//! Everything is handed in by the composition root ([`Ingest::new`]); nothing here reads the
//! environment or opens connections of its own.

pub mod error;
pub mod json;
pub mod metrics;
pub mod request;
pub mod store;
pub mod trace;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use tracing::{error, info_span, warn, Instrument};
use vitals_auth::{ApiError, JwtVerifier};
use vitals_schemas::catalog::Catalog;
use vitals_schemas::topics::Topics;
use vitals_schemas::{ChangeBatch, DomainChangeBatch, DomainChangeKind, Lane, PrivacySettings, SampleBatch};

use crate::error::ItemError;
use crate::metrics::Metrics;
use crate::request::{BatchKind, Rules};
use crate::store::{Begin, Landed};
use crate::trace::TraceContext;
use crate::writer::{LaneWriter, Outgoing, WriteError};

/// The OpenAPI document of the edge, served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Tunables of the edge (defaults in the composition root's config file).
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub rules: Rules,
    pub max_body_bytes: usize,
    /// Samples per Kafka record (a request's lane may span several records).
    pub max_items_per_record: usize,
    /// How long an in-flight request id is held before a retry may take it over.
    pub idempotency_lease: Duration,
    pub retry_after_secs: u64,
    /// When true, samples of users without an accepted `privacy_updated` allowing upload are refused.
    pub require_consent: bool,
    /// Requests processed at once; beyond it the edge sheds load with 503.
    pub max_in_flight: usize,
    /// Uploads of one user at once (body read included); beyond it 429.
    pub max_in_flight_per_user: usize,
    /// A body must be read in full within this long; beyond it 408.
    pub body_timeout: Duration,
}

impl Default for IngestConfig {
    fn default() -> IngestConfig {
        IngestConfig {
            rules: Rules::default(),
            max_body_bytes: 2 * 1024 * 1024,
            max_items_per_record: 500,
            idempotency_lease: Duration::from_secs(60),
            retry_after_secs: 5,
            require_consent: true,
            max_in_flight: 256,
            max_in_flight_per_user: 8,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// A check `/readyz` runs: `Err` lists what is not ready, one line each.
pub type Probe = Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Vec<String>>> + Send>> + Send + Sync>;

/// Probes `/readyz` runs; supplied by the composition root so this crate stays I/O-agnostic.
pub struct Readiness {
    /// The schema registry answers the edge's credential and holds vitals' own schema as the
    /// latest version of every subject the edge writes; `Err` names each subject that does not
    /// and why.
    pub schemas: Probe,
}

/// The edge: everything a request needs.
pub struct Ingest {
    cfg: IngestConfig,
    verifier: std::sync::Arc<JwtVerifier>,
    writer: LaneWriter,
    pool: PgPool,
    topics: Topics,
    catalog: &'static Catalog,
    readiness: Readiness,
    in_flight_limit: Arc<tokio::sync::Semaphore>,
    user_slots: Arc<UserSlots>,
    pub metrics: Metrics,
}

/// Requests each user has in progress (from token verified to answer).
#[derive(Default)]
struct UserSlots(Mutex<HashMap<String, usize>>);

/// One of a user's slots, given back when dropped (also when the client goes away mid-body).
struct UserSlot {
    slots: Arc<UserSlots>,
    user: String,
}

impl UserSlots {
    fn try_take(self: &Arc<Self>, user: &str, max: usize) -> Option<UserSlot> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(user.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserSlot { slots: Arc::clone(self), user: user.to_owned() })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut held = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.user);
            }
        }
    }
}

/// Counts a body being read on the `body_reads` gauge for as long as it lives.
struct Reading<'a>(&'a prometheus::IntGauge);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Ingest {
    pub fn new(
        cfg: IngestConfig,
        verifier: std::sync::Arc<JwtVerifier>,
        writer: LaneWriter,
        pool: PgPool,
        topics: Topics,
        readiness: Readiness,
    ) -> Ingest {
        let in_flight_limit = Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight));
        Ingest {
            cfg,
            verifier,
            writer,
            pool,
            topics,
            catalog: Catalog::embedded(),
            readiness,
            in_flight_limit,
            user_slots: Arc::default(),
            metrics: Metrics::new(),
        }
    }
}

/// The edge's routes.
pub fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/health/samples:batch", post(samples))
        .route("/v1/health/deletions:batch", post(deletions))
        .route("/v1/domain-changes:batch", post(domain_changes))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON) }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(ingest)
}

async fn samples(State(s): State<Arc<Ingest>>, req: Request) -> Response {
    handle(s, BatchKind::Samples, req).await
}
async fn deletions(State(s): State<Arc<Ingest>>, req: Request) -> Response {
    handle(s, BatchKind::Deletions, req).await
}
async fn domain_changes(State(s): State<Arc<Ingest>>, req: Request) -> Response {
    handle(s, BatchKind::DomainChanges, req).await
}

async fn metrics(State(s): State<Arc<Ingest>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

/// Ready when the broker and PostgreSQL answer and the registry holds vitals' schemas (the
/// body's `schema_problems` says which subject is wrong and why).
async fn readyz(State(s): State<Arc<Ingest>>) -> Response {
    let producer = s.writer.producer().clone();
    let broker = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        producer.client().fetch_metadata(None, Duration::from_secs(2)).map(|m| m.brokers().len())
    });
    let registry = tokio::time::timeout(Duration::from_secs(5), (s.readiness.schemas)());
    let db = sqlx::query("SELECT 1").execute(&s.pool);
    let (broker, registry, db) = tokio::join!(broker, registry, db);
    let broker_ok = matches!(broker, Ok(Ok(n)) if n > 0);
    let registry = registry.unwrap_or_else(|_| Err(vec!["the schema registry did not answer within 5 s".to_owned()]));
    let db_ok = db.is_ok();
    let mut body = json!({"broker": broker_ok, "schema_registry": registry.is_ok(), "postgres": db_ok});
    if let Err(problems) = &registry {
        warn!(problems = ?problems, "not ready: schema registry");
        body["schema_problems"] = json!(problems);
    }
    let status = if broker_ok && registry.is_ok() && db_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Wall clock in ms; the edge is the one place where "now" is legitimately read.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The answer to a batch: how many items were accepted (and on which lanes), which were not.
#[derive(Debug, Serialize)]
struct BatchResponse<'a> {
    request_id: &'a str,
    accepted: usize,
    lanes: BTreeMap<&'static str, usize>,
    rejected: &'a [ItemError],
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

async fn handle(s: Arc<Ingest>, kind: BatchKind, req: Request) -> Response {
    let started = Instant::now();
    let endpoint = kind.endpoint();
    let incoming = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
    // The upload's first hop (vitals_schemas::trace): a child of the phone's span when it sent a
    // valid `traceparent`. Its context is what every record written carries to the processors.
    let span = info_span!(
        target: vitals_schemas::trace::TARGET,
        vitals_schemas::trace::EDGE_SPAN,
        otel.kind = "server",
        endpoint,
        user = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        status = tracing::field::Empty
    );
    vitals_schemas::trace::continue_from(&span, incoming.as_deref());
    let trace = vitals_schemas::trace::of(&span)
        .and_then(|tp| TraceContext::of_span(&tp))
        .unwrap_or_else(|| TraceContext::from_header(incoming.as_deref()));
    span.record("trace_id", trace.trace_id.as_str());
    let resp = async {
        let admitted = match admit(&s, req).await {
            Ok(a) => a,
            Err(e) => {
                s.metrics.rejections.with_label_values(&[e.code]).inc();
                return e.into_response();
            }
        };
        // A span names its user only hashed.
        tracing::Span::current().record("user", vitals_schemas::trace::user(&admitted.user).as_str());
        // Processed in its own task: a client that disconnects mid-request does not abort the work,
        // so the request id never stays claimed by an abandoned attempt, and the client's retry
        // gets the stored answer.
        let task = {
            let s = Arc::clone(&s);
            let trace = trace.clone();
            tokio::spawn(
                async move {
                    let Admitted { user, body, slot, permit } = admitted;
                    let _held = (slot, permit);
                    s.metrics.in_flight.inc();
                    let r = match process(&s, kind, &trace, &user, &body).await {
                        Ok(r) => r,
                        Err(e) => {
                            s.metrics.rejections.with_label_values(&[e.code]).inc();
                            e.into_response()
                        }
                    };
                    s.metrics.in_flight.dec();
                    r
                }
                .in_current_span(),
            )
        };
        task.await.unwrap_or_else(|e| {
            error!(error = %e, "ingest task failed");
            ApiError::internal().into_response()
        })
    }
    .instrument(span.clone())
    .await;
    span.record("status", resp.status().as_u16());
    s.metrics.requests.with_label_values(&[endpoint, resp.status().as_str()]).inc();
    s.metrics.request_seconds.with_label_values(&[endpoint]).observe(started.elapsed().as_secs_f64());
    resp
}

fn store_unavailable(e: sqlx::Error, retry: u64) -> ApiError {
    error!(error = %e, "ingest store unavailable");
    ApiError::unavailable("store_unavailable", "the request store is unavailable; retry later", retry)
}

/// A request that may be processed: its user, its whole body, one of the user's slots and one of
/// the edge's in-flight permits.
struct Admitted {
    user: String,
    body: bytes::Bytes,
    slot: UserSlot,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// Everything before processing, in the order that keeps a slow or hostile client from holding
/// what others need: the token (401), the media type and declared length (415, 413), one of the
/// user's `max_in_flight_per_user` slots (429), the body within `body_timeout` (408), and only then
/// one of the `max_in_flight` permits (503). A body trickled in byte by byte thus holds one of its
/// own user's slots for at most `body_timeout`, and never a permit.
async fn admit(s: &Arc<Ingest>, req: Request) -> Result<Admitted, ApiError> {
    let (parts, body) = req.into_parts();
    let user = s.verifier.authenticate(parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    let limit = s.cfg.max_body_bytes;
    check_headers(&parts.headers, limit)?;
    let slot = s.user_slots.try_take(&user, s.cfg.max_in_flight_per_user).ok_or_else(|| {
        ApiError::too_many_requests(
            "too_many_concurrent_requests",
            format!("at most {} requests of one user at once; wait for an answer before sending more", s.cfg.max_in_flight_per_user),
            s.cfg.retry_after_secs,
        )
    })?;
    s.metrics.body_reads.inc();
    let reading = Reading(&s.metrics.body_reads);
    let body = match tokio::time::timeout(s.cfg.body_timeout, read_body(body, limit)).await {
        Ok(body) => body?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body did not arrive in full within {} ms; nothing was written", s.cfg.body_timeout.as_millis()),
            ))
        }
    };
    drop(reading);
    let Ok(permit) = Arc::clone(&s.in_flight_limit).try_acquire_owned() else {
        return Err(ApiError::unavailable("overloaded", "too many requests in flight; retry later", s.cfg.retry_after_secs));
    };
    Ok(Admitted { user, body, slot, permit })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the body exceeds {limit} bytes; split the batch"))
}

/// The media type (when given) must be `application/json`, parameters allowed
/// (`application/json; charset=utf-8`); the declared length must fit.
fn check_headers(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok()) {
        if len > limit {
            return Err(too_large(limit));
        }
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        if !is_json_media_type(ct.to_str().unwrap_or("")) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send `Content-Type: application/json`",
            )
            .field("content-type"));
        }
    }
    Ok(())
}

/// `application/json`, any case, optionally followed by `;` parameters — not a longer type name
/// that merely starts with it.
pub fn is_json_media_type(ct: &str) -> bool {
    ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::bad_request("incomplete_body", "the body could not be read in full"))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

async fn process(s: &Ingest, kind: BatchKind, trace: &TraceContext, user: &str, body: &[u8]) -> Result<Response, ApiError> {
    let retry = s.cfg.retry_after_secs;
    let user = user.to_owned();
    let (env, hash, items) = request::parse_envelope(body, kind, &user, &s.cfg.rules)?;

    let t = Instant::now();
    let claim = store::claim(&s.pool, &user, &env.request_id, kind.endpoint(), &hash, s.cfg.idempotency_lease)
        .await
        .map_err(|e| store_unavailable(e, retry))?;
    s.metrics.store_seconds.with_label_values(&["claim"]).observe(t.elapsed().as_secs_f64());
    let privacy = claim.privacy;
    if kind == BatchKind::Samples && s.cfg.require_consent && !privacy.as_ref().is_some_and(|p| p.health_upload_allowed) {
        if claim.begin == Begin::Proceed {
            if let Err(re) = store::release(&s.pool, &user, &env.request_id).await {
                error!(error = %re, "could not release request id; it frees itself when its lease expires");
            }
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "health_upload_not_allowed",
            "the user has not allowed health uploads (send a privacy_updated domain change first)",
        ));
    }

    match claim.begin {
        Begin::Proceed => {}
        Begin::Replay { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let mut r = (status, Json(body)).into_response();
            r.headers_mut().insert("idempotent-replay", header::HeaderValue::from_static("true"));
            return Ok(r);
        }
        Begin::InFlight => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "request_in_flight",
                "a request with this request_id is still being processed",
            )
            .field("request_id"));
        }
        Begin::Mismatch => {
            return Err(ApiError::unprocessable("idempotency_key_reused", "this request_id was already used for a different payload")
                .field("request_id"));
        }
    }

    // From here on the request id is claimed: every exit either stores a final answer or releases it.
    let outcome = build_and_write(s, kind, trace, &user, &env.request_id, env.backfill, items, privacy.as_ref()).await;
    let (status, body, landed, privacy_update) = match outcome {
        Ok(v) => v,
        Err(e) => {
            if let Err(re) = store::release(&s.pool, &user, &env.request_id).await {
                error!(error = %re, "could not release request id; it frees itself when its lease expires");
            }
            return Err(e);
        }
    };
    let privacy_ref = privacy_update.as_ref().map(|(p, t)| (p, *t));
    let t = Instant::now();
    let finished = store::finish(&s.pool, &user, &env.request_id, status.as_u16(), &body, &landed, privacy_ref).await;
    s.metrics.store_seconds.with_label_values(&["finish"]).observe(t.elapsed().as_secs_f64());
    if let Err(e) = finished {
        // The records are in Kafka, but the answer could not be stored: let the client retry
        // (the retry re-produces; downstream deduplicates by sample identity and version).
        let _ = store::release(&s.pool, &user, &env.request_id).await;
        return Err(store_unavailable(e, retry));
    }
    Ok((status, Json(body)).into_response())
}

type Outcome = (StatusCode, Value, Vec<Landed>, Option<(PrivacySettings, i64)>);

#[allow(clippy::too_many_arguments)]
async fn build_and_write(
    s: &Ingest,
    kind: BatchKind,
    trace: &TraceContext,
    user: &str,
    request_id: &str,
    backfill: bool,
    items: Vec<Value>,
    privacy: Option<&PrivacySettings>,
) -> Result<Outcome, ApiError> {
    let now = now_ms();
    let chunk = s.cfg.max_items_per_record.max(1);
    let mut lanes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut records: Vec<Outgoing> = Vec::new();
    let mut privacy_update = None;
    let base = |r: &str| (r.to_owned(), user.to_owned(), now);
    let rejected: Vec<ItemError>;
    let accepted: usize;
    match kind {
        BatchKind::Samples => {
            let (ok, bad) = request::validate_samples(items, backfill, privacy, s.catalog, &s.cfg.rules, now);
            rejected = bad;
            accepted = ok.len();
            let mut hot = Vec::new();
            let mut cold = Vec::new();
            let mut edits = Vec::new();
            for r in ok {
                match r.lane {
                    Lane::Hot => hot.push(r.sample),
                    Lane::Cold => cold.push(r.sample),
                    Lane::Change => edits.push(r.sample),
                }
            }
            for (lane, name, topic, samples) in [(Lane::Hot, "hot", &s.topics.hot, hot), (Lane::Cold, "cold", &s.topics.cold, cold)] {
                if samples.is_empty() {
                    continue;
                }
                lanes.insert(name, samples.len());
                for part in samples.chunks(chunk) {
                    let (request_id, user_id, received_at_ms) = base(request_id);
                    let rec = SampleBatch { request_id, user_id, received_at_ms, lane, samples: part.to_vec() };
                    records.push(s.writer.encode(topic, &rec).await.map_err(|e| write_error(e, s))?);
                }
            }
            if !edits.is_empty() {
                lanes.insert("change", edits.len());
                for part in edits.chunks(chunk) {
                    let (request_id, user_id, received_at_ms) = base(request_id);
                    let rec = ChangeBatch { request_id, user_id, received_at_ms, edits: part.to_vec(), deletions: vec![] };
                    records.push(s.writer.encode(&s.topics.change, &rec).await.map_err(|e| write_error(e, s))?);
                }
            }
        }
        BatchKind::Deletions => {
            let (ok, bad) = request::validate_deletions(items, s.catalog);
            rejected = bad;
            accepted = ok.len();
            if !ok.is_empty() {
                lanes.insert("change", ok.len());
            }
            for part in ok.chunks(chunk) {
                let (request_id, user_id, received_at_ms) = base(request_id);
                let rec = ChangeBatch { request_id, user_id, received_at_ms, edits: vec![], deletions: part.to_vec() };
                records.push(s.writer.encode(&s.topics.change, &rec).await.map_err(|e| write_error(e, s))?);
            }
        }
        BatchKind::DomainChanges => {
            let (ok, bad) = request::validate_changes(items, s.catalog, &s.cfg.rules, now);
            rejected = bad;
            accepted = ok.len();
            privacy_update = ok
                .iter()
                .filter(|c| c.kind == DomainChangeKind::PrivacyUpdated)
                .max_by_key(|c| c.occurred_at_ms)
                .and_then(|c| c.privacy.clone().map(|p| (p, c.occurred_at_ms)));
            if !ok.is_empty() {
                lanes.insert("domain", ok.len());
            }
            for part in ok.chunks(chunk) {
                let (request_id, user_id, received_at_ms) = base(request_id);
                let rec = DomainChangeBatch { request_id, user_id, received_at_ms, changes: part.to_vec() };
                records.push(s.writer.encode(&s.topics.domain, &rec).await.map_err(|e| write_error(e, s))?);
            }
        }
    }
    let endpoint = kind.endpoint();
    // The answer is stored in PostgreSQL (jsonb), which refuses NUL: what a rejection quotes of
    // the client's input is escaped, so a hostile item is a 4xx, never a failing store (503).
    let rejected: Vec<ItemError> = rejected
        .into_iter()
        .map(|e| ItemError { field: crate::error::printable(&e.field), message: crate::error::printable(&e.message), ..e })
        .collect();
    for e in &rejected {
        s.metrics.rejections.with_label_values(&[e.code.as_str()]).inc();
    }
    s.metrics.samples.with_label_values(&[endpoint, "rejected"]).inc_by(rejected.len() as u64);

    let landed = if records.is_empty() {
        Vec::new()
    } else {
        let t = Instant::now();
        let landed = s.writer.write(user, &trace.traceparent(), request_id, &records).await.map_err(|e| write_error(e, s))?;
        s.metrics.produce_seconds.with_label_values(&[endpoint]).observe(t.elapsed().as_secs_f64());
        landed
    };
    s.metrics.samples.with_label_values(&[endpoint, "accepted"]).inc_by(accepted as u64);

    let (status, error) = if accepted == 0 {
        let e = ApiError::unprocessable("all_items_rejected", "no item of the batch was accepted; see `rejected`");
        (StatusCode::UNPROCESSABLE_ENTITY, Some(e.body()["error"].clone()))
    } else if rejected.is_empty() {
        (StatusCode::OK, None)
    } else {
        (StatusCode::MULTI_STATUS, None)
    };
    let body = serde_json::to_value(BatchResponse { request_id, accepted, lanes, rejected: &rejected, error }).unwrap_or_default();
    Ok((status, body, landed, privacy_update))
}

fn write_error(e: WriteError, s: &Ingest) -> ApiError {
    let retry = s.cfg.retry_after_secs;
    match e {
        WriteError::QueueFull => ApiError::unavailable("broker_backpressure", "the broker is not keeping up; retry later", retry),
        WriteError::NotAcknowledged(m) => {
            warn!(error = %m, "records not acknowledged by the broker");
            ApiError::unavailable("broker_unavailable", "the data could not be made durable in Kafka; retry later", retry)
        }
        WriteError::Registry(m) => {
            warn!(error = %m, "schema registry unavailable");
            ApiError::unavailable("registry_unavailable", "the schema registry is unavailable; retry later", retry)
        }
        WriteError::Encode(m) => {
            error!(error = %m, "encoding failed");
            ApiError::internal()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_application_json_is_json() {
        for ok in ["application/json", "Application/JSON", "application/json; charset=utf-8", " application/json ;charset=UTF-8"] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in ["application/jsonfoo", "application/json-patch+json", "text/json", "", "application/x-json"] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
    }
}
