//! The "Postgres-only design" of issue 10, the design vitals replaces, run on the very uploads a
//! benchmark sends vitals: raw samples in PostgreSQL and the daily rollups recomputed from them
//! in the write path (the seed's outbox worker collapsed into it). It is a *baseline*, measured
//! beside vitals in `vitals-bench e2e` and alone in `vitals-bench baseline`.
//!
//! What it does, on one connection, one transaction per upload (an upload is the edge's request,
//! ≤ `batch_size` items, already validated and normalised by the edge's own functions — see
//! [`super::offline_inputs`] — before the clock starts, so it pays for no HTTP, JSON or
//! validation):
//!
//! 1. samples and edits: one `INSERT … SELECT FROM unnest(…) ON CONFLICT (user_id, source,
//!    record_id) DO UPDATE … WHERE stored version < new version` into the raw sample table —
//!    rollup_day's identity rule: a higher version replaces, the same or a lower one is ignored.
//!    The local date (of the sample's start, in the sample's own zone: IANA name, `UTC`/`Z` or
//!    `±HH:MM`) is computed in SQL and stored, with an index on (user, metric, local date);
//! 2. deletions: the same table keeps, per identity, the highest version deleted (every version
//!    when a deletion names none), so a deletion also holds for a version that arrives later, in
//!    either order, as rollup_day's identities do;
//! 3. domain changes: stored raw (`ON CONFLICT (user_id, change_id) DO NOTHING`); nothing is
//!    derived from them;
//! 4. the (user, metric, local date) keys the upload changed — new and replaced versions' dates,
//!    deleted samples' dates — recomputed in one `INSERT … SELECT … GROUP BY … ON CONFLICT DO
//!    UPDATE`: count, sum, min, max, mean, the time-weighted mean (rollup_day's midpoint rule,
//!    with window functions) and the last value; a key left without samples is deleted
//!    (rollup_day's retraction).
//!
//! What it does not do (all of which vitals does): source priority (the user's list or the
//! default ranking — so no `primary_source`, and cumulative metrics are summed over every source
//! where rollup_day merges overlapping sources per sub-interval; instant metrics take every
//! source, not the best one); splitting cumulative and category samples across the local days
//! (23/25-hour DST days included) they overlap — every sample counts on its start's date only;
//! minutes per category; sleep nights, session impacts, product impacts; request idempotency,
//! per-user freshness, change notifications. For discrete metrics (heart rate, HRV, …) its rows
//! are rollup_day's (count, min, max, mean, time-weighted mean), which [`Report::discrete`]
//! checks against `rollup_day::oracle`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::NaiveDate;
use sqlx::{Connection, PgConnection, Row};
use vitals_processors::Input;
use vitals_schemas::{Catalog, MetricKind, Sample};

/// One line for the benchmarks' output: what the baseline does.
pub const WHAT: &str = "1 connection, 1 transaction per upload: raw samples upserted by version (higher replaces), deletions kept per identity, \
    then the touched (user, metric, local date) daily rollups recomputed with INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE and emptied days deleted; \
    no source priority, no split of samples across days, no sleep or impacts";

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Uploads, each one transaction.
    pub uploads: usize,
    /// Items of those uploads: samples, edits, deletions and domain changes.
    pub items: u64,
    /// From the first upload's `BEGIN` to the last `COMMIT`.
    pub took: Duration,
    /// Raw identities and rollup rows at the end.
    pub raw_rows: i64,
    pub rollup_rows: i64,
    /// For discrete metrics: (rows equal to rollup_day's oracle, rows of either side).
    pub discrete: Option<(usize, usize)>,
}

