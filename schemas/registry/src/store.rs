//! PostgreSQL access of the registry (tables of `migrations/0002_registry.sql`). Every function
//! takes a connection, so the same query runs on a pooled connection or inside the transaction
//! of a write, which first takes the subject's advisory lock ([`lock_subject`]).

use std::collections::HashSet;
use std::fmt;

use sqlx::PgConnection;

use super::compat::{self, CompatibilityLevel, ParsedSchema, SchemaReference};
use super::error::ApiError;

/// Advisory lock class of per-subject locks (the key is `hashtext(subject)`).
const SUBJECT_LOCK_CLASS: i32 = 0x7667_5301;
/// Advisory lock class guarding the lifetime of `registry_schemas` rows: registrations that
/// reuse or add a schema row hold it shared, permanent deletes that drop orphaned rows hold it
/// exclusively, so a row is never dropped under a registration that is about to use it.
const SCHEMA_ROWS_LOCK_CLASS: i32 = 0x7667_5302;
/// Bound on the transitive references of one schema.
const MAX_REFERENCES: usize = 1_000;
/// Key of the global row in `registry_config`.
const GLOBAL: &str = "";

/// `latest` (or `-1`) or an explicit version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSpec {
    Latest,
    Number(i32),
}

impl fmt::Display for VersionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionSpec::Latest => f.write_str("latest"),
            VersionSpec::Number(n) => write!(f, "{n}"),
        }
    }
}

/// Which versions (or subjects) a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Live,
    IncludeDeleted,
    DeletedOnly,
}

#[derive(Debug, Clone)]
pub struct StoredSchema {
    pub id: i32,
    pub schema_type: String,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: i32,
    pub deleted: bool,
    pub schema: StoredSchema,
}

type VersionRow = (String, i32, bool, i32, String, String);

fn subject_version(row: VersionRow) -> SubjectVersion {
    let (subject, version, deleted, id, schema_type, text) = row;
    SubjectVersion { subject, version, deleted, schema: StoredSchema { id, schema_type, text } }
}

const VERSION_COLUMNS: &str = "v.subject, v.version, v.deleted, s.id, s.schema_type, s.schema_text \
     FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id";

pub async fn lock_subject(conn: &mut PgConnection, subject: &str) -> Result<(), ApiError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))").bind(SUBJECT_LOCK_CLASS).bind(subject).execute(conn).await?;
    Ok(())
}

async fn lock_schema_rows(conn: &mut PgConnection, exclusive: bool) -> Result<(), ApiError> {
    let sql = if exclusive { "SELECT pg_advisory_xact_lock($1, 0)" } else { "SELECT pg_advisory_xact_lock_shared($1, 0)" };
    sqlx::query(sql).bind(SCHEMA_ROWS_LOCK_CLASS).execute(conn).await?;
    Ok(())
}

pub async fn subject_exists(conn: &mut PgConnection, subject: &str, include_deleted: bool) -> Result<bool, ApiError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM registry_subject_versions \
         WHERE subject = $1 AND ($2 OR NOT deleted))",
    )
    .bind(subject)
    .bind(include_deleted)
    .fetch_one(conn)
    .await?;
    Ok(exists)
}

pub async fn list_subjects(conn: &mut PgConnection, filter: Filter) -> Result<Vec<String>, ApiError> {
    let having = match filter {
        Filter::Live => "bool_or(NOT deleted)",
        Filter::IncludeDeleted => "true",
        Filter::DeletedOnly => "NOT bool_or(NOT deleted)",
    };
    let sql = format!(
        "SELECT subject FROM registry_subject_versions GROUP BY subject HAVING {having} \
         ORDER BY subject"
    );
    Ok(sqlx::query_scalar(&sql).fetch_all(conn).await?)
}

pub async fn list_versions(conn: &mut PgConnection, subject: &str, filter: Filter) -> Result<Vec<i32>, ApiError> {
    let condition = match filter {
        Filter::Live => "NOT deleted",
        Filter::IncludeDeleted => "true",
        Filter::DeletedOnly => "deleted",
    };
    let sql = format!(
        "SELECT version FROM registry_subject_versions WHERE subject = $1 AND {condition} \
         ORDER BY version"
    );
    Ok(sqlx::query_scalar(&sql).bind(subject).fetch_all(conn).await?)
}

/// One version of a subject; `Latest` is the highest version matching `include_deleted`.
pub async fn version(
    conn: &mut PgConnection,
    subject: &str,
    spec: VersionSpec,
    include_deleted: bool,
) -> Result<Option<SubjectVersion>, ApiError> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} WHERE v.subject = $1 AND ($2 OR NOT v.deleted) \
         AND ($3::int IS NULL OR v.version = $3) ORDER BY v.version DESC LIMIT 1"
    );
    let number = match spec {
        VersionSpec::Latest => None,
        VersionSpec::Number(n) => Some(n),
    };
    let row: Option<VersionRow> = sqlx::query_as(&sql).bind(subject).bind(include_deleted).bind(number).fetch_optional(conn).await?;
    Ok(row.map(subject_version))
}

