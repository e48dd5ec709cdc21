"""Writes the fuzzers' starting corpora: small valid files of each format as
pyarrow and Python's json write them, and small forms of the hostile files in
data/tests/hostile_files.rs (deep nesting, a compressed bomb, many rows).

    python seeds.py corpus   # corpus/<target>/seed-*
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

out = sys.argv[1]
for target in ("parquet", "arrow", "json", "jsonl", "conll"):
    os.makedirs(os.path.join(out, target), exist_ok=True)


def path(target, name):
    return os.path.join(out, target, "seed-" + name)


rows = [{"prompt": f"question {i} Café 東京", "chosen": "a" * (i % 7), "rejected": "b",
         "ids": list(range(i % 5)), "meta": {"k": i, "tags": ["x", "y"][: i % 3]}}
        for i in range(12)]
table = pa.Table.from_pylist(rows)
pq.write_table(table, path("parquet", "zstd"), row_group_size=5, compression="zstd")
pq.write_table(table, path("parquet", "snappy-v2"), row_group_size=6, compression="snappy",
               use_dictionary=False, data_page_version="2.0")
pq.write_table(table, path("parquet", "gzip"), compression="gzip")
pq.write_table(table, path("parquet", "plain"), compression="none")
t, v = pa.string(), "x"
for _ in range(40):
    t, v = pa.struct([("a", t)]), {"a": v}
pq.write_table(pa.table({"prompt": pa.array([v], type=t), "chosen": ["a"], "rejected": ["b"]}),
               path("parquet", "deep"))
pq.write_table(pa.table({"prompt": ["a" * (4 << 20)], "chosen": ["x"], "rejected": ["y"]}),
               path("parquet", "bomb"), compression="zstd")
n = 50_000
pq.write_table(pa.table({"prompt": pa.array([""] * n), "chosen": pa.array(["a"] * n),
                         "rejected": pa.array(["b"] * n)}), path("parquet", "rows"), compression="zstd")

for name, compression in (("zstd", "zstd"), ("lz4", "lz4"), ("plain", None)):
    with ipc.new_stream(path("arrow", name), table.schema,
                        options=ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table, max_chunksize=5)
with ipc.new_file(path("arrow", "file"), table.schema) as w:
    w.write_table(table)
with ipc.new_stream(path("arrow", "bomb"), pa.schema([("prompt", pa.string())]),
                    options=ipc.IpcWriteOptions(compression="zstd")) as w:
    w.write_table(pa.table({"prompt": ["a" * (4 << 20)]}))

with open(path("json", "array"), "w") as f:
    json.dump(rows, f, ensure_ascii=False)
with open(path("json", "records"), "w") as f:
    json.dump({"data": rows[:3]}, f)
with open(path("json", "deep"), "w") as f:
    f.write('[{"prompt": ' + "[" * 40 + "]" * 40 + ', "chosen": "a", "rejected": "b"}]')
with open(path("jsonl", "rows"), "w") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
with open(path("jsonl", "escapes"), "w") as f:
    f.write('{"prompt": "\\ud83d\\ude00 \\u0000", "chosen": "a\\nb", "rejected": 1e308}\r\n\n')

with open(path("conll", "bio"), "w") as f:
    f.write("-DOCSTART- -X- O O\n\nEU B-ORG\nrejects O\nGerman B-MISC\ncall O\n. O\n\n"
            "Peter B-PER\nBlackburn I-PER\n")
with open(path("conll", "columns"), "w") as f:
    f.write("SOCCER NN B-NP O\n- : O O\nJAPAN NNP B-NP B-LOC\n\n\tTab\tO\n")