impl Report {
    pub fn items_per_sec(&self) -> f64 {
        self.items as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// SQL for the local date of the instant `ms` (bigint, ms since the epoch) in the zone `zone`
/// (text): `±HH:MM` as an interval (ISO sign: east is positive — as text PostgreSQL would read it
/// as a POSIX zone, west positive), anything else (IANA names, `UTC`, `Z`) as a zone name.
pub fn local_date_sql(ms: &str, zone: &str) -> String {
    format!(
        "(CASE WHEN {zone} ~ '^[+-][0-9][0-9]:[0-9][0-9]$' THEN timezone({zone}::interval, to_timestamp({ms} / 1000.0)) \
         ELSE timezone({zone}, to_timestamp({ms} / 1000.0)) END)::date"
    )
}

/// The run's table names and statements.
struct Sql {
    samples: String,
    rollups: String,
    domain: String,
    create: Vec<String>,
    upsert: String,
    /// `upsert` that also returns the keys of the versions it replaced (only needed when an
    /// upload carries a version above 1: nothing stored is below version 1).
    upsert_replacing: String,
    delete: String,
    domain_insert: String,
    recompute: String,
}

impl Sql {
    fn new(prefix: &str) -> Sql {
        let (s, r, d) = (format!("{prefix}_samples"), format!("{prefix}_rollups"), format!("{prefix}_domain_changes"));
        let create = vec![
            format!(
                "CREATE TABLE {s} (user_id text NOT NULL, source text NOT NULL, record_id text NOT NULL, metric text NOT NULL,
                   version bigint, deleted_upto bigint NOT NULL DEFAULT 0,
                   start_ms bigint, end_ms bigint, value float8, unit text, category text, time_zone text, local_date date,
                   PRIMARY KEY (user_id, source, record_id))"
            ),
            format!("CREATE INDEX {s}_day ON {s} (user_id, metric, local_date)"),
            format!(
                "CREATE TABLE {r} (user_id text NOT NULL, metric text NOT NULL, local_date date NOT NULL,
                   count bigint NOT NULL, sum float8, min float8, max float8, mean float8, time_weighted_mean float8, last float8,
                   PRIMARY KEY (user_id, metric, local_date))"
            ),
            format!("CREATE TABLE {d} (user_id text NOT NULL, change_id text NOT NULL, kind text, occurred_at_ms bigint, body jsonb NOT NULL, PRIMARY KEY (user_id, change_id))"),
        ];
        let input = "i AS (SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::float8[], $9::text[], $10::text[], $11::text[])
                 WITH ORDINALITY AS i(source, record_id, metric, version, start_ms, end_ms, value, unit, category, time_zone, ord))";
        // One row per identity (the edge may accept one twice in a request): the highest
        // version, the first of equal ones — as one after the other would be applied.
        let upsert_cte = format!(
            "up AS (INSERT INTO {s} AS t (user_id, source, record_id, metric, version, start_ms, end_ms, value, unit, category, time_zone, local_date)
                 SELECT DISTINCT ON (source, record_id) $1, source, record_id, metric, version, start_ms, end_ms, value, unit, category, time_zone, {}
                 FROM i ORDER BY source, record_id, version DESC, ord
                 ON CONFLICT (user_id, source, record_id) DO UPDATE SET metric = excluded.metric, version = excluded.version,
                   start_ms = excluded.start_ms, end_ms = excluded.end_ms, value = excluded.value, unit = excluded.unit,
                   category = excluded.category, time_zone = excluded.time_zone, local_date = excluded.local_date
                 WHERE t.version IS NULL OR t.version < excluded.version
                 RETURNING metric, local_date, version > deleted_upto AS live)",
            local_date_sql("start_ms", "time_zone")
        );
        let upsert = format!("WITH {input}, {upsert_cte} SELECT metric, local_date FROM up WHERE live");
        // The statement's sub-queries all see the table as it was before it: `old` reads the
        // live versions `up` replaces.
        let upsert_replacing = format!(
            "WITH {input},
             old AS (SELECT t.metric, t.local_date FROM {s} t JOIN i ON (t.user_id, t.source, t.record_id) = ($1, i.source, i.record_id)
                     WHERE t.version < i.version AND t.version > t.deleted_upto),
             {upsert_cte}
             SELECT metric, local_date FROM up WHERE live UNION SELECT metric, local_date FROM old"
        );
        let delete = format!(
            "WITH d AS (SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[]) AS d(source, record_id, metric, upto)),
             old AS (SELECT t.metric, t.local_date FROM {s} t JOIN d ON (t.user_id, t.source, t.record_id) = ($1, d.source, d.record_id)
                     WHERE t.version > t.deleted_upto AND t.version <= d.upto),
             up AS (INSERT INTO {s} AS t (user_id, source, record_id, metric, deleted_upto)
                    SELECT DISTINCT ON (source, record_id) $1, source, record_id, metric, upto FROM d ORDER BY source, record_id, upto DESC
                    ON CONFLICT (user_id, source, record_id) DO UPDATE SET deleted_upto = excluded.deleted_upto
                    WHERE t.deleted_upto < excluded.deleted_upto)
             SELECT DISTINCT metric, local_date FROM old"
        );
        let domain_insert = format!(
            "INSERT INTO {d} (user_id, change_id, kind, occurred_at_ms, body)
             SELECT $1, b->>'change_id', b->>'kind', (b->>'occurred_at_ms')::int8, b FROM unnest($2::jsonb[]) AS x(b)
             ON CONFLICT (user_id, change_id) DO NOTHING"
        );
        // rollup_day's time-weighted mean: each value holds from halfway after its predecessor to
        // halfway before its successor (by start, then value).
        let recompute = format!(
            "WITH k AS (SELECT DISTINCT * FROM unnest($2::text[], $3::date[]) AS k(metric, local_date)),
             s AS (SELECT t.metric, t.local_date, t.value, t.start_ms, t.record_id,
                     (coalesce((lead(t.start_ms) OVER w + t.start_ms) / 2.0, t.start_ms) - coalesce((lag(t.start_ms) OVER w + t.start_ms) / 2.0, t.start_ms))::float8 AS wt
                   FROM {s} t JOIN k ON (t.user_id, t.metric, t.local_date) = ($1, k.metric, k.local_date)
                   WHERE t.version > t.deleted_upto
                   WINDOW w AS (PARTITION BY t.metric, t.local_date ORDER BY t.start_ms, t.value)),
             a AS (SELECT metric, local_date, count(*) AS count, sum(value) AS sum, min(value) AS min, max(value) AS max, avg(value) AS mean,
                     CASE WHEN sum(wt) > 0 THEN sum(value * wt) / sum(wt) ELSE avg(value) END AS time_weighted_mean,
                     (array_agg(value ORDER BY start_ms DESC, record_id DESC))[1] AS last
                   FROM s GROUP BY metric, local_date),
             up AS (INSERT INTO {r} AS r SELECT $1, * FROM a
                    ON CONFLICT (user_id, metric, local_date) DO UPDATE SET count = excluded.count, sum = excluded.sum, min = excluded.min,
                      max = excluded.max, mean = excluded.mean, time_weighted_mean = excluded.time_weighted_mean, last = excluded.last
                    RETURNING 1),
             gone AS (DELETE FROM {r} r USING k WHERE (r.user_id, r.metric, r.local_date) = ($1, k.metric, k.local_date)
                        AND NOT EXISTS (SELECT 1 FROM a WHERE (a.metric, a.local_date) = (k.metric, k.local_date))
                      RETURNING 1)
             SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM gone)"
        );
        Sql { samples: s, rollups: r, domain: d, create, upsert, upsert_replacing, delete, domain_insert, recompute }
    }
}