/// All versions of a subject in version order.
pub async fn versions(conn: &mut PgConnection, subject: &str, include_deleted: bool) -> Result<Vec<SubjectVersion>, ApiError> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} WHERE v.subject = $1 AND ($2 OR NOT v.deleted) \
         ORDER BY v.version"
    );
    let rows: Vec<VersionRow> = sqlx::query_as(&sql).bind(subject).bind(include_deleted).fetch_all(conn).await?;
    Ok(rows.into_iter().map(subject_version).collect())
}

/// The version of `subject` holding the schema with this fingerprint, live ones first.
pub async fn find_in_subject(
    conn: &mut PgConnection,
    subject: &str,
    fingerprint: &str,
    include_deleted: bool,
) -> Result<Option<SubjectVersion>, ApiError> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} WHERE v.subject = $1 AND s.fingerprint = $2 \
         AND ($3 OR NOT v.deleted) ORDER BY v.deleted, v.version DESC LIMIT 1"
    );
    let row: Option<VersionRow> = sqlx::query_as(&sql).bind(subject).bind(fingerprint).bind(include_deleted).fetch_optional(conn).await?;
    Ok(row.map(subject_version))
}

pub async fn schema_by_id(conn: &mut PgConnection, id: i32) -> Result<Option<StoredSchema>, ApiError> {
    let row: Option<(i32, String, String)> =
        sqlx::query_as("SELECT id, schema_type, schema_text FROM registry_schemas WHERE id = $1").bind(id).fetch_optional(conn).await?;
    Ok(row.map(|(id, schema_type, text)| StoredSchema { id, schema_type, text }))
}

/// The (subject, version) pairs that use a schema id.
pub async fn usages(conn: &mut PgConnection, schema_id: i32, include_deleted: bool) -> Result<Vec<(String, i32)>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT subject, version FROM registry_subject_versions \
         WHERE schema_id = $1 AND ($2 OR NOT deleted) ORDER BY subject, version",
    )
    .bind(schema_id)
    .bind(include_deleted)
    .fetch_all(conn)
    .await?)
}

pub async fn references_of(conn: &mut PgConnection, schema_id: i32) -> Result<Vec<SchemaReference>, ApiError> {
    let rows: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT name, subject, version FROM registry_schema_references \
         WHERE schema_id = $1 ORDER BY position",
    )
    .bind(schema_id)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(name, subject, version)| SchemaReference { name, subject, version }).collect())
}

/// The schema texts that `references` stand for, transitively. A reference to a version that
/// does not exist is an invalid schema (42201), as in Confluent.
pub async fn resolve_reference_texts(conn: &mut PgConnection, references: &[SchemaReference]) -> Result<Vec<String>, ApiError> {
    let mut texts = Vec::new();
    let mut seen = HashSet::new();
    let mut pending: Vec<SchemaReference> = references.iter().rev().cloned().collect();
    while let Some(reference) = pending.pop() {
        if !seen.insert((reference.subject.clone(), reference.version)) {
            continue;
        }
        if seen.len() > MAX_REFERENCES {
            return Err(ApiError::InvalidSchema(format!("Invalid schema: more than {MAX_REFERENCES} transitive references")));
        }
        let target = version(conn, &reference.subject, VersionSpec::Number(reference.version), true).await?;
        let Some(target) = target else {
            return Err(ApiError::InvalidSchema(format!(
                "Invalid schema: reference '{}' to subject '{}' version {} not found",
                reference.name, reference.subject, reference.version
            )));
        };
        let nested = references_of(conn, target.schema.id).await?;
        pending.extend(nested.into_iter().rev());
        texts.push(target.schema.text);
    }
    Ok(texts)
}

/// Parses a schema that is already stored (with its references).
pub async fn parse_stored(conn: &mut PgConnection, schema: &StoredSchema) -> Result<ParsedSchema, ApiError> {
    let references = references_of(conn, schema.id).await?;
    let texts = resolve_reference_texts(conn, &references).await.map_err(|e| match e {
        ApiError::InvalidSchema(message) => ApiError::Internal(format!("stored schema {} has a broken reference: {message}", schema.id)),
        other => other,
    })?;
    compat::parse(&schema.text, &texts).map_err(|e| ApiError::Internal(format!("stored schema {} no longer parses: {e}", schema.id)))
}

