//! Avro schema parsing, identity and compatibility rules of the registry: pure functions, no HTTP
//! and no storage, so producers or CI can check a schema change locally with [`check`].
//!
//! **Identity.** Two registrations are "the same schema" (same global id, no new version) when
//! their [`ParsedSchema::normalized`] forms and their references are equal ([`fingerprint`]).
//! The normalized form is the parsed schema written back as JSON by apache-avro: whitespace, key
//! order and the way names are spelled (`"a.B"` vs `"name":"B","namespace":"a"`) no longer
//! matter, but defaults, docs, aliases, logical types and custom properties still do. This is
//! deliberately stricter than Avro's Parsing Canonical Form (kept as
//! [`ParsedSchema::canonical_form`] for information only): PCF drops defaults, so a schema that
//! only *adds a default* would silently resolve to the old id and consumers would keep decoding
//! with the default-less text. Confluent likewise keys schemas by their full (optionally
//! normalized) text, not by PCF.
//!
//! **Compatibility.** The reader/writer rule is apache-avro's
//! [`SchemaCompatibility::can_read`]. A `Partial` answer (some writer enum symbol or union branch
//! the reader lacks) counts as incompatible, as in Java Avro, which Confluent uses. Levels follow
//! Confluent: BACKWARD = the new schema reads data written with the previous one, FORWARD = the
//! previous one reads data written with the new one, FULL = both; `*_TRANSITIVE` checks every
//! previous version instead of the latest only; NONE checks nothing.
//!
//! apache-avro compares a named type given by reference (`"type": "Unit"`) to another reference
//! by name only, and a reference to an inline definition fails. Schemas are therefore compared
//! with every reference to a non-recursive named type replaced by its definition, so reordering
//! fields that reuse a named type is judged on structure, not on where the type was defined.

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;

use apache_avro::error::CompatibilityError;
use apache_avro::schema::{ArraySchema, MapSchema, Name, Schema, UnionSchema};
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A Confluent compatibility level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompatibilityLevel {
    #[default]
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
    None,
}

impl CompatibilityLevel {
    pub const ALL: [CompatibilityLevel; 7] = [
        CompatibilityLevel::Backward,
        CompatibilityLevel::BackwardTransitive,
        CompatibilityLevel::Forward,
        CompatibilityLevel::ForwardTransitive,
        CompatibilityLevel::Full,
        CompatibilityLevel::FullTransitive,
        CompatibilityLevel::None,
    ];

    /// The name Confluent uses on the wire, e.g. `BACKWARD_TRANSITIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            CompatibilityLevel::Backward => "BACKWARD",
            CompatibilityLevel::BackwardTransitive => "BACKWARD_TRANSITIVE",
            CompatibilityLevel::Forward => "FORWARD",
            CompatibilityLevel::ForwardTransitive => "FORWARD_TRANSITIVE",
            CompatibilityLevel::Full => "FULL",
            CompatibilityLevel::FullTransitive => "FULL_TRANSITIVE",
            CompatibilityLevel::None => "NONE",
        }
    }

    fn checks_backward(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::Backward
                | CompatibilityLevel::BackwardTransitive
                | CompatibilityLevel::Full
                | CompatibilityLevel::FullTransitive
        )
    }

    fn checks_forward(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::Forward
                | CompatibilityLevel::ForwardTransitive
                | CompatibilityLevel::Full
                | CompatibilityLevel::FullTransitive
        )
    }

    fn is_transitive(self) -> bool {
        matches!(self, CompatibilityLevel::BackwardTransitive | CompatibilityLevel::ForwardTransitive | CompatibilityLevel::FullTransitive)
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compatibility level name that is not one of the seven Confluent levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Invalid compatibility level '{0}'. Valid values are none, backward, forward, full, \
     backward_transitive, forward_transitive, and full_transitive"
)]
pub struct InvalidLevel(pub String);

impl FromStr for CompatibilityLevel {
    type Err = InvalidLevel;

    /// Case-insensitive, as Confluent accepts `"backward"` as well as `"BACKWARD"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        CompatibilityLevel::ALL.into_iter().find(|level| level.as_str() == upper).ok_or_else(|| InvalidLevel(s.to_owned()))
    }
}

/// A schema text that is not a valid Avro schema (or whose references do not resolve).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid schema: {0}")]
pub struct InvalidSchema(pub String);

