//! The HTTP surface: the subset of the Confluent Schema Registry REST API that
//! schema_registry_converter, Kafka Connect and the Confluent CLI use, as axum handlers over
//! [`super::store`]. Bodies are read as bytes and parsed here, so the content types Confluent
//! accepts (its vnd types, `application/json`, `application/octet-stream`, none) all work and
//! every failure is a Confluent error body.

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};

use super::compat::{self, CompatibilityLevel, Direction, ParsedSchema, SchemaReference};
use super::error::ApiError;
use super::store::{self, Filter, SubjectVersion, VersionSpec};

pub const SR_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Clone)]
struct AppState {
    pool: PgPool,
}

type ApiResult = Result<Response, ApiError>;

pub fn routes(pool: PgPool) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/schemas/types", get(schema_types))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_of_id))
        .route("/schemas/ids/{id}/versions", get(versions_of_id))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version).delete(delete_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(get_version_schema))
        .route("/subjects/{subject}/versions/{version}/referencedby", get(referenced_by))
        .route("/compatibility/subjects/{subject}/versions", post(check_against_all))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(check_against_version))
        .route("/config", get(get_global_config).put(put_global_config).delete(delete_global_config))
        .route("/config/{subject}", get(get_subject_config).put(put_subject_config).delete(delete_subject_config))
        .route("/mode", get(mode))
        .route("/mode/{subject}", get(mode))
        .route("/contexts", get(contexts))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(AppState { pool })
}

/// A JSON response with Confluent's content type.
pub fn sr_json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(CONTENT_TYPE, SR_CONTENT_TYPE)], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn ok<T: Serialize>(body: &T) -> ApiResult {
    Ok(sr_json(StatusCode::OK, body))
}

/// Path parameters, percent-decoded (`%2F` in a subject is a `/`), with rejections as
/// Confluent-style errors.
struct P<T>(T);

impl<S, T> FromRequestParts<S> for P<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state).await.map(|Path(value)| P(value)).map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// Query parameters. Unparseable ones are ignored and booleans are true only for "true" (any
/// case), like JAX-RS `@QueryParam boolean`.
#[derive(Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(|value| value.trim().eq_ignore_ascii_case("true"))
    }

    fn filter(&self) -> Filter {
        if self.flag("deletedOnly") {
            Filter::DeletedOnly
        } else if self.flag("deleted") {
            Filter::IncludeDeleted
        } else {
            Filter::Live
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Query::<Vec<(String, String)>>::try_from_uri(&parts.uri).map(|Query(pairs)| Params(pairs)).unwrap_or_default())
    }
}

