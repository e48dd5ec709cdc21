#!/usr/bin/env python3
"""Datasets as TRL users have them, written by pyarrow and `datasets` themselves,
for the tests of dpo-cluster's dataset readers (worker/tests/datasets.rs).

    datasets_reference.py convert FIXTURES OUT   the fixture pairs as Parquet, Arrow, JSON
    datasets_reference.py extract IN OUT         TRL's extract_prompt on each record of IN

`convert` writes, from FIXTURES' pairs_{text,chat,tokens}.jsonl:
- text.parquet: the text pairs with renamed columns (question/good/bad), an extra
  column, three rows per row group;
- hub/data/{train-0000{0,1}-of-00002,test-00000-of-00001}.parquet: the chat pairs
  as UltraFeedback stores them: a text `prompt` beside full conversations in
  `chosen`/`rejected` (the prompt implicit), plus `messages` and scores;
- disk/: the chat pairs as `Dataset.save_to_disk` writes them (two shards);
- tokens.json: the token pairs as one JSON array;
- text_implicit.jsonl: the text pairs with the prompt inside both responses, and
  text_trl.jsonl: TRL's extract_prompt applied to them;
- labelled.{jsonl,parquet}: labelled examples and their negatives (`label`);
- ner.jsonl (tags as names) and ner/: the same sentences via `datasets` with
  `ner_tags` a Sequence(ClassLabel) (Parquet, and save_to_disk);
- bad-missing.parquet (no `rejected`), bad-type.parquet (`chosen` an integer),
  bad-null.parquet (`chosen` null at row 3), bad-page.parquet (the third row
  group's page header overwritten), bad-corrupt.parquet (truncated).

`extract` reads JSON lines of {"chosen", "rejected"} and writes, per record, TRL's
{"prompt", "chosen", "rejected"}, or {"error": ...} where TRL raises.
"""

from __future__ import annotations

import json
import os
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from trl.data_utils import extract_prompt

datasets.disable_progress_bars()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
NER = [
    (["Ana", "Lima", "lives", "in", "Porto"], ["B-PER", "I-PER", "O", "O", "B-LOC"]),
    (["Rain", "in", "New", "Vale"], ["O", "O", "B-LOC", "I-LOC"]),
    (["Tom", "left"], ["B-PER", "O"]),
]


def convert(fixtures: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    text = read_jsonl(os.path.join(fixtures, "pairs_text.jsonl"))
    chat = read_jsonl(os.path.join(fixtures, "pairs_chat.jsonl"))
    tokens = read_jsonl(os.path.join(fixtures, "pairs_tokens.jsonl"))

    renamed = pa.table(
        {
            "question": [r["prompt"] for r in text],
            "good": [r["chosen"] for r in text],
            "bad": [r["rejected"] for r in text],
            "score_chosen": [float(i) for i in range(len(text))],
        }
    )
    pq.write_table(renamed, os.path.join(out, "text.parquet"), row_group_size=3)

    hub = [
        {
            "prompt": r["prompt"][-1]["content"],
            "chosen": r["prompt"] + r["chosen"],
            "rejected": r["prompt"] + r["rejected"],
            "messages": r["prompt"] + r["chosen"],
            "score_chosen": 8.0,
            "score_rejected": 2.5,
        }
        for r in chat
    ]
    ds = datasets.Dataset.from_list(hub)
    os.makedirs(os.path.join(out, "hub", "data"), exist_ok=True)
    for i in range(2):
        ds.shard(num_shards=2, index=i, contiguous=True).to_parquet(
            os.path.join(out, "hub", "data", f"train-0000{i}-of-00002.parquet")
        )
    # Another split beside it: naming the folder alone would mix them.
    datasets.Dataset.from_list(hub[:2]).to_parquet(
        os.path.join(out, "hub", "data", "test-00000-of-00001.parquet")
    )

    datasets.Dataset.from_list(chat).save_to_disk(os.path.join(out, "disk"), num_shards=2)

    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump(tokens, f, indent=1)

    # Not the last pair: its empty chosen response makes chosen a prefix of
    # rejected, which TRL splits into an empty prompt (refused by us).
    implicit = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in text
        if r["chosen"]
    ]
    write_jsonl(os.path.join(out, "text_implicit.jsonl"), implicit)
    write_jsonl(os.path.join(out, "text_trl.jsonl"), [extract_prompt(r) for r in implicit])

    # Labelled examples and negatives in one file (`label` false marks a negative).
    labelled = [
        {"id": i // 2, "prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
        for i, r in enumerate(r for r in text for _ in range(2))
    ]
    write_jsonl(os.path.join(out, "labelled.jsonl"), labelled)
    pq.write_table(pa.Table.from_pylist(labelled), os.path.join(out, "labelled.parquet"))

    write_jsonl(
        os.path.join(out, "ner.jsonl"),
        [{"id": str(i), "tokens": w, "tags": t} for i, (w, t) in enumerate(NER)],
    )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NER_LABELS)),
        }
    )
    ner = datasets.Dataset.from_dict(
        {
            "id": [str(i) for i in range(len(NER))],
            "tokens": [w for w, _ in NER],
            "ner_tags": [[NER_LABELS.index(t) for t in tags] for _, tags in NER],
        },
        features=features,
    )
    os.makedirs(os.path.join(out, "ner"), exist_ok=True)
    ner.to_parquet(os.path.join(out, "ner", "train.parquet"))
    ner.save_to_disk(os.path.join(out, "ner", "disk"))

    pq.write_table(
        pa.table({"prompt": ["a", "b"], "chosen": ["c", "d"]}),
        os.path.join(out, "bad-missing.parquet"),
    )
    pq.write_table(
        pa.table(
            {
                "prompt": ["a", "b", "c"],
                "chosen": pa.array(["x", "y", None]).cast(pa.string()),
                "rejected": ["u", "v", "w"],
            }
        ),
        os.path.join(out, "bad-null.parquet"),
    )
    pq.write_table(
        pa.table({"prompt": ["a", "b", "c"], "chosen": [1, 2, 3], "rejected": ["u", "v", "w"]}),
        os.path.join(out, "bad-type.parquet"),
    )
    # A page header of the third row group (rows 7-9) overwritten: rows 1-6 read.
    rows = [{"prompt": f"question {i} " + "x" * 50, "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    broken = os.path.join(out, "bad-page.parquet")
    pq.write_table(pa.Table.from_pylist(rows), broken, row_group_size=3)
    offset = pq.ParquetFile(broken).metadata.row_group(2).column(0).data_page_offset
    with open(broken, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 16)
    good = os.path.join(out, "text.parquet")
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(out, "bad-corrupt.parquet"), "wb") as f:
        f.write(data[: len(data) // 2])


def extract(src: str, dst: str) -> None:
    rows = []
    for r in read_jsonl(src):
        try:
            rows.append(extract_prompt(r))
        except Exception as e:  # TRL raises on records it cannot split
            rows.append({"error": f"{type(e).__name__}: {e}"})
    write_jsonl(dst, rows)


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or [""]
    if command == "convert" and len(rest) == 2:
        convert(*rest)
    elif command == "extract" and len(rest) == 2:
        extract(*rest)
    else:
        sys.exit(__doc__)
