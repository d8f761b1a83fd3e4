//! Every processor the runtime can run: those `vitals_processors::each_processor` lists (one
//! line each in `processors/src/lib.rs`).

use serde::de::DeserializeOwned;
use serde::Serialize;
use vitals_processors::{EachProcessor, Processor, ProcessorInfo, Versioned};
use vitals_schemas::projection::{Projected, Projection};
use vitals_schemas::topics::Topics;

use crate::{RunArgs, RuntimeError};

/// A registered processor: what it is ([`ProcessorInfo`], its fields read through this) and how
/// the runtime runs it.
#[derive(Clone, Copy)]
pub struct Registered {
    pub info: ProcessorInfo,
    /// What it writes: its output's descriptor and decoder (for the sink and the read API).
    pub output: Projection,
    /// Builds it with its default config and runs it on Kafka (blocking).
    pub run: fn(RunArgs) -> Result<(), RuntimeError>,
}

impl Registered {
    /// The topic it writes.
    pub fn output_topic(&self, t: &Topics) -> String {
        self.output.topic(t)
    }
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
    P::Output: Versioned + Projected + Serialize + DeserializeOwned + Clone + Send + 'static,
{
    Registered { info, output: Projection::of::<P::Output>(), run: |args| crate::run(P::default(), args) }
}

/// The projections of every registered processor, in registry order.
pub fn projections() -> Vec<Projection> {
    registry().iter().map(|p| p.output).collect()
}

/// Every processor, in `vitals_processors::each_processor`'s order.
pub fn registry() -> Vec<Registered> {
    struct Collect(Vec<Registered>);
    impl EachProcessor for Collect {
        fn visit<P>(&mut self, info: ProcessorInfo)
        where
            P: Processor + Default,
            P::Output: Versioned + Projected + Clone + Send + 'static,
        {
            self.0.push(entry::<P>(info));
        }
    }
    let mut all = Collect(Vec::new());
    vitals_processors::each_processor(&mut all);
    all.0
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
        assert_eq!(names[..4], ["rollup_day", "sleep_night", "session_impact", "product_impact"], "the first four, in their order");
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "a name is registered once: {names:?}");
        for n in &names {
            assert_eq!(find(n).map(|p| p.name), Some(*n));
        }
        assert!(find("rollup").is_none());
        assert_eq!(find("product_impact").map(|p| p.inputs), Some(vitals_processors::Inputs::SessionImpacts));
    }

    /// What every layer derives from a descriptor holds for each registered processor: its
    /// projection is named after it, its descriptor is well formed and its schema parses.
    #[test]
    fn every_output_is_a_well_formed_projection_named_after_its_processor() {
        for p in registry() {
            assert_eq!(p.output.name(), p.name, "{}: the projection is named after its processor", p.name);
            p.output.descriptor.check().unwrap_or_else(|e| panic!("{e}"));
            p.output.descriptor.avro().schema();
            if let vitals_schemas::projection::BuiltFrom::Projection(up) = p.output.descriptor.built_from {
                assert!(find(up).is_some(), "{}: built from {up}, which is not registered", p.name);
            }
        }
    }
}
