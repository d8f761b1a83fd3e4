//! `vitals offsets show [<processor>]`: where each processor group stands, per input partition —
//! the offsets its tasks last committed to the group (the runtime commits its checkpoints'
//! offsets every few seconds, informational only), the partition's high watermark, the lag, the
//! member that owns it, the task's epoch and its newest snapshot.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::app;
use crate::config::Config;

/// One input partition of one processor group.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PartitionRow {
    pub processor: String,
    pub topic: String,
    pub partition: i32,
    /// The next offset the group has committed (`None`: nothing committed yet).
    pub committed: Option<i64>,
    pub high: i64,
    /// `high - committed` (all of it when nothing is committed).
    pub lag: i64,
    /// The member owning the partition (its client id), if the group is running.
    pub owner: Option<String>,
    /// The epoch of the task's current (or last) owner.
    pub epoch: Option<i64>,
    /// The newest snapshot's next offset of this topic and its age in seconds.
    pub snapshot: Option<(i64, i64)>,
}

/// Every row for `only` (a processor name) or for every registered processor.
pub async fn show(cfg: &Config, only: Option<&str>) -> anyhow::Result<Vec<PartitionRow>> {
    let infos = match only {
        Some(n) => vec![vitals_runtime::find(n).with_context(|| {
            format!("no processor {n:?}; registered: {}", vitals_runtime::registry().iter().map(|p| p.name).collect::<Vec<_>>().join(", "))
        })?],
        None => vitals_runtime::registry(),
    };
    let pool = app::pg_pool(cfg).await?;
    let topics = app::topics(cfg);
    let mut rows = Vec::new();
    for info in infos {
        let task = format!("{}{}", cfg.kafka.topic_prefix, info.name);
        let epochs: BTreeMap<i32, i64> =
            sqlx::query_as::<_, (i32, i64)>("SELECT partition, epoch FROM processor_epochs WHERE processor = $1")
                .bind(&task)
                .fetch_all(&pool)
                .await?
                .into_iter()
                .collect();
        let snaps: BTreeMap<i32, (serde_json::Value, i64)> = sqlx::query_as::<_, (i32, serde_json::Value, f64)>(
            "SELECT partition, offsets, EXTRACT(EPOCH FROM now() - created_at)::float8 FROM processor_snapshots WHERE processor = $1",
        )
        .bind(&task)
        .fetch_all(&pool)
        .await?
        .into_iter()
        .map(|(p, o, age)| (p, (o, age as i64)))
        .collect();
        let (cfg2, group, inputs) = (cfg.clone(), app::processor_group(cfg, info.name), info.inputs.topics(&topics));
        let kafka = tokio::task::spawn_blocking(move || group_positions(&cfg2, &group, &inputs)).await.context("offsets task")??;
        for (topic, partition, committed, high, owner) in kafka {
            let snapshot = snaps.get(&partition).and_then(|(o, age)| o.get(&topic).and_then(|v| v.as_i64()).map(|n| (n, *age)));
            rows.push(PartitionRow {
                processor: info.name.to_owned(),
                lag: (high - committed.unwrap_or(0)).max(0),
                topic,
                partition,
                committed,
                high,
                owner,
                epoch: epochs.get(&partition).copied(),
                snapshot,
            });
        }
    }
    pool.close().await;
    Ok(rows)
}

pub type Position = (String, i32, Option<i64>, i64, Option<String>);

/// (topic, partition, committed, high, owner) of every input partition of `group`.
pub fn group_positions(cfg: &Config, group: &str, inputs: &[String]) -> anyhow::Result<Vec<Position>> {
    // A consumer of the group that never subscribes: it reads the group's commits, joins nothing.
    let c: BaseConsumer = app::kafka_base(cfg, &app::client_id("offsets", None))
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating a Kafka client")?;
    let timeout = Duration::from_secs(10);
    let md = c.fetch_metadata(None, timeout).context("fetching metadata")?;
    let mut tpl = TopicPartitionList::new();
    for t in inputs {
        let Some(mt) = md.topics().iter().find(|m| m.name() == t) else {
            anyhow::bail!("topic {t} does not exist (run `vitals topics create`)")
        };
        for p in mt.partitions() {
            tpl.add_partition(t, p.id());
        }
    }
    let committed = c.committed_offsets(tpl.clone(), timeout).context("reading the group's committed offsets")?;
    let (owners, sole) = owners(&c, group);
    let mut out = Vec::new();
    for el in tpl.elements() {
        let (t, p) = (el.topic().to_owned(), el.partition());
        let done = committed.find_partition(&t, p).and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
        let (_, high) = c.fetch_watermarks(&t, p, timeout).with_context(|| format!("watermarks of {t}/{p}"))?;
        let owner = owners.get(&(t.clone(), p)).cloned().or_else(|| sole.clone());
        out.push((t, p, done, high, owner));
    }
    Ok(out)
}

