//! The in-memory test driver: runs a processor over records without Kafka, the way the runtime
//! would (one state per user, versions that only grow), so a processor's tests read like the
//! scenario they check: feed records, advance stream time, then look at the outputs and the
//! state. Timers fire as the runtime fires them: once stream time reaches them, in time order.

use std::collections::BTreeMap;

use crate::{Emitter, Input, Invalid, Processor, State};

/// One user's state: an ordered map, like the runtime's store, plus its armed timers.
#[derive(Debug, Default, Clone)]
pub struct MemState {
    pub map: BTreeMap<String, Vec<u8>>,
    /// Timer name → when it is due.
    pub timers: BTreeMap<String, i64>,
    stream_time_ms: i64,
    /// What each write of the current record replaced, to undo a rejected record's writes
    /// (instead of copying the whole state before every record).
    undo: Vec<Undo>,
    /// The keys the undo journal names, one after another (one buffer rather than a string per
    /// write): each entry names its key by its end in here.
    undo_keys: String,
}

#[derive(Debug, Clone)]
enum Undo {
    /// (end of the key in `undo_keys`, the value it replaced).
    Map(usize, Option<Vec<u8>>),
    Timer(usize, Option<i64>),
}

impl MemState {
    fn journal_key(&mut self, key: &str) -> usize {
        self.undo_keys.push_str(key);
        self.undo_keys.len()
    }

    /// Forgets the undo journal (the record's writes stand).
    fn clear_undo(&mut self) {
        self.undo.clear();
        self.undo_keys.clear();
    }

    fn rollback(&mut self) {
        while let Some(u) = self.undo.pop() {
            let end = match &u {
                Undo::Map(end, _) | Undo::Timer(end, _) => *end,
            };
            let start = match self.undo.last() {
                Some(Undo::Map(e, _) | Undo::Timer(e, _)) => *e,
                None => 0,
            };
            let k = self.undo_keys[start..end].to_owned();
            match u {
                Undo::Map(_, Some(v)) => {
                    self.map.insert(k, v);
                }
                Undo::Map(_, None) => {
                    self.map.remove(&k);
                }
                Undo::Timer(_, Some(at)) => {
                    self.timers.insert(k, at);
                }
                Undo::Timer(_, None) => {
                    self.timers.remove(&k);
                }
            }
        }
        self.undo_keys.clear();
    }
}

impl State for MemState {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }
    fn read(&self, key: &str, f: &mut dyn FnMut(&[u8])) -> bool {
        match self.map.get(key) {
            Some(v) => {
                f(v);
                true
            }
            None => false,
        }
    }
    fn put(&mut self, key: &str, value: Vec<u8>) {
        let old = self.map.insert(key.to_owned(), value);
        let end = self.journal_key(key);
        self.undo.push(Undo::Map(end, old));
    }
    fn delete(&mut self, key: &str) {
        if let Some(old) = self.map.remove(key) {
            let end = self.journal_key(key);
            self.undo.push(Undo::Map(end, Some(old)));
        }
    }
    fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.map.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
    fn stream_time_ms(&self) -> i64 {
        self.stream_time_ms
    }
    fn fail(&self, reason: String) {
        panic!("state unusable: {reason}");
    }
    fn set_timer(&mut self, name: &str, at_ms: i64) {
        let old = self.timers.insert(name.to_owned(), at_ms);
        let end = self.journal_key(name);
        self.undo.push(Undo::Timer(end, old));
    }
    fn cancel_timer(&mut self, name: &str) {
        if let Some(old) = self.timers.remove(name) {
            let end = self.journal_key(name);
            self.undo.push(Undo::Timer(end, Some(old)));
        }
    }
}

/// One emitted output with the version the driver gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted<T> {
    pub key: String,
    pub version: u64,
    /// `None` = retraction.
    pub value: Option<T>,
}

struct Collect<'a, T> {
    out: &'a mut Vec<Emitted<T>>,
    seq: &'a mut u64,
}

impl<T> Emitter<T> for Collect<'_, T> {
    fn upsert(&mut self, key: String, value: T) {
        *self.seq += 1;
        self.out.push(Emitted { key, version: *self.seq, value: Some(value) });
    }
    fn retract(&mut self, key: String) {
        *self.seq += 1;
        self.out.push(Emitted { key, version: *self.seq, value: None });
    }
}

pub struct Driver<P: Processor> {
    pub processor: P,
    pub states: BTreeMap<String, MemState>,
    /// Every output in emission order.
    pub log: Vec<Emitted<P::Output>>,
    seq: u64,
    /// Stream time: only moves forward.
    pub stream_time_ms: i64,
    /// Units refused by the shared rules (as the runtime dead-letters them), in order.
    pub refused: Vec<vitals_schemas::validate::Refused>,
}

/// An arrival order for `n` records: every index once, and every `dup_every`-th once more,
/// shuffled by a seeded xorshift (the same seed, the same order).
pub fn arrival_order(n: usize, dup_every: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).chain((0..n).step_by(dup_every.max(1))).collect();
    let mut x = seed | 1;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

