//! Every processor under the simulated cluster ([`crate::sim`]): takeovers at random
//! earlier checkpoints, owners dying part-way through producing an interval, zombies writing
//! after the takeover, lost epochs. The runtime's task core runs here exactly as on Kafka; the
//! processors' own scenario generators come from their `tests` modules (feature `testkit`).

mod rollup_day {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use vitals_processors::rollup_day::tests::*;
    use vitals_processors::rollup_day::{oracle, Config, RollupDayProcessor};
    use vitals_processors::{Input, Inputs};
    use vitals_schemas::{Deletion, SourceKind};

    /// The twenty lines: owner A reads sample `s` (COLD) and emits its day; before A reads
    /// the deletion of `s` (CHANGE), owner B takes over from the empty checkpoint, and its first
    /// interval holds both records — CHANGE is processed before COLD, so for B the deletion is a
    /// no-op and `s` arrives already deleted: B emits nothing for that day. Without answers, A's row
    /// (counting `s`) would stay the newest version of the day forever.
    #[test]
    fn a_takeover_that_sees_a_deletion_before_its_sample_still_retracts_the_day() {
        use crate::sim::{self, Scenario, Sim};
        let s = sample("watch", SourceKind::Watch, "hr-1", "heart_rate", ms(2026, 10, 23, 12, 0), ms(2026, 10, 23, 12, 0), 61.0, "UTC");
        let del = changes(
            "u",
            vec![],
            vec![Deletion { source: "watch".into(), source_record_id: "hr-1".into(), metric: "heart_rate".into(), deleted_version: None }],
        );
        let t = sim::topics();
        let records = vec![(t.cold.clone(), 1, batch("u", vec![s])), (t.change.clone(), 2, del)];
        let inputs: Vec<Input> = records.iter().map(|(_, _, i)| i.clone()).collect();
        assert!(oracle(&inputs).is_empty(), "the oracle has no row: the sample is deleted");
        // Seeds decide batch boundaries; some seeds give A the sample alone and B both records.
        let mut saw_a_stale_write = false;
        for seed in 0..200u64 {
            let mut sim: Sim<RollupDayProcessor> = Sim::new(Inputs::Lanes, records.clone());
            sim.run(
                || RollupDayProcessor::new(Config::default()),
                &Scenario { seed, takeovers: 1, max_zombie_steps: 1, epochs_lost: false },
            );
            saw_a_stale_write |= sim.out.iter().any(|r| !r.marker && !r.retraction);
            assert_eq!(sim.fold_by_version(), BTreeMap::new(), "seed {seed}: by version");
            assert_eq!(sim.fold_as_compaction(), BTreeMap::new(), "seed {seed}: as compaction keeps it");
        }
        assert!(saw_a_stale_write, "no seed had an owner emit the day before the deletion: the test exercised nothing");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)))]

        /// Takeovers at random earlier checkpoints (or from nothing), each owner with its own batch
        /// boundaries and lane interleaving, zombies writing after the takeover, `processor_epochs`
        /// lost now and then: the output partition folded by version and as compaction keeps it both
        /// equal the oracle.
        #[test]
        fn takeovers_zombies_and_compaction_leave_exactly_the_oracle(
            events in proptest::collection::vec(event(), 1..50),
            seed in any::<u64>(),
            lanes in any::<u64>(),
            takeovers in 1usize..4,
            max_zombie_steps in 0usize..4,
            epochs_lost in proptest::bool::weighted(0.2),
        ) {
            use crate::sim::{self, Scenario, Sim};
            let inputs = inputs_of(events);
            let records = sim::on_lanes(&inputs, lanes, |n| n as i64 * 1000);
            let mut sim: Sim<RollupDayProcessor> = Sim::new(Inputs::Lanes, records);
            sim.run(|| RollupDayProcessor::new(Config::default()), &Scenario { seed, takeovers, max_zombie_steps, epochs_lost });
            let expected = oracle(&inputs);
            sim.check_folds(&expected)?;
        }
    }
}

mod sleep_night {
    use proptest::prelude::*;
    use vitals_processors::sleep_night::tests::*;
    use vitals_processors::sleep_night::{oracle, Config, SleepNightProcessor};
    use vitals_processors::{Input, Inputs};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)))]

        /// Takeovers at random earlier checkpoints (or from nothing), each owner with its own batch
        /// boundaries and lane interleaving, zombies writing after the takeover, `processor_epochs`
        /// lost now and then: the output partition folded by version and as compaction keeps it both
        /// equal the oracle.
        #[test]
        fn takeovers_zombies_and_compaction_leave_exactly_the_oracle(
            events in proptest::collection::vec(event(), 1..50),
            seed in any::<u64>(),
            lanes in any::<u64>(),
            takeovers in 1usize..4,
            max_zombie_steps in 0usize..4,
            epochs_lost in proptest::bool::weighted(0.2),
        ) {
            use crate::sim::{self, Scenario, Sim};
            let inputs: Vec<Input> = canonical(events).iter().map(to_input).collect();
            let records = sim::on_lanes(&inputs, lanes, |n| n as i64 * 1000);
            let mut sim: Sim<SleepNightProcessor> = Sim::new(Inputs::Lanes, records);
            sim.run(|| SleepNightProcessor::new(Config::default()), &Scenario { seed, takeovers, max_zombie_steps, epochs_lost });
            let expected = oracle(&inputs);
            sim.check_folds(&expected)?;
        }
    }
}