fn request_id(i: &Input) -> &str {
    match i {
        Input::Samples(b) => &b.request_id,
        Input::Changes(b) => &b.request_id,
        Input::Domain(b) => &b.request_id,
        Input::SessionImpact(_) => "",
    }
}

/// The inputs regrouped into the uploads they came from (consecutive records of one request).
fn uploads(inputs: &[Input]) -> Vec<&[Input]> {
    let mut out = Vec::new();
    let mut start = 0;
    for n in 1..=inputs.len() {
        if n == inputs.len() || inputs[n].user_id() != inputs[start].user_id() || request_id(&inputs[n]) != request_id(&inputs[start]) {
            out.push(&inputs[start..n]);
            start = n;
        }
    }
    out
}

/// Runs the baseline over `inputs` (lane records as [`super::offline_inputs`] makes them, in
/// upload order) on one connection of `pool`, in fresh tables dropped at the end (also after an
/// error). With `check`, compares its discrete-metric rows with `rollup_day::oracle` (after the
/// clock).
pub async fn run(pool: &sqlx::PgPool, inputs: &[Input], check: bool) -> anyhow::Result<Report> {
    let mut conn = pool.acquire().await.context("a PostgreSQL connection for the Postgres-only design")?;
    let prefix = format!("pgonly_{}_{}", chrono::Utc::now().timestamp_millis(), std::process::id());
    let sql = Sql::new(&prefix);
    let result = async {
        for c in &sql.create {
            sqlx::query(c).execute(&mut *conn).await.with_context(|| format!("creating the baseline's tables: {c}"))?;
        }
        let mut report = apply(&mut conn, &sql, inputs).await?;
        report.raw_rows = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", sql.samples)).fetch_one(&mut *conn).await?;
        report.rollup_rows = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", sql.rollups)).fetch_one(&mut *conn).await?;
        if check {
            report.discrete = Some(compare_discrete(&mut conn, &sql, inputs).await?);
        }
        anyhow::Ok(report)
    }
    .await;
    let mut dropped = Ok(());
    for t in [&sql.samples, &sql.rollups, &sql.domain] {
        if let Err(e) = sqlx::query(&format!("DROP TABLE IF EXISTS {t}")).execute(&mut *conn).await {
            dropped = Err(e);
        }
    }
    let report = result?;
    dropped.context("dropping the baseline's tables")?;
    Ok(report)
}