/// A Confluent schema reference: the named type `name` is defined by `subject` at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SchemaReference {
    pub name: String,
    pub subject: String,
    pub version: i32,
}

/// A parsed, validated Avro schema.
#[derive(Debug, Clone)]
pub struct ParsedSchema {
    /// Self-contained: types taken from references are inlined.
    pub schema: Schema,
    /// The identity form (see the module docs); referenced types appear by name only.
    pub normalized: String,
    /// Avro Parsing Canonical Form of [`ParsedSchema::schema`].
    pub canonical_form: String,
}

/// Parses `text` as an Avro schema; `references` are the texts of the named schemas it may
/// refer to by name (Confluent references, already resolved to their schema texts).
pub fn parse(text: &str, references: &[String]) -> Result<ParsedSchema, InvalidSchema> {
    // The Avro parser is third-party code fed with request data: a panic in it must become a
    // rejected schema, not a dropped connection.
    catch_unwind(AssertUnwindSafe(|| parse_unguarded(text, references)))
        .unwrap_or_else(|_| Err(InvalidSchema("the Avro parser could not process this schema".to_owned())))
}

fn parse_unguarded(text: &str, references: &[String]) -> Result<ParsedSchema, InvalidSchema> {
    let invalid = |e: apache_avro::Error| InvalidSchema(e.to_string());
    let (schema, normalized) = if references.is_empty() {
        let schema = Schema::parse_str(text).map_err(invalid)?;
        let normalized = to_json(&schema)?;
        (schema, normalized)
    } else {
        let (mut schema, schemata) = Schema::parse_str_with_list(text, references).map_err(invalid)?;
        let normalized = to_json(&schema)?;
        schema.denormalize(&schemata).map_err(invalid)?;
        (schema, normalized)
    };
    let canonical_form = schema.canonical_form();
    Ok(ParsedSchema { schema, normalized, canonical_form })
}

fn to_json(schema: &Schema) -> Result<String, InvalidSchema> {
    serde_json::to_string(schema).map_err(|e| InvalidSchema(e.to_string()))
}

/// The identity key of a schema: SHA-256 (hex) over its type, normalized form and references.
pub fn fingerprint(schema_type: &str, normalized: &str, references: &[SchemaReference]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(schema_type.as_bytes());
    hasher.update([0u8]);
    hasher.update(normalized.as_bytes());
    for r in references {
        hasher.update([0u8]);
        hasher.update(r.name.as_bytes());
        hasher.update([0u8]);
        hasher.update(r.subject.as_bytes());
        hasher.update([0u8]);
        hasher.update(r.version.to_be_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Which way a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The new schema, as reader, cannot read data written with a previous one.
    Backward,
    /// A previous schema, as reader, cannot read data written with the new one.
    Forward,
}

/// One failed reader/writer check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    /// Index into the `previous` slice given to [`check`].
    pub previous_index: usize,
    pub direction: Direction,
    pub reason: String,
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.direction {
            Direction::Backward => write!(f, "the new schema cannot read data written with the previous schema: {}", self.reason),
            Direction::Forward => write!(f, "the previous schema cannot read data written with the new schema: {}", self.reason),
        }
    }
}

/// Checks `candidate` against `previous` (oldest first, so the last one is the latest) at
/// `level`. Returns every failed check, newest previous schema first; empty means compatible.
pub fn check(level: CompatibilityLevel, candidate: &Schema, previous: &[&Schema]) -> Vec<Incompatibility> {
    let mut found = Vec::new();
    if level == CompatibilityLevel::None || previous.is_empty() {
        return found;
    }
    let first = if level.is_transitive() { 0 } else { previous.len() - 1 };
    let candidate = inline_named_types(candidate);
    for index in (first..previous.len()).rev() {
        let old = inline_named_types(previous[index]);
        if level.checks_backward() {
            if let Err(reason) = can_read_inlined(&old, &candidate) {
                found.push(Incompatibility { previous_index: index, direction: Direction::Backward, reason });
            }
        }
        if level.checks_forward() {
            if let Err(reason) = can_read_inlined(&candidate, &old) {
                found.push(Incompatibility { previous_index: index, direction: Direction::Forward, reason });
            }
        }
    }
    found
}

