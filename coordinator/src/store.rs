//! Where the coordinator keeps its state: runs, the generation counter (the fencing
//! token), committed checkpoints and the data ledger. `embedded` (the default) is
//! an in-process map made durable in the data directory (a snapshot plus an
//! append-only log of changes), so a restarted coordinator resumes its runs.
//! `etcd` keeps the same keys in an etcd cluster.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt store file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("etcd: {0}")]
    Etcd(String),
    /// etcd refused the request for good (too large, over its quota, not
    /// permitted): retrying cannot help.
    #[error("etcd refused: {0}")]
    Rejected(String),
}

impl StoreError {
    /// Whether asking again cannot help: etcd's refusals, a corrupt file, a
    /// full disk or quota, a file the store may not write.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Rejected(_) | StoreError::Corrupt { .. } => true,
            StoreError::Io { source, .. } => {
                is_full(source)
                    || matches!(
                        source.kind(),
                        std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    )
            }
            StoreError::Etcd(_) => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The key holding the generation counter, the fencing token of every commit.
pub const GENERATION_KEY: &str = "dpo/generation";

/// The coordinator's key-value store.
#[derive(Debug)]
pub enum Store {
    Embedded(Embedded),
    Etcd(Box<Etcd>),
}

impl Store {
    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        match self {
            Store::Embedded(s) => Ok(s.state.lock().await.map.get(key).cloned()),
            Store::Etcd(e) => Ok(e.list(key, false).await?.into_iter().next().map(|(_, v)| v)),
        }
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        match self {
            Store::Embedded(s) => Ok(s
                .state
                .lock()
                .await
                .map
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
            Store::Etcd(e) => e.list(prefix, true).await,
        }
    }

