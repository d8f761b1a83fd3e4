//! The local store of one task (one processor × one input partition), in redb: the processor's
//! state, the next offset of every input topic and the output position, committed together in
//! one transaction. An interval's writes are buffered in an [`Overlay`] and reach the store only
//! at commit, after the interval's outputs were acknowledged by the broker.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use vitals_processors::State;

const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const SEP: char = '\u{1e}';

#[derive(Debug, thiserror::Error)]
#[error("local store: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub fn from_message(m: String) -> StoreError {
        StoreError(m)
    }
}

fn e<E: std::fmt::Display>(x: E) -> StoreError {
    StoreError(x.to_string())
}

/// What a task resumes from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    /// Input topic → next offset to read.
    pub offsets: BTreeMap<String, i64>,
    /// Next output sequence number within the epoch line.
    pub seq: i64,
    /// Stream time: the greatest input record timestamp read so far (drives timers).
    pub stream_time_ms: i64,
    /// The offset of the task's output partition a successor must read from: every record
    /// before it is answered or accounted for by this checkpoint (`task::Tail`).
    pub out_next: i64,
    /// The greatest epoch seen in the output partition before `out_next` (and this task's own):
    /// a successor's epoch starts above it even if `processor_epochs` was lost.
    pub max_epoch: i64,
}

/// redb's page cache per task store opened from now on (`processors.store_cache_mb`; redb's own
/// default is 1 GiB each): a process's memory is bounded by its number of tasks, not by the size
/// of their stores (pages beyond it are read through the operating system's page cache).
static STORE_CACHE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(64 * 1024 * 1024);

/// Sets the page cache of every task store opened from now on (set once, at start-up).
pub fn set_cache_bytes(bytes: usize) {
    STORE_CACHE_BYTES.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

pub struct Store {
    db: Database,
    path: std::path::PathBuf,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(e)?;
        }
        let db =
            redb::Builder::new().set_cache_size(STORE_CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed)).create(path).map_err(e)?;
        let tx = db.begin_write().map_err(e)?;
        tx.open_table(STATE).map_err(e)?;
        tx.open_table(META).map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(Store { db, path: path.to_owned() })
    }

    /// Where the store's file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let meta = tx.open_table(META).map_err(e)?;
        let mut cp = Checkpoint::default();
        for row in meta.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let (k, v) = (k.value().to_owned(), v.value());
            if let Some(topic) = k.strip_prefix("offset/") {
                cp.offsets.insert(topic.to_owned(), v);
            } else if k == "seq" {
                cp.seq = v;
            } else if k == "stream_time" {
                cp.stream_time_ms = v;
            } else if k == "out_next" {
                cp.out_next = v;
            } else if k == "max_epoch" {
                cp.max_epoch = v;
            }
        }
        Ok(cp)
    }

    /// A committed value. A read that fails is an error, never "no state": a processor that
    /// took it for "nothing held" would retract what it holds.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(STATE).map_err(e)?;
        Ok(t.get(key).map_err(e)?.map(|v| v.value().to_vec()))
    }

    pub(super) fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(STATE).map_err(e)?;
        let mut out = Vec::new();
        for r in t.range(prefix..).map_err(e)? {
            let (k, v) = r.map_err(e)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Test hook: writes a raw state entry, bypassing every view (to plant a corrupt value).
    #[cfg(test)]
    pub(super) fn put_raw_for_test(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        tx.open_table(STATE).map_err(e)?.insert(key, value).map_err(e)?;
        tx.commit().map_err(e)
    }

    /// The epoch this store was last owned under (`None`: never recorded).
    pub fn owner_epoch(&self) -> Result<Option<i64>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let meta = tx.open_table(META).map_err(e)?;
        Ok(meta.get("owner_epoch").map_err(e)?.map(|v| v.value()))
    }

    /// Records that the store is now owned under `epoch` (durably, before anything is emitted).
    /// The layout of the processor state in this store (1: stores written before it was recorded).
    pub fn state_format(&self) -> Result<i64, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let meta = tx.open_table(META).map_err(e)?;
        Ok(meta.get("state_format").map_err(e)?.map_or(1, |v| v.value()))
    }

    pub fn set_state_format(&self, format: i64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        tx.open_table(META).map_err(e)?.insert("state_format", format).map_err(e)?;
        tx.commit().map_err(e)
    }

    pub fn set_owner_epoch(&self, epoch: i64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        tx.open_table(META).map_err(e)?.insert("owner_epoch", epoch).map_err(e)?;
        tx.commit().map_err(e)
    }

    /// Makes the interval durable: its state writes, the next offsets and the output position,
    /// all or nothing.
    pub fn commit(&self, overlay: Overlay, cp: &Checkpoint) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut state = tx.open_table(STATE).map_err(e)?;
            for (k, v) in overlay.writes {
                match v {
                    Some(v) => {
                        state.insert(k.as_str(), v.as_slice()).map_err(e)?;
                    }
                    None => {
                        state.remove(k.as_str()).map_err(e)?;
                    }
                }
            }
            let mut meta = tx.open_table(META).map_err(e)?;
            for (topic, off) in &cp.offsets {
                meta.insert(format!("offset/{topic}").as_str(), *off).map_err(e)?;
            }
            meta.insert("seq", cp.seq).map_err(e)?;
            meta.insert("stream_time", cp.stream_time_ms).map_err(e)?;
            meta.insert("out_next", cp.out_next).map_err(e)?;
            meta.insert("max_epoch", cp.max_epoch).map_err(e)?;
        }
        tx.commit().map_err(e)
    }
}