/// The member owning each partition, from the group's member assignments, and the group's only
/// member if it has one (it owns every partition: the fallback where the broker does not describe
/// assignments, as nisshi does not). Empty when the group is not running.
fn owners(c: &BaseConsumer, group: &str) -> (BTreeMap<(String, i32), String>, Option<String>) {
    let mut out = BTreeMap::new();
    let Ok(list) = c.fetch_group_list(Some(group), Duration::from_secs(10)) else { return (out, None) };
    let mut members = Vec::new();
    for g in list.groups() {
        for m in g.members() {
            let name = member_name(m.client_id(), m.id());
            for (t, p) in m.assignment().map(assignment).unwrap_or_default() {
                out.insert((t, p), name.clone());
            }
            members.push(name);
        }
    }
    let sole = (members.len() == 1).then(|| members.remove(0));
    (out, sole)
}

/// A member's client id, or when the broker does not describe it (nisshi), what its member id
/// starts with: brokers name members `<client id>-<uuid>`.
pub fn member_name(client_id: &str, member_id: &str) -> String {
    if !client_id.is_empty() {
        return client_id.to_owned();
    }
    match member_id.len().checked_sub(37) {
        Some(cut)
            if member_id.is_char_boundary(cut)
                && member_id[cut..].starts_with('-')
                && uuid::Uuid::parse_str(&member_id[cut + 1..]).is_ok() =>
        {
            member_id[..cut].to_owned()
        }
        _ => member_id.to_owned(),
    }
}

/// The partitions of a consumer-protocol assignment (version, [topic, [partition]], user data);
/// what does not parse yields nothing.
pub fn assignment(b: &[u8]) -> Vec<(String, i32)> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    fn i16_(b: &mut &[u8]) -> Option<i16> {
        Some(i16::from_be_bytes(take(b, 2)?.try_into().ok()?))
    }
    fn i32_(b: &mut &[u8]) -> Option<i32> {
        Some(i32::from_be_bytes(take(b, 4)?.try_into().ok()?))
    }
    let parse = |mut b: &[u8]| -> Option<Vec<(String, i32)>> {
        let mut out = Vec::new();
        i16_(&mut b)?;
        for _ in 0..i32_(&mut b)?.max(0) {
            let len = i16_(&mut b)?;
            let topic = String::from_utf8(take(&mut b, usize::try_from(len).ok()?)?.to_vec()).ok()?;
            for _ in 0..i32_(&mut b)?.max(0) {
                out.push((topic.clone(), i32_(&mut b)?));
            }
        }
        Some(out)
    };
    parse(b).unwrap_or_default()
}

/// The rows as a table, one line per partition, and a total lag per processor.
pub fn render(rows: &[PartitionRow]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let w = rows.iter().map(|r| r.topic.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(
        out,
        "{:<16} {:<w$} {:>4} {:>10} {:>10} {:>8} {:>6} {:>18}  owner",
        "processor", "topic", "part", "committed", "high", "lag", "epoch", "snapshot (off, age)"
    );
    let mut total: BTreeMap<&str, i64> = BTreeMap::new();
    for r in rows {
        *total.entry(&r.processor).or_default() += r.lag;
        let committed = r.committed.map_or("-".into(), |o| o.to_string());
        let epoch = r.epoch.map_or("-".into(), |e| e.to_string());
        let snap = r.snapshot.map_or("-".into(), |(o, age)| format!("{o}, {age}s ago"));
        let _ = writeln!(
            out,
            "{:<16} {:<w$} {:>4} {:>10} {:>10} {:>8} {:>6} {:>18}  {}",
            r.processor,
            r.topic,
            r.partition,
            committed,
            r.high,
            r.lag,
            epoch,
            snap,
            r.owner.as_deref().unwrap_or("-")
        );
    }
    for (p, lag) in total {
        let _ = writeln!(out, "{p}: total lag {lag}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_named_by_its_client_id_or_its_member_id_prefix() {
        assert_eq!(member_name("vitals-process-x-h-1", "whatever"), "vitals-process-x-h-1");
        assert_eq!(member_name("", "vitals-process-x-h-1-6f1c9a2e-8d7b-4c3a-9e5f-0a1b2c3d4e5f"), "vitals-process-x-h-1");
        assert_eq!(member_name("", "no-uuid-here"), "no-uuid-here");
        assert_eq!(member_name("", "é"), "é");
    }

    #[test]
    fn an_assignment_parses_and_garbage_yields_nothing() {
        let mut b = vec![0, 0, 0, 0, 0, 2];
        for (t, ps) in [("hot", vec![0i32, 3]), ("cold", vec![1])] {
            b.extend((t.len() as i16).to_be_bytes());
            b.extend(t.as_bytes());
            b.extend((ps.len() as i32).to_be_bytes());
            for p in ps {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend(0i32.to_be_bytes());
        assert_eq!(assignment(&b), vec![("hot".into(), 0), ("hot".into(), 3), ("cold".into(), 1)]);
        assert!(assignment(&b[..b.len() - 7]).is_empty(), "truncated");
        assert!(assignment(&[]).is_empty());
        assert!(assignment(&[0, 0, 0x7f, 0xff, 0xff, 0xff]).is_empty(), "a huge count with no bytes behind it");
        assert!(assignment(&[0, 0, 0, 0, 0, 1, 0xff, 0xff]).is_empty(), "a negative topic length");
    }
}