    /// Up to `limit` keys under `prefix` that sort after `after` (from the
    /// first when `None`), in key order: how long listings are read in pages.
    pub async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        match self {
            Store::Embedded(s) => {
                let state = s.state.lock().await;
                let from = match after {
                    Some(a) => std::ops::Bound::Excluded(a.to_string()),
                    None => std::ops::Bound::Included(prefix.to_string()),
                };
                Ok(state
                    .map
                    .range((from, std::ops::Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect())
            }
            Store::Etcd(e) => e.list_page(prefix, after, limit).await,
        }
    }

    /// Bytes of keys and values this store was asked to write since it opened:
    /// what a change costs the store (tests hold it constant per step).
    pub fn bytes_written(&self) -> u64 {
        self.written().load(std::sync::atomic::Ordering::Relaxed)
    }

    fn written(&self) -> &std::sync::atomic::AtomicU64 {
        match self {
            Store::Embedded(s) => &s.written,
            Store::Etcd(e) => &e.written,
        }
    }

    pub async fn put(&self, key: &str, value: String) -> Result<()> {
        self.apply(None, vec![(key.to_string(), Some(value))])
            .await
            .map(|_| ())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        match self {
            Store::Embedded(s) => s
                .commit(None, LogOp::DeletePrefix(prefix.to_string()), false)
                .await
                .map(|_| ()),
            Store::Etcd(e) => e.delete_prefix(prefix).await,
        }
    }

    /// Applies `writes` (a `None` value deletes) atomically, and only if the
    /// generation counter equals `fence` when one is given. Returns whether it did.
    pub async fn apply(
        &self,
        fence: Option<u64>,
        writes: Vec<(String, Option<String>)>,
    ) -> Result<bool> {
        let bytes: usize = writes
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
            .sum();
        self.written()
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        match self {
            Store::Embedded(s) => s.commit(fence, LogOp::Writes(writes), false).await,
            Store::Etcd(e) => e.apply(fence, writes).await,
        }
    }

    /// Writes a run's end (unfenced): like [`Store::apply`], except that on a
    /// full disk the embedded store gives up its reserve for it, so a run that
    /// failed for lack of space is still recorded as failed.
    pub async fn record_end(&self, writes: Vec<(String, Option<String>)>) -> Result<bool> {
        match self {
            Store::Embedded(s) => s.commit(None, LogOp::Writes(writes), true).await,
            Store::Etcd(_) => self.apply(None, writes).await,
        }
    }
}

impl Store {
    /// Records a worker under `dpo/workers/<id>` bound to a lease of `ttl` (etcd):
    /// the key vanishes by itself when the lease lapses, so a standby coordinator
    /// and operators see live workers only. Returns the lease (embedded: none; the
    /// coordinator tracks leases in memory either way).
    pub async fn register_worker(
        &self,
        id: &str,
        info: String,
        ttl: std::time::Duration,
    ) -> Result<Option<i64>> {
        let Store::Etcd(e) = self else {
            return Ok(None);
        };
        let secs = ttl.as_secs().max(1) as i64;
        let lease = e
            .retry("lease grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?
            .id();
        let key = format!("dpo/workers/{id}");
        e.retry("put worker", |mut c| {
            let (key, info) = (key.clone(), info.clone());
            async move {
                c.put(
                    key,
                    info,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
                .await
            }
        })
        .await?;
        Ok(Some(lease))
    }

    /// Renews a worker's lease once (on its heartbeat).
    pub async fn renew(&self, lease: i64) -> Result<()> {
        let Store::Etcd(e) = self else {
            return Ok(());
        };
        let mut c = e.client();
        let (mut keeper, mut stream) = c
            .lease_keep_alive(lease)
            .await
            .map_err(|err| StoreError::Etcd(format!("lease keep-alive: {err}")))?;
        keeper
            .keep_alive()
            .await
            .map_err(|err| StoreError::Etcd(format!("lease keep-alive: {err}")))?;
        let _ = stream.message().await;
        Ok(())
    }

    /// Ends a worker's lease (its key goes with it).
    pub async fn revoke(&self, lease: i64) {
        if let Store::Etcd(e) = self {
            let mut c = e.client();
            let _ = c.lease_revoke(lease).await;
        }
    }
}

/// How to reach a secured etcd: TLS (a CA, optionally a client certificate)
/// and/or etcd's user authentication.
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    pub tls: Option<etcd_client::TlsOptions>,
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The etcd store: the same keys in an etcd cluster. Every call is retried for a
/// while, so an etcd restart stalls the coordinator instead of failing runs;
/// fenced writes are one transaction comparing the generation key.
#[derive(Clone)]
pub struct Etcd {
    client: etcd_client::Client,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The revision this coordinator last compacted etcd's history to.
    compacted: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// etcd keeps every revision of every key until it is compacted: once this many
/// revisions have accumulated, the coordinator compacts all but the newest
/// `KEEP_REVISIONS` (its own writes are the bulk of them: one per recorded step).
const COMPACT_EVERY: i64 = 2_000;
const KEEP_REVISIONS: i64 = 500;

/// An etcd refusal that retrying cannot fix: a request too large, the
/// database over its quota, no permission.
fn permanent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::InvalidArgument
                | tonic::Code::ResourceExhausted
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::OutOfRange
        ),
        etcd_client::Error::InvalidArgs(_) => true,
        _ => false,
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").finish_non_exhaustive()
    }
}

/// How long one store call keeps retrying an unreachable etcd.
const ETCD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

impl Etcd {
    /// Connects to `endpoints` (`http://`, `https://` or bare `host:port`, which
    /// means TLS when `security.tls` is set).
    pub async fn connect(endpoints: &[String], security: EtcdSecurity) -> Result<Self> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(3))
            .with_timeout(std::time::Duration::from_secs(5))
            .with_keep_alive(
                std::time::Duration::from_secs(5),
                std::time::Duration::from_secs(5),
            );
        if let Some(tls) = security.tls {
            opts = opts.with_tls(tls);
        }
        if let Some((user, password)) = security.user {
            opts = opts.with_user(user, password);
        }
        let client = etcd_client::Client::connect(endpoints, Some(opts))
            .await
            .map_err(|e| StoreError::Etcd(format!("connecting to {endpoints:?}: {e}")))?;
        Ok(Etcd {
            client,
            written: Default::default(),
            compacted: Default::default(),
        })
    }

    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let start = std::time::Instant::now();
        let mut warned = false;
        loop {
            match f(self.client.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if permanent(&e) => {
                    return Err(StoreError::Rejected(format!("{what}: {e}")));
                }
                Err(e) if start.elapsed() < ETCD_PATIENCE => {
                    if !warned {
                        tracing::warn!(what, error = %e, "etcd unavailable; retrying");
                        warned = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                Err(e) => return Err(StoreError::Etcd(format!("{what}: {e}"))),
            }
        }
    }

    async fn list(&self, key: &str, prefix: bool) -> Result<Vec<(String, String)>> {
        let resp = self
            .retry("get", |mut c| {
                let key = key.to_string();
                async move {
                    let opts = prefix.then(|| etcd_client::GetOptions::new().with_prefix());
                    c.get(key, opts).await
                }
            })
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let (Ok(k), Ok(v)) = (kv.key_str(), kv.value_str()) else {
                return Err(StoreError::Etcd(format!("non-UTF-8 data under {key:?}")));
            };
            out.push((k.to_string(), v.to_string()));
        }
        out.sort();
        Ok(out)
    }

    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        // From just after `after` (its key plus a NUL byte) to the end of the prefix.
        let start = after.map_or_else(
            || prefix.as_bytes().to_vec(),
            |a| {
                let mut k = a.as_bytes().to_vec();
                k.push(0);
                k
            },
        );
        let end = prefix_end(prefix.as_bytes());
        let resp = self
            .retry("get page", |mut c| {
                let (start, end) = (start.clone(), end.clone());
                async move {
                    let opts = etcd_client::GetOptions::new()
                        .with_range(end)
                        .with_limit(limit as i64)
                        .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
                    c.get(start, Some(opts)).await
                }
            })
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| match (kv.key_str(), kv.value_str()) {
                (Ok(k), Ok(v)) => Ok((k.to_string(), v.to_string())),
                _ => Err(StoreError::Etcd(format!("non-UTF-8 data under {prefix:?}"))),
            })
            .collect()
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.retry("delete", |mut c| {
            let p = prefix.to_string();
            async move {
                c.delete(p, Some(etcd_client::DeleteOptions::new().with_prefix()))
                    .await
            }
        })
        .await
        .map(|_| ())
    }

    async fn apply(
        &self,
        fence: Option<u64>,
        writes: Vec<(String, Option<String>)>,
    ) -> Result<bool> {
        let resp = self
            .retry("txn", |mut c| {
                let ops: Vec<etcd_client::TxnOp> = writes
                    .iter()
                    .map(|(k, v)| match v {
                        Some(v) => etcd_client::TxnOp::put(k.as_str(), v.as_str(), None),
                        None => etcd_client::TxnOp::delete(k.as_str(), None),
                    })
                    .collect();
                let mut txn = etcd_client::Txn::new();
                if let Some(g) = fence {
                    txn = txn.when([etcd_client::Compare::value(
                        GENERATION_KEY,
                        etcd_client::CompareOp::Equal,
                        g.to_string(),
                    )]);
                }
                let txn = txn.and_then(ops);
                async move { c.txn(txn).await }
            })
            .await?;
        if let Some(h) = resp.header() {
            self.compact_if_due(h.revision()).await;
        }
        Ok(resp.succeeded())
    }

    /// Compacts etcd's history up to `KEEP_REVISIONS` behind `revision` once
    /// `COMPACT_EVERY` revisions have piled up since the last compaction, so a
    /// long run keeps etcd's database bounded. A failed compaction is logged and
    /// tried again later (another client may have compacted further already).
    async fn compact_if_due(&self, revision: i64) {
        use std::sync::atomic::Ordering;
        let last = self.compacted.load(Ordering::Relaxed);
        let target = revision - KEEP_REVISIONS;
        if target - last < COMPACT_EVERY {
            return;
        }
        if self
            .compacted
            .compare_exchange(last, target, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // another write is compacting
        }
        match self.client.clone().compact(target, None).await {
            Ok(_) => tracing::debug!(revision = target, "compacted etcd's history"),
            Err(e) => {
                tracing::warn!(revision = target, error = %e, "could not compact etcd's history")
            }
        }
    }
}

