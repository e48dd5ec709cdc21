//! Helpers for the end-to-end tests: build a tiny model and dataset with the
//! repo's own generators, start real `dpo-coordinator` / `dpo-worker` processes
//! on loopback, follow a run through its files, compare saved weights.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where cargo put the workspace's binaries (next to this test's `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(name)
}

pub fn python() -> String {
    std::env::var("DPO_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A tiny random Llama with its tokenizer, and `copy`-task pairs, under `dir`.
pub fn fixtures(dir: &Path, train_rows: usize) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(python())
            .args(args)
            .current_dir(root())
            .output()
            .context("running python")?;
        if !out.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let model = dir.join("model");
    let data = dir.join("data");
    run(&[
        "examples/tiny_model.py",
        "--out",
        &model.display().to_string(),
        "--hidden",
        "32",
        "--layers",
        "2",
    ])?;
    run(&[
        "examples/make_pairs.py",
        "--task",
        "copy",
        "--out",
        &data.display().to_string(),
        "--n",
        &train_rows.to_string(),
        "--eval-n",
        "16",
    ])?;
    Ok(())
}

/// A run spec over the fixtures of `dir` (full-batch-per-step SGD by default).
pub fn spec(dir: &Path, name: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[model]
path = "{model}"
[data]
train = "{train}"
max_length = 48
max_prompt_length = 24
shuffle = true
seed = 3
[objective]
loss = "sigmoid"
beta = 0.5
[optim]
name = "sgd"
lr = 0.5
[train]
global_batch_size = 12
output = "{out}"
{extra}
"#,
        model = dir.join("model").display(),
        train = dir.join("data/train.jsonl").display(),
        out = dir.join(name).display(),
    )
}

