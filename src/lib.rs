//! The `vitals` composition root: configuration ([`config`]), every client built in one place
//! ([`app`]), and the roles `main` runs as subcommands: the ingest edge (`vitals-ingest`), the
//! schema registry (`vitals-registry`), topic and schema administration, the simulator
//! ([`simulate`], crate `vitals-simulator`). The benchmarks are their own binary, `vitals-bench`
//! (`benches/`), built on this library. Library crates never read the environment or
//! open connections themselves: they get what they need from here.

pub mod app;
pub mod archive;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod k8s;
pub mod offsets;
pub mod replay;
/// The simulator lives with the edge it drives (`ingest/simulator`); re-exported under its old path.
pub use vitals_simulator as simulate;

/// Resolves on Ctrl-C or SIGTERM: how every long-running role stops.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// A stop flag, set on Ctrl-C or SIGTERM: how every long-running role is told to stop.
pub fn stop_on_signal() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    tokio::spawn(async move {
        shutdown_signal().await;
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    stop
}

/// What [`init_tracing`] installed: dropped when a role ends, it exports the spans still waiting
/// for their batch.
pub struct Telemetry(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // (The batch processor's own thread does the export; this waits for it.)
            let _ = p.shutdown();
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default`); JSON lines when
/// `VITALS_LOG_FORMAT=json`. With `telemetry` (the config and this role's service name), the
/// hops of every upload's trace (spans of target [`vitals_schemas::trace::TARGET`], whatever the
/// log filter) become OpenTelemetry spans, sampled parent-based at `sample_ratio`, and are
/// exported over OTLP/HTTP when `otlp_endpoint` is set.
pub fn init_tracing(default: &str, telemetry: Option<(&config::TelemetryConfig, &str)>) -> anyhow::Result<Telemetry> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("VITALS_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() }.with_filter(filter);
    let Some((cfg, service)) = telemetry else {
        tracing_subscriber::registry().with(fmt).init();
        return Ok(Telemetry(None));
    };
    vitals_schemas::trace::set_user_key(cfg.user_hash_key.expose().as_bytes());
    let mut provider = SdkTracerProvider::builder()
        .with_sampler({
            let ratio = if cfg.otlp_endpoint.is_empty() { 0.0 } else { cfg.sample_ratio };
            HopSampler { ratio, follow: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))) }
        })
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build());
    if !cfg.otlp_endpoint.is_empty() {
        let roots = app::ca_roots("telemetry.ca_file", &cfg.ca_file)?;
        // reqwest's blocking client may not be built on a Tokio thread: on one of its own.
        let client = std::thread::spawn(move || {
            let mut b = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(10));
            for r in roots {
                b = b.add_root_certificate(r);
            }
            b.build()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("building the OTLP client panicked"))??;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", cfg.otlp_endpoint.trim_end_matches('/').trim_end_matches("/v1/traces")))
            .build()?;
        let batches = BatchConfigBuilder::default().with_scheduled_delay(std::time::Duration::from_millis(cfg.export_delay_ms)).build();
        provider = provider.with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batches).build());
    }
    let provider = provider.build();
    let hops = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("vitals"))
        .with_filter(tracing_subscriber::filter::Targets::new().with_target(vitals_schemas::trace::TARGET, tracing::Level::TRACE));
    tracing_subscriber::registry().with(fmt).with(hops).init();
    if !cfg.otlp_endpoint.is_empty() && cfg.user_hash_key.expose().is_empty() {
        tracing::warn!(
            "telemetry.user_hash_key is empty: spans name users by an unkeyed hash, which a dictionary reverses for guessable ids"
        );
    }
    Ok(Telemetry(Some(provider)))
}

/// Which hops are recorded: the edge's span draws at `ratio` itself, whatever the phone's
/// `traceparent` says (a phone that sends `-01` cannot force a trace, nor pick its id to pass a
/// trace-id threshold); every later hop follows its parent, so a trace is whole or absent.
/// `ratio` 0 (no endpoint): nothing is recorded; the contexts still travel, unsampled.
#[derive(Debug, Clone)]
struct HopSampler {
    ratio: f64,
    /// Every other hop: parent-based (the ratio applies only to a root, which no later hop is).
    follow: opentelemetry_sdk::trace::Sampler,
}

impl opentelemetry_sdk::trace::ShouldSample for HopSampler {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        kind: &opentelemetry::trace::SpanKind,
        attributes: &[opentelemetry::KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        use opentelemetry::trace::TraceContextExt;
        use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult};
        let parent_state = || parent.map(|c| c.span().span_context().trace_state().clone()).unwrap_or_default();
        if self.ratio <= 0.0 {
            return SamplingResult { decision: SamplingDecision::Drop, attributes: Vec::new(), trace_state: parent_state() };
        }
        if name == vitals_schemas::trace::EDGE_SPAN {
            let sampled = self.ratio >= 1.0 || rand::random::<f64>() < self.ratio;
            let decision = if sampled { SamplingDecision::RecordAndSample } else { SamplingDecision::Drop };
            return SamplingResult { decision, attributes: Vec::new(), trace_state: parent_state() };
        }
        self.follow.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}
