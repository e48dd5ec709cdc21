//! Where the coordinator keeps its state: runs, the generation counter (the fencing
//! token), committed checkpoints and the data ledger. `embedded` (the default) is
//! an in-process map persisted to one file in the data directory, rewritten
//! atomically on every change, so a restarted coordinator resumes its runs.
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
            Store::Embedded(s) => Ok(s.map.lock().await.get(key).cloned()),
            Store::Etcd(e) => Ok(e.list(key, false).await?.into_iter().next().map(|(_, v)| v)),
        }
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        match self {
            Store::Embedded(s) => Ok(s
                .map
                .lock()
                .await
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
            Store::Etcd(e) => e.list(prefix, true).await,
        }
    }

    pub async fn put(&self, key: &str, value: String) -> Result<()> {
        self.apply(None, vec![(key.to_string(), Some(value))])
            .await
            .map(|_| ())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        match self {
            Store::Embedded(s) => {
                let mut map = s.map.lock().await;
                map.retain(|k, _| !k.starts_with(prefix));
                s.persist(&map)
            }
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
        match self {
            Store::Embedded(s) => {
                let mut map = s.map.lock().await;
                if let Some(g) = fence {
                    let current = map.get(GENERATION_KEY).and_then(|v| v.parse::<u64>().ok());
                    if current != Some(g) {
                        return Ok(false);
                    }
                }
                for (k, v) in writes {
                    match v {
                        Some(v) => map.insert(k, v),
                        None => map.remove(&k),
                    };
                }
                s.persist(&map)?;
                Ok(true)
            }
            Store::Etcd(e) => e.apply(fence, writes).await,
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
        Ok(Etcd { client })
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
        Ok(resp.succeeded())
    }
}

/// The embedded store: a map persisted to `<data-dir>/store.json`.
#[derive(Debug)]
pub struct Embedded {
    path: PathBuf,
    map: Mutex<BTreeMap<String, String>>,
}

impl Embedded {
    /// Opens (or creates) the store file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("store.json");
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        Ok(Embedded {
            path,
            map: Mutex::new(map),
        })
    }

    fn persist(&self, map: &BTreeMap<String, String>) -> Result<()> {
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(map).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
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
}