/// Whether data written with `writer` can always be read with `reader`; the error says why not.
pub fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    can_read_inlined(&inline_named_types(writer), &inline_named_types(reader))
}

fn can_read_inlined(writer: &Schema, reader: &Schema) -> Result<(), String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| SchemaCompatibility::can_read(writer, reader)));
    match outcome {
        Ok(Ok(Compatibility::Full)) => Ok(()),
        Ok(Ok(Compatibility::Partial)) => Err("the reader lacks an enum symbol or union branch the writer may use, so only part \
             of the written data can be read"
            .to_owned()),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err("the compatibility checker failed on these schemas".to_owned()),
    }
}

/// The error and its causes on one line, with the schema dumps of `WrongType` cut down to the
/// type names (apache-avro puts the whole pretty-printed schemas in that message).
fn describe(error: &CompatibilityError) -> String {
    let mut parts = Vec::new();
    let mut current: Option<&CompatibilityError> = Some(error);
    while let Some(e) = current {
        match e {
            CompatibilityError::WrongType { writer_schema_type, reader_schema_type } => parts.push(format!(
                "Incompatible schema types! Writer schema is '{}', but reader schema is '{}'",
                kind_of(writer_schema_type),
                kind_of(reader_schema_type)
            )),
            other => parts.push(other.to_string()),
        }
        current = match e {
            CompatibilityError::FieldTypeMismatch(_, inner) => Some(inner),
            _ => None,
        };
    }
    parts.join(": ")
}

fn kind_of(debug_dump: &str) -> &str {
    debug_dump.split(|c: char| c == '(' || c == '{' || c.is_whitespace()).find(|s| !s.is_empty()).unwrap_or(debug_dump)
}

/// Upper bound on nodes produced while inlining, so a schema that reuses a big type many times
/// cannot blow up memory; past it the schema is compared as written.
const INLINE_BUDGET: usize = 100_000;

fn inline_named_types(schema: &Schema) -> Schema {
    let mut definitions = HashMap::new();
    collect_definitions(schema, &mut definitions);
    let mut budget = INLINE_BUDGET;
    inline(schema, &definitions, &mut Vec::new(), &mut budget).unwrap_or_else(|| schema.clone())
}

fn collect_definitions<'a>(schema: &'a Schema, definitions: &mut HashMap<&'a Name, &'a Schema>) {
    match schema {
        Schema::Ref { .. } => {}
        Schema::Record(record) => {
            definitions.entry(&record.name).or_insert(schema);
            for field in &record.fields {
                collect_definitions(&field.schema, definitions);
            }
        }
        Schema::Array(array) => collect_definitions(&array.items, definitions),
        Schema::Map(map) => collect_definitions(&map.types, definitions),
        Schema::Union(union) => {
            for variant in union.variants() {
                collect_definitions(variant, definitions);
            }
        }
        other => {
            if let Some(name) = other.name() {
                definitions.entry(name).or_insert(other);
            }
        }
    }
}

