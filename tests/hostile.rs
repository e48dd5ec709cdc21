//! A hostile or careless client against a real coordinator process, by raw
//! gRPC: a device named as a dataset, an upload without newlines, an upload
//! over the limit. Each is refused, and the coordinator's memory stays flat
//! (its peak resident size is read from /proc).

use std::path::Path;
use std::time::{Duration, Instant};

use dpo_e2e::{Case, bin, coordinator, free_port};
use dpo_proto::client::{BearerToken, channel};
use dpo_proto::v1::{self, run_service_client::RunServiceClient};

const MIB: u64 = 1 << 20;

/// A run spec over pre-tokenized data in `dir` (no tokenizer needed), as JSON.
fn spec_json(dir: &Path, train: &Path) -> anyhow::Result<String> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    std::fs::write(model.join("config.json"), r#"{"vocab_size": 64}"#)?;
    let toml = format!(
        "name = \"hostile\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[train]\nglobal_batch_size = 2\noutput = \"{}\"\n",
        model.display(),
        train.display(),
        dir.join("out").display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, toml)?;
    // The file need not exist here: a client names the coordinator's paths.
    let mut spec = dpo_proto::RunSpec::from_file(&path)?;
    spec.data.train = train.to_path_buf();
    Ok(serde_json::to_string(&spec)?)
}

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A submission: the header, then `bytes` of `byte` (no newline) as data.train
/// in 1 MiB chunks, made as they are sent.
fn upload(spec: String, bytes: u64, byte: u8) -> impl tokio_stream::Stream<Item = v1::SubmitChunk> {
    let header = v1::SubmitChunk {
        part: Some(v1::submit_chunk::Part::Header(v1::SubmitHeader {
            spec_json: spec,
            streamed_files: if bytes > 0 {
                vec!["data.train".into()]
            } else {
                Vec::new()
            },
            files: Vec::new(),
        })),
    };
    let chunks = (0..bytes.div_ceil(MIB)).map(move |i| v1::SubmitChunk {
        part: Some(v1::submit_chunk::Part::File(v1::FileChunk {
            key: "data.train".into(),
            data: vec![byte; MIB.min(bytes - i * MIB) as usize],
            name: String::new(),
        })),
    });
    tokio_stream::iter(std::iter::once(header).chain(chunks))
}

