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

/// A fresh topic namespace (so figures never mix with earlier data), a real edge on port 0, and
/// the simulated people uploaded through it. Returns the run's config, its pool, its prefix and
/// the upload report.
async fn upload_fresh(base: &Config, tag: &str, mut sim: SimConfig) -> anyhow::Result<(Config, sqlx::PgPool, String, simulate::SimReport)> {
    let mut cfg = base.clone();
    let run = format!("{tag}{}.", chrono::Utc::now().timestamp_millis());
    cfg.kafka.topic_prefix = format!("{}{run}", cfg.kafka.topic_prefix);
    let pool = app::pg_pool(&cfg).await?;
    app::migrate(&pool).await?;
    app::create_topics(&cfg).await?;
    app::register_schemas(&cfg).await?;
    let ingest = app::ingest(&cfg, pool.clone()).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    sim.base_url = format!("http://{}", listener.local_addr()?);
    sim.user_prefix = format!("{run}{}", sim.user_prefix);
    let server = tokio::spawn(app::serve(listener, vitals_ingest::router(Arc::clone(&ingest)), std::future::pending()));
    let report = simulate::run(&sim, &reqwest::Client::new()).await.context("simulated upload");
    server.abort();
    Ok((cfg, pool, run, report?))
}

pub async fn ingest(base: &Config, sim: SimConfig) -> anyhow::Result<()> {
    let (cfg, _pool, _run, report) = upload_fresh(base, "bench", sim.clone()).await?;

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

/// `vitals bench process`: `rollup_day` over the same simulated inputs three ways, in one run —
/// the processor alone (in-memory driver: no Kafka, no checkpoint), the runtime with exactly-once
/// checkpointing, and the runtime as plain at-least-once (outputs not awaited, no checkpoint).
/// Each runtime run starts with no local state, so its time is also the time to rebuild that
/// state by replay (there are no S3 snapshots yet).
pub async fn process(base: &Config, sim: SimConfig) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use vitals_processors::driver::Driver;
    use vitals_processors::rollup_day::{self, RollupDayProcessor};
    use vitals_processors::runtime::{self, RunArgs, RuntimeConfig};
    use vitals_processors::Input;
    use vitals_schemas::codec::Codec;

    let (cfg, pool, run, report) = upload_fresh(base, "benchp", sim.clone()).await?;

    // The inputs as the processor will see them.
    let codec = Arc::new(Codec::new(&cfg.registry.url));
    let t = app::topics(&cfg);
    let mut inputs = Vec::new();
    let mut records = 0u64;
    for topic in [&t.hot, &t.cold, &t.change, &t.domain] {
        for m in app::read_all(&cfg, topic).await? {
            records += 1;
            let p = m.payload().unwrap_or_default();
            inputs.push(if topic == &t.hot || topic == &t.cold {
                Input::Samples(codec.decode(p).await?)
            } else if topic == &t.change {
                Input::Changes(codec.decode(p).await?)
            } else {
                Input::Domain(codec.decode(p).await?)
            });
        }
    }
    let items: usize = inputs
        .iter()
        .map(|i| match i {
            Input::Samples(b) => b.samples.len(),
            Input::Changes(b) => b.edits.len() + b.deletions.len(),
            Input::Domain(b) => b.changes.len(),
        })
        .sum();

    let t0 = Instant::now();
    let mut driver = Driver::new(RollupDayProcessor::new(Default::default()));
    for i in &inputs {
        driver.feed(i).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let alone = t0.elapsed();
    let rows = driver.projection().len();

    println!("vitals bench process — rollup_day, {} users × {} days: {items} input items in {records} Kafka records, {rows} rollup rows", sim.users, sim.days);
    println!("  processor alone (in-memory driver, one thread, no Kafka, no checkpoint): {:>8.2} s = {:>9.0} items/s", alone.as_secs_f64(), items as f64 / alone.as_secs_f64());
    for (label, checkpointing) in [("exactly-once (checkpoint after acks)", true), ("plain at-least-once (no ack wait, no checkpoint)", false)] {
        let data = std::env::temp_dir().join(format!("vitals-bench-{}-{checkpointing}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let stop = Arc::new(AtomicBool::new(false));
        let records_in = Arc::new(AtomicU64::new(0));
        let args = RunArgs {
            cfg: RuntimeConfig {
                processor: rollup_day::INFO.name,
                inputs: rollup_day::INFO.inputs,
                output_topic: t.rollup_day.clone(),
                topics: t.clone(),
                data_dir: data.clone(),
                max_batch: cfg.processors.max_batch,
                max_wait: std::time::Duration::from_millis(cfg.processors.max_wait_ms),
                crash_after_produce: None,
                checkpointing,
            },
            consumer_config: runtime::consumer_config(&cfg.kafka.brokers, &format!("{run}bench-{checkpointing}")),
            producer: app::producer(&cfg, "vitals-bench-process")?,
            codec: Arc::clone(&codec),
            pool: pool.clone(),
            stop: Arc::clone(&stop),
            records_in: Arc::clone(&records_in),
        };
        let started = Instant::now();
        let task = tokio::task::spawn_blocking(move || runtime::run(RollupDayProcessor::new(Default::default()), args));
        // Time from the first record processed (group join and assignment excluded) to the last.
        let deadline = Instant::now() + std::time::Duration::from_secs(600);
        let mut first: Option<Instant> = None;
        while records_in.load(Ordering::Relaxed) < records {
            anyhow::ensure!(Instant::now() < deadline && !task.is_finished(), "runtime did not catch up within 600 s");
            if first.is_none() && records_in.load(Ordering::Relaxed) > 0 {
                first = Some(Instant::now());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let took = first.map(|f| f.elapsed()).unwrap_or_default();
        stop.store(true, Ordering::Relaxed);
        task.await.context("runtime thread")?.context("runtime")?;
        let state_bytes: u64 = std::fs::read_dir(data.join(rollup_day::INFO.name)).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0);
        // The first interval's own time is not seen (progress is counted when it ends), so a run
        // that fits in one interval has nothing to time: say so instead of printing infinity.
        let rate = if took.as_millis() > 0 { format!("{:>9.0} items/s", items as f64 / took.as_secs_f64()) } else { "too small to time (one interval)".into() };
        println!(
            "  runtime, {label}: {:>8.2} s = {rate} (start to caught-up {:.2} s){}",
            took.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            if checkpointing { format!("; local state {:.1} MB, rebuilt by replay in this time (no snapshots yet)", state_bytes as f64 / 1e6) } else { String::new() }
        );
        let _ = std::fs::remove_dir_all(&data);
    }
    println!("  (the runtime's loop is one thread; broker, PostgreSQL and registry share the same 2 cores; {} items uploaded)", report.accepted);
    Ok(())
}
