//! Projection descriptors: a processor declares its output once — the record's fields and types,
//! its key, the columns reads filter and sort on, what it is computed from — and the project
//! derives the rest from that one declaration:
//!
//! * the Avro schema ([`Descriptor::avro`]: registered and compatibility-checked like any other),
//!   with the envelope every projection record shares (`user_id` first; `version_epoch`,
//!   `version_seq`, `deleted`, `source_offsets` last);
//! * the output topic ([`Descriptor::topic`]) and the PostgreSQL table ([`Descriptor::table`],
//!   created by the sink);
//! * the table row ([`Descriptor::row_key`] and the column accessors), the read endpoint
//!   `GET /v1/projections/{name}` and the projection's place in freshness ([`Descriptor::built_from`]).
//!
//! A Rust output type ties itself to its descriptor with [`Projected`]; that alone makes it an
//! [`crate::codec::AvroRecord`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{OnceLock, RwLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::avro::AvroFile;
use crate::codec::{Codec, CodecError};
use crate::topics::Topics;

/// The namespace of every projection record.
pub const NAMESPACE: &str = "vitals.v1.out";

/// The type of a field, as Avro knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Boolean,
    Int,
    Long,
    Double,
    String,
    /// `["null", T]`: absent is `null` (and the field's default).
    Optional(&'static Type),
    Array(&'static Type),
    /// String keys.
    Map(&'static Type),
    Record(&'static Record),
    Enum(&'static Enum),
}

/// A named record type nested in a projection record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub name: &'static str,
    pub fields: &'static [Field],
}

/// A named enum type: its symbols, in order (their Rust spelling is the serde rename).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enum {
    pub name: &'static str,
    pub symbols: &'static [&'static str],
}

/// One field of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub ty: Type,
    pub doc: &'static str,
    /// An array or map field that is empty when a writer leaves it out (readers of older
    /// records then see it empty). Optional fields always default to `null`.
    pub empty_by_default: bool,
}

impl Field {
    pub const fn new(name: &'static str, ty: Type) -> Field {
        Field { name, ty, doc: "", empty_by_default: false }
    }
    pub const fn doc(self, doc: &'static str) -> Field {
        Field { doc, ..self }
    }
    /// See [`Field::empty_by_default`].
    pub const fn empty_by_default(self) -> Field {
        Field { empty_by_default: true, ..self }
    }
}

/// What a projection is computed from: it is as fresh as that input allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltFrom {
    /// The ingest lanes (HOT, COLD, CHANGE, domain changes).
    Lanes,
    /// Another projection's output topic (a chained processor): fresh when that projection is
    /// fresh and every one of its records of the user has been consumed.
    Projection(&'static str),
}

/// How `GET /v1/projections/{name}` orders (and ranges) the rows of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// By the [`Descriptor::day`] column, then key; `from`/`to` are dates (inclusive).
    Day,
    /// By the [`Descriptor::at`] column (epoch ms), then key; `from` inclusive, `to` exclusive.
    At,
    /// By key only; no range.
    Key,
}

/// A processor's output, declared once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// The projection's name: the processor's, the topic's suffix, the table's, the read path's.
    pub name: &'static str,
    /// The Avro record name (`PascalCase`).
    pub record: &'static str,
    pub doc: &'static str,
    /// The record's own fields, between `user_id` and the envelope.
    pub fields: &'static [Field],
    /// The fields whose values, joined by `|`, identify a row within its user (strings or
    /// integers). An upsert and a retraction of one key carry the same values.
    pub key: &'static [&'static str],
    /// A string field reads may filter on (`?metric=`; the table's `metric` column).
    pub group: Option<&'static str>,
    /// A `YYYY-MM-DD` field (the table's `day` column).
    pub day: Option<&'static str>,
    /// An epoch-millisecond field (the table's `at_ms` column).
    pub at: Option<&'static str>,
    pub order: Order,
    pub built_from: BuiltFrom,
}