/// The snapshot format: magic, format version, the STATE entries, the META entries, and the
/// SHA-256 of everything before it. Integers are big-endian.
///
/// ```text
/// "VITALSNP" u32:version
/// u64:n  n × (u32:key_len key u32:value_len value)      state
/// u64:m  m × (u32:key_len key i64:value)                meta (offsets, seq, stream time)
/// [32]   sha256 of all the above
/// ```
const SNAPSHOT_MAGIC: &[u8; 8] = b"VITALSNP";
const SNAPSHOT_VERSION: u32 = 1;

fn put_bytes<W: std::io::Write>(out: &mut W, b: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(b.len()).map_err(|_| StoreError(format!("an entry of {} bytes is too large for a snapshot", b.len())))?;
    out.write_all(&len.to_be_bytes()).map_err(e)?;
    out.write_all(b).map_err(e)
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    sum: sha2::Sha256,
    n: u64,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.sum, &buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a snapshot's body as a stream, every read bounds-checked against the body's length (so
/// a length field read from a corrupt snapshot cannot make it allocate more than the body holds).
struct Reader<R> {
    src: R,
    /// Body bytes not read yet.
    left: u64,
    buf: Vec<u8>,
}

impl<R: std::io::Read> Reader<R> {
    fn take(&mut self, n: usize) -> Result<&[u8], StoreError> {
        if n as u64 > self.left {
            return Err(StoreError("snapshot truncated".into()));
        }
        self.buf.resize(n, 0);
        self.src.read_exact(&mut self.buf).map_err(|x| StoreError(format!("reading the snapshot: {x}")))?;
        self.left -= n as u64;
        Ok(&self.buf)
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&[u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Owned: a key is held while its value is read into the same buffer.
    fn str(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| StoreError("snapshot key is not UTF-8".into()))
    }
}

/// The memory an import may use for redb's page cache (its write buffer is at most half of it):
/// a restore's memory does not grow with the snapshot.
const IMPORT_CACHE_BYTES: usize = 16 * 1024 * 1024;

impl Store {
    /// The whole store — state, offsets, output position, stream time — as of one read
    /// transaction, in the snapshot format.
    pub fn export(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(64);
        self.export_to(&mut out)?;
        Ok(out)
    }

    /// [`export`](Store::export) written to `out` as it is read, entry by entry (memory does
    /// not grow with the store). Returns the bytes written.
    pub fn export_to<W: std::io::Write>(&self, out: W) -> Result<u64, StoreError> {
        use std::io::Write;
        let tx = self.db.begin_read().map_err(e)?;
        let state = tx.open_table(STATE).map_err(e)?;
        let meta = tx.open_table(META).map_err(e)?;
        let mut out = Hashing { inner: std::io::BufWriter::with_capacity(256 * 1024, out), sum: Default::default(), n: 0 };
        out.write_all(SNAPSHOT_MAGIC).map_err(e)?;
        out.write_all(&SNAPSHOT_VERSION.to_be_bytes()).map_err(e)?;
        out.write_all(&state.len().map_err(e)?.to_be_bytes()).map_err(e)?;
        for row in state.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            put_bytes(&mut out, k.value().as_bytes())?;
            put_bytes(&mut out, v.value())?;
        }
        out.write_all(&meta.len().map_err(e)?.to_be_bytes()).map_err(e)?;
        for row in meta.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            put_bytes(&mut out, k.value().as_bytes())?;
            out.write_all(&v.value().to_be_bytes()).map_err(e)?;
        }
        let sum = sha2::Digest::finalize(std::mem::take(&mut out.sum));
        let mut inner = out.inner;
        inner.write_all(&sum).map_err(e)?;
        inner.flush().map_err(e)?;
        Ok(out.n + 32)
    }

    /// [`export_to`](Store::export_to) a new file at `file` (removed on an error). Not synced: a
    /// scratch copy, read back from the page cache by the upload, worthless after a crash.
    pub fn export_file(&self, file: &Path) -> Result<u64, StoreError> {
        let written = (|| {
            let f = std::fs::File::create(file).map_err(e)?;
            self.export_to(&f)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(file);
        }
        written
    }

    /// Builds a new store at `path` from an [`export`](Store::export) held in memory (tests,
    /// simulations); [`import_file`](Store::import_file) for real snapshots.
    pub fn import(path: &Path, bytes: &[u8]) -> Result<Store, StoreError> {
        use sha2::{Digest, Sha256};
        let len = bytes.len() as u64;
        Store::check_head(bytes, len)?;
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body)[..] != *sum {
            return Err(StoreError(format!("snapshot refused: checksum mismatch ({len} bytes, corrupted or truncated)")));
        }
        Store::build(path, body, len - 32)
    }

    /// Builds a new store at `path` from an export in the file `file`, after checking it whole,
    /// read as a stream twice (checksum, then entries): memory stays bounded whatever the size.
    /// Written to a temporary file and renamed into place, so `path` holds either nothing or the
    /// complete store. Refuses to replace an existing store.
    pub fn import_file(path: &Path, file: &Path) -> Result<Store, StoreError> {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek};
        let io = |x: std::io::Error| StoreError(format!("reading the snapshot {}: {x}", file.display()));
        let len = std::fs::metadata(file).map_err(io)?.len();
        let mut f = std::io::BufReader::with_capacity(256 * 1024, std::fs::File::open(file).map_err(io)?);
        let mut head = [0u8; 12];
        if len >= 12 {
            f.read_exact(&mut head).map_err(io)?;
        }
        Store::check_head(&head, len)?;
        let mut hasher = Sha256::new();
        hasher.update(head);
        std::io::copy(&mut (&mut f).take(len - 32 - 12), &mut hasher).map_err(io)?;
        let mut sum = [0u8; 32];
        f.read_exact(&mut sum).map_err(io)?;
        if hasher.finalize()[..] != sum {
            return Err(StoreError(format!("snapshot refused: checksum mismatch ({len} bytes, corrupted or truncated)")));
        }
        // The same handle read again from the start: what was checked is what is imported.
        f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        Store::build(path, f.take(len - 32), len - 32)
    }

    /// Magic and size of a snapshot of `len` bytes whose first bytes are `head`.
    fn check_head(head: &[u8], len: u64) -> Result<(), StoreError> {
        if len < SNAPSHOT_MAGIC.len() as u64 + 4 + 32 || head.len() < SNAPSHOT_MAGIC.len() {
            return Err(StoreError(format!("snapshot refused: {len} bytes is too short to be a snapshot")));
        }
        if &head[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
            return Err(StoreError("snapshot refused: not a vitals snapshot (bad magic)".into()));
        }
        Ok(())
    }

    /// The store at `path` from a checked snapshot body of `body_len` bytes (`src` reads it from
    /// its start), built in a temporary file with a bounded cache.
    fn build<R: std::io::Read>(path: &Path, src: R, body_len: u64) -> Result<Store, StoreError> {
        let mut r = Reader { src, left: body_len, buf: Vec::new() };
        r.take(SNAPSHOT_MAGIC.len())?;
        let version = r.u32()?;
        if version != SNAPSHOT_VERSION {
            return Err(StoreError(format!("snapshot refused: format version {version}, this build reads {SNAPSHOT_VERSION}")));
        }
        if path.exists() {
            return Err(StoreError(format!("not importing over the existing store {}", path.display())));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(e)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
        let tmp = dir.join(format!("{name}.import-tmp"));
        let _ = std::fs::remove_file(&tmp);
        let built = (|| {
            let db = redb::Builder::new().set_cache_size(IMPORT_CACHE_BYTES).create(&tmp).map_err(e)?;
            let tx = db.begin_write().map_err(e)?;
            {
                let mut state = tx.open_table(STATE).map_err(e)?;
                for _ in 0..r.u64()? {
                    let k = r.str()?;
                    state.insert(k.as_str(), r.bytes()?).map_err(e)?;
                }
                let mut meta = tx.open_table(META).map_err(e)?;
                for _ in 0..r.u64()? {
                    let k = r.str()?;
                    meta.insert(k.as_str(), i64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"))).map_err(e)?;
                }
                if r.left != 0 {
                    return Err(StoreError(format!("snapshot refused: {} bytes after the last entry", r.left)));
                }
            }
            tx.commit().map_err(e)
        })();
        if let Err(err) = built {
            let _ = std::fs::remove_file(&tmp);
            return Err(err);
        }
        std::fs::rename(&tmp, path).map_err(e)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Store::open(path)
    }
}

/// The writes of one interval, not yet committed; reads see them over the store.
#[derive(Default)]
pub struct Overlay {
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

/// Reserved key space: the partition's timer index, ordered by due time, and (under each user's
/// prefix) the user's armed timers. Processors never see it.
const RESERVED: char = '\u{1d}';
/// Between a user's prefix and an output key: the runtime's emitted table (`task.rs`), reserved
/// space processors never see.
pub(super) const EMITTED: &str = "\u{1e}\u{1d}\u{1d}out\u{1e}";

fn timer_index_prefix() -> String {
    format!("{RESERVED}timer{SEP}")
}

fn timer_index_key(at_ms: i64, user: &str, name: &str) -> String {
    format!("{}{:020}{SEP}{user}{SEP}{name}", timer_index_prefix(), at_ms.max(0))
}

impl Overlay {
    /// Keys under `prefix`, store and overlay merged.
    fn merged_scan(&self, store: &Store, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let mut merged: BTreeMap<String, Option<Vec<u8>>> = store.scan(prefix)?.into_iter().map(|(k, v)| (k, Some(v))).collect();
        for (k, v) in self.writes.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)) {
            merged.insert(k.clone(), v.clone());
        }
        Ok(merged.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
    }

    /// A raw key, overlay over store.
    pub fn get(&self, store: &Store, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(k) {
            Some(v) => Ok(v.clone()),
            None => store.get(k),
        }
    }

    /// Writes a raw key (the runtime's own reserved space).
    pub fn put(&mut self, k: String, v: Vec<u8>) {
        self.writes.insert(k, Some(v));
    }

    pub fn remove(&mut self, k: String) {
        self.writes.insert(k, None);
    }

    /// The earliest armed timer due by `now`: (user, name). It stays armed until the user's
    /// view disarms it (firing does that first).
    pub fn next_due_timer(&self, store: &Store, now: i64) -> Result<Option<(String, String)>, StoreError> {
        let prefix = timer_index_prefix();
        // The index is ordered by due time: only its first entry matters.
        let first = self.merged_scan(store, &prefix)?.into_iter().next();
        let Some((k, _)) = first else { return Ok(None) };
        let bad = || StoreError(format!("timer index entry {k:?} is malformed"));
        let mut parts = k[prefix.len()..].splitn(3, SEP);
        let at: i64 = parts.next().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
        if at > now {
            return Ok(None);
        }
        match (parts.next(), parts.next()) {
            (Some(u), Some(n)) => Ok(Some((u.to_owned(), n.to_owned()))),
            _ => Err(bad()),
        }
    }
}

/// One user's view through the overlay: what a processor gets as its [`State`]. It remembers
/// what each write replaced, so a rejected record's writes can be undone.
pub struct UserState<'a> {
    pub store: &'a Store,
    pub overlay: &'a mut Overlay,
    pub prefix: String,
    user: String,
    stream_time_ms: i64,
    undo: Vec<(String, Option<Option<Vec<u8>>>)>,
    /// The first read that failed or a value that did not deserialise: the task must stop
    /// ([`UserState::check`]) rather than act on "nothing held".
    failed: std::cell::RefCell<Option<String>>,
}

impl<'a> UserState<'a> {
    pub fn new(store: &'a Store, overlay: &'a mut Overlay, user: &str) -> UserState<'a> {
        UserState::at(store, overlay, user, 0)
    }

    /// A view at stream time `stream_time_ms`.
    pub fn at(store: &'a Store, overlay: &'a mut Overlay, user: &str, stream_time_ms: i64) -> UserState<'a> {
        UserState {
            store,
            overlay,
            prefix: format!("{user}{SEP}"),
            user: user.to_owned(),
            stream_time_ms,
            undo: Vec::new(),
            failed: Default::default(),
        }
    }

    /// An error if any read through this view failed: what the processor did with it must not
    /// be emitted or committed.
    pub fn check(&self) -> Result<(), StoreError> {
        match self.failed.borrow().as_ref() {
            Some(m) => Err(StoreError(format!("user {:?}: {m}", self.user))),
            None => Ok(()),
        }
    }

    fn note<T>(&self, r: Result<T, StoreError>, default: T) -> T {
        r.unwrap_or_else(|err| {
            self.failed.borrow_mut().get_or_insert_with(|| err.to_string());
            default
        })
    }

    fn write(&mut self, key: &str, value: Option<Vec<u8>>) {
        let k = format!("{}{key}", self.prefix);
        self.write_raw(k, value);
    }

    fn write_raw(&mut self, k: String, value: Option<Vec<u8>>) {
        let previous = self.overlay.writes.insert(k.clone(), value);
        self.undo.push((k, previous));
    }

    fn raw_get(&self, k: &str) -> Option<Vec<u8>> {
        self.note(self.overlay.get(self.store, k), None)
    }

    fn timer_key(&self, name: &str) -> String {
        format!("{}{RESERVED}{name}", self.prefix)
    }

    /// Takes back every write made through this view.
    pub fn rollback(self) {
        for (k, previous) in self.undo.into_iter().rev() {
            match previous {
                Some(v) => {
                    self.overlay.writes.insert(k, v);
                }
                None => {
                    self.overlay.writes.remove(&k);
                }
            }
        }
    }
}

