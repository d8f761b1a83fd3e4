//! The Confluent-framed Avro codec: magic byte 0, 4-byte big-endian schema id, Avro binary body,
//! against any Confluent-compatible registry (vitals' own `vitals registry`, Confluent's,
//! Apicurio's, Redpanda's); subjects follow the TopicNameStrategy (`<topic>-value`).
//!
//! * **Encoding uses vitals' own schema**, never "whatever is latest under the subject": the id
//!   of the embedded `.avsc` is looked up by content (`POST /subjects/<subject>`), so a version a
//!   third party registers later changes nothing about what vitals writes.
//! * **Decoding resolves writer → reader**: the writer's schema is fetched by the record's id and
//!   the body is resolved into vitals' own schema of the type asked for, by Avro's resolution
//!   rules (a compatible evolution, e.g. a dropped defaulted field, decodes).
//! * **Only the record can make a record undecodable.** Every failure to get an answer from the
//!   registry — unreachable, a timeout, any non-2xx status including 404 (a subject or id
//!   deleted) and 429 — is [`CodecError::Unavailable`]: retried by the caller, never cached, never
//!   a dead letter. [`CodecError::Undecodable`] means the bytes themselves are proven bad: not
//!   Confluent-framed, a body that does not decode with its own writer schema, or a writer schema
//!   that cannot be resolved into ours.
//!
//! Registration and compatibility checks (`vitals schemas register|check`) go through
//! `schema_registry_converter`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{is_compatible_schema, post_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::avro::{self, value_subject, AvroFile};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The registry could not give an answer (unreachable, timed out, any non-2xx status, a
    /// schema vitals needs is not registered): try again later. Never a property of the record.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The bytes are proven bad: not a Confluent-framed record, or a body that does not decode
    /// with its writer's schema, or that schema cannot be resolved into vitals' own.
    #[error("undecodable record: {0}")]
    Undecodable(String),
    /// The value does not fit vitals' own schema (a bug).
    #[error("unencodable value: {0}")]
    Unencodable(String),
    #[error("schema registry rejected the schema: {0}")]
    Rejected(String),
}

/// A record type vitals puts on the wire, and its own schema.
pub trait AvroRecord {
    fn file() -> AvroFile;
}

/// A projection record's schema is derived from its descriptor.
impl<T: crate::projection::Projected> AvroRecord for T {
    fn file() -> AvroFile {
        T::DESCRIPTOR.avro()
    }
}

macro_rules! records {
    ($($t:ident => $f:ident),* $(,)?) => {
        $(impl AvroRecord for crate::records::$t { fn file() -> AvroFile { avro::$f } })*
    };
}
records! {
    SampleBatch => SAMPLE_BATCH,
    ChangeBatch => CHANGE_BATCH,
    DomainChangeBatch => DOMAIN_CHANGE_BATCH,
    DeadLetter => DEAD_LETTER,
    RealtimeEnvelope => REALTIME_ENVELOPE,
}

/// Vitals' own schema of a record type, parsed once: for apache-avro (resolution of other
/// writers' schemas, the reference encoder) and for serde_avro_fast (the hot paths).
struct Own {
    schema: Schema,
    canonical: String,
    fast: serde_avro_fast::Schema,
}

/// Vitals' own schema of `file`, parsed once (with its Parsing Canonical Form).
fn own(file: AvroFile) -> &'static Own {
    static OWN: OnceLock<RwLock<HashMap<&'static str, &'static Own>>> = OnceLock::new();
    let map = OWN.get_or_init(Default::default);
    if let Some(s) = map.read().unwrap_or_else(|p| p.into_inner()).get(file.name) {
        return s;
    }
    let schema = file.schema();
    let canonical = schema.canonical_form();
    let fast = file.text.parse().unwrap_or_else(|e| panic!("{}.avsc does not parse for serde_avro_fast: {e}", file.name));
    let leaked: &'static Own = Box::leak(Box::new(Own { schema, canonical, fast }));
    map.write().unwrap_or_else(|p| p.into_inner()).entry(file.name).or_insert(leaked)
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(c) => format!("{}: {}", e.error, c),
        None => e.error.clone(),
    }
}

/// A writer schema fetched by id (ids are immutable, so a schema once fetched is kept).
struct Writer {
    schema: Schema,
    canonical: String,
}

/// Encoder + decoder sharing one registry client. Caches only answers, never failures.
pub struct Codec {
    url: String,
    settings: SrSettings,
    http: reqwest::Client,
    auth: Option<(String, String)>,
    writers: RwLock<HashMap<u32, Arc<Writer>>>,
    /// Subject → the id of vitals' own schema under it.
    ids: RwLock<HashMap<String, u32>>,
    roots: Vec<reqwest::Certificate>,
}