/// The columns every projection table has (the sink's upsert writes them; the typed
/// [`Descriptor::columns`] are generated from `body`).
pub const BASE_COLUMNS: &[&str] =
    &["user_id", "entity_id", "metric", "day", "at_ms", "version_epoch", "version_seq", "deleted", "body", "source_offsets", "updated_at"];

/// A typed column of a projection table: field `field` of `body`, as `sql_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub field: &'static str,
    /// As PostgreSQL's `information_schema.columns.data_type` spells it.
    pub sql_type: &'static str,
}

impl Column {
    /// The generation expression.
    pub fn expr(&self) -> String {
        let f = self.field;
        match self.sql_type {
            "text" => format!("(body->>'{f}')"),
            // (An absent value is SQL NULL whether the key is missing or JSON null.)
            "jsonb" => format!("NULLIF(body->'{f}', 'null'::jsonb)"),
            t => format!("((body->>'{f}')::{t})"),
        }
    }

    /// Whether a column of type `from` can become `self.sql_type` without losing a value: the
    /// Avro promotions (int → long → double) of a compatible schema change.
    pub fn widens(&self, from: &str) -> bool {
        matches!((from, self.sql_type), ("integer", "bigint") | ("integer", "double precision") | ("bigint", "double precision"))
    }
}

fn sql_type(t: &Type) -> &'static str {
    match t {
        Type::Boolean => "boolean",
        Type::Int => "integer",
        Type::Long => "bigint",
        Type::Double => "double precision",
        Type::String | Type::Enum(_) => "text",
        Type::Optional(t) => sql_type(t),
        Type::Array(_) | Type::Map(_) | Type::Record(_) => "jsonb",
    }
}

/// The envelope fields every projection record ends with.
const ENVELOPE_DOCS: [(&str, &str); 3] = [
    ("version_epoch", "Owner epoch, bumped and persisted at every start/assignment of the producing task."),
    ("version_seq", "Sequence within the epoch; (epoch, seq) only grows per key."),
    ("deleted", "Retraction: the key no longer exists at this version."),
];

impl Descriptor {
    /// The Avro schema, as JSON: `user_id`, the fields, then the envelope.
    pub fn avro_json(&self) -> Value {
        let mut named = Vec::new();
        let mut fields = vec![json!({"name": "user_id", "type": "string"})];
        fields.extend(self.fields.iter().map(|f| field_json(f, &mut named)));
        fields.push(json!({"name": "version_epoch", "type": "long", "doc": ENVELOPE_DOCS[0].1}));
        fields.push(json!({"name": "version_seq", "type": "long", "doc": ENVELOPE_DOCS[1].1}));
        fields.push(json!({"name": "deleted", "type": "boolean", "default": false, "doc": ENVELOPE_DOCS[2].1}));
        fields.push(json!({
            "name": "source_offsets",
            "type": {"type": "array", "items": {"type": "record", "name": "SourceOffset", "fields": [
                {"name": "topic", "type": "string"}, {"name": "partition", "type": "int"}, {"name": "next_offset", "type": "long"}]}},
            "doc": "How far into each input partition this value has been computed (for freshness)."
        }));
        let key = std::iter::once("user_id").chain(self.key.iter().copied()).collect::<Vec<_>>().join("|");
        json!({
            "type": "record", "name": self.record, "namespace": NAMESPACE,
            "doc": format!("{} Key = {key}.", self.doc),
            "fields": fields,
        })
    }

    /// The Avro schema as an [`AvroFile`] named after the projection: derived once, then kept
    /// (the codec caches parsed schemas by name).
    pub fn avro(&self) -> AvroFile {
        static DERIVED: OnceLock<RwLock<HashMap<&'static str, &'static str>>> = OnceLock::new();
        let map = DERIVED.get_or_init(Default::default);
        if let Some(text) = map.read().unwrap_or_else(|p| p.into_inner()).get(self.name) {
            return AvroFile { name: self.name, text };
        }
        let text: &'static str = Box::leak(serde_json::to_string_pretty(&self.avro_json()).expect("JSON serialises").into_boxed_str());
        let text = *map.write().unwrap_or_else(|p| p.into_inner()).entry(self.name).or_insert(text);
        AvroFile { name: self.name, text }
    }

