//! Snapshots of task stores in the S3-compatible store, and restore from them (see
//! `docs/processors.md`, "Snapshots and restore").
//!
//! A snapshot is an [`export`](Store::export) of a task's store taken right after a commit, so it
//! is a past checkpoint: state, next input offsets, output sequence and stream time, all of whose
//! outputs were acknowledged. It is uploaded under a key naming its version, then its *pointer*
//! is published in PostgreSQL (`processor_snapshots`, one row per task), fenced: the write only
//! succeeds while the writer's epoch is the current one in `processor_epochs` and its position is
//! greater than the published one. A task that gets a partition without a local store bumps the
//! epoch first, then reads the pointer, downloads and imports the snapshot and resumes reading at
//! its offsets.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracing::{info, warn};

use super::s3::S3Client;
use super::store::{Checkpoint, Store};

/// What a snapshotting runtime needs: where snapshots go, where pointers live, how often.
#[derive(Debug)]
pub struct Snapshots {
    pub s3: S3Client,
    pub pool: PgPool,
    /// Object keys are `snapshots/{prefix}/{processor}/p{partition}/…` (the consumer group, so
    /// deployments sharing a bucket do not mix).
    pub prefix: String,
    /// The least wall-clock time between two snapshots of one task. It decides only *when* a
    /// snapshot is taken, never what is output.
    pub every: Duration,
    /// Shared with the runtime's metrics, which serve them on `/metrics`.
    pub metrics: std::sync::Arc<SnapshotMetrics>,
    /// The longest a restore's download may take (then the task replays from the beginning).
    pub restore_deadline: Duration,
}

/// Counters the runtime keeps (for logs, benchmarks and tests).
#[derive(Debug, Default)]
pub struct SnapshotMetrics {
    /// Snapshots uploaded and published.
    pub taken: AtomicU64,
    /// Snapshots uploaded whose pointer was refused (a newer owner or a newer snapshot).
    pub fenced: AtomicU64,
    /// Snapshots that failed (export, upload or publish): processing went on.
    pub failed: AtomicU64,
    /// Tasks restored from a snapshot.
    pub restores: AtomicU64,
    /// Restores that failed and fell back to replaying from the beginning.
    pub restore_failures: AtomicU64,
    /// The last restore: wall-clock milliseconds (pointer lookup, download, import) and bytes.
    pub last_restore_ms: AtomicU64,
    pub last_restore_bytes: AtomicU64,
}

/// The published snapshot of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Pointer {
    /// The epoch of the task that took it.
    pub epoch: i64,
    /// The checkpoint's output sequence number.
    pub seq: i64,
    /// The sum of the checkpoint's next offsets: grows with every checkpoint that read
    /// something, outputs or not.
    pub position: i64,
    pub object_key: String,
    /// The checkpoint's next offsets (input topic → offset).
    pub offsets: BTreeMap<String, i64>,
    pub stream_time_ms: i64,
    pub bytes: i64,
}

/// A checkpoint's position: the sum of its next offsets.
pub fn position(cp: &Checkpoint) -> i64 {
    cp.offsets.values().sum()
}

