//! Replays as blue/green versions (issue 11, item 2).
//!
//! * `vitals replay <processor> --as <version> [--from earliest|<RFC 3339 time>|<offsets file>]`
//!   runs the processor as a new line — its own consumer group, output topic
//!   (`…out.<name>.<version>`), epochs, snapshots and state directory (`<name>@<version>`) — and a
//!   sink of that topic into a shadow table beside the live one (`proj_<name>__<version>`), with
//!   a progress display per input partition. Exactly once like any processor: killed at any
//!   moment and started again, it resumes from its checkpoints; a task that has read nothing
//!   starts where the first start resolved `--from` to (kept in `projection_replays`).
//! * `vitals promote <processor> <version>` switches reads: the API serves the promoted
//!   version's table and freshness, looked up in the snapshot each read is made in. It refuses a
//!   version behind the one it replaces (some user's progress lower) unless forced.
//! * `vitals retire <processor> <version>` removes a version that is not served: its table,
//!   topic, consumer groups, epochs, snapshots, progress and local state, after confirmation.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use vitals_schemas::projection::{version, BuiltFrom, Projection, BASE_VERSION};
use vitals_schemas::topics::{TopicRole, TopicSpec};

use crate::app::{self, Line};
use crate::config::Config;

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq)]
pub enum From {
    Earliest,
    /// The first record of each input partition at or after this time (the broker's
    /// timestamp index).
    Time(chrono::DateTime<chrono::Utc>),
    /// A JSON file: `[{"topic", "partition", "offset"}]`; `vitals offsets show --json` rows
    /// (with `committed`) are read too.
    Offsets(std::path::PathBuf),
}

impl std::str::FromStr for From {
    type Err = String;
    fn from_str(s: &str) -> Result<From, String> {
        if s == "earliest" {
            return Ok(From::Earliest);
        }
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            return Ok(From::Time(t.with_timezone(&chrono::Utc)));
        }
        let path = std::path::PathBuf::from(s);
        if path.is_file() {
            return Ok(From::Offsets(path));
        }
        Err(format!("--from `{s}`: neither `earliest`, an RFC 3339 time (2026-11-30T00:00:00Z) nor an offsets file"))
    }
}

/// One input partition's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartOffset {
    pub topic: String,
    pub partition: i32,
    #[serde(alias = "committed")]
    pub offset: i64,
}

/// How the progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Display {
    /// Redrawn in place on a terminal, plain lines otherwise.
    Auto,
    Plain,
    Tty,
}

pub struct ReplayArgs {
    pub processor: String,
    pub version: String,
    /// Where a new version starts (`None`: the beginning, or where it was started from).
    pub from: Option<From>,
    /// Exit once the shadow table has caught up (the processor's input and the sink's).
    pub until_caught_up: bool,
    pub display: Display,
    /// How often the progress is printed.
    pub every: Duration,
    /// Test hook, as `vitals process --crash-after-produce`.
    pub crash_after_produce: Option<u64>,
}

/// The registered processor `name` and its projection written as `v`.
fn resolve(name: &str, v: &str) -> anyhow::Result<(vitals_runtime::Registered, Projection)> {
    let Some(info) = vitals_runtime::find(name) else {
        let known: Vec<&str> = vitals_runtime::registry().iter().map(|p| p.name).collect();
        bail!("unknown processor `{name}` (known: {})", known.join(", "));
    };
    version::check(v).map_err(anyhow::Error::msg)?;
    Ok((info, info.output.at(v)))
}

/// The line `vitals process <processor> --as <v>` runs: a version a replay started, with its
/// start offsets.
pub async fn line(cfg: &Config, processor: &str, v: &str) -> anyhow::Result<Line> {
    let (info, p) = resolve(processor, v)?;
    let Some(v) = p.version else { return Ok(Line::default()) };
    let pool = app::pg_pool(cfg).await?;
    let row: Option<sqlx::types::Json<Vec<StartOffset>>> =
        sqlx::query_scalar("SELECT start_offsets FROM projection_replays WHERE projection = $1 AND version = $2")
            .bind(info.name)
            .bind(v)
            .fetch_optional(&pool)
            .await?;
    let Some(start) = row else { bail!("{} has no version {v}: `vitals replay {} --as {v}` starts it", info.name, info.name) };
    Ok(Line { version: Some(v.to_owned()), start: start.0.into_iter().map(|o| ((o.topic, o.partition), o.offset)).collect() })
}

/// The version of `projection` reads are served from (`v1` unless one was promoted).
pub async fn promoted(pool: &PgPool, projection: &str) -> anyhow::Result<String> {
    let v: Option<String> =
        sqlx::query_scalar("SELECT promoted FROM projection_versions WHERE projection = $1").bind(projection).fetch_optional(pool).await?;
    Ok(v.unwrap_or_else(|| BASE_VERSION.to_owned()))
}

/// Whether the base version of `projection` was retired.
pub async fn base_retired(pool: &PgPool, projection: &str) -> anyhow::Result<bool> {
    let r: Option<bool> = sqlx::query_scalar("SELECT base_retired FROM projection_versions WHERE projection = $1")
        .bind(projection)
        .fetch_optional(pool)
        .await?;
    Ok(r.unwrap_or(false))
}

