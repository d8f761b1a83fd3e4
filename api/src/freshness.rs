//! Freshness (DOMAIN.md, "Freshness"): for one user and one projection, compares what the edge
//! has accepted for that user (`ingest_user_offsets`: the last offset per input partition) with
//! how far the projection has been computed *and applied to PostgreSQL* for that user
//! (`projection_progress`, from the processors' per-user progress markers, written by the sink in
//! the same transaction as the rows).
//!
//! * `fresh`: every accepted offset is below the applied progress — the rows reflect everything
//!   the user uploaded (or the user uploaded nothing).
//! * `pending`: the user uploaded, and nothing of this projection has been applied for them yet.
//! * `stale`: some accepted data is not reflected yet; says how many lanes and log positions
//!   behind, and since when.
//!
//! A projection built from another's output ([`BuiltFrom::Projection`], e.g. `product_impact`
//! from `session_impact`) is fresh when that upstream is fresh *and* it has consumed every
//! upstream record of the user (`projection_inputs`, recorded by the sink); otherwise it reports
//! the first of the two that is behind. Which projections there are, and what each is built
//! from, is their descriptors' ([`vitals_schemas::projection`]).
//!
//! The three inputs are read on one connection; a caller that also reads rows passes the
//! transaction it read them in (the API's `REPEATABLE READ` snapshot), so rows and freshness are
//! of one moment.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use vitals_schemas::projection::{BuiltFrom, Descriptor};

/// The projections a deployment has (the registered processors' descriptors).
pub type Projections = [&'static Descriptor];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreshnessState {
    Fresh,
    Stale,
    Pending,
    /// Processed up to everything accepted, but some of the user's records were dead-lettered
    /// (proven bad) and are not reflected: never `fresh` over data that was not applied.
    Degraded,
}

impl FreshnessState {
    pub fn as_str(self) -> &'static str {
        match self {
            FreshnessState::Fresh => "fresh",
            FreshnessState::Stale => "stale",
            FreshnessState::Pending => "pending",
            FreshnessState::Degraded => "degraded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Freshness {
    pub state: FreshnessState,
    /// Input partitions (lanes) with accepted data not reflected yet.
    pub lanes_behind: usize,
    /// Log positions between the applied progress and the last accepted offset, summed over the
    /// lanes behind (other users share the partitions, so this bounds the user's own records).
    pub offsets_behind: i64,
    /// When the edge accepted the latest upload of the lane that has been waiting longest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<chrono::DateTime<chrono::Utc>>,
    /// The user's dead-lettered records of this projection not replayed yet, by code.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_letters: Vec<DeadLetters>,
}

/// Dead letters of one code: how many, and the latest reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetters {
    pub code: String,
    pub count: i64,
    pub reason: String,
}

impl Freshness {
    /// Compares accepted (partition → last offset, accepted at) with applied (partition → next
    /// offset). Pure, so the rule is tested without a database.
    pub fn compare(accepted: &Accepted, applied: &BTreeMap<(String, i32), i64>) -> Freshness {
        let mut f =
            Freshness { state: FreshnessState::Fresh, lanes_behind: 0, offsets_behind: 0, waiting_since: None, dead_letters: Vec::new() };
        for (lane, (last, at)) in accepted {
            let next = applied.get(lane).copied().unwrap_or(0);
            if next <= *last {
                f.lanes_behind += 1;
                f.offsets_behind += last + 1 - next;
                f.waiting_since = Some(f.waiting_since.map_or(*at, |w| w.min(*at)));
            }
        }
        if f.lanes_behind > 0 {
            f.state = if applied.is_empty() { FreshnessState::Pending } else { FreshnessState::Stale };
        }
        f
    }
}

type Accepted = BTreeMap<(String, i32), (i64, chrono::DateTime<chrono::Utc>)>;

/// One user's inputs and progress, read once: what every projection's freshness is computed from.
pub struct UserProgress {
    /// What the edge accepted, per input partition.
    lanes: Accepted,
    /// The upstream records the sink applied that chained projections are built from (topic,
    /// partition → last offset).
    inputs: Accepted,
    /// Per projection, how far it has been computed and applied, per input partition.
    applied: BTreeMap<String, BTreeMap<(String, i32), i64>>,
    /// Per projection, its dead letters of the user not replayed yet.
    dead: BTreeMap<String, Vec<DeadLetters>>,
    /// Per projection with a promoted replay, that version (`vitals promote`): its progress
    /// and dead letters are the projection's.
    promoted: BTreeMap<String, String>,
}

