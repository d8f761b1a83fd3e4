//! A simulated cluster for the takeover property tests: the real [`Task`] (real redb stores,
//! real snapshots by export/import) over in-memory logs, with owners that take over from a random
//! earlier checkpoint, each with its own random batch boundaries and lane interleaving, and
//! zombies — previous owners that keep writing after a takeover without reading their output
//! partition (the worst case: a long pause between their last look and their write).
//!
//! What comes out is the output partition as a log; [`Sim::fold_by_version`] is what a consumer
//! that keeps the newest version per key holds, [`Sim::fold_as_compaction`] what a compacted
//! topic keeps (the last record per key by offset). Each processor's tests check both against
//! its batch oracle.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vitals_schemas::topics::Topics;

use super::store::Store;
use super::task::{Fenced, InBody, InRecord, Lanes, Out, Seen, Tail, Task};

use vitals_processors::{Input, Inputs, Processor, Versioned};

/// One record of the output partition.
#[derive(Debug, Clone)]
pub struct OutRec<T> {
    pub key: String,
    pub user: String,
    pub epoch: i64,
    pub owner: u64,
    pub seq: i64,
    pub source: BTreeMap<String, i64>,
    pub marker: bool,
    pub retraction: bool,
    /// The interval attempt that wrote it, and for a marker the rows of its user it vouches for.
    pub interval: String,
    pub vouches: u64,
    pub value: T,
}

/// A deterministic random source (xorshift), so a proptest seed replays a whole scenario.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

struct Owner<P> {
    task: Task,
    processor: P,
    /// Committed snapshots of this owner (exports), oldest first.
    checkpoints: Vec<Vec<u8>>,
    /// How many more intervals it writes as a zombie after losing the partition.
    zombie_budget: usize,
}

/// The scenario's knobs (all drawn from one seed by the caller's proptest).
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    /// How many takeovers happen (each from a random earlier checkpoint of any owner, or empty).
    pub takeovers: usize,
    /// Most intervals a zombie writes after losing the partition.
    pub max_zombie_steps: usize,
    /// `processor_epochs` is lost before a takeover: epochs restart at 1 there.
    pub epochs_lost: bool,
}

pub struct Sim<P: Processor> {
    lanes: Lanes,
    inputs: BTreeMap<String, Vec<(i64, Input)>>,
    pub out: Vec<OutRec<P::Output>>,
    dir: PathBuf,
    made: usize,
    /// What `processor_epochs` would hand out next.
    next_epoch: i64,
    /// The final owner's stream time (for oracles that depend on it).
    pub stream_time_ms: i64,
    /// (interval, user) of every row that an owner dying mid-produce lost.
    lost: std::collections::BTreeSet<(String, String)>,
}

/// The topics of the simulation.
pub fn topics() -> Topics {
    Topics::with_prefix("sim.")
}