async fn apply(conn: &mut PgConnection, sql: &Sql, inputs: &[Input]) -> anyhow::Result<Report> {
    let groups = uploads(inputs);
    let mut items = 0u64;
    let t0 = Instant::now();
    for up in &groups {
        let user = up[0].user_id();
        let mut samples: Vec<&Sample> = Vec::new();
        let mut deletions = Vec::new();
        let mut changes = Vec::new();
        for i in up.iter() {
            match i {
                Input::Samples(b) => samples.extend(&b.samples),
                Input::Changes(b) => {
                    samples.extend(&b.edits);
                    deletions.extend(&b.deletions);
                }
                Input::Domain(b) => changes.extend(&b.changes),
                Input::SessionImpact(_) => {}
            }
        }
        items += (samples.len() + deletions.len() + changes.len()) as u64;
        let mut tx = conn.begin().await?;
        let mut touched: BTreeSet<(String, NaiveDate)> = BTreeSet::new();
        if !samples.is_empty() {
            let q = if samples.iter().any(|s| s.version > 1) { &sql.upsert_replacing } else { &sql.upsert };
            let rows = sqlx::query(q)
                .bind(user)
                .bind(samples.iter().map(|s| s.source.as_str()).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.source_record_id.as_str()).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.metric.as_str()).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.version).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.start_ms).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.end_ms).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.value).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.unit.as_str()).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.category.as_deref()).collect::<Vec<_>>())
                .bind(samples.iter().map(|s| s.time_zone.as_str()).collect::<Vec<_>>())
                .fetch_all(&mut *tx)
                .await
                .context("baseline: upserting raw samples")?;
            touched.extend(rows.iter().map(|r| (r.get::<String, _>(0), r.get::<NaiveDate, _>(1))));
        }
        if !deletions.is_empty() {
            let rows = sqlx::query(&sql.delete)
                .bind(user)
                .bind(deletions.iter().map(|d| d.source.as_str()).collect::<Vec<_>>())
                .bind(deletions.iter().map(|d| d.source_record_id.as_str()).collect::<Vec<_>>())
                .bind(deletions.iter().map(|d| d.metric.as_str()).collect::<Vec<_>>())
                .bind(deletions.iter().map(|d| d.deleted_version.unwrap_or(i64::MAX)).collect::<Vec<_>>())
                .fetch_all(&mut *tx)
                .await
                .context("baseline: deleting raw samples")?;
            touched.extend(rows.iter().map(|r| (r.get::<String, _>(0), r.get::<NaiveDate, _>(1))));
        }
        if !changes.is_empty() {
            let bodies = changes.iter().map(serde_json::to_value).collect::<Result<Vec<_>, _>>()?;
            sqlx::query(&sql.domain_insert).bind(user).bind(bodies).execute(&mut *tx).await.context("baseline: storing domain changes")?;
        }
        if !touched.is_empty() {
            let (metrics, dates): (Vec<String>, Vec<NaiveDate>) = touched.into_iter().unzip();
            sqlx::query(&sql.recompute)
                .bind(user)
                .bind(metrics)
                .bind(dates)
                .execute(&mut *tx)
                .await
                .context("baseline: recomputing daily rollups")?;
        }
        tx.commit().await?;
    }
    Ok(Report { uploads: groups.len(), items, took: t0.elapsed(), ..Report::default() })
}