/// Publishes `ptr` as the snapshot of (processor, partition), fenced: only while `ptr.epoch` is
/// the current epoch of the task (its row in `processor_epochs` is share-locked, so a concurrent
/// bump waits for this statement, or this statement sees the bump), and only if
/// `(epoch, seq, position)` is greater than the published pointer's. `Ok(false)`: refused.
pub async fn publish(pool: &PgPool, processor: &str, partition: i32, ptr: &Pointer) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "WITH current AS (
             SELECT epoch FROM processor_epochs WHERE processor = $1 AND partition = $2 FOR SHARE
         )
         INSERT INTO processor_snapshots (processor, partition, epoch, seq, position, object_key, offsets, stream_time_ms, bytes)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM current WHERE current.epoch = $3
         ON CONFLICT (processor, partition) DO UPDATE
         SET epoch = EXCLUDED.epoch, seq = EXCLUDED.seq, position = EXCLUDED.position, object_key = EXCLUDED.object_key,
             offsets = EXCLUDED.offsets, stream_time_ms = EXCLUDED.stream_time_ms, bytes = EXCLUDED.bytes, created_at = now()
         WHERE (processor_snapshots.epoch, processor_snapshots.seq, processor_snapshots.position)
             < (EXCLUDED.epoch, EXCLUDED.seq, EXCLUDED.position)",
    )
    .bind(processor)
    .bind(partition)
    .bind(ptr.epoch)
    .bind(ptr.seq)
    .bind(ptr.position)
    .bind(&ptr.object_key)
    .bind(sqlx::types::Json(&ptr.offsets))
    .bind(ptr.stream_time_ms)
    .bind(ptr.bytes)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Withdraws the published snapshot of (processor, partition) for the owner at `epoch`, which
/// does not start from it (it has a local store, or the restore failed and it replays from the
/// beginning): once that owner has emitted anything, restoring the older snapshot would leave
/// keys at that owner's values. Fenced like [`publish`]: only while `epoch` is current (a stale
/// owner withdraws nothing; its successor does). `Ok(true)`: a pointer was withdrawn.
pub async fn withdraw(pool: &PgPool, processor: &str, partition: i32, epoch: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "WITH current AS (
             SELECT epoch FROM processor_epochs WHERE processor = $1 AND partition = $2 FOR SHARE
         )
         DELETE FROM processor_snapshots s USING current
         WHERE s.processor = $1 AND s.partition = $2 AND current.epoch = $3 AND s.epoch < $3",
    )
    .bind(processor)
    .bind(partition)
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The published snapshot of (processor, partition), if any.
pub async fn pointer(pool: &PgPool, processor: &str, partition: i32) -> Result<Option<Pointer>, sqlx::Error> {
    type Row = (i64, i64, i64, String, sqlx::types::Json<BTreeMap<String, i64>>, i64, i64);
    let row: Option<Row> = sqlx::query_as(
        "SELECT epoch, seq, position, object_key, offsets, stream_time_ms, bytes FROM processor_snapshots WHERE processor = $1 AND partition = $2",
    )
    .bind(processor)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(epoch, seq, position, object_key, offsets, stream_time_ms, bytes)| Pointer {
        epoch,
        seq,
        position,
        object_key,
        offsets: offsets.0,
        stream_time_ms,
        bytes,
    }))
}

/// Where a task's snapshot is downloaded to before it is imported at `store`.
pub fn download_path(store: &Path) -> std::path::PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_owned();
    name.push(".snapshot-download");
    store.with_file_name(name)
}

/// Where a task's export at (`epoch`, `seq`) is written before it is uploaded.
pub fn export_path(store: &Path, epoch: i64, seq: i64) -> std::path::PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_owned();
    name.push(format!(".snapshot-{epoch}-{seq}"));
    store.with_file_name(name)
}