/// `stack` holds the records being expanded: a reference to one of them is recursion and stays
/// a reference (the checker handles it by name).
fn inline(schema: &Schema, definitions: &HashMap<&Name, &Schema>, stack: &mut Vec<Name>, budget: &mut usize) -> Option<Schema> {
    *budget = budget.checked_sub(1)?;
    Some(match schema {
        Schema::Ref { name } => match definitions.get(name) {
            Some(definition) if !stack.contains(name) => inline(definition, definitions, stack, budget)?,
            _ => schema.clone(),
        },
        Schema::Record(record) => {
            let mut record = record.clone();
            stack.push(record.name.clone());
            for field in &mut record.fields {
                field.schema = inline(&field.schema, definitions, stack, budget)?;
            }
            stack.pop();
            Schema::Record(record)
        }
        Schema::Array(array) => Schema::Array(ArraySchema {
            items: Box::new(inline(&array.items, definitions, stack, budget)?),
            attributes: array.attributes.clone(),
        }),
        Schema::Map(map) => {
            Schema::Map(MapSchema { types: Box::new(inline(&map.types, definitions, stack, budget)?), attributes: map.attributes.clone() })
        }
        Schema::Union(union) => {
            let variants = union.variants().iter().map(|v| inline(v, definitions, stack, budget)).collect::<Option<Vec<_>>>()?;
            Schema::Union(UnionSchema::new(variants).ok()?)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Schema {
        parse(text, &[]).expect("test schema must parse").schema
    }

    const V1: &str = r#"{"type":"record","name":"Reading","namespace":"vitals",
        "fields":[{"name":"bpm","type":"int"}]}"#;
    const ADDED_WITH_DEFAULT: &str = r#"{"type":"record","name":"Reading","namespace":"vitals",
        "fields":[{"name":"bpm","type":"int"},{"name":"spo2","type":"int","default":98}]}"#;
    const ADDED_WITHOUT_DEFAULT: &str = r#"{"type":"record","name":"Reading","namespace":"vitals",
        "fields":[{"name":"bpm","type":"int"},{"name":"spo2","type":"int"}]}"#;

    #[test]
    fn levels_parse_case_insensitively_and_reject_unknown_names() {
        for level in CompatibilityLevel::ALL {
            assert_eq!(level.as_str().parse::<CompatibilityLevel>(), Ok(level));
            assert_eq!(level.as_str().to_lowercase().parse::<CompatibilityLevel>(), Ok(level));
        }
        assert_eq!("SIDEWAYS".parse::<CompatibilityLevel>(), Err(InvalidLevel("SIDEWAYS".to_owned())));
        assert_eq!(CompatibilityLevel::default(), CompatibilityLevel::Backward);
    }

    #[test]
    fn normalized_form_ignores_layout_and_name_spelling_but_not_defaults() {
        let a = parse(r#"{"type":"record","name":"vitals.R","fields":[{"name":"x","type":"int"}]}"#, &[]).unwrap();
        let b = parse(r#"{ "fields" : [ {"type":"int", "name":"x"} ], "namespace":"vitals", "name":"R", "type":"record" }"#, &[]).unwrap();
        assert_eq!(a.normalized, b.normalized);
        let with_default = parse(r#"{"type":"record","name":"vitals.R","fields":[{"name":"x","type":"int","default":1}]}"#, &[]).unwrap();
        assert_ne!(a.normalized, with_default.normalized);
        assert_eq!(a.canonical_form, with_default.canonical_form);
        assert_ne!(fingerprint("AVRO", &a.normalized, &[]), fingerprint("AVRO", &with_default.normalized, &[]));
    }

    #[test]
    fn invalid_schemas_are_rejected_with_a_reason() {
        for text in [
            "",
            "not json",
            r#"{"type":"record"}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"x","type":"Missing"}]}"#,
            r#"{"type":"nope"}"#,
        ] {
            let err = parse(text, &[]).expect_err(text);
            assert!(!err.0.is_empty(), "{text}");
        }
    }

    #[test]
    fn backward_accepts_added_field_with_default_and_rejects_one_without() {
        let v1 = schema(V1);
        assert!(check(CompatibilityLevel::Backward, &schema(ADDED_WITH_DEFAULT), &[&v1]).is_empty());
        let problems = check(CompatibilityLevel::Backward, &schema(ADDED_WITHOUT_DEFAULT), &[&v1]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].direction, Direction::Backward);
        assert!(problems[0].reason.contains("spo2"), "{}", problems[0].reason);
    }

    #[test]
    fn forward_is_the_mirror_of_backward() {
        // Old readers ignore a new field, with or without default.
        let v2 = schema(ADDED_WITHOUT_DEFAULT);
        assert!(check(CompatibilityLevel::Forward, &v2, &[&schema(V1)]).is_empty());
        // Dropping a field the old reader has no default for breaks old readers.
        let problems = check(CompatibilityLevel::Forward, &schema(V1), &[&v2]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].direction, Direction::Forward);
        // ... while BACKWARD does not care about that.
        assert!(check(CompatibilityLevel::Backward, &schema(V1), &[&v2]).is_empty());
    }

    #[test]
    fn full_needs_both_directions_and_none_needs_nothing() {
        let v1 = schema(V1);
        assert!(check(CompatibilityLevel::Full, &schema(ADDED_WITH_DEFAULT), &[&v1]).is_empty());
        assert_eq!(check(CompatibilityLevel::Full, &schema(ADDED_WITHOUT_DEFAULT), &[&v1]).len(), 1);
        assert!(check(CompatibilityLevel::None, &schema(r#""string""#), &[&v1]).is_empty());
        let problems = check(CompatibilityLevel::Full, &schema(r#""string""#), &[&v1]);
        assert_eq!(problems.len(), 2);
        assert!(problems[0].reason.contains("'Record'"), "{}", problems[0].reason);
    }

    #[test]
    fn transitive_levels_check_every_previous_version() {
        let v1 = schema(V1);
        let v2 = schema(ADDED_WITH_DEFAULT);
        // Compatible with v2 (which has spo2) but not with v1 (which lacks it).
        let v3 = schema(ADDED_WITHOUT_DEFAULT);
        assert!(check(CompatibilityLevel::Backward, &v3, &[&v1, &v2]).is_empty());
        let problems = check(CompatibilityLevel::BackwardTransitive, &v3, &[&v1, &v2]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].previous_index, 0);

        // FORWARD_TRANSITIVE: v1 drops a field v2 and v3 require.
        assert!(check(CompatibilityLevel::Forward, &v1, &[&v3, &v2]).is_empty());
        let problems = check(CompatibilityLevel::ForwardTransitive, &v1, &[&v3, &v2]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].previous_index, 0);
        assert_eq!(check(CompatibilityLevel::FullTransitive, &v1, &[&v3, &v2]).len(), 1);
    }

    #[test]
    fn partial_enum_or_union_compatibility_counts_as_incompatible() {
        let enum_abc = schema(r#"{"type":"enum","name":"Unit","symbols":["A","B","C"]}"#);
        let enum_ab = schema(r#"{"type":"enum","name":"Unit","symbols":["A","B"]}"#);
        assert!(can_read(&enum_ab, &enum_abc).is_ok());
        assert!(can_read(&enum_abc, &enum_ab).is_err());
        let with_default = schema(r#"{"type":"enum","name":"Unit","symbols":["A","B"],"default":"A"}"#);
        assert!(can_read(&enum_abc, &with_default).is_ok());

        let wide = schema(r#"["null","int","string"]"#);
        let narrow = schema(r#"["null","int"]"#);
        assert!(can_read(&narrow, &wide).is_ok());
        assert!(can_read(&wide, &narrow).is_err());
    }

    #[test]
    fn reused_named_types_are_compared_by_structure_not_by_definition_site() {
        let old = schema(
            r#"{"type":"record","name":"Pair","fields":[
                {"name":"a","type":{"type":"enum","name":"Unit","symbols":["BPM","PCT"]}},
                {"name":"b","type":"Unit"}]}"#,
        );
        // The first use of Unit moved to a new field placed before `a`.
        let new = schema(
            r#"{"type":"record","name":"Pair","fields":[
                {"name":"c","type":{"type":"enum","name":"Unit","symbols":["BPM","PCT"]},"default":"BPM"},
                {"name":"a","type":"Unit"},
                {"name":"b","type":"Unit"}]}"#,
        );
        assert!(check(CompatibilityLevel::Full, &new, &[&old]).is_empty());
    }

    #[test]
    fn recursive_types_do_not_loop() {
        let list = |extra: &str| {
            schema(&format!(
                r#"{{"type":"record","name":"Node","fields":[
                    {{"name":"value","type":"long"}}{extra},
                    {{"name":"next","type":["null","Node"],"default":null}}]}}"#
            ))
        };
        let v1 = list("");
        let v2 = list(r#",{"name":"label","type":"string","default":""}"#);
        assert!(check(CompatibilityLevel::FullTransitive, &v2, &[&v1]).is_empty());
    }

    #[test]
    fn references_are_resolved_and_kept_out_of_the_identity() {
        let unit = r#"{"type":"enum","name":"Unit","namespace":"vitals","symbols":["BPM"]}"#.to_owned();
        let text = r#"{"type":"record","name":"M","namespace":"vitals","fields":[{"name":"u","type":"vitals.Unit"}]}"#;
        let parsed = parse(text, &[unit]).unwrap();
        assert!(parsed.normalized.contains("\"vitals.Unit\""));
        assert!(parsed.canonical_form.contains("\"symbols\""));
        assert!(parse(text, &[]).is_err());
        let reference = SchemaReference { name: "vitals.Unit".into(), subject: "unit".into(), version: 1 };
        let other = SchemaReference { version: 2, ..reference.clone() };
        assert_ne!(fingerprint("AVRO", &parsed.normalized, &[reference]), fingerprint("AVRO", &parsed.normalized, &[other]));
    }
}