    /// The output topic.
    pub fn topic(&self, t: &Topics) -> String {
        t.output(self.name)
    }

    /// The PostgreSQL table.
    pub fn table(&self) -> String {
        format!("proj_{}", self.name)
    }

    /// The table's typed columns, one per top-level field: stored columns generated from
    /// `body`, so every upsert keeps them and SQL readers get the record's own names and types.
    /// The group field named `metric` is the base `metric` column already; a field named like
    /// another base column ([`BASE_COLUMNS`]) is `field_<name>`.
    pub fn columns(&self) -> Vec<Column> {
        self.fields
            .iter()
            .filter(|f| !(f.name == "metric" && self.group == Some("metric")))
            .map(|f| Column {
                name: if BASE_COLUMNS.contains(&f.name) { format!("field_{}", f.name) } else { f.name.to_owned() },
                field: f.name,
                sql_type: sql_type(&f.ty),
            })
            .collect()
    }

    /// The key of `body` (the record as JSON) within its user: the key fields' values joined by
    /// `|`. `None` when a key field is missing or not a string or integer.
    pub fn row_key(&self, body: &Value) -> Option<String> {
        let mut out = String::new();
        for (i, f) in self.key.iter().enumerate() {
            if i > 0 {
                out.push('|');
            }
            match body.get(*f)? {
                Value::String(s) => out.push_str(s),
                Value::Number(n) if n.is_i64() => out.push_str(&n.to_string()),
                _ => return None,
            }
        }
        Some(out)
    }

    /// Checks what derivation relies on: every named column is a field of the right type, the
    /// key is made of strings or integers, the order has its column. The registry's test runs
    /// it over every registered processor.
    pub fn check(&self) -> Result<(), String> {
        let field = |n: &str| self.fields.iter().find(|f| f.name == n).map(|f| f.ty);
        let name = self.name;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(format!("projection name {name:?}: lower-case letters, digits and _ only (it names a topic and a table)"));
        }
        // PostgreSQL cuts identifiers at 63 bytes: `proj_<name>__<version>` (versions up to 16)
        // and every column must fit, or two names would meet.
        if name.len() > 40 {
            return Err(format!(
                "projection name {name:?}: at most 40 bytes (its versions' tables, proj_<name>__<version>, must fit PostgreSQL's 63)"
            ));
        }
        if let Some(f) = self.fields.iter().find(|f| f.name.len() > 57) {
            return Err(format!("{name}: field name {:?}: at most 57 bytes (it names a table column)", f.name));
        }
        if self.key.is_empty() {
            return Err(format!("{name}: the key names no field"));
        }
        for k in self.key {
            match field(k) {
                Some(Type::String | Type::Int | Type::Long) => {}
                Some(t) => return Err(format!("{name}: key field {k} is {t:?}; a key field is a string or an integer")),
                None => return Err(format!("{name}: key field {k} is not a field")),
            }
        }
        // (Field names name table columns: identifiers only, as Avro requires anyway.)
        if let Some(f) = self.fields.iter().find(|f| {
            f.name.is_empty()
                || f.name.starts_with(|c: char| c.is_ascii_digit())
                || !f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }) {
            return Err(format!("{name}: field name {:?}: letters, digits and _ only, not starting with a digit", f.name));
        }
        let mut columns = std::collections::BTreeSet::new();
        if let Some(c) = self.columns().into_iter().find(|c| !columns.insert(c.name.clone())) {
            return Err(format!("{name}: two fields make the table column {}", c.name));
        }
        let reserved = ["user_id", "version_epoch", "version_seq", "deleted", "source_offsets"];
        if let Some(f) = self.fields.iter().find(|f| reserved.contains(&f.name)) {
            return Err(format!("{name}: field {} is part of the envelope every projection record has", f.name));
        }
        for (column, f, ok) in [
            ("group", self.group, &[Type::String, Type::Optional(&Type::String)][..]),
            ("day", self.day, &[Type::String][..]),
            ("at", self.at, &[Type::Long][..]),
        ] {
            if let Some(f) = f {
                match field(f) {
                    Some(t) if ok.contains(&t) => {}
                    Some(t) => return Err(format!("{name}: {column} field {f} is {t:?}, expected one of {ok:?}")),
                    None => return Err(format!("{name}: {column} field {f} is not a field")),
                }
            }
        }
        match self.order {
            Order::Day if self.day.is_none() => Err(format!("{name}: ordered by day but names no day field")),
            Order::At if self.at.is_none() => Err(format!("{name}: ordered by time but names no at field")),
            _ => Ok(()),
        }
    }
}

