//! One transaction per batch: the rows (newest version wins), the users' progress and the
//! consumed offsets commit together or not at all. Upserts are batched with `UNNEST` arrays,
//! one statement per table, not one per row.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use vitals_schemas::vouch;

use crate::{progress, Progress, Projection, Row};

/// A row the batch actually changed (its version was newer than the stored one): what the
/// realtime push announces.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub projection: Projection,
    pub user_id: String,
    pub entity_id: String,
    pub version: (i64, i64),
    pub deleted: bool,
    pub body: serde_json::Value,
    /// The `traceparent` of the sink's span that applied it (the upload's trace), if traced.
    pub trace: Option<String>,
}

/// What one consumed batch writes.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<Row>,
    /// What every consumed record (marker or row) says of its user's progress, in consumption
    /// order ([`crate::progress::fold`]).
    pub progress: Vec<Progress>,
    /// (topic, partition) → next offset to consume.
    pub offsets: BTreeMap<(String, i32), i64>,
    /// (user, topic, partition) → last offset of a row the chained processors consume
    /// (session_impact's output): what product_impact's freshness is measured against.
    pub chained: BTreeMap<(String, String, i32), i64>,
    /// Dead letters consumed from the dead-letter topic: what freshness reports as `degraded`.
    pub dead_letters: Vec<DeadRow>,
    /// The rows read of interval attempts whose markers are still to come ([`vouch`]).
    pub vouches: vouch::Changes,
}

/// One dead letter as freshness sees it: whose, which projection it was withheld from, why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadRow {
    pub dlq_topic: String,
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub user_id: String,
    pub projection: String,
    pub stage: String,
    pub code: String,
    pub reason: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// Applies `batch` for sink `sink` in one transaction; returns the rows that changed.
