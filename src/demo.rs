//! `vitals demo`: the whole pipeline in one process — schema registry, ingest edge, every
//! processor, the PostgreSQL sink with realtime push, the read API with the dashboard — and the
//! simulator uploading a week of data for a few people, so a newcomer sees charts fill up.
//!
//! Kafka: with no broker configured (no `--broker`, no `VITALS_KAFKA__BROKERS`), an embedded
//! in-process Kafka-protocol broker (librdkafka's mock cluster) is used and the demo says so; the
//! exactly-once design needs no broker transactions, so it runs unchanged on it. Tests and
//! benchmarks always use the real broker. Each run uses fresh topic names, user ids and local
//! state (a `demo-<time>.` prefix), so runs never mix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::app;
use crate::config::Config;
use crate::simulate;

pub struct DemoArgs {
    pub broker: Option<String>,
    pub users: usize,
    pub days: u32,
    /// Upload pace (requests per second overall); `None`: as fast as possible.
    pub rate: Option<f64>,
    /// Exit once every user's projections are fresh (for scripts and tests).
    pub once: bool,
}

/// One simulated watch, live: every 5 s a heart-rate sample and the steps of the last 5 s, through
/// the same HTTP API a phone uses. Failures are printed and the next tick tries again.
async fn live_watch(http: reqwest::Client, base_url: String, token: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    for n in 0u64.. {
        tick.tick().await;
        let now = chrono::Utc::now();
        let at = |secs: i64| (now - chrono::Duration::seconds(secs)).to_rfc3339();
        let bpm = 62 + (n * 7 % 23);
        let body = serde_json::json!({"request_id": format!("live-{}-{n}", now.timestamp_millis()), "samples": [
            {"source": "demo-watch", "source_kind": "watch", "source_record_id": format!("live-hr-{}", now.timestamp_millis()),
             "metric": "heart_rate", "start": at(0), "end": at(0), "value": bpm, "unit": "count/min", "time_zone": "UTC"},
            {"source": "demo-watch", "source_kind": "watch", "source_record_id": format!("live-steps-{}", now.timestamp_millis()),
             "metric": "steps", "start": at(5), "end": at(0), "value": 8 + n % 5, "unit": "count", "time_zone": "UTC"}]});
        match http.post(format!("{base_url}/v1/health/samples:batch")).bearer_auth(&token).json(&body).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => eprintln!("live upload: HTTP {}", r.status()),
            Err(e) => eprintln!("live upload: {e}"),
        }
    }
}