fn field_json(f: &Field, named: &mut Vec<&'static str>) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), f.name.into());
    m.insert("type".into(), type_json(&f.ty, named));
    match f.ty {
        Type::Optional(_) => {
            m.insert("default".into(), Value::Null);
        }
        Type::Array(_) if f.empty_by_default => {
            m.insert("default".into(), json!([]));
        }
        Type::Map(_) if f.empty_by_default => {
            m.insert("default".into(), json!({}));
        }
        _ => {}
    }
    if !f.doc.is_empty() {
        m.insert("doc".into(), f.doc.into());
    }
    Value::Object(m)
}

/// A named type is defined where it first appears and referred to by name after that.
fn type_json(t: &Type, named: &mut Vec<&'static str>) -> Value {
    match t {
        Type::Boolean => "boolean".into(),
        Type::Int => "int".into(),
        Type::Long => "long".into(),
        Type::Double => "double".into(),
        Type::String => "string".into(),
        Type::Optional(t) => json!(["null", type_json(t, named)]),
        Type::Array(t) => json!({"type": "array", "items": type_json(t, named)}),
        Type::Map(t) => json!({"type": "map", "values": type_json(t, named)}),
        Type::Record(r) if named.contains(&r.name) => r.name.into(),
        Type::Enum(e) if named.contains(&e.name) => e.name.into(),
        Type::Record(r) => {
            named.push(r.name);
            let fields: Vec<Value> = r.fields.iter().map(|f| field_json(f, named)).collect();
            json!({"type": "record", "name": r.name, "fields": fields})
        }
        Type::Enum(e) => {
            named.push(e.name);
            json!({"type": "enum", "name": e.name, "symbols": e.symbols})
        }
    }
}

/// The record of `d` as JSON Schema (its JSON form, as the read API returns it): for the OpenAPI
/// document.
pub fn json_schema(d: &Descriptor) -> Value {
    fn ty(t: &Type) -> Value {
        match t {
            Type::Boolean => json!({"type": "boolean"}),
            Type::Int | Type::Long => json!({"type": "integer"}),
            Type::Double => json!({"type": "number"}),
            Type::String => json!({"type": "string"}),
            Type::Optional(t) => {
                let mut v = ty(t);
                v["nullable"] = true.into();
                v
            }
            Type::Array(t) => json!({"type": "array", "items": ty(t)}),
            Type::Map(t) => json!({"type": "object", "additionalProperties": ty(t)}),
            Type::Record(r) => record(r.fields, &[]),
            Type::Enum(e) => json!({"type": "string", "enum": e.symbols}),
        }
    }
    fn record(fields: &[Field], extra: &[(&str, Value)]) -> Value {
        let mut props = Map::new();
        let mut required = Vec::new();
        for f in fields {
            let mut v = ty(&f.ty);
            if !f.doc.is_empty() {
                v["description"] = f.doc.into();
            }
            props.insert(f.name.into(), v);
            required.push(f.name);
        }
        for (n, v) in extra {
            props.insert((*n).into(), v.clone());
            required.push(n);
        }
        json!({"type": "object", "required": required, "properties": props})
    }
    let offsets = json!({"type": "array", "items": record(&[Field::new("topic", Type::String), Field::new("partition", Type::Int), Field::new("next_offset", Type::Long)], &[])});
    let mut v = record(
        d.fields,
        &[
            ("user_id", json!({"type": "string"})),
            ("version_epoch", json!({"type": "integer"})),
            ("version_seq", json!({"type": "integer"})),
            ("deleted", json!({"type": "boolean"})),
            ("source_offsets", offsets),
        ],
    );
    v["description"] = d.doc.into();
    v
}