pub async fn apply(pool: &PgPool, sink: &str, batch: &Batch) -> Result<Vec<Applied>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Within a batch the same key may come several times: only its newest version is offered.
    let mut newest: BTreeMap<(Projection, &str, &str), &Row> = BTreeMap::new();
    for r in &batch.rows {
        let k = (r.projection, r.user_id.as_str(), r.entity_id.as_str());
        if newest.get(&k).is_none_or(|held| held.version < r.version) {
            newest.insert(k, r);
        }
    }
    let mut by_projection: BTreeMap<Projection, Vec<&Row>> = BTreeMap::new();
    for ((p, _, _), r) in &newest {
        by_projection.entry(*p).or_default().push(*r);
    }
    let mut applied = Vec::new();
    // One statement per table, in name order (every sink instance locks tables in one order).
    for (p, rows) in by_projection {
        applied.extend(upsert_rows(&mut tx, p, &rows).await?);
    }
    upsert_progress(&mut tx, &batch.progress).await?;
    for d in &batch.dead_letters {
        // A marker announces its dead letters before the sink reads them from the dead-letter
        // topic (source unknown: offset -1); the dead letter itself then fills the row in.
        let sql = if d.source_offset < 0 {
            "INSERT INTO projection_dead_letters (dlq_topic, dlq_partition, dlq_offset, user_id, projection, stage, code, reason, source_topic, source_partition, source_offset)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING"
        } else {
            "INSERT INTO projection_dead_letters (dlq_topic, dlq_partition, dlq_offset, user_id, projection, stage, code, reason, source_topic, source_partition, source_offset)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO UPDATE SET user_id = EXCLUDED.user_id, projection = EXCLUDED.projection,
                 stage = EXCLUDED.stage, code = EXCLUDED.code, reason = EXCLUDED.reason, source_topic = EXCLUDED.source_topic,
                 source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset"
        };
        sqlx::query(sql)
            .bind(&d.dlq_topic)
            .bind(d.dlq_partition)
            .bind(d.dlq_offset)
            .bind(&d.user_id)
            .bind(&d.projection)
            .bind(&d.stage)
            .bind(&d.code)
            .bind(&d.reason)
            .bind(&d.source_topic)
            .bind(d.source_partition)
            .bind(d.source_offset)
            .execute(&mut *tx)
            .await?;
    }
    if !batch.vouches.cleared.is_empty() {
        let (topics, parts, users) = unzip3(batch.vouches.cleared.iter().map(|(t, p, u)| (t.as_str(), *p, u.as_str())));
        sqlx::query(
            "DELETE FROM sink_vouches WHERE sink = $1 AND (topic, partition, user_id) IN (SELECT * FROM UNNEST($2::text[], $3::int4[], $4::text[]))",
        )
        .bind(sink)
        .bind(&topics)
        .bind(&parts)
        .bind(&users)
        .execute(&mut *tx)
        .await?;
    }
    if !batch.vouches.entries.is_empty() {
        let (mut topics, mut parts, mut users, mut intervals, mut rows) = (vec![], vec![], vec![], vec![], vec![]);
        for ((t, p, u), i, n) in &batch.vouches.entries {
            topics.push(t.as_str());
            parts.push(*p);
            users.push(u.as_str());
            intervals.push(i.as_str());
            rows.push(*n as i64);
        }
        sqlx::query(
            "INSERT INTO sink_vouches (sink, topic, partition, user_id, interval, rows)
             SELECT $1, * FROM UNNEST($2::text[], $3::int4[], $4::text[], $5::text[], $6::int8[])
             ON CONFLICT (sink, topic, partition, user_id, interval) DO UPDATE SET rows = EXCLUDED.rows",
        )
        .bind(sink)
        .bind(&topics)
        .bind(&parts)
        .bind(&users)
        .bind(&intervals)
        .bind(&rows)
        .execute(&mut *tx)
        .await?;
    }
    if !batch.chained.is_empty() {
        let (mut users, mut topics, mut parts, mut offs) = (vec![], vec![], vec![], vec![]);
        for ((u, t, p), o) in &batch.chained {
            users.push(u.as_str());
            topics.push(t.as_str());
            parts.push(*p);
            offs.push(*o);
        }
        sqlx::query(
            "INSERT INTO projection_inputs (user_id, topic, partition, last_offset)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[])
             ON CONFLICT (user_id, topic, partition) DO UPDATE
             SET last_offset = GREATEST(projection_inputs.last_offset, EXCLUDED.last_offset), updated_at = now()",
        )
        .bind(&users)
        .bind(&topics)
        .bind(&parts)
        .bind(&offs)
        .execute(&mut *tx)
        .await?;
    }
    if !batch.offsets.is_empty() {
        let (topics, parts, offs) = unzip3(batch.offsets.iter().map(|((t, p), o)| (t.as_str(), *p, *o)));
        // GREATEST: a position only moves forward (a zombie's older commit cannot move it back;
        // whoever committed a position also committed every row before it).
        sqlx::query(
            "INSERT INTO sink_offsets (sink, topic, partition, next_offset)
             SELECT $1, t, p, o FROM UNNEST($2::text[], $3::int4[], $4::int8[]) AS x(t, p, o)
             ON CONFLICT (sink, topic, partition) DO UPDATE
             SET next_offset = GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset), updated_at = now()",
        )
        .bind(sink)
        .bind(&topics)
        .bind(&parts)
        .bind(&offs)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// Creates the table of each projection that has none yet (Kafka Connect JDBC's `auto.create`):