mod session_impact {
    use proptest::prelude::*;
    use vitals_processors::session_impact::tests::*;
    use vitals_processors::session_impact::{oracle, Config, SessionImpactProcessor};
    use vitals_processors::Inputs;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)))]

        /// Takeovers at random earlier checkpoints (or from nothing), each owner with its own batch
        /// boundaries and lane interleaving, zombies writing after the takeover, `processor_epochs`
        /// lost now and then: the output partition folded by version and as compaction keeps it both
        /// equal the oracle. Stream time is the log timestamps' running maximum, so timers fire
        /// at other points for each owner.
        #[test]
        fn takeovers_zombies_and_compaction_leave_exactly_the_oracle(
            events in proptest::collection::vec(event(), 1..60),
            seed in any::<u64>(),
            lanes in any::<u64>(),
            step_min in 1i64..20,
            takeovers in 1usize..4,
            max_zombie_steps in 0usize..4,
            epochs_lost in proptest::bool::weighted(0.2),
        ) {
            use crate::sim::{self, Scenario, Sim};
            let inputs = inputs_of(events);
            let records = sim::on_lanes(&inputs, lanes, |n| base() + n as i64 * step_min * 60_000);
            let mut sim: Sim<SessionImpactProcessor> = Sim::new(Inputs::Lanes, records);
            sim.run(|| SessionImpactProcessor::new(Config::default()), &Scenario { seed, takeovers, max_zombie_steps, epochs_lost });
            let expected = oracle(&inputs, sim.stream_time_ms);
            sim.check_folds(&expected)?;
        }
    }
}

mod product_impact {
    use proptest::prelude::*;
    use vitals_processors::product_impact::tests::*;
    use vitals_processors::product_impact::{oracle, Config, ProductImpactProcessor};
    use vitals_processors::{Input, Inputs};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)))]

        /// Takeovers at random earlier checkpoints (or from nothing), each owner with its own batch
        /// boundaries and lane interleaving, zombies writing after the takeover, `processor_epochs`
        /// lost now and then: the output partition folded by version and as compaction keeps it both
        /// equal the oracle. The input is session_impact's output: versions, re-emissions and
        /// retractions in any order.
        #[test]
        fn takeovers_zombies_and_compaction_leave_exactly_the_oracle(
            recs in proptest::collection::vec(rec(), 1..50),
            replay_every in 2usize..6,
            seed in any::<u64>(),
            takeovers in 1usize..4,
            max_zombie_steps in 0usize..4,
            epochs_lost in proptest::bool::weighted(0.2),
        ) {
            use crate::sim::{self, Scenario, Sim};
            let records = impacts_of(recs, replay_every);
            let inputs: Vec<Input> = records.iter().cloned().map(Input::SessionImpact).collect();
            let log = sim::on_lanes(&inputs, 0, |n| n as i64 * 1000);
            let mut sim: Sim<ProductImpactProcessor> = Sim::new(Inputs::SessionImpacts, log);
            sim.run(|| ProductImpactProcessor::new(Config::default()), &Scenario { seed, takeovers, max_zombie_steps, epochs_lost });
            let expected = oracle(&records);
            sim.check_folds(&expected)?;
        }
    }
}

mod readiness_baseline {
    use proptest::prelude::*;
    use vitals_processors::readiness_baseline::tests::*;
    use vitals_processors::readiness_baseline::{oracle, ReadinessBaselineProcessor};
    use vitals_processors::Inputs;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)))]

        /// Takeovers at random earlier checkpoints, zombies, lost epochs, any lane interleaving:
        /// the output folded by version and as compaction keeps it both equal the oracle.
        #[test]
        fn takeovers_zombies_and_compaction_leave_exactly_the_oracle(
            events in proptest::collection::vec(event(), 1..50),
            seed in any::<u64>(),
            lanes in any::<u64>(),
            takeovers in 1usize..4,
            max_zombie_steps in 0usize..4,
            epochs_lost in proptest::bool::weighted(0.2),
        ) {
            use crate::sim::{self, Scenario, Sim};
            let inputs = inputs_of(events);
            let records = sim::on_lanes(&inputs, lanes, |n| n as i64 * 1000);
            let mut sim: Sim<ReadinessBaselineProcessor> = Sim::new(Inputs::Lanes, records);
            sim.run(|| ReadinessBaselineProcessor, &Scenario { seed, takeovers, max_zombie_steps, epochs_lost });
            let expected = oracle(&inputs);
            sim.check_folds(&expected)?;
        }
    }
}
