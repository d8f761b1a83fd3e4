//! `vitals-api`: the read API app dashboards call.
//!
//! * JWT-authenticated (the same verifier as the ingest edge); the user is the token's `sub`, and
//!   every query is scoped to it — no parameter names another user.
//! * Every response states its freshness ([`freshness`]): `fresh`, `stale` (with how far behind)
//!   or `pending`, from the projection's applied progress against what the edge accepted. A
//!   response's rows and the inputs of its freshness are read in one transaction (`snapshot`).
//! * `ETag` on every 200 (a hash of the body); `If-None-Match` → 304. Cursor pagination.
//!   Typed errors `{"error": {"code", "message", "field"}}` with stable codes.
//! * `/` serves the dashboard (static files in `api/static`, no build step); `/v1/realtime` is the
//!   WebSocket gateway ([`realtime`]).

pub mod freshness;
pub mod realtime;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use vitals_auth::{ApiError, JwtVerifier};
use vitals_schemas::exposition::HttpMetrics;
use vitals_schemas::projection::{Descriptor, Order};

use crate::freshness::Freshness;

/// What the API is handed by the composition root.
pub struct Api {
    pub pool: PgPool,
    pub verifier: Arc<JwtVerifier>,
    /// The realtime gateway's hub (None: realtime disabled on this instance).
    pub realtime: Option<Arc<realtime::Hub>>,
    /// Shown by the dashboard: where uploads go (the ingest edge's public URL).
    pub ingest_url: String,
    /// The projections it serves (the registered processors' descriptors), each at
    /// `/v1/projections/{name}`.
    pub projections: Vec<&'static Descriptor>,
    /// Responses by route and status class, and their durations, for `/metrics`.
    pub metrics: HttpMetrics,
}

async fn count_responses(State(api): State<Arc<Api>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    // The route's pattern (`/v1/projections/{name}`), never the path: no user id in a label.
    let route = req.extensions().get::<axum::extract::MatchedPath>().map_or("unmatched".to_owned(), |m| m.as_str().to_owned());
    let resp = next.run(req).await;
    api.metrics.record(&route, resp.status().as_u16(), started.elapsed());
    resp
}

/// The Prometheus text exposition of this instance: responses by route and status class, their
/// durations and, with the realtime gateway, its connections and deliveries.
fn render_metrics(api: &Api) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    api.metrics.render(&mut out, "vitals_api");
    if let Some(hub) = &api.realtime {
        let m = &hub.metrics;
        for (name, help, v) in [
            ("connections_total", "WebSocket connections accepted.", m.connections.load(Relaxed)),
            ("delivered_total", "Envelopes delivered to WebSocket clients.", m.delivered.load(Relaxed)),
            ("slow_disconnects_total", "Connections closed because the client read too slowly.", m.slow_disconnects.load(Relaxed)),
            ("redis_reconnects_total", "Reconnections to Redis pub/sub.", m.redis_reconnects.load(Relaxed)),
        ] {
            let _ =
                writeln!(out, "# HELP vitals_realtime_{name} {help}\n# TYPE vitals_realtime_{name} counter\nvitals_realtime_{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP vitals_realtime_open_connections WebSocket connections open now.\n# TYPE vitals_realtime_open_connections gauge\nvitals_realtime_open_connections {}",
            hub.open_connections()
        );
    }
    out
}

async fn metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render_metrics(&api))
}

impl Api {
    fn projection(&self, name: &str) -> Result<&'static Descriptor, ApiError> {
        self.projections.iter().copied().find(|d| d.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.projections.iter().map(|d| d.name).collect();
            ApiError::new(StatusCode::NOT_FOUND, "unknown_projection", format!("no projection `{name}` (known: {})", known.join(", ")))
                .field("name")
        })
    }
}

pub const OPENAPI: &str = include_str!("../openapi.json");
const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");

/// Only the realtime WebSocket gateway (and `/healthz`, `/metrics`): `vitals realtime`, for
/// deployments that scale connections apart from reads.
pub fn realtime_router(api: Arc<Api>) -> Router {
    realtime_routes(Arc::clone(&api)).merge(metrics_router(api))
}

/// [`realtime_router`] without `/metrics` (served apart: [`metrics_router`]).
pub fn realtime_routes(api: Arc<Api>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/realtime", get(realtime::upgrade))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&api), count_responses))
        .with_state(api)
}

/// `GET /metrics` (and `/healthz`) alone, for `api.metrics_listen`: an internal port, so the
/// public one does not expose the exposition.
pub fn metrics_router(api: Arc<Api>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(api)
}

/// The read API, the dashboard, the gateway and `/metrics`.
pub fn router(api: Arc<Api>) -> Router {
    routes(Arc::clone(&api)).merge(metrics_router(api))
}