/// How long one registry request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Codec {
    pub fn new(registry_url: &str) -> Codec {
        let url = registry_url.trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("a reqwest client builds");
        Codec {
            settings: SrSettings::new(url.clone()),
            url,
            http,
            auth: None,
            roots: Vec::new(),
            writers: Default::default(),
            ids: Default::default(),
        }
    }

    /// The same codec, trusting `roots` (beside the system's CAs) for an https registry.
    pub fn with_roots(mut self, roots: Vec<reqwest::Certificate>) -> Codec {
        self.roots = roots;
        self.rebuild();
        self
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        self.roots.iter().fold(reqwest::Client::builder().timeout(REQUEST_TIMEOUT), |b, r| b.add_root_certificate(r.clone()))
    }

    /// Rebuilds both HTTP clients (ours and the registry converter's) from the roots and the
    /// credentials.
    fn rebuild(&mut self) {
        self.http = self.client_builder().build().expect("a reqwest client builds");
        let mut settings = SrSettings::new_builder(self.url.clone());
        if let Some((user, password)) = &self.auth {
            settings.set_basic_authorization(user, Some(password));
        }
        self.settings = settings.set_timeout(REQUEST_TIMEOUT).build_with(self.client_builder()).expect("registry settings build");
    }

    /// The same codec, sending HTTP basic credentials with every registry request (an empty
    /// `user` sends none).
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> Codec {
        if user.is_empty() {
            return self;
        }
        self.auth = Some((user.to_owned(), password.to_owned()));
        self.rebuild();
        self
    }

    fn request(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some((u, p)) => b.basic_auth(u, Some(p)),
            None => b,
        }
    }

    /// Encodes `value` with vitals' own schema of `T`, framed with that schema's id under
    /// `<topic>-value`.
    pub async fn encode<T: Serialize + AvroRecord>(&self, topic: &str, value: &T) -> Result<Vec<u8>, CodecError> {
        let id = self.own_id(topic, T::file()).await?;
        encode_own(T::file(), id, value)
    }

    /// The id of vitals' own `file` under `<topic>-value`, looked up by content.
    pub async fn own_id(&self, topic: &str, file: AvroFile) -> Result<u32, CodecError> {
        let subject = value_subject(topic);
        if let Some(id) = self.ids.read().unwrap_or_else(|p| p.into_inner()).get(&subject) {
            return Ok(*id);
        }
        let url = format!("{}/subjects/{subject}", self.url);
        let resp = self
            .request(self.http.post(&url))
            .json(&serde_json::json!({ "schema": file.text }))
            .send()
            .await
            .map_err(|e| CodecError::Unavailable(format!("looking up {} under {subject}: {e}", file.name)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(CodecError::Unavailable(format!(
                "vitals' schema {} is not registered under {subject} (run `vitals schemas register`)",
                file.name
            )));
        }
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(CodecError::Unavailable(format!("looking up {} under {subject}: HTTP {status}: {}", file.name, truncate(&body))));
        }
        #[derive(serde::Deserialize)]
        struct Found {
            id: u32,
        }
        let found: Found =
            resp.json().await.map_err(|e| CodecError::Unavailable(format!("looking up {} under {subject}: {e}", file.name)))?;
        self.ids.write().unwrap_or_else(|p| p.into_inner()).insert(subject, found.id);
        Ok(found.id)
    }

    /// The writer schema of `id`.
    async fn writer(&self, id: u32) -> Result<Arc<Writer>, CodecError> {
        if let Some(w) = self.writers.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(Arc::clone(w));
        }
        let url = format!("{}/schemas/ids/{id}", self.url);
        let resp =
            self.request(self.http.get(&url)).send().await.map_err(|e| CodecError::Unavailable(format!("fetching schema id {id}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(CodecError::Unavailable(format!("fetching schema id {id}: HTTP {status}: {}", truncate(&body))));
        }
        #[derive(serde::Deserialize)]
        struct ById {
            schema: String,
            #[serde(default, rename = "schemaType")]
            schema_type: Option<String>,
        }
        let by_id: ById = resp.json().await.map_err(|e| CodecError::Unavailable(format!("fetching schema id {id}: {e}")))?;
        if by_id.schema_type.as_deref().is_some_and(|t| !t.eq_ignore_ascii_case("AVRO")) {
            return Err(CodecError::Undecodable(format!("schema id {id} is a {} schema, not Avro", by_id.schema_type.unwrap_or_default())));
        }
        let schema =
            Schema::parse_str(&by_id.schema).map_err(|e| CodecError::Undecodable(format!("schema id {id} does not parse as Avro: {e}")))?;
        let w = Arc::new(Writer { canonical: schema.canonical_form(), schema });
        self.writers.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::clone(&w));
        Ok(w)
    }

    /// Decodes a Confluent-framed record into `T`, resolving its writer's schema into vitals'
    /// own schema of `T`.
    pub async fn decode<T: DeserializeOwned + AvroRecord>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let (id, body) = frame(bytes)?;
        let writer = self.writer(id).await?;
        let own = own(T::file());
        if writer.canonical == own.canonical {
            return decode_own(T::file(), body).map_err(|e| CodecError::Undecodable(format!("schema id {id} → {}: {e}", T::file().name)));
        }
        let mut body = body;
        let datum = GenericDatumReader::builder(&writer.schema)
            .reader_schema(&own.schema)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(|e| CodecError::Undecodable(format!("schema id {id} → {}: {e}", T::file().name)))?;
        if !body.is_empty() {
            return Err(CodecError::Undecodable(format!("{} bytes after the end of the record (schema id {id})", body.len())));
        }
        apache_avro::from_value::<T>(&datum).map_err(|e| CodecError::Undecodable(format!("schema id {id} → {}: {e}", T::file().name)))
    }

    /// Decodes a Confluent-framed record with its writer's schema only, whatever type it is (for
    /// tools that show records: `vitals dlq show`).
    pub async fn decode_value(&self, bytes: &[u8]) -> Result<apache_avro::types::Value, CodecError> {
        let (id, mut body) = frame(bytes)?;
        let writer = self.writer(id).await?;
        GenericDatumReader::builder(&writer.schema)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(|e| CodecError::Undecodable(format!("schema id {id}: {e}")))
    }

    /// Registers `file` as the next version of `<topic>-value` (idempotent) and returns its id.
    pub async fn register(&self, topic: &str, file: &AvroFile) -> Result<u32, CodecError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, file.text.to_owned());
        post_schema(&self.settings, value_subject(topic), supplied).await.map(|r| r.id).map_err(|e| {
            if e.retriable {
                CodecError::Unavailable(describe(&e))
            } else {
                CodecError::Rejected(describe(&e))
            }
        })
    }

    /// Whether `file` is compatible with what `<topic>-value` holds, at the subject's configured level.
    pub async fn is_compatible(&self, topic: &str, file: &AvroFile) -> Result<bool, CodecError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, file.text.to_owned());
        is_compatible_schema(&self.settings, value_subject(topic), supplied).await.map_err(|e| {
            if e.retriable {
                CodecError::Unavailable(describe(&e))
            } else {
                CodecError::Rejected(describe(&e))
            }
        })
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The schema id and body of a Confluent-framed record.
pub fn frame(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    match bytes {
        [0, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [] => Err(CodecError::Undecodable("empty payload".into())),
        [m, ..] if *m != 0 => Err(CodecError::Undecodable(format!("not Confluent-framed: magic byte {m:#04x}, expected 0x00"))),
        _ => Err(CodecError::Undecodable(format!("not Confluent-framed: {} bytes, shorter than the 5-byte header", bytes.len()))),
    }
}

/// Encodes `value` with vitals' own schema of `file`, framed with `id`: serde straight to Avro
/// bytes (serde_avro_fast), no intermediate `Value` tree. Byte for byte what [`encode_with_id`]
/// writes (the agreement tests check it on every record type).
pub fn encode_own<T: Serialize>(file: AvroFile, id: u32, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    let mut config = serde_avro_fast::ser::SerializerConfig::new(&own(file).fast);
    serde_avro_fast::to_datum(value, out, &mut config).map_err(|e| CodecError::Unencodable(e.to_string()))
}

/// Decodes an Avro body written with vitals' own schema of `file` (no framing), requiring that
/// it ends exactly where the record does.
pub fn decode_own<T: DeserializeOwned>(file: AvroFile, body: &[u8]) -> Result<T, String> {
    let mut reader = serde_avro_fast::de::read::ReaderRead::new(body);
    // No string or byte field can be longer than the body: a hostile length prefix fails at
    // once instead of allocating.
    reader.max_alloc_size = body.len();
    let mut state = serde_avro_fast::de::DeserializerState::new(reader, &own(file).fast);
    let value = T::deserialize(state.deserializer()).map_err(|e| e.to_string())?;
    let rest = state.into_reader().into_inner();
    if !rest.is_empty() {
        return Err(format!("{} bytes after the end of the record", rest.len()));
    }
    Ok(value)
}

/// The reference encoder: `value` with a known `schema` and id through apache-avro's `Value`
/// tree, without a registry round trip. Tests compare [`encode_own`] (what vitals writes) with it.
pub fn encode_with_id<T: Serialize>(schema: &Schema, id: u32, value: &T) -> Result<Vec<u8>, CodecError> {
    let v = apache_avro::to_value(value).map_err(|e| CodecError::Unencodable(e.to_string()))?;
    let v = v.resolve(schema).map_err(|e| CodecError::Unencodable(e.to_string()))?;
    let body = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|w| w.write_value_to_vec(v))
        .map_err(|e| CodecError::Unencodable(e.to_string()))?;
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}