/// every projection table has the same columns (the descriptor's key, group, day and time
/// fields fill `entity_id`, `metric`, `day`, `at_ms`; the record itself is `body`), with the
/// indexes its reads use. Idempotent, and safe with several sinks starting at once.
pub async fn ensure_tables(pool: &PgPool, projections: &[Projection]) -> Result<(), TableError> {
    for p in projections {
        let d = p.descriptor;
        // The name is a checked identifier ([`vitals_schemas::projection::Descriptor::check`]).
        if let Err(e) = d.check() {
            return Err(TableError::Breaking(e));
        }
        let t = p.table();
        let mut tx = pool.begin().await?;
        // Serialises concurrent creators: `CREATE TABLE IF NOT EXISTS` alone can still fail on
        // the catalog's unique index when two run at once.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&t).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                user_id        TEXT        NOT NULL,
                entity_id      TEXT        NOT NULL,
                metric         TEXT,
                day            DATE,
                at_ms          BIGINT,
                version_epoch  BIGINT      NOT NULL,
                version_seq    BIGINT      NOT NULL,
                deleted        BOOLEAN     NOT NULL,
                body           JSONB       NOT NULL,
                source_offsets JSONB       NOT NULL,
                updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (user_id, entity_id))"
        ))
        .execute(&mut *tx)
        .await?;
        let index = match (d.group, d.order) {
            (Some(_), vitals_schemas::projection::Order::Day) => Some(("range", "user_id, metric, day")),
            (_, vitals_schemas::projection::Order::Day) => Some(("range", "user_id, day")),
            (_, vitals_schemas::projection::Order::At) => Some(("start", "user_id, at_ms")),
            (_, vitals_schemas::projection::Order::Key) => None,
        };
        if let Some((suffix, columns)) = index {
            sqlx::query(&format!("CREATE INDEX IF NOT EXISTS {t}_{suffix} ON {t} ({columns})")).execute(&mut *tx).await?;
        }
        evolve(&mut tx, p, &t).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Why a projection table cannot be made what its descriptor says.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// A change of the descriptor that the live table cannot take (not retried: it stays so).
    #[error("{0}")]
    Breaking(String),
}

/// Kafka Connect JDBC's `auto.create` / `auto.evolve`, for the typed columns
/// ([`vitals_schemas::projection::Descriptor::columns`], stored columns generated from `body`):
/// a field new to the descriptor is added (and computed for every existing row: PostgreSQL
/// rewrites the table); a field that widened (int → long → double) is regenerated; a column of
/// a field the descriptor no longer has stays (nothing is dropped). Any other change of a
/// column's type, or a column of that name that is not generated from `body`, is refused,
/// naming the column.
async fn evolve(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, p: &Projection, t: &str) -> Result<(), TableError> {
    let existing: BTreeMap<String, (String, String)> = sqlx::query_as::<_, (String, String, String)>(
        "SELECT column_name::text, data_type::text, is_generated::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
    )
    .bind(t)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|(c, ty, g)| (c, (ty, g)))
    .collect();
    // Every change in one ALTER TABLE: one rewrite of the table, not one per column, under a
    // bounded wait for its lock (a timeout is retried like any outage).
    let (mut changes, mut notes) = (Vec::new(), Vec::new());
    for c in p.descriptor.columns() {
        let add = format!("ADD COLUMN \"{}\" {} GENERATED ALWAYS AS ({}) STORED", c.name, c.sql_type, c.expr());
        match existing.get(&c.name) {
            None => {
                changes.push(add);
                notes.push(format!("added {} {}", c.name, c.sql_type));
            }
            Some((ty, generated)) if generated == "ALWAYS" && ty == c.sql_type => {}
            Some((ty, generated)) if generated == "ALWAYS" && c.widens(ty) => {
                changes.push(format!("DROP COLUMN \"{}\"", c.name));
                changes.push(add);
                notes.push(format!("widened {} {ty} -> {}", c.name, c.sql_type));
            }
            // Wider than the descriptor says (a newer build widened it; this one is older): it
            // holds every value this build writes.
            Some((ty, generated))
                if generated == "ALWAYS"
                    && vitals_schemas::projection::Column { sql_type: ty_static(ty), ..c.clone() }.widens(c.sql_type) => {}
            Some((ty, generated)) => {
                let what = if generated == "ALWAYS" {
                    format!("is {ty}, the field `{}` is now {}", c.field, c.sql_type)
                } else {
                    format!("is a {ty} column not generated from body (added by hand?)")
                };
                return Err(TableError::Breaking(format!(
                    "{t}.{}: the column {what}: a breaking change the sink does not apply to a live table. Replay the processor as a new version (`vitals replay {} --as <v>`, a new table with the new shape) and promote it, or fix the column",
                    c.name,
                    p.name()
                )));
            }
        }
    }
    if changes.is_empty() {
        return Ok(());
    }
    sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut **tx).await?;
    if let Err(e) = sqlx::query(&format!("ALTER TABLE {t} {}", changes.join(", "))).execute(&mut **tx).await {
        // What fails the same way on every retry is said at once: a value of an existing row
        // the new column cannot take (class 22), a column name taken twice (42701), a view or
        // index of someone else's depending on a column to widen (2BP01).
        let code = match &e {
            sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
            _ => None,
        };
        if code.as_deref().is_some_and(|c| c.starts_with("22") || c == "42701" || c == "2BP01") {
            return Err(TableError::Breaking(format!(
                "{t}: evolving the table ({}) failed: {e}; replay the processor as a new version (`vitals replay {} --as <v>`) instead",
                notes.join(", "),
                p.name()
            )));
        }
        return Err(e.into());
    }
    tracing::info!(table = t, changes = %notes.join(", "), "evolved the table's typed columns");
    Ok(())
}

