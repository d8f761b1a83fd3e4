//! The Confluent-framed Avro codec: magic byte 0, 4-byte big-endian schema id, Avro binary body.
//! Encoding and decoding go through `schema_registry_converter` against any Confluent-compatible
//! registry (vitals' own `vitals registry`, Confluent's, Apicurio's, Redpanda's): subjects follow
//! the TopicNameStrategy (`<topic>-value`).

use apache_avro::Schema;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{
    is_compatible_schema, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::avro::{value_subject, AvroFile};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The registry could not be reached or answered 5xx: try again later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The bytes are not a Confluent-framed record of a known schema, or do not match our type.
    #[error("undecodable record: {0}")]
    Undecodable(String),
    /// The value does not fit the registered schema (a bug or a schema mismatch).
    #[error("unencodable value: {0}")]
    Unencodable(String),
    #[error("schema registry rejected the schema: {0}")]
    Rejected(String),
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(c) => format!("{}: {}", e.error, c),
        None => e.error.clone(),
    }
}

/// Encoder + decoder sharing one registry client; both cache schemas by subject and id.
pub struct Codec {
    url: String,
    settings: SrSettings,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
}

impl Codec {
    pub fn new(registry_url: &str) -> Codec {
        let url = registry_url.trim_end_matches('/').to_owned();
        let settings = SrSettings::new(url.clone());
        Codec { encoder: AvroEncoder::new(settings.clone()), decoder: AvroDecoder::new(settings.clone()), settings, url }
    }

    /// The same codec sending `user`/`password` as HTTP basic authentication on every registry
    /// request (an empty `user` sends none).
    pub fn with_basic_auth(self, user: &str, password: &str) -> Codec {
        if user.is_empty() {
            return self;
        }
        let settings = SrSettings::new_builder(self.url.clone())
            .set_basic_authorization(user, Some(password))
            .build()
            .expect("registry client settings (only a TLS backend failure can make this fail)");
        Codec { encoder: AvroEncoder::new(settings.clone()), decoder: AvroDecoder::new(settings.clone()), settings, url: self.url }
    }

    /// Encodes `value` with the latest schema registered for `<topic>-value`.
    pub async fn encode<T: Serialize>(&self, topic: &str, value: &T) -> Result<Vec<u8>, CodecError> {
        let strategy = SubjectNameStrategy::TopicNameStrategy(topic.to_owned(), false);
        self.encoder.encode_struct(value, &strategy).await.map_err(|e| {
            if e.retriable {
                self.encoder.remove_errors_from_cache();
                CodecError::Unavailable(describe(&e))
            } else {
                CodecError::Unencodable(describe(&e))
            }
        })
    }

    /// Decodes a Confluent-framed record into `T`.
    pub async fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let decoded = self.decoder.decode(Some(bytes)).await.map_err(|e| {
            if e.retriable {
                self.decoder.remove_errors_from_cache();
                CodecError::Unavailable(describe(&e))
            } else {
                CodecError::Undecodable(describe(&e))
            }
        })?;
        apache_avro::from_value::<T>(&decoded.value).map_err(|e| CodecError::Undecodable(e.to_string()))
    }

    /// Registers `file` as the next version of `<topic>-value` (idempotent) and returns its id.
    pub async fn register(&self, topic: &str, file: &AvroFile) -> Result<u32, CodecError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, file.text.to_owned());
        post_schema(&self.settings, value_subject(topic), supplied)
            .await
            .map(|r| r.id)
            .map_err(|e| if e.retriable { CodecError::Unavailable(describe(&e)) } else { CodecError::Rejected(describe(&e)) })
    }

    /// Whether `file` is compatible with what `<topic>-value` holds, at the subject's configured level.
    pub async fn is_compatible(&self, topic: &str, file: &AvroFile) -> Result<bool, CodecError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, file.text.to_owned());
        is_compatible_schema(&self.settings, value_subject(topic), supplied)
            .await
            .map_err(|e| if e.retriable { CodecError::Unavailable(describe(&e)) } else { CodecError::Rejected(describe(&e)) })
    }
}

/// Encodes `value` with a known `schema` and id, without a registry round trip: the same bytes
/// the registry-backed encoder writes. Used by tests and benchmarks to compare framings.
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