/// The smallest key above every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// The embedded store: a map kept in memory and made durable as a snapshot
/// (`store.json`) plus an append-only log of the changes since (`store.log`, one
/// fsynced JSON line per change). A change therefore costs what it writes, not
/// the size of the whole map; the log is folded into a new snapshot once it
/// outgrows the snapshot (amortised constant per change). A torn last line (a
/// crash mid-append) is dropped on open.
#[derive(Debug)]
pub struct Embedded {
    dir: PathBuf,
    /// Shared with the blocking thread that writes and fsyncs a change (the
    /// lock is held across it, so changes stay in order).
    state: std::sync::Arc<Mutex<EmbeddedState>>,
    written: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct EmbeddedState {
    map: BTreeMap<String, String>,
    log: std::fs::File,
    log_bytes: u64,
    snapshot_bytes: u64,
    /// The log size at which the next compaction is tried (raised after one
    /// fails, so a full disk is not asked again on every commit).
    compact_at: u64,
}

/// Bytes the store keeps in `store.reserve` for a full disk: a write that
/// finds no space is refused for good (its run fails), and the write that
/// records the run's end may use the reserve's space, so it is still durable.
const RESERVE_BYTES: usize = 4 << 20;

/// Whether an I/O error means the disk (or the quota) is full.
fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// One line of `store.log`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum LogOp {
    /// Applied writes (`None` deletes).
    #[serde(rename = "w")]
    Writes(Vec<(String, Option<String>)>),
    #[serde(rename = "d")]
    DeletePrefix(String),
}