/// Discrete-metric rows: (equal to rollup_day's oracle in count, min, max, mean and
/// time-weighted mean; rows on either side).
async fn compare_discrete(conn: &mut PgConnection, sql: &Sql, inputs: &[Input]) -> anyhow::Result<(usize, usize)> {
    let catalog = Catalog::embedded();
    let discrete = |m: &str| catalog.get(m).is_some_and(|s| s.kind == MetricKind::Discrete);
    let expected: BTreeMap<String, [f64; 5]> = vitals_processors::rollup_day::oracle(inputs)
        .into_iter()
        .filter(|(_, r)| discrete(&r.metric))
        .map(|(k, r)| {
            (
                k,
                [
                    r.count as f64,
                    r.min.unwrap_or(f64::NAN),
                    r.max.unwrap_or(f64::NAN),
                    r.mean.unwrap_or(f64::NAN),
                    r.time_weighted_mean.unwrap_or(f64::NAN),
                ],
            )
        })
        .collect();
    let rows = sqlx::query(&format!("SELECT user_id, metric, local_date, count, min, max, mean, time_weighted_mean FROM {}", sql.rollups))
        .fetch_all(&mut *conn)
        .await?;
    let mut got: BTreeMap<String, [f64; 5]> = BTreeMap::new();
    for r in rows {
        let metric: String = r.get(1);
        if discrete(&metric) {
            let key = vitals_processors::rollup_day::output_key(r.get(0), &metric, r.get(2));
            got.insert(key, [r.get::<i64, _>(3) as f64, r.get(4), r.get(5), r.get(6), r.get(7)]);
        }
    }
    let close = |a: &[f64; 5], b: &[f64; 5]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0));
    let keys: BTreeSet<&String> = expected.keys().chain(got.keys()).collect();
    let equal = keys.iter().filter(|k| matches!((expected.get(**k), got.get(**k)), (Some(a), Some(b)) if close(a, b))).count();
    Ok((equal, keys.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitals_processors::time::Zone;

    fn admin_url() -> String {
        std::env::var("VITALS_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
    }

    async fn pool() -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("PostgreSQL must be reachable at VITALS_TEST_POSTGRES_URL or 127.0.0.1:5432")
    }

    #[test]
    fn uploads_regroup_the_records_of_one_request() {
        let sim = vitals::simulate::SimConfig { users: 2, days: 2, ..Default::default() };
        let plan = vitals::simulate::plan(&sim);
        // One record per ≤ 10 items: uploads of up to 500 samples come back whole.
        let inputs = crate::offline_inputs(&sim, 10);
        let groups = uploads(&inputs);
        assert_eq!(groups.len(), plan.iter().filter(|u| !u.items().is_empty()).count());
        for (g, u) in groups.iter().zip(plan.iter().filter(|u| !u.items().is_empty())) {
            assert!(g.iter().all(|i| i.user_id() == u.user && request_id(i) == u.request_id()));
        }
    }

    /// The SQL local date agrees with `Zone` (what rollup_day uses) hour by hour across DST
    /// changes, for named zones, `UTC`, `Z` and fixed offsets either side of Greenwich.
    #[tokio::test]
    async fn sql_local_dates_agree_with_zone_across_dst() {
        let zones = [
            "Europe/Berlin",
            "America/New_York",
            "Australia/Sydney",
            "Asia/Kolkata",
            "America/Sao_Paulo",
            "UTC",
            "Z",
            "+05:30",
            "-03:00",
            "+14:00",
            "-09:30",
        ];
        let mut ms = Vec::new();
        let mut zs = Vec::new();
        // Around the 2026 changes in Europe (Mar 29, Oct 25), the US (Mar 8, Nov 1) and
        // Australia (Apr 5, Oct 4): every 15 min over three days, and a millisecond either side
        // of each hour.
        for day in ["2026-03-07", "2026-03-28", "2026-04-04", "2026-10-03", "2026-10-24", "2026-10-31"] {
            let start = day.parse::<NaiveDate>().unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis();
            for q in 0..(3 * 24 * 4) {
                let t = start + q * 15 * 60_000;
                for z in zones {
                    for d in [-1, 0, 1] {
                        ms.push(t + d);
                        zs.push(z.to_owned());
                    }
                }
            }
        }
        let pool = pool().await;
        let got: Vec<NaiveDate> = sqlx::query_scalar(&format!(
            "SELECT {} FROM unnest($1::int8[], $2::text[]) WITH ORDINALITY AS x(ms, zone, n) ORDER BY n",
            local_date_sql("ms", "zone")
        ))
        .bind(&ms)
        .bind(&zs)
        .fetch_all(&pool)
        .await
        .unwrap();
        let wrong: Vec<_> = ms.iter().zip(&zs).zip(&got).filter(|((m, z), g)| Zone::parse(z).local_date(**m) != **g).take(5).collect();
        assert!(wrong.is_empty(), "SQL and Zone disagree on (ms, zone, sql date): {wrong:?}");
    }

    /// The baseline on simulated people over a DST change (Berlin and London on Mar 29), with
    /// edits and deletions: its discrete-metric rows are rollup_day's, and it drops its tables.
    #[tokio::test]
    async fn discrete_rows_equal_rollup_days_oracle() {
        let now = "2026-03-30T18:00:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp_millis();
        let sim = vitals::simulate::SimConfig { users: 4, days: 3, now_ms: now, user_prefix: "pgonly-test-".into(), ..Default::default() };
        let inputs = crate::offline_inputs(&sim, 500);
        assert!(
            inputs.iter().any(|i| matches!(i, Input::Changes(b) if !b.deletions.is_empty()))
                && inputs.iter().any(|i| matches!(i, Input::Changes(b) if !b.edits.is_empty()))
        );
        let pool = pool().await;
        let before: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pgonly\\_%'").fetch_one(&pool).await.unwrap();
        let r = run(&pool, &inputs, true).await.unwrap();
        let (equal, total) = r.discrete.unwrap();
        assert!(total > 0);
        assert_eq!(equal, total, "discrete rows equal to rollup_day's oracle");
        assert_eq!(r.items as usize, crate::input_items(&inputs));
        let after: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pgonly\\_%'").fetch_one(&pool).await.unwrap();
        assert!(after <= before, "the baseline's tables are dropped");
    }
}
