//! `vitals-bench`: benchmarks that print figures (never timed assertions), a binary of its own so
//! the production `vitals` binary carries none of this code. `vitals-bench ingest`: the simulator
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

use clap::{Parser, Subcommand};
use vitals::config::{Config, SimArgs};
use vitals::simulate::{self, SimConfig};
use vitals::{app, archive};

mod pg_only;
mod scale;

/// Every role allocates per record; the benchmarks measure with the allocator `vitals` ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "vitals-bench", version, about = "Benchmarks of vitals that print figures beside a baseline measured in the same run")]
struct Cli {
    #[command(subcommand)]
    cmd: BenchCmd,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Ingest throughput (samples/s accepted and acknowledged by the broker) beside the broker's
    /// raw produce rate for the same bytes.
    Ingest(SimArgs),
    /// rollup_day throughput: the processor alone, the runtime exactly-once, and plain
    /// at-least-once, over the same simulated inputs.
    Process(SimArgs),
    /// Every processor alone in the in-memory driver (no Kafka, no I/O, needs no service) over
    /// the simulated inputs: items/s per core and state per retained sample.
    Driver {
        #[command(flatten)]
        sim: SimArgs,
        /// Only this processor (e.g. `rollup_day`), so a profile covers it alone.
        #[arg(long)]
        only: Option<String>,
    },
    /// The edge's CPU work per upload alone (no HTTP, PostgreSQL or Kafka; needs no service),
    /// stage by stage: JSON envelope, payload hash, validation, Avro encoding — and the
    /// processors' Avro decoding — beside apache-avro's `Value`-tree codec on the same records.
    Edge(SimArgs),
    /// The Postgres-only design alone (raw samples + daily rollups recomputed in each upload's
    /// transaction, one connection) over the simulated uploads; needs only PostgreSQL.
    Baseline(SimArgs),
    /// End to end: upload → every projection fresh in PostgreSQL (samples/s), then freshness
    /// latency (upload ack → WebSocket envelope) at a fixed rate and at half the end-to-end
    /// rate, beside the broker's raw produce + consume rate for the same bytes and the
    /// Postgres-only design on the same uploads.
    E2e {
        #[command(flatten)]
        sim: SimArgs,
        /// Uploads for the latency measurement.
        #[arg(long, default_value_t = 100)]
        latency_uploads: usize,
        /// Their rate, per second.
        #[arg(long, default_value_t = 10.0)]
        latency_rate: f64,
    },
    /// What one hop's span costs a record (a processor's `process.record`: parent from the
    /// record's header, its own context taken for the outputs, the user hashed), on this thread:
    /// with tracing off for it (no OpenTelemetry layer), with the layer and no exporter (a role
    /// with `telemetry.otlp_endpoint` empty) and with the layer exporting over OTLP to a local
    /// receiver. Needs no service.
    Traces {
        /// Spans per setting.
        #[arg(long, default_value_t = 200_000)]
        spans: usize,
    },
    /// Scaling: the end-to-end throughput run with 1, 2, 3… `vitals process --all` instances
    /// (child processes of the `vitals` binary beside this one) over topics of 6 and 12 partitions, beside the
    /// Postgres-only design on the same uploads, and a users-per-core sizing.
    Scale {
        #[command(flatten)]
        sim: SimArgs,
        /// Instance counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 3])]
        instances: Vec<usize>,
        /// Partition counts of the lanes and outputs, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [6i32, 12])]
        partitions: Vec<i32>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = vitals::init_tracing("warn,sqlx=warn,rdkafka=error", None)?;
    let cfg = Config::load()?;
    match cli.cmd {
        BenchCmd::Ingest(args) => ingest(&cfg, args.to_config(&cfg)).await,
        BenchCmd::Process(args) => process(&cfg, args.to_config(&cfg)).await,
        BenchCmd::Traces { spans } => traces(spans).await,
        BenchCmd::Driver { sim, only } => driver(&sim.to_config(&cfg), cfg.ingest.max_items_per_record, only.as_deref()),
        BenchCmd::Edge(args) => {
            edge(&args.to_config(&cfg), cfg.ingest.max_items_per_record);
            Ok(())
        }
        BenchCmd::Baseline(args) => baseline(&cfg, args.to_config(&cfg)).await,
        BenchCmd::E2e { sim, latency_uploads, latency_rate } => e2e(&cfg, sim.to_config(&cfg), latency_uploads, latency_rate).await,
        BenchCmd::Scale { sim, instances, partitions } => scale::run(&cfg, sim.to_config(&cfg), &instances, &partitions).await,
    }
}

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
    // Where a request's time went, from the edge's own histograms (means over the run).
    let m = &ingest.metrics;
    let mean = vitals_ingest::metrics::mean_ms;
    println!(
        "  edge, mean per samples request: {:.1} ms in all = store claim {:.1} ms + produce and broker acks {:.1} ms + store finish {:.1} ms + the rest (JSON, validation, Avro, HTTP, waiting for a core)",
        mean(&m.request_seconds, "samples"),
        mean(&m.store_seconds, "claim"),
        mean(&m.produce_seconds, "samples"),
        mean(&m.store_seconds, "finish"),
    );
    Ok((cfg, pool, run, report?))
}

/// The first of `users` with a projection that is not fresh, if any.
pub(crate) async fn first_stale<'u>(pool: &sqlx::PgPool, users: &'u [String]) -> anyhow::Result<Option<&'u String>> {
    for u in users {
        if vitals_api::freshness::UserProgress::load(pool, u)
            .await?
            .all(&app::projections())
            .values()
            .any(|f| f.state != vitals_api::freshness::FreshnessState::Fresh)
        {
            return Ok(Some(u));
        }
    }
    Ok(None)
}

/// Deletes every topic of a benchmark run (names under the run's own prefix, which starts with
/// the configured one): runs add up, and a broker holding hundreds of old bench topics answers
/// later runs more slowly (measured: `bench e2e` 5.0k samples/s, freshness p50 270–300 ms with
/// 234 topics left behind; 6.6k and 209 ms on a fresh broker database, the same binary).
pub(crate) async fn drop_run_topics(base: &Config, run: &Config) {
    use rdkafka::admin::AdminOptions;
    let prefix = &run.kafka.topic_prefix;
    if prefix.is_empty() || prefix == &base.kafka.topic_prefix {
        return; // not a run's own namespace: never delete anything else
    }
    let names: Vec<String> = match app::topic_names(run).await {
        Ok(all) => all.into_iter().filter(|n| n.starts_with(prefix.as_str())).collect(),
        Err(e) => {
            eprintln!("  (could not list this run's topics to delete them: {e:#})");
            return;
        }
    };
    let Ok(admin) = app::admin(run) else { return };
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    match admin.delete_topics(&refs, &AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)))).await {
        Ok(results) => {
            let failed: Vec<String> = results.into_iter().filter_map(|r| r.err().map(|(n, c)| format!("{n}: {c}"))).collect();
            if !failed.is_empty() {
                eprintln!("  (some of this run's topics were not deleted: {})", failed.join(", "));
            }
        }
        Err(e) => eprintln!("  (deleting this run's {} topics failed: {e})", names.len()),
    }
}