fn read_json<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    if let Some(value) = headers.get(CONTENT_TYPE) {
        let essence =
            value.to_str().map_err(|_| ApiError::UnsupportedMediaType)?.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        let accepted = matches!(
            essence.as_str(),
            "" | "application/vnd.schemaregistry.v1+json"
                | "application/vnd.schemaregistry+json"
                | "application/json"
                | "application/octet-stream"
        );
        if !accepted {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Unprocessable("The request body must not be empty".to_owned()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaRequest {
    schema: Option<String>,
    schema_type: Option<String>,
    references: Option<Vec<SchemaReference>>,
}

/// A schema as submitted; `metadata`, `ruleSet`, `id` and `version` of the request are ignored.
struct Candidate {
    text: String,
    references: Vec<SchemaReference>,
}

impl TryFrom<SchemaRequest> for Candidate {
    type Error = ApiError;

    fn try_from(request: SchemaRequest) -> Result<Self, ApiError> {
        if let Some(kind) = request.schema_type.as_deref() {
            if !kind.eq_ignore_ascii_case("AVRO") {
                return Err(ApiError::InvalidSchema(format!("Invalid schema type {kind}: this registry supports AVRO only")));
            }
        }
        let text = request.schema.filter(|s| !s.trim().is_empty()).ok_or_else(|| ApiError::InvalidSchema("Empty schema".to_owned()))?;
        Ok(Candidate { text, references: request.references.unwrap_or_default() })
    }
}

fn candidate(headers: &HeaderMap, body: &[u8]) -> Result<Candidate, ApiError> {
    read_json::<SchemaRequest>(headers, body)?.try_into()
}

/// Parses a candidate with its references resolved; returns it with its identity fingerprint.
async fn prepare(conn: &mut PgConnection, candidate: &Candidate) -> Result<(ParsedSchema, String), ApiError> {
    let texts = store::resolve_reference_texts(conn, &candidate.references).await?;
    let parsed = compat::parse(&candidate.text, &texts).map_err(|e| ApiError::InvalidSchema(e.to_string()))?;
    let fingerprint = compat::fingerprint("AVRO", &parsed.normalized, &candidate.references);
    Ok((parsed, fingerprint))
}

fn parse_version(raw: &str) -> Result<VersionSpec, ApiError> {
    let trimmed = raw.trim();
    if trimmed.eq_ignore_ascii_case("latest") {
        return Ok(VersionSpec::Latest);
    }
    match trimmed.parse::<i64>() {
        Ok(-1) => Ok(VersionSpec::Latest),
        Ok(n) if n >= 1 => i32::try_from(n).map(VersionSpec::Number).map_err(|_| ApiError::InvalidVersion(raw.to_owned())),
        _ => Err(ApiError::InvalidVersion(raw.to_owned())),
    }
}

fn parse_id(raw: &str) -> Result<i32, ApiError> {
    raw.trim().parse::<i32>().map_err(|_| ApiError::SchemaNotFound(raw.to_owned()))
}

/// Confluent rejects subjects with control characters (42208).
fn validate_subject(subject: &str) -> Result<(), ApiError> {
    if subject.trim().is_empty() || subject.chars().any(char::is_control) {
        return Err(ApiError::InvalidSubject(subject.escape_debug().to_string()));
    }
    Ok(())
}

fn schema_type_field(schema_type: &str) -> Option<&str> {
    (schema_type != "AVRO").then_some(schema_type)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionBody<'a> {
    subject: &'a str,
    version: i32,
    id: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    references: Vec<SchemaReference>,
    schema: &'a str,
}

async fn version_body(conn: &mut PgConnection, v: &SubjectVersion) -> ApiResult {
    let references = store::references_of(conn, v.schema.id).await?;
    ok(&VersionBody {
        subject: &v.subject,
        version: v.version,
        id: v.schema.id,
        schema_type: schema_type_field(&v.schema.schema_type),
        references,
        schema: &v.schema.text,
    })
}

/// The version a path names, or 40401 / 40402 as Confluent tells them apart.
async fn find_version(
    conn: &mut PgConnection,
    subject: &str,
    spec: VersionSpec,
    include_deleted: bool,
) -> Result<SubjectVersion, ApiError> {
    if let Some(found) = store::version(conn, subject, spec, include_deleted).await? {
        return Ok(found);
    }
    if store::subject_exists(conn, subject, include_deleted).await? {
        Err(ApiError::VersionNotFound(spec.to_string()))
    } else {
        Err(ApiError::SubjectNotFound(subject.to_owned()))
    }
}

async fn root() -> ApiResult {
    ok(&json!({}))
}

/// Not a Confluent route: for probes, without credentials (see `auth`). 200 when PostgreSQL
/// answers.
async fn healthz(State(st): State<AppState>) -> ApiResult {
    sqlx::query("SELECT 1").execute(&st.pool).await?;
    ok(&json!({ "status": "ok" }))
}

async fn schema_types() -> ApiResult {
    ok(&["AVRO"])
}

async fn mode() -> ApiResult {
    ok(&json!({ "mode": "READWRITE" }))
}

async fn contexts() -> ApiResult {
    ok(&["."])
}

/// `?subject=` and `?deleted=` are accepted and change nothing: ids are global and a schema
/// stays readable by id after its versions are soft-deleted (Confluent's documented behaviour).
async fn schema_by_id(State(st): State<AppState>, P(id): P<String>) -> ApiResult {
    let mut conn = st.pool.acquire().await?;
    let id = parse_id(&id)?;
    let schema = store::schema_by_id(&mut conn, id).await?.ok_or_else(|| ApiError::SchemaNotFound(id.to_string()))?;
    let references = store::references_of(&mut conn, id).await?;
    let mut body = json!({ "schema": schema.text });
    if let Some(kind) = schema_type_field(&schema.schema_type) {
        body["schemaType"] = json!(kind);
    }
    if !references.is_empty() {
        body["references"] = json!(references);
    }
    ok(&body)
}

async fn raw_schema_by_id(State(st): State<AppState>, P(id): P<String>) -> ApiResult {
    let mut conn = st.pool.acquire().await?;
    let id = parse_id(&id)?;
    let schema = store::schema_by_id(&mut conn, id).await?.ok_or_else(|| ApiError::SchemaNotFound(id.to_string()))?;
    Ok(raw_schema(schema.text))
}

fn raw_schema(text: String) -> Response {
    (StatusCode::OK, [(CONTENT_TYPE, SR_CONTENT_TYPE)], text).into_response()
}

async fn usages_of_id(st: &AppState, id: &str, params: &Params) -> Result<Vec<(String, i32)>, ApiError> {
    let mut conn = st.pool.acquire().await?;
    let id = parse_id(id)?;
    if store::schema_by_id(&mut conn, id).await?.is_none() {
        return Err(ApiError::SchemaNotFound(id.to_string()));
    }
    store::usages(&mut conn, id, params.flag("deleted")).await
}

async fn subjects_of_id(State(st): State<AppState>, P(id): P<String>, params: Params) -> ApiResult {
    let mut subjects: Vec<String> = usages_of_id(&st, &id, &params).await?.into_iter().map(|(subject, _)| subject).collect();
    subjects.dedup();
    ok(&subjects)
}

async fn versions_of_id(State(st): State<AppState>, P(id): P<String>, params: Params) -> ApiResult {
    let usages: Vec<_> = usages_of_id(&st, &id, &params)
        .await?
        .into_iter()
        .map(|(subject, version)| json!({ "subject": subject, "version": version }))
        .collect();
    ok(&usages)
}

async fn list_subjects(State(st): State<AppState>, params: Params) -> ApiResult {
    let mut conn = st.pool.acquire().await?;
    let mut subjects = store::list_subjects(&mut conn, params.filter()).await?;
    if let Some(prefix) = params.get("subjectPrefix").filter(|p| *p != ":*:") {
        subjects.retain(|s| s.starts_with(prefix));
    }
    ok(&subjects)
}

async fn list_versions(State(st): State<AppState>, P(subject): P<String>, params: Params) -> ApiResult {
    let mut conn = st.pool.acquire().await?;
    let filter = params.filter();
    let versions = store::list_versions(&mut conn, &subject, filter).await?;
    if versions.is_empty() && !store::subject_exists(&mut conn, &subject, filter != Filter::Live).await? {
        return Err(ApiError::SubjectNotFound(subject));
    }
    ok(&versions)
}

async fn get_version(State(st): State<AppState>, P((subject, version)): P<(String, String)>, params: Params) -> ApiResult {
    let spec = parse_version(&version)?;
    let mut conn = st.pool.acquire().await?;
    let found = find_version(&mut conn, &subject, spec, params.flag("deleted")).await?;
    version_body(&mut conn, &found).await
}

async fn get_version_schema(State(st): State<AppState>, P((subject, version)): P<(String, String)>, params: Params) -> ApiResult {
    let spec = parse_version(&version)?;
    let mut conn = st.pool.acquire().await?;
    let found = find_version(&mut conn, &subject, spec, params.flag("deleted")).await?;
    Ok(raw_schema(found.schema.text))
}

async fn referenced_by(State(st): State<AppState>, P((subject, version)): P<(String, String)>) -> ApiResult {
    let spec = parse_version(&version)?;
    let mut conn = st.pool.acquire().await?;
    let found = find_version(&mut conn, &subject, spec, true).await?;
    ok(&store::referrers(&mut conn, &subject, &[found.version], false).await?)
}

/// Registers a schema under a subject: the existing id if the subject already has it live,
/// else a new version after the compatibility check, all under the subject's lock.
async fn register(State(st): State<AppState>, P(subject): P<String>, headers: HeaderMap, body: Bytes) -> ApiResult {
    validate_subject(&subject)?;
    let candidate = candidate(&headers, &body)?;
    let mut tx = st.pool.begin().await?;
    store::lock_subject(&mut tx, &subject).await?;
    let (parsed, fingerprint) = prepare(&mut tx, &candidate).await?;
    if let Some(existing) = store::find_in_subject(&mut tx, &subject, &fingerprint, false).await? {
        tx.commit().await?;
        return ok(&json!({ "id": existing.schema.id }));
    }
    let level = store::effective_level(&mut tx, &subject).await?;
    if level != CompatibilityLevel::None {
        let previous = store::versions(&mut tx, &subject, false).await?;
        let messages = incompatibilities(&mut tx, level, &parsed, &previous).await?;
        if !messages.is_empty() {
            return Err(ApiError::Incompatible(format!(
                "Schema being registered is incompatible with an earlier schema for subject \
                 \"{subject}\", details: [{}]",
                messages.join("; ")
            )));
        }
    }
    let id = store::upsert_schema(&mut tx, &fingerprint, &parsed, &candidate.text, &candidate.references).await?;
    let version = store::insert_version(&mut tx, &subject, id).await?;
    tx.commit().await?;
    tracing::info!(%subject, version, id, "registered schema");
    ok(&json!({ "id": id }))
}

/// Checks `parsed` against `previous` (live versions, oldest first) at `level`; one message per
/// failed check, naming the version it failed against.
async fn incompatibilities(
    conn: &mut PgConnection,
    level: CompatibilityLevel,
    parsed: &ParsedSchema,
    previous: &[SubjectVersion],
) -> Result<Vec<String>, ApiError> {
    let mut history = Vec::with_capacity(previous.len());
    for version in previous {
        history.push(store::parse_stored(conn, &version.schema).await?.schema);
    }
    let history_refs: Vec<_> = history.iter().collect();
    Ok(compat::check(level, &parsed.schema, &history_refs)
        .into_iter()
        .map(|problem| {
            let version = previous.get(problem.previous_index).map_or(0, |v| v.version);
            let direction = match problem.direction {
                Direction::Backward => "the new schema cannot read data written with",
                Direction::Forward => "data written with the new schema cannot be read by",
            };
            format!(
                "{{compatibility: '{level}', oldSchemaVersion: {version}}} {direction} version \
                 {version}: {}",
                problem.reason
            )
        })
        .collect())
}

async fn lookup(State(st): State<AppState>, P(subject): P<String>, params: Params, headers: HeaderMap, body: Bytes) -> ApiResult {
    let candidate = candidate(&headers, &body)?;
    let include_deleted = params.flag("deleted");
    let mut conn = st.pool.acquire().await?;
    let (_, fingerprint) = prepare(&mut conn, &candidate).await?;
    match store::find_in_subject(&mut conn, &subject, &fingerprint, include_deleted).await? {
        Some(found) => version_body(&mut conn, &found).await,
        None if store::subject_exists(&mut conn, &subject, include_deleted).await? => Err(ApiError::SchemaNotInSubject),
        None => Err(ApiError::SubjectNotFound(subject)),
    }
}

/// Refuses to delete versions that live schemas (or, for a hard delete, any schema) reference.
async fn ensure_unreferenced(conn: &mut PgConnection, subject: &str, versions: &[i32], permanent: bool) -> Result<(), ApiError> {
    let referrers = store::referrers(conn, subject, versions, permanent).await?;
    if referrers.is_empty() {
        return Ok(());
    }
    Err(ApiError::ReferenceExists(format!(
        "One or more references exist to the schema {{subject={subject}, versions={versions:?}}}: \
         referenced by schema ids {referrers:?}"
    )))
}

/// Soft delete (hides the versions, drops the subject's config) or, after that, a permanent one.
async fn delete_subject(State(st): State<AppState>, P(subject): P<String>, params: Params) -> ApiResult {
    let permanent = params.flag("permanent");
    let mut tx = st.pool.begin().await?;
    store::lock_subject(&mut tx, &subject).await?;
    let all = store::versions(&mut tx, &subject, true).await?;
    if all.is_empty() {
        return Err(ApiError::SubjectNotFound(subject));
    }
    let live: Vec<i32> = all.iter().filter(|v| !v.deleted).map(|v| v.version).collect();
    let deleted_versions = if permanent {
        if !live.is_empty() {
            return Err(ApiError::SubjectNotSoftDeleted(subject));
        }
        let versions: Vec<i32> = all.iter().map(|v| v.version).collect();
        ensure_unreferenced(&mut tx, &subject, &versions, true).await?;
        store::hard_delete(&mut tx, &subject, &versions).await?;
        versions
    } else {
        if live.is_empty() {
            return Err(ApiError::SubjectSoftDeleted(subject));
        }
        ensure_unreferenced(&mut tx, &subject, &live, false).await?;
        store::soft_delete(&mut tx, &subject, &live).await?;
        store::clear_level(&mut tx, Some(&subject)).await?;
        live
    };
    tx.commit().await?;
    tracing::info!(%subject, permanent, versions = ?deleted_versions, "deleted subject");
    ok(&deleted_versions)
}

async fn delete_version(State(st): State<AppState>, P((subject, version)): P<(String, String)>, params: Params) -> ApiResult {
    let spec = parse_version(&version)?;
    let permanent = params.flag("permanent");
    let mut tx = st.pool.begin().await?;
    store::lock_subject(&mut tx, &subject).await?;
    let found = find_version(&mut tx, &subject, spec, true).await?;
    if permanent && !found.deleted {
        return Err(ApiError::VersionNotSoftDeleted(subject, found.version));
    }
    if !permanent && found.deleted {
        return Err(ApiError::VersionSoftDeleted(subject, found.version));
    }
    ensure_unreferenced(&mut tx, &subject, &[found.version], permanent).await?;
    if permanent {
        store::hard_delete(&mut tx, &subject, &[found.version]).await?;
    } else {
        store::soft_delete(&mut tx, &subject, &[found.version]).await?;
    }
    tx.commit().await?;
    tracing::info!(%subject, version = found.version, permanent, "deleted version");
    ok(&found.version)
}

/// The compatibility answer, with the reasons when `verbose`. An invalid candidate is an error,
/// or with `verbose` an incompatible answer carrying the reason, as in Confluent.
async fn compatibility_answer(
    conn: &mut PgConnection,
    subject: &str,
    candidate: Result<Candidate, ApiError>,
    previous: &[SubjectVersion],
    verbose: bool,
) -> ApiResult {
    let prepared = match candidate {
        Ok(candidate) => prepare(conn, &candidate).await,
        Err(e) => Err(e),
    };
    let messages = match prepared {
        Ok((parsed, _)) => {
            let level = store::effective_level(conn, subject).await?;
            incompatibilities(conn, level, &parsed, previous).await?
        }
        Err(ApiError::InvalidSchema(message)) if verbose => vec![message],
        Err(e) => return Err(e),
    };
    if verbose {
        ok(&json!({ "is_compatible": messages.is_empty(), "messages": messages }))
    } else {
        ok(&json!({ "is_compatible": messages.is_empty() }))
    }
}

async fn check_against_all(
    State(st): State<AppState>,
    P(subject): P<String>,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let candidate = candidate(&headers, &body);
    let mut conn = st.pool.acquire().await?;
    let previous = store::versions(&mut conn, &subject, false).await?;
    compatibility_answer(&mut conn, &subject, candidate, &previous, params.flag("verbose")).await
}

/// Against one version, at the subject's level; `latest` of an unknown subject is compatible.
async fn check_against_version(
    State(st): State<AppState>,
    P((subject, version)): P<(String, String)>,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let spec = parse_version(&version)?;
    let candidate = candidate(&headers, &body);
    let mut conn = st.pool.acquire().await?;
    let previous = match spec {
        VersionSpec::Latest => store::version(&mut conn, &subject, spec, false).await?.into_iter().collect(),
        VersionSpec::Number(_) => vec![find_version(&mut conn, &subject, spec, false).await?],
    };
    compatibility_answer(&mut conn, &subject, candidate, &previous, params.flag("verbose")).await
}

#[derive(Deserialize)]
struct ConfigRequest {
    compatibility: Option<String>,
}

fn requested_level(headers: &HeaderMap, body: &[u8]) -> Result<CompatibilityLevel, ApiError> {
    let request: ConfigRequest = read_json(headers, body)?;
    let raw = request.compatibility.unwrap_or_default();
    Ok(raw.parse::<CompatibilityLevel>()?)
}

async fn get_global_config(State(st): State<AppState>) -> ApiResult {
    let mut conn = st.pool.acquire().await?;
    let level = store::global_level(&mut conn).await?;
    ok(&json!({ "compatibilityLevel": level.as_str() }))
}

async fn put_global_config(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let level = requested_level(&headers, &body)?;
    let mut conn = st.pool.acquire().await?;
    store::set_level(&mut conn, None, level).await?;
    ok(&json!({ "compatibility": level.as_str() }))
}

/// Resets the global level to the default (BACKWARD); returns the level it replaced.
async fn delete_global_config(State(st): State<AppState>) -> ApiResult {
    let mut conn = st.pool.acquire().await?;
    let previous = store::global_level(&mut conn).await?;
    store::clear_level(&mut conn, None).await?;
    ok(&json!({ "compatibilityLevel": previous.as_str() }))
}

async fn get_subject_config(State(st): State<AppState>, P(subject): P<String>, params: Params) -> ApiResult {
    let mut conn = st.pool.acquire().await?;
    let level = match store::subject_level(&mut conn, &subject).await? {
        Some(level) => level,
        None if params.flag("defaultToGlobal") => store::global_level(&mut conn).await?,
        None => return Err(ApiError::SubjectConfigNotFound(subject)),
    };
    ok(&json!({ "compatibilityLevel": level.as_str() }))
}

async fn put_subject_config(State(st): State<AppState>, P(subject): P<String>, headers: HeaderMap, body: Bytes) -> ApiResult {
    validate_subject(&subject)?;
    let level = requested_level(&headers, &body)?;
    let mut tx = st.pool.begin().await?;
    store::lock_subject(&mut tx, &subject).await?;
    store::set_level(&mut tx, Some(&subject), level).await?;
    tx.commit().await?;
    ok(&json!({ "compatibility": level.as_str() }))
}

async fn delete_subject_config(State(st): State<AppState>, P(subject): P<String>) -> ApiResult {
    let mut tx = st.pool.begin().await?;
    store::lock_subject(&mut tx, &subject).await?;
    let Some(previous) = store::subject_level(&mut tx, &subject).await? else {
        return Err(ApiError::SubjectNotFound(subject));
    };
    store::clear_level(&mut tx, Some(&subject)).await?;
    tx.commit().await?;
    ok(&json!({ "compatibilityLevel": previous.as_str() }))
}