/// The projections whose base version was retired.
pub async fn retired_bases(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT projection FROM projection_versions WHERE base_retired").fetch_all(pool).await?)
}

/// Input topic → partition count of `topics`.
async fn partitions(cfg: &Config, topics: &[String]) -> anyhow::Result<BTreeMap<String, i32>> {
    Ok(app::topic_partitions(cfg, topics).await?.into_iter().map(|(t, n)| (t, n as i32)).collect())
}

/// The start offsets `from` means for the processor's input `topics`.
async fn start_offsets(cfg: &Config, processor: &str, topics: &[String], from: &From) -> anyhow::Result<Vec<StartOffset>> {
    match from {
        From::Earliest => Ok(Vec::new()),
        From::Offsets(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let known = partitions(cfg, topics).await?;
            let offsets =
                parse_offsets(&text, processor, &cfg.kafka.topic_prefix, &known).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            // An offset outside what the partition holds would start somewhere else than asked:
            // before its first record (deleted by retention) is a gap, past its end a wait for
            // records that may never come.
            let client: BaseConsumer = app::kafka_base(cfg, "vitals-replay-offsets").set("group.id", "vitals-replay-offsets").create()?;
            let checked = offsets.clone();
            let bounds = tokio::task::spawn_blocking(move || {
                checked
                    .iter()
                    .map(|o| client.fetch_watermarks(&o.topic, o.partition, Duration::from_secs(10)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?
            .context("reading the partitions' watermarks")?;
            let pool = app::pg_pool(cfg).await?;
            for (o, (low, high)) in offsets.iter().zip(bounds) {
                // Records deleted from the lane are read from the archive, if it holds them.
                if o.offset < low && !crate::archive::holds(&pool, &o.topic, o.partition, o.offset, low).await? {
                    bail!("{}: {}/{}: offset {} is before the partition's first record {low} (the records before it were deleted by retention), and the archive does not hold them", path.display(), o.topic, o.partition, o.offset);
                }
                if o.offset > high {
                    bail!("{}: {}/{}: offset {} is past the partition's end {high}", path.display(), o.topic, o.partition, o.offset);
                }
            }
            Ok(offsets)
        }
        From::Time(at) => {
            let known = partitions(cfg, topics).await?;
            let client: BaseConsumer = app::kafka_base(cfg, "vitals-replay-offsets").set("group.id", "vitals-replay-offsets").create()?;
            let ms = at.timestamp_millis();
            let found = tokio::task::spawn_blocking(move || {
                let mut tpl = TopicPartitionList::new();
                for (t, n) in &known {
                    for p in 0..*n {
                        tpl.add_partition_offset(t, p, Offset::Offset(ms))?;
                    }
                }
                let found = client.offsets_for_times(tpl, Duration::from_secs(30)).context("ListOffsets by time")?;
                let mut out = Vec::new();
                for el in found.elements() {
                    let (low, high) = client.fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(10))?;
                    let offset = match el.offset() {
                        Offset::Offset(o) => o,
                        // Nothing at or after the time: from the partition's end.
                        _ => high,
                    };
                    out.push((StartOffset { topic: el.topic().to_owned(), partition: el.partition(), offset }, low));
                }
                anyhow::Ok(out)
            })
            .await??;
            // The lane's first record is the answer: records before it (deleted) may be at or
            // after the time too, and the archive has them.
            let pool = app::pg_pool(cfg).await?;
            let s3 = app::s3_client(cfg)?;
            let mut out = Vec::new();
            for (mut o, low) in found {
                if low > 0 && o.offset <= low {
                    // Records before the lane's start are only in the archive: it must hold every
                    // one of them, or the replay could start later than asked.
                    let archived_from = crate::archive::start(&pool, &o.topic, o.partition).await?;
                    let earlier = crate::archive::offset_for_time(&pool, &s3, &o.topic, o.partition, ms, low)
                        .await
                        .context("looking up the time in the archive")?;
                    let from = earlier.unwrap_or(low);
                    // (All of it from the lane's first offset: where the time falls among records
                    // that were lost cannot be known, whether or not an archived one is found.)
                    let whole = archived_from == Some(0) && crate::archive::holds(&pool, &o.topic, o.partition, 0, low).await?;
                    if !whole {
                        bail!(
                            "{}/{}: the lane starts at offset {low}, and the archive does not hold every record before it from {at} on ({}): a replay from this time would miss records; replay --from an offsets file at or after what is held",
                            o.topic,
                            o.partition,
                            match archived_from {
                                None => "it was never archived".to_owned(),
                                Some(0) => "it has a gap".to_owned(),
                                Some(s) => format!("archiving began at offset {s}"),
                            }
                        );
                    }
                    o.offset = from;
                }
                out.push(o);
            }
            Ok(out)
        }
    }
}

/// The start offsets an offsets file names for `processor`, whose input topics (full names) and
/// their partition counts are `known`. The file is a JSON array of `{"topic", "partition",
/// "offset"}`; the rows `vitals offsets show --json` prints are read as they are: their
/// `committed` is the offset, a `null` one (nothing committed) leaves the partition at its
/// beginning, and rows of other processors are skipped. Topics may be named without
/// `kafka.topic_prefix`. A partition the file does not name starts at its beginning.
pub fn parse_offsets(text: &str, processor: &str, prefix: &str, known: &BTreeMap<String, i32>) -> Result<Vec<StartOffset>, String> {
    const SHAPE: &str =
        r#"expected a JSON array of {"topic", "partition", "offset"} (or the rows of `vitals offsets show <processor> --json`)"#;
    let rows: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| format!("{SHAPE}: {e}"))?;
    let inputs = || known.keys().cloned().collect::<Vec<_>>().join(", ");
    let (mut out, mut others, mut seen) = (Vec::<StartOffset>::new(), std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for (i, row) in rows.iter().enumerate() {
        let Some(obj) = row.as_object() else { return Err(format!("row {i}: {SHAPE}")) };
        if let Some(p) = obj.get("processor") {
            let p = p.as_str().ok_or_else(|| format!("row {i}: `processor` is not a string"))?;
            if p != processor {
                others.insert(p.to_owned());
                continue;
            }
        }
        let topic = obj.get("topic").and_then(|t| t.as_str()).ok_or_else(|| format!("row {i}: no `topic` string; {SHAPE}"))?;
        let partition = obj.get("partition").and_then(|p| p.as_i64()).ok_or_else(|| format!("row {i}: no integer `partition`; {SHAPE}"))?;
        let offset = match (obj.get("offset"), obj.get("committed")) {
            (Some(o), _) | (None, Some(o)) => o,
            (None, None) => return Err(format!("row {i}: no `offset` (or `committed`); {SHAPE}")),
        };
        let full = if known.contains_key(topic) { topic.to_owned() } else { format!("{prefix}{topic}") };
        let Some(n) = known.get(&full) else {
            return Err(format!("row {i}: topic `{topic}` is not an input of {processor} (inputs: {})", inputs()));
        };
        if partition < 0 || partition >= i64::from(*n) {
            return Err(format!("row {i}: {full} has no partition {partition} (it has {n})"));
        }
        let partition = partition as i32;
        if !seen.insert((full.clone(), partition)) {
            return Err(format!("row {i}: {full}/{partition} is named twice"));
        }
        if offset.is_null() {
            continue;
        }
        let offset = offset.as_i64().ok_or_else(|| format!("row {i}: {full}/{partition}: offset {offset} is not an integer"))?;
        if offset < 0 {
            return Err(format!("row {i}: {full}/{partition}: offset {offset} is negative"));
        }
        out.push(StartOffset { topic: full, partition, offset });
    }
    if seen.is_empty() && !others.is_empty() {
        return Err(format!(
            "no row is of {processor} (the file has rows of {}): `vitals offsets show {processor} --json` writes its own",
            others.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(out)
}

/// The output topic of `p`, as a spec to create and register.
fn spec(cfg: &Config, p: Projection) -> TopicSpec {
    TopicSpec { name: p.topic(&app::topics(cfg)), role: TopicRole::Projection, value_schema: p.descriptor.avro() }
}

/// How `from` is recorded in `projection_replays`.
fn spec_of(from: &From) -> String {
    match from {
        From::Earliest => "earliest".to_owned(),
        From::Time(t) => t.to_rfc3339(),
        From::Offsets(p) => p.display().to_string(),
    }
}

/// Records the replay (or finds the one to resume) and returns its start offsets. A version
/// resumes from its checkpoints: a `--from` other than the one it was started from is refused
/// rather than ignored, and of two first starts at once both use the one recorded first.
async fn begin(
    pool: &PgPool,
    cfg: &Config,
    name: &str,
    v: &str,
    input_topics: &[String],
    from: Option<&From>,
) -> anyhow::Result<(Vec<StartOffset>, Option<String>)> {
    let recorded = || async {
        let row: Option<(String, sqlx::types::Json<Vec<StartOffset>>, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT from_spec, start_offsets, started_at FROM projection_replays WHERE projection = $1 AND version = $2")
                .bind(name)
                .bind(v)
                .fetch_optional(pool)
                .await?;
        anyhow::Ok(row)
    };
    let check = |spec: &str| match from.map(spec_of) {
        Some(asked) if asked != spec => {
            bail!("{name} {v} was started from {spec} and resumes from its checkpoints, not from {asked}: leave out --from, or `vitals retire {name} {v}` and replay it again")
        }
        _ => Ok(()),
    };
    if let Some((spec, offsets, at)) = recorded().await? {
        check(&spec)?;
        return Ok((
            offsets.0,
            Some(format!("resuming {name} {v} (started {} from {spec}) from its checkpoints", at.format("%Y-%m-%d %H:%M:%S UTC"))),
        ));
    }
    let from = from.unwrap_or(&From::Earliest);
    let offsets = start_offsets(cfg, name, input_topics, from).await?;
    sqlx::query(
        "INSERT INTO projection_replays (projection, version, from_spec, start_offsets) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(v)
    .bind(spec_of(from))
    .bind(sqlx::types::Json(&offsets))
    .execute(pool)
    .await?;
    // Another first start may have recorded its own in between: the recorded one holds.
    let (spec, offsets, _) = recorded().await?.context("the replay's record vanished")?;
    check(&spec)?;
    Ok((offsets.0, None))
}

/// Runs the replay until stopped (or caught up, with `until_caught_up`).
pub async fn replay(cfg: &Config, args: ReplayArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let (info, projection) = resolve(&args.processor, &args.version)?;
    if projection.version.is_none() {
        bail!("{BASE_VERSION} is the base version of {}: replay as another (e.g. --as v2)", info.name);
    }
    let v = args.version.as_str();
    let pool = app::pg_ready(cfg, &stop).await?;
    let t = app::topics(cfg);
    let input_topics = info.inputs.topics(&t);
    let (start, resumed) = begin(&pool, cfg, info.name, v, &input_topics, args.from.as_ref()).await?;
    let mut out = Out::new(args.display);
    match &resumed {
        Some(line) => out.line(line),
        None => out.line(&format!("replaying {} as {v} from {}", info.name, describe(args.from.as_ref().unwrap_or(&From::Earliest)))),
    }
    let spec = spec(cfg, projection);
    app::create_specs(cfg, std::slice::from_ref(&spec)).await.context("creating the version's output topic")?;
    app::register_specs(cfg, std::slice::from_ref(&spec)).await.context("registering the version's output schema")?;
    let line = Line { version: Some(v.to_owned()), start: start.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect() };
    let metrics = Arc::new(vitals_runtime::metrics::RuntimeMetrics::default());
    let sink_metrics = Arc::new(vitals_sinks::runner::SinkMetrics::default());
    let mut processor = {
        let (cfg, stop, metrics, line, name) = (cfg.clone(), Arc::clone(&stop), Arc::clone(&metrics), line.clone(), info.name);
        let crash = args.crash_after_produce;
        tokio::spawn(async move { app::process_line(&cfg, name, &line, stop, crash, metrics).await })
    };
    let (sink_name, sink_group) = app::version_sink(cfg, projection.key());
    let mut sink = {
        let (cfg, stop, metrics, names) = (cfg.clone(), Arc::clone(&stop), Arc::clone(&sink_metrics), (sink_name.clone(), sink_group));
        // A shadow table: nobody watches it live.
        tokio::spawn(async move { app::sink_of(&cfg, vec![projection], names, stop, metrics, Box::new(|_| {})).await })
    };
    let n_partitions = partitions(cfg, &input_topics).await?;
    let expected: usize = n_partitions.values().map(|n| *n as usize).sum();
    let first: BTreeMap<(String, i32), i64> = start.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
    let mut view = Progress::new(info.name, v, first, expected);
    let output = spec.name.clone();
    let watermarks: BaseConsumer = app::kafka_base(cfg, "vitals-replay-watermarks").set("group.id", "vitals-replay-watermarks").create()?;
    let watermarks = Arc::new(watermarks);
    let mut tick = tokio::time::interval(args.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (A finished task's handle is not polled again: that panics.)
    let (mut processor_done, mut sink_done) = (false, false);
    let result = loop {
        tokio::select! {
            r = &mut processor, if !processor_done => {
                processor_done = true;
                break r.context("processor task").and_then(|r| r.context("the replay's processor"));
            }
            r = &mut sink, if !sink_done => {
                sink_done = true;
                break r.context("sink task").and_then(|r| r.context("the replay's sink"));
            }
            _ = tick.tick() => {}
        }
        let sink_lag = sink_lag(&pool, &sink_name, &output, n_partitions.values().next().copied().unwrap_or(0), &watermarks).await.ok();
        let caught_up = view.observe(&metrics, sink_lag);
        out.block(&view.render(sink_lag));
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        if caught_up && args.until_caught_up {
            break Ok(());
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        if !processor_done {
            let _ = (&mut processor).await;
        }
        if !sink_done {
            let _ = (&mut sink).await;
        }
    })
    .await;
    result?;
    if view.caught_up {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", projection.table())).fetch_one(&pool).await.unwrap_or(0);
        out.line(&format!(
            "caught up: {} has {rows} rows; `vitals promote {} {v}` serves it (reads and freshness) instead of {}",
            projection.table(),
            info.name,
            promoted(&pool, info.name).await.unwrap_or_else(|_| "?".into())
        ));
    }
    Ok(())
}

fn describe(from: &From) -> String {
    match from {
        From::Earliest => "the beginning of its input".into(),
        From::Time(t) => format!("{} (the first record of each partition at or after it)", t.to_rfc3339()),
        From::Offsets(p) => format!("the offsets in {}", p.display()),
    }
}

/// Records of the version's output topic its sink has not applied yet (high watermarks minus
/// the sink's committed offsets).
async fn sink_lag(pool: &PgPool, sink: &str, topic: &str, partitions: i32, client: &Arc<BaseConsumer>) -> anyhow::Result<i64> {
    let stored = vitals_sinks::postgres::stored_offsets(pool, sink, topic).await?;
    let (client, topic2) = (Arc::clone(client), topic.to_owned());
    let highs: Vec<i64> = tokio::task::spawn_blocking(move || {
        (0..partitions).map(|p| client.fetch_watermarks(&topic2, p, Duration::from_secs(5)).map(|w| w.1)).collect::<Result<Vec<_>, _>>()
    })
    .await??;
    Ok(highs.iter().enumerate().map(|(p, h)| (h - stored.get(&(p as i32)).copied().unwrap_or(0)).max(0)).sum())
}

/// What the display knows of each input partition.
struct Partition {
    /// Where the replay started it (`--from`), and where this run first saw it.
    start: i64,
    taken_at: Option<i64>,
    at: i64,
    end: i64,
    /// Records per second over the last few seconds ([`RATE_WINDOW`]).
    rate: f64,
    seen: std::collections::VecDeque<(Instant, i64)>,
}

/// The window the rates are measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

struct Progress {
    title: String,
    parts: BTreeMap<(String, i32), Partition>,
    expected: usize,
    started: Instant,
    last: Option<Instant>,
    caught_up: bool,
    /// Input partitions taken by this run's tasks so far.
    owned: usize,
}

impl Progress {
    fn new(name: &str, v: &str, start: BTreeMap<(String, i32), i64>, expected: usize) -> Progress {
        let parts = start
            .into_iter()
            .map(|(k, o)| (k, Partition { start: o, taken_at: None, at: o, end: o, rate: 0.0, seen: Default::default() }))
            .collect();
        Progress { title: format!("{name} {v}"), parts, expected, started: Instant::now(), last: None, caught_up: false, owned: 0 }
    }

    /// Reads the runtime's positions; whether everything is caught up (every input partition
    /// owned and at its end, the sink at the output's end).
    fn observe(&mut self, m: &vitals_runtime::metrics::RuntimeMetrics, sink_lag: Option<i64>) -> bool {
        let positions = m.positions.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ends = m.ends.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let taken = m.taken.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let now = Instant::now();
        self.last = Some(now);
        for (k, at) in positions {
            let p = self.parts.entry(k.clone()).or_insert(Partition {
                start: 0,
                taken_at: None,
                at,
                end: at,
                rate: 0.0,
                seen: Default::default(),
            });
            if p.taken_at.is_none() {
                p.taken_at = taken.get(&k).copied().or(Some(at));
            }
            p.seen.push_back((now, at));
            while p.seen.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
                p.seen.pop_front();
            }
            if let Some((t0, a0)) = p.seen.front() {
                let dt = now.duration_since(*t0).as_secs_f64();
                p.rate = if dt >= 0.5 { (at - a0).max(0) as f64 / dt } else { 0.0 };
            }
            p.at = at;
            p.end = ends.get(&k).copied().unwrap_or(p.end).max(at);
        }
        self.owned = self.parts.values().filter(|p| p.taken_at.is_some()).count();
        let all_ends = ends.len() >= self.expected;
        self.caught_up = self.owned >= self.expected && all_ends && self.parts.values().all(|p| p.at >= p.end) && sink_lag == Some(0);
        self.caught_up
    }

    fn render(&self, sink_lag: Option<i64>) -> Vec<String> {
        let (mut done, mut total, mut rate) = (0i64, 0i64, 0f64);
        let mut lines = Vec::new();
        for ((t, p), s) in &self.parts {
            let (d, n) = (s.at - s.start, s.end - s.start);
            done += d;
            total += n;
            rate += s.rate;
            let lag = (s.end - s.at).max(0);
            lines.push(format!(
                "  {t}/{p}  at {} of {}  ({d}/{n}, from {})  lag {lag}  {:.0}/s  eta {}",
                s.at,
                s.end,
                s.taken_at.map_or("-".to_owned(), |o| o.to_string()),
                s.rate,
                eta(lag, s.rate)
            ));
        }
        let pct = if total > 0 { 100.0 * done as f64 / total as f64 } else { 100.0 };
        let lag = total - done;
        let state = if self.caught_up {
            "caught up".to_owned()
        } else if self.owned < self.expected {
            // A restart waits for the group to hand its partitions over (a killed member's
            // session has to time out first).
            format!("waiting for partitions ({} of {} taken)", self.owned, self.expected)
        } else {
            "replaying".to_owned()
        };
        let sink = sink_lag.map_or("sink lag ?".to_owned(), |l| format!("sink lag {l}"));
        let mut out = vec![format!(
            "[{:>5}s] {} {state}: {done}/{total} records ({pct:.1}%)  {rate:.0}/s  lag {lag}  eta {}  {sink}",
            self.started.elapsed().as_secs(),
            self.title,
            eta(lag, rate)
        )];
        out.extend(lines);
        out
    }
}

fn eta(lag: i64, rate: f64) -> String {
    if lag <= 0 {
        "0s".into()
    } else if rate < 0.5 {
        "?".into()
    } else {
        let s = (lag as f64 / rate).ceil() as u64;
        if s >= 3600 {
            format!("{}h{:02}m", s / 3600, s / 60 % 60)
        } else if s >= 60 {
            format!("{}m{:02}s", s / 60, s % 60)
        } else {
            format!("{s}s")
        }
    }
}

/// Where the progress goes: redrawn in place on a terminal, appended as plain lines otherwise.
struct Out {
    tty: bool,
    drawn: usize,
}

impl Out {
    fn new(d: Display) -> Out {
        let tty = match d {
            Display::Auto => std::io::stdout().is_terminal(),
            Display::Plain => false,
            Display::Tty => true,
        };
        Out { tty, drawn: 0 }
    }
    fn line(&mut self, s: &str) {
        self.drawn = 0;
        println!("{s}");
    }
    fn block(&mut self, lines: &[String]) {
        let mut o = std::io::stdout().lock();
        if self.tty && self.drawn > 0 {
            // Up to the block's first line, and clear to the end of the screen.
            let _ = write!(o, "\x1b[{}A\x1b[J", self.drawn);
        }
        for l in lines {
            let _ = writeln!(o, "{l}");
        }
        let _ = o.flush();
        self.drawn = if self.tty { lines.len() } else { 0 };
    }
}

/// Switches reads of `processor`'s projection to `v`, atomically (one transaction, serialised
/// with other promotions by the row lock). Refused when `v` is behind the version served now for
/// some user and input partition, unless `force`.
pub async fn promote(cfg: &Config, processor: &str, v: &str, force: bool) -> anyhow::Result<String> {
    let (info, projection) = resolve(processor, v)?;
    let pool = app::pg_pool(cfg).await?;
    let name = info.name;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO projection_versions (projection, promoted, previous) VALUES ($1, $2, $2) ON CONFLICT DO NOTHING")
        .bind(name)
        .bind(BASE_VERSION)
        .execute(&mut *tx)
        .await?;
    let (current, retired): (String, bool) =
        sqlx::query_as("SELECT promoted, base_retired FROM projection_versions WHERE projection = $1 FOR UPDATE")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
    if current == v {
        return Ok(format!("{name}: {v} is already served"));
    }
    if projection.version.is_none() && retired {
        bail!("{name} {BASE_VERSION} is retired: it cannot be served again");
    }
    if projection.version.is_some() {
        let known: Option<String> = sqlx::query_scalar("SELECT from_spec FROM projection_replays WHERE projection = $1 AND version = $2")
            .bind(name)
            .bind(v)
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            bail!("{name} has no version {v}: `vitals replay {name} --as {v}` makes one");
        }
    }
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(projection.table()).fetch_one(&mut *tx).await?;
    if !exists {
        bail!("{name} {v} has no table yet ({}): let its replay run until it has caught up", projection.table());
    }
    // Behind: a user's input partition whose accepted data the served version reflects and
    // this one does not yet (what freshness compares: `api::freshness`). Versions cut their
    // intervals differently, so their positions differ past the accepted data; only that
    // data counts. Chained projections' inputs are their upstream's records (projection_inputs).
    let cur_key = version::key(name, version::non_base(&current));
    let behind: Vec<(String, i64)> = sqlx::query_as(
        "WITH accepted AS (SELECT user_id, topic, partition, last_offset FROM ingest_user_offsets
                           UNION ALL SELECT user_id, topic, partition, last_offset FROM projection_inputs)
         SELECT a.user_id, a.last_offset + 1 - COALESCE(n.next_offset, 0) FROM accepted a
         JOIN projection_progress c ON c.user_id = a.user_id AND c.projection = $1 AND c.topic = a.topic AND c.partition = a.partition
         LEFT JOIN projection_progress n ON n.user_id = a.user_id AND n.projection = $2 AND n.topic = a.topic AND n.partition = a.partition
         WHERE c.next_offset > a.last_offset AND COALESCE(n.next_offset, 0) <= a.last_offset",
    )
    .bind(&cur_key)
    .bind(projection.key())
    .fetch_all(&mut *tx)
    .await?;
    if !behind.is_empty() && !force {
        let users: std::collections::BTreeSet<&str> = behind.iter().map(|(u, _)| u.as_str()).collect();
        let most = behind.iter().map(|(_, n)| *n).max().unwrap_or(0);
        bail!(
            "{name} {v} is behind {current} for {} user(s) (up to {most} input offsets): promoting now would serve less than is served; let `vitals replay {name} --as {v}` catch up (it says `caught up`), or pass --force",
            users.len()
        );
    }
    sqlx::query("UPDATE projection_versions SET promoted = $2, previous = $3, promoted_at = now() WHERE projection = $1")
        .bind(name)
        .bind(v)
        .bind(&current)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(format!(
        "{name}: reads now serve {v} ({}) instead of {current}; `vitals retire {name} {current}` removes {current} once nothing runs it",
        projection.table()
    ))
}

/// What a retirement removes, for the confirmation and the report.
fn plan(cfg: &Config, name: &str, p: Projection) -> Vec<String> {
    let key = p.key();
    let (sink, sink_group) = app::version_sink(cfg, key);
    let mut v = vec![
        format!("table {}", p.table()),
        format!("topic {}", p.topic(&app::topics(cfg))),
        format!("consumer group {}", app::processor_group(cfg, key)),
        format!("epochs, snapshots and local state of {}{key}", cfg.kafka.topic_prefix),
        format!("progress and dead-letter rows of {key}"),
    ];
    if p.version.is_some() {
        v.push(format!("consumer group {sink_group} and the offsets of sink {sink}"));
    } else {
        v.push(format!("the offsets of sink {} on its topic (the sink stops applying {name})", app::sink_name(cfg)));
    }
    v
}

/// Removes version `v` of `processor`'s projection. Refused while it is served, while another
/// projection is built from it, or while its groups have members (something still runs it).
pub async fn retire(cfg: &Config, processor: &str, v: &str, yes: bool) -> anyhow::Result<Vec<String>> {
    let (info, p) = resolve(processor, v)?;
    let name = info.name;
    let pool = app::pg_pool(cfg).await?;
    let served = promoted(&pool, name).await?;
    if served == v {
        bail!("{name} {v} is the version reads are served from: promote another first (`vitals promote {name} <version>`)");
    }
    if p.version.is_none() {
        if base_retired(&pool, name).await? {
            bail!("{name} {BASE_VERSION} is already retired");
        }
        if let Some(d) = vitals_runtime::registry::projections().iter().find(|q| q.descriptor.built_from == BuiltFrom::Projection(name)) {
            bail!("{} is built from {name} {BASE_VERSION}'s topic: it cannot be retired while {} is registered", d.name(), d.name());
        }
    } else {
        let known: Option<String> = sqlx::query_scalar("SELECT from_spec FROM projection_replays WHERE projection = $1 AND version = $2")
            .bind(name)
            .bind(v)
            .fetch_optional(&pool)
            .await?;
        if known.is_none() {
            bail!("{name} has no version {v}");
        }
    }
    let key = p.key();
    let (sink, sink_group) = app::version_sink(cfg, key);
    let mut groups = vec![app::processor_group(cfg, key)];
    if p.version.is_some() {
        groups.push(sink_group);
    }
    for g in &groups {
        let members = group_members(cfg, g).await?;
        if members > 0 {
            bail!("consumer group {g} has {members} member(s): stop what runs {name} {v} first (`vitals replay`/`vitals process`)");
        }
    }
    // The sink of its topic has applied all of it: nothing it still holds can land in a
    // dropped table (and stall it).
    let topic = p.topic(&app::topics(cfg));
    let sink_of_topic = if p.version.is_some() { sink.clone() } else { app::sink_name(cfg) };
    let parts = partitions(cfg, std::slice::from_ref(&topic)).await?.get(&topic).copied().unwrap_or(0);
    let client = Arc::new(app::kafka_base(cfg, "vitals-retire").set("group.id", "vitals-retire").create::<BaseConsumer>()?);
    let left = sink_lag(&pool, &sink_of_topic, &topic, parts, &client).await?;
    if left > 0 {
        bail!("sink {sink_of_topic} has {left} record(s) of {topic} left to apply: retire once it has (it is not running, or still catching up)");
    }
    let what = plan(cfg, name, p);
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("retiring {name} {v} removes:\n  {}\nrun it on a terminal to confirm, or pass --yes", what.join("\n  "));
        }
        println!("retiring {name} {v} removes:\n  {}\ntype `{key}` to confirm:", what.join("\n  "));
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != key {
            bail!("not confirmed: nothing removed");
        }
    }
    let line = format!("{}{key}", cfg.kafka.topic_prefix);
    // First the database (reads, freshness and the sink's bookkeeping), in one transaction.
    let mut tx = pool.begin().await?;
    if p.version.is_none() {
        sqlx::query("INSERT INTO projection_versions (projection, promoted, previous, base_retired) VALUES ($1, $2, $2, true) ON CONFLICT (projection) DO UPDATE SET base_retired = true")
            .bind(name)
            .bind(BASE_VERSION)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", p.table())).execute(&mut *tx).await?;
    let snapshot_keys: Vec<String> = sqlx::query_scalar("DELETE FROM processor_snapshots WHERE processor = $1 RETURNING object_key")
        .bind(&line)
        .fetch_all(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM processor_restores WHERE processor = $1").bind(&line).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM processor_epochs WHERE processor = $1").bind(&line).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM projection_progress WHERE projection = $1").bind(key).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM projection_dead_letters WHERE projection = $1").bind(key).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM projection_inputs WHERE topic = $1").bind(&topic).execute(&mut *tx).await?;
    // A version's own sink: every row of it (its dead-letter topic's too); the base sink: only
    // the retired topic's.
    let only_topic = if p.version.is_some() { None } else { Some(topic.as_str()) };
    for table in ["sink_offsets", "sink_vouches"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE sink = $1 AND ($2::text IS NULL OR topic = $2)"))
            .bind(&sink_of_topic)
            .bind(only_topic)
            .execute(&mut *tx)
            .await?;
    }
    if p.version.is_some() {
        sqlx::query("DELETE FROM projection_replays WHERE projection = $1 AND version = $2").bind(name).bind(v).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    let mut report =
        vec![format!("dropped table {}; removed the epochs, snapshot pointers, progress and dead-letter rows of {key}", p.table())];
    // Then the broker and the stores: each is reported, and a failure names what is left.
    let admin = app::admin(cfg)?;
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match admin.delete_topics(&[topic.as_str()], &opts).await {
        Ok(r) => report.extend(r.into_iter().map(|r| match r {
            Ok(t) => format!("deleted topic {t}"),
            Err((t, code)) => format!("topic {t} not deleted: {code} (delete it with the broker's tools)"),
        })),
        Err(e) => report.push(format!("topic {topic} not deleted: {e}")),
    }
    let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    match admin.delete_groups(&group_refs, &opts).await {
        Ok(r) => report.extend(r.into_iter().map(|r| match r {
            Ok(g) => format!("deleted consumer group {g}"),
            Err((g, code)) => format!("consumer group {g}: {code}"),
        })),
        Err(e) => report.push(format!("consumer groups {} not deleted: {e}", groups.join(", "))),
    }
    let dir = std::path::Path::new(&cfg.processors.data_dir).join(key);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        report.push(format!("removed local state {}", dir.display()));
    }
    if !snapshot_keys.is_empty() {
        let s3 = app::s3_client(cfg)?;
        let mut deleted = 0;
        for k in &snapshot_keys {
            match s3.delete(k).await {
                Ok(()) => deleted += 1,
                Err(e) => report.push(format!("snapshot {k} not deleted: {e}")),
            }
        }
        report.push(format!(
            "deleted {deleted} published snapshot(s); superseded ones under snapshots/{}/ are left to the bucket's lifecycle rule",
            app::processor_group(cfg, key)
        ));
    }
    if p.version.is_none() {
        report.push(format!(
            "{name} {BASE_VERSION} is retired: `vitals process {name}` now refuses to run it; run `vitals process {name} --as {served}`"
        ));
    }
    Ok(report)
}

/// How many members consumer group `group` has now (0 when the broker does not know it).
/// Members of consumer group `group` (as the broker lists them).
pub async fn group_members(cfg: &Config, group: &str) -> anyhow::Result<usize> {
    let client: BaseConsumer = app::kafka_base(cfg, "vitals-retire").create()?;
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let list = client.fetch_group_list(Some(&group), Duration::from_secs(10)).context("describing the consumer group")?;
        Ok(list.groups().iter().filter(|g| g.name() == group).map(|g| g.members().len()).sum())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeMap<String, i32> {
        [("t.vitals.health.hot".to_owned(), 3), ("t.vitals.health.cold".to_owned(), 3)].into_iter().collect()
    }

    fn parse(text: &str) -> Result<Vec<StartOffset>, String> {
        parse_offsets(text, "rollup_day", "t.", &known())
    }

    fn at(topic: &str, partition: i32, offset: i64) -> StartOffset {
        StartOffset { topic: topic.into(), partition, offset }
    }

    #[test]
    fn an_offsets_file_names_partitions_by_full_or_unprefixed_topic() {
        let got = parse(r#"[{"topic": "t.vitals.health.hot", "partition": 0, "offset": 5}, {"topic": "vitals.health.cold", "partition": 2, "offset": 0}]"#).unwrap();
        assert_eq!(got, vec![at("t.vitals.health.hot", 0, 5), at("t.vitals.health.cold", 2, 0)]);
    }

    #[test]
    fn the_rows_of_offsets_show_are_read_as_they_are() {
        // `vitals offsets show --json` of every processor: other processors' rows are skipped,
        // a partition nothing was committed for starts at its beginning.
        let text = r#"[
            {"processor": "sleep_night", "topic": "t.vitals.health.hot", "partition": 0, "committed": 99, "high": 99, "lag": 0},
            {"processor": "rollup_day", "topic": "t.vitals.health.hot", "partition": 0, "committed": 7, "high": 9, "lag": 2, "owner": null},
            {"processor": "rollup_day", "topic": "t.vitals.health.hot", "partition": 1, "committed": null, "high": 0, "lag": 0}
        ]"#;
        assert_eq!(parse(text).unwrap(), vec![at("t.vitals.health.hot", 0, 7)]);
        let e = parse(r#"[{"processor": "sleep_night", "topic": "t.vitals.health.hot", "partition": 0, "committed": 1}]"#).unwrap_err();
        assert!(
            e.contains("no row is of rollup_day") && e.contains("sleep_night") && e.contains("vitals offsets show rollup_day --json"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_offsets_file_is_refused_naming_the_row_and_the_fault() {
        for (text, want) in [
            ("{}", "expected a JSON array"),
            ("not json", "expected a JSON array"),
            ("[1]", "row 0: expected"),
            (r#"[{"partition": 0, "offset": 1}]"#, "row 0: no `topic`"),
            (r#"[{"topic": "t.vitals.health.hot", "offset": 1}]"#, "row 0: no integer `partition`"),
            (r#"[{"topic": "t.vitals.health.hot", "partition": 0}]"#, "row 0: no `offset`"),
            (
                r#"[{"topic": "t.vitals.domain.changes", "partition": 0, "offset": 1}]"#,
                "is not an input of rollup_day (inputs: t.vitals.health.cold, t.vitals.health.hot)",
            ),
            (r#"[{"topic": "t.vitals.health.hot", "partition": 3, "offset": 1}]"#, "has no partition 3 (it has 3)"),
            (r#"[{"topic": "t.vitals.health.hot", "partition": -1, "offset": 1}]"#, "has no partition -1"),
            (r#"[{"topic": "t.vitals.health.hot", "partition": 0, "offset": -4}]"#, "offset -4 is negative"),
            (r#"[{"topic": "t.vitals.health.hot", "partition": 0, "offset": 1.5}]"#, "is not an integer"),
            (
                r#"[{"topic": "t.vitals.health.hot", "partition": 0, "offset": 1}, {"topic": "vitals.health.hot", "partition": 0, "offset": null}]"#,
                "row 1: t.vitals.health.hot/0 is named twice",
            ),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn from_names_earliest_a_time_or_a_file() {
        assert_eq!("earliest".parse::<From>().unwrap(), From::Earliest);
        assert_eq!("2026-11-30T01:00:00+01:00".parse::<From>().unwrap(), From::Time("2026-11-30T00:00:00Z".parse().unwrap()));
        let e = "2026-11-30".parse::<From>().unwrap_err();
        assert!(e.contains("neither `earliest`, an RFC 3339 time"), "{e}");
    }
}
