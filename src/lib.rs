//! The `vitals` composition root: configuration ([`config`]), every client built in one place
//! ([`app`]), and the roles `main` runs as subcommands: the ingest edge (`vitals-ingest`), the
//! schema registry (`vitals-registry`), topic and schema administration, the simulator
//! ([`simulate`], crate `vitals-simulator`) and the benchmarks ([`bench`]). Library crates never read the environment or
//! open connections themselves: they get what they need from here.

pub mod app;
pub mod archive;
pub mod bench;
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
