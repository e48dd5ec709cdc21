//! Hostile dataset files are refused by what they would cost, naming the file,
//! the row and the `data.limits` key, and reading them costs this process
//! little: a Parquet schema nested past the limit, a zstd page that inflates to
//! 256 MiB from 9 KB (and the same page with a header that declares 4 KB), ten
//! million rows in 83 KB, the same two as zstd-compressed Arrow IPC streams and
//! one cut short, a JSON line of millions of tiny
//! values, and a JSON array with a 100 MB element. One test per binary, so the
//! peak memory it measures is its own.

mod common;

use std::path::Path;

use dpo_data::records::{self, Layout};

/// This process's peak resident size in bytes.
fn peak() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// The first error reading `path` gives (every record before it is fine), a
/// record's own as `file:line: reason`, as the dataset readers report it.
fn refusal(path: &Path, layout: &Layout) -> String {
    for row in records::open(path, layout, &["prompt", "chosen", "rejected"]).expect("opens") {
        match row {
            Ok(r) => {
                if let Err(reason) = r.value {
                    return format!("{}:{}: {reason}", path.display(), r.at);
                }
            }
            Err(e) => return e.to_string(),
        }
    }
    panic!("{} was read whole", path.display());
}

#[test]
fn hostile_files_are_refused_by_their_cost_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tmp");
    let script = r#"
import os, sys
import pyarrow as pa, pyarrow.parquet as pq
out = sys.argv[1]
t, v = pa.string(), "x"
for _ in range(100):
    t, v = pa.struct([("a", t)]), {"a": v}
pq.write_table(pa.table({"prompt": pa.array([v], type=t), "chosen": ["a"], "rejected": ["b"]}),
               os.path.join(out, "deep.parquet"))
pq.write_table(pa.table({"prompt": ["a" * (256 << 20)], "chosen": ["x"], "rejected": ["y"]}),
               os.path.join(out, "bomb.parquet"), compression="zstd")
