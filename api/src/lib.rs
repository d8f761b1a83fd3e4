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

use crate::freshness::Freshness;

/// What the API is handed by the composition root.
pub struct Api {
    pub pool: PgPool,
    pub verifier: Arc<JwtVerifier>,
    /// The realtime gateway's hub (None: realtime disabled on this instance).
    pub realtime: Option<Arc<realtime::Hub>>,
    /// Shown by the dashboard: where uploads go (the ingest edge's public URL).
    pub ingest_url: String,
}

pub const OPENAPI: &str = include_str!("../openapi.json");
const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");

/// Only the realtime WebSocket gateway (and `/healthz`): `vitals realtime`, for deployments that
/// scale connections apart from reads.
pub fn realtime_router(api: Arc<Api>) -> Router {
    Router::new().route("/healthz", get(|| async { "ok" })).route("/v1/realtime", get(realtime::upgrade)).with_state(api)
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/rollups", get(rollups))
        .route("/v1/sleep", get(sleep))
        .route("/v1/sessions", get(sessions))
        .route("/v1/sessions/{id}", get(session))
        .route("/v1/products", get(products))
        .route("/v1/freshness", get(freshness_summary))
        .route("/v1/realtime", get(realtime::upgrade))
        .with_state(api)
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
    (StatusCode::OK, [(header::ETAG, tag), (header::CONTENT_TYPE, HeaderValue::from_static("application/json")), (header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"))], bytes)
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
        .map(|s| s.parse::<i64>().map_err(|_| ApiError::bad_request("invalid_parameter", format!("{field} must be epoch milliseconds")).field(field)))
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

async fn rollups(State(api): State<Arc<Api>>, headers: HeaderMap, q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    by_day(&api, &headers, q, "proj_rollup_day", "rollup_day").await
}

async fn sleep(State(api): State<Arc<Api>>, headers: HeaderMap, q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    if q.metric.is_some() {
        return Err(ApiError::bad_request("invalid_parameter", "sleep nights take no metric").field("metric"));
    }
    by_day(&api, &headers, q, "proj_sleep_night", "sleep_night").await
}

/// A page of a projection keyed by local date (rollups, sleep nights), ordered by date, optionally
/// of one metric and within [from, to].
async fn by_day(api: &Api, headers: &HeaderMap, q: ListQuery, table: &str, projection: &str) -> Result<Response, ApiError> {
    let user = user(api, headers)?;
    if let Some(m) = &q.metric {
        text("metric", m)?;
    }
    let (from, to, n, cursor) = (date("from", &q.from)?, date("to", &q.to)?, limit(&q)?, decode_cursor(&q.cursor)?);
    let (ck, ce) = cursor.map(|c| (Some(c.k), Some(c.e))).unwrap_or((None, None));
    let mut tx = snapshot(api).await?;
    let rows: Rows = sqlx::query_as(&format!(
        "SELECT day::text, entity_id, body FROM {table}
         WHERE user_id = $1 AND NOT deleted AND ($2::text IS NULL OR metric = $2)
           AND ($3::date IS NULL OR day >= $3) AND ($4::date IS NULL OR day <= $4)
           AND ($5::text IS NULL OR (day::text, entity_id) > ($5, $6))
         ORDER BY day, entity_id LIMIT $7"
    ))
    .bind(&user)
    .bind(&q.metric)
    .bind(from)
    .bind(to)
    .bind(ck)
    .bind(ce)
    .bind(n + 1)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    let f = freshness::of(&mut tx, &user, projection).await.map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(respond(headers, &page(rows, n, f)))
}

async fn sessions(State(api): State<Arc<Api>>, headers: HeaderMap, q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>) -> Result<Response, ApiError> {
    let user = user(&api, &headers)?;
    let Query(q) = q.map_err(bad_query)?;
    if q.metric.is_some() {
        return Err(ApiError::bad_request("invalid_parameter", "sessions take no metric").field("metric"));
    }
    let (from, to, n, cursor) = (millis("from", &q.from)?, millis("to", &q.to)?, limit(&q)?, decode_cursor(&q.cursor)?);
    let (ck, ce) = cursor.map(|c| (Some(c.k), Some(c.e))).unwrap_or((None, None));
    // Sorted by start; the key is zero-padded so text order is time order.
    let mut tx = snapshot(&api).await?;
    let rows: Rows = sqlx::query_as(
        "SELECT lpad(at_ms::text, 20, '0'), entity_id, body FROM proj_session_impact
         WHERE user_id = $1 AND NOT deleted
           AND ($2::int8 IS NULL OR at_ms >= $2) AND ($3::int8 IS NULL OR at_ms < $3)
           AND ($4::text IS NULL OR (lpad(at_ms::text, 20, '0'), entity_id) > ($4, $5))
         ORDER BY 1, entity_id LIMIT $6",
    )
    .bind(&user)
    .bind(from)
    .bind(to)
    .bind(ck)
    .bind(ce)
    .bind(n + 1)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    let f = freshness::of(&mut tx, &user, "session_impact").await.map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(respond(&headers, &page(rows, n, f)))
}

#[derive(Serialize)]
struct One {
    data: serde_json::Value,
    freshness: Freshness,
}

async fn session(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let user = user(&api, &headers)?;
    text("id", &id)?;
    let mut tx = snapshot(&api).await?;
    let row: Option<(Json<serde_json::Value>,)> = sqlx::query_as("SELECT body FROM proj_session_impact WHERE user_id = $1 AND entity_id = $2 AND NOT deleted")
        .bind(&user)
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    let f = freshness::of(&mut tx, &user, "session_impact").await.map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    match row {
        Some((body,)) => Ok(respond(&headers, &One { data: body.0, freshness: f })),
        // Another user's session is indistinguishable from a missing one.
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no session `{id}` (yet: freshness is {})", f.state.as_str())).field("id")),
    }
}

async fn products(State(api): State<Arc<Api>>, headers: HeaderMap, q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>) -> Result<Response, ApiError> {
    let user = user(&api, &headers)?;
    let Query(q) = q.map_err(bad_query)?;
    if q.metric.is_some() || q.from.is_some() || q.to.is_some() {
        return Err(ApiError::bad_request("invalid_parameter", "products take only cursor and limit"));
    }
    let (n, cursor) = (limit(&q)?, decode_cursor(&q.cursor)?);
    let ce = cursor.map(|c| c.e);
    let mut tx = snapshot(&api).await?;
    let rows: Rows = sqlx::query_as(
        "SELECT '' AS k, entity_id, body FROM proj_product_impact
         WHERE user_id = $1 AND NOT deleted AND ($2::text IS NULL OR entity_id > $2)
         ORDER BY entity_id LIMIT $3",
    )
    .bind(&user)
    .bind(ce)
    .bind(n + 1)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    let f = freshness::of(&mut tx, &user, "product_impact").await.map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(respond(&headers, &page(rows, n, f)))
}

async fn freshness_summary(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let user = user(&api, &headers)?;
    let mut tx = snapshot(&api).await?;
    let all = freshness::UserProgress::load(&mut tx, &user).await.map_err(db_error)?.all();
    tx.commit().await.map_err(db_error)?;
    Ok(respond(&headers, &serde_json::json!({ "user_id": user, "freshness": all })))
}
