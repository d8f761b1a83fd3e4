//! Writes accepted records to their lane topics, keyed by user, and waits until the broker has
//! acknowledged every one of them (idempotent producer, `acks=all`, configured by the composition
//! root). Bounded: a full local queue or an unacknowledged record within the delivery timeout is
//! an error the edge turns into 503 + `Retry-After`, never a 2xx.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use vitals_schemas::codec::{Codec, CodecError};

use crate::store::Landed;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The producer's bounded queue is full: the broker is slow or down.
    #[error("producer queue full")]
    QueueFull,
    /// A record was not acknowledged (timeout, broker down, not enough replicas…).
    #[error("broker did not acknowledge: {0}")]
    NotAcknowledged(String),
    #[error("schema registry unavailable: {0}")]
    Registry(String),
    /// Our value does not fit our schema: a bug, not the client's fault.
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// One record to write: topic + value; the key is always the user id.
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

pub struct LaneWriter {
    producer: FutureProducer,
    codec: Arc<Codec>,
    /// Upper bound on waiting for acknowledgements (the producer's `message.timeout.ms` is the
    /// primary bound; this one guards against a lost delivery report).
    ack_timeout: Duration,
}

impl LaneWriter {
    pub fn new(producer: FutureProducer, codec: Arc<Codec>, ack_timeout: Duration) -> LaneWriter {
        LaneWriter { producer, codec, ack_timeout }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    pub async fn encode<T: Serialize + vitals_schemas::codec::AvroRecord>(&self, topic: &str, value: &T) -> Result<Outgoing, WriteError> {
        let payload = self.codec.encode(topic, value).await.map_err(|e| match e {
            CodecError::Unavailable(m) => WriteError::Registry(m),
            other => WriteError::Encode(other.to_string()),
        })?;
        Ok(Outgoing { topic: topic.to_owned(), payload })
    }

    /// Produces every record and returns where each landed, or the first failure.
    pub async fn write(&self, user: &str, traceparent: &str, request_id: &str, records: &[Outgoing]) -> Result<Vec<Landed>, WriteError> {
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let headers = OwnedHeaders::new()
                .insert(Header { key: "traceparent", value: Some(traceparent) })
                .insert(Header { key: "vitals-request-id", value: Some(request_id) });
            let record = FutureRecord::to(&r.topic).key(user).payload(&r.payload).headers(headers);
            match self.producer.send_result(record) {
                Ok(f) => pending.push((r.topic.clone(), f)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => return Err(WriteError::QueueFull),
                Err((e, _)) => return Err(WriteError::NotAcknowledged(e.to_string())),
            }
        }
        let topics: Vec<String> = pending.iter().map(|(t, _)| t.clone()).collect();
        let acks = tokio::time::timeout(self.ack_timeout, join_all(pending.into_iter().map(|(_, f)| f)))
            .await
            .map_err(|_| WriteError::NotAcknowledged("no delivery report within the ack timeout".into()))?;
        let mut landed = Vec::with_capacity(acks.len());
        for (topic, ack) in topics.into_iter().zip(acks) {
            match ack {
                Ok(Ok(d)) => landed.push(Landed { topic, partition: d.partition, offset: d.offset }),
                Ok(Err((e, _))) => return Err(WriteError::NotAcknowledged(e.to_string())),
                Err(_) => return Err(WriteError::NotAcknowledged("producer dropped the delivery".into())),
            }
        }
        Ok(landed)
    }
}