#[test]
fn devices_endless_lines_and_oversized_uploads_are_refused_with_flat_memory() {
    let case = Case::empty();
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let limit = 1024 * MIB;
    let c = coordinator(
        port,
        &data,
        &case.logs,
        "coordinator",
        &["--max-upload-bytes", &limit.to_string()],
        None,
    )
    .expect("coordinator");
    let pid = c.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ch =
            channel(&format!("http://127.0.0.1:{port}"), &Default::default()).expect("channel");
        let mut client = RunServiceClient::with_interceptor(ch, BearerToken::new(None).expect("t"))
            .max_encoding_message_size(8 << 20);
        let (base, _) = memory(pid);

        // A device named as the training file: outside the allowed
        // directories, refused at once, not opened.
        let t = Instant::now();
        let spec = spec_json(case.path(), Path::new("/dev/zero")).expect("spec");
        let e = client
            .submit(upload(spec, 0, 0))
            .await
            .expect_err("/dev/zero");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("not under a directory"), "{e}");
        // A FIFO inside them (reading it would block forever): not a file.
        let fifo = case.path().join("pipe.jsonl");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let spec = spec_json(case.path(), &fifo).expect("spec");
        let e = client.submit(upload(spec, 0, 0)).await.expect_err("a FIFO");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.message().ends_with("not a regular file or a folder"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

        // 200 MiB without a newline: written to disk as it arrives, then refused
        // at its first line, which is read no further than 64 MiB.
        let spec = spec_json(case.path(), &case.path().join("local.jsonl")).expect("spec");
        let e = client
            .submit(upload(spec.clone(), 200 * MIB, b'x'))
            .await
            .expect_err("an endless line");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("longer than 64 MiB"), "{e}");
        assert!(
            e.message().contains("local.jsonl:1"),
            "the error names the client's file: {e}"
        );

        // Over the limit: refused while streaming, nothing kept.
        let e = client
            .submit(upload(spec, limit + MIB, b'x'))
            .await
            .expect_err("too big");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");

        let (_, peak) = memory(pid);
        eprintln!(
            "coordinator resident: {} MiB before, peak {} MiB after 1.2 GiB of uploads",
            base / MIB,
            peak / MIB
        );
        // The peak holds at most one bounded line and a few chunks, never an
        // upload (uploads held whole would add 200 MiB, then 1 GiB).
        assert!(
            peak < base + 128 * MIB,
            "peak {} MiB over a base of {} MiB",
            peak / MIB,
            base / MIB
        );
    });
    // Refused uploads leave nothing behind.
    let left: Vec<_> = std::fs::read_dir(data.join("runs"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// A submission of `spec` streaming `files` (`key`, bytes) whole.
fn submission(
    spec: &dpo_proto::RunSpec,
    files: Vec<(&str, Vec<u8>)>,
) -> impl tokio_stream::Stream<Item = v1::SubmitChunk> + use<> {
    let header = v1::SubmitChunk {
        part: Some(v1::submit_chunk::Part::Header(v1::SubmitHeader {
            spec_json: serde_json::to_string(spec).expect("spec json"),
            streamed_files: files.iter().map(|(k, _)| k.to_string()).collect(),
            files: Vec::new(),
        })),
    };
    let chunks: Vec<v1::SubmitChunk> = files
        .into_iter()
        .map(|(key, data)| v1::SubmitChunk {
            part: Some(v1::submit_chunk::Part::File(v1::FileChunk {
                key: key.into(),
                data,
                name: String::new(),
            })),
        })
        .collect();
    tokio_stream::iter(std::iter::once(header).chain(chunks))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

type Runs = RunServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

fn runs_client(port: u16) -> Runs {
    let ch = channel(&format!("http://127.0.0.1:{port}"), &Default::default()).expect("channel");
    RunServiceClient::with_interceptor(ch, BearerToken::new(None).expect("token"))
}

#[test]
fn paths_a_client_names_are_confined_to_the_allowed_directories() {
    let case = Case::new(24);
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    // Allowed: the case directory (by the test helper) and the data dir.
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let base = dpo_proto::RunSpec::from_file(&case.write_spec("confined", "")).expect("spec");
    let train = std::fs::read(&base.data.train).expect("train.jsonl");
    runtime().block_on(async {
        let mut client = runs_client(port);
        // A run whose data was uploaded: waiting (no workers), its upload kept
        // under the data dir as the coordinator's own file.
        let first = client
            .submit(submission(&base, vec![("data.train", train)]))
            .await
            .expect("an uploaded run")
            .into_inner();
        let upload = data
            .join("runs")
            .join(&first.id)
            .join("files/data_train.jsonl");
        assert!(upload.is_file(), "{}", upload.display());
        // A streamed file's name is a plain file name: no way out of the run's dir.
        for name in ["../escape.jsonl", "a/b.jsonl", ".hidden", "", ".."] {
            let header = v1::SubmitChunk {
                part: Some(v1::submit_chunk::Part::Header(v1::SubmitHeader {
                    spec_json: serde_json::to_string(&base).expect("spec json"),
                    streamed_files: vec!["data.train".into()],
                    files: vec![v1::StreamedFile {
                        key: "data.train".into(),
                        name: name.into(),
                    }],
                })),
            };
            let e = client
                .submit(tokio_stream::iter([header]))
                .await
                .expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}: {e}");
            assert!(e.message().contains("a plain file name"), "{name}: {e}");
        }
        assert!(!case.path().join("coord/runs/escape.jsonl").exists());

        let link = case.path().join("innocent.jsonl");
        std::os::unix::fs::symlink("/etc/passwd", &link).expect("symlink");
        let outside_out = Path::new("/etc/dpo-confined-test");
        type Edit = Box<dyn Fn(&mut dpo_proto::RunSpec)>;
        let cases: Vec<(&str, Edit, String)> = vec![
            (
                "a secret file",
                Box::new(|s| s.data.train = "/etc/shadow".into()),
                "data.train: /etc/shadow: not under a directory this coordinator allows".into(),
            ),
            (
                "a missing file outside: the same answer",
                Box::new(|s| s.data.train = "/etc/no-such-file".into()),
                "data.train: /etc/no-such-file: not under a directory this coordinator allows"
                    .into(),
            ),
            (
                "another run's upload",
                Box::new({
                    let upload = upload.clone();
                    move |s| s.data.train = upload.clone()
                }),
                format!("data.train: {}: not under a directory", upload.display()),
            ),
            (
                "a link out of an allowed directory",
                Box::new({
                    let link = link.clone();
                    move |s| s.data.eval = Some(link.clone())
                }),
                format!("data.eval: {}: not under a directory", link.display()),
            ),
            (
                "an output in /etc",
                Box::new(|s| s.train.output = "/etc/dpo-confined-test".into()),
                "train.output: /etc/dpo-confined-test: not under a directory".into(),
            ),
            (
                "a relative output",
                Box::new(|s| s.train.output = "../../x".into()),
                "train.output: ../../x: must be an absolute path".into(),
            ),
            (
                "the coordinator's own store as a model",
                Box::new({
                    let data = data.clone();
                    move |s| s.model.path = data.join("runs")
                }),
                "model.path:".into(),
            ),
        ];
        for (what, edit, want) in cases {
            let mut spec = base.clone();
            spec.name = "hostile".into();
            edit(&mut spec);
            let e = client
                .submit(submission(&spec, Vec::new()))
                .await
                .expect_err(what);
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
            assert!(e.message().starts_with(&want), "{what}: {}", e.message());
        }
        assert!(!outside_out.exists(), "nothing is created outside");
        // Only the first run exists, waiting for workers; refused ones left no files.
        let runs = client
            .list_runs(v1::ListRunsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .runs;
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(runs[0].state, v1::RunState::Waiting as i32);
        let dirs: Vec<_> = std::fs::read_dir(data.join("runs"))
            .expect("runs")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(dirs, [std::ffi::OsString::from(&first.id)]);
    });
    // `dpoctl list | head -0`: stdout closed before dpoctl writes; it exits
    // quietly instead of panicking on the broken pipe.
    let mut child = std::process::Command::new(bin("dpoctl"))
        .args(["--coordinator", &format!("http://127.0.0.1:{port}"), "list"])
        .env_remove("DPO_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dpoctl");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("dpoctl ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test mounts a small tmpfs to fill it (it needs root, as in CI)"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![7u8; MIB as usize];
    let mut n = 0;
    while f.write_all(&chunk).is_ok() {
        n += MIB;
    }
    let _ = f.sync_all();
    n
}

#[test]
fn a_full_disk_fails_the_run_and_a_restart_finds_it_failed() {
    let case = Case::new(24);
    let disk = case.path().join("disk");
    let _tmpfs = Tmpfs::mount(&disk, "48m");
    let port = free_port().expect("port");
    // The store, the shards and the run's output all on the small disk.
    let data = disk.join("coord");
    let root = case.path().display().to_string();
    let mut c = coordinator(
        port,
        &data,
        &case.logs,
        "coordinator",
        &["--allow-path", &root],
        None,
    )
    .expect("coordinator");
    assert!(
        data.join("store.reserve").is_file(),
        "the store keeps a reserve"
    );
    let out = disk.join("out");
    let text = dpo_e2e::spec(case.path(), "full", "max_steps = 100000").replace(
        &case.path().join("full").display().to_string(),
        &out.display().to_string(),
    );
    let spec = case.path().join("full.toml");
    std::fs::write(&spec, text).expect("spec");
    let _w = dpo_e2e::worker(port, "w1", &case.logs).expect("worker");
    let submitted =
        dpo_e2e::dpoctl(port, &["submit", &spec.display().to_string()]).expect("dpoctl");
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    dpo_e2e::wait_for(Duration::from_secs(120), || {
        Ok(dpo_e2e::steps_done(&out) >= 3)
    })
    .expect("training");
    let filled = fill(&disk.join("filler"));
    eprintln!("filled the disk with {} MiB", filled / MIB);
    let rt = runtime();
    let get = |port: u16| {
        rt.block_on(async {
            runs_client(port)
                .get_run(v1::GetRunRequest { run: "full".into() })
                .await
                .map(tonic::Response::into_inner)
        })
    };
    let mut failed = None;
    dpo_e2e::wait_for(Duration::from_secs(60), || {
        let run = get(port)?;
        let done = run.state == v1::RunState::Failed as i32;
        failed = Some(run);
        Ok(done)
    })
    .unwrap_or_else(|e| panic!("{e}: {failed:?}{}", case.logs()));
    let failed = failed.expect("the run");
    assert!(
        failed.error.contains("No space left on device"),
        "{}",
        failed.error
    );
    // The coordinator dies; space is freed; a new one finds the run failed.
    c.kill();
    std::fs::remove_file(disk.join("filler")).expect("free space");
    let _c2 = coordinator(
        port,
        &data,
        &case.logs,
        "coordinator-2",
        &["--allow-path", &root],
        None,
    )
    .expect("restart");
    let after = get(port).expect("the run after a restart");
    assert_eq!(after.state, v1::RunState::Failed as i32, "{after:?}");
    assert_eq!((after.step, &after.error), (failed.step, &failed.error));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        get(port).expect("run").step,
        failed.step,
        "nothing replayed"
    );
    assert!(data.join("store.reserve").is_file(), "the reserve is back");
}

/// `GET path` on an HTTP port: the status code and body, or `None` when the
/// port did not answer within `wait`.
fn http_get(port: u16, path: &str, wait: Duration) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n")?.1.to_string()))
}

#[test]
fn the_http_port_outlives_descriptor_exhaustion_and_metrics_name_no_run() {
    let case = Case::new(24);
    let port = free_port().expect("port");
    let http = free_port().expect("port");
    let listen = format!("127.0.0.1:{http}");
    let data = case.path().join("coord");
    let c = coordinator(
        port,
        &data,
        &case.logs,
        "coordinator",
        &["--metrics-listen", &listen],
        None,
    )
    .expect("coordinator");
    // A waiting run (no workers): /metrics counts it, but does not name it.
    let spec = case.write_spec("secret-project-name", "");
    let out = dpo_e2e::dpoctl(port, &["submit", spec.to_str().expect("utf-8")]).expect("dpoctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, body) = http_get(http, "/metrics", Duration::from_secs(10)).expect("answers");
    assert_eq!(code, 200);
    assert!(
        body.contains("dpo_runs{state=\"RUN_STATE_WAITING\"} 1"),
        "{body}"
    );
    assert!(!body.contains("secret-project-name"), "{body}");

    // 64 descriptors for the whole process, and 200 connections held open.
    let pid = c.child.id().to_string();
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=64:64"])
        .status()
        .expect("prlimit");
    assert!(limited.success());
    let held: Vec<_> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", http)).ok())
        .collect();
    assert!(held.len() >= 100, "{} connections", held.len());
    std::thread::sleep(Duration::from_secs(2));
    drop(held);
    // The port answers again once they are gone (the gRPC side throughout).
    let deadline = Instant::now() + Duration::from_secs(30);
    let answered = loop {
        if let Some((200, body)) = http_get(http, "/metrics", Duration::from_secs(5)) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the HTTP port never answered again"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(answered.contains("dpo_workers"), "{answered}");
    let listed = dpo_e2e::dpoctl(port, &["list"]).expect("dpoctl");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let log = std::fs::read_to_string(case.logs.join("coordinator.log")).unwrap_or_default();
    assert!(
        log.contains("accepting a connection failed") || log.contains("Too many open files"),
        "descriptors ran out, as intended"
    );
}

#[test]
fn a_submission_abandoned_by_its_client_stops_being_read() {
    let case = Case::new(24);
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    // Three million pre-tokenized pairs (~170 MB), named by path: seconds of reading.
    let big = case.path().join("big.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).expect("create"));
        let line =
            b"{\"prompt_ids\": [1, 2, 3], \"chosen_ids\": [4, 5], \"rejected_ids\": [6, 7]}\n";
        for _ in 0..3_000_000 {
            f.write_all(line).expect("write");
        }
    }
    let mut spec = dpo_proto::RunSpec::from_file(&case.write_spec("abandoned", "")).expect("spec");
    spec.data.train = big;
    runtime().block_on(async {
        let mut client = runs_client(port);
        let gone = tokio::time::timeout(
            Duration::from_millis(1500),
            client.submit(submission(&spec, Vec::new())),
        )
        .await;
        assert!(gone.is_err(), "the submission was still being prepared");
    });
    let log = case.logs.join("coordinator.log");
    dpo_e2e::wait_for(Duration::from_secs(30), || {
        Ok(std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("client went away: stopped preparing"))
    })
    .expect("the coordinator stopped reading");
    let listed = dpo_e2e::dpoctl(port, &["list"]).expect("dpoctl");
    assert!(listed.status.success());
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("abandoned"),
        "no run was queued"
    );
}

#[test]
fn an_output_swapped_for_a_link_after_submit_is_never_written_through() {
    let case = Case::new(24);
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let spec = case.write_spec("swapped", "max_steps = 4\n[cluster]\nmin_workers = 1");
    let out = dpo_e2e::dpoctl(port, &["submit", spec.to_str().expect("utf-8")]).expect("dpoctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Queued (no worker yet): its output folder becomes a link to elsewhere.
    let output = case.path().join("swapped");
    let elsewhere = case.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let _ = std::fs::remove_dir_all(&output);
    std::os::unix::fs::symlink(&elsewhere, &output).expect("symlink");
    let _w = dpo_e2e::worker(port, "w0", &case.logs).expect("worker");
    let watched = dpo_e2e::dpoctl(port, &["watch", "swapped"]).expect("watch");
    assert!(!watched.status.success(), "the run must fail");
    let status = dpo_e2e::dpoctl(port, &["status", "swapped"]).expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("symbolic link"), "{text}");
    let written: Vec<_> = std::fs::read_dir(&elsewhere)
        .expect("read")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert!(written.is_empty(), "written through the link: {written:?}");
}

/// `VmSize` of a process: its address space, in bytes.
fn address_space(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The issue's hostile files, named by path, against a coordinator whose
/// address space may grow by 1 GiB only: a file the readers failed to bound
/// (a 512 MiB zstd string, held at least three times over by a reader that
/// decoded it, ten million rows, a schema nested 100 deep, a 200 MB
/// JSON element) would make it abort, so each refusal is by the limits, not
/// luck. (pyarrow itself cannot write the issue's 5,000-deep schema; our
/// footer reader's depth bound is fuzzed, data/fuzz.)
#[test]
fn hostile_dataset_files_are_refused_by_a_coordinator_held_to_an_address_space_limit() {
    let case = Case::new(8);
    let files = case.path().join("hostile");
    std::fs::create_dir_all(&files).expect("dir");
    let script = r#"
import os, sys
import pyarrow as pa, pyarrow.parquet as pq
out = sys.argv[1]
t, v = pa.string(), "x"
for _ in range(100):
    t, v = pa.struct([("a", t)]), {"a": v}
pq.write_table(pa.table({"prompt": pa.array([v], type=t), "chosen": ["a"], "rejected": ["b"]}),
               os.path.join(out, "deep.parquet"))
pq.write_table(pa.table({"prompt": ["a" * (512 << 20)], "chosen": ["x"], "rejected": ["y"]}),
               os.path.join(out, "bomb.parquet"), compression="zstd")
n = 10_000_000
pq.write_table(pa.table({"prompt": pa.array([""] * n), "chosen": pa.array(["a"] * n),
                         "rejected": pa.array(["b"] * n)}), os.path.join(out, "rows.parquet"),
               compression="zstd")
with open(os.path.join(out, "long.json"), "w") as f:
    f.write('[{"prompt": "')
    for _ in range(200):
        f.write("a" * (1 << 20))
    f.write('", "chosen": "b", "rejected": "c"}]')
"#;
    let made = std::process::Command::new(dpo_e2e::python())
        .args(["-c", script])
        .arg(&files)
        .output()
        .expect("python");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for name in ["deep.parquet", "bomb.parquet", "rows.parquet"] {
        let size = std::fs::metadata(files.join(name)).expect("file").len();
        assert!(size < 200_000, "{name}: {size} bytes");
    }
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let pid = c.child.id();
    let limit = address_space(pid) + 1024 * MIB;
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--as={limit}:{limit}")])
        .status()
        .expect("prlimit");
    assert!(limited.success());
    let base = dpo_proto::RunSpec::from_file(&case.write_spec("hostile", "")).expect("spec");
    runtime().block_on(async {
        let mut client = runs_client(port);
        for (name, key) in [
            ("deep.parquet", "data.limits.max_nesting"),
            ("bomb.parquet", "data.limits.max_value_bytes"),
            ("rows.parquet", "data.limits.max_rows"),
            ("long.json", "data.limits.max_value_bytes"),
        ] {
            let mut spec = base.clone();
            spec.data.train = files.join(name);
            let t = Instant::now();
            let e = client
                .submit(submission(&spec, Vec::new()))
                .await
                .expect_err(name);
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}: {e}");
            assert!(
                e.message().contains(name) && e.message().contains(key),
                "{name}: the refusal names the file and {key}: {}",
                e.message()
            );
            eprintln!("{name}: refused in {:?}: {}", t.elapsed(), e.message());
        }
    });
    // Alive, and serving every tenant still.
    let listed = dpo_e2e::dpoctl(port, &["list"]).expect("dpoctl");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let (_, peak) = memory(pid);
    eprintln!("coordinator peak resident: {} MiB", peak / MIB);
}
