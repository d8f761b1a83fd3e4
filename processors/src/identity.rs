//! Sample identity, shared by every processor that reads samples (DOMAIN.md, "Samples"):
//! identity is (source, source_record_id) within a user; a higher version replaces, the same or
//! a lower one is ignored; a deletion removes the versions it names (every version when it names
//! none), whatever order upserts and deletions arrive in.
//!
//! [`Identities`] keeps that per user in processor state; [`effective_samples`] is the batch
//! version the oracles use, so streaming and batch agree by construction on *which* samples count.
//!
//! In state an identity is one compact binary value ([`Held::encode`]): what deletions removed,
//! and of the highest version only what its processor reads ([`Keep`]). Source and record id are
//! the key and are not repeated; `unit` and `metadata` are read by no processor and are not kept.

use std::collections::BTreeMap;

use vitals_schemas::Sample;

use crate::codec::{kind_code, kind_of, R, W};
use crate::keys::{self, Sources};
use crate::{Input, State};

const SEP: char = '\u{1f}';

/// The first byte of an identity value. Anything else is refused, never misread: an older
/// build's JSON value starts with `{`.
const FORMAT: u8 = 1;

/// What deletions of an identity have removed.
#[derive(Debug, Clone, Copy, PartialEq)]
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

/// Which fields of a held sample a processor reads, beyond those every one does (source, record
/// id, source kind, metric, start, end, version). A field not kept reads back as empty: `0.0`,
/// `None`, `""`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub value: bool,
    pub category: bool,
    pub time_zone: bool,
}

impl Keep {
    /// Every field that is ever kept.
    pub const ALL: Keep = Keep { value: true, category: true, time_zone: true };
}

/// What is held per identity.
#[derive(Debug, Clone, Default, PartialEq)]
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

    /// This identity as state holds it: the fields `keep` does not name, `unit` and `metadata`
    /// emptied. What [`Held::decode`] returns.
    pub fn kept(mut self, keep: Keep) -> Held {
        if let Some(s) = &mut self.sample {
            s.unit.clear();
            s.metadata.clear();
            if !keep.value {
                s.value = 0.0;
            }
            if !keep.category {
                s.category = None;
            }
            if !keep.time_zone {
                s.time_zone.clear();
            }
        }
        self
    }

    /// The state value: [`FORMAT`]; a tag byte (bits 0–1 deletion: none, every version, up to
    /// a version that follows; bit 2 a sample follows; bits 3–4 its value: not kept, an integer,
    /// an `f32`, an `f64`; bit 5 a category follows; bit 6 a time zone follows); then the
    /// deleted version (zigzag varint); then the sample: version (zigzag), source kind (byte),
    /// metric (a [`METRICS`] code, or 0 and the name), start (zigzag), end − start (zigzag,
    /// wrapping), the value (an integer as zigzag, else 4 or 8 bytes little-endian; exact in
    /// every case), the category (a [`CATEGORIES`] code, or 0 and the name), the time zone
    /// (length-prefixed). The sample's source and record id are the key: not written.
    pub fn encode(&self, keep: Keep) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(32));
        w.0.push(FORMAT);
        let mut tag = match self.deleted {
            None => 0,
            Some(Deleted::All) => 1,
            Some(Deleted::UpTo(_)) => 2,
        };
        let value = self.sample.as_ref().filter(|_| keep.value).map(|s| Value::of(s.value));
        let category = self.sample.as_ref().filter(|_| keep.category).and_then(|s| s.category.as_deref());
        if self.sample.is_some() {
            tag |= 1 << 2;
            tag |= value.as_ref().map_or(0, Value::code) << 3;
            tag |= u8::from(category.is_some()) << 5;
            tag |= u8::from(keep.time_zone) << 6;
        }
        w.0.push(tag);
        if let Some(Deleted::UpTo(v)) = self.deleted {
            w.i(v);
        }
        if let Some(s) = &self.sample {
            w.i(s.version);
            w.0.push(kind_code(s.source_kind));
            name(&mut w, &METRICS, &s.metric);
            w.i(s.start_ms);
            w.i(s.end_ms.wrapping_sub(s.start_ms));
            match value {
                None => {}
                Some(Value::Int(x)) => w.i(x),
                Some(Value::F32(x)) => w.0.extend_from_slice(&x.to_le_bytes()),
                Some(Value::F64(x)) => w.0.extend_from_slice(&x.to_le_bytes()),
            }
            if let Some(c) = category {
                name(&mut w, &CATEGORIES, c);
            }
            if keep.time_zone {
                w.s(&s.time_zone);
            }
        }
        w.0
    }

    /// Reads a value of [`Held::encode`]: the identity `(source, record)` (its key) as state
    /// holds it. Bytes that are not such a value (another format, truncated, trailing, a code
    /// this build does not know) are an error, never a panic.
    pub fn decode(bytes: &[u8], source: &str, record: &str) -> Result<Held, String> {
        let mut r = R(bytes);
        let f = r.byte()?;
        if f != FORMAT {
            return Err(format!("identity value of format {f}, this build reads {FORMAT}"));
        }
        let tag = r.byte()?;
        if tag & 0x80 != 0 {
            return Err(format!("identity tag {tag:#04x}"));
        }
        let deleted = match tag & 0b11 {
            0 => None,
            1 => Some(Deleted::All),
            2 => Some(Deleted::UpTo(r.i()?)),
            _ => return Err(format!("identity tag {tag:#04x}")),
        };
        let sample = if tag & (1 << 2) == 0 {
            if tag & !0b11 != 0 {
                return Err(format!("identity tag {tag:#04x} without a sample"));
            }
            None
        } else {
            let version = r.i()?;
            let source_kind = kind_of(r.byte()?)?;
            let metric = read_name(&mut r, &METRICS)?;
            let start_ms = r.i()?;
            let end_ms = start_ms.wrapping_add(r.i()?);
            let value = match (tag >> 3) & 0b11 {
                0 => 0.0,
                1 => r.i()? as f64,
                2 => f64::from(f32::from_le_bytes(r.take(4)?.try_into().map_err(|_| "truncated")?)),
                _ => f64::from_le_bytes(r.take(8)?.try_into().map_err(|_| "truncated")?),
            };
            let category = if tag & (1 << 5) != 0 { Some(read_name(&mut r, &CATEGORIES)?) } else { None };
            let time_zone = if tag & (1 << 6) != 0 { r.s()?.to_owned() } else { String::new() };
            Some(Sample {
                source: source.to_owned(),
                source_kind,
                source_record_id: record.to_owned(),
                metric,
                start_ms,
                end_ms,
                value,
                unit: String::new(),
                category,
                time_zone,
                version,
                metadata: Default::default(),
            })
        };
        r.end()?;
        Ok(Held { sample, deleted })
    }
}

