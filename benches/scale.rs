//! `vitals-bench scale`: the throughput run of `bench e2e` (upload → every projection of every
//! user fresh in PostgreSQL) with 1, 2, 3… `vitals process --all` instances — real child
//! processes of this binary, members of the same consumer groups — over topics of 6 and 12
//! partitions, the edge and the sink in this process; then the Postgres-only design on the same
//! uploads, and a users-per-core sizing from the figures.
//!
//! Each point gets its own topic namespace. Before the timed upload every processor group must
//! hold exactly the instances started, all `Stable`, and a warm-up population with a user on
//! every partition must be fresh, so no rebalance and no start-up cost falls into the timed run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::net::TcpListener;

use super::pg_only;
use vitals::app;
use vitals::config::Config;
use vitals::simulate::{self, SimConfig};

/// One measured point.
struct Point {
    partitions: i32,
    instances: usize,
    samples: u64,
    took: Duration,
    /// Time from starting the instances until every group was stable and the warm-up fresh.
    ready: Duration,
    /// The upload alone (the edge's acknowledgements).
    uploaded: Duration,
    /// Lines at WARN or ERROR in the instances' logs over the whole point.
    warnings: usize,
    first_warning: Option<String>,
    /// The edge's mean produce-and-acknowledge time per samples request, ms.
    ack_ms: f64,
    /// Transactions of the broker's PostgreSQL storage database over the timed run (none when the broker does not store in this PostgreSQL).
    broker_tx: Option<i64>,
}

impl Point {
    fn rate(&self) -> f64 {
        self.samples as f64 / self.took.as_secs_f64()
    }
}

/// The `vitals process --all` instances of one point; killed (SIGKILL) when dropped.
struct Instances {
    children: Vec<tokio::process::Child>,
    logs: Vec<PathBuf>,
}

