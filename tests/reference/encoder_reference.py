#!/usr/bin/env python3
"""Independent reference numbers for dpo-cluster's encoder tests, from transformers.

    encoder_reference.py logits MODEL OUT
        tokenizes SENTENCES with MODEL's tokenizer (transformers' AutoTokenizer) and
        writes, per sentence alone (no padding), input_ids.N and logits.N computed by
        AutoModelFor{Token,Sequence}Classification in eval mode, to OUT (safetensors)
    encoder_reference.py align MODEL DATA MAX_LENGTH LABEL_ALL_TOKENS
        transformers' word-to-token label alignment of a NER JSONL file, as the
        token-classification examples do it
    encoder_reference.py scores IN.json
        seqeval's strict IOB2 entity report and scikit-learn's classification report
    encoder_reference.py pipeline MODEL TASK TEXT...
        runs transformers.pipeline(TASK) on a saved model directory and prints its
        output as JSON, plus the logits of the first text (the model loads as-is)

Nothing here shares code with the Rust implementation.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from safetensors.torch import save_file

SENTENCES = [
    "the cat sees a dog",
    "Alice likes the big red house near the river",
    "one",
    "two birds and three fish are small but fast",
]


def model_class(model_dir: str):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (config.architectures or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForTokenClassification


def logits(model_dir: str, out: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = model_class(model_dir).from_pretrained(model_dir, attn_implementation="eager").eval()
    tensors = {}
    with torch.no_grad():
        for i, text in enumerate(SENTENCES):
            enc = tok(text, return_tensors="pt")
            tensors[f"input_ids.{i}"] = enc["input_ids"][0].contiguous()
            tensors[f"logits.{i}"] = model(**enc).logits[0].float().contiguous()
    save_file(tensors, out)


def pipeline(model_dir: str, task: str, texts: list[str]) -> None:
    pipe = transformers.pipeline(task, model=model_dir, tokenizer=model_dir, device="cpu")
    result = pipe(texts)
    enc = pipe.tokenizer(texts[0], return_tensors="pt")
    with torch.no_grad():
        first = pipe.model(**enc).logits[0].tolist()
    print(json.dumps({"result": result, "input_ids": enc["input_ids"][0].tolist(), "logits": first}, default=float))


def align(model_dir: str, data: str, max_length: str, label_all: str) -> None:
    """transformers' token-classification alignment (run_ner.py): input ids and a
    label per token, -100 where ignored; one JSON line per record of DATA."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    label_to_id = {v: int(k) for k, v in config.id2label.items()}
    b_to_i = []
    for i in range(len(label_to_id)):
        name = config.id2label[i]
        inside = "I-" + name[2:] if name.startswith("B-") else name
        b_to_i.append(label_to_id.get(inside, i))
    with open(data) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            enc = tok(rec["tokens"], is_split_into_words=True, truncation=True, max_length=int(max_length))
            labels, previous = [], None
            for w in enc.word_ids():
                if w is None:
                    labels.append(-100)
                elif w != previous:
                    labels.append(label_to_id[rec["tags"][w]])
                else:
                    labels.append(b_to_i[label_to_id[rec["tags"][w]]] if label_all == "true" else -100)
                previous = w
            print(json.dumps({"input_ids": enc["input_ids"], "labels": labels}))


def scores(path: str) -> None:
    """seqeval's strict IOB2 report of {"gold", "pred"} tag sequences and
    scikit-learn's report of {"gold_ids", "pred_ids", "labels"}."""
    from seqeval.metrics import classification_report as entity_report
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2
    from sklearn.metrics import accuracy_score
    from sklearn.metrics import classification_report as class_report

    with open(path) as f:
        data = json.load(f)
    ner = entity_report(data["gold"], data["pred"], mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    ner["f1_score"] = f1_score(data["gold"], data["pred"], mode="strict", scheme=IOB2, zero_division=0)
    labels = list(range(len(data["labels"])))
    cls = class_report(data["gold_ids"], data["pred_ids"], labels=labels, target_names=data["labels"],
                       output_dict=True, zero_division=0)
    cls["accuracy"] = accuracy_score(data["gold_ids"], data["pred_ids"])
    print(json.dumps({"ner": ner, "cls": cls}, default=float))


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "logits":
        logits(*args)
    elif cmd == "scores":
        scores(*args)
    elif cmd == "align":
        align(*args)
    elif cmd == "pipeline":
        pipeline(args[0], args[1], args[2:])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
