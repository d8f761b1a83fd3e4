//! `product_impact`: per (user, product), the mean and spread of the sessions' deltas (DOMAIN.md,
//! "Sessions and their impact"), built from `session_impact`'s output records — a chained
//! processor.
//!
//! * **Versions.** Upserts and tombstones (`deleted = true`) of a session arrive with their
//!   version `(version_epoch, version_seq)`, possibly re-emitted, duplicated or late (a zombie
//!   owner, a replay). Per session only the newest version counts: a record is applied only when
//!   its version is greater than the one held, so an older or equal one changes nothing (an
//!   equal version is the same record). The version of a tombstone is kept too, so an older
//!   upsert cannot resurrect a deleted session.
//! * **What counts.** A session counts for its `product_id` when its newest record is not deleted,
//!   names a product and is FINAL. Provisional impacts do not count: their after window is still
//!   filling (partial `delta_after`s would bias the product's figures), and a product summary is
//!   a statistic over completed sessions. They are held, and count as soon as their FINAL record
//!   arrives; a session that becomes provisional again (its end moved) stops counting until final.
//!   Sessions without a product count nowhere. A session whose product changes moves from the old
//!   product to the new one.
//! * **Figures.** `sessions` = the sessions counted. Per metric (ordered by name) with a delta in
//!   some counted session one [`DeltaSummary`]: `n` = the sessions with a `delta_during` or a
//!   `delta_after` for it; `mean_delta_during` / `sd_delta_during` = the mean and the sample
//!   standard deviation (n − 1) of `delta_during` over the sessions having one (`None` without
//!   any; the sd is `None` with fewer than two); the same for `delta_after`.
//! * A product left without counted sessions is retracted. An unchanged recomputation emits
//!   nothing. Output key `"{user}|{product_id}"`.
//!
//! Refused as invalid: an impact with an empty session id, an id containing the state separator
//! (U+001F), or a non-finite delta. [`summarise`] is the one aggregation; [`oracle`] applies it to
//! the newest version of every session in one batch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vitals_schemas::{DeltaSummary, ImpactStatus, ProductImpact, SessionImpact, SourceOffset};

use crate::{Emitter, Input, Invalid, ProcessorInfo, State, StateExt};

pub const INFO: ProcessorInfo = ProcessorInfo {
    name: "product_impact",
    description: "Per (user, product): mean and std-dev of the final sessions' deltas, from session_impact's output",
    inputs: crate::Inputs::SessionImpacts,
};

/// Built with its default [`Config`] (what the registry runs).
impl Default for ProductImpactProcessor {
    fn default() -> Self {
        ProductImpactProcessor::new(Config::default())
    }
}

/// No tunables yet; unknown keys are refused so a typo never goes unnoticed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

const SEP: char = '\u{1f}';

/// One metric's deltas in one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricDeltas {
    pub metric: String,
    pub during: Option<f64>,
    pub after: Option<f64>,
}

/// What a counted session contributes to its product: its metrics with a delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub metrics: Vec<MetricDeltas>,
}

/// The product and contribution of a session record, `None` when it does not count.
pub fn counts(r: &SessionImpact) -> Option<(String, Contribution)> {
    if r.deleted || r.status != ImpactStatus::Final {
        return None;
    }
    let product = r.product_id.clone()?;
    let metrics = r
        .metrics
        .iter()
        .filter(|m| m.delta_during.is_some() || m.delta_after.is_some())
        .map(|m| MetricDeltas { metric: m.metric.clone(), during: m.delta_during, after: m.delta_after })
        .collect();
    Some((product, Contribution { metrics }))
}

/// Whether this processor accepts the record.
pub fn validate(r: &SessionImpact) -> Result<(), Invalid> {
    if r.session_id.is_empty() {
        return Err(Invalid { code: "missing_session", reason: "a session impact without a session id".into() });
    }
    if r.session_id.contains(SEP) || r.product_id.as_deref().is_some_and(|p| p.contains(SEP)) {
        return Err(Invalid { code: "bad_id", reason: format!("session {:?} or its product contains U+001F", r.session_id) });
    }
    let finite = |x: Option<f64>| x.is_none_or(f64::is_finite);
    if !r.metrics.iter().all(|m| finite(m.delta_during) && finite(m.delta_after)) {
        return Err(Invalid { code: "value_not_finite", reason: format!("session {} has a non-finite delta", r.session_id) });
    }
    Ok(())
}

