//! The `vitals` binary: parses the command line, loads the configuration and runs one role.
//! Every role is a subcommand of this one binary; `app` builds what each needs.

/// Every role allocates per record and per request (JSON trees, decoded batches, state
/// values); glibc's malloc/free were ~30% of the edge's CPU in perf. mimalloc: measured in
/// `vitals-bench edge` and `vitals-bench driver` against the system allocator (commit message).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use vitals::config::Config;
use vitals::config::SimArgs;
use vitals::{app, demo, dlq, init_tracing, shutdown_signal, simulate, stop_on_signal};

#[derive(Parser)]
#[command(name = "vitals", version, about = "Exactly-once stream processing of mobile health data on Kafka")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the effective configuration (secrets redacted).
    Config,
    /// Apply migrations/ to postgres.url.
    Migrate,
    /// Run the Confluent-compatible schema registry (registry.listen), backed by PostgreSQL.
    Registry,
    /// Run the ingest edge (ingest.listen).
    Ingest,
    /// Run processors (exactly-once, on the configured broker), each in its own consumer group.
    Process {
        /// Processor names, e.g. rollup_day sleep_night.
        names: Vec<String>,
        /// Every registered processor.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Test hook: abort right after the N-th interval's outputs are acknowledged and before
        /// its checkpoint (the crash tests use it).
        #[arg(long, hide = true)]
        crash_after_produce: Option<u64>,
        /// Run this version of the (one) processor, started by `vitals replay --as` (its
        /// group, topic, checkpoints); the sink of its shadow table runs with `vitals replay`.
        #[arg(long = "as", value_name = "VERSION")]
        as_version: Option<String>,
    },
    /// Replay a processor as a new version beside the live one: its own consumer group, output
    /// topic and shadow table (`proj_<name>__<version>`), with a progress display per input
    /// partition. Stopped and started again (or killed), it resumes from its checkpoints.
    Replay {
        processor: String,
        /// The new version's name, e.g. v2.
        #[arg(long = "as", value_name = "VERSION")]
        as_version: String,
        /// `earliest`, an RFC 3339 time, or a JSON offsets file ([{"topic","partition","offset"}],
        /// or `vitals offsets show <processor> --json`); default earliest. Only the first start
        /// reads it: a version started again resumes from its checkpoints.
        #[arg(long)]
        from: Option<vitals::replay::From>,
        /// Exit once the shadow table has caught up with the input.
        #[arg(long)]
        until_caught_up: bool,
        /// Progress display: redrawn in place on a terminal, plain lines otherwise.
        #[arg(long, value_enum, default_value = "auto")]
        progress: vitals::replay::Display,
        /// Seconds between progress updates.
        #[arg(long, default_value_t = 2.0)]
        every: f64,
        #[arg(long, hide = true)]
        crash_after_produce: Option<u64>,
    },
    /// Serve a version of a processor's projection to reads (the API's table and freshness),
    /// atomically. Refused when that version is behind the one served, unless --force.
    Promote {
        processor: String,
        version: String,
        #[arg(long)]
        force: bool,
    },
    /// Remove a version that is not served: its table, topic, consumer groups, epochs,
    /// snapshots, progress and local state. Asks for confirmation unless --yes.
    Retire {
        processor: String,
        version: String,
        #[arg(long)]
        yes: bool,
    },
    /// Run the PostgreSQL projection sink (every projection; exactly-once in effect), announcing
    /// changed rows on Redis for the realtime gateways.
    Sink,
    /// Run the read API, the dashboard and the realtime WebSocket gateway (api.listen).
    Api,
    /// Run only the realtime WebSocket gateway (api.listen), for scaling connections apart.
    Realtime,
    /// The whole pipeline in one process with simulated people uploading, and the dashboard URL.
    /// Uses an embedded broker unless one is configured (--broker or VITALS_KAFKA__BROKERS).
    Demo {
        /// A real Kafka-protocol broker to use instead of the embedded one.
        #[arg(long)]
        broker: Option<String>,
        #[arg(long, default_value_t = 3)]
        users: usize,
        #[arg(long, default_value_t = 7)]
        days: u32,
        /// Upload pace, requests per second overall (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
        /// Exit once every projection is fresh instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        cmd: TopicsCmd,
    },
    /// Schema administration against the registry.
    Schemas {
        #[command(subcommand)]
        cmd: SchemasCmd,
    },
    /// Dead letters: list them, show one, replay them to their source lane after a fix.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// The raw archive of the input lanes in the S3-compatible store, sealed per user: run as a
    /// role, or `status` (what is archived, and so how far each lane may be truncated).
    Archive {
        #[command(subcommand)]
        cmd: Option<ArchiveCmd>,
    },
    /// Where the processor groups stand: offsets, lag, owners, epochs, snapshots.
    Offsets {
        #[command(subcommand)]
        cmd: OffsetsCmd,
    },
    /// Migrate, create topics and register schemas: everything a fresh cluster needs.
    Setup,
    /// Print a development token (HS256, auth.hs256_secret) for a user.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Upload realistic simulated data for N people through the HTTP API.
    Simulate(SimArgs),
}

