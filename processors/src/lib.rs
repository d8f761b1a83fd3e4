//! `vitals-processors`: keyed-by-user stream processors.
//!
//! A processor is synchronous and does no I/O: it reads and writes the per-user [`State`] it is
//! given and emits full upserts (or retractions) of projection keys through an [`Emitter`]. That
//! is what makes exactly-once possible: the runtime decides when state, input offsets and output
//! position are checkpointed together, and re-running a processor over the same input yields the
//! same outputs. Adding a processor is one file plus one line in [`each_processor`]'s list
//! (`vitals-runtime` runs each on Kafka with exactly-once effects).
//!
//! This crate does no I/O and knows nothing of Kafka, local stores, PostgreSQL or S3: its
//! dependencies say so, and the compiler keeps it that way. [`driver`] runs a processor in
//! memory for tests.

mod codec;
pub mod driver;
pub mod identity;
pub mod keys;
pub mod sources;
pub mod time;

/// Declares each processor's module and lists it for the runtime's registry
/// ([`each_processor`]): `module::ProcessorType`, the module holding its `INFO`.
macro_rules! processors {
    ($($m:ident :: $t:ident),* $(,)?) => {
        $(pub mod $m;)*
        /// Shows every processor, with its [`ProcessorInfo`], to `v`, in this order.
        pub fn each_processor(v: &mut impl EachProcessor) {
            $(v.visit::<$m::$t>($m::INFO);)*
        }
    };
}

// Every processor, one line each: adding one is its file plus its line here.
processors! {
    rollup_day::RollupDayProcessor,
    sleep_night::SleepNightProcessor,
    session_impact::SessionImpactProcessor,
    product_impact::ProductImpactProcessor,
    readiness_baseline::ReadinessBaselineProcessor,
}

/// What [`each_processor`] shows every processor to (the runtime builds its registry with it).
pub trait EachProcessor {
    fn visit<P>(&mut self, info: ProcessorInfo)
    where
        P: Processor + Default,
        P::Output: Versioned + vitals_schemas::projection::Projected + Clone + Send + 'static;
}

use serde::de::DeserializeOwned;
use serde::Serialize;
use vitals_schemas::validate;
use vitals_schemas::{ChangeBatch, DomainChangeBatch, SampleBatch, SessionImpact, SourceOffset};

/// One input record, already decoded, of one user.
#[derive(Debug, Clone)]
pub enum Input {
    /// HOT or COLD lane.
    Samples(SampleBatch),
    /// CHANGE lane: edits and deletions.
    Changes(ChangeBatch),
    /// Domain changes: sessions, products, privacy, source priority.
    Domain(DomainChangeBatch),
    /// An upstream processor's output (`session_impact`), for chained processors. Upserts and
    /// tombstones both arrive; the consumer applies only versions newer than the one it holds.
    SessionImpact(SessionImpact),
}

impl Input {
    pub fn user_id(&self) -> &str {
        match self {
            Input::Samples(b) => &b.user_id,
            Input::Changes(b) => &b.user_id,
            Input::Domain(b) => &b.user_id,
            Input::SessionImpact(i) => &i.user_id,
        }
    }
}

/// The units of `input` the shared rules ([`vitals_schemas::validate`], the same the edge
/// applies) refuse: `None` when every unit is valid (the common case: nothing is copied);
/// otherwise the record without them, and which they were and why. Each refused unit is
/// dead-lettered on its own; the rest of the record is processed.
pub fn refuse_invalid_units(input: &Input) -> Option<(Input, Vec<validate::Refused>)> {
    let catalog = vitals_schemas::Catalog::embedded();
    // The last zone found valid: a record's samples nearly always share one, and its lookup in
    // the tz database is the check's most expensive step.
    let mut last_zone = String::new();
    let mut zone_ok = |tz: &str| {
        if tz == last_zone && !tz.is_empty() {
            return true;
        }
        let ok = validate::valid_time_zone(tz);
        if ok {
            last_zone.clear();
            last_zone.push_str(tz);
        }
        ok
    };
    let all_valid = match input {
        Input::Samples(b) => b.samples.iter().all(|s| validate::sample_with(s, catalog, &mut zone_ok).is_ok()),
        Input::Changes(b) => {
            b.edits.iter().all(|s| validate::sample_with(s, catalog, &mut zone_ok).is_ok())
                && b.deletions.iter().all(|d| validate::deletion(d, catalog).is_ok())
        }
        Input::Domain(b) => b.changes.iter().all(|c| validate::change(c, catalog).is_ok()),
        Input::SessionImpact(_) => true,
    };
    if all_valid {
        return None;
    }
    let mut input = input.clone();
    let refused = match &mut input {
        Input::Samples(b) => validate::sample_batch(b, catalog),
        Input::Changes(b) => validate::change_batch(b, catalog),
        Input::Domain(b) => validate::domain_change_batch(b, catalog),
        Input::SessionImpact(_) => Vec::new(),
    };
    Some((input, refused))
}

/// A record a processor refuses as invalid: it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Invalid {
    pub code: &'static str,
    pub reason: String,
}

