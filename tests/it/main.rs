//! Integration tests: every one talks to real servers — the nisshi Kafka-protocol broker,
//! PostgreSQL, Redis, the S3 store (all started by `scripts/services up`, which the harness runs)
//! and vitals' own schema registry and ingest edge, served on port 0 against a fresh database and
//! fresh topic names per test.

mod api;
mod archive;
mod browser;
mod demo;
mod dlq;
mod faults;
mod freshness;
mod harness;
mod hostile;
mod ingest;
mod jwks;
mod metrics;
mod offsets;
mod outages;
mod pipeline;
mod process;
mod projections;
mod registry;
mod replay;
mod schemas;
mod simulate;
mod sink;
mod snapshot;
mod tls;
mod traces;