fn mean_sd(xs: &[f64]) -> (Option<f64>, Option<f64>) {
    if xs.is_empty() {
        return (None, None);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = (xs.len() >= 2).then(|| (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt());
    (Some(mean), sd)
}

/// The summary of one (user, product) from its counted sessions' contributions, in session-id
/// order. `None` without sessions (the product is retracted).
pub fn summarise(user: &str, product: &str, sessions: &[&Contribution]) -> Option<ProductImpact> {
    if sessions.is_empty() {
        return None;
    }
    let mut by_metric: BTreeMap<&str, (i64, Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for c in sessions {
        for m in &c.metrics {
            let e = by_metric.entry(&m.metric).or_default();
            e.0 += 1;
            e.1.extend(m.during);
            e.2.extend(m.after);
        }
    }
    let metrics = by_metric
        .into_iter()
        .map(|(metric, (n, during, after))| {
            let (mean_delta_during, sd_delta_during) = mean_sd(&during);
            let (mean_delta_after, sd_delta_after) = mean_sd(&after);
            DeltaSummary { metric: metric.to_owned(), n, mean_delta_during, sd_delta_during, mean_delta_after, sd_delta_after }
        })
        .collect();
    Some(blank(user, product, sessions.len() as i64, metrics))
}

fn blank(user: &str, product: &str, sessions: i64, metrics: Vec<DeltaSummary>) -> ProductImpact {
    ProductImpact {
        user_id: user.to_owned(),
        product_id: product.to_owned(),
        sessions,
        metrics,
        version_epoch: 0,
        version_seq: 0,
        deleted: false,
        source_offsets: vec![],
    }
}

/// The output key of a product.
pub fn output_key(user: &str, product_id: &str) -> String {
    format!("{user}|{product_id}")
}

impl crate::Versioned for ProductImpact {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<SourceOffset>) {
        self.version_epoch = epoch;
        self.version_seq = seq;
        self.source_offsets = offsets;
    }
    fn tombstone(user: &str, key: &str) -> ProductImpact {
        let product = key.strip_prefix(user).and_then(|k| k.strip_prefix('|')).unwrap_or(key);
        ProductImpact { deleted: true, ..blank(user, product, 0, vec![]) }
    }
}

// ---- streaming -------------------------------------------------------------------------------

fn session_key(session_id: &str) -> String {
    format!("s{SEP}{session_id}")
}
fn member_prefix(product: &str) -> String {
    format!("p{SEP}{product}{SEP}")
}
fn emitted_key(product: &str) -> String {
    format!("out{SEP}{product}")
}

/// What is held per session: the newest version applied and the product it counts for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HeldSession {
    version: (i64, i64),
    counted_in: Option<String>,
}

pub struct ProductImpactProcessor {}

impl ProductImpactProcessor {
    pub fn new(_config: Config) -> ProductImpactProcessor {
        ProductImpactProcessor {}
    }

    fn recompute(&self, user: &str, product: &str, state: &mut dyn State, out: &mut dyn Emitter<ProductImpact>) {
        let members: Vec<Contribution> = state.scan_json(&member_prefix(product)).into_iter().map(|(_, v)| v).collect();
        let refs: Vec<&Contribution> = members.iter().collect();
        let ek = emitted_key(product);
        let last: Option<ProductImpact> = state.get_json(&ek);
        match summarise(user, product, &refs) {
            Some(row) => {
                if last.as_ref() != Some(&row) {
                    state.put_json(&ek, &row);
                    out.upsert(output_key(user, product), row);
                }
            }
            None => {
                if last.is_some() {
                    state.delete(&ek);
                    out.retract(output_key(user, product));
                }
            }
        }
    }
}

impl crate::Processor for ProductImpactProcessor {
    type Output = ProductImpact;

    fn process(&mut self, input: &Input, state: &mut dyn State, out: &mut dyn Emitter<ProductImpact>) -> Result<(), Invalid> {
        let Input::SessionImpact(r) = input else { return Ok(()) }; // not an input of this processor
        validate(r)?;
        let version = (r.version_epoch, r.version_seq);
        let key = session_key(&r.session_id);
        let held: Option<HeldSession> = state.get_json(&key);
        if held.as_ref().is_some_and(|h| h.version >= version) {
            return Ok(()); // a duplicate, a replay or a zombie's older write
        }
        let old = held.and_then(|h| h.counted_in);
        let new = counts(r);
        if let Some(p) = &old {
            state.delete(&format!("{}{}", member_prefix(p), r.session_id));
        }
        if let Some((p, c)) = &new {
            state.put_json(&format!("{}{}", member_prefix(p), r.session_id), c);
        }
        let new_product = new.map(|(p, _)| p);
        state.put_json(&key, &HeldSession { version, counted_in: new_product.clone() });
        let mut dirty: Vec<String> = old.into_iter().chain(new_product).collect();
        dirty.sort();
        dirty.dedup();
        for p in dirty {
            self.recompute(&r.user_id, &p, state, out);
        }
        Ok(())
    }
}

// ---- the oracle ------------------------------------------------------------------------------

/// The batch oracle: the product impacts implied by a set of session-impact records (any order,
/// duplicates; the newest version per (user, session) wins, equal versions being the same record;
/// deleted = absent). Invalid records are skipped, as the processor refuses them.
pub fn oracle(impacts: &[SessionImpact]) -> BTreeMap<String, ProductImpact> {
    let mut newest: BTreeMap<(&str, &str), &SessionImpact> = BTreeMap::new();
    for r in impacts.iter().filter(|r| validate(r).is_ok()) {
        let k = (r.user_id.as_str(), r.session_id.as_str());
        match newest.get(&k) {
            Some(h) if (h.version_epoch, h.version_seq) >= (r.version_epoch, r.version_seq) => {}
            _ => {
                newest.insert(k, r);
            }
        }
    }
    // (user, product) → session id → contribution (session-id order, as the state scan).
    let mut products: BTreeMap<(&str, String), BTreeMap<&str, Contribution>> = BTreeMap::new();
    for ((user, session), r) in newest {
        if let Some((p, c)) = counts(r) {
            products.entry((user, p)).or_default().insert(session, c);
        }
    }
    products
        .into_iter()
        .filter_map(|((user, product), sessions)| {
            let refs: Vec<&Contribution> = sessions.values().collect();
            summarise(user, &product, &refs).map(|row| (output_key(user, &product), row))
        })
        .collect()
}

/// Scenarios and generators, public under feature `testkit` (the runtime's takeover properties).
#[cfg(any(test, feature = "testkit"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports, unused_macros))]
pub mod tests;