/// The `information_schema` spelling of a column type as one of [`Column::sql_type`]'s.
fn ty_static(ty: &str) -> &'static str {
    ["boolean", "integer", "bigint", "double precision", "text", "jsonb"].into_iter().find(|t| *t == ty).unwrap_or("unknown")
}

/// Whether PostgreSQL refused the data itself (SQLSTATE class 22, data exception: a NUL in
/// text, a value out of range; class 54, program limit exceeded: an index row too large). Such a
/// batch fails the same way on every retry: [`refused_rows`] finds the rows at fault.
pub fn is_refused_data(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("22") || c.starts_with("54")),
        _ => false,
    }
}

/// The indexes (into `rows`) of the rows PostgreSQL refuses on their own ([`is_refused_data`]),
/// with its message: each is tried alone under a savepoint, in one transaction that is rolled
/// back (nothing is written). Any other error is returned (the caller retries).
pub async fn refused_rows(pool: &PgPool, rows: &[Row]) -> Result<Vec<(usize, String)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut refused = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        sqlx::query("SAVEPOINT row").execute(&mut *tx).await?;
        match upsert_rows(&mut tx, r.projection, &[r]).await {
            Ok(_) => {
                sqlx::query("RELEASE SAVEPOINT row").execute(&mut *tx).await?;
            }
            Err(e) if is_refused_data(&e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT row").execute(&mut *tx).await?;
                refused.push((i, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    tx.rollback().await?;
    Ok(refused)
}

async fn upsert_rows(tx: &mut Transaction<'_, Postgres>, p: Projection, rows: &[&Row]) -> Result<Vec<Applied>, sqlx::Error> {
    let sql = format!(
        "INSERT INTO {t} AS cur (user_id, entity_id, metric, day, at_ms, version_epoch, version_seq, deleted, body, source_offsets)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::date[], $5::int8[], $6::int8[], $7::int8[], $8::bool[], $9::jsonb[], $10::jsonb[])
         ON CONFLICT (user_id, entity_id) DO UPDATE SET
             metric = EXCLUDED.metric, day = EXCLUDED.day, at_ms = EXCLUDED.at_ms,
             version_epoch = EXCLUDED.version_epoch, version_seq = EXCLUDED.version_seq,
             deleted = EXCLUDED.deleted, body = EXCLUDED.body, source_offsets = EXCLUDED.source_offsets,
             updated_at = now()
         WHERE (cur.version_epoch, cur.version_seq) < (EXCLUDED.version_epoch, EXCLUDED.version_seq)
         RETURNING user_id, entity_id, version_epoch, version_seq, deleted, body",
        t = p.table()
    );
    let returned: Vec<(String, String, i64, i64, bool, Json<serde_json::Value>)> = sqlx::query_as(&sql)
        .bind(rows.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.entity_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.metric.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.day).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.at_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version.1).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deleted).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| Json(&r.body)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| Json(offsets_json(&r.source_offsets))).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .await?;
    let traces: std::collections::HashMap<(&str, &str), &str> =
        rows.iter().filter_map(|r| Some(((r.user_id.as_str(), r.entity_id.as_str()), r.trace.as_deref()?))).collect();
    Ok(returned
        .into_iter()
        .map(|(user_id, entity_id, e, s, deleted, body)| Applied {
            trace: traces.get(&(user_id.as_str(), entity_id.as_str())).map(|t| (*t).to_owned()),
            projection: p,
            user_id,
            entity_id,
            version: (e, s),
            deleted,
            body: body.0,
        })
        .collect())
}

