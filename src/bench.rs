//! Benchmarks that print figures (never timed assertions). `vitals bench ingest`: the simulator
//! uploads through a real edge into the real broker; then the very records the edge wrote are
//! produced again, raw, with the same producer settings, so the edge's rate stands beside the
//! broker's own rate for the same bytes, measured in the same run.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::future::join_all;
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use tokio::net::TcpListener;

use crate::app;
use crate::config::Config;
use crate::simulate::{self, SimConfig};

pub async fn ingest(base: &Config, mut sim: SimConfig) -> anyhow::Result<()> {
    // A fresh topic namespace per run, so figures are never mixed with earlier data.
    let mut cfg = base.clone();
    let run = format!("bench{}.", chrono::Utc::now().timestamp_millis());
    cfg.kafka.topic_prefix = format!("{}{run}", cfg.kafka.topic_prefix);
    let pool = app::pg_pool(&cfg).await?;
    app::migrate(&pool).await?;
    app::create_topics(&cfg).await?;
    app::register_schemas(&cfg).await?;
    let ingest = app::ingest(&cfg, pool).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    sim.base_url = format!("http://{}", listener.local_addr()?);
    sim.user_prefix = format!("{run}{}", sim.user_prefix);
    let server = tokio::spawn(app::serve(listener, vitals_ingest::router(Arc::clone(&ingest)), std::future::pending()));

    let http = reqwest::Client::new();
    let report = simulate::run(&sim, &http).await.context("simulated upload")?;
    server.abort();

    // Everything the edge wrote, in every lane.
    let topics = app::topics(&cfg);
    let mut records = Vec::new();
    for t in [&topics.hot, &topics.cold, &topics.change, &topics.domain] {
        records.extend(app::read_all(&cfg, t).await?);
    }
    let bytes: usize = records.iter().map(|m| m.payload().map_or(0, |p| p.len()) + m.key().map_or(0, |k| k.len())).sum();

    // The broker's raw rate for the same records: same producer settings, same keys and payloads.
    let raw_topic = format!("{}raw", cfg.kafka.topic_prefix);
    create_raw_topic(&cfg, &raw_topic).await?;
    let producer = app::producer(&cfg, "vitals-bench-raw")?;
    let t0 = Instant::now();
    for chunk in records.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut rec = FutureRecord::to(&raw_topic).payload(m.payload().unwrap_or_default());
            if let Some(k) = m.key() {
                rec = rec.key(k);
            }
            acks.push(producer.send(rec, std::time::Duration::from_secs(30)));
        }
        for r in join_all(acks).await {
            r.map_err(|(e, _)| e).context("raw produce")?;
        }
    }
    let raw = t0.elapsed();

    let secs = report.elapsed.as_secs_f64();
    let mb = bytes as f64 / 1e6;
    println!("vitals bench ingest — {} users × {} days, batch ≤ {} samples, concurrency {}", sim.users, sim.days, sim.batch_size, sim.concurrency);
    println!("  edge (HTTP → validate → Avro via registry → Kafka, 2xx after acks=all):");
    println!("    {:>10} items accepted in {:>7.2} s = {:>10.0} items/s ({} requests, {:.0} req/s)", report.accepted, secs, report.accepted as f64 / secs, report.requests, report.requests as f64 / secs);
    println!("    {:>10} Kafka records, {:.2} MB = {:.2} MB/s into the broker", records.len(), mb, mb / secs);
    println!("  broker raw produce of the same {} records / {:.2} MB (idempotent, acks=all):", records.len(), mb);
    println!("    {:>7.2} s = {:.0} records/s, {:.2} MB/s, i.e. {:.0} items/s equivalent", raw.as_secs_f64(), records.len() as f64 / raw.as_secs_f64(), mb / raw.as_secs_f64(), report.accepted as f64 / raw.as_secs_f64());
    println!("  edge / raw throughput: {:.2}", raw.as_secs_f64() / secs);
    Ok(())
}

async fn create_raw_topic(cfg: &Config, name: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let admin = app::admin(cfg)?;
    let t = NewTopic::new(name, cfg.kafka.partitions, TopicReplication::Fixed(cfg.kafka.replication_factor));
    let r = admin.create_topics([&t], &AdminOptions::new()).await?;
    for x in r {
        x.map_err(|(n, c)| anyhow::anyhow!("creating {n}: {c}"))?;
    }
    Ok(())
}