/// A free loopback port (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(logs)?;
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .env("OMP_NUM_THREADS", "1")
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.into(),
            child,
        })
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit; the time
    /// it took, or `None` (it is then killed).
    pub fn terminate(&mut self, limit: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            return None;
        }
        while start.elapsed() < limit {
            if self.exited() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a coordinator on `port` with its data in `data_dir`; waits until it
/// listens. Specs may name paths under the data dir's parent (the case's
/// directory: its model, datasets and outputs).
pub fn coordinator(
    port: u16,
    data_dir: &Path,
    logs: &Path,
    name: &str,
    extra: &[&str],
    token: Option<&str>,
) -> anyhow::Result<Proc> {
    let addr_file = data_dir.join(format!("{name}.addr"));
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(bin("dpo-coordinator"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--lease-ttl-ms", "4000"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--allow-path")
        .arg(data_dir.parent().unwrap_or(data_dir))
        .args(extra.iter().filter(|a| **a != "--standby"))
        .env_remove("DPO_TOKEN");
    if let Some(t) = token {
        cmd.env("DPO_TOKEN", t);
    }
    let mut p = Proc::spawn(name, &mut cmd, logs)?;
    if extra.contains(&"--standby") {
        return Ok(p);
    }
    wait_for(Duration::from_secs(30), || {
        if p.exited() {
            bail!(
                "{name} exited; see {}",
                logs.join(format!("{name}.log")).display()
            );
        }
        Ok(addr_file.exists())
    })?;
    Ok(p)
}

/// Whether a coordinator has written its address file (it listens).
pub fn listening(data_dir: &Path, name: &str) -> bool {
    data_dir.join(format!("{name}.addr")).exists()
}

pub fn worker(port: u16, name: &str, logs: &Path) -> anyhow::Result<Proc> {
    worker_with(port, name, logs, &[])
}

/// [`worker`] with more command-line arguments.
pub fn worker_with(port: u16, name: &str, logs: &Path, extra: &[&str]) -> anyhow::Result<Proc> {
    Proc::spawn(
        name,
        Command::new(bin("dpo-worker"))
            .args(["--coordinator", &format!("http://127.0.0.1:{port}")])
            .args(["--device", "cpu", "--worker-id", name])
            .args(extra)
            .env_remove("DPO_TOKEN"),
        logs,
    )
}

/// Polls `f` every 20 ms until it returns true; fails after `timeout`.
pub fn wait_for(
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {timeout:?}")
}

/// `dpoctl` against the coordinator on `port`, with `--output json`.
pub fn dpoctl(port: u16, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new(bin("dpoctl"))
        .args([
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
            "--output",
            "json",
        ])
        .args(args)
        .env_remove("DPO_TOKEN")
        .output()
        .context("running dpoctl")
}

/// The parsed lines of a JSON-lines file (missing file: none).
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Steps recorded in `metrics.jsonl` so far.
pub fn steps_done(out: &Path) -> usize {
    jsonl(&out.join("metrics.jsonl")).len()
}

/// Every f32/bf16 tensor of a saved model directory (single-file safetensors), as f32.
pub fn weights(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<f32>>> {
    // A LoRA run's output is its adapter (PEFT's format).
    let adapter = dir.join("adapter_model.safetensors");
    let file = if adapter.exists() {
        adapter
    } else {
        dir.join("model.safetensors")
    };
    let bytes = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let v: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            other => bail!("{name}: dtype {other:?}"),
        };
        out.insert(name, v);
    }
    Ok(out)
}

/// Largest absolute difference between two models, and how far `b` moved from `init`.
pub fn max_diff(a: &Path, b: &Path) -> anyhow::Result<f32> {
    let (wa, wb) = (weights(a)?, weights(b)?);
    if wa.keys().ne(wb.keys()) {
        bail!("different tensor names");
    }
    let mut d = 0f32;
    for (k, va) in &wa {
        let vb = &wb[k];
        if va.len() != vb.len() {
            bail!("{k}: different sizes");
        }
        for (x, y) in va.iter().zip(vb) {
            d = d.max((x - y).abs());
        }
    }
    Ok(d)
}

/// Trains `spec` standalone (`dpo-worker train`, one process): the reference result.
pub fn train_standalone(spec_path: &Path, logs: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(logs)?;
    let out = Command::new(bin("dpo-worker"))
        .args(["train", "--device", "cpu", "--config"])
        .arg(spec_path)
        .env("OMP_NUM_THREADS", "1")
        .output()?;
    std::fs::write(logs.join("standalone.log"), &out.stderr)?;
    if !out.status.success() {
        bail!(
            "standalone training failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Starts etcd (Debian's `etcd-server`) on loopback `port` with its data in
/// `data_dir`; waits until it answers. With `tls`, clients must speak TLS and
/// present a certificate signed by its authority (`--client-cert-auth`).
pub fn etcd(
    port: u16,
    data_dir: &Path,
    logs: &Path,
    name: &str,
    tls: Option<&Pki>,
) -> anyhow::Result<Proc> {
    etcd_with(port, data_dir, logs, name, tls, &[])
}

/// [`etcd_with`] on a free client port (returned): a port another process
/// took between [`free_port`] and etcd's bind is replaced by another.
pub fn etcd_on_a_free_port(
    data_dir: &Path,
    logs: &Path,
    name: &str,
    tls: Option<&Pki>,
    extra: &[&str],
) -> anyhow::Result<(Proc, u16)> {
    let mut attempt = 0;
    loop {
        let port = free_port()?;
        match etcd_with(port, data_dir, logs, name, tls, extra) {
            Ok(p) => return Ok((p, port)),
            Err(e) if attempt < 5 && bind_lost(logs, name, port) => {
                attempt += 1;
                eprintln!("etcd: port {port} was taken meanwhile ({e}); another");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether etcd's log `name` says `port` was taken before it could bind it.
fn bind_lost(logs: &Path, name: &str, port: u16) -> bool {
    std::fs::read_to_string(logs.join(format!("{name}.log")))
        .is_ok_and(|log| log.contains(&format!("127.0.0.1:{port}: bind: address already in use")))
}

/// [`etcd`] with more flags (limits such as `--quota-backend-bytes`). Its
/// peer port is chosen here, again if another process takes it first.
pub fn etcd_with(
    port: u16,
    data_dir: &Path,
    logs: &Path,
    name: &str,
    tls: Option<&Pki>,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let mut attempt = 0;
    loop {
        let peer_port = free_port()?;
        match etcd_once(port, peer_port, data_dir, logs, name, tls, extra) {
            Err(e) if attempt < 5 && bind_lost(logs, name, peer_port) => {
                attempt += 1;
                eprintln!("etcd: peer port {peer_port} was taken meanwhile ({e}); another");
            }
            other => return other,
        }
    }
}

fn etcd_once(
    port: u16,
    peer_port: u16,
    data_dir: &Path,
    logs: &Path,
    name: &str,
    tls: Option<&Pki>,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client = format!("{scheme}://127.0.0.1:{port}");
    let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("etcd"));
    let mut cmd = Command::new(etcd);
    if let Some(pki) = tls {
        cmd.arg("--cert-file")
            .arg(&pki.server_cert)
            .arg("--key-file")
            .arg(&pki.server_key)
            .arg("--trusted-ca-file")
            .arg(&pki.ca)
            .arg("--client-cert-auth");
    }
    cmd.args(extra);
    let mut p = Proc::spawn(
        name,
        cmd.args(["--name", "e2e"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("e2e=http://127.0.0.1:{peer_port}"),
            ]),
        logs,
    )
    .context("starting etcd (Debian package etcd-server; scripts/setup.sh installs it)")?;
    wait_for(Duration::from_secs(20), || {
        if p.exited() {
            bail!(
                "etcd exited; see {}",
                logs.join(format!("{name}.log")).display()
            );
        }
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    })?;
    Ok(p)
}

/// One test's directory: fixtures, logs, outputs.
#[derive(Debug)]
pub struct Case {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    pub logs: PathBuf,
}

impl Drop for Case {
    /// A failed test keeps its directory (logs, outputs) for a look.
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.dir.take()
        {
            eprintln!("kept {}", d.keep().display());
        }
    }
}

impl Case {
    /// A directory with the tiny model and `train_rows` copy-task pairs.
    pub fn new(train_rows: usize) -> Self {
        let case = Self::empty();
        fixtures(case.path(), train_rows).expect("fixtures");
        case
    }

    /// A fresh directory without fixtures.
    pub fn empty() -> Self {
        let base = root().join("target/tmp");
        std::fs::create_dir_all(&base).expect("target/tmp");
        let dir = tempfile::Builder::new()
            .prefix("e2e-")
            .tempdir_in(base)
            .expect("tempdir");
        let logs = dir.path().join("logs");
        Case {
            root: dir.path().to_path_buf(),
            dir: Some(dir),
            logs,
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn write_spec(&self, name: &str, extra: &str) -> PathBuf {
        let p = self.path().join(format!("{name}.toml"));
        std::fs::write(&p, spec(self.path(), name, extra)).expect("spec");
        p
    }

    /// Trains `extra` standalone (the reference, under `solo/`) and writes the same
    /// spec for the cluster as `name` with a `[cluster]` section; returns its path
    /// and output directory.
    pub fn reference_and_spec(&self, name: &str, extra: &str, cluster: &str) -> (PathBuf, PathBuf) {
        let solo = self.write_spec("solo", extra);
        train_standalone(&solo, &self.logs).expect("standalone");
        let spec = self.write_spec(name, &format!("{extra}\n[cluster]\n{cluster}"));
        (spec, self.path().join(name))
    }

    /// The cluster's final weights equal the standalone run's (≤ 1e-5).
    pub fn assert_same_weights(&self, out_dir: &Path, what: &str) {
        let d = max_diff(&self.path().join("solo/final"), &out_dir.join("final"))
            .unwrap_or_else(|e| panic!("{e}{}", self.logs()));
        eprintln!("{what}: max |Δw| vs one process: {d:e}");
        assert!(d <= 1e-5, "{what} vs 1 process: max |Δw| = {d}");
    }

    /// `dpoctl submit SPEC` to the coordinator on `port`, then waits until the run
    /// has recorded `steps` steps.
    pub fn submit_and_wait(&self, port: u16, spec: &Path, out_dir: &Path, steps: usize) {
        let submitted = dpoctl(port, &["submit", &spec.display().to_string()]).expect("submit");
        assert!(
            submitted.status.success(),
            "{}",
            String::from_utf8_lossy(&submitted.stderr)
        );
        wait_for(
            Duration::from_secs(120),
            || Ok(steps_done(out_dir) >= steps),
        )
        .unwrap_or_else(|e| panic!("{e}{}", self.logs()));
    }

    /// `dpoctl submit --watch SPEC`; the run must succeed.
    pub fn submit_watch_succeeds(&self, port: u16, spec: &Path) {
        let out =
            dpoctl(port, &["submit", "--watch", &spec.display().to_string()]).expect("dpoctl");
        assert!(
            out.status.success(),
            "dpoctl: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// `dpoctl watch RUN` until it ends; it must have succeeded.
    pub fn watch_succeeds(&self, port: u16, run: &str) {
        let watched = dpoctl(port, &["watch", run]).expect("watch");
        assert!(
            watched.status.success(),
            "{}{}",
            String::from_utf8_lossy(&watched.stdout),
            self.logs()
        );
    }

    /// Every process log, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.logs) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                s.push_str(&format!("\n--- {} ---\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }
}

/// Certificates for the TLS tests, as PEM files: an authority, a server
/// certificate for `localhost`/`127.0.0.1` and a client certificate it signed,
/// and a second, unrelated authority.
#[derive(Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

fn authority(name: &str) -> anyhow::Result<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(rcgen::CertifiedIssuer::self_signed(
        params,
        rcgen::KeyPair::generate()?,
    )?)
}

/// Writes a fresh [`Pki`] under `dir`.
pub fn pki(dir: &Path) -> anyhow::Result<Pki> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku};
    std::fs::create_dir_all(dir)?;
    let ca = authority("dpo-e2e CA")?;
    let other = authority("someone else's CA")?;
    let leaf = |cn: &str, names: Vec<String>, usages: Vec<Eku>| -> anyhow::Result<_> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    // etcd also dials itself with its server certificate: both usages.
    let (server_cert, server_key) = leaf(
        "localhost",
        vec!["localhost".into(), "127.0.0.1".into()],
        vec![Eku::ServerAuth, Eku::ClientAuth],
    )?;
    let (client_cert, client_key) = leaf("dpo-e2e client", vec![], vec![Eku::ClientAuth])?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    Ok(Pki {
        ca: write("ca.pem", &ca.pem())?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server.key", &server_key)?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client.key", &client_key)?,
        other_ca: write("other-ca.pem", &other.pem())?,
    })
}

/// Every scalar of a TensorBoard run directory as TensorBoard's own
/// EventAccumulator reads it: tag → [(step, value)].
pub fn tensorboard_scalars(run_dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<(u64, f64)>>> {
    let out = run_dir.with_extension("scalars.json");
    let status = Command::new(python())
        .arg(root().join("tests/reference/tensorboard_reference.py"))
        .arg(run_dir)
        .arg(&out)
        .output()
        .context("running python")?;
    if !status.status.success() {
        bail!("{}", String::from_utf8_lossy(&status.stderr));
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let mut scalars = BTreeMap::new();
    for (tag, points) in v.as_object().context("an object")? {
        let mut list = Vec::new();
        for p in points.as_array().context("a list")? {
            list.push((
                p[0].as_u64().context("a step")?,
                p[1].as_f64().context("a value")?,
            ));
        }
        scalars.insert(tag.clone(), list);
    }
    Ok(scalars)
}
