//! The `vitals` composition root: configuration ([`config`]), every client built in one place
//! ([`app`]), and the roles `main` runs as subcommands: the ingest edge (`vitals-ingest`), the
//! schema registry ([`registry`]), topic and schema administration, the simulator ([`simulate`])
//! and the benchmarks ([`bench`]). Library crates never read the environment or open connections
//! themselves: they get what they need from here.

pub mod app;
pub mod bench;
pub mod config;
pub mod registry;
pub mod simulate;
