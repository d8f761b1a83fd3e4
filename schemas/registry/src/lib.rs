//! `vitals-registry`: a Confluent-compatible Schema Registry backed by PostgreSQL, served by the
//! binary's `vitals registry` role.
//!
//! Producers and consumers reach it through `schema_registry_converter` exactly as they would
//! reach Confluent's registry (so pointing vitals at a real Confluent registry is a URL change):
//! same routes, JSON bodies, content type (`application/vnd.schemaregistry.v1+json`), error
//! bodies (`{"error_code", "message"}`) and global schema ids for the wire format (magic byte 0 +
//! 4-byte big-endian id). Only AVRO schemas are accepted.
//!
//! * [`compat`]: parsing, schema identity and the compatibility rules, usable without HTTP.
//! * `http`: the routes ([`router`]); `store`: the SQL (tables of
//!   `migrations/0002_registry.sql`, applied by the composition root's `sqlx::migrate!`).
//!
//! Authentication ([`Access`]): HTTP basic, an admin credential (read + write) and a read-only
//! one (reads, lookups by content and compatibility checks), optionally anonymous reads; 401
//! (40101) with a `WWW-Authenticate` challenge or 403 (40301) otherwise. `GET /healthz` and
//! `GET /metrics` (not Confluent routes) answer without credentials, for probes and scrapers.
//!
//! Differences from Confluent worth knowing: incompatible registrations answer error_code 409
//! (as Confluent up to 7.x; newer releases say 40901); `metadata`, `ruleSet`, explicit `id` /
//! `version` (IMPORT mode), contexts, modes other than READWRITE and the `normalize` and
//! `format` parameters are accepted and ignored; a permanent delete drops schemas no version
//! uses any more, so their ids stop resolving.

mod auth;
pub mod client;
pub mod compat;
mod error;
mod http;
mod store;

#[cfg(test)]
mod tests;

pub use auth::{Access, Credential};

/// The registry's HTTP API over `pool`, whose database has `migrations/0002_registry.sql`
/// applied, behind `access` (HTTP basic authentication: see [`Access`]); and `GET /metrics`
/// (responses by route and status class, their durations), like `/healthz` without credentials,
/// for the scraper.
pub fn router(pool: sqlx::PgPool, access: Access) -> axum::Router {
    use std::sync::Arc;
    let metrics = Arc::new(vitals_schemas::exposition::HttpMetrics::default());
    let scraped = Arc::clone(&metrics);
    http::routes(pool)
        .layer(axum::middleware::from_fn_with_state(Arc::new(access), auth::check))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = Arc::clone(&scraped);
                async move {
                    let mut out = String::new();
                    m.render(&mut out, "vitals_registry");
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
                }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(metrics, count_responses))
}

async fn count_responses(
    axum::extract::State(m): axum::extract::State<std::sync::Arc<vitals_schemas::exposition::HttpMetrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    // The route's pattern (`/subjects/{subject}/versions`), never the path.
    let route = req.extensions().get::<axum::extract::MatchedPath>().map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    m.record(&route, resp.status().as_u16(), started.elapsed());
    resp
}