impl State for UserState<'_> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.raw_get(&format!("{}{key}", self.prefix))
    }
    fn put(&mut self, key: &str, value: Vec<u8>) {
        self.write(key, Some(value));
    }
    fn delete(&mut self, key: &str) {
        self.write(key, None);
    }
    fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let full = format!("{}{prefix}", self.prefix);
        let stored = self.note(self.store.scan(&full), Vec::new());
        let mut merged: BTreeMap<String, Option<Vec<u8>>> = stored.into_iter().map(|(k, v)| (k, Some(v))).collect();
        for (k, v) in self.overlay.writes.range(full.clone()..).take_while(|(k, _)| k.starts_with(&full)) {
            merged.insert(k.clone(), v.clone());
        }
        let cut = self.prefix.len();
        merged
            .into_iter()
            .filter(|(k, _)| !k[cut..].starts_with(RESERVED))
            .filter_map(|(k, v)| v.map(|v| (k[cut..].to_owned(), v)))
            .collect()
    }
    fn stream_time_ms(&self) -> i64 {
        self.stream_time_ms
    }
    fn fail(&self, reason: String) {
        self.failed.borrow_mut().get_or_insert(reason);
    }
    fn set_timer(&mut self, name: &str, at_ms: i64) {
        self.cancel_timer(name);
        let user = self.user.clone();
        self.write_raw(self.timer_key(name), Some(at_ms.to_be_bytes().to_vec()));
        self.write_raw(timer_index_key(at_ms, &user, name), Some(Vec::new()));
    }
    fn cancel_timer(&mut self, name: &str) {
        let k = self.timer_key(name);
        let Some(at) = self.raw_get(&k).and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map(i64::from_be_bytes) else { return };
        let user = self.user.clone();
        self.write_raw(k, None);
        self.write_raw(timer_index_key(at, &user, name), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rejected record's new source-dictionary entries are undone by the view's rollback with
    /// its other writes (`vitals_processors::keys::Sources`; the driver's side is tested there).
    #[test]
    fn a_rolled_back_records_new_sources_do_not_leak() {
        use vitals_processors::keys::Sources;
        let dir = std::env::temp_dir().join(format!("vitals-store-sources-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("t.redb")).unwrap();
        let mut overlay = Overlay::default();
        {
            let mut view = UserState::new(&store, &mut overlay, "u");
            let mut src = Sources::load(&view, "src");
            assert_eq!(src.code_or_add(&mut view, "watch"), 0);
        }
        {
            let mut view = UserState::new(&store, &mut overlay, "u");
            let mut src = Sources::load(&view, "src");
            assert_eq!(src.code_or_add(&mut view, "ring"), 1);
            view.rollback();
        }
        let view = UserState::new(&store, &mut overlay, "u");
        assert_eq!(Sources::load(&view, "src").names(), ["watch".to_owned()]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_interval_is_invisible_until_committed_and_then_all_there() {
        let dir = std::env::temp_dir().join(format!("vitals-store-{}", std::process::id()));
        let path = dir.join("t.redb");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&path).unwrap();
        let mut ov = Overlay::default();
        {
            let mut s = UserState::new(&store, &mut ov, "u1");
            s.put("a/1", b"x".to_vec());
            s.put("a/2", b"y".to_vec());
            s.put("b", b"z".to_vec());
            s.delete("a/2");
            assert_eq!(s.scan("a/"), vec![("a/1".to_owned(), b"x".to_vec())]);
        }
        assert_eq!(store.get(&format!("u1{SEP}a/1")).unwrap(), None, "not visible before commit");
        let cp = Checkpoint { offsets: BTreeMap::from([("hot".to_owned(), 7)]), seq: 3, stream_time_ms: 99, out_next: 12, max_epoch: 4 };
        store.commit(ov, &cp).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.checkpoint().unwrap(), cp);
        let mut ov = Overlay::default();
        let s = UserState::new(&store, &mut ov, "u1");
        assert_eq!(s.get("a/1"), Some(b"x".to_vec()));
        assert_eq!(s.get("a/2"), None);
        let mut ov2 = Overlay::default();
        let mut s2 = UserState::new(&store, &mut ov2, "u1");
        s2.put("a/1", b"changed".to_vec());
        s2.put("c", b"new".to_vec());
        s2.rollback();
        let s2 = UserState::new(&store, &mut ov2, "u1");
        assert_eq!((s2.get("a/1"), s2.get("c")), (Some(b"x".to_vec()), None), "a rolled-back view leaves nothing");
        let other = UserState::new(&store, &mut Overlay::default(), "u2").scan("");
        assert!(other.is_empty(), "users do not see each other's state");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn dump(store: &Store) -> Vec<(String, Vec<u8>)> {
        store.scan("").unwrap()
    }

    #[test]
    fn a_snapshot_round_trips_state_and_checkpoint() {
        let dir = std::env::temp_dir().join(format!("vitals-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("a.redb")).unwrap();
        let mut ov = Overlay::default();
        for u in 0..50 {
            let mut s = UserState::at(&store, &mut ov, &format!("user-{u}"), 0);
            s.put("day/2026-01-01", vec![u as u8; 300]);
            s.put("empty", Vec::new());
            s.set_timer("close", 1_000 + u);
        }
        let cp = Checkpoint {
            offsets: BTreeMap::from([("hot".to_owned(), 70), ("cold".to_owned(), 5)]),
            seq: 1234,
            stream_time_ms: 42,
            out_next: 77,
            max_epoch: 3,
        };
        store.commit(ov, &cp).unwrap();
        let bytes = store.export().unwrap();
        let restored = Store::import(&dir.join("b.redb"), &bytes).unwrap();
        assert_eq!(restored.checkpoint().unwrap(), cp);
        assert_eq!(dump(&restored), dump(&store), "every key, timers included");
        assert_eq!(dump(&restored).len(), 50 * 4);
        assert_eq!(restored.export().unwrap(), bytes, "export is a function of the content");
        // Through files, streamed both ways: the same bytes, the same store.
        let file = dir.join("a.snap");
        assert_eq!(store.export_file(&file).unwrap(), bytes.len() as u64);
        assert_eq!(std::fs::read(&file).unwrap(), bytes);
        let from_file = Store::import_file(&dir.join("f.redb"), &file).unwrap();
        assert_eq!((from_file.checkpoint().unwrap(), dump(&from_file)), (cp.clone(), dump(&store)));
        // The restored store is a working store: it reopens and takes commits.
        drop(restored);
        let reopened = Store::open(&dir.join("b.redb")).unwrap();
        assert_eq!(reopened.checkpoint().unwrap(), cp);
        assert!(!dir.join("b.redb.import-tmp").exists());
        // An empty store round-trips too.
        let empty = Store::open(&dir.join("c.redb")).unwrap();
        let e = Store::import(&dir.join("d.redb"), &empty.export().unwrap()).unwrap();
        assert_eq!(e.checkpoint().unwrap(), Checkpoint::default());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_corrupted_or_foreign_snapshot_is_refused_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("vitals-snapbad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("a.redb")).unwrap();
        let mut ov = Overlay::default();
        UserState::new(&store, &mut ov, "u").put("k", b"value".to_vec());
        store.commit(ov, &Checkpoint { seq: 9, ..Checkpoint::default() }).unwrap();
        let good = store.export().unwrap();
        let target = dir.join("b.redb");
        // Refused alike from memory and from a file (streamed), leaving nothing either way.
        let file = dir.join("snap");
        let refused = |bytes: &[u8]| {
            let err = Store::import(&target, bytes).err().expect("refused").to_string();
            assert!(!target.exists(), "nothing left at the target after: {err}");
            std::fs::write(&file, bytes).unwrap();
            let streamed = Store::import_file(&target, &file).err().expect("refused from a file").to_string();
            assert!(!target.exists(), "nothing left at the target after: {streamed}");
            assert_eq!(streamed, err, "the same reason from a file");
            err
        };
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x01;
        assert!(refused(&flipped).contains("checksum mismatch"));
        assert!(refused(&good[..good.len() - 1]).contains("checksum mismatch"));
        assert!(refused(&good[..10]).contains("too short"));
        let mut foreign = good.clone();
        foreign[0] = b'X';
        assert!(refused(&foreign).contains("bad magic"));
        // A future format version with a valid checksum is refused by version.
        let mut future = good[..good.len() - 32].to_vec();
        future[8..12].copy_from_slice(&2u32.to_be_bytes());
        let sum = <sha2::Sha256 as sha2::Digest>::digest(&future);
        future.extend_from_slice(&sum);
        assert!(refused(&future).contains("format version 2"));
        // The good one is accepted, and not over an existing store.
        Store::import(&target, &good).unwrap();
        assert!(Store::import(&target, &good).err().unwrap().to_string().contains("existing store"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn timers_fire_in_time_order_are_hidden_from_scans_and_roll_back() {
        let dir = std::env::temp_dir().join(format!("vitals-timers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("t.redb")).unwrap();
        let mut ov = Overlay::default();
        {
            let mut a = UserState::at(&store, &mut ov, "a", 0);
            a.set_timer("late", 300);
            a.set_timer("early", 500);
            a.set_timer("early", 100); // moved, not duplicated
            assert!(a.scan("").is_empty(), "timers are not processor state");
        }
        UserState::at(&store, &mut ov, "b", 0).set_timer("mid", 200);
        let mut b = UserState::at(&store, &mut ov, "b", 0);
        b.set_timer("x", 50);
        b.rollback();
        assert_eq!(ov.next_due_timer(&store, 99).unwrap(), None);
        assert_eq!(ov.next_due_timer(&store, 100).unwrap(), Some(("a".into(), "early".into())));
        store.commit(ov, &Checkpoint::default()).unwrap();
        let mut ov = Overlay::default();
        let mut order = vec![];
        while let Some((user, name)) = ov.next_due_timer(&store, 1_000).unwrap() {
            UserState::at(&store, &mut ov, &user, 1_000).cancel_timer(&name);
            order.push(name);
        }
        assert_eq!(order, ["early", "mid", "late"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