impl<P> Sim<P>
where
    P: Processor,
    P::Output: Versioned + Serialize + DeserializeOwned + Clone,
{
    /// `records`: (topic, log timestamp, input) in the order they are appended to their lanes.
    pub fn new(inputs: Inputs, records: Vec<(String, i64, Input)>) -> Sim<P> {
        let mut by_topic: BTreeMap<String, Vec<(i64, Input)>> = BTreeMap::new();
        for (t, ts, i) in records {
            by_topic.entry(t).or_default().push((ts, i));
        }
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vitals-sim-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Sim {
            lanes: Lanes { topics: topics(), inputs, partitions: None },
            inputs: by_topic,
            out: Vec::new(),
            dir,
            made: 0,
            next_epoch: 1,
            stream_time_ms: 0,
            lost: Default::default(),
        }
    }

    fn path(&mut self) -> PathBuf {
        self.made += 1;
        self.dir.join(format!("o{}.redb", self.made))
    }

    /// A new owner from `snapshot` (or empty): it bumps the epoch, reads its output partition
    /// from the checkpoint's tail position to the end and raises its epoch above what it found.
    fn take(&mut self, processor: P, snapshot: Option<&[u8]>) -> Owner<P> {
        let path = self.path();
        let store = match snapshot {
            Some(b) => Store::import(&path, b).expect("import"),
            None => Store::open(&path).expect("open"),
        };
        let mut epoch = self.next_epoch;
        self.next_epoch += 1;
        let owner = self.made as u64;
        let mut task = Task::new(store, 0, epoch, owner).expect("task");
        let mut tail: Tail = task.tail.clone();
        for s in self.seen_from(tail.next) {
            tail.read(&s, i64::MAX, 0).expect("nothing is newer");
        }
        if tail.max_epoch >= epoch {
            epoch = tail.max_epoch + 1;
            self.next_epoch = epoch + 1;
        }
        task.epoch = epoch;
        task.tail = tail;
        Owner { task, processor, checkpoints: Vec::new(), zombie_budget: 0 }
    }

    fn seen_from(&self, from: i64) -> Vec<Seen> {
        self.out
            .iter()
            .enumerate()
            .skip(from.max(0) as usize)
            .map(|(o, r)| Seen {
                offset: o as i64,
                key: r.key.clone(),
                user: r.user.clone(),
                epoch: r.epoch,
                owner: r.owner,
                source: r.source.clone(),
                marker: r.marker,
            })
            .collect()
    }

    /// Whether `o` has read every input record.
    fn input_done(&self, o: &Owner<P>) -> bool {
        self.inputs.iter().all(|(t, recs)| o.task.next_offset(t) >= recs.len() as i64)
    }

    /// One interval of `o`: a random batch (random size, random lanes, each lane in offset order
    /// from the owner's position), then produce, then commit. A live owner first reads a random
    /// part of its output partition; a zombie reads nothing (it does not know it lost).
    fn step(&mut self, o: &mut Owner<P>, rng: &mut Rng, live: bool, drain_tail: bool) -> Result<(), Fenced> {
        self.attempt(o, rng, live, drain_tail, false)
    }

    /// One interval; `dying`: the owner fails while producing it (a record refused for good): a
    /// random part of its records is lost, those after a lost one may still land, nothing is
    /// committed, and the owner is gone.
    fn attempt(&mut self, o: &mut Owner<P>, rng: &mut Rng, live: bool, drain_tail: bool, dying: bool) -> Result<(), Fenced> {
        if live {
            let end = self.out.len() as i64;
            let upto = if drain_tail { end } else { o.task.tail.next + rng.below((end - o.task.tail.next + 1).max(1) as usize) as i64 };
            for s in self.seen_from(o.task.tail.next).into_iter().take_while(|s| s.offset < upto) {
                o.task.observe(&s)?;
            }
        }
        let n = 1 + rng.below(8);
        let mut msgs = Vec::new();
        let mut cursor: BTreeMap<String, i64> = self.inputs.keys().map(|t| (t.clone(), o.task.next_offset(t))).collect();
        for _ in 0..n {
            let open: Vec<&String> = cursor.iter().filter(|(t, c)| **c < self.inputs[*t].len() as i64).map(|(t, _)| t).collect();
            if open.is_empty() {
                break;
            }
            let t = open[rng.below(open.len())].clone();
            let c = cursor[&t];
            let (ts, input) = &self.inputs[&t][c as usize];
            msgs.push(InRecord {
                topic: t.clone(),
                offset: c,
                ts_ms: Some(*ts),
                key: None,
                payload: None,
                traceparent: None,
                body: InBody::Input(input.clone()),
            });
            *cursor.get_mut(&t).unwrap() += 1;
        }
        let planned = o.task.plan(&mut o.processor, &self.lanes, "sim", msgs).expect("plan");
        let source: BTreeMap<String, i64> = planned.source.iter().map(|s| (s.topic.clone(), s.next_offset)).collect();
        for r in &planned.records {
            let (key, user, seq, value, marker, retraction, vouches) = match r {
                Out::Row { key, user, seq, value, retraction } => (key, user, *seq, value, false, *retraction, 0),
                Out::Marker { key, user, seq, value, rows } => (key, user, *seq, value, true, true, *rows),
                Out::Dead { .. } => continue,
            };
            if dying && rng.chance(30) {
                if !marker {
                    self.lost.insert((planned.interval.clone(), user.clone()));
                }
                continue;
            }
            let interval = planned.interval.clone();
            self.out.push(OutRec {
                key: key.clone(),
                user: user.clone(),
                epoch: planned.epoch,
                owner: o.task.owner,
                seq,
                source: source.clone(),
                marker,
                retraction,
                interval,
                vouches,
                value: value.clone(),
            });
        }
        if dying {
            return Ok(());
        }
        o.task.commit(planned).expect("commit");
        o.checkpoints.push(o.task.store.export().expect("export"));
        self.stream_time_ms = self.stream_time_ms.max(o.task.cp.stream_time_ms);
        Ok(())
    }

    /// A live step; a fenced owner (only a silent zombie that shares or exceeds its epoch after
    /// `processor_epochs` was lost can fence it here) is taken again from its own checkpoint,
    /// under an epoch above everything in the partition, as the runtime does after its grace.
    fn live_step(&mut self, o: Owner<P>, make: &impl Fn() -> P, rng: &mut Rng, drain: bool) -> Owner<P> {
        let mut o = o;
        if self.step(&mut o, rng, true, drain).is_err() {
            let snapshot = o.task.store.export().expect("export");
            let checkpoints = std::mem::take(&mut o.checkpoints);
            let mut again = self.take(make(), Some(&snapshot));
            again.checkpoints = checkpoints;
            return again;
        }
        o
    }

    /// Runs the scenario to quiescence: every input read by the last owner, its output partition
    /// read to the end and every pending key answered, every zombie's budget spent.
    pub fn run(&mut self, make: impl Fn() -> P, sc: &Scenario) {
        let mut rng = Rng::new(sc.seed);
        let mut owners: Vec<Owner<P>> = vec![self.take(make(), None)];
        for _ in 0..sc.takeovers {
            let cur = owners.len() - 1;
            // The current owner runs a while (it may read everything, or nothing).
            let steps = rng.below(12);
            for _ in 0..steps {
                let o = owners.pop().unwrap();
                let o = self.live_step(o, &make, &mut rng, false);
                owners.push(o);
                self.zombies(&mut owners[..cur], &mut rng);
            }
            // The takeover: from a random committed checkpoint of any owner so far, or empty.
            let all: Vec<&Vec<u8>> = owners.iter().flat_map(|o| o.checkpoints.iter()).collect();
            let pick = rng.below(all.len() + 1);
            let snapshot = all.get(pick).map(|b| b.to_vec());
            owners.last_mut().unwrap().zombie_budget = rng.below(sc.max_zombie_steps + 1);
            // Or it dies producing an interval (the runtime stops on an output it cannot get
            // acknowledged): part of that interval is in the partition, uncommitted.
            if rng.chance(40) {
                let mut o = owners.pop().unwrap();
                let _ = self.attempt(&mut o, &mut rng, true, false, true);
                o.zombie_budget = 0;
                owners.push(o);
            }
            if sc.epochs_lost {
                self.next_epoch = 1;
            }
            let next = self.take(make(), snapshot.as_deref());
            owners.push(next);
        }
        // The last owner runs to the end, zombies interleaved.
        let mut guard = 0;
        loop {
            guard += 1;
            assert!(guard < 10_000, "the simulation does not quiesce");
            let zombies_left = owners[..owners.len() - 1].iter().any(|o| o.zombie_budget > 0);
            let o = owners.pop().unwrap();
            let done = self.input_done(&o) && o.task.tail.next >= self.out.len() as i64 && o.task.tail.pending() == 0;
            if done && !zombies_left {
                owners.push(o);
                break;
            }
            let drain = rng.chance(30);
            let o = self.live_step(o, &make, &mut rng, drain);
            owners.push(o);
            let n = owners.len() - 1;
            self.zombies(&mut owners[..n], &mut rng);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        self.check_vouches();
    }

    /// What a sink reading the partition believes of each marker: exactly the markers whose
    /// attempt lost no row of their user ([`vitals_schemas::vouch`]).
    fn check_vouches(&self) {
        let mut reader = vitals_schemas::vouch::Vouches::default();
        for (offset, r) in self.out.iter().enumerate() {
            if !r.marker {
                reader.row("out", 0, &r.user, Some(&r.interval));
                continue;
            }
            let belief = reader.marker("out", 0, &r.user, Some(&vitals_schemas::vouch::vouch(&r.interval, r.vouches)));
            let complete = !self.lost.contains(&(r.interval.clone(), r.user.clone()));
            assert_eq!(
                belief.believed(),
                complete,
                "marker of {} at offset {offset} (attempt {}, {} rows): believed {belief:?}, rows complete {complete}",
                r.user,
                r.interval,
                r.vouches
            );
        }
    }

    /// Now and then a zombie with budget left writes one more interval.
    fn zombies(&mut self, zs: &mut [Owner<P>], rng: &mut Rng) {
        for z in zs.iter_mut() {
            if z.zombie_budget > 0 && rng.chance(40) {
                z.zombie_budget -= 1;
                self.step(z, rng, false, false).expect("a zombie reads nothing, so nothing fences it");
            }
        }
    }

    /// The newest version of every key (markers apart); retracted keys are absent.
    pub fn fold_by_version(&self) -> BTreeMap<String, P::Output> {
        let mut newest: BTreeMap<&str, &OutRec<P::Output>> = BTreeMap::new();
        for r in self.out.iter().filter(|r| !r.marker) {
            if newest.get(r.key.as_str()).is_none_or(|h| (h.epoch, h.seq) < (r.epoch, r.seq)) {
                newest.insert(&r.key, r);
            }
        }
        newest.into_iter().filter(|(_, r)| !r.retraction).map(|(k, r)| (k.to_owned(), unstamped(&r.value))).collect()
    }

    /// What log compaction keeps: the last record of every key by offset.
    pub fn fold_as_compaction(&self) -> BTreeMap<String, P::Output> {
        let mut last: BTreeMap<&str, &OutRec<P::Output>> = BTreeMap::new();
        for r in self.out.iter().filter(|r| !r.marker) {
            last.insert(&r.key, r);
        }
        last.into_iter().filter(|(_, r)| !r.retraction).map(|(k, r)| (k.to_owned(), unstamped(&r.value))).collect()
    }
}

impl<P> Sim<P>
where
    P: Processor,
    P::Output: Versioned + Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug,
{
    /// The property every takeover test ends with: the output partition folded by version and
    /// as compaction keeps it both equal `expected` (the oracle).
    pub fn check_folds(&self, expected: &BTreeMap<String, P::Output>) -> Result<(), proptest::test_runner::TestCaseError> {
        proptest::prop_assert_eq!(&self.fold_by_version(), expected, "by version");
        proptest::prop_assert_eq!(&self.fold_as_compaction(), expected, "as compaction keeps it");
        Ok(())
    }
}

/// A value without its version and source offsets, as oracles compute them.
pub fn unstamped<T: Versioned + Clone>(v: &T) -> T {
    let mut v = v.clone();
    v.stamp(0, 0, Vec::new());
    v
}

/// The input records of a simulation: each input on its lane (samples to HOT or COLD as bit
/// `n % 64` of `cold_bits` says), with the log timestamp `ts(n)`.
pub fn on_lanes(inputs: &[Input], cold_bits: u64, ts: impl Fn(usize) -> i64) -> Vec<(String, i64, Input)> {
    let t = topics();
    let lane = |n: usize, input: &Input| match input {
        Input::Samples(_) if (cold_bits >> (n % 64)) & 1 == 1 => t.cold.clone(),
        Input::Samples(_) => t.hot.clone(),
        Input::Changes(_) => t.change.clone(),
        Input::Domain(_) => t.domain.clone(),
        Input::SessionImpact(_) => t.session_impact.clone(),
    };
    inputs.iter().enumerate().map(|(n, i)| (lane(n, i), ts(n), i.clone())).collect()
}
