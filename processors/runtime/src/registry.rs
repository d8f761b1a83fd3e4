//! Every processor the runtime can run, one line each. Adding a processor: its file under
//! `processors/src/`, plus its line here.

use serde::de::DeserializeOwned;
use serde::Serialize;
use vitals_processors::{product_impact, rollup_day, session_impact, sleep_night};
use vitals_processors::{Processor, ProcessorInfo, Versioned};

use crate::{RunArgs, RuntimeError};

/// A registered processor: what it is ([`ProcessorInfo`], its fields read through this) and how
/// the runtime runs it.
#[derive(Clone, Copy)]
pub struct Registered {
    pub info: ProcessorInfo,
    /// Builds it with its default config and runs it on Kafka (blocking).
    pub run: fn(RunArgs) -> Result<(), RuntimeError>,
}

impl std::ops::Deref for Registered {
    type Target = ProcessorInfo;
    fn deref(&self) -> &ProcessorInfo {
        &self.info
    }
}

/// The entry of processor `P`, described by `info`, built with its defaults.
pub fn entry<P>(info: ProcessorInfo) -> Registered
where
    P: Processor + Default,
    P::Output: Versioned + vitals_schemas::codec::AvroRecord + Serialize + DeserializeOwned + Clone,
{
    Registered { info, run: |args| crate::run(P::default(), args) }
}

/// Every processor, one line each.
pub fn registry() -> Vec<Registered> {
    vec![
        entry::<rollup_day::RollupDayProcessor>(rollup_day::INFO),
        entry::<sleep_night::SleepNightProcessor>(sleep_night::INFO),
        entry::<session_impact::SessionImpactProcessor>(session_impact::INFO),
        entry::<product_impact::ProductImpactProcessor>(product_impact::INFO),
    ]
}

/// The registry entry named `name`.
pub fn find(name: &str) -> Option<Registered> {
    registry().into_iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_processor_is_found_by_its_own_name_once() {
        let names: Vec<&str> = registry().iter().map(|p| p.name).collect();
        assert_eq!(names, ["rollup_day", "sleep_night", "session_impact", "product_impact"]);
        for n in &names {
            assert_eq!(find(n).map(|p| p.name), Some(*n));
        }
        assert!(find("rollup").is_none());
        assert_eq!(find("product_impact").map(|p| p.inputs), Some(vitals_processors::Inputs::SessionImpacts));
    }
}