/// [`router`] without `/metrics` (served apart: [`metrics_router`]).
pub fn routes(api: Arc<Api>) -> Router {
    let doc: &'static str = Box::leak(openapi(&api.projections).into_boxed_str());
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/openapi.json", get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/rollups", get(rollups))
        .route("/v1/sleep", get(sleep))
        .route("/v1/sessions", get(sessions))
        .route("/v1/sessions/{id}", get(session))
        .route("/v1/products", get(products))
        .route("/v1/projections", get(projections))
        .route("/v1/projections/{name}", get(projection_list))
        .route("/v1/projections/{name}/{key}", get(projection_item))
        .route("/v1/freshness", get(freshness_summary))
        .route("/v1/realtime", get(realtime::upgrade))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&api), count_responses))
        .with_state(api)
}

/// The OpenAPI document: `api/openapi.json` with each projection's path parameters and record
/// schema derived from its descriptor.
pub fn openapi(projections: &[&'static Descriptor]) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("api/openapi.json is JSON");
    let names: Vec<&str> = projections.iter().map(|d| d.name).collect();
    let refs: Vec<serde_json::Value> =
        names.iter().map(|n| serde_json::json!({"$ref": format!("#/components/schemas/projection.{n}")})).collect();
    if let Some(p) = doc.pointer_mut("/components/parameters/ProjectionName/schema") {
        p["enum"] = serde_json::json!(names);
    }
    if let Some(items) = doc.pointer_mut("/components/schemas/ProjectionRecord") {
        *items = serde_json::json!({ "oneOf": refs });
    }
    if let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(|s| s.as_object_mut()) {
        for d in projections {
            schemas.insert(format!("projection.{}", d.name), vitals_schemas::projection::json_schema(d));
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| OPENAPI.to_owned())
}

fn user(api: &Api, headers: &HeaderMap) -> Result<String, ApiError> {
    api.verifier.authenticate(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))
}

fn db_error(e: sqlx::Error) -> ApiError {
    // A data exception (SQLSTATE class 22: a value PostgreSQL cannot take, NUL in text, a date out
    // of its range) comes from a parameter, hence from the request: every parameter is validated
    // before it is bound, and one that slips through is still the client's, not an outage.
    if let sqlx::Error::Database(d) = &e {
        if d.code().is_some_and(|c| c.starts_with("22")) {
            tracing::warn!(error = %e, "a request parameter was refused by PostgreSQL");
            return ApiError::bad_request("invalid_parameter", "a parameter holds a value that cannot be used");
        }
    }
    tracing::error!(error = %e, "read failed");
    ApiError::unavailable("database_unavailable", "the projection store is unavailable; retry shortly", 2)
}

/// The transaction every read runs in: its rows and its freshness inputs (accepted offsets,
/// applied progress) are of one moment. The sink commits rows and progress together, but two
/// separate reads can straddle a commit: rows of a replay from before and progress from after it
/// (or the other way round) would be served as `fresh`. Read only, so it never waits on a writer
/// nor fails to serialise.
async fn snapshot(api: &Api) -> Result<Transaction<'static, Postgres>, ApiError> {
    api.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(db_error)
}

/// A 200 with an ETag, or a 304 when the client already holds this body.
fn respond<T: Serialize>(headers: &HeaderMap, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&bytes))[..32]);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let tag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    (
        StatusCode::OK,
        [
            (header::ETAG, tag),
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache")),
        ],
        bytes,
    )
        .into_response()
}

/// A page of items with the freshness of the projection they come from.
#[derive(Serialize)]
struct Page {
    data: Vec<serde_json::Value>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
    freshness: Freshness,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    metric: Option<String>,
    from: Option<String>,
    to: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

fn limit(q: &ListQuery) -> Result<i64, ApiError> {
    match &q.limit {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request("invalid_parameter", format!("limit must be an integer in 1..={MAX_LIMIT}")).field("limit")),
        },
    }
}

/// A date of the years 1..=9999 (chrono reads ±262143; PostgreSQL's `date` has another range, and
/// no day a phone recorded is outside this one).
fn date(field: &'static str, v: &Option<String>) -> Result<Option<chrono::NaiveDate>, ApiError> {
    use chrono::Datelike;
    let bad = || ApiError::bad_request("invalid_parameter", format!("{field} must be a date YYYY-MM-DD (years 0001..=9999)")).field(field);
    v.as_deref()
        .map(|s| match s.parse::<chrono::NaiveDate>() {
            Ok(d) if (1..=9999).contains(&d.year()) => Ok(d),
            _ => Err(bad()),
        })
        .transpose()
}

