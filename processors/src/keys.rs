//! Compact identity keys, shared by the processors that keep sample identities in state.
//!
//! State keys are text (`&str`: the runtime's redb table and snapshots hold them as such), so
//! an identity `(source, source_record_id)` is written as an order-preserving compact text:
//!
//! * the source as a small per-user code ([`Sources`]: the user's source names in order of
//!   first use, itself one state value, so it is checkpointed, snapshotted, restored and undone
//!   with the rest of the user's state), written as a prefix-free text varint ([`push_code`]);
//! * then the record id: a canonical lowercase UUID as `u` and its 16 bytes packed 7 bits a
//!   character (19 ASCII characters, their order the bytes' order), a canonical uppercase one
//!   (HealthKit's form) the same after `U` — identity is the id as sent, so `ABC…` and `abc…`
//!   are two identities, as they always were; any other id (mixed case included) verbatim after
//!   U+001F.
//!
//! Instead of `com.apple.health.watch` U+001F and 36 characters (59 bytes) an identity takes 21.
//! Every decoder refuses what it did not write with an error, never a panic.

use std::fmt::Write as _;

use crate::codec::{R, W};
use crate::State;

/// The tag before a verbatim record id.
const TEXT: char = '\u{1f}';
/// The tag before a packed lowercase UUID.
const UUID: char = 'u';
/// The tag before a packed uppercase UUID (HealthKit's ids): another identity than its
/// lowercase form.
const UUID_UPPER: char = 'U';
/// Packed UUID characters (16 bytes, 7 bits each: 133 bits, the last 5 zero).
const UUID_CHARS: usize = 19;

/// The most distinct sources one user's dictionary holds ([`Sources::admit`]).
pub const MAX_SOURCES: usize = 1024;

/// The first byte of a [`Sources`] value.
const SOURCES_FORMAT: u8 = 1;

/// Writes `code` as text: big-endian 6-bit digits, every one but the last as U+0000–U+003F,
/// the last as U+0040–U+007F (`@`, `A`, … for the first codes). Prefix-free, so what follows
/// needs no separator.
pub fn push_code(buf: &mut String, code: u64) {
    let mut digits = [0u8; 11];
    let mut n = 0;
    let mut x = code;
    loop {
        digits[n] = (x & 0x3f) as u8;
        n += 1;
        x >>= 6;
        if x == 0 {
            break;
        }
    }
    for i in (1..n).rev() {
        buf.push(char::from(digits[i]));
    }
    buf.push(char::from(0x40 | digits[0]));
}

/// Reads a [`push_code`] code off the front of `s`: the code and the rest.
pub fn split_code(s: &str) -> Result<(u64, &str), String> {
    let b = s.as_bytes();
    if b.first() == Some(&0) {
        // (a single-digit code is U+0040 and up: a first U+0000 is a leading zero digit)
        return Err("source code with a leading zero digit".into());
    }
    let mut x: u64 = 0;
    for (i, &c) in b.iter().enumerate() {
        if c >= 0x80 {
            return Err(format!("byte {c:#04x} in a source code"));
        }
        if x > u64::MAX >> 6 {
            return Err("source code too long".into());
        }
        x = (x << 6) | u64::from(c & 0x3f);
        if c & 0x40 != 0 {
            return Ok((x, &s[i + 1..]));
        }
    }
    Err("truncated source code".into())
}

/// A canonical lowercase UUID as 16 bytes.
pub(crate) fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    match parse_uuid(s)? {
        (b, false) => Some(b),
        (_, true) => None,
    }
}

/// A canonical uppercase UUID (HealthKit's form) as 16 bytes; `None` for one without letters,
/// which is canonical lowercase too (and coded as that).
#[cfg(test)]
pub(crate) fn uuid_bytes_upper(s: &str) -> Option<[u8; 16]> {
    match parse_uuid(s)? {
        (b, true) => Some(b),
        (_, false) => None,
    }
}

