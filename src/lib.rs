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

/// Logs to stderr, filtered by `RUST_LOG` (else `default`); JSON lines when
/// `VITALS_LOG_FORMAT=json`.
pub fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("VITALS_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