impl LogOp {
    fn apply_to(self, map: &mut BTreeMap<String, String>) {
        match self {
            LogOp::Writes(writes) => {
                for (k, v) in writes {
                    match v {
                        Some(v) => map.insert(k, v),
                        None => map.remove(&k),
                    };
                }
            }
            LogOp::DeletePrefix(p) => map.retain(|k, _| !k.starts_with(&p)),
        }
    }
}

/// The log is folded into the snapshot once it is larger than this and than
/// the snapshot itself.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

impl Embedded {
    /// Opens (or creates) the store in `dir`: the snapshot, then the log replayed.
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let snapshot = dir.join("store.json");
        let (mut map, snapshot_bytes) = match std::fs::read(&snapshot) {
            Ok(bytes) => (
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: snapshot.clone(),
                    reason: e.to_string(),
                })?,
                bytes.len() as u64,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (BTreeMap::new(), 0),
            Err(source) => {
                return Err(StoreError::Io {
                    path: snapshot,
                    source,
                });
            }
        };
        let log_path = dir.join("store.log");
        let text = match std::fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(StoreError::Io {
                    path: log_path,
                    source,
                });
            }
        };
        // Whole lines only: a torn tail is what a crash mid-append leaves.
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for (n, line) in text[..whole].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let op: LogOp = serde_json::from_slice(line).map_err(|e| StoreError::Corrupt {
                path: log_path.clone(),
                reason: format!("line {}: {e}", n + 1),
            })?;
            op.apply_to(&mut map);
        }
        if whole < text.len() {
            tracing::warn!(path = %log_path.display(), bytes = text.len() - whole, "dropping a torn store.log tail");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        log.set_len(whole as u64).map_err(io(&log_path))?;
        let store = Embedded {
            dir: dir.to_path_buf(),
            state: std::sync::Arc::new(Mutex::new(EmbeddedState {
                map,
                log,
                log_bytes: whole as u64,
                snapshot_bytes,
                compact_at: COMPACT_MIN_BYTES.max(snapshot_bytes),
            })),
            written: Default::default(),
        };
        store.keep_reserve();
        Ok(store)
    }

    /// Makes sure `store.reserve` holds [`RESERVE_BYTES`] of real blocks (not a
    /// sparse file); without the space for it, goes on without (and says so).
    fn keep_reserve(&self) {
        let path = self.dir.join("store.reserve");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES as u64) {
            return;
        }
        let written = std::fs::File::create(&path).and_then(|mut f| {
            f.write_all(&vec![0u8; RESERVE_BYTES])?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(path = %path.display(), error = %e, "no room for the store's reserve against a full disk");
        }
    }

    /// Gives the reserve's space in `dir` back to the file system; whether
    /// there was one.
    fn release_reserve(dir: &Path) -> bool {
        let path = dir.join("store.reserve");
        let released = std::fs::remove_file(&path).is_ok();
        if released {
            tracing::error!(dir = %dir.display(), "the disk is full: released the store's reserve to record a run's end; free space and restart to restore it");
        }
        released
    }

    /// Appends `line` to the log and fsyncs it; on an error the log is cut back
    /// to its last whole line, so no torn line is left for later lines to follow.
    fn append(state: &mut EmbeddedState, line: &[u8]) -> std::io::Result<()> {
        let written = state
            .log
            .write_all(line)
            .and_then(|()| state.log.sync_data());
        if written.is_err() {
            let _ = state.log.set_len(state.log_bytes);
        }
        written
    }

    /// Applies `op` if the generation counter equals `fence` (when one is
    /// given; returns whether it did): the log line is written and fsynced,
    /// and the log compacted when due, on a blocking thread, never on the
    /// runtime's, while the lock keeps changes in order.
    async fn commit(&self, fence: Option<u64>, op: LogOp, reserve: bool) -> Result<bool> {
        let mut state = self.state.clone().lock_owned().await;
        if let Some(g) = fence {
            let current = state
                .map
                .get(GENERATION_KEY)
                .and_then(|v| v.parse::<u64>().ok());
            if current != Some(g) {
                return Ok(false);
            }
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || Self::commit_now(&dir, &mut state, op, reserve))
            .await
            .map_err(|e| StoreError::Io {
                path: self.dir.join("store.log"),
                source: std::io::Error::other(format!("the store's writer stopped: {e}")),
            })??;
        Ok(true)
    }

    /// Makes `op` durable (one fsynced log line), applies it, and compacts when
    /// due. On a full disk the write is refused, unless `reserve` lets it use
    /// the space of `store.reserve`.
    fn commit_now(dir: &Path, state: &mut EmbeddedState, op: LogOp, reserve: bool) -> Result<()> {
        let log_path = dir.join("store.log");
        let io = |source| StoreError::Io {
            path: log_path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&op).map_err(|e| StoreError::Corrupt {
            path: log_path.clone(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        match Self::append(state, &line) {
            Ok(()) => {}
            Err(e) if is_full(&e) && reserve && Self::release_reserve(dir) => {
                Self::append(state, &line).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        state.log_bytes += line.len() as u64;
        op.apply_to(&mut state.map);
        if state.log_bytes > state.compact_at {
            // The change is durable in the log whatever compaction does.
            if let Err(e) = Self::compact(dir, state) {
                state.compact_at = state.log_bytes + COMPACT_MIN_BYTES;
                tracing::warn!(error = %e, "could not compact the store; the log keeps growing until it can");
            }
        }
        Ok(())
    }

    /// Writes the map as the new snapshot, then empties the log. A crash between
    /// the two replays the log over the new snapshot, which changes nothing
    /// (every logged change is already in it).
    fn compact(dir: &Path, state: &mut EmbeddedState) -> Result<()> {
        let snapshot = dir.join("store.json");
        let bytes = serde_json::to_vec(&state.map).map_err(|e| StoreError::Corrupt {
            path: snapshot.clone(),
            reason: e.to_string(),
        })?;
        dpo_data::atomic::write(&snapshot, &bytes).map_err(|source| StoreError::Io {
            path: snapshot.clone(),
            source,
        })?;
        let log_path = dir.join("store.log");
        state
            .log
            .set_len(0)
            .and_then(|()| state.log.sync_all())
            .map_err(|source| StoreError::Io {
                path: log_path,
                source,
            })?;
        tracing::debug!(
            snapshot_bytes = bytes.len(),
            log_bytes = state.log_bytes,
            "store compacted"
        );
        state.snapshot_bytes = bytes.len() as u64;
        state.log_bytes = 0;
        state.compact_at = COMPACT_MIN_BYTES.max(state.snapshot_bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_persists_and_fences() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| StoreError::Io {
            path: "tmp".into(),
            source,
        })?;
        let store = Store::Embedded(Embedded::open(dir.path())?);
        store.put(GENERATION_KEY, "3".into()).await?;
        store.put("dpo/runs/a", "1".into()).await?;
        store.put("dpo/runs/a/ledger/1", "x".into()).await?;
        store.put("dpo/runt", "no".into()).await?;
        // A commit fenced by a stale generation is refused and changes nothing.
        let ok = store
            .apply(Some(2), vec![("dpo/runs/a".into(), Some("2".into()))])
            .await?;
        assert!(!ok);
        assert!(
            store
                .apply(Some(3), vec![("dpo/runs/a".into(), Some("3".into()))])
                .await?
        );
        drop(store);
        let store = Store::Embedded(Embedded::open(dir.path())?);
        assert_eq!(store.get("dpo/runs/a").await?.as_deref(), Some("3"));
        assert_eq!(store.list("dpo/runs/a").await?.len(), 2);
        store.delete_prefix("dpo/runs/a/").await?;
        assert_eq!(store.list("dpo/runs/").await?.len(), 1);
        assert_eq!(store.get("dpo/runt").await?.as_deref(), Some("no"));
        Ok(())
    }

    fn tmp() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|source| StoreError::Io {
            path: "tmp".into(),
            source,
        })
    }

    #[tokio::test]
    async fn a_change_appends_to_the_log_and_a_torn_tail_is_dropped() -> Result<()> {
        let dir = tmp()?;
        {
            let store = Store::Embedded(Embedded::open(dir.path())?);
            store.put("a", "1".into()).await?;
            store.put("b", "2".into()).await?;
            store.delete_prefix("a").await?;
            assert_eq!(store.bytes_written(), 4);
        }
        // Nothing was rewritten whole: the log holds the three changes.
        let log = std::fs::read_to_string(dir.path().join("store.log")).unwrap_or_default();
        assert_eq!(log.lines().count(), 3, "{log}");
        assert!(!dir.path().join("store.json").exists());
        // A crash mid-append leaves half a line: dropped on open, the rest kept.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("store.log"))
            .and_then(|mut f| f.write_all(br#"{"w":[["c","#))
            .map_err(|source| StoreError::Io {
                path: "store.log".into(),
                source,
            })?;
        let store = Store::Embedded(Embedded::open(dir.path())?);
        assert_eq!(store.get("a").await?, None);
        assert_eq!(store.get("b").await?.as_deref(), Some("2"));
        assert_eq!(store.get("c").await?, None);
        // The log is usable after the torn tail: a new change reads back.
        store.put("d", "4".into()).await?;
        drop(store);
        let store = Store::Embedded(Embedded::open(dir.path())?);
        assert_eq!(store.get("d").await?.as_deref(), Some("4"));
        Ok(())
    }

    #[tokio::test]
    async fn the_log_folds_into_a_snapshot_and_reads_back_the_same() -> Result<()> {
        let dir = tmp()?;
        let value = "x".repeat(4096);
        {
            let store = Store::Embedded(Embedded::open(dir.path())?);
            for i in 0..600 {
                store.put(&format!("k/{i:04}"), value.clone()).await?;
            }
            store.delete_prefix("k/00").await?;
        }
        let log_len = std::fs::metadata(dir.path().join("store.log"))
            .map(|m| m.len())
            .unwrap_or(u64::MAX);
        assert!(
            log_len < COMPACT_MIN_BYTES,
            "compacted: log is {log_len} bytes"
        );
        assert!(dir.path().join("store.json").exists());
        let store = Store::Embedded(Embedded::open(dir.path())?);
        let keys = store.list("k/").await?;
        assert_eq!(keys.len(), 500);
        assert_eq!(keys[0].0, "k/0100");
        Ok(())
    }

    #[tokio::test]
    async fn pages_cover_a_prefix_in_order_without_repeats() -> Result<()> {
        let dir = tmp()?;
        let store = Store::Embedded(Embedded::open(dir.path())?);
        for i in 0..25 {
            store.put(&format!("p/{i:03}"), i.to_string()).await?;
        }
        store.put("p0", "outside".into()).await?;
        store.put("o", "before".into()).await?;
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.list_page("p/", after.as_deref(), 10).await?;
            seen.extend(page.iter().map(|(_, v)| v.clone()));
            match page.last() {
                Some((k, _)) if page.len() == 10 => after = Some(k.clone()),
                _ => break,
            }
        }
        let want: Vec<String> = (0..25).map(|i: i32| i.to_string()).collect();
        assert_eq!(seen, want);
        Ok(())
    }

    #[test]
    fn a_prefix_end_is_the_next_key_past_the_prefix() {
        assert_eq!(prefix_end(b"dpo/ledger/"), b"dpo/ledger0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }
}