/// A UUID in one case, in one pass: its 16 bytes and whether it is uppercase (it has a letter,
/// every one uppercase); `None` when it is not canonical (mixed case included).
pub(crate) fn parse_uuid(s: &str) -> Option<([u8; 16], bool)> {
    /// Per byte: its hex value, +16 for an uppercase letter, +32 for a lowercase one; 0xff
    /// for anything else.
    const HEX: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'A' as usize + i] = 10 + i as u8 + 16;
            t[b'a' as usize + i] = 10 + i as u8 + 32;
            i += 1;
        }
        t
    };
    let b: &[u8; 36] = s.as_bytes().try_into().ok()?;
    if b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    // The hex digits' positions: 8-4-4-4-12, dashes between.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut out = [0u8; 16];
    let mut seen = 0u8;
    for (o, &i) in out.iter_mut().zip(AT.iter()) {
        let (h, l) = (HEX[b[i] as usize], HEX[b[i + 1] as usize]);
        seen |= h | l;
        *o = ((h & 15) << 4) | (l & 15);
    }
    // 0x80: not a hex digit; 0x10 and 0x20 both: mixed case.
    if seen & 0x80 != 0 || seen & 0x30 == 0x30 {
        return None;
    }
    Some((out, seen & 0x10 != 0))
}

/// The canonical lowercase text of a UUID's 16 bytes.
#[cfg(test)]
pub(crate) fn uuid_text(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    push_uuid_text(&mut s, b);
    s
}

/// The canonical uppercase text of a UUID's 16 bytes.
pub(crate) fn uuid_text_upper(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    push_uuid_text_in(&mut s, b, b"0123456789ABCDEF");
    s
}

pub(crate) fn push_uuid_text(s: &mut String, b: &[u8]) {
    push_uuid_text_in(s, b, b"0123456789abcdef");
}

fn push_uuid_text_in(s: &mut String, b: &[u8], hex: &[u8; 16]) {
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(hex[(x >> 4) as usize] as char);
        s.push(hex[(x & 15) as usize] as char);
    }
}

/// Writes a record id (see the module doc).
pub fn push_record(buf: &mut String, record: &str) {
    push_record_parsed(buf, record, parse_uuid(record));
}

/// [`push_record`] with `record`'s [`parse_uuid`] already done (`parsed` must be it), so a
/// caller that needs the UUID's bytes too parses it once.
pub(crate) fn push_record_parsed(buf: &mut String, record: &str, parsed: Option<([u8; 16], bool)>) {
    let (tag, b) = match parsed {
        Some((b, false)) => (UUID, b),
        Some((b, true)) => (UUID_UPPER, b),
        None => {
            buf.push(TEXT);
            buf.push_str(record);
            return;
        }
    };
    buf.push(tag);
    // 128 bits, big-endian, 7 at a time (the last character holds 2 and 5 zero bits).
    let x = u128::from_be_bytes(b);
    for i in 0..UUID_CHARS {
        let shift = 128 - 7 * (i as i32 + 1);
        let d = if shift >= 0 { (x >> shift) & 0x7f } else { (x << -shift) & 0x7f };
        buf.push(char::from(d as u8));
    }
}

/// Reads a [`push_record`] record id (all of `s`).
pub fn record_of(s: &str) -> Result<String, String> {
    let mut out = String::new();
    push_record_of(&mut out, s)?;
    Ok(out)
}

fn push_record_of(out: &mut String, s: &str) -> Result<(), String> {
    let mut chars = s.chars();
    match chars.next() {
        Some(TEXT) => {
            let r = chars.as_str();
            if parse_uuid(r).is_some() {
                return Err("a canonical UUID written as text".into());
            }
            out.push_str(r);
            Ok(())
        }
        Some(tag @ (UUID | UUID_UPPER)) => {
            let b = chars.as_str().as_bytes();
            if b.len() != UUID_CHARS || b.iter().any(|c| *c >= 0x80) {
                return Err("a packed UUID of the wrong length".into());
            }
            let mut x: u128 = 0;
            for &c in &b[..UUID_CHARS - 1] {
                x = (x << 7) | u128::from(c);
            }
            let last = b[UUID_CHARS - 1];
            if last & 0x1f != 0 {
                return Err("a packed UUID with padding bits set".into());
            }
            x = (x << 2) | u128::from(last >> 5);
            if tag == UUID {
                push_uuid_text(out, &x.to_be_bytes());
            } else {
                let text = uuid_text_upper(&x.to_be_bytes());
                if uuid_bytes(&text).is_some() {
                    return Err("an uppercase UUID without letters (it is coded as lowercase)".into());
                }
                out.push_str(&text);
            }
            Ok(())
        }
        Some(c) => Err(format!("record id tag {c:?}")),
        None => Err("no record id".into()),
    }
}

