//! The in-memory test driver: runs a processor over records without Kafka, the way the runtime
//! would (one state per user, versions that only grow), so a processor's tests read like the
//! scenario they check: feed records, then look at the outputs and the state.

use std::collections::BTreeMap;

use crate::{Emitter, Input, Invalid, Processor, State};

/// One user's state: an ordered map, like the runtime's store.
#[derive(Debug, Default, Clone)]
pub struct MemState(pub BTreeMap<String, Vec<u8>>);

impl State for MemState {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.get(key).cloned()
    }
    fn put(&mut self, key: &str, value: Vec<u8>) {
        self.0.insert(key.to_owned(), value);
    }
    fn delete(&mut self, key: &str) {
        self.0.remove(key);
    }
    fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.0.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
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
}

impl<P: Processor> Driver<P>
where
    P::Output: Clone,
{
    pub fn new(processor: P) -> Driver<P> {
        Driver { processor, states: BTreeMap::new(), log: Vec::new(), seq: 0 }
    }

    /// Feeds one record; returns what it emitted.
    pub fn feed(&mut self, input: &Input) -> Result<Vec<Emitted<P::Output>>, Invalid> {
        let state = self.states.entry(input.user_id().to_owned()).or_default();
        let mut out = Vec::new();
        self.processor.process(input, state, &mut Collect { out: &mut out, seq: &mut self.seq })?;
        self.log.extend(out.iter().cloned());
        Ok(out)
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
