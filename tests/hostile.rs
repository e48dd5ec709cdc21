//! A hostile or careless client against a real coordinator process, by raw
//! gRPC: a device named as a dataset, an upload without newlines, an upload
//! over the limit. Each is refused, and the coordinator's memory stays flat
//! (its peak resident size is read from /proc).

use std::path::Path;
use std::time::{Duration, Instant};

use dpo_e2e::{Case, coordinator, free_port};
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
        })),
    };
    let chunks = (0..bytes.div_ceil(MIB)).map(move |i| v1::SubmitChunk {
        part: Some(v1::submit_chunk::Part::File(v1::FileChunk {
            key: "data.train".into(),
            data: vec![byte; MIB.min(bytes - i * MIB) as usize],
        })),
    });
    tokio_stream::iter(std::iter::once(header).chain(chunks))
}

#[test]
fn devices_endless_lines_and_oversized_uploads_are_refused_with_flat_memory() {
    let case = Case::empty();
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let limit = 256 * MIB;
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

        // A device named as the training file: refused at once, not read.
        let t = Instant::now();
        let spec = spec_json(case.path(), Path::new("/dev/zero")).expect("spec");
        let e = client
            .submit(upload(spec, 0, 0))
            .await
            .expect_err("/dev/zero");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("not a regular file"), "{e}");
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
            "coordinator resident: {} MiB before, peak {} MiB after 457 MiB of uploads",
            base / MIB,
            peak / MIB
        );
        // The peak holds at most one bounded line and a few chunks, never an
        // upload (uploads held whole would add 200 MiB, then 257 MiB).
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