/// Writes an identity: the source's code, then the record id.
pub fn push_identity(buf: &mut String, code: u64, record: &str) {
    push_code(buf, code);
    push_record(buf, record);
}

/// [`push_identity`] with `record`'s [`parse_uuid`] already done (see [`push_record_parsed`]).
pub(crate) fn push_identity_parsed(buf: &mut String, code: u64, record: &str, parsed: Option<([u8; 16], bool)>) {
    push_code(buf, code);
    push_record_parsed(buf, record, parsed);
}

/// Reads a [`push_identity`] identity (all of `s`): the source's code and the record id.
pub fn identity_of(s: &str) -> Result<(u64, String), String> {
    let (code, rest) = split_code(s)?;
    Ok((code, record_of(rest)?))
}

/// One user's source names, each coded by its position (in order of first use). Held in state
/// under one key; a new name is appended and written at once (through [`State::put`], so a
/// rejected record's new names are undone with its other writes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    key: &'static str,
    names: Vec<String>,
}

impl Sources {
    /// The source names, by code.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The dictionary held under `key`; a value that does not decode fails the task
    /// ([`State::fail`]) and reads as empty (nothing this run computes is then used).
    pub fn load(state: &dyn State, key: &'static str) -> Sources {
        let mut names = Ok(Vec::new());
        state.read(key, &mut |v| names = Sources::decode(v));
        let names = names.unwrap_or_else(|e| {
            state.fail(format!("state value {key:?} does not deserialise: {e}"));
            Vec::new()
        });
        Sources { key, names }
    }