/// A Rust type that is a projection record: its descriptor. It is then an
/// [`crate::codec::AvroRecord`] with the derived schema.
pub trait Projected: Serialize + DeserializeOwned {
    const DESCRIPTOR: &'static Descriptor;
}

/// Decodes a Confluent-framed record of one projection into JSON (what the sink stores and the
/// read API returns), through the registry like any other decode.
pub type JsonDecoder = for<'a> fn(&'a Codec, &'a [u8]) -> Pin<Box<dyn Future<Output = Result<Value, CodecError>> + Send + 'a>>;

fn decode_json<'a, T: Projected + Send + 'static>(
    codec: &'a Codec,
    bytes: &'a [u8],
) -> Pin<Box<dyn Future<Output = Result<Value, CodecError>> + Send + 'a>> {
    Box::pin(async move {
        let record: T = codec.decode(bytes).await?;
        serde_json::to_value(&record).map_err(|e| CodecError::Undecodable(format!("{} as JSON: {e}", T::DESCRIPTOR.name)))
    })
}

/// A projection as the layers past the processor see it, without its Rust type: the descriptor
/// and the decoder of its records. Built where the type is known (the processors' registry) and
/// handed to the sink and the read API by the composition root. Compared, ordered and hashed by
/// name.
#[derive(Clone, Copy)]
pub struct Projection {
    pub descriptor: &'static Descriptor,
    pub decode_json: JsonDecoder,
    /// The version it is written as: `None` is the base version ([`BASE_VERSION`]), whose
    /// topic and table carry no suffix; a replay writes `Some` ([`version`]).
    pub version: Option<&'static str>,
    /// The name its progress and dead letters go by: the projection's name, `<name>@<version>`
    /// for another version ([`version::key`]).
    key: &'static str,
}

impl Projection {
    pub fn of<T: Projected + Send + 'static>() -> Projection {
        Projection { descriptor: T::DESCRIPTOR, decode_json: decode_json::<T>, version: None, key: T::DESCRIPTOR.name }
    }
    /// The same projection written as `version` (checked with [`version::check`]; the base
    /// version is the projection itself).
    pub fn at(self, version: &str) -> Projection {
        if version == BASE_VERSION {
            return Projection { version: None, key: self.descriptor.name, ..self };
        }
        let v: &'static str = Box::leak(version.to_owned().into_boxed_str());
        Projection { version: Some(v), key: Box::leak(version::key(self.descriptor.name, Some(v)).into_boxed_str()), ..self }
    }
    /// The same projection (name, decoder, version) declared as `descriptor`: what a new build
    /// of its processor declares (the table's evolution is tested with it).
    pub fn declared_as(self, descriptor: &'static Descriptor) -> Projection {
        assert_eq!(descriptor.name, self.descriptor.name, "a projection keeps its name");
        Projection { descriptor, ..self }
    }
    pub fn name(self) -> &'static str {
        self.descriptor.name
    }
    /// Its name as progress, dead letters and the sink's rows know it (`<name>@<version>`).
    pub fn key(self) -> &'static str {
        self.key
    }
    pub fn table(self) -> String {
        version::table(self.descriptor, self.version)
    }
    pub fn topic(self, t: &Topics) -> String {
        version::topic(self.descriptor, t, self.version)
    }
}