/// A value as written: the shortest exact form.
enum Value {
    /// An integer-valued float within ±2^53 (not −0.0).
    Int(i64),
    F32(f32),
    F64(f64),
}

impl Value {
    fn of(v: f64) -> Value {
        const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: every integer up to it is exact
        if v.fract() == 0.0 && v.abs() <= EXACT && !(v == 0.0 && v.is_sign_negative()) {
            return Value::Int(v as i64);
        }
        let f = v as f32;
        if f64::from(f).to_bits() == v.to_bits() {
            return Value::F32(f);
        }
        Value::F64(v)
    }
    fn code(&self) -> u8 {
        match self {
            Value::Int(_) => 1,
            Value::F32(_) => 2,
            Value::F64(_) => 3,
        }
    }
}

/// Codes of the catalog's metric names in identity values (code = position + 1; 0 = the name
/// follows as text). **Append only**: the codes are in stored state.
pub(crate) const METRICS: [&str; 16] = [
    "steps",
    "active_energy",
    "basal_energy",
    "distance",
    "flights",
    "heart_rate",
    "resting_heart_rate",
    "hrv_sdnn",
    "spo2",
    "respiratory_rate",
    "body_temperature",
    "blood_glucose",
    "sleep_stage",
    "mindful",
    "body_mass",
    "vo2max",
];

/// Codes of the catalog's categories, as [`METRICS`]. **Append only.**
const CATEGORIES: [&str; 7] = ["in_bed", "awake", "core", "deep", "rem", "asleep_unspecified", "mindful"];

pub(crate) fn name(w: &mut W, table: &[&str], s: &str) {
    match table.iter().position(|n| *n == s) {
        Some(i) => w.u(i as u64 + 1),
        None => {
            w.u(0);
            w.s(s);
        }
    }
}

pub(crate) fn read_name(r: &mut R, table: &[&str]) -> Result<String, String> {
    match r.u()? {
        0 => Ok(r.s()?.to_owned()),
        c => table.get(c as usize - 1).map(|n| (*n).to_owned()).ok_or_else(|| format!("name code {c} of {}", table.len())),
    }
}

/// The effective sample of an identity before and after a change, as state holds it
/// ([`Held::kept`]).
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

/// Where a processor that keeps identities through [`Identities`] keeps its user's source
/// dictionary ([`Sources`]).
pub const SOURCES_KEY: &str = "src";