pub async fn ingest(base: &Config, sim: SimConfig) -> anyhow::Result<()> {
    let (cfg, _pool, _run, report) = upload_fresh(base, "bench", sim.clone()).await?;

    // Everything the edge wrote, in every lane, produced again raw: the broker's own rate for the
    // same records (same producer settings, keys and payloads).
    let (records, bytes) = lane_records(&cfg).await?;
    let raw = raw_produce(&cfg, &records).await?;
    let waiting = raw_produce_waiting(&cfg, &records, sim.concurrency).await?;
    let one = ack_latency(&cfg, &records).await?;

    let secs = report.elapsed.as_secs_f64();
    let mb = bytes as f64 / 1e6;
    println!(
        "vitals-bench ingest — {} users × {} days, batch ≤ {} samples, concurrency {}",
        sim.users, sim.days, sim.batch_size, sim.concurrency
    );
    println!("  edge (HTTP → validate → Avro via registry → Kafka, 2xx after acks=all):");
    println!(
        "    {:>10} items accepted in {:>7.2} s = {:>10.0} items/s ({} requests, {:.0} req/s)",
        report.accepted,
        secs,
        report.accepted as f64 / secs,
        report.requests,
        report.requests as f64 / secs
    );
    println!("    {:>10} Kafka records, {:.2} MB = {:.2} MB/s into the broker", records.len(), mb, mb / secs);
    println!("  broker raw produce of the same {} records / {:.2} MB (idempotent, acks=all):", records.len(), mb);
    println!(
        "    {:>7.2} s = {:.0} records/s, {:.2} MB/s, i.e. {:.0} items/s equivalent",
        raw.as_secs_f64(),
        records.len() as f64 / raw.as_secs_f64(),
        mb / raw.as_secs_f64(),
        report.accepted as f64 / raw.as_secs_f64()
    );
    println!("  edge / raw throughput: {:.2}", raw.as_secs_f64() / secs);
    println!("  one record at a time, each acknowledged before the next (50 records): mean ack {:.1} ms on a delete topic, {:.1} ms on a compacted one (as projection topics are)", one.0, one.1);
    println!(
        "  broker raw produce, {} clients each waiting for its ack (the edge's pattern at this concurrency): {:.2} s = {:.0} items/s equivalent; edge / that: {:.2}",
        sim.concurrency,
        waiting.as_secs_f64(),
        report.accepted as f64 / waiting.as_secs_f64(),
        waiting.as_secs_f64() / secs
    );
    drop_run_topics(base, &cfg).await;
    Ok(())
}

/// Every record of the input lanes, and their bytes (keys and payloads).
async fn lane_records(cfg: &Config) -> anyhow::Result<(Vec<rdkafka::message::OwnedMessage>, usize)> {
    let topics = app::topics(cfg);
    let mut records = Vec::new();
    for t in [&topics.hot, &topics.cold, &topics.change, &topics.domain] {
        records.extend(app::read_all(cfg, t).await?);
    }
    let bytes = records.iter().map(|m| m.payload().map_or(0, |p| p.len()) + m.key().map_or(0, |k| k.len())).sum();
    Ok((records, bytes))
}

/// A lane record produced again as it was (key and payload) to `topic`.
fn raw_record<'a>(topic: &'a str, m: &'a rdkafka::message::OwnedMessage) -> FutureRecord<'a, [u8], [u8]> {
    let rec = FutureRecord::to(topic).payload(m.payload().unwrap_or_default());
    match m.key() {
        Some(k) => rec.key(k),
        None => rec,
    }
}

/// Produces `records` again to a fresh topic as `concurrency` clients would that each send one
/// record and wait for its acknowledgement before the next (the edge's pattern with that many
/// uploads in flight, without the edge), and returns how long it took.
async fn raw_produce_waiting(
    cfg: &Config,
    records: &[rdkafka::message::OwnedMessage],
    concurrency: usize,
) -> anyhow::Result<std::time::Duration> {
    let raw_topic = format!("{}rawc", cfg.kafka.topic_prefix);
    create_raw_topic(cfg, &raw_topic).await?;
    let producer = app::producer(cfg, "vitals-bench-raw-waiting")?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    let client = || async {
        loop {
            let Some(m) = records.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) else { return Ok::<_, anyhow::Error>(()) };
            producer
                .send(raw_record(&raw_topic, m), std::time::Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .context("raw produce")?;
        }
    };
    for r in join_all((0..concurrency.max(1)).map(|_| client())).await {
        r?;
    }
    Ok(t0.elapsed())
}

/// Mean acknowledgement latency (ms) of 50 of `records` produced one at a time, each awaited
/// before the next: to a delete topic, and to a compacted one.
async fn ack_latency(cfg: &Config, records: &[rdkafka::message::OwnedMessage]) -> anyhow::Result<(f64, f64)> {
    let mut out = [0.0; 2];
    for (i, cleanup) in ["delete", "compact"].into_iter().enumerate() {
        let topic = format!("{}ack-{cleanup}", cfg.kafka.topic_prefix);
        create_topic_with(cfg, &topic, cleanup).await?;
        let producer = app::producer(cfg, "vitals-bench-ack")?;
        let sample: Vec<_> = records.iter().take(50).collect();
        let t0 = Instant::now();
        for m in &sample {
            producer.send(raw_record(&topic, m), std::time::Duration::from_secs(30)).await.map_err(|(e, _)| e).context("ack latency")?;
        }
        out[i] = t0.elapsed().as_secs_f64() * 1000.0 / sample.len().max(1) as f64;
    }
    Ok((out[0], out[1]))
}

/// Produces `records` again (keys and payloads) to a fresh `<prefix>raw` topic with the edge's
/// producer settings, 1000 in flight at a time, and returns how long the acknowledgements took.
async fn raw_produce(cfg: &Config, records: &[rdkafka::message::OwnedMessage]) -> anyhow::Result<std::time::Duration> {
    let raw_topic = format!("{}raw", cfg.kafka.topic_prefix);
    create_raw_topic(cfg, &raw_topic).await?;
    let producer = app::producer(cfg, "vitals-bench-raw")?;
    let t0 = Instant::now();
    for chunk in records.chunks(1000) {
        let acks: Vec<_> = chunk.iter().map(|m| producer.send(raw_record(&raw_topic, m), std::time::Duration::from_secs(30))).collect();
        for r in join_all(acks).await {
            r.map_err(|(e, _)| e).context("raw produce")?;
        }
    }
    Ok(t0.elapsed())
}

async fn create_raw_topic(cfg: &Config, name: &str) -> anyhow::Result<()> {
    create_topic_with(cfg, name, "delete").await
}

async fn create_topic_with(cfg: &Config, name: &str, cleanup: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let admin = app::admin(cfg)?;
    let t = NewTopic::new(name, cfg.kafka.partitions, TopicReplication::Fixed(cfg.kafka.replication_factor)).set("cleanup.policy", cleanup);
    let r = admin.create_topics([&t], &AdminOptions::new()).await?;
    for x in r {
        x.map_err(|(n, c)| anyhow::anyhow!("creating {n}: {c}"))?;
    }
    Ok(())
}