# The same page with a header that lies: it declares 4096 decoded bytes (a
# non-canonical varint of the same length), so only inflating it shows the truth.
md = pq.ParquetFile(os.path.join(out, "bomb.parquet")).metadata.row_group(0).column(0)
start = md.dictionary_page_offset if md.has_dictionary_page else md.data_page_offset
data = bytearray(open(os.path.join(out, "bomb.parquet"), "rb").read())
assert data[start] == 0x15 and data[start + 2] == 0x15, data[start:start + 8]
size_at = start + 3
assert [b & 0x80 for b in data[size_at:size_at + 5]] == [0x80] * 4 + [0], data[size_at:size_at + 5]
data[size_at:size_at + 5] = bytes([0x80, 0xC0, 0x80, 0x80, 0x00])  # zigzag(4096)
open(os.path.join(out, "bomb-lie.parquet"), "wb").write(data)
import pyarrow.ipc as ipc
def stream(name, table):
    with ipc.new_stream(os.path.join(out, name), table.schema,
                        options=ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
stream("bomb.arrow", pa.table({"prompt": ["a" * (256 << 20)], "chosen": ["x"], "rejected": ["y"]}))
n = 10_000_000
stream("rows.arrow", pa.table({"prompt": pa.array([""] * n), "chosen": pa.array(["a"] * n),
                               "rejected": pa.array(["b"] * n)}))
pq.write_table(pa.table({"prompt": pa.array([""] * n), "chosen": pa.array(["a"] * n),
                         "rejected": pa.array(["b"] * n)}), os.path.join(out, "rows.parquet"), compression="zstd")
"#;
    common::run_script(script, dir.path(), &[]);
    // A 60 MiB JSON line of tiny numbers, and an array whose one element is a
    // 100 MB string: written a piece at a time, so this process never holds them.
    let write = |path: &Path, head: &str, piece: &str, times: usize, tail: &str| {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
        f.write_all(head.as_bytes()).expect("write");
        let block = piece.repeat(4096);
        for _ in 0..times / 4096 {
            f.write_all(block.as_bytes()).expect("write");
        }
        f.write_all(tail.as_bytes()).expect("write");
    };
    let line = dir.path().join("numbers.jsonl");
    write(
        &line,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": [",
        "1,",
        30 << 20,
        "1]}\n",
    );
    let array = dir.path().join("long.json");
    write(
        &array,
        "[{\"prompt\": \"",
        "a",
        100 << 20,
        "\", \"chosen\": \"b\", \"rejected\": \"c\"}]",
    );

    let before = peak();
    let layout = Layout::default();
    let sizes: Vec<u64> = ["deep", "bomb", "rows"]
        .iter()
        .map(|n| {
            std::fs::metadata(dir.path().join(format!("{n}.parquet")))
                .expect("file")
                .len()
        })
        .collect();
    eprintln!(
        "file sizes: deep {} B, bomb {} B, rows {} B",
        sizes[0], sizes[1], sizes[2]
    );

    let deep = refusal(&dir.path().join("deep.parquet"), &layout);
    assert!(deep.contains("deep.parquet"), "{deep}");
    assert!(
        deep.contains("nests 100 levels deep, more than data.limits.max_nesting = 32"),
        "{deep}"
    );
    let bomb = refusal(&dir.path().join("bomb.parquet"), &layout);
    assert!(
        bomb.contains("bomb.parquet:1:"),
        "names the file and row: {bomb}"
    );
    assert!(
        bomb.contains("column \"prompt\"")
            && bomb.contains("more than data.limits.max_value_bytes = 67108864"),
        "{bomb}"
    );
    let lie = refusal(&dir.path().join("bomb-lie.parquet"), &layout);
    assert!(
        lie.contains("bomb-lie.parquet:1:")
            && lie.contains("inflates to more than the 4096 bytes its header declares"),
        "{lie}"
    );
    let rows = refusal(&dir.path().join("rows.parquet"), &layout);
    assert!(
        rows.contains("10000000 rows") && rows.contains("data.limits.max_rows = 5000000"),
        "{rows}"
    );
    let arrow = refusal(&dir.path().join("bomb.arrow"), &layout);
    assert!(
        arrow.contains("bomb.arrow:1:")
            && arrow.contains("more than data.limits.max_value_bytes = 67108864"),
        "{arrow}"
    );
    let arrow_rows = refusal(&dir.path().join("rows.arrow"), &layout);
    assert!(
        arrow_rows.contains("rows.arrow") && arrow_rows.contains("data.limits.max_rows = 5000000"),
        "{arrow_rows}"
    );
    // A stream cut short: its last message's body runs past the end.
    let whole = std::fs::read(dir.path().join("bomb.arrow")).expect("read");
    let cut = dir.path().join("cut.arrow");
    std::fs::write(&cut, &whole[..whole.len() - 100]).expect("write");
    let cut_err = refusal(&cut, &layout);
    assert!(
        cut_err.contains("past the end of the file") || cut_err.contains("outside the file"),
        "{cut_err}"
    );
    let numbers = refusal(&line, &layout);
    assert!(numbers.contains("numbers.jsonl:1:"), "{numbers}");
    assert!(
        numbers.contains("decodes to more than data.limits.max_value_bytes"),
        "{numbers}"
    );
    let long = refusal(&array, &layout);
    assert!(long.contains("long.json:1:"), "{long}");
    assert!(
        long.contains("spans more than data.limits.max_value_bytes"),
        "{long}"
    );
    let grew = peak().saturating_sub(before);
    eprintln!("peak memory grew by {} MiB", grew >> 20);
    // The line itself is held once (60 MiB, under the 64 MiB line limit) and the
    // array's element up to the limit: nothing near the gigabytes they decode to.
    assert!(grew < 200 << 20, "peak memory grew by {grew} bytes");

    // Raised limits let a big-but-wanted file through.
    let roomy = Layout {
        limits: dpo_proto::DataLimits {
            max_rows: 20_000_000,
            ..Default::default()
        },
        ..Layout::default()
    };
    let mut n = 0;
    for row in records::open(&dir.path().join("rows.parquet"), &roomy, &["prompt"])
        .expect("opens")
        .take(1000)
    {
        row.expect("row").value.expect("object");
        n += 1;
    }
    assert_eq!(n, 1000);
}