    /// Refuses a record that would give the user more than [`MAX_SOURCES`] sources: the
    /// dictionary is read for every record and searched for every sample, so its size must stay
    /// bounded whatever one user uploads (real users have a few dozen sources at most).
    pub fn admit<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<(), crate::Invalid> {
        let mut new: Vec<&str> = Vec::new();
        for n in names {
            if self.code(n).is_none() && !new.contains(&n) {
                new.push(n);
                if self.names.len() + new.len() > MAX_SOURCES {
                    return Err(crate::Invalid {
                        code: "too_many_sources",
                        reason: format!("the user would have more than {MAX_SOURCES} distinct sources (`{n}` is one too many)"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The code of `name`, if it has one.
    pub fn code(&self, name: &str) -> Option<u64> {
        self.names.iter().position(|n| n == name).map(|i| i as u64)
    }

    /// The code of `name`, given one (and the dictionary written) if it has none.
    pub fn code_or_add(&mut self, state: &mut dyn State, name: &str) -> u64 {
        if let Some(c) = self.code(name) {
            return c;
        }
        self.names.push(name.to_owned());
        state.put(self.key, Sources::encode(&self.names));
        (self.names.len() - 1) as u64
    }

    /// The name coded `code`.
    pub fn name(&self, code: u64) -> Option<&str> {
        usize::try_from(code).ok().and_then(|i| self.names.get(i)).map(String::as_str)
    }

    /// Reads an identity key's suffix back ([`identity_of`]) to (source, record id).
    pub fn identity(&self, s: &str) -> Result<(String, String), String> {
        let (code, record) = identity_of(s)?;
        let source = self.name(code).ok_or_else(|| format!("source code {code} of {}", self.names.len()))?;
        Ok((source.to_owned(), record))
    }

    /// The value: [`SOURCES_FORMAT`], the number of names, each length-prefixed.
    pub fn encode(names: &[String]) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(2 + names.iter().map(|n| n.len() + 1).sum::<usize>()));
        w.0.push(SOURCES_FORMAT);
        w.u(names.len() as u64);
        for n in names {
            w.s(n);
        }
        w.0
    }

    /// Reads a value of [`Sources::encode`]; refuses another format, truncation, trailing
    /// bytes and a name given twice.
    pub fn decode(bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut r = R(bytes);
        let f = r.byte()?;
        if f != SOURCES_FORMAT {
            return Err(format!("source dictionary of format {f}, this build reads {SOURCES_FORMAT}"));
        }
        let n = r.u()?;
        let mut names: Vec<String> = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            let s = r.s()?;
            if names.iter().any(|m| m == s) {
                return Err(format!("source {s:?} given twice"));
            }
            names.push(s.to_owned());
        }
        r.end()?;
        Ok(names)
    }
}

/// A key for debugging output: its control characters escaped.
pub fn printable(key: &str) -> String {
    let mut s = String::new();
    for c in key.chars() {
        if c.is_control() {
            let _ = write!(s, "\\x{:02x}", c as u32);
        } else {
            s.push(c);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::driver::MemState;

    /// Record ids of every shape: canonical UUIDs, their uppercase and mixed-case forms, near
    /// misses, separators, unicode, empty.
    fn record() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 16]>().prop_map(|b| uuid_text(&b)),
            any::<[u8; 16]>().prop_map(|b| uuid_text(&b).to_uppercase()),
            "[0-9a-fA-F-]{36}",
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-g]{12}",
            any::<String>(),
            "[\u{1e}\u{1f}u@a-z]{0,6}",
            Just(String::new()),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[\u{1e}\u{1f}@A-Za-z.]{0,8}", Just(String::new()), Just("com.apple.health.watch".to_owned())]
    }

    fn code() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..200, any::<u64>(), Just(u64::MAX), Just(63), Just(64), Just(4095), Just(4096)]
    }

    proptest! {
        #[test]
        fn an_identity_round_trips(code in code(), record in record()) {
            let mut k = String::new();
            push_identity(&mut k, code, &record);
            prop_assert_eq!(identity_of(&k).unwrap(), (code, record.clone()));
            // Short: a UUID takes 20 characters after the code, any other id one more than itself.
            let mut r = String::new();
            push_record(&mut r, &record);
            prop_assert_eq!(r.len(), if uuid_bytes(&record).is_some() || uuid_bytes_upper(&record).is_some() { 20 } else { record.len() + 1 });
        }

        /// Two identities have one key only if they are the same identity: case is kept (an
        /// uppercase UUID and its lowercase form are two ids), codes are prefix-free.
        #[test]
        fn distinct_identities_have_distinct_keys(a in (code(), record()), b in (code(), record())) {
            let (mut ka, mut kb) = (String::new(), String::new());
            push_identity(&mut ka, a.0, &a.1);
            push_identity(&mut kb, b.0, &b.1);
            prop_assert_eq!(ka == kb, a == b);
        }

        #[test]
        fn an_uppercase_uuid_is_not_its_lowercase_form(b in any::<[u8; 16]>()) {
            let lower = uuid_text(&b);
            let upper = lower.to_uppercase();
            let (mut kl, mut ku) = (String::new(), String::new());
            push_identity(&mut kl, 0, &lower);
            push_identity(&mut ku, 0, &upper);
            if lower != upper {
                prop_assert_ne!(&kl, &ku);
                prop_assert_eq!(ku.len(), 21, "an uppercase UUID is packed too");
            } else {
                prop_assert_eq!(&kl, &ku, "a UUID without letters is one id");
            }
            prop_assert_eq!(identity_of(&ku).unwrap().1, upper);
            prop_assert_eq!(identity_of(&kl).unwrap().1, lower);
        }

        /// Packed UUIDs sort as their bytes (and so as their text) do.
        #[test]
        fn packed_uuids_keep_their_order(a in any::<[u8; 16]>(), b in any::<[u8; 16]>()) {
            let (mut ka, mut kb) = (String::new(), String::new());
            push_record(&mut ka, &uuid_text(&a));
            push_record(&mut kb, &uuid_text(&b));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn codes_keep_their_order_within_a_length(a in code(), b in code()) {
            let (mut ka, mut kb) = (String::new(), String::new());
            push_code(&mut ka, a);
            push_code(&mut kb, b);
            if ka.len() == kb.len() {
                prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            }
        }

        #[test]
        fn a_dictionary_round_trips(names in proptest::collection::vec(name(), 0..12)) {
            let mut uniq: Vec<String> = Vec::new();
            for n in names {
                if !uniq.contains(&n) {
                    uniq.push(n);
                }
            }
            prop_assert_eq!(Sources::decode(&Sources::encode(&uniq)).unwrap(), uniq.clone());
            // Through state: codes by first use, stable, names back.
            let mut state = MemState::default();
            let mut d = Sources::load(&state, "src");
            let codes: Vec<u64> = uniq.iter().map(|n| d.code_or_add(&mut state, n)).collect();
            prop_assert_eq!(codes, (0..uniq.len() as u64).collect::<Vec<_>>());
            let back = Sources::load(&state, "src");
            for (i, n) in uniq.iter().enumerate() {
                prop_assert_eq!(back.code(n), Some(i as u64));
                prop_assert_eq!(back.name(i as u64), Some(n.as_str()));
                let mut k = String::new();
                push_identity(&mut k, i as u64, "r-1");
                prop_assert_eq!(back.identity(&k).unwrap(), (n.clone(), "r-1".to_owned()));
            }
        }

        #[test]
        fn garbage_is_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..48), text in any::<String>(), ours in any::<bool>()) {
            let mut bytes = bytes;
            if ours {
                bytes.insert(0, SOURCES_FORMAT);
            }
            let r = Sources::decode(&bytes);
            if bytes.first() != Some(&SOURCES_FORMAT) {
                prop_assert!(r.is_err());
            }
            // Any text as a key suffix: an identity or an error, and an identity read back
            // is written the same way (one key per identity).
            let _ = split_code(&text);
            let _ = record_of(&text);
            if let Ok((code, record)) = identity_of(&text) {
                let mut k = String::new();
                push_identity(&mut k, code, &record);
                prop_assert_eq!(k, text.clone());
            }
            let _ = Sources::default().identity(&text);
        }

        #[test]
        fn a_damaged_dictionary_is_an_error_never_a_panic(names in proptest::collection::vec(name(), 1..6), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
            let mut uniq: Vec<String> = Vec::new();
            for n in names {
                if !uniq.contains(&n) {
                    uniq.push(n);
                }
            }
            let bytes = Sources::encode(&uniq);
            prop_assert!(Sources::decode(&bytes[..cut.index(bytes.len())]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(Sources::decode(&longer).is_err());
            let mut changed = bytes;
            let i = flip.0.index(changed.len());
            changed[i] ^= flip.1;
            let _ = Sources::decode(&changed);
        }
    }

    /// A processor that codes every sample's source, then refuses the record if a sample's
    /// value is negative: the refusal comes *after* a new dictionary entry was written.
    struct CodesThenRefuses;

    impl crate::Processor for CodesThenRefuses {
        type Output = u64;
        fn process(
            &mut self,
            input: &crate::Input,
            state: &mut dyn State,
            out: &mut dyn crate::Emitter<u64>,
        ) -> Result<(), crate::Invalid> {
            let crate::Input::Samples(b) = input else { return Ok(()) };
            let mut src = Sources::load(state, "src");
            for s in &b.samples {
                let code = src.code_or_add(state, &s.source);
                if s.value < 0.0 {
                    return Err(crate::Invalid { code: "negative", reason: String::new() });
                }
                out.upsert(s.source.clone(), code);
            }
            Ok(())
        }
    }

    fn batch(samples: &[(&str, f64)]) -> crate::Input {
        let samples = samples
            .iter()
            .enumerate()
            .map(|(i, (source, value))| vitals_schemas::Sample {
                source: (*source).into(),
                source_kind: vitals_schemas::SourceKind::Watch,
                source_record_id: format!("r{i}"),
                metric: "heart_rate".into(),
                start_ms: 1_764_000_000_000,
                end_ms: 1_764_000_000_000,
                value: *value,
                unit: "count/min".into(),
                category: None,
                time_zone: "UTC".into(),
                version: 1,
                metadata: Default::default(),
            })
            .collect();
        crate::Input::Samples(vitals_schemas::SampleBatch {
            request_id: "r".into(),
            user_id: "u".into(),
            received_at_ms: 0,
            lane: vitals_schemas::Lane::Hot,
            samples,
        })
    }

    /// A rejected record's new dictionary entries are undone with its other writes in the
    /// driver (its undo journal; the runtime's view, its rollback, is tested in
    /// `vitals-runtime`'s store): the next record's new source gets the code the rejected one
    /// had taken, and nothing names the rejected source.
    #[test]
    fn a_rejected_records_new_sources_do_not_leak() {
        let mut d = crate::driver::Driver::new(CodesThenRefuses);
        d.feed(&batch(&[("watch", 1.0)])).unwrap();
        assert!(d.feed(&batch(&[("watch", 1.0), ("phone", 1.0), ("ring", -1.0)])).is_err());
        let src = Sources::load(&d.states["u"], "src");
        assert_eq!(src.names, vec!["watch".to_owned()], "the rejected record's sources are gone");
        let out = d.feed(&batch(&[("scale", 1.0)])).unwrap();
        assert_eq!(out.iter().map(|e| e.value).collect::<Vec<_>>(), vec![Some(1)]);
        // Within an interval too.
        let (_, rejected) = d.feed_interval(&[(0, batch(&[("ring", -1.0)])), (0, batch(&[("phone", 1.0)]))]);
        assert_eq!(rejected, 1);
        assert_eq!(Sources::load(&d.states["u"], "src").names, vec!["watch".to_owned(), "scale".to_owned(), "phone".to_owned()]);
    }

    proptest! {
        /// The one-pass parse agrees with the plain definition.
        #[test]
        fn the_uuid_parse_is_the_definition(s in prop_oneof![
            any::<[u8; 16]>().prop_map(|b| uuid_text(&b)),
            any::<[u8; 16]>().prop_map(|b| uuid_text_upper(&b)),
            "[0-9a-fA-F-]{36}",
            "[0-9a-gA-G-]{8}-[0-9a-fA-F]{4}-[0-9a-f]{4}-[0-9A-F]{4}-[0-9a-f]{12}",
            "[0-9]{8}-[0-9]{4}-[0-9]{4}-[0-9]{4}-[0-9]{12}",
            any::<String>(),
        ]) {
            let lower = uuid_bytes(&s).map(|b| uuid_text(&b));
            let upper = uuid_bytes_upper(&s).map(|b| uuid_text_upper(&b));
            let canonical_lower = s.len() == 36 && s.chars().enumerate().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { matches!(c, '0'..='9' | 'a'..='f') });
            let canonical_upper = !canonical_lower && s.len() == 36 && s.chars().enumerate().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { matches!(c, '0'..='9' | 'A'..='F') });
            prop_assert_eq!(lower.as_deref(), canonical_lower.then_some(s.as_str()));
            prop_assert_eq!(upper.as_deref(), canonical_upper.then_some(s.as_str()));
        }
    }

    #[test]
    fn the_common_case_is_short_and_readable() {
        let mut k = String::new();
        push_identity(&mut k, 0, "3f2c8a0e-5b1d-4c7e-9a60-1d2e3f405162");
        assert_eq!(k.len(), 21);
        k.clear();
        push_identity(&mut k, 1, "a");
        assert_eq!(k, "A\u{1f}a");
        k.clear();
        push_code(&mut k, 64);
        assert_eq!(k, "\u{1}@");
        assert!(split_code("\u{0}A").is_err(), "a leading zero digit");
        assert!(record_of("\u{1f}3f2c8a0e-5b1d-4c7e-9a60-1d2e3f405162").is_err(), "a canonical UUID is never text");
        assert!(record_of("x").is_err());
        assert!(record_of("").is_err());
    }

    #[test]
    fn an_older_value_or_garbage_is_refused_with_a_clear_error() {
        let err = Sources::decode(b"[\"com.apple\"]").unwrap_err();
        assert!(err.contains("format 91"), "{err}");
        let err = Sources::decode(&[SOURCES_FORMAT, 2, 1, b'a', 1, b'a']).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = Sources::default().identity("A\u{1f}a").unwrap_err();
        assert!(err.contains("source code 1 of 0"), "{err}");
    }
}