#[derive(Subcommand)]
enum ArchiveCmd {
    /// Per input partition: the offsets the archive holds, the lane's first and next offset,
    /// records not archived yet, recorded gaps.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OffsetsCmd {
    /// Per input partition of each processor group (or of one): the offsets its tasks committed
    /// to the group, the high watermark, the lag, the owning member, the epoch, the newest
    /// snapshot.
    Show {
        /// One processor (default: every registered one).
        processor: Option<String>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TopicsCmd {
    /// Create every topic (idempotent; checks co-partitioning).
    Create,
    /// Partitions and record counts of every topic.
    Stats,
}

#[derive(Subcommand)]
enum SchemasCmd {
    /// Register every topic's value schema (idempotent; admin credential). Fails naming any
    /// subject whose latest version is still not vitals' schema afterwards.
    Register,
    /// Fail naming every subject whose latest version is not vitals' schema (schemas/avro), and
    /// whether vitals' is absent (and compatible) or an older version (read-only credential).
    Check,
}

#[derive(Subcommand)]
enum DlqCmd {
    /// One line per dead letter (DLQ partition:offset, time, stage, code, source, user, reason),
    /// then the count per (stage, code).
    List {
        #[command(flatten)]
        select: DlqSelect,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full: headers, key, payload (hex, base64) and the payload decoded
    /// with the schema registry when it decodes.
    Show {
        /// `<partition>:<offset>` in the dead-letter topic (as `dlq list` prints it).
        at: String,
        #[arg(long)]
        json: bool,
    },
    /// Writes the original key, payload and headers of the selected dead letters back to their
    /// source lane, each source record at most once (ledger `dlq_replays`).
    Replay {
        #[command(flatten)]
        select: DlqSelect,
        /// Every dead letter (replay refuses to run without a selector otherwise).
        #[arg(long)]
        all: bool,
        /// Print what would be replayed; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters: every given condition must hold.
#[derive(clap::Args, Clone, Debug, Default)]
struct DlqSelect {
    /// Source topic: its full name, its name without `kafka.topic_prefix`, or a lane
    /// (`hot`, `cold`, `change`, `domain`) or projection (`rollup_day`, …) alias.
    #[arg(long)]
    topic: Option<String>,
    /// Source partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Least source offset (inclusive).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Greatest source offset (inclusive).
    #[arg(long)]
    to_offset: Option<i64>,
    /// Reason code, e.g. `undecodable`.
    #[arg(long)]
    reason: Option<String>,
    /// Stage: `processor:rollup_day`, `rollup_day`, or a kind (`processor`, `sink`).
    #[arg(long)]
    stage: Option<String>,
}

impl DlqSelect {
    fn to_selector(&self, cfg: &Config) -> dlq::Selector {
        dlq::Selector {
            topic: self.topic.as_deref().map(|t| dlq::resolve_topic(&app::topics(cfg), t)),
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            code: self.reason.clone(),
            stage: self.stage.clone(),
        }
    }
}

/// Serves a role's `/readyz` (200 `ready`, or 503 `not ready: <why>` while `not_ready` says
/// why) and `/metrics` (what `render` writes, Prometheus text) on `listen`; nothing when empty.
async fn serve_probes(
    listen: &str,
    not_ready: impl Fn() -> Option<String> + Clone + Send + Sync + 'static,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> anyhow::Result<()> {
    if listen.is_empty() {
        return Ok(());
    }
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let router = axum::Router::new()
        // Liveness: the process serves (a stuck dependency is readiness, not liveness).
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let why = not_ready();
                async move {
                    match why {
                        None => (http::StatusCode::OK, "ready\n".to_owned()),
                        Some(w) => (http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {w}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let out = render();
                async move { ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out) }
            }),
        );
    tokio::spawn(app::serve(listener, router, std::future::pending()));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = Config::load()?;
    // The demo talks to a person: warnings only, unless RUST_LOG says otherwise. Traces name the
    // role they come from (`vitals-process`, `vitals-sink`, …).
    let service = format!("vitals-{}", std::env::args().nth(1).unwrap_or_default());
    let _telemetry = init_tracing(
        if matches!(cli.cmd, Cmd::Demo { .. }) { "warn,sqlx=warn,rdkafka=error" } else { "info,sqlx=warn,rdkafka=warn" },
        Some((&cfg.telemetry, &service)),
    )?;
    // Roles and tools that talk to Kafka first check that they can (TLS, SASL), so a setting that
    // cannot work stops them at once with the reason. The demo uses its embedded broker.
    let uses_kafka = !matches!(
        cli.cmd,
        Cmd::Config | Cmd::Migrate | Cmd::Registry | Cmd::Demo { .. } | Cmd::Token { .. } | Cmd::Simulate(_) | Cmd::Api | Cmd::Realtime
    );
    if uses_kafka {
        app::kafka_preflight(&cfg).await?;
    }
    match cli.cmd {
        Cmd::Config => print!("{}", toml::to_string(&cfg).context("printing config")?),
        Cmd::Migrate => {
            let pool = app::pg_pool(&cfg).await?;
            app::migrate(&pool).await?;
            println!("migrations applied");
        }
        Cmd::Registry => {
            let pool = app::pg_pool(&cfg).await?;
            app::migrate(&pool).await?;
            let listener = TcpListener::bind(&cfg.registry.listen).await.with_context(|| format!("binding {}", cfg.registry.listen))?;
            let access = app::registry_access(&cfg)?;
            app::serve(listener, vitals_registry::router(pool, access), shutdown_signal()).await?;
        }
        Cmd::Ingest => {
            app::refuse_committed_secret(&cfg, "ingest")?;
            let pool = app::pg_pool(&cfg).await?;
            app::migrate(&pool).await?;
            let ingest = app::ingest(&cfg, pool).await?;
            let listener = TcpListener::bind(&cfg.ingest.listen).await.with_context(|| format!("binding {}", cfg.ingest.listen))?;
            let header_timeout = Duration::from_millis(cfg.ingest.header_timeout_ms);
            app::serve_with(listener, vitals_ingest::router(ingest), shutdown_signal(), header_timeout).await?;
        }
        Cmd::Process { names, all, crash_after_produce, as_version } => {
            let names: Vec<String> = if all { vitals_runtime::registry().iter().map(|p| p.name.to_owned()).collect() } else { names };
            if names.is_empty() {
                let known: Vec<&str> = vitals_runtime::registry().iter().map(|p| p.name).collect();
                anyhow::bail!("name a processor or pass --all (known: {})", known.join(", "));
            }
            if as_version.is_some() && names.len() != 1 {
                anyhow::bail!("--as runs one version of one processor: name exactly one");
            }
            let stop = stop_on_signal();
            // One runtime per processor; the first to fail stops the others, and the process
            // exits non-zero so a supervisor restarts it.
            let metrics: Vec<(String, std::sync::Arc<vitals_runtime::metrics::RuntimeMetrics>)> =
                names.iter().map(|n| (n.clone(), Default::default())).collect();
            let (all, ready) = (metrics.clone(), metrics.clone());
            serve_probes(
                &cfg.processors.metrics_listen,
                // Not ready while a task waits for a failed dependency: the reason says which.
                move || {
                    let why: Vec<String> = ready.iter().filter_map(|(name, m)| m.not_ready().map(|r| format!("{name}: {r}"))).collect();
                    (!why.is_empty()).then(|| why.join("; "))
                },
                move || {
                    let mut out = String::new();
                    let refs: Vec<(&str, &vitals_runtime::metrics::RuntimeMetrics)> =
                        all.iter().map(|(n, m)| (n.as_str(), m.as_ref())).collect();
                    vitals_runtime::metrics::render_all(&refs, &mut out);
                    out
                },
            )
            .await?;
            let runs = metrics.iter().map(|(name, m)| {
                let (cfg, stop, m, as_version) = (&cfg, std::sync::Arc::clone(&stop), std::sync::Arc::clone(m), as_version.clone());
                async move {
                    let line = match &as_version {
                        Some(v) => vitals::replay::line(cfg, name, v).await?,
                        None => app::Line::default(),
                    };
                    let r = app::process_line(cfg, name, &line, std::sync::Arc::clone(&stop), crash_after_produce, m).await;
                    if r.is_err() {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    r.with_context(|| format!("processor {name}"))
                }
            });
            for r in futures::future::join_all(runs).await {
                r?;
            }
        }
        Cmd::Replay { processor, as_version, from, until_caught_up, progress, every, crash_after_produce } => {
            let stop = stop_on_signal();
            let every = Duration::from_secs_f64(every.clamp(0.1, 3600.0));
            let args = vitals::replay::ReplayArgs {
                processor,
                version: as_version,
                from,
                until_caught_up,
                display: progress,
                every,
                crash_after_produce,
            };
            vitals::replay::replay(&cfg, args, stop).await?;
        }
        Cmd::Promote { processor, version, force } => {
            println!("{}", vitals::replay::promote(&cfg, &processor, &version, force).await?);
        }
        Cmd::Retire { processor, version, yes } => {
            for line in vitals::replay::retire(&cfg, &processor, &version, yes).await? {
                println!("{line}");
            }
        }
        Cmd::Demo { broker, users, days, rate, once } => {
            demo::run(cfg, demo::DemoArgs { broker, users, days, rate, once }).await?;
        }
        Cmd::Sink => {
            let stop = stop_on_signal();
            let publisher = app::publisher(&cfg)?;
            let metrics: std::sync::Arc<vitals_sinks::runner::SinkMetrics> = Default::default();
            let (m, ready, name) = (std::sync::Arc::clone(&metrics), std::sync::Arc::clone(&metrics), app::sink_name(&cfg));
            let published = std::sync::Arc::clone(&publisher.metrics);
            serve_probes(
                &cfg.sink.metrics_listen,
                // Not ready while the sink waits for PostgreSQL or the registry: says which.
                move || ready.not_ready().map(|w| format!("waiting for {w}")),
                move || {
                    let mut out = String::new();
                    m.render(&name, &mut out);
                    published.render(&mut out);
                    out
                },
            )
            .await?;
            app::sink(&cfg, stop, metrics, Box::new(move |applied| publisher.announce(applied))).await?;
        }
        Cmd::Api | Cmd::Realtime => {
            app::refuse_committed_secret(&cfg, if matches!(cli.cmd, Cmd::Realtime) { "realtime" } else { "api" })?;
            let pool = app::pg_pool(&cfg).await?;
            app::migrate(&pool).await?;
            let api = app::api(&cfg, pool, true).await?;
            let listener = TcpListener::bind(&cfg.api.listen).await.with_context(|| format!("binding {}", cfg.api.listen))?;
            let routes = if matches!(cli.cmd, Cmd::Realtime) {
                vitals_api::realtime_routes(std::sync::Arc::clone(&api))
            } else {
                vitals_api::routes(std::sync::Arc::clone(&api))
            };
            // /metrics on its own port when api.metrics_listen says so, else beside the routes.
            let router = if cfg.api.metrics_listen.is_empty() {
                routes.merge(vitals_api::metrics_router(api))
            } else {
                let internal = TcpListener::bind(&cfg.api.metrics_listen)
                    .await
                    .with_context(|| format!("binding api.metrics_listen {}", cfg.api.metrics_listen))?;
                let metrics = vitals_api::metrics_router(api).route("/healthz", axum::routing::get(|| async { "ok\n" }));
                tokio::spawn(app::serve(internal, metrics, shutdown_signal()));
                routes
            };
            app::serve_with(listener, router, shutdown_signal(), Duration::from_millis(cfg.api.header_timeout_ms)).await?;
        }
        Cmd::Topics { cmd: TopicsCmd::Create } => {
            for line in app::create_topics(&cfg).await? {
                println!("{line}");
            }
        }
        Cmd::Archive { cmd: None } => {
            let stop = stop_on_signal();
            let metrics: std::sync::Arc<vitals::archive::ArchiveMetrics> = Default::default();
            let (m, ready) = (std::sync::Arc::clone(&metrics), std::sync::Arc::clone(&metrics));
            serve_probes(
                &cfg.archive.metrics_listen,
                // Not ready while the archiver waits for the store or PostgreSQL: says which.
                move || ready.not_ready().map(|w| format!("waiting for {w}")),
                move || {
                    let mut out = String::new();
                    m.render(&mut out);
                    out
                },
            )
            .await?;
            vitals::archive::run(&cfg, stop, metrics).await?;
        }
        Cmd::Archive { cmd: Some(ArchiveCmd::Status { json }) } => {
            let rows = vitals::archive::status(&cfg).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", vitals::archive::render(&rows));
            }
        }
        Cmd::Offsets { cmd: OffsetsCmd::Show { processor, json } } => {
            let rows = vitals::offsets::show(&cfg, processor.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", vitals::offsets::render(&rows));
            }
        }
        Cmd::Topics { cmd: TopicsCmd::Stats } => {
            for (name, partitions, records) in app::topic_counts(&cfg).await? {
                if records < 0 {
                    println!("{name:<40} missing (run `vitals topics create`)");
                } else {
                    println!("{name:<40} {partitions:>3} partitions {records:>10} records");
                }
            }
        }
        Cmd::Schemas { cmd: SchemasCmd::Register } => {
            for line in app::register_schemas(&cfg).await? {
                println!("{line}");
            }
        }
        Cmd::Schemas { cmd: SchemasCmd::Check } => {
            let bad = app::check_schemas(&cfg).await?;
            if !bad.is_empty() {
                anyhow::bail!("{} subject(s) do not have vitals' schema as their latest version:\n  {}", bad.len(), bad.join("\n  "));
            }
            println!("every subject's latest version is vitals' schema");
        }
        Cmd::Dlq { cmd: DlqCmd::List { select, json } } => {
            let out = dlq::list(&cfg, &select.to_selector(&cfg), json).await?;
            print!("{out}");
        }
        Cmd::Dlq { cmd: DlqCmd::Show { at, json } } => {
            print!("{}", dlq::show(&cfg, &at, json).await?);
        }
        Cmd::Dlq { cmd: DlqCmd::Replay { select, all, dry_run } } => {
            let sel = select.to_selector(&cfg);
            anyhow::ensure!(
                all || !sel.is_empty(),
                "name what to replay (--topic, --partition, --from-offset, --to-offset, --reason, --stage) or pass --all"
            );
            let report = dlq::replay(&cfg, &sel, dry_run, &mut std::io::stdout()).await?;
            anyhow::ensure!(
                report.failed == 0,
                "{} replays were not acknowledged; run the same command again (nothing is written twice)",
                report.failed
            );
        }
        Cmd::Setup => {
            let pool = app::pg_pool(&cfg).await?;
            app::migrate(&pool).await?;
            println!("migrations applied");
            for line in app::create_topics(&cfg).await? {
                println!("{line}");
            }
            for line in app::register_schemas(&cfg).await? {
                println!("{line}");
            }
        }
        Cmd::Token { user, ttl_secs } => {
            let secret = cfg.auth.hs256_secret.expose();
            anyhow::ensure!(!secret.is_empty(), "auth.hs256_secret is empty: no development tokens");
            println!("{}", vitals_auth::mint_hs256(secret.as_bytes(), &cfg.auth.issuer, &cfg.auth.audience, &user, ttl_secs));
        }
        Cmd::Simulate(args) => {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
            let report = simulate::run(&args.to_config(&cfg), &http).await?;
            println!("{report:#?}");
        }
    }
    Ok(())
}