/// The state of one user, as the runtime gives it to a processor. Keys are the processor's own
/// (the runtime prefixes them with the processor and the user).
pub trait State {
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Reads the value of `key` in place, if any: `f` sees it (no copy where the store can lend
    /// it); returns whether `key` is held. Default: through [`State::get`].
    fn read(&self, key: &str, f: &mut dyn FnMut(&[u8])) -> bool {
        match self.get(key) {
            Some(v) => {
                f(&v);
                true
            }
            None => false,
        }
    }
    fn put(&mut self, key: &str, value: Vec<u8>);
    fn delete(&mut self, key: &str);
    /// Keys (and values) starting with `prefix`, in key order.
    fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)>;
    /// Stream time: the greatest record timestamp the task has read from its input partition
    /// (the ingest edge's acknowledgement time, stored in the log, so replays see the same
    /// clock). Never the wall clock.
    fn stream_time_ms(&self) -> i64;
    /// Reports that state read through this view is unusable (a value that does not
    /// deserialise): the runtime stops the task with this reason instead of emitting what the
    /// processor computed from "nothing held". Reads that fail in the store are reported the
    /// same way by the runtime itself.
    fn fail(&self, reason: String);
    /// Arms (or moves) this user's timer `name`: [`Processor::on_timer`] runs once stream time
    /// reaches `at_ms`. Timers are state: checkpointed with it, replayed with it.
    fn set_timer(&mut self, name: &str, at_ms: i64);
    /// Disarms this user's timer `name` if it is armed.
    fn cancel_timer(&mut self, name: &str);
}

/// Typed helpers over [`State`] (JSON values: readable when debugging a store). A value that
/// does not deserialise fails the task ([`State::fail`]); it never reads as "nothing held".
pub trait StateExt: State {
    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let v = self.get(key)?;
        match serde_json::from_slice(&v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.fail(format!("state value {key:?} does not deserialise: {e}"));
                None
            }
        }
    }
    /// The values under `prefix`, deserialised (in key order).
    fn scan_json<T: DeserializeOwned>(&self, prefix: &str) -> Vec<(String, T)> {
        let mut out = Vec::new();
        for (k, v) in self.scan(prefix) {
            match serde_json::from_slice(&v) {
                Ok(t) => out.push((k, t)),
                Err(e) => self.fail(format!("state value {k:?} does not deserialise: {e}")),
            }
        }
        out
    }
    fn put_json<T: Serialize>(&mut self, key: &str, value: &T) {
        self.put(key, serde_json::to_vec(value).expect("state values serialize"));
    }
}
impl<S: State + ?Sized> StateExt for S {}

/// Where a processor's outputs go: full upserts of one projection key, or its retraction.
/// The runtime stamps each with a version that only grows, and the source offsets.
pub trait Emitter<T> {
    fn upsert(&mut self, key: String, value: T);
    fn retract(&mut self, key: String);
}

/// A keyed-by-user processor: one synchronous, I/O-free method over one user's input record.
pub trait Processor {
    /// The projection record it emits.
    type Output;
    /// The layout of its state: raised when a new build lays its state out differently. A store
    /// or snapshot of another format is refused at takeover (it is never read as empty).
    const STATE_FORMAT: i64 = 1;
    /// Handles one input record of one user: reads/writes that user's `state` and emits full
    /// upserts or retractions. Must be deterministic (no clock, no randomness).
    fn process(&mut self, input: &Input, state: &mut dyn State, out: &mut dyn Emitter<Self::Output>) -> Result<(), Invalid>;

    /// An interval begins: work deferred by an earlier interval that did not end (its plan
    /// failed and will be redone from the checkpoint) must be forgotten. Default: nothing.
    fn begin_interval(&mut self) {}

    /// The end of an interval for `user` (after every record of the interval, before outputs
    /// are produced): a processor may defer work to here — e.g. recompute each key touched by
    /// many records once — and emit it now. `process` must then return `Err` only before it
    /// defers anything (a rejected record's state writes are undone; deferred work is not).
    /// Timers must not read deferred state. Default: nothing deferred.
    fn end_interval(&mut self, user: &str, state: &mut dyn State, out: &mut dyn Emitter<Self::Output>) {
        let _ = (user, state, out);
    }

    /// A timer armed with [`State::set_timer`] is due: stream time has reached it. It fires
    /// once, in timestamp order, with the user's state. Default: nothing to do.
    fn on_timer(&mut self, user: &str, name: &str, state: &mut dyn State, out: &mut dyn Emitter<Self::Output>) {
        let _ = (user, name, state, out);
    }
}

/// Which topics a processor reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inputs {
    /// The ingest lanes: HOT, COLD, CHANGE and domain changes.
    Lanes,
    /// Another processor's output (chained): `session_impact`.
    SessionImpacts,
}

impl Inputs {
    /// The topic names, in the order the runtime subscribes to them.
    pub fn topics(self, t: &vitals_schemas::topics::Topics) -> Vec<String> {
        match self {
            Inputs::Lanes => vec![t.hot.clone(), t.cold.clone(), t.change.clone(), t.domain.clone()],
            Inputs::SessionImpacts => vec![t.session_impact.clone()],
        }
    }
}

/// What the registry knows of a processor: its name and what it reads. What it writes is its
/// output type's descriptor ([`vitals_schemas::projection::Projected`]); how it is built and run
/// is the runtime's (`vitals_runtime::registry`).
#[derive(Debug, Clone, Copy)]
pub struct ProcessorInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// The topics it reads.
    pub inputs: Inputs,
}

/// What the runtime needs of an output record: a version stamp, the source offsets, and how to
/// write a retraction of a key.
pub trait Versioned: Sized {
    fn stamp(&mut self, epoch: i64, seq: i64, offsets: Vec<SourceOffset>);
    /// A retraction of `key`, an output key of `user` (`deleted = true`). The user is given, not
    /// parsed from the key, so user ids may contain any character.
    fn tombstone(user: &str, key: &str) -> Self;
}