pub async fn run(mut cfg: Config, args: DemoArgs) -> anyhow::Result<()> {
    let run = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    cfg.kafka.topic_prefix = format!("demo-{run}.");
    cfg.processors.data_dir = format!("{}/demo-{run}", cfg.processors.data_dir);
    let explicit = args.broker.is_some() || std::env::var_os("VITALS_KAFKA__BROKERS").is_some();
    // The mock cluster must outlive every client: it is dropped when this function returns.
    let _mock = if explicit {
        if let Some(b) = &args.broker {
            cfg.kafka.brokers = b.clone();
        }
        app::create_topics(&cfg).await.context("creating topics on the configured broker")?;
        println!("Kafka: the configured broker at {}", cfg.kafka.brokers);
        None
    } else {
        let mock = rdkafka::mocking::MockCluster::new(1).context("starting the embedded broker")?;
        cfg.kafka.brokers = mock.bootstrap_servers();
        for spec in app::topics(&cfg).specs() {
            mock.create_topic(&spec.name, cfg.kafka.partitions, 1).with_context(|| format!("creating {}", spec.name))?;
        }
        println!("Kafka: EMBEDDED in-process broker (librdkafka mock cluster) at {} — its data lives only as long as", cfg.kafka.brokers);
        println!("       this process. Pass --broker HOST:PORT (or set VITALS_KAFKA__BROKERS) to use a real broker.");
        Some(mock)
    };

    let pool = app::pg_pool(&cfg).await?;
    app::migrate(&pool).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();

    // The schema registry: the one `scripts/services` runs when it answers, else our own.
    // It must take our read-only credential: one that refuses it is not ours to use.
    let probe = reqwest::Client::new()
        .get(format!("{}/subjects", cfg.registry.url.trim_end_matches('/')))
        .basic_auth(&cfg.registry.reader_user, Some(cfg.registry.reader_password.expose()))
        .send()
        .await;
    let registry_up = match probe {
        Ok(r) if r.status().is_success() => true,
        Ok(r) if matches!(r.status().as_u16(), 401 | 403) => anyhow::bail!(
            "the schema registry at {} refuses the configured read-only credential ({}): set registry.reader_user / reader_password to its credentials, or stop it",
            cfg.registry.url,
            r.status()
        ),
        _ => false,
    };
    if !registry_up {
        let listener =
            TcpListener::bind(&cfg.registry.listen).await.with_context(|| format!("binding the registry on {}", cfg.registry.listen))?;
        let router = vitals_registry::router(pool.clone(), app::registry_access(&cfg)?);
        tasks.push((
            false,
            tokio::spawn(async move {
                let _ = app::serve(listener, router, std::future::pending()).await;
            }),
        ));
    }
    app::register_schemas(&cfg).await.context("registering schemas")?;

    let ingest = app::ingest(&cfg, pool.clone()).await?;
    let listener =
        TcpListener::bind(&cfg.ingest.listen).await.with_context(|| format!("binding the ingest edge on {}", cfg.ingest.listen))?;
    let router = vitals_ingest::router(ingest);
    tasks.push((
        false,
        tokio::spawn(async move {
            let _ = app::serve(listener, router, std::future::pending()).await;
        }),
    ));

    for info in vitals_runtime::registry() {
        let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
        tasks.push((
            true,
            tokio::spawn(async move {
                if let Err(e) = app::process(&cfg, info.name, stop, None, Default::default()).await {
                    eprintln!("processor {} stopped: {e:#}", info.name);
                }
            }),
        ));
    }
    {
        let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
        let publisher = app::publisher(&cfg)?;
        tasks.push((
            true,
            tokio::spawn(async move {
                if let Err(e) = app::sink(&cfg, stop, Default::default(), Box::new(move |a| publisher.announce(a))).await {
                    eprintln!("sink stopped: {e:#}");
                }
            }),
        ));
    }
    let api = app::api(&cfg, pool.clone(), true).await?;
    let listener = TcpListener::bind(&cfg.api.listen).await.with_context(|| format!("binding the API on {}", cfg.api.listen))?;
    tasks.push((
        false,
        tokio::spawn(async move {
            let _ = app::serve(listener, vitals_api::router(api), std::future::pending()).await;
        }),
    ));

    let prefix = format!("demo-{run}-");
    let sim = simulate::SimConfig {
        base_url: format!("http://{}", cfg.ingest.listen),
        users: args.users,
        days: args.days,
        user_prefix: prefix.clone(),
        seed: 42,
        now_ms: chrono::Utc::now().timestamp_millis(),
        rate: args.rate,
        concurrency: 4,
        batch_size: 500,
        jwt_secret: cfg.auth.hs256_secret.expose().as_bytes().to_vec(),
        jwt_issuer: cfg.auth.issuer.clone(),
        jwt_audience: cfg.auth.audience.clone(),
        edits_and_deletions: true,
    };
    let users: Vec<String> = (0..args.users).map(|i| simulate::user_id(&sim, i)).collect();
    let token = vitals_auth::mint_hs256(cfg.auth.hs256_secret.expose().as_bytes(), &cfg.auth.issuer, &cfg.auth.audience, &users[0], 86_400);
    println!();
    println!("Dashboard:  http://{}/#token={token}", cfg.api.listen);
    println!("            (user {}; `vitals token --user <id>` signs in as any other: {})", users[0], users.join(", "));
    println!("Ingest:     http://{}  (OpenAPI: /openapi.json)", cfg.ingest.listen);
    println!("Read API:   http://{}/v1/...  (OpenAPI: /openapi.json)", cfg.api.listen);
    println!();
    println!("Uploading {} days for {} people…", args.days, args.users);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let started = Instant::now();
    let report = simulate::run(&sim, &http).await.context("simulated uploads")?;
    println!(
        "uploaded {} items in {:.1} s ({} rejected by validation, as the simulator intends some)",
        report.accepted,
        started.elapsed().as_secs_f64(),
        report.rejected
    );

    // Wait for every projection of every user to be fresh.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut behind = Vec::new();
        for u in &users {
            for (p, f) in vitals_api::freshness::UserProgress::load(&pool, u).await?.all(&crate::app::projections()) {
                if f.state != vitals_api::freshness::FreshnessState::Fresh {
                    behind.push(format!("{u}/{p}: {}", f.state.as_str()));
                }
            }
        }
        if behind.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "projections not fresh within 300 s: {}", behind.join(", "));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("every projection is fresh after {:.1} s:", started.elapsed().as_secs_f64());
    for table in ["proj_rollup_day", "proj_sleep_night", "proj_session_impact", "proj_product_impact"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE NOT deleted AND user_id LIKE $1 || '%'"))
            .bind(&prefix)
            .fetch_one(&pool)
            .await?;
        println!("  {table:<22} {n:>6} rows");
    }
    if !args.once {
        // The first person's watch keeps uploading, so the dashboard visibly moves.
        let live = tokio::spawn(live_watch(http.clone(), sim.base_url.clone(), token.clone()));
        println!();
        println!("Everything keeps running, and {}'s watch uploads a heart rate and a few steps every 5 s:", users[0]);
        println!("open the dashboard above and watch it update; upload your own (README › Uploading); Ctrl-C to stop.");
        crate::shutdown_signal().await;
        live.abort();
    }
    // Processors and the sink finish their interval and stop before the broker goes away.
    stop.store(true, Ordering::Relaxed);
    let (workers, servers): (Vec<_>, Vec<_>) = tasks.into_iter().partition(|(worker, _)| *worker);
    let _ = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(workers.into_iter().map(|(_, t)| t))).await;
    for (_, t) in servers {
        t.abort();
    }
    Ok(())
}