impl<P: Processor> Driver<P>
where
    P::Output: Clone,
{
    pub fn new(processor: P) -> Driver<P> {
        Driver { processor, states: BTreeMap::new(), log: Vec::new(), seq: 0, stream_time_ms: 0, refused: Vec::new() }
    }

    /// As in the runtime: units the shared rules refuse are dropped (and kept in `refused`),
    /// the rest of the record goes on.
    fn valid_units<'a>(&mut self, input: &'a Input) -> std::borrow::Cow<'a, Input> {
        match crate::refuse_invalid_units(input) {
            Some((kept, refused)) => {
                self.refused.extend(refused);
                std::borrow::Cow::Owned(kept)
            }
            None => std::borrow::Cow::Borrowed(input),
        }
    }

    /// Feeds one record at the current stream time; returns what it emitted.
    pub fn feed(&mut self, input: &Input) -> Result<Vec<Emitted<P::Output>>, Invalid> {
        self.feed_at(self.stream_time_ms, input)
    }

    /// Feeds one record whose log timestamp is `ts_ms` (stream time becomes the greatest seen),
    /// then fires the timers that became due; returns everything emitted.
    pub fn feed_at(&mut self, ts_ms: i64, input: &Input) -> Result<Vec<Emitted<P::Output>>, Invalid> {
        self.stream_time_ms = self.stream_time_ms.max(ts_ms);
        let now = self.stream_time_ms;
        let input = self.valid_units(input);
        let input = input.as_ref();
        let state = self.states.entry(input.user_id().to_owned()).or_default();
        state.stream_time_ms = now;
        // A rejected record leaves no trace, as in the runtime.
        state.clear_undo();
        let mut out = Vec::new();
        if let Err(e) = self.processor.process(input, state, &mut Collect { out: &mut out, seq: &mut self.seq }) {
            state.rollback();
            // The record still moved stream time: due timers fire, as in the runtime.
            self.advance_to(now);
            return Err(e);
        }
        state.clear_undo();
        let user = input.user_id().to_owned();
        self.processor.end_interval(&user, state, &mut Collect { out: &mut out, seq: &mut self.seq });
        state.clear_undo();
        self.log.extend(out.iter().cloned());
        out.extend(self.advance_to(now));
        Ok(out)
    }

    /// Feeds records `(log timestamp, record)` as one interval of the runtime: each is processed
    /// (timers firing as stream time reaches them), then the interval ends for every user with
    /// input. Returns everything emitted; rejected records are counted in `rejected`.
    pub fn feed_interval(&mut self, records: &[(i64, Input)]) -> (Vec<Emitted<P::Output>>, usize) {
        self.processor.begin_interval();
        let mut out = Vec::new();
        let mut users = std::collections::BTreeSet::new();
        let mut rejected = 0;
        for (ts, input) in records {
            self.stream_time_ms = self.stream_time_ms.max(*ts);
            let now = self.stream_time_ms;
            let input = self.valid_units(input);
            let input = input.as_ref();
            users.insert(input.user_id().to_owned());
            let state = self.states.entry(input.user_id().to_owned()).or_default();
            state.stream_time_ms = now;
            state.clear_undo();
            let mut got = Vec::new();
            match self.processor.process(input, state, &mut Collect { out: &mut got, seq: &mut self.seq }) {
                Ok(()) => {
                    self.log.extend(got.iter().cloned());
                    out.extend(got);
                }
                Err(_) => {
                    state.rollback();
                    rejected += 1;
                }
            }
            state.clear_undo();
            out.extend(self.advance_to(now));
        }
        let mut ended = Vec::new();
        for user in users {
            let state = self.states.entry(user.clone()).or_default();
            self.processor.end_interval(&user, state, &mut Collect { out: &mut ended, seq: &mut self.seq });
            state.clear_undo();
        }
        self.log.extend(ended.iter().cloned());
        out.extend(ended);
        (out, rejected)
    }

    /// Feeds `inputs` in `order` (indexes, repeats allowed) as consecutive intervals of the
    /// sizes `cuts` gives, cycled (log timestamps 0); returns how many records were rejected.
    pub fn feed_in_intervals(&mut self, inputs: &[Input], order: &[usize], cuts: &[usize]) -> usize {
        let mut rejected = 0;
        let mut rest = order;
        let mut c = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = c.next().copied().unwrap_or(1).clamp(1, rest.len());
            let interval: Vec<(i64, Input)> = rest[..n].iter().map(|i| (0, inputs[*i].clone())).collect();
            rejected += self.feed_interval(&interval).1;
            rest = &rest[n..];
        }
        rejected
    }

    /// Moves stream time to `ts_ms` (if later) and fires every timer due by then, in time order
    /// (then user, then name); returns what they emitted.
    pub fn advance_to(&mut self, ts_ms: i64) -> Vec<Emitted<P::Output>> {
        self.stream_time_ms = self.stream_time_ms.max(ts_ms);
        let now = self.stream_time_ms;
        let mut out = Vec::new();
        loop {
            let due = self
                .states
                .iter()
                .flat_map(|(u, s)| s.timers.iter().filter(|(_, at)| **at <= now).map(move |(n, at)| (*at, u.clone(), n.clone())))
                .min();
            let Some((_, user, name)) = due else { break };
            let state = self.states.get_mut(&user).expect("the user of a timer has state");
            state.timers.remove(&name);
            state.stream_time_ms = now;
            let mut fired = Vec::new();
            self.processor.on_timer(&user, &name, state, &mut Collect { out: &mut fired, seq: &mut self.seq });
            state.clear_undo();
            self.log.extend(fired.iter().cloned());
            out.extend(fired);
        }
        out
    }

    /// The projection as a consumer that applies only newer versions would hold it: every key's
    /// latest value; retracted keys are absent.
    pub fn projection(&self) -> BTreeMap<String, P::Output> {
        let mut latest: BTreeMap<&str, &Emitted<P::Output>> = BTreeMap::new();
        for e in &self.log {
            match latest.get(e.key.as_str()) {
                Some(prev) if prev.version >= e.version => {}
                _ => {
                    latest.insert(&e.key, e);
                }
            }
        }
        latest.into_iter().filter_map(|(k, e)| e.value.clone().map(|v| (k.to_owned(), v))).collect()
    }
}