/// The id of the schema with this fingerprint, inserting it (and its references) if new.
pub async fn upsert_schema(
    conn: &mut PgConnection,
    fingerprint: &str,
    parsed: &ParsedSchema,
    text: &str,
    references: &[SchemaReference],
) -> Result<i32, ApiError> {
    lock_schema_rows(conn, false).await?;
    let inserted: Option<i32> = sqlx::query_scalar(
        "INSERT INTO registry_schemas (schema_type, fingerprint, canonical_form, schema_text) \
         VALUES ('AVRO', $1, $2, $3) ON CONFLICT (fingerprint) DO NOTHING RETURNING id",
    )
    .bind(fingerprint)
    .bind(&parsed.canonical_form)
    .bind(text)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = inserted else {
        let existing: i32 =
            sqlx::query_scalar("SELECT id FROM registry_schemas WHERE fingerprint = $1").bind(fingerprint).fetch_one(&mut *conn).await?;
        return Ok(existing);
    };
    for (position, reference) in references.iter().enumerate() {
        sqlx::query(
            "INSERT INTO registry_schema_references (schema_id, position, name, subject, version) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(i32::try_from(position).unwrap_or(i32::MAX))
        .bind(&reference.name)
        .bind(&reference.subject)
        .bind(reference.version)
        .execute(&mut *conn)
        .await?;
    }
    Ok(id)
}

/// Adds the next version of `subject` (after every existing one, deleted or not). The caller
/// holds the subject lock.
pub async fn insert_version(conn: &mut PgConnection, subject: &str, schema_id: i32) -> Result<i32, ApiError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO registry_subject_versions (subject, version, schema_id) \
         SELECT $1, COALESCE(MAX(version), 0) + 1, $2 FROM registry_subject_versions \
         WHERE subject = $1 RETURNING version",
    )
    .bind(subject)
    .bind(schema_id)
    .fetch_one(conn)
    .await?)
}

/// Ids of schemas that reference `subject` at one of `versions` and are still in use (by a live
/// version, or by any version when `include_deleted`).
pub async fn referrers(conn: &mut PgConnection, subject: &str, versions: &[i32], include_deleted: bool) -> Result<Vec<i32>, ApiError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT r.schema_id FROM registry_schema_references r \
         WHERE r.subject = $1 AND r.version = ANY($2) AND EXISTS ( \
             SELECT 1 FROM registry_subject_versions v \
             WHERE v.schema_id = r.schema_id AND ($3 OR NOT v.deleted)) \
         ORDER BY 1",
    )
    .bind(subject)
    .bind(versions)
    .bind(include_deleted)
    .fetch_all(conn)
    .await?)
}

pub async fn soft_delete(conn: &mut PgConnection, subject: &str, versions: &[i32]) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE registry_subject_versions SET deleted = true \
         WHERE subject = $1 AND version = ANY($2)",
    )
    .bind(subject)
    .bind(versions)
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes versions for good, then the schemas no version uses any more (their ids stop
/// resolving, as after a Confluent hard delete).
pub async fn hard_delete(conn: &mut PgConnection, subject: &str, versions: &[i32]) -> Result<(), ApiError> {
    lock_schema_rows(conn, true).await?;
    let schema_ids: Vec<i32> = sqlx::query_scalar(
        "DELETE FROM registry_subject_versions WHERE subject = $1 AND version = ANY($2) \
         RETURNING schema_id",
    )
    .bind(subject)
    .bind(versions)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM registry_schemas s WHERE s.id = ANY($1) AND NOT EXISTS ( \
             SELECT 1 FROM registry_subject_versions v WHERE v.schema_id = s.id)",
    )
    .bind(&schema_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn config_row(conn: &mut PgConnection, key: &str) -> Result<Option<CompatibilityLevel>, ApiError> {
    let stored: Option<String> =
        sqlx::query_scalar("SELECT compatibility FROM registry_config WHERE subject = $1").bind(key).fetch_optional(conn).await?;
    stored.map(|s| s.parse::<CompatibilityLevel>().map_err(|e| ApiError::Internal(format!("stored config: {e}")))).transpose()
}

/// The global level (BACKWARD unless set).
pub async fn global_level(conn: &mut PgConnection) -> Result<CompatibilityLevel, ApiError> {
    Ok(config_row(conn, GLOBAL).await?.unwrap_or_default())
}

/// The subject's own level, if it has one.
pub async fn subject_level(conn: &mut PgConnection, subject: &str) -> Result<Option<CompatibilityLevel>, ApiError> {
    config_row(conn, subject).await
}

/// The level that applies to `subject`: its own, else the global one.
pub async fn effective_level(conn: &mut PgConnection, subject: &str) -> Result<CompatibilityLevel, ApiError> {
    match subject_level(conn, subject).await? {
        Some(level) => Ok(level),
        None => global_level(conn).await,
    }
}

/// Sets the subject's level, or the global one when `subject` is `None`.
pub async fn set_level(conn: &mut PgConnection, subject: Option<&str>, level: CompatibilityLevel) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2) \
         ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility, \
         updated_at = now()",
    )
    .bind(subject.unwrap_or(GLOBAL))
    .bind(level.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes the subject's level (or the global one); returns whether there was one.
pub async fn clear_level(conn: &mut PgConnection, subject: Option<&str>) -> Result<bool, ApiError> {
    let result = sqlx::query("DELETE FROM registry_config WHERE subject = $1").bind(subject.unwrap_or(GLOBAL)).execute(conn).await?;
    Ok(result.rows_affected() > 0)
}