/// Text a client sends that is bound into a query: 1..=256 bytes, no control characters (NUL
/// would fail the query; no stored key holds one, the edge refuses them).
fn text(field: &'static str, v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err(ApiError::bad_request("invalid_parameter", format!("{field} must be 1..=256 printable characters")).field(field));
    }
    Ok(())
}

fn millis(field: &'static str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    v.as_deref()
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| ApiError::bad_request("invalid_parameter", format!("{field} must be epoch milliseconds")).field(field))
        })
        .transpose()
}

/// Cursors are opaque to clients: the sort key of the last item returned.
#[derive(Serialize, Deserialize)]
struct Cursor {
    k: String,
    e: String,
}

fn encode_cursor(k: String, e: String) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Cursor { k, e }).unwrap_or_default())
}

fn decode_cursor(c: &Option<String>) -> Result<Option<Cursor>, ApiError> {
    let bad = || ApiError::bad_request("invalid_cursor", "cursor is not one this API returned").field("cursor");
    c.as_deref()
        .map(|s| {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
            let c = serde_json::from_slice::<Cursor>(&raw).map_err(|_| bad())?;
            // A forged cursor: what this API returns never holds control characters.
            if [&c.k, &c.e].iter().any(|t| t.len() > 256 || t.chars().any(char::is_control)) {
                return Err(bad());
            }
            Ok(c)
        })
        .transpose()
}

fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_parameter", e.body_text())
}

type Rows = Vec<(String, String, Json<serde_json::Value>)>;

/// Turns `limit + 1` rows (sort key, entity id, body) into a page.
fn page(mut rows: Rows, limit: i64, freshness: Freshness) -> Page {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(|(k, e, _)| encode_cursor(k.clone(), e.clone())) } else { None };
    Page { data: rows.into_iter().map(|(_, _, b)| b.0).collect(), next_cursor, freshness }
}

async fn rollups(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    list(&api, &headers, user(&api, &headers)?, q, api.projection("rollup_day")?).await
}

async fn sleep(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    list(&api, &headers, user(&api, &headers)?, q, api.projection("sleep_night")?).await
}

async fn sessions(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    // `/v1/sessions` has always taken no metric (`/v1/projections/session_impact` filters by
    // product with it).
    if q.metric.is_some() {
        return Err(ApiError::bad_request("invalid_parameter", "sessions take no metric").field("metric"));
    }
    list(&api, &headers, user(&api, &headers)?, q, api.projection("session_impact")?).await
}

async fn session(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    item(&api, &headers, user(&api, &headers)?, api.projection("session_impact")?, &id, "id").await
}

async fn products(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    list(&api, &headers, user(&api, &headers)?, q, api.projection("product_impact")?).await
}

/// Every projection this API serves, and how its list is read.
async fn projections(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    user(&api, &headers)?;
    let data: Vec<serde_json::Value> = api
        .projections
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name,
                "description": d.doc,
                "path": format!("/v1/projections/{}", d.name),
                "key": d.key,
                "order": order_name(d.order),
                "metric_filter": d.group,
                "range": match d.order { Order::Day => Some("date"), Order::At => Some("epoch_ms"), Order::Key => None },
                "schema": d.avro_json(),
            })
        })
        .collect();
    Ok(respond(&headers, &serde_json::json!({ "data": data })))
}

fn order_name(o: Order) -> &'static str {
    match o {
        Order::Day => "day",
        Order::At => "time",
        Order::Key => "key",
    }
}

async fn projection_list(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    // Authenticated before the name is looked up: no projection names without a token.
    let user = user(&api, &headers)?;
    let d = api.projection(&name)?;
    let Query(q) = q.map_err(bad_query)?;
    list(&api, &headers, user, q, d).await
}

async fn projection_item(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let user = user(&api, &headers)?;
    let d = api.projection(&name)?;
    item(&api, &headers, user, d, &key, "key").await
}

