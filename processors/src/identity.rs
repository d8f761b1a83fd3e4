//! Sample identity, shared by every processor that reads samples (DOMAIN.md, "Samples"):
//! identity is (source, source_record_id) within a user; a higher version replaces, the same or
//! a lower one is ignored; a deletion removes the versions it names (every version when it names
//! none), whatever order upserts and deletions arrive in.
//!
//! [`Identities`] keeps that per user in processor state; [`effective_samples`] is the batch
//! version the oracles use, so streaming and batch agree by construction on *which* samples count.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vitals_schemas::Sample;

use crate::{Input, State, StateExt};

const SEP: char = '\u{1f}';

/// What deletions of an identity have removed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub enum Deleted {
    /// Every version, now and later.
    All,
    /// Versions up to and including this one.
    UpTo(i64),
}

impl Deleted {
    /// Merges a further deletion (`None` = every version): the union of what both remove.
    pub fn merge(this: Option<Deleted>, version: Option<i64>) -> Deleted {
        match (this, version) {
            (Some(Deleted::All), _) | (_, None) => Deleted::All,
            (Some(Deleted::UpTo(a)), Some(b)) => Deleted::UpTo(a.max(b)),
            (None, Some(b)) => Deleted::UpTo(b),
        }
    }
}

/// What is held per identity.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Held {
    /// The highest version seen as an upsert.
    pub sample: Option<Sample>,
    pub deleted: Option<Deleted>,
}

impl Held {
    /// The sample that counts, if any.
    pub fn effective(&self) -> Option<&Sample> {
        let s = self.sample.as_ref()?;
        match self.deleted {
            Some(Deleted::All) => None,
            Some(Deleted::UpTo(v)) if s.version <= v => None,
            _ => Some(s),
        }
    }

    /// Applies an upsert; `false` when it is a duplicate or stale (nothing changed).
    pub fn upsert(&mut self, s: &Sample) -> bool {
        if self.sample.as_ref().is_some_and(|h| h.version >= s.version) {
            return false;
        }
        self.sample = Some(s.clone());
        true
    }

    /// Applies a deletion (`None` = every version).
    pub fn delete(&mut self, version: Option<i64>) {
        self.deleted = Some(Deleted::merge(self.deleted, version));
    }
}

/// The effective sample of an identity before and after a change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub before: Option<Sample>,
    pub after: Option<Sample>,
}

impl Change {
    pub fn is_noop(&self) -> bool {
        self.before == self.after
    }
}

/// The identities of one user, kept in processor state under `namespace`.
pub struct Identities<'a> {
    pub namespace: &'a str,
}

impl Identities<'_> {
    fn key(&self, source: &str, record: &str) -> String {
        format!("{}{SEP}{source}{SEP}{record}", self.namespace)
    }

    /// The effective sample of an identity.
    pub fn get(&self, state: &dyn State, source: &str, record: &str) -> Option<Sample> {
        state.get_json::<Held>(&self.key(source, record)).and_then(|h| h.effective().cloned())
    }

    /// Applies an upsert (sample batch or edit).
    pub fn upsert(&self, state: &mut dyn State, s: &Sample) -> Change {
        let key = self.key(&s.source, &s.source_record_id);
        let mut held: Held = state.get_json(&key).unwrap_or_default();
        let before = held.effective().cloned();
        if !held.upsert(s) {
            return Change { after: before.clone(), before };
        }
        let after = held.effective().cloned();
        state.put_json(&key, &held);
        Change { before, after }
    }

    /// Applies a deletion.
    pub fn delete(&self, state: &mut dyn State, source: &str, record: &str, version: Option<i64>) -> Change {
        let key = self.key(source, record);
        let mut held: Held = state.get_json(&key).unwrap_or_default();
        let before = held.effective().cloned();
        held.delete(version);
        let after = held.effective().cloned();
        state.put_json(&key, &held);
        Change { before, after }
    }
}

/// Batch: every user's effective samples after all of `inputs` (any order), sorted by
/// (source, source_record_id).
pub fn effective_samples(inputs: &[Input]) -> BTreeMap<String, Vec<Sample>> {
    let mut held: BTreeMap<(String, String, String), Held> = BTreeMap::new();
    for input in inputs {
        let user = input.user_id();
        fn at<'m>(held: &'m mut BTreeMap<(String, String, String), Held>, user: &str, source: &str, record: &str) -> &'m mut Held {
            held.entry((user.to_owned(), source.to_owned(), record.to_owned())).or_default()
        }
        match input {
            Input::Samples(b) => b.samples.iter().for_each(|s| {
                at(&mut held, user, &s.source, &s.source_record_id).upsert(s);
            }),
            Input::Changes(b) => {
                b.edits.iter().for_each(|s| {
                    at(&mut held, user, &s.source, &s.source_record_id).upsert(s);
                });
                for d in &b.deletions {
                    at(&mut held, user, &d.source, &d.source_record_id).delete(d.deleted_version);
                }
            }
            Input::Domain(_) | Input::SessionImpact(_) => {}
        }
    }
    let mut out: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for ((user, _, _), h) in held {
        if let Some(s) = h.effective() {
            out.entry(user).or_default().push(s.clone());
        }
    }
    out
}
