//! What every writer and reader of the dead-letter topic shares beside the [`DeadLetter`] record
//! itself: the headers it rides with, the header a replayed record carries, and the per-reason
//! counter that processors and sinks render on `/metrics`.
//!
//! [`DeadLetter`]: crate::DeadLetter

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Headers of a dead letter: where the record came from and why it was refused.
pub const SOURCE_TOPIC_HEADER: &str = "vitals-source-topic";
pub const SOURCE_PARTITION_HEADER: &str = "vitals-source-partition";
pub const SOURCE_OFFSET_HEADER: &str = "vitals-source-offset";
pub const REASON_HEADER: &str = "vitals-reason";

/// The headers of a dead letter of the record at `topic` [`partition`] `offset`, refused for
/// `reason`, of `user` when known (so that it counts against that user's freshness).
pub fn headers(topic: &str, partition: i32, offset: i64, reason: &str, user: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![
        (SOURCE_TOPIC_HEADER, topic.to_owned()),
        (SOURCE_PARTITION_HEADER, partition.to_string()),
        (SOURCE_OFFSET_HEADER, offset.to_string()),
        (REASON_HEADER, reason.to_owned()),
    ];
    if let Some(u) = user {
        h.push((crate::topics::USER_HEADER, u.to_owned()));
    }
    h
}

/// The value of [`crate::topics::DEAD_LETTERS_HEADER`] on a progress marker: the dead letters of
/// the marker's user in its interval, `partition:offset:code,…` of the dead-letter topic.
pub fn announce(dead: &[(i32, i64, &str)]) -> String {
    dead.iter().map(|(p, o, code)| format!("{p}:{o}:{code}")).collect::<Vec<_>>().join(",")
}

/// The dead letters an [`announce`] value names (malformed entries are skipped).
pub fn announced(value: &str) -> Vec<(i32, i64, String)> {
    value
        .split(',')
        .filter_map(|one| {
            let mut it = one.splitn(3, ':');
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.to_owned()))
        })
        .collect()
}

/// Header of a record written back by `vitals dlq replay`: the source record it is a copy of,
/// `<topic>:<partition>:<offset>` (Kafka topic names never contain `:`). Replay finds its own
/// earlier writes by it.
pub const REPLAY_OF_HEADER: &str = "vitals-replay-of";
/// Header of a replayed record: the dead letter it was replayed from, `<partition>:<offset>` of
/// the dead-letter topic.
pub const REPLAY_DLQ_HEADER: &str = "vitals-replay-dlq";

/// The value of [`REPLAY_OF_HEADER`] for a source record.
pub fn replay_of(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}:{partition}:{offset}")
}

/// Dead letters counted by (stage, code), e.g. (`processor:rollup_day`, `undecodable`). Both
/// labels come from small fixed sets (the stage names a component, the code is a stable reason
/// code), never from the free-text reason, so the series stay few.
#[derive(Debug, Default)]
pub struct DeadLetterCounts(Mutex<BTreeMap<(String, String), u64>>);

/// The metric family [`DeadLetterCounts`] renders.
pub const DEAD_LETTERS_METRIC: &str = "vitals_dead_letters_total";

impl DeadLetterCounts {
    pub fn add(&self, stage: &str, code: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((stage.to_owned(), code.to_owned())).or_default() += 1;
    }

    /// The count of one (stage, code).
    pub fn get(&self, stage: &str, code: &str) -> u64 {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(stage.to_owned(), code.to_owned())).copied().unwrap_or(0)
    }

    /// The family's `# HELP` and `# TYPE` lines (once per exposition, before any sample).
    pub fn render_header(out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {DEAD_LETTERS_METRIC} Records sent to the dead-letter topic, by the stage that refused them and the reason code."
        );
        let _ = writeln!(out, "# TYPE {DEAD_LETTERS_METRIC} counter");
    }

    /// One sample line per (stage, code) counted so far.
    pub fn render_samples(&self, out: &mut String) {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for ((stage, code), n) in m.iter() {
            let _ = writeln!(out, "{DEAD_LETTERS_METRIC}{{stage=\"{}\",code=\"{}\"}} {n}", label(stage), label(code));
        }
    }
}

/// A Prometheus label value, escaped (backslash, double quote, newline).
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_markers_announcement_reads_back_what_it_names() {
        let value = announce(&[(0, 7, "undecodable"), (3, 12, "misrouted")]);
        assert_eq!(value, "0:7:undecodable,3:12:misrouted");
        assert_eq!(announced(&value), [(0, 7, "undecodable".to_owned()), (3, 12, "misrouted".to_owned())]);
        assert_eq!(announced("x:1:a,2:3:b"), [(2, 3, "b".to_owned())], "a malformed entry is skipped");
    }

    #[test]
    fn counts_render_one_line_per_stage_and_code() {
        let c = DeadLetterCounts::default();
        c.add("processor:rollup_day", "undecodable");
        c.add("processor:rollup_day", "undecodable");
        c.add("sink:postgres", "bad \"q\"");
        let mut out = String::new();
        DeadLetterCounts::render_header(&mut out);
        c.render_samples(&mut out);
        assert_eq!(c.get("processor:rollup_day", "undecodable"), 2);
        assert!(out.contains("vitals_dead_letters_total{stage=\"processor:rollup_day\",code=\"undecodable\"} 2\n"), "{out}");
        assert!(out.contains("vitals_dead_letters_total{stage=\"sink:postgres\",code=\"bad \\\"q\\\"\"} 1\n"), "{out}");
        assert_eq!(out.matches("# TYPE").count(), 1);
    }

    #[test]
    fn replay_of_names_the_source_record() {
        assert_eq!(replay_of("vitals.health.hot", 3, 42), "vitals.health.hot:3:42");
    }
}