/// `vitals-bench process`: every registered processor over the same simulated inputs, each run
/// twice on the real broker — with exactly-once checkpointing and as plain at-least-once
/// (outputs not awaited, no checkpoint) — starting with no local state (so each time is also the
/// time to rebuild that state by replay); `rollup_day` also alone in the in-memory driver (no
/// Kafka). Then the restore of `rollup_day`'s state from its S3 snapshots, timed, for the size
/// it has.
pub async fn process(base: &Config, sim: SimConfig) -> anyhow::Result<()> {
    use vitals_processors::driver::Driver;
    use vitals_processors::rollup_day::RollupDayProcessor;
    use vitals_processors::{Input, Inputs};

    let (mut cfg, pool, run, report) = upload_fresh(base, "benchp", sim.clone()).await?;
    cfg.processors.snapshot_every_ms = 1_000;
    let codec = Arc::new(app::codec(&cfg));
    let t = app::topics(&cfg);

    // The lane inputs, decoded, as a processor sees them.
    let mut inputs = Vec::new();
    for topic in [&t.hot, &t.cold, &t.change, &t.domain] {
        for m in app::read_all(&cfg, topic).await? {
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
    let lane_records = inputs.len() as u64;
    let items = input_items(&inputs);
    println!(
        "vitals-bench process — {} users × {} days: {items} input items in {lane_records} Kafka records ({} uploaded)",
        sim.users, sim.days, report.accepted
    );
    println!("  items/s are per core: each runtime is one thread; broker, PostgreSQL, registry and S3 share this machine's cores");
    let t0 = Instant::now();
    let mut driver = Driver::new(RollupDayProcessor::new(Default::default()));
    for i in &inputs {
        let _ = driver.feed(i); // a rejected record is the DLQ's business, not the benchmark's
    }
    let alone = t0.elapsed();
    println!(
        "  {:<15} alone (in-memory driver, no Kafka, no checkpoint):          {:>8.2} s = {:>9.0} items/s",
        "rollup_day",
        alone.as_secs_f64(),
        items as f64 / alone.as_secs_f64()
    );

    let snapshots = app::snapshots(&cfg, &format!("{run}bench"), pool.clone()).await?;
    for info in vitals_runtime::registry() {
        for checkpointing in [true, false] {
            // A chained processor's input is its upstream's output as it stands now.
            let (n_records, n_items) = match info.inputs {
                Inputs::Lanes => (lane_records, items as u64),
                Inputs::SessionImpacts => {
                    let n = app::read_all(&cfg, &t.session_impact).await?.len() as u64;
                    (n, n)
                }
            };
            let snapshots = if checkpointing && info.name == "rollup_day" { snapshots.clone() } else { None };
            let deadline = Instant::now() + std::time::Duration::from_secs(900);
            let what = format!("{} did not catch up within 900 s", info.name);
            let Timed { took, skipped, metrics, state_bytes } = timed_run(
                &cfg,
                &pool,
                &codec,
                &run,
                info,
                &checkpointing.to_string(),
                checkpointing,
                snapshots.clone(),
                None,
                n_records,
                deadline,
                &what,
            )
            .await?;
            let counted = counted_items(n_items as f64, n_records, skipped);
            let rate = if took.as_millis() > 0 && counted > 0.0 {
                format!("{:>9.0} items/s", counted / took.as_secs_f64())
            } else {
                "too small to time (one interval)".into()
            };
            let label = if checkpointing { "exactly-once (checkpoint after acks)" } else { "at-least-once (no ack wait, no checkpoint)" };
            println!(
                "  {:<15} {label:<44} {:>8.2} s = {rate}{}",
                info.name,
                took.as_secs_f64(),
                if checkpointing { format!("; local state {:.1} MB", state_bytes as f64 / 1e6) } else { String::new() }
            );
            if checkpointing {
                println!("  {:<15} {:<44} {}", "", "", time_went(&metrics));
            }
            if let (true, Some(s)) = (checkpointing, snapshots.as_ref()) {
                restore_from_snapshots(&cfg, &pool, s, &t).await?;
            }
            if checkpointing && info.name == "rollup_day" {
                // The baseline of the store's page cache, same run: redb's default of 1 GiB per
                // store, which let a process's memory grow with its state.
                let mut big = cfg.clone();
                big.processors.store_cache_mb = 1024;
                let deadline = Instant::now() + std::time::Duration::from_secs(900);
                let Timed { took, skipped, state_bytes, .. } =
                    timed_run(&big, &pool, &codec, &run, info, "cache-1gib", true, None, None, n_records, deadline, &what).await?;
                let counted = counted_items(n_items as f64, n_records, skipped);
                println!(
                    "  {:<15} {:<44} {:>8.2} s = {:>9.0} items/s; local state {:.1} MB (baseline: store_cache_mb {} here)",
                    info.name,
                    "exactly-once, redb's 1 GiB cache per store",
                    took.as_secs_f64(),
                    counted / took.as_secs_f64().max(1e-9),
                    state_bytes as f64 / 1e6,
                    cfg.processors.store_cache_mb
                );
            }
        }
    }
    from_the_archive(&cfg, &pool, &codec, &run, lane_records, items as f64).await?;
    drop_run_topics(base, &cfg).await;
    Ok(())
}

/// rollup_day exactly-once once more, over the same records read back from the raw archive
/// instead of the lanes: the lanes are archived (timed), then every lane record is deleted from
/// the broker (what a finite retention does), so the runtime reads them all from S3.
async fn from_the_archive(
    cfg: &Config,
    pool: &sqlx::PgPool,
    codec: &Arc<vitals_schemas::codec::Codec>,
    run: &str,
    lane_records: u64,
    items: f64,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Segments closed after half a second idle: the archiving time is then the archiver's, not
    // the default 60 s wait for more records.
    let mut cfg = cfg.clone();
    cfg.archive.max_wait_ms = 500;
    let cfg = &cfg;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let archiver = {
        let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
        tokio::spawn(async move { archive::run(&cfg, stop, Default::default()).await })
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(900);
    loop {
        anyhow::ensure!(Instant::now() < deadline && !archiver.is_finished(), "the archiver did not catch up within 900 s");
        if archive::status(cfg).await?.iter().all(|r| r.behind == 0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let archived = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    archiver.await.context("archiver task")??;
    let mut cut = rdkafka::TopicPartitionList::new();
    for topic in archive::lanes(cfg) {
        for p in 0..cfg.kafka.partitions {
            cut.add_partition_offset(&topic, p, rdkafka::Offset::End)?;
        }
    }
    app::admin(cfg)?.delete_records(&cut, &rdkafka::admin::AdminOptions::new()).await.context("deleting the lanes' records")?;
    println!(
        "  {:<15} {:<44} {:>8.2} s (segments of up to {} records, closed after {} ms)",
        "archive",
        "every lane record archived, then deleted",
        archived.as_secs_f64(),
        cfg.archive.max_records,
        cfg.archive.max_wait_ms
    );
    let info = vitals_runtime::find("rollup_day").context("rollup_day")?;
    let archive: Arc<dyn vitals_runtime::Archive> = Arc::new(archive::Source {
        pool: pool.clone(),
        s3: app::s3_client(cfg)?,
        rt: tokio::runtime::Handle::current(),
        cache: Default::default(),
    });
    let Timed { took, skipped, metrics, .. } = timed_run(
        cfg,
        pool,
        codec,
        run,
        info,
        "archive",
        true,
        None,
        Some(archive),
        lane_records,
        deadline,
        "rollup_day did not read the archive within 900 s",
    )
    .await?;
    let n_items = counted_items(items, lane_records, skipped);
    let rate = if took.as_millis() > 0 && n_items > 0.0 {
        format!("{:>9.0} items/s", n_items / took.as_secs_f64())
    } else {
        "too small to time (one interval)".into()
    };
    println!("  {:<15} {:<44} {:>8.2} s = {rate}", "rollup_day", "exactly-once, every record from the archive", took.as_secs_f64());
    println!("  {:<15} {:<44} {}", "", "", time_went(&metrics));
    Ok(())
}

/// Where an exactly-once run's time went (the runtime's own counters, whole run).
fn time_went(m: &vitals_runtime::metrics::RuntimeMetrics) -> String {
    use std::sync::atomic::Ordering;
    format!(
        "{} intervals committed; waiting for acknowledgements {:.0} ms, local commits {:.0} ms in all",
        m.commits.load(Ordering::Relaxed),
        m.ack_wait_seconds.sum_secs() * 1e3,
        m.commit_seconds.sum_secs() * 1e3
    )
}

/// One runtime run, as `bench process` times them.
struct Timed {
    /// From the end of the first interval to the last record read.
    took: std::time::Duration,
    /// The records of that first interval (left out of the count).
    skipped: u64,
    metrics: Arc<vitals_runtime::metrics::RuntimeMetrics>,
    /// The task stores' size at the end.
    state_bytes: u64,
}

/// Runs `info` (its group and state tagged `tag`) until it has read `n_records`, timed from the
/// first record processed (group join and assignment excluded): progress is only seen when an
/// interval ends, so the clock starts at the end of the first one and that interval's records
/// are left out of the count. Fails with `what` past `deadline`.
#[allow(clippy::too_many_arguments)]
async fn timed_run(
    cfg: &Config,
    pool: &sqlx::PgPool,
    codec: &Arc<vitals_schemas::codec::Codec>,
    run: &str,
    info: vitals_runtime::Registered,
    tag: &str,
    checkpointing: bool,
    snapshots: Option<Arc<vitals_runtime::Snapshots>>,
    archive: Option<Arc<dyn vitals_runtime::Archive>>,
    n_records: u64,
    deadline: Instant,
    what: &str,
) -> anyhow::Result<Timed> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vitals_runtime::{self as runtime, RunArgs, RuntimeConfig};
    let t = app::topics(cfg);
    let data = std::env::temp_dir().join(format!("vitals-bench-{}-{}-{tag}", std::process::id(), info.name));
    let _ = std::fs::remove_dir_all(&data);
    runtime::store::set_cache_bytes(cfg.processors.store_cache_mb.saturating_mul(1024 * 1024));
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(runtime::metrics::RuntimeMetrics::default());
    let args = RunArgs {
        cfg: RuntimeConfig {
            processor: info.name,
            inputs: info.inputs,
            output_topic: info.output_topic(&t),
            topics: t.clone(),
            data_dir: data.clone(),
            max_batch: cfg.processors.max_batch,
            max_wait: std::time::Duration::from_millis(cfg.processors.max_wait_ms),
            crash_after_produce: None,
            checkpointing,
            start: Default::default(),
        },
        consumer_config: app::fetch_wait(
            cfg,
            runtime::consumer_config(app::kafka_base(cfg, "vitals-bench-process"), &format!("{run}bench-{}-{tag}", info.name)),
        ),
        producer: app::producer(cfg, "vitals-bench-process")?,
        codec: Arc::clone(codec),
        pool: pool.clone(),
        stop: Arc::clone(&stop),
        metrics: Arc::clone(&metrics),
        snapshots,
        archive,
    };
    let run_fn = info.run;
    let task = tokio::task::spawn_blocking(move || run_fn(args));
    let mut first: Option<(Instant, u64)> = None;
    while metrics.records_in.load(Ordering::Relaxed) < n_records {
        anyhow::ensure!(Instant::now() < deadline && !task.is_finished(), "{what}");
        let done = metrics.records_in.load(Ordering::Relaxed);
        if first.is_none() && done > 0 {
            first = Some((Instant::now(), done));
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let (took, skipped) = first.map(|(f, n)| (f.elapsed(), n)).unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    task.await.context("runtime thread")?.map_err(|e| anyhow::anyhow!("{}: {e}", info.name))?;
    let state_bytes: u64 =
        std::fs::read_dir(data.join(info.name)).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&data);
    Ok(Timed { took, skipped, metrics, state_bytes })
}

/// The items a timed run counts: its first interval's records (`skipped`) are left out, the
/// items taken in proportion to the records.
fn counted_items(n_items: f64, n_records: u64, skipped: u64) -> f64 {
    n_items * n_records.saturating_sub(skipped) as f64 / n_records.max(1) as f64
}

/// Restore from snapshot: rollup_day's newest snapshot of every partition, fetched from S3 and
/// imported as a local store, as a task with no local state does on assignment. Run right
/// after the exactly-once run that wrote them (an at-least-once run of the same task line
/// withdraws the pointers, as it must: its state is not what they describe).
async fn restore_from_snapshots(
    cfg: &Config,
    pool: &sqlx::PgPool,
    s: &vitals_runtime::Snapshots,
    t: &vitals_schemas::topics::Topics,
) -> anyhow::Result<()> {
    use vitals_runtime as runtime;
    // The runtime uploads in the background after its commits, at most one per
    // `snapshot_every_ms`: a partition whose input was done within that time may have none.
    // Wait until every partition has one or no new one came for 5 s.
    let task = format!("{}rollup_day", t.prefix);
    let parts = cfg.kafka.partitions;
    let (mut have, mut since) = (0, Instant::now());
    loop {
        let mut now_have = 0;
        for p in 0..parts {
            now_have += runtime::snapshot::pointer(pool, &task, p).await?.is_some() as i32;
        }
        if now_have > have {
            (have, since) = (now_have, Instant::now());
        }
        if have == parts || since.elapsed() > std::time::Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::ensure!(have > 0, "no partition of rollup_day has a snapshot");
    let dir = std::env::temp_dir().join(format!("vitals-bench-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut bytes, mut n, mut slowest) = (0u64, 0, std::time::Duration::ZERO);
    let t0 = Instant::now();
    for p in 0..parts {
        let epoch = runtime::bump_epoch(pool, &task, p, 0).await?;
        if let Some(r) = s.restore(&task, p, epoch, &dir.join(format!("p{p}.redb"))).await.map_err(|e| anyhow::anyhow!(e))? {
            bytes += r.pointer.bytes as u64;
            n += 1;
            slowest = slowest.max(r.took);
        }
    }
    let all = t0.elapsed();
    println!(
        "  rollup_day restore from S3 snapshots: {n} of {parts} partitions had one, {:.1} MB of state in {:.0} ms ({:.0} MB/s; slowest partition {:.0} ms) — vs. rebuilding by replay above",
        bytes as f64 / 1e6,
        all.as_secs_f64() * 1000.0,
        bytes as f64 / 1e6 / all.as_secs_f64(),
        slowest.as_secs_f64() * 1000.0
    );
    // The baseline, same run, same objects: each snapshot held whole in memory, downloaded then
    // imported from the buffer, as the client before aws-sdk-s3's streaming did.
    let (mut held, t0) = (0u64, Instant::now());
    for p in 0..parts {
        let Some(ptr) = runtime::snapshot::pointer(pool, &task, p).await? else { continue };
        let body = s.s3.get(&ptr.object_key).await?.ok_or_else(|| anyhow::anyhow!("{} is gone", ptr.object_key))?;
        held += body.len() as u64;
        runtime::store::Store::import(&dir.join(format!("p{p}.held.redb")), &body)?;
    }
    let all = t0.elapsed();
    println!(
        "  rollup_day restore held in memory (baseline: the whole object downloaded, then imported): {:.1} MB in {:.0} ms ({:.0} MB/s)",
        held as f64 / 1e6,
        all.as_secs_f64() * 1000.0,
        held as f64 / 1e6 / all.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `vitals-bench e2e`: the HealthWeek workload (simulated people × days) uploaded through the
/// edge while every processor and the PostgreSQL sink run (in this process, on the real broker),
/// timed until every user's every projection is fresh; then freshness latency at a fixed rate,
/// from an upload's acknowledgement to its envelope on the user's WebSocket, first with nothing
/// else uploading, then under a load of half the end-to-end rate just measured; then the
/// broker's raw produce + consume rate for the same bytes, and the Postgres-only design
/// ([`pg_only`]) on the same uploads, in the same run, as ratios.
pub async fn e2e(base: &Config, sim: SimConfig, latency_uploads: usize, latency_rate: f64) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};

    let root = base; // (`base` is the Postgres-only design's report further down)
    let mut cfg = base.clone();
    let run = format!("e2e{}.", chrono::Utc::now().timestamp_millis());
    cfg.kafka.topic_prefix = format!("{}{run}", cfg.kafka.topic_prefix);
    let data = std::env::temp_dir().join(format!("vitals-bench-e2e-{}", std::process::id()));
    cfg.processors.data_dir = data.display().to_string();
    let pool = app::pg_pool(&cfg).await?;
    app::migrate(&pool).await?;
    app::create_topics(&cfg).await?;
    app::register_schemas(&cfg).await?;

    // Every role but the simulator, in this process.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for info in vitals_runtime::registry() {
        let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
        workers.push(tokio::spawn(async move { app::process(&cfg, info.name, stop, None, Default::default()).await }));
    }
    let publisher = app::publisher(&cfg)?;
    {
        let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
        workers
            .push(tokio::spawn(async move { app::sink(&cfg, stop, Default::default(), Box::new(move |a| publisher.announce(a))).await }));
    }
    let ingest = app::ingest(&cfg, pool.clone()).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let ingest_url = format!("http://{}", listener.local_addr()?);
    let edge = tokio::spawn(app::serve(listener, vitals_ingest::router(ingest), std::future::pending()));
    let api = app::api(&cfg, pool.clone(), true).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let api_addr = listener.local_addr()?;
    let api_server = tokio::spawn(app::serve(listener, vitals_api::router(api), std::future::pending()));

    // 1. Throughput: upload → every projection of every user fresh.
    let mut week = sim.clone();
    week.base_url = ingest_url.clone();
    week.user_prefix = format!("{run}{}", sim.user_prefix);
    let users: Vec<String> = (0..week.users).map(|i| simulate::user_id(&week, i)).collect();
    let t0 = Instant::now();
    let report = simulate::run(&week, &reqwest::Client::new()).await.context("simulated upload")?;
    let uploaded = t0.elapsed();
    let deadline = Instant::now() + std::time::Duration::from_secs(1800);
    while first_stale(&pool, &users).await?.is_some() {
        anyhow::ensure!(Instant::now() < deadline, "projections not fresh within 30 min");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let end_to_end = t0.elapsed();

    // The lane records of the throughput run (and only those): the bytes the broker alone
    // moves in step 4.
    let (records, bytes) = lane_records(&cfg).await?;

    // 2. Freshness latency at a fixed rate, nothing else uploading.
    let (latencies, _) = freshness(&cfg, &ingest_url, api_addr, &format!("{run}lat-"), latency_uploads, latency_rate).await?;

    // 3. Freshness at half the sustained end-to-end rate. The load is the workload itself, not
    // the probes: a fresh population (new people, same days) uploading their HealthWeek at
    // uploads/s = (half of the end-to-end items/s measured in 1) ÷ (mean items per upload of
    // that run) — realistic uploads, so realistic batch sizes, mix of lanes and per-request
    // costs, where the single-sample probes would turn items/s into far more requests (and
    // WebSockets) than the workload ever makes. Sized to last about `HALF_LOAD_SECS` (+1 s so
    // that every probe is sent under load); meanwhile single-sample probes at `latency_rate`,
    // measured as in 2.
    const HALF_LOAD_SECS: f64 = 10.0;
    let e2e_rate = report.accepted as f64 / end_to_end.as_secs_f64();
    let per_upload = report.accepted as f64 / report.requests.saturating_sub(report.retries).max(1) as f64;
    let per_user = report.accepted as f64 / week.users.max(1) as f64;
    let load_rate = e2e_rate / 2.0 / per_upload;
    let mut half = week.clone();
    half.user_prefix = format!("{run}half-{}", sim.user_prefix);
    half.users = ((HALF_LOAD_SECS + 1.0) * e2e_rate / 2.0 / per_user.max(1.0)).ceil().max(1.0) as usize;
    half.rate = Some(load_rate);
    let load = {
        let half = half.clone();
        tokio::spawn(async move { simulate::run(&half, &reqwest::Client::new()).await })
    };
    let half_probes = (latency_rate * HALF_LOAD_SECS).round().max(1.0) as usize;
    let (half_latencies, probes_took) =
        freshness(&cfg, &ingest_url, api_addr, &format!("{run}half-lat-"), half_probes, latency_rate).await?;
    let load = load.await.context("half-rate load task")?.context("half-rate load")?;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), w).await;
    }
    edge.abort();
    api_server.abort();

    // 4. The broker alone with the same bytes: produce every lane record again, then consume.
    let t1 = Instant::now();
    raw_produce(&cfg, &records).await?;
    let raw_topic = format!("{}raw", cfg.kafka.topic_prefix);
    let consumed = app::read_all(&cfg, &raw_topic).await?.len();
    let raw = t1.elapsed();
    let _ = std::fs::remove_dir_all(&data);

    // 5. The Postgres-only design on the same uploads (nothing else running by now).
    let inputs = offline_inputs(&week, cfg.ingest.max_items_per_record);
    let base = pg_only::run(&pool, &inputs, true).await?;

    let items = report.accepted as f64;
    println!(
        "vitals-bench e2e — HealthWeek: {} users × {} days, batch ≤ {}, concurrency {}",
        sim.users, sim.days, sim.batch_size, sim.concurrency
    );
    println!("  upload → every projection (rollup_day, sleep_night, session_impact, product_impact) committed in PostgreSQL and fresh:");
    println!(
        "    {:>9} samples in {:>7.2} s = {:>9.0} samples/s end to end (upload alone took {:.2} s)",
        report.accepted,
        end_to_end.as_secs_f64(),
        items / end_to_end.as_secs_f64(),
        uploaded.as_secs_f64()
    );
    println!(
        "  freshness, upload acknowledged → envelope on the user's WebSocket, {} single-sample uploads at {:.1}/s, nothing else uploading:",
        latencies.len(),
        latency_rate
    );
    println!("    {}", percentiles(&latencies));
    println!(
        "  freshness at half the sustained end-to-end rate: {} fresh people uploading their HealthWeek at {:.1} uploads/s (half of {:.0} items/s ÷ {:.1} items per upload, the throughput run's mean),",
        half.users, load_rate, e2e_rate, per_upload
    );
    println!(
        "  which achieved {:.0} items/s over {:.2} s ({} items); meanwhile {} single-sample uploads at {:.1}/s over {:.2} s{}:",
        load.accepted as f64 / load.elapsed.as_secs_f64(),
        load.elapsed.as_secs_f64(),
        load.accepted,
        half_latencies.len(),
        latency_rate,
        probes_took.as_secs_f64(),
        if load.elapsed < probes_took { " (the load ended before the last probe was sent)" } else { "" }
    );
    println!("    {}", percentiles(&half_latencies));
    println!(
        "  broker alone, the same {} lane records / {:.2} MB produced (acks=all) and consumed back ({consumed}):",
        records.len(),
        bytes as f64 / 1e6
    );
    println!("    {:>7.2} s = {:>9.0} samples/s equivalent", raw.as_secs_f64(), items / raw.as_secs_f64());
    println!("  Postgres-only design (raw samples + the touched daily rollups recomputed in each upload's transaction, 1 connection), same uploads:");
    println!(
        "    {:>9} items in {} transactions, {:>7.2} s = {:>9.0} samples/s; {} raw identities, {} rollup rows{}",
        base.items,
        base.uploads,
        base.took.as_secs_f64(),
        base.items_per_sec(),
        base.raw_rows,
        base.rollup_rows,
        if base.items == report.accepted {
            String::new()
        } else {
            format!(" (the edge accepted {}: the rates below use each side's own count)", report.accepted)
        }
    );
    if let Some((equal, total)) = base.discrete {
        println!("    discrete-metric rows equal to rollup_day's (count, min, max, mean, time-weighted mean): {equal} of {total}");
    }
    println!("    what it does: {}", pg_only::WHAT);
    println!("  vitals end to end / Postgres-only = {:.2}×   (issue 10: ≥ 3×)", (items / end_to_end.as_secs_f64()) / base.items_per_sec());
    println!("  vitals end to end / broker raw    = {:.2}    (issue 10: ≥ 0.50)", raw.as_secs_f64() / end_to_end.as_secs_f64());
    println!("  (one machine: broker, PostgreSQL, Redis, registry and every role share its cores)");
    drop_run_topics(root, &cfg).await;
    Ok(())
}

/// Freshness latency: `count` uploads at `rate` per second, each a new person's (`{tag}{i}`)
/// first sample — consent first, then the person's WebSocket connected, then one heart-rate
/// sample — timed from the edge's 2xx to the first envelope on that socket (so the first
/// envelope is this upload's). Returns the latencies, sorted, and how long sending them took
/// (from the first probe's start to the last one's).
async fn freshness(
    cfg: &Config,
    ingest_url: &str,
    api_addr: std::net::SocketAddr,
    tag: &str,
    count: usize,
    rate: f64,
) -> anyhow::Result<(Vec<std::time::Duration>, std::time::Duration)> {
    use futures::StreamExt;
    let http = reqwest::Client::new();
    let secret = cfg.auth.hs256_secret.expose().as_bytes().to_vec();
    let mint = |u: &str| vitals_auth::mint_hs256(&secret, &cfg.auth.issuer, &cfg.auth.audience, u, 3600);
    let period = std::time::Duration::from_secs_f64(1.0 / rate);
    let mut probes = Vec::new();
    let start = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(start + period * i as u32).await;
        let user = format!("{tag}{i}");
        let token = mint(&user);
        let (http, ingest_url) = (http.clone(), ingest_url.to_owned());
        probes.push(tokio::spawn(async move {
            let consent = serde_json::json!({"request_id": format!("c-{user}"), "changes": [{"change_id": "privacy-1", "kind": "privacy_updated",
                "occurred_at": chrono::Utc::now().to_rfc3339(), "privacy": {"health_upload_allowed": true, "blocked_metrics": []}}]});
            http.post(format!("{ingest_url}/v1/domain-changes:batch")).bearer_auth(&token).json(&consent).send().await?.error_for_status()?;
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{api_addr}/v1/realtime?token={token}")).await?;
            let now = chrono::Utc::now();
            let body = serde_json::json!({"request_id": format!("s-{user}"), "samples": [{"source": "watch", "source_kind": "watch", "source_record_id": "hr-1",
                "metric": "heart_rate", "start": (now - chrono::Duration::seconds(70)).to_rfc3339(), "end": (now - chrono::Duration::seconds(10)).to_rfc3339(),
                "value": 64, "unit": "count/min", "time_zone": "UTC"}]});
            http.post(format!("{ingest_url}/v1/health/samples:batch")).bearer_auth(&token).json(&body).send().await?.error_for_status()?;
            let acked = Instant::now();
            let first = tokio::time::timeout(std::time::Duration::from_secs(60), ws.next()).await.context("no envelope within 60 s")?;
            anyhow::ensure!(matches!(first, Some(Ok(_))), "socket ended: {first:?}");
            Ok::<_, anyhow::Error>(acked.elapsed())
        }));
    }
    let sending = start.elapsed();
    let mut latencies = Vec::new();
    for p in probes {
        latencies.push(p.await.context("probe task")??);
    }
    latencies.sort();
    Ok((latencies, sending))
}

/// `p50 … p99 … max …` of sorted latencies, in ms.
fn percentiles(sorted: &[std::time::Duration]) -> String {
    if sorted.is_empty() {
        return "no uploads".into();
    }
    let pct = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0;
    format!("p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms", pct(0.50), pct(0.99), pct(1.0))
}

/// `vitals-bench baseline`: only the Postgres-only design ([`pg_only`]) over the simulated
/// people's uploads, normalised by the edge's own functions; needs only PostgreSQL.
pub async fn baseline(cfg: &Config, sim: SimConfig) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let inputs = offline_inputs(&sim, cfg.ingest.max_items_per_record);
    let built = t0.elapsed();
    let pool = app::pg_pool(cfg).await?;
    let r = pg_only::run(&pool, &inputs, true).await?;
    println!("vitals-bench baseline — the Postgres-only design, HealthWeek: {} users × {} days, batch ≤ {} (uploads normalised in memory in {:.2} s, before the clock)", sim.users, sim.days, sim.batch_size, built.as_secs_f64());
    println!("  {}", pg_only::WHAT);
    println!(
        "  {:>9} items in {} transactions, {:>7.2} s = {:>9.0} samples/s; {} raw identities, {} rollup rows",
        r.items,
        r.uploads,
        r.took.as_secs_f64(),
        r.items_per_sec(),
        r.raw_rows,
        r.rollup_rows
    );
    if let Some((equal, total)) = r.discrete {
        println!("  discrete-metric rows equal to rollup_day's (count, min, max, mean, time-weighted mean): {equal} of {total}");
    }
    Ok(())
}

/// The simulated people's uploads as the edge would write them to the lanes (the same
/// validation and normalisation, one record per ≤ `max_items_per_record` items), decoded, in
/// upload order: what the processors read, without a broker. The log timestamp of each record
/// is its position in milliseconds after the simulated "now" (stream time only moves forward).
pub fn offline_inputs(sim: &SimConfig, max_items_per_record: usize) -> Vec<vitals_processors::Input> {
    use vitals_ingest::request::{self, Rules};
    use vitals_processors::Input;
    use vitals_schemas::{ChangeBatch, DomainChangeBatch, Lane, SampleBatch};
    let catalog = vitals_schemas::Catalog::embedded();
    let rules = Rules::default();
    let now = sim.now_ms;
    let chunk = max_items_per_record.max(1);
    let mut out = Vec::new();
    for (n, up) in simulate::plan(sim).into_iter().enumerate() {
        let request_id = up.request_id().to_owned();
        let user_id = up.user.clone();
        let items = up.items().to_vec();
        match up.endpoint {
            simulate::SAMPLES_PATH => {
                let (ok, _) = request::validate_samples(items, up.backfill(), None, catalog, &rules, now);
                let (mut hot, mut cold, mut edits) = (Vec::new(), Vec::new(), Vec::new());
                for r in ok {
                    match r.lane {
                        Lane::Hot => hot.push(r.sample),
                        Lane::Cold => cold.push(r.sample),
                        Lane::Change => edits.push(r.sample),
                    }
                }
                for (lane, samples) in [(Lane::Hot, hot), (Lane::Cold, cold)] {
                    for part in samples.chunks(chunk) {
                        out.push(Input::Samples(SampleBatch {
                            request_id: request_id.clone(),
                            user_id: user_id.clone(),
                            received_at_ms: now + n as i64,
                            lane,
                            samples: part.to_vec(),
                        }));
                    }
                }
                for part in edits.chunks(chunk) {
                    out.push(Input::Changes(ChangeBatch {
                        request_id: request_id.clone(),
                        user_id: user_id.clone(),
                        received_at_ms: now + n as i64,
                        edits: part.to_vec(),
                        deletions: vec![],
                    }));
                }
            }
            simulate::DELETIONS_PATH => {
                let (ok, _) = request::validate_deletions(items, catalog);
                for part in ok.chunks(chunk) {
                    out.push(Input::Changes(ChangeBatch {
                        request_id: request_id.clone(),
                        user_id: user_id.clone(),
                        received_at_ms: now + n as i64,
                        edits: vec![],
                        deletions: part.to_vec(),
                    }));
                }
            }
            _ => {
                let (ok, _) = request::validate_changes(items, catalog, &rules, now);
                for part in ok.chunks(chunk) {
                    out.push(Input::Domain(DomainChangeBatch {
                        request_id: request_id.clone(),
                        user_id: user_id.clone(),
                        received_at_ms: now + n as i64,
                        changes: part.to_vec(),
                    }));
                }
            }
        }
    }
    out
}

fn input_items(inputs: &[vitals_processors::Input]) -> usize {
    use vitals_processors::Input;
    inputs
        .iter()
        .map(|i| match i {
            Input::Samples(b) => b.samples.len(),
            Input::Changes(b) => b.edits.len() + b.deletions.len(),
            Input::Domain(b) => b.changes.len(),
            Input::SessionImpact(_) => 1,
        })
        .sum()
}

/// Records per interval in `bench driver`: a partition's share of a loaded interval
/// (`processors.max_batch` = 1000 over 6 partitions is ~166; this is fewer, to be conservative).
const INTERVAL: usize = 100;

/// `vitals-bench driver`: every processor alone in the in-memory driver (no Kafka, no I/O, one
/// thread) over the simulated people's inputs, as the edge would have written them. Needs no
/// service. Prints items/s per core and the driver's state per retained sample, then what the state
/// holds (identities, indexes, …): how many keys and bytes each. `only`: that processor alone
/// (`product_impact` still needs `session_impact`'s outputs, so that one runs too, unprinted).
pub fn driver(sim: &SimConfig, max_items_per_record: usize, only: Option<&str>) -> anyhow::Result<()> {
    use vitals_processors::driver::Driver;
    use vitals_processors::{product_impact, rollup_day, session_impact, sleep_night, Input, Processor};

    const NAMES: [&str; 4] = ["rollup_day", "sleep_night", "session_impact", "product_impact"];
    if let Some(o) = only {
        anyhow::ensure!(NAMES.contains(&o), "--only {o}: not one of {}", NAMES.join(", "));
    }
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    let t0 = Instant::now();
    let inputs = offline_inputs(sim, max_items_per_record);
    let items = input_items(&inputs);
    let retained = vitals_processors::identity::effective_samples(&inputs).values().map(Vec::len).sum::<usize>();
    println!(
        "vitals-bench driver — {} users × {} days: {items} input items in {} records ({retained} samples retained), built in {:.2} s",
        sim.users,
        sim.days,
        inputs.len(),
        t0.elapsed().as_secs_f64()
    );
    println!("  one thread, in-memory driver: no Kafka, no store, no checkpoint; intervals of {INTERVAL} records");

    /// Where a processor's state keys start, by what they hold (as its key functions lay them
    /// out; the runtime's per-user prefix is not in them). Keys matching none count as "other".
    type Layout = &'static [(&'static str, &'static str)];
    const ROLLUP_DAY: Layout = &[("identities", "i"), ("days", "d")];
    const SLEEP_NIGHT: Layout = &[("identities", "id\u{1f}"), ("day index", "ix\u{1f}"), ("rows", "out\u{1f}")];
    const SESSION_IMPACT: Layout =
        &[("identities", "id\u{1f}"), ("sample index", "ix\u{1f}"), ("sessions", "ss\u{1f}"), ("session index", "sx\u{1f}")];

    fn run<P: Processor>(name: &str, p: P, inputs: &[Input], items: usize, retained: usize, layout: Layout, print: bool) -> Vec<P::Output>
    where
        P::Output: Clone,
    {
        let stamped: Vec<(i64, Input)> = inputs.iter().enumerate().map(|(n, i)| (n as i64, i.clone())).collect();
        let t0 = Instant::now(); // the copy above is not the processor's work
        let mut d = Driver::new(p);
        for interval in stamped.chunks(INTERVAL) {
            let _ = d.feed_interval(interval); // a rejected record is the DLQ's business, not the benchmark's
        }
        let took = t0.elapsed();
        if !print {
            return d.log.iter().filter_map(|e| e.value.clone()).collect();
        }
        let bytes: usize = d.states.values().map(|s| s.map.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()).sum();
        println!(
            "  {name:<15} {:>8.3} s = {:>10.0} items/s; state {:>7.1} MB = {:>5.0} B per retained sample; {} outputs",
            took.as_secs_f64(),
            items as f64 / took.as_secs_f64(),
            bytes as f64 / 1e6,
            bytes as f64 / retained.max(1) as f64,
            d.log.len()
        );
        // What the bytes hold: (keys, key bytes, value bytes) per part of the layout.
        let mut parts: Vec<(&str, usize, usize, usize)> = layout.iter().map(|(l, _)| (*l, 0, 0, 0)).chain([("other", 0, 0, 0)]).collect();
        for (k, v) in d.states.values().flat_map(|s| s.map.iter()) {
            let i = layout.iter().position(|(_, prefix)| k.starts_with(prefix)).unwrap_or(layout.len());
            parts[i].1 += 1;
            parts[i].2 += k.len();
            parts[i].3 += v.len();
        }
        for (label, n, kb, vb) in parts.into_iter().filter(|p| p.1 > 0) {
            println!(
                "  {:<15}   {label:<14} {n:>8} keys {:>7.1} MB = {:>4.0} B each (key {:>3.0} + value {:>3.0})",
                "",
                (kb + vb) as f64 / 1e6,
                (kb + vb) as f64 / n as f64,
                kb as f64 / n as f64,
                vb as f64 / n as f64
            );
        }
        d.log.iter().filter_map(|e| e.value.clone()).collect()
    }
    if wanted("rollup_day") {
        run("rollup_day", rollup_day::RollupDayProcessor::new(Default::default()), &inputs, items, retained, ROLLUP_DAY, true);
    }
    if wanted("sleep_night") {
        run("sleep_night", sleep_night::SleepNightProcessor::new(Default::default()), &inputs, items, retained, SLEEP_NIGHT, true);
    }
    if wanted("session_impact") || wanted("product_impact") {
        let impacts = run(
            "session_impact",
            session_impact::SessionImpactProcessor::new(Default::default()),
            &inputs,
            items,
            retained,
            SESSION_IMPACT,
            wanted("session_impact"),
        );
        let chained: Vec<Input> = impacts.into_iter().map(Input::SessionImpact).collect();
        let n = chained.len();
        run(
            "product_impact",
            product_impact::ProductImpactProcessor::new(Default::default()),
            &chained,
            n,
            retained,
            &[],
            wanted("product_impact"),
        );
    }
    Ok(())
}

/// `vitals-bench edge`: the edge's CPU work on the simulated sample uploads, stage by stage,
/// without HTTP, PostgreSQL or Kafka (one thread; needs no service); then the lane records'
/// Avro encoding and decoding by vitals' codec (serde_avro_fast) beside apache-avro's `Value`
/// tree (what vitals used before) on the same records.
pub fn edge(sim: &SimConfig, max_items_per_record: usize) {
    use std::time::Duration;

    use vitals_ingest::request::{self, BatchKind, Rules};
    use vitals_schemas::avro::SAMPLE_BATCH;
    use vitals_schemas::codec::{decode_own, encode_own, encode_with_id};
    use vitals_schemas::SampleBatch;

    let catalog = vitals_schemas::Catalog::embedded();
    let rules = Rules::default();
    let uploads: Vec<(String, Vec<u8>)> = simulate::plan(sim)
        .into_iter()
        .filter(|u| u.endpoint == simulate::SAMPLES_PATH)
        .map(|u| (u.user.clone(), serde_json::to_vec(&u.body).expect("a body serialises")))
        .collect();
    let body_bytes: usize = uploads.iter().map(|(_, b)| b.len()).sum();
    let (mut parse, mut hash, mut validate, mut encode, mut encode_ref) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut items, mut records) = (0usize, Vec::new());
    let schema = SAMPLE_BATCH.schema();
    for (user, body) in &uploads {
        let t = Instant::now();
        let (env, _, list) = request::parse_envelope(body, BatchKind::Samples, user, &rules).expect("a simulated body parses");
        parse += t.elapsed();
        // The hash alone (parse_envelope computes it too: its time is part of `parse`).
        let value: serde_json::Value = serde_json::from_slice(body).expect("parses");
        let t = Instant::now();
        std::hint::black_box(vitals_schemas::hash::payload_hash(&value));
        hash += t.elapsed();
        let t = Instant::now();
        let (ok, _) = request::validate_samples(list, env.backfill, None, catalog, &rules, sim.now_ms);
        validate += t.elapsed();
        items += ok.len();
        let samples: Vec<_> = ok.into_iter().map(|r| r.sample).collect();
        for part in samples.chunks(max_items_per_record.max(1)) {
            let batch = SampleBatch {
                request_id: env.request_id.clone(),
                user_id: user.clone(),
                received_at_ms: sim.now_ms,
                lane: vitals_schemas::Lane::Hot,
                samples: part.to_vec(),
            };
            let t = Instant::now();
            let bytes = encode_own(SAMPLE_BATCH, 1, &batch).expect("encodes");
            encode += t.elapsed();
            let t = Instant::now();
            std::hint::black_box(encode_with_id(&schema, 1, &batch).expect("encodes"));
            encode_ref += t.elapsed();
            records.push(bytes);
        }
    }
    let (mut decode, mut decode_ref) = (Duration::ZERO, Duration::ZERO);
    for r in &records {
        let t = Instant::now();
        std::hint::black_box(decode_own::<SampleBatch>(SAMPLE_BATCH, &r[5..]).expect("decodes"));
        decode += t.elapsed();
        let t = Instant::now();
        let mut body = &r[5..];
        let datum = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .and_then(|d| d.read_value(&mut body))
            .expect("decodes");
        std::hint::black_box(apache_avro::from_value::<SampleBatch>(&datum).expect("decodes"));
        decode_ref += t.elapsed();
    }
    let per = |d: Duration| items as f64 / d.as_secs_f64();
    println!(
        "vitals-bench edge — {} users × {} days: {} sample uploads, {items} samples, {:.1} MB of JSON, {} lane records",
        sim.users,
        sim.days,
        uploads.len(),
        body_bytes as f64 / 1e6,
        records.len()
    );
    println!("  one thread, no HTTP / PostgreSQL / Kafka; samples per second of each stage alone:");
    let total = parse + validate + encode;
    for (name, d) in [
        ("JSON envelope (parse, duplicate keys, fields, hash)", parse),
        ("  of which the payload hash (canonical JSON, SHA-256)", hash),
        ("validation + normalisation", validate),
        ("Avro encode (serde_avro_fast)", encode),
    ] {
        println!(
            "    {name:<46} {:>8.3} s = {:>10.0} samples/s  ({:>4.1}% of the edge's CPU)",
            d.as_secs_f64(),
            per(d),
            100.0 * d.as_secs_f64() / total.as_secs_f64()
        );
    }
    println!("    {:<46} {:>8.3} s = {:>10.0} samples/s", "the edge's CPU work in all", total.as_secs_f64(), per(total));
    println!("  Avro, the same {} records:", records.len());
    println!(
        "    encode: serde_avro_fast {:>10.0} samples/s, apache-avro Value tree {:>10.0} samples/s: {:.1}x",
        per(encode),
        per(encode_ref),
        encode_ref.as_secs_f64() / encode.as_secs_f64()
    );
    println!(
        "    decode: serde_avro_fast {:>10.0} samples/s, apache-avro Value tree {:>10.0} samples/s: {:.1}x",
        per(decode),
        per(decode_ref),
        decode_ref.as_secs_f64() / decode.as_secs_f64()
    );
}

/// `vitals-bench traces`: the hop span's cost per record in three settings, side by side.
async fn traces(n: usize) -> anyhow::Result<()> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use tracing_subscriber::layer::SubscriberExt;
    use vitals_schemas::trace;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let hop = || {
        let span = tracing::info_span!(
            target: trace::TARGET,
            "process.record",
            processor = "rollup_day",
            topic = "vitals.hot",
            partition = 3,
            offset = 42i64,
            user = tracing::field::Empty
        );
        trace::continue_from(&span, Some(parent));
        let _entered = span.enter();
        if let Some(tp) = trace::of(&span) {
            span.record("user", trace::user("user-0001").as_str());
            std::hint::black_box(tp);
        }
    };
    let time = move |n: usize| {
        let t = std::time::Instant::now();
        for _ in 0..n {
            hop();
        }
        t.elapsed()
    };
    let layer = |provider: &opentelemetry_sdk::trace::SdkTracerProvider| {
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bench")))
    };
    // A local OTLP receiver that only counts what it is sent.
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&received);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            counter.fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
            async { "" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}/v1/traces", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let exporting = tokio::task::spawn_blocking(move || -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
        let client = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(10)).build()?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build()?;
        Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder().with_batch_exporter(exporter).build())
    })
    .await??;
    let silent = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    tokio::task::spawn_blocking(move || {
        println!("one hop span (process.record), {n} per setting, ns per record:");
        for round in 1..=3 {
            let off = time(n);
            let made = tracing::subscriber::with_default(layer(&silent), || time(n));
            let exported = tracing::subscriber::with_default(layer(&exporting), || time(n));
            let ns = |d: std::time::Duration| d.as_nanos() as f64 / n as f64;
            println!(
                "  round {round}: no OpenTelemetry layer {:>7.0} | layer, no exporter {:>7.0} ({:.1}x) | layer, OTLP export {:>7.0} ({:.1}x)",
                ns(off),
                ns(made),
                ns(made) / ns(off),
                ns(exported),
                ns(exported) / ns(off)
            );
        }
        // The batch processor drops spans beyond its queue (2048) rather than slow the caller.
        let _ = exporting.force_flush();
        let _ = exporting.shutdown();
    })
    .await?;
    println!("  the receiver was sent {:.1} MB of OTLP", received.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6);
    Ok(())
}