/// A page of projection `d` for the token's user, in the descriptor's order: by day (`from`/`to`
/// dates, inclusive), by time (`from` inclusive, `to` exclusive, epoch ms) or by key (no
/// range); `metric` filters on the descriptor's group field.
async fn list(api: &Api, headers: &HeaderMap, user: String, q: ListQuery, d: &'static Descriptor) -> Result<Response, ApiError> {
    if let Some(m) = &q.metric {
        if d.group.is_none() {
            return Err(ApiError::bad_request("invalid_parameter", format!("{} takes no metric", d.name)).field("metric"));
        }
        text("metric", m)?;
    }
    if d.order == Order::Key && (q.from.is_some() || q.to.is_some()) {
        return Err(ApiError::bad_request("invalid_parameter", format!("{} is ordered by key: it takes no from or to", d.name))
            .field(if q.from.is_some() { "from" } else { "to" }));
    }
    // Validated before anything is read, whatever the order.
    let (days, times) = match d.order {
        Order::Day => ((date("from", &q.from)?, date("to", &q.to)?), (None, None)),
        Order::At => ((None, None), (millis("from", &q.from)?, millis("to", &q.to)?)),
        Order::Key => ((None, None), (None, None)),
    };
    let (n, cursor) = (limit(&q)?, decode_cursor(&q.cursor)?);
    let (ck, ce) = cursor.map(|c| (Some(c.k), Some(c.e))).unwrap_or((None, None));
    // The sort key is text (it goes into the cursor); times are zero-padded so text order is
    // time order.
    let (sort, order_by) = match d.order {
        Order::Day => ("day::text", "day, entity_id"),
        Order::At => ("lpad(at_ms::text, 20, '0')", "1, entity_id"),
        Order::Key => ("''", "entity_id"),
    };
    let mut tx = snapshot(api).await?;
    // The user's progress first: it names the version reads are served from (the same
    // snapshot as the rows).
    let progress = freshness::UserProgress::load(&mut tx, &user).await.map_err(db_error)?;
    let sql = format!(
        "SELECT {sort}, entity_id, body FROM {table}
         WHERE user_id = $1 AND NOT deleted AND ($2::text IS NULL OR metric = $2)
           AND ($3::date IS NULL OR day >= $3) AND ($4::date IS NULL OR day <= $4)
           AND ($5::int8 IS NULL OR at_ms >= $5) AND ($6::int8 IS NULL OR at_ms < $6)
           AND ($7::text IS NULL OR ({sort}, entity_id) > ($7, $8))
         ORDER BY {order_by} LIMIT $9",
        table = progress.table(d)
    );
    let rows: Result<Rows, sqlx::Error> = sqlx::query_as(&sql)
        .bind(&user)
        .bind(&q.metric)
        .bind(days.0)
        .bind(days.1)
        .bind(times.0)
        .bind(times.1)
        .bind(ck)
        .bind(ce)
        .bind(n + 1)
        .fetch_all(&mut *tx)
        .await;
    let (rows, tx) = or_no_table(tx, rows, Vec::new())?;
    let f = progress.of(d, &api.projections);
    if let Some(tx) = tx {
        tx.commit().await.map_err(db_error)?;
    }
    Ok(respond(headers, &page(rows, n, f)))
}

/// What a read in `tx` returned, and the transaction if it is still open; a registered
/// projection whose table the sink has not created yet (SQLSTATE 42P01) reads as `empty` —
/// nothing of it is applied, as the progress read before it in the same snapshot says (the
/// failed statement ended `tx`, which is then dropped: it read nothing more).
fn or_no_table<T>(
    tx: Transaction<'static, Postgres>,
    read: Result<T, sqlx::Error>,
    empty: T,
) -> Result<(T, Option<Transaction<'static, Postgres>>), ApiError> {
    match read {
        Ok(v) => Ok((v, Some(tx))),
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42P01") => Ok((empty, None)),
        Err(e) => Err(db_error(e)),
    }
}

#[derive(Serialize)]
struct One {
    data: serde_json::Value,
    freshness: Freshness,
}

/// One row of projection `d` by its key (the descriptor's key fields joined by `|`).
async fn item(
    api: &Api,
    headers: &HeaderMap,
    user: String,
    d: &'static Descriptor,
    key: &str,
    field: &'static str,
) -> Result<Response, ApiError> {
    text(field, key)?;
    let mut tx = snapshot(api).await?;
    let progress = freshness::UserProgress::load(&mut tx, &user).await.map_err(db_error)?;
    let row: Result<Option<(Json<serde_json::Value>,)>, sqlx::Error> =
        sqlx::query_as(&format!("SELECT body FROM {} WHERE user_id = $1 AND entity_id = $2 AND NOT deleted", progress.table(d)))
            .bind(&user)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await;
    let (row, tx) = or_no_table(tx, row, None)?;
    let f = progress.of(d, &api.projections);
    if let Some(tx) = tx {
        tx.commit().await.map_err(db_error)?;
    }
    match row {
        Some((body,)) => Ok(respond(headers, &One { data: body.0, freshness: f })),
        // Another user's row is indistinguishable from a missing one.
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {} `{key}` (yet: freshness is {})", d.name, f.state.as_str()),
        )
        .field(field)),
    }
}

async fn freshness_summary(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let user = user(&api, &headers)?;
    let mut tx = snapshot(&api).await?;
    let all = freshness::UserProgress::load(&mut tx, &user).await.map_err(db_error)?.all(&api.projections);
    tx.commit().await.map_err(db_error)?;
    Ok(respond(&headers, &serde_json::json!({ "user_id": user, "freshness": all })))
}