impl UserProgress {
    /// Three queries on one connection of `db` (a pool, a connection or a transaction), whatever
    /// the number of projections asked about.
    pub async fn load(db: impl Into<Db<'_>>, user: &str) -> Result<UserProgress, sqlx::Error> {
        match db.into() {
            Db::Pool(pool) => Self::read(&mut *pool.acquire().await?, user).await,
            Db::Conn(conn) => Self::read(conn, user).await,
        }
    }

    async fn read(conn: &mut PgConnection, user: &str) -> Result<UserProgress, sqlx::Error> {
        type Row = (String, i32, i64, chrono::DateTime<chrono::Utc>);
        let accepted = |rows: Vec<Row>| rows.into_iter().map(|(t, p, o, at)| ((t, p), (o, at))).collect();
        let lanes: Vec<Row> =
            sqlx::query_as("SELECT topic, partition, last_offset, accepted_at FROM ingest_user_offsets WHERE user_id = $1")
                .bind(user)
                .fetch_all(&mut *conn)
                .await?;
        let inputs: Vec<Row> = sqlx::query_as("SELECT topic, partition, last_offset, updated_at FROM projection_inputs WHERE user_id = $1")
            .bind(user)
            .fetch_all(&mut *conn)
            .await?;
        // A dead letter counts until its source record has been replayed (and acknowledged).
        let dead_rows: Vec<(String, String, i64, String)> = sqlx::query_as(
            "SELECT d.projection, d.code, count(*), (array_agg(d.reason ORDER BY d.recorded_at DESC))[1]
             FROM projection_dead_letters d
             WHERE d.user_id = $1 AND NOT EXISTS (
                 SELECT 1 FROM dlq_replays r WHERE r.source_topic = d.source_topic AND r.source_partition = d.source_partition
                 AND r.source_offset = d.source_offset AND r.target_offset IS NOT NULL)
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .bind(user)
        .fetch_all(&mut *conn)
        .await?;
        let progress: Vec<(String, String, i32, i64)> =
            sqlx::query_as("SELECT projection, topic, partition, next_offset FROM projection_progress WHERE user_id = $1")
                .bind(user)
                .fetch_all(&mut *conn)
                .await?;
        let mut applied: BTreeMap<String, BTreeMap<(String, i32), i64>> = BTreeMap::new();
        for (projection, t, p, o) in progress {
            applied.entry(projection).or_default().insert((t, p), o);
        }
        let mut dead: BTreeMap<String, Vec<DeadLetters>> = BTreeMap::new();
        for (projection, code, count, reason) in dead_rows {
            dead.entry(projection).or_default().push(DeadLetters { code, count, reason });
        }
        let promoted = promoted_versions(conn).await?;
        Ok(UserProgress { lanes: accepted(lanes), inputs: accepted(inputs), applied, dead, promoted })
    }

    /// The freshness of projection `d` (`all`: every projection, where `d`'s upstream is found).
    /// A chained projection counts its upstream's dead letters too: what they withheld from the
    /// upstream never reached it either.
    pub fn of(&self, d: &Descriptor, all: &Projections) -> Freshness {
        let chain = chain(d, all);
        let mut f = self.progress_along(&chain);
        for (i, p) in chain.iter().enumerate().rev() {
            f.dead_letters.extend(self.dead.get(&self.key(p, i == 0)).into_iter().flatten().cloned());
        }
        if f.state == FreshnessState::Fresh && !f.dead_letters.is_empty() {
            f.state = FreshnessState::Degraded;
        }
        f
    }

    /// `chain`: a projection, then what it is built from, down to one built from the lanes. The
    /// first link that is not fresh is the answer: the root against the lanes, then each
    /// projection against its upstream's records of the user on the upstream's output topic
    /// (whatever the deployment's prefix: a projection name holds no dot).
    ///
    /// Only the head is read as its promoted version: what a projection is built from is its
    /// upstream's base version (the topic it consumes).
    fn progress_along(&self, chain: &[&Descriptor]) -> Freshness {
        let none = BTreeMap::new();
        let head = chain.first().map(|d| d.name);
        let applied = |d: &Descriptor| self.applied.get(&self.key(d, Some(d.name) == head)).unwrap_or(&none);
        let Some((root, built)) = chain.split_last() else { return Freshness::compare(&BTreeMap::new(), &none) };
        let mut f = Freshness::compare(&self.lanes, applied(root));
        let mut up = *root;
        for d in built.iter().rev() {
            if f.state != FreshnessState::Fresh {
                return f;
            }
            let topic_end = format!("vitals.out.{}", up.name);
            let inputs: Accepted = self.inputs.iter().filter(|((t, _), _)| t.ends_with(&topic_end)).map(|(k, v)| (k.clone(), *v)).collect();
            f = Freshness::compare(&inputs, applied(d));
            up = d;
        }
        f
    }

    /// The table reads of `d` go to: its promoted version's (`vitals promote`), as read with
    /// this progress, so rows read in the same snapshot are of the version freshness is of.
    pub fn table(&self, d: &Descriptor) -> String {
        use vitals_schemas::projection::version;
        version::table(d, self.promoted.get(d.name).map(String::as_str))
    }

    /// The name `d`'s progress and dead letters go by: its promoted version's when `head` (the
    /// projection being read), the base version's otherwise.
    fn key(&self, d: &Descriptor, head: bool) -> String {
        let version = if head { self.promoted.get(d.name).map(String::as_str) } else { None };
        vitals_schemas::projection::version::key(d.name, version)
    }

    /// Every projection's freshness.
    pub fn all(&self, all: &Projections) -> BTreeMap<&'static str, Freshness> {
        all.iter().map(|d| (d.name, self.of(d, all))).collect()
    }
}