fn offsets_json(o: &[vitals_schemas::SourceOffset]) -> serde_json::Value {
    serde_json::to_value(o).unwrap_or(serde_json::Value::Null)
}

/// Moves the users' positions by what the batch consumed ([`progress::fold`]). The stored
/// positions are read locked, so no other writer (a sink instance that has not noticed a
/// rebalance yet) moves them in between; the write moves a position only forward in `(epoch,
/// next_offset)` order, as the fold does, which also covers a key that writer stored first.
async fn upsert_progress(tx: &mut Transaction<'_, Postgres>, progress: &[Progress]) -> Result<(), sqlx::Error> {
    let keys: BTreeSet<progress::Key> = progress
        .iter()
        .flat_map(|p| p.source_offsets.iter().map(move |o| (p.user_id.as_str(), p.projection.key(), o.topic.as_str(), o.partition)))
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let (users, projs, topics, parts) = columns(keys.iter().copied());
    let stored: Vec<(String, String, String, i32, i64, i64)> = sqlx::query_as(
        "SELECT user_id, projection, topic, partition, epoch, next_offset FROM projection_progress
         WHERE (user_id, projection, topic, partition) IN (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[]))
         ORDER BY 1, 2, 3, 4 FOR UPDATE",
    )
    .bind(&users)
    .bind(&projs)
    .bind(&topics)
    .bind(&parts)
    .fetch_all(&mut **tx)
    .await?;
    let held: BTreeMap<progress::Key, progress::Position> = stored
        .iter()
        .map(|(u, p, t, part, epoch, next_offset)| {
            ((u.as_str(), p.as_str(), t.as_str(), *part), progress::Position { epoch: *epoch, next_offset: *next_offset })
        })
        .collect();
    let moved = progress::fold(&held, progress);
    if moved.is_empty() {
        return Ok(());
    }
    let (users, projs, topics, parts) = columns(moved.keys().copied());
    sqlx::query(
        "INSERT INTO projection_progress AS cur (user_id, projection, topic, partition, epoch, next_offset)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::int8[])
         ON CONFLICT (user_id, projection, topic, partition) DO UPDATE
         SET epoch = EXCLUDED.epoch, next_offset = EXCLUDED.next_offset, updated_at = now()
         WHERE (cur.epoch, cur.next_offset) < (EXCLUDED.epoch, EXCLUDED.next_offset)",
    )
    .bind(&users)
    .bind(&projs)
    .bind(&topics)
    .bind(&parts)
    .bind(moved.values().map(|p| p.epoch).collect::<Vec<_>>())
    .bind(moved.values().map(|p| p.next_offset).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

type KeyColumns<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, Vec<i32>);

/// The keys as the four arrays `UNNEST` takes.
fn columns<'a>(keys: impl Iterator<Item = progress::Key<'a>>) -> KeyColumns<'a> {
    let mut c: KeyColumns = (vec![], vec![], vec![], vec![]);
    for (u, p, t, part) in keys {
        c.0.push(u);
        c.1.push(p);
        c.2.push(t);
        c.3.push(part);
    }
    c
}

/// The counts of sink `sink` persisted for `topic` ([`Batch::vouches`]).
pub async fn stored_vouches(pool: &PgPool, sink: &str, topic: &str) -> Result<Vec<(vouch::Key, String, u64)>, sqlx::Error> {
    let rows: Vec<(i32, String, String, i64)> =
        sqlx::query_as("SELECT partition, user_id, interval, rows FROM sink_vouches WHERE sink = $1 AND topic = $2")
            .bind(sink)
            .bind(topic)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(p, u, i, n)| ((topic.to_owned(), p, u), i, n.max(0) as u64)).collect())
}

fn unzip3<A, B, C>(it: impl Iterator<Item = (A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for (x, y, z) in it {
        a.push(x);
        b.push(y);
        c.push(z);
    }
    (a, b, c)
}

/// The stored next offsets of `sink` for `topic` (partition → offset).
pub async fn stored_offsets(pool: &PgPool, sink: &str, topic: &str) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT partition, next_offset FROM sink_offsets WHERE sink = $1 AND topic = $2")
        .bind(sink)
        .bind(topic)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}