/// The version a projection has before any replay: its topic and table are the descriptor's.
pub const BASE_VERSION: &str = "v1";

/// Versions of a projection (`vitals replay … --as <version>`): each has its own output topic,
/// table, consumer groups, epochs and state, named by suffixing the base version's.
pub mod version {
    use super::{Descriptor, Topics, BASE_VERSION};

    /// A version is a lowercase letter then up to 15 lowercase letters, digits or `_`: it goes
    /// into topic, table, group and file names unquoted.
    pub fn check(v: &str) -> Result<(), String> {
        let ok = v.len() <= 16
            && v.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(())
        } else {
            Err(format!("version `{v}`: a lowercase letter then up to 15 lowercase letters, digits or _ (e.g. v2)"))
        }
    }

    /// `None` for the base version, the version otherwise.
    pub fn non_base(v: &str) -> Option<&str> {
        (v != BASE_VERSION).then_some(v)
    }

    /// The name progress, dead letters and processor lines go by.
    pub fn key(name: &str, version: Option<&str>) -> String {
        match version {
            None => name.to_owned(),
            Some(v) => format!("{name}@{v}"),
        }
    }

    pub fn table(d: &Descriptor, version: Option<&str>) -> String {
        match version {
            None => d.table(),
            Some(v) => format!("{}__{v}", d.table()),
        }
    }

    pub fn topic(d: &Descriptor, t: &Topics, version: Option<&str>) -> String {
        match version {
            None => d.topic(t),
            Some(v) => format!("{}.{v}", d.topic(t)),
        }
    }
}