/// `d`, then the projection it is built from, and so on, while that is registered and not
/// already in the chain.
fn chain<'a>(d: &'a Descriptor, all: &'a Projections) -> Vec<&'a Descriptor> {
    let mut chain = vec![d];
    let mut at = d;
    while let BuiltFrom::Projection(up) = at.built_from {
        match all.iter().copied().find(|p| p.name == up) {
            Some(u) if !chain.iter().any(|c| c.name == u.name) => {
                chain.push(u);
                at = u;
            }
            _ => break,
        }
    }
    chain
}

/// Every projection whose promoted version is not the base one, with that version.
pub async fn promoted_versions(conn: &mut PgConnection) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT projection, promoted FROM projection_versions").fetch_all(conn).await?;
    Ok(rows.into_iter().filter(|(_, v)| vitals_schemas::projection::version::non_base(v).is_some()).collect())
}

/// Where [`UserProgress::load`] reads: any connection of a pool, or one given connection — the
/// transaction the caller read its rows in, so that both are of one snapshot.
pub enum Db<'a> {
    Pool(&'a PgPool),
    Conn(&'a mut PgConnection),
}

impl<'a> From<&'a PgPool> for Db<'a> {
    fn from(pool: &'a PgPool) -> Db<'a> {
        Db::Pool(pool)
    }
}

impl<'a> From<&'a mut PgConnection> for Db<'a> {
    fn from(conn: &'a mut PgConnection) -> Db<'a> {
        Db::Conn(conn)
    }
}

impl<'a> From<&'a mut Transaction<'_, Postgres>> for Db<'a> {
    fn from(tx: &'a mut Transaction<'_, Postgres>) -> Db<'a> {
        Db::Conn(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(s, 0).unwrap()
    }

    #[test]
    fn fresh_stale_and_pending() {
        let accepted = BTreeMap::from([(("hot".to_owned(), 0), (10, at(100))), (("cold".to_owned(), 0), (4, at(50)))]);
        let nothing = BTreeMap::new();
        let f = Freshness::compare(&accepted, &nothing);
        assert_eq!((f.state, f.lanes_behind, f.offsets_behind, f.waiting_since), (FreshnessState::Pending, 2, 16, Some(at(50))));
        let partly = BTreeMap::from([(("hot".to_owned(), 0), 11), (("cold".to_owned(), 0), 3)]);
        let f = Freshness::compare(&accepted, &partly);
        assert_eq!((f.state, f.lanes_behind, f.offsets_behind, f.waiting_since), (FreshnessState::Stale, 1, 2, Some(at(50))));
        let all = BTreeMap::from([(("hot".to_owned(), 0), 11), (("cold".to_owned(), 0), 5)]);
        assert_eq!(Freshness::compare(&accepted, &all).state, FreshnessState::Fresh);
        assert_eq!(Freshness::compare(&BTreeMap::new(), &nothing).state, FreshnessState::Fresh, "nothing uploaded: nothing missing");
    }

    /// A promoted version's progress and dead letters are the projection's; what a chained
    /// projection is built from stays its upstream's base version (the topic it consumes).
    #[test]
    fn a_promoted_version_is_read_by_its_own_progress() {
        use vitals_schemas::records::descriptors::{PRODUCT_IMPACT, ROLLUP_DAY, SESSION_IMPACT};
        let all: &Projections = &[&ROLLUP_DAY, &SESSION_IMPACT, &PRODUCT_IMPACT];
        let hot = "vitals.health.hot".to_owned();
        let mut u = UserProgress {
            lanes: BTreeMap::from([((hot.clone(), 0), (10, at(100)))]),
            inputs: BTreeMap::new(),
            applied: BTreeMap::new(),
            dead: BTreeMap::new(),
            promoted: BTreeMap::new(),
        };
        u.applied.insert("rollup_day".into(), BTreeMap::from([((hot.clone(), 0), 11)]));
        u.applied.insert("session_impact".into(), BTreeMap::from([((hot.clone(), 0), 11)]));
        u.applied.insert("rollup_day@v2".into(), BTreeMap::from([((hot.clone(), 0), 4)]));
        assert_eq!(u.of(&ROLLUP_DAY, all).state, FreshnessState::Fresh);
        u.promoted.insert("rollup_day".into(), "v2".into());
        u.promoted.insert("session_impact".into(), "v2".into());
        assert_eq!(u.of(&ROLLUP_DAY, all).state, FreshnessState::Stale, "v2 is behind: the base's progress does not count for it");
        assert_eq!(u.of(&SESSION_IMPACT, all).state, FreshnessState::Pending, "nothing of session_impact v2 applied");
        u.applied.insert("product_impact".into(), BTreeMap::from([(("vitals.out.session_impact".to_owned(), 0), 1)]));
        u.inputs.insert(("vitals.out.session_impact".to_owned(), 0), (0, at(100)));
        assert_eq!(u.of(&PRODUCT_IMPACT, all).state, FreshnessState::Fresh, "built from session_impact's base version, which is fresh");
        u.applied.insert("rollup_day@v2".into(), BTreeMap::from([((hot.clone(), 0), 11)]));
        u.dead.insert("rollup_day".into(), vec![DeadLetters { code: "c".into(), count: 1, reason: "r".into() }]);
        assert_eq!(u.of(&ROLLUP_DAY, all).state, FreshnessState::Fresh, "the base's dead letters are not v2's");
        u.dead.insert("rollup_day@v2".into(), vec![DeadLetters { code: "c".into(), count: 1, reason: "r".into() }]);
        assert_eq!(u.of(&ROLLUP_DAY, all).state, FreshnessState::Degraded);
    }

    /// A chained projection is as fresh as its upstream, then as its own consumption of the
    /// upstream's records; the upstream's dead letters degrade it.
    #[test]
    fn a_chained_projection_waits_for_its_upstream_then_for_its_inputs() {
        use vitals_schemas::records::descriptors::{PRODUCT_IMPACT, ROLLUP_DAY, SESSION_IMPACT};
        let all: &Projections = &[&ROLLUP_DAY, &SESSION_IMPACT, &PRODUCT_IMPACT];
        let lane = || BTreeMap::from([(("p.vitals.health.hot".to_owned(), 0), (10, at(100)))]);
        let out = "p.vitals.out.session_impact".to_owned();
        let mut u = UserProgress {
            lanes: lane(),
            inputs: BTreeMap::new(),
            applied: BTreeMap::new(),
            dead: BTreeMap::new(),
            promoted: BTreeMap::new(),
        };
        u.applied.insert("session_impact".into(), BTreeMap::from([(("p.vitals.health.hot".to_owned(), 0), 5)]));
        assert_eq!(u.of(&PRODUCT_IMPACT, all).state, FreshnessState::Stale, "upstream behind");
        u.applied.insert("session_impact".into(), BTreeMap::from([(("p.vitals.health.hot".to_owned(), 0), 11)]));
        u.inputs.insert((out.clone(), 3), (7, at(120)));
        // Another projection's output of the same user is not this one's input.
        u.inputs.insert(("p.vitals.out.rollup_day".to_owned(), 3), (900, at(120)));
        assert_eq!(u.of(&PRODUCT_IMPACT, all).state, FreshnessState::Pending, "upstream fresh, nothing of it consumed");
        u.applied.insert("product_impact".into(), BTreeMap::from([((out.clone(), 3), 8)]));
        assert_eq!(u.of(&PRODUCT_IMPACT, all).state, FreshnessState::Fresh);
        assert_eq!(u.of(&ROLLUP_DAY, all).state, FreshnessState::Pending, "its own progress only");
        u.dead.insert("session_impact".into(), vec![DeadLetters { code: "c".into(), count: 1, reason: "r".into() }]);
        assert_eq!(u.of(&PRODUCT_IMPACT, all).state, FreshnessState::Degraded);
        assert_eq!(u.of(&SESSION_IMPACT, all).state, FreshnessState::Degraded);
        assert_eq!(u.all(all).keys().copied().collect::<Vec<_>>(), ["product_impact", "rollup_day", "session_impact"]);
    }
}