/// The identities of one user, kept in processor state under `namespace`, with the fields
/// `keep` names. A key is `namespace`, U+001F, then the identity as [`keys::push_identity`]
/// writes it: the source's code in the user's [`Sources`] (loaded once per record with
/// [`Identities::sources`]) and the record id (a UUID as 16 packed bytes).
pub struct Identities<'a> {
    pub namespace: &'a str,
    pub keep: Keep,
}

impl Identities<'_> {
    /// The user's source dictionary.
    pub fn sources(&self, state: &dyn State) -> Sources {
        Sources::load(state, SOURCES_KEY)
    }

    fn key(&self, code: u64, record: &str) -> String {
        let mut k = String::with_capacity(self.namespace.len() + 24);
        k.push_str(self.namespace);
        k.push(SEP);
        keys::push_identity(&mut k, code, record);
        k
    }

    /// What state holds of an identity; a value that does not decode fails the task
    /// ([`State::fail`]), it is never read as "nothing held".
    fn load(&self, state: &dyn State, key: &str, source: &str, record: &str) -> Held {
        let mut held = Ok(Held::default());
        state.read(key, &mut |v| held = Held::decode(v, source, record));
        held.unwrap_or_else(|e| {
            state.fail(format!("state value {:?} does not deserialise: {e}", keys::printable(key)));
            Held::default()
        })
    }

    /// The effective sample of an identity (a source the dictionary does not name holds none).
    pub fn get(&self, state: &dyn State, sources: &Sources, source: &str, record: &str) -> Option<Sample> {
        let code = sources.code(source)?;
        let held = self.load(state, &self.key(code, record), source, record);
        held.effective().cloned()
    }

    /// Applies an upsert (sample batch or edit).
    pub fn upsert(&self, state: &mut dyn State, sources: &mut Sources, s: &Sample) -> Change {
        let code = sources.code_or_add(state, &s.source);
        let key = self.key(code, &s.source_record_id);
        let mut held = self.load(state, &key, &s.source, &s.source_record_id);
        let before = held.effective().cloned();
        if !held.upsert(s) {
            return Change { after: before.clone(), before };
        }
        let held = held.kept(self.keep);
        let after = held.effective().cloned();
        state.put(&key, held.encode(self.keep));
        Change { before, after }
    }

    /// Applies a deletion.
    pub fn delete(&self, state: &mut dyn State, sources: &mut Sources, source: &str, record: &str, version: Option<i64>) -> Change {
        let code = sources.code_or_add(state, source);
        let key = self.key(code, record);
        let mut held = self.load(state, &key, source, record);
        let before = held.effective().cloned();
        held.delete(version);
        let after = held.effective().cloned();
        state.put(&key, held.encode(self.keep));
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use vitals_schemas::{Catalog, SourceKind};

    use super::*;

    fn kind() -> impl Strategy<Value = SourceKind> {
        (0u8..4).prop_map(|k| kind_of(k).unwrap())
    }

    /// Finite floats of every shape: integers (small, ±2^53 and beyond), `f32`-exact fractions,
    /// any `f64` bits, ±0.
    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<i32>().prop_map(f64::from),
            any::<i64>().prop_map(|x| x as f64),
            Just(9_007_199_254_740_992.0),
            Just(9_007_199_254_740_994.0),
            Just(-0.0),
            Just(0.0),
            any::<f32>().prop_filter("finite", |f| f.is_finite()).prop_map(f64::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
        ]
    }

    /// Catalog names (coded) and arbitrary text, unicode included (written out).
    fn name(table: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![proptest::sample::select(table).prop_map(str::to_owned), any::<String>()]
    }

    fn extreme() -> impl Strategy<Value = i64> {
        prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0), Just(-1), any::<i64>(), 1_600_000_000_000i64..1_900_000_000_000]
    }

    fn sample(source: String, record: String) -> impl Strategy<Value = Sample> {
        (
            kind(),
            name(&METRICS),
            (extreme(), extreme(), value(), extreme()),
            any::<String>(),
            proptest::option::of(name(&CATEGORIES)),
            any::<String>(),
            proptest::collection::hash_map(any::<String>(), any::<String>(), 0..3),
        )
            .prop_map(move |(source_kind, metric, (start_ms, end_ms, value, version), unit, category, time_zone, metadata)| {
                Sample {
                    source: source.clone(),
                    source_kind,
                    source_record_id: record.clone(),
                    metric,
                    start_ms,
                    end_ms,
                    value,
                    unit,
                    category,
                    time_zone,
                    version,
                    metadata,
                }
            })
    }

    fn deleted() -> impl Strategy<Value = Option<Deleted>> {
        proptest::option::of(prop_oneof![Just(Deleted::All), extreme().prop_map(Deleted::UpTo)])
    }

    /// An identity `(source, record)` and what is held for it.
    fn held() -> impl Strategy<Value = (String, String, Held)> {
        (any::<String>(), any::<String>()).prop_flat_map(|(source, record)| {
            (proptest::option::of(sample(source.clone(), record.clone())), deleted())
                .prop_map(move |(sample, deleted)| (source.clone(), record.clone(), Held { sample, deleted }))
        })
    }

    fn keep() -> impl Strategy<Value = Keep> {
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(value, category, time_zone)| Keep { value, category, time_zone })
    }

    proptest! {
        #[test]
        fn an_identity_round_trips_with_what_its_processor_keeps((source, record, held) in held(), keep in keep()) {
            let bytes = held.encode(keep);
            let back = Held::decode(&bytes, &source, &record).unwrap();
            prop_assert_eq!(&back, &held.clone().kept(keep));
            // What is kept is kept exactly (the bits of the value, -0.0 included).
            if let (Some(a), Some(b)) = (&held.sample, &back.sample) {
                prop_assert_eq!(b.value.to_bits(), if keep.value { a.value.to_bits() } else { 0.0f64.to_bits() });
            }
            // Decoding what was decoded changes nothing: the held form is a fixed point.
            prop_assert_eq!(back.encode(keep), bytes);
            // Every field kept: all but unit and metadata.
            let all = Held::decode(&held.encode(Keep::ALL), &source, &record).unwrap();
            let mut expect = held.clone();
            if let Some(s) = &mut expect.sample {
                s.unit.clear();
                s.metadata.clear();
            }
            prop_assert_eq!(all, expect);
        }

        #[test]
        fn garbage_is_an_error_never_a_panic(ours in any::<bool>(), mut bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            // Half of the cases past the format byte, into the tag and the fields.
            if ours {
                bytes.insert(0, FORMAT);
            }
            // Whatever it returns, it does not panic; a foreign first byte is refused.
            let r = Held::decode(&bytes, "s", "r");
            if bytes.first() != Some(&FORMAT) {
                prop_assert!(r.is_err());
            }
        }

        #[test]
        fn a_damaged_value_is_an_error_never_a_panic((source, record, held) in held(), keep in keep(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
            let bytes = held.encode(keep);
            // Truncated anywhere: refused.
            let n = cut.index(bytes.len());
            prop_assert!(Held::decode(&bytes[..n], &source, &record).is_err());
            // Trailing bytes: refused.
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(Held::decode(&longer, &source, &record).is_err());
            // A byte changed: an error or some identity, never a panic.
            let mut changed = bytes;
            let i = flip.0.index(changed.len());
            changed[i] ^= flip.1;
            let _ = Held::decode(&changed, &source, &record);
        }
    }

    /// A value of the JSON layout (format 1 of the processors that kept it) is refused.
    #[test]
    fn an_older_builds_json_value_is_refused() {
        let json = br#"{"sample":{"source":"w","source_kind":"watch","source_record_id":"r","metric":"heart_rate","start_ms":1,"end_ms":1,"value":61.0,"unit":"count/min","category":null,"time_zone":"UTC","version":1,"metadata":{}},"deleted":null}"#;
        let err = Held::decode(json, "w", "r").unwrap_err();
        assert!(err.contains("format 123"), "{err}");
    }

    /// The code tables name every metric and category of the catalog (a name without a code is
    /// still kept, as text: this is about size, not correctness).
    #[test]
    fn every_catalog_name_has_a_code() {
        let catalog = Catalog::embedded();
        for (name, m) in catalog.metrics.iter() {
            assert!(METRICS.contains(&name.as_str()), "metric {name}: append it to identity::METRICS");
            for c in &m.categories {
                assert!(CATEGORIES.contains(&c.as_str()), "category {c}: append it to identity::CATEGORIES");
            }
        }
    }

    /// The common case is small: a heart-rate reading session_impact keeps.
    #[test]
    fn a_reading_takes_a_few_bytes() {
        let s = Sample {
            source: "com.apple.health.watch".into(),
            source_kind: SourceKind::Watch,
            source_record_id: "3f2c8a0e-5b1d-4c7e-9a60-1d2e3f405162".into(),
            metric: "heart_rate".into(),
            start_ms: 1_764_000_000_000,
            end_ms: 1_764_000_000_000,
            value: 61.0,
            unit: "count/min".into(),
            category: None,
            time_zone: "Europe/Berlin".into(),
            version: 1,
            metadata: Default::default(),
        };
        let held = Held { sample: Some(s), deleted: None };
        let bytes = held.encode(Keep { value: true, category: false, time_zone: false });
        assert_eq!(bytes.len(), 13, "{bytes:?}");
    }
}