impl std::fmt::Debug for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}
impl PartialEq for Projection {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Projection {}
impl PartialOrd for Projection {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Projection {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(other.key())
    }
}
impl std::hash::Hash for Projection {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key().hash(h)
    }
}
impl Serialize for Projection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_names_its_own_topic_table_and_key() {
        let t = Topics::with_prefix("p.");
        assert_eq!(version::topic(&D, &t, Some("v2")), "p.vitals.out.demo.v2");
        assert_eq!(version::table(&D, Some("v2")), "proj_demo__v2");
        assert_eq!(version::key("demo", Some("v2")), "demo@v2");
        assert_eq!(
            (version::topic(&D, &t, None), version::table(&D, None), version::key("demo", None)),
            ("p.vitals.out.demo".into(), "proj_demo".into(), "demo".into())
        );
        for ok in ["v2", "backfill_2026", "a"] {
            assert!(version::check(ok).is_ok(), "{ok}");
        }
        for bad in ["", "V2", "2v", "v-2", "v2;drop", "v.2", "abcdefghijklmnopq"] {
            assert!(version::check(bad).is_err(), "{bad:?}");
        }
        assert_eq!(version::non_base(BASE_VERSION), None);
    }

    const KIND: Enum = Enum { name: "Kind", symbols: &["A", "B"] };
    const INNER: Record = Record { name: "Inner", fields: &[Field::new("n", Type::Long)] };
    const D: Descriptor = Descriptor {
        name: "demo",
        record: "Demo",
        doc: "A demo.",
        fields: &[
            Field::new("metric", Type::String),
            Field::new("day", Type::String).doc("YYYY-MM-DD"),
            Field::new("n", Type::Int),
            Field::new("kind", Type::Enum(&KIND)),
            Field::new("first", Type::Optional(&Type::Record(&INNER))),
            Field::new("again", Type::Optional(&Type::Record(&INNER))),
            Field::new("tags", Type::Map(&Type::Double)).empty_by_default(),
        ],
        key: &["metric", "n"],
        group: Some("metric"),
        day: Some("day"),
        at: None,
        order: Order::Day,
        built_from: BuiltFrom::Lanes,
    };

    #[test]
    fn every_field_but_the_metric_group_is_a_typed_column_generated_from_the_body() {
        let cols: Vec<(String, &str, String)> = D.columns().into_iter().map(|c| (c.name.clone(), c.sql_type, c.expr())).collect();
        assert_eq!(
            cols,
            vec![
                ("field_day".to_owned(), "text", "(body->>'day')".to_owned()),
                ("n".to_owned(), "integer", "((body->>'n')::integer)".to_owned()),
                ("kind".to_owned(), "text", "(body->>'kind')".to_owned()),
                ("first".to_owned(), "jsonb", "NULLIF(body->'first', 'null'::jsonb)".to_owned()),
                ("again".to_owned(), "jsonb", "NULLIF(body->'again', 'null'::jsonb)".to_owned()),
                ("tags".to_owned(), "jsonb", "NULLIF(body->'tags', 'null'::jsonb)".to_owned()),
            ]
        );
        let long = Column { name: "n".into(), field: "n", sql_type: "bigint" };
        assert!(long.widens("integer") && !long.widens("text") && !long.widens("double precision"));
        const BAD: Descriptor = Descriptor {
            fields: &[Field::new("metric", Type::String), Field::new("n\"; DROP", Type::Int)],
            key: &["metric"],
            day: None,
            order: Order::Key,
            ..D
        };
        assert!(BAD.check().unwrap_err().contains("letters, digits and _ only"));
        const TWICE: Descriptor = Descriptor {
            fields: &[Field::new("metric", Type::String), Field::new("day", Type::String), Field::new("field_day", Type::String)],
            key: &["metric"],
            day: None,
            order: Order::Key,
            ..D
        };
        assert!(TWICE.check().unwrap_err().contains("two fields make the table column field_day"));
        const LONG: Descriptor = Descriptor { name: "a_projection_name_that_is_far_too_long_for_postgres", ..D };
        assert!(LONG.check().unwrap_err().contains("at most 40 bytes"));
    }

    #[test]
    fn a_derived_schema_parses_and_defines_each_named_type_once() {
        D.check().unwrap();
        let file = D.avro();
        let schema = file.schema();
        let canonical = schema.canonical_form();
        assert_eq!(canonical.matches("\"name\":\"vitals.v1.out.Inner\"").count(), 1, "{canonical}");
        assert!(canonical.contains("\"name\":\"again\",\"type\":[\"null\",\"vitals.v1.out.Inner\"]"), "{canonical}");
        assert_eq!(file.text, D.avro().text, "derived once");
        assert_eq!(D.avro_json()["doc"], "A demo. Key = user_id|metric|n.");
    }

    #[test]
    fn the_row_key_joins_strings_and_integers() {
        assert_eq!(D.row_key(&json!({"metric": "steps", "n": 3})).as_deref(), Some("steps|3"));
        assert_eq!(D.row_key(&json!({"metric": "steps"})), None);
        assert_eq!(D.row_key(&json!({"metric": 1.5, "n": 3})), None);
    }

    #[test]
    fn check_names_what_a_descriptor_gets_wrong() {
        let bad = |d: Descriptor, want: &str| {
            let e = d.check().unwrap_err();
            assert!(e.contains(want), "{e} should name {want}");
        };
        bad(Descriptor { key: &["nope"], ..D }, "key field nope is not a field");
        bad(Descriptor { key: &["tags"], ..D }, "key field tags");
        bad(Descriptor { group: Some("n"), ..D }, "group field n");
        bad(Descriptor { day: None, ..D }, "ordered by day");
        bad(Descriptor { name: "Bad-Name", ..D }, "lower-case");
        const ENVELOPE: &[Field] = &[Field::new("metric", Type::String), Field::new("deleted", Type::Boolean)];
        bad(Descriptor { fields: ENVELOPE, key: &["metric"], day: None, order: Order::Key, ..D }, "part of the envelope");
    }
}