/// Removes the exports, downloads and half-built imports an earlier process left beside the
/// store at `store` (when it crashed). Once per store path and process: this process's own files
/// (an upload still running when its task was revoked and given back) are its own to remove.
pub fn remove_leftovers(store: &Path) {
    static DONE: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    if !DONE.lock().unwrap_or_else(|e| e.into_inner()).insert(store.to_owned()) {
        return;
    }
    let (Some(dir), Some(name)) = (store.parent(), store.file_name()) else { return };
    let name = name.to_string_lossy();
    let (prefix, tmp) = (format!("{name}.snapshot-"), format!("{name}.import-tmp"));
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&prefix) || file == tmp {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A task store rebuilt from a snapshot.
pub struct Restored {
    pub store: Store,
    pub cp: Checkpoint,
    pub pointer: Pointer,
    pub took: Duration,
}

impl Snapshots {
    pub fn new(s3: S3Client, pool: PgPool, prefix: &str, every: Duration) -> Snapshots {
        Snapshots {
            s3,
            pool,
            prefix: prefix.trim_matches('/').to_owned(),
            every,
            metrics: Default::default(),
            restore_deadline: Duration::from_secs(300),
        }
    }

    pub fn object_key(&self, processor: &str, partition: i32, epoch: i64, seq: i64, position: i64) -> String {
        format!("snapshots/{}/{processor}/p{partition}/{epoch:012}-{seq:012}-{position:015}.snap", self.prefix)
    }

    /// Uploads the export in `file` (taken at `cp` by the owner at `epoch`), streamed from the
    /// file, and publishes its pointer; the file is removed either way. `Ok(false)`: uploaded but
    /// fenced off (the object is then never read).
    pub async fn save(&self, processor: &str, partition: i32, epoch: i64, cp: &Checkpoint, file: &Path) -> Result<bool, String> {
        let sent = self.save_file(processor, partition, epoch, cp, file).await;
        let _ = tokio::fs::remove_file(file).await;
        sent
    }

    async fn save_file(&self, processor: &str, partition: i32, epoch: i64, cp: &Checkpoint, file: &Path) -> Result<bool, String> {
        let t0 = Instant::now();
        let pos = position(cp);
        let key = self.object_key(processor, partition, epoch, cp.seq, pos);
        let n = self.s3.put_file(&key, file).await.map_err(|e| e.to_string())? as i64;
        let ptr = Pointer {
            epoch,
            seq: cp.seq,
            position: pos,
            object_key: key,
            offsets: cp.offsets.clone(),
            stream_time_ms: cp.stream_time_ms,
            bytes: n,
        };
        let published =
            publish(&self.pool, processor, partition, &ptr).await.map_err(|e| format!("publishing the snapshot pointer: {e}"))?;
        if published {
            self.metrics.taken.fetch_add(1, Ordering::Relaxed);
            info!(processor, partition, epoch, seq = cp.seq, bytes = n, ms = t0.elapsed().as_millis() as u64, key = %ptr.object_key, "snapshot taken");
        } else {
            self.metrics.fenced.fetch_add(1, Ordering::Relaxed);
            warn!(processor, partition, epoch, seq = cp.seq, "snapshot not published: a newer owner or a newer snapshot exists");
        }
        Ok(published)
    }

    /// Builds the store of (processor, partition) at `path` (where there is none) from the
    /// published snapshot, for the owner at `epoch`. `Ok(None)`: no snapshot was published. On
    /// an error nothing is left at `path`.
    pub async fn restore(&self, processor: &str, partition: i32, epoch: i64, path: &Path) -> Result<Option<Restored>, String> {
        let t0 = Instant::now();
        let Some(ptr) = pointer(&self.pool, processor, partition).await.map_err(|e| format!("reading the snapshot pointer: {e}"))? else {
            return Ok(None);
        };
        // The takeover waits for this download (bounded by `restore_deadline`): say so, so a slow
        // store is visible while it happens, not only once it fails.
        info!(processor, partition, epoch, object = %ptr.object_key, "fetching the published snapshot");
        // Downloaded to a file beside the store and imported from it, both streamed: a restore's
        // memory does not grow with the snapshot. The SDK retries a request that fails; a body
        // cut off midway is fetched again here, a few times, before falling back to a replay.
        let download = download_path(path);
        if let Some(dir) = download.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let fetch = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.s3.get_to_file(&ptr.object_key, &download).await {
                    Ok(Some(n)) => return Ok(n),
                    Ok(None) => return Err(format!("snapshot object {} is missing", ptr.object_key)),
                    Err(e) if e.body_cut && attempt < 3 => {
                        warn!(processor, partition, attempt, error = %e, "snapshot download cut off; fetching it again")
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        // The takeover waits for this: a store that answers too slowly costs a replay from the
        // beginning (correct, only slower), never a task that does not start.
        let n = match tokio::time::timeout(self.restore_deadline, fetch).await {
            Ok(n) => n?,
            Err(_) => {
                let _ = std::fs::remove_file(&download);
                return Err(format!("downloading {} took longer than {:?}", ptr.object_key, self.restore_deadline));
            }
        };
        if n != ptr.bytes as u64 {
            let _ = std::fs::remove_file(&download);
            return Err(format!("snapshot object {} has {n} bytes, its pointer says {}", ptr.object_key, ptr.bytes));
        }
        let (to, from) = (path.to_owned(), download.clone());
        let imported = tokio::task::spawn_blocking(move || Store::import_file(&to, &from)).await;
        let _ = std::fs::remove_file(&download);
        let store = imported.map_err(|e| format!("importing {}: {e}", ptr.object_key))?.map_err(|e| format!("{}: {e}", ptr.object_key))?;
        let cp = match store.checkpoint() {
            Ok(cp) if cp.seq == ptr.seq && cp.offsets == ptr.offsets => cp,
            other => {
                drop(store);
                let _ = std::fs::remove_file(path);
                return Err(format!("snapshot {} does not hold the checkpoint its pointer names: {other:?} vs {ptr:?}", ptr.object_key));
            }
        };
        let took = t0.elapsed();
        let ms = took.as_millis() as u64;
        self.metrics.restores.fetch_add(1, Ordering::Relaxed);
        self.metrics.last_restore_ms.store(ms, Ordering::Relaxed);
        self.metrics.last_restore_bytes.store(n, Ordering::Relaxed);
        info!(processor, partition, epoch, snapshot_epoch = ptr.epoch, snapshot_seq = ptr.seq, bytes = n, ms, offsets = ?cp.offsets, "task restored from snapshot; replaying from its offsets");
        let recorded = sqlx::query(
            "INSERT INTO processor_restores (processor, partition, epoch, snapshot_epoch, snapshot_seq, object_key, offsets, bytes, restore_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(processor)
        .bind(partition)
        .bind(epoch)
        .bind(ptr.epoch)
        .bind(ptr.seq)
        .bind(&ptr.object_key)
        .bind(sqlx::types::Json(&ptr.offsets))
        .bind(n as i64)
        .bind(ms as i64)
        .execute(&self.pool)
        .await;
        if let Err(e) = recorded {
            warn!(processor, partition, error = %e, "recording the restore failed");
        }
        Ok(Some(Restored { store, cp, pointer: ptr, took }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crashed process's exports, downloads and half-built imports of one store go; another
    /// partition's files (p1 beside p10) and the store itself stay; and only once per process.
    #[test]
    fn leftovers_of_one_store_are_removed_once_and_no_others() {
        let dir = std::env::temp_dir().join(format!("vitals-leftovers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = dir.join("p1.redb");
        let gone = [export_path(&store, 3, 40), download_path(&store), dir.join("p1.redb.import-tmp")];
        let kept = [store.clone(), dir.join("p10.redb"), export_path(&dir.join("p10.redb"), 3, 40), dir.join("p10.redb.import-tmp")];
        for f in gone.iter().chain(&kept) {
            std::fs::write(f, b"x").unwrap();
        }
        remove_leftovers(&store);
        for f in &gone {
            assert!(!f.exists(), "{} left", f.display());
        }
        for f in &kept {
            assert!(f.exists(), "{} removed", f.display());
        }
        // This process's own export (an upload still running after a revoke and a re-assign)
        // is not touched when the store is taken again.
        let own = export_path(&store, 4, 41);
        std::fs::write(&own, b"x").unwrap();
        remove_leftovers(&store);
        assert!(own.exists(), "an upload of this process lost its file");
        let _ = std::fs::remove_dir_all(dir);
    }
}