impl Instances {
    fn start(cfg: &Config, n: usize, data: &Path) -> anyhow::Result<Instances> {
        // `vitals` is built beside `vitals-bench` (same package, same target directory).
        let exe = std::env::current_exe().context("locating this binary")?.with_file_name("vitals");
        anyhow::ensure!(exe.exists(), "{} is missing: build both binaries (cargo build --release)", exe.display());
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for i in 0..n {
            let dir = data.join(format!("instance{i}"));
            std::fs::create_dir_all(&dir)?;
            let log = data.join(format!("instance{i}.log"));
            let out = std::fs::File::create(&log)?;
            let child = tokio::process::Command::new(&exe)
                .args(["process", "--all"])
                .env("VITALS_KAFKA__TOPIC_PREFIX", &cfg.kafka.topic_prefix)
                .env("VITALS_KAFKA__PARTITIONS", cfg.kafka.partitions.to_string())
                .env("VITALS_PROCESSORS__DATA_DIR", &dir)
                .env("VITALS_PROCESSORS__METRICS_LISTEN", "")
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} process --all", exe.display()))?;
            children.push(child);
            logs.push(log);
        }
        Ok(Instances { children, logs })
    }

    /// An instance that exited is a failed point, with its log named.
    fn check(&mut self) -> anyhow::Result<()> {
        for (c, log) in self.children.iter_mut().zip(&self.logs) {
            if let Some(status) = c.try_wait()? {
                bail!("a `vitals process --all` instance exited ({status}); its log: {}", log.display());
            }
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(mut self, grace: Duration) {
        for c in &self.children {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
        }
        for c in &mut self.children {
            if tokio::time::timeout(grace, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// Waits until every processor group has exactly `n` members and is `Stable`.
async fn groups_stable(cfg: &Config, n: usize, instances: &mut Instances, deadline: Instant) -> anyhow::Result<()> {
    let client: BaseConsumer =
        app::kafka_base(cfg, "vitals-bench-scale-observer").set("group.id", "vitals-bench-scale-observer").create()?;
    let client = Arc::new(client);
    let groups: Vec<String> = vitals_runtime::registry().iter().map(|p| app::processor_group(cfg, p.name)).collect();
    loop {
        instances.check()?;
        let c = Arc::clone(&client);
        let gs = groups.clone();
        let states: Vec<(String, String, usize)> = tokio::task::spawn_blocking(move || {
            gs.iter()
                .map(|g| match c.fetch_group_list(Some(g), Duration::from_secs(5)) {
                    Ok(list) => list.groups().first().map(|i| (g.clone(), i.state().to_owned(), i.members().len())).unwrap_or((
                        g.clone(),
                        "absent".into(),
                        0,
                    )),
                    Err(e) => (g.clone(), format!("unknown ({e})"), 0),
                })
                .collect()
        })
        .await?;
        if states.iter().all(|(_, s, m)| s == "Stable" && *m == n) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the processor groups did not reach {n} stable members: {states:?}; logs: {:?}", instances.logs);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every projection of every one of `users` is fresh.
async fn all_fresh(pool: &sqlx::PgPool, users: &[String], instances: &mut Instances, deadline: Instant, what: &str) -> anyhow::Result<()> {
    loop {
        instances.check()?;
        let Some(u) = super::first_stale(pool, users).await? else { return Ok(()) };
        if Instant::now() >= deadline {
            bail!("{what}: user {u} not fresh in time; instance logs: {:?}", instances.logs);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One point: fresh topics of `partitions` partitions, `n` instances, the edge and the sink here.
async fn point(base: &Config, sim: &SimConfig, partitions: i32, n: usize, tag: &str) -> anyhow::Result<(Point, SimConfig)> {
    let mut cfg = base.clone();
    let run = format!("scale{tag}p{partitions}n{n}.");
    cfg.kafka.topic_prefix = format!("{}{run}", base.kafka.topic_prefix);
    cfg.kafka.partitions = partitions;
    let data = std::env::temp_dir().join(format!("vitals-bench-scale-{}-p{partitions}n{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    cfg.processors.data_dir = data.display().to_string();
    let pool = app::pg_pool(&cfg).await?;
    app::migrate(&pool).await?;
    app::create_topics(&cfg).await?;
    app::register_schemas(&cfg).await?;

    let started = Instant::now();
    let mut instances = Instances::start(&cfg, n, &data)?;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = app::publisher(&cfg)?;
    let sink = {
        let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
        tokio::spawn(async move { app::sink(&cfg, stop, Default::default(), Box::new(move |a| publisher.announce(a))).await })
    };
    let ingest = app::ingest(&cfg, pool.clone()).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let edge = tokio::spawn(app::serve(listener, vitals_ingest::router(Arc::clone(&ingest)), std::future::pending()));
    let http = reqwest::Client::new();

    // Every group stable with n members, then a warm-up population with a user on every
    // partition, one day each, fresh.
    let deadline = Instant::now() + Duration::from_secs(180);
    groups_stable(&cfg, n, &mut instances, deadline).await?;
    let mut warm = sim.clone();
    warm.base_url = url.clone();
    warm.user_prefix = format!("{run}warm-");
    warm.days = 1;
    warm.edits_and_deletions = false;
    warm.users = 0;
    let mut covered = std::collections::BTreeSet::new();
    while covered.len() < partitions as usize {
        covered.insert(vitals_schemas::topics::partition_for(simulate::user_id(&warm, warm.users).as_bytes(), partitions));
        warm.users += 1;
    }
    simulate::run(&warm, &http).await.context("warm-up upload")?;
    let warm_users: Vec<String> = (0..warm.users).map(|i| simulate::user_id(&warm, i)).collect();
    all_fresh(&pool, &warm_users, &mut instances, deadline, "warm-up").await?;
    groups_stable(&cfg, n, &mut instances, deadline).await?;
    let ready = started.elapsed();

    // The timed run: the same HealthWeek as `bench e2e`.
    let mut week = sim.clone();
    week.base_url = url;
    week.user_prefix = format!("{run}{}", sim.user_prefix);
    let users: Vec<String> = (0..week.users).map(|i| simulate::user_id(&week, i)).collect();
    let broker_tx = broker_transactions(&pool).await;
    let t0 = Instant::now();
    let report = simulate::run(&week, &http).await.context("simulated upload")?;
    let uploaded = t0.elapsed();
    let m = &ingest.metrics;
    let ack_ms = vitals_ingest::metrics::mean_ms(&m.produce_seconds, "samples");
    all_fresh(&pool, &users, &mut instances, Instant::now() + Duration::from_secs(1800), "the timed run").await?;
    let took = t0.elapsed();
    let broker_tx = match (broker_tx, broker_transactions(&pool).await) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    groups_stable(&cfg, n, &mut instances, Instant::now() + Duration::from_secs(30)).await.context("a rebalance during the timed run")?;

    stop.store(true, Ordering::Relaxed);
    let logs = instances.logs.clone();
    instances.stop(Duration::from_secs(20)).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), sink).await;
    edge.abort();
    super::drop_run_topics(base, &cfg).await;
    let mut warnings = 0;
    let mut first_warning = None;
    for log in &logs {
        for line in std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
            warnings += 1;
            first_warning.get_or_insert_with(|| line.chars().take(300).collect());
        }
    }
    if std::env::var_os("VITALS_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&data);
    } else {
        eprintln!("  kept {}", data.display());
    }
    Ok((
        Point { partitions, instances: n, samples: report.accepted, took, ready, uploaded, warnings, first_warning, ack_ms, broker_tx },
        week,
    ))
}

/// Committed transactions of the broker's storage database (nisshi with PostgreSQL storage, as
/// `scripts/services` starts it, in the same server as vitals' own database), if it is there.
async fn broker_transactions(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = 'vitals_nisshi'")
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

/// Samples per user and day of the HealthWeek workload, for the sizing.
fn per_user_day(sim: &SimConfig, samples: u64) -> f64 {
    samples as f64 / (sim.users.max(1) as f64 * sim.days.max(1) as f64)
}

/// How many times the mean rate the sizing plans for: phones upload in bursts (background sync
/// when the phone wakes, morning syncs of the night's data), not evenly over the day.
const PEAK_TO_MEAN: f64 = 10.0;

pub async fn run(base: &Config, sim: SimConfig, instances: &[usize], partitions: &[i32]) -> anyhow::Result<()> {
    anyhow::ensure!(!instances.is_empty() && !partitions.is_empty(), "name at least one instance count and one partition count");
    let tag = chrono::Utc::now().timestamp_millis().to_string();
    let mut points = Vec::new();
    let mut last_week = None;
    for &p in partitions {
        for &n in instances {
            let (pt, week) = point(base, &sim, p, n, &tag).await.with_context(|| format!("{p} partitions, {n} instances"))?;
            eprintln!("  measured: {p} partitions, {n} instance(s): {:.0} samples/s", pt.rate());
            points.push(pt);
            last_week = Some(week);
        }
    }
    let week = last_week.expect("one point at least");
    let pool = app::pg_pool(base).await?;
    let inputs = super::offline_inputs(&week, base.ingest.max_items_per_record);
    let pg = pg_only::run(&pool, &inputs, true).await?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let first = points[0].rate();

    println!("vitals-bench scale — HealthWeek: {} users × {} days, batch ≤ {}, concurrency {}; `vitals process --all` instances as child processes, edge + sink in this process", sim.users, sim.days, sim.batch_size, sim.concurrency);
    println!("  upload → every projection of every user fresh in PostgreSQL, each point in its own topics (warm-up and stable groups before the clock starts):");
    println!(
        "    {:>10} {:>9} {:>9} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "partitions", "instances", "samples", "seconds", "upload s", "samples/s", "vs first", "vs PG-only"
    );
    for pt in &points {
        println!(
            "    {:>10} {:>9} {:>9} {:>10.2} {:>10.2} {:>12.0} {:>11.2}× {:>9.2}×   (ready after {:.1} s; {} warnings in the instances' logs)",
            pt.partitions,
            pt.instances,
            pt.samples,
            pt.took.as_secs_f64(),
            pt.uploaded.as_secs_f64(),
            pt.rate(),
            pt.rate() / first,
            pt.rate() / pg.items_per_sec(),
            pt.ready.as_secs_f64(),
            pt.warnings
        );
        println!(
            "      edge: mean broker acknowledgement {:.1} ms per samples request; broker storage: {}",
            pt.ack_ms,
            pt.broker_tx.map_or("not in this PostgreSQL".to_owned(), |t| format!(
                "{:.0} transactions/s from the upload's start to the end",
                t as f64 / pt.took.as_secs_f64()
            ))
        );
        if let Some(w) = &pt.first_warning {
            println!("      first: {w}");
        }
    }
    println!(
        "  Postgres-only design, the same uploads: {:.0} samples/s ({} items in {:.2} s)",
        pg.items_per_sec(),
        pg.items,
        pg.took.as_secs_f64()
    );
    let per_day = per_user_day(&sim, points[0].samples);
    println!(
        "  sizing — this workload is {per_day:.0} samples per user per day; this machine has {cores} cores, shared by the broker, PostgreSQL, Redis, the registry and every vitals role:"
    );
    println!(
        "    {:>10} {:>9} {:>14} {:>16} {:>22}",
        "partitions",
        "instances",
        "samples/s",
        "users (mean)",
        format!("users/core at {PEAK_TO_MEAN:.0}× peak")
    );
    for pt in &points {
        let users_mean = pt.rate() * 86_400.0 / per_day;
        println!(
            "    {:>10} {:>9} {:>14.0} {:>16.0} {:>22.0}",
            pt.partitions,
            pt.instances,
            pt.rate(),
            users_mean,
            users_mean / PEAK_TO_MEAN / cores as f64
        );
    }
    println!("  (users (mean) = samples/s × 86,400 ÷ samples per user-day: the users whose day of data this rate absorbs in a day;");
    println!("   per core at {PEAK_TO_MEAN:.0}× peak = that ÷ {PEAK_TO_MEAN:.0} (uploads come in bursts) ÷ {cores} cores — the whole stack on these cores, not vitals alone)");
    Ok(())
}
