#!/usr/bin/env python3
"""Independent reference numbers for dpo-cluster's encoder tests, from transformers.

    encoder_reference.py logits MODEL OUT [MODEL OUT ...]
        tokenizes SENTENCES with MODEL's tokenizer (transformers' AutoTokenizer) and
        writes, per sentence alone (no padding), input_ids.N and logits.N computed by
        AutoModelFor{Token,Sequence}Classification in eval mode, to OUT (safetensors)
    encoder_reference.py align MODEL DATA MAX_LENGTH LABEL_ALL_TOKENS
        transformers' word-to-token label alignment of a NER JSONL file, as the
        token-classification examples do it
    encoder_reference.py train MODEL DATA SETTINGS.json OUT
        trains MODEL with transformers + the loss from its formula + torch's AdamW
        (or SGD: "optimizer"; "schedule" as transformers names it, default linear;
        micro-batches summed into a global batch), writes the weights to OUT;
        with "logits_of": [MODEL2, OUT2], also what `logits MODEL2 OUT2` writes;
        with "lora_init", PEFT's model from that adapter trains instead (only
        what PEFT trains) and its adapter is saved to OUT.adapter
    encoder_reference.py lora-init MODEL OUT R ALPHA TARGETS
        PEFT's LoRA for MODEL's task (TOKEN_CLS or SEQ_CLS; the head in
        modules_to_save as PEFT adds it): get_peft_model with r, lora_alpha,
        target_modules (comma-separated), no dropout; B given random values too
        (PEFT starts it at zero); save_pretrained(OUT)
    encoder_reference.py lora-check MODEL OURS REFERENCE OUT.json
        loads OUR adapter (OURS, written by dpo-worker) into PEFT with
        PeftModel.from_pretrained and writes the max |logit difference| against
        the adapter PEFT trained (REFERENCE), and between PEFT's
        merge_and_unload() of ours and our merged model (OURS/merged)
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


# `train` has a local named `logits`.
write_logits = logits


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


def train(model_dir: str, data: str, settings: str, out: str) -> None:
    """Trains MODEL on DATA as the settings say, with transformers' model, the
    loss written from its formula and torch's AdamW; writes the final weights
    (safetensors) and {"losses": [...]} next to them (OUT.json)."""
    with open(settings) as f:
        cfg = json.load(f)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    token_task = cfg["task"] == "token-classification"
    auto = transformers.AutoModelForTokenClassification if token_task else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(model_dir, attn_implementation="eager")
    if cfg.get("lora_init"):
        import peft
        model = peft.PeftModel.from_pretrained(model, cfg["lora_init"], is_trainable=True)
    model.train()
    label2id = {v: int(k) for k, v in model.config.id2label.items()}
    examples = []
    with open(data) as f:
        for line in f:
            rec = json.loads(line)
            if token_task:
                enc = tok(rec["tokens"], is_split_into_words=True, truncation=True, max_length=cfg["max_length"])
                first = {}
                for pos, w in enumerate(enc.word_ids()):
                    if w is not None and w not in first:
                        first[w] = pos
                targets = [(first[w], label2id[t]) for w, t in enumerate(rec["tags"]) if w in first]
                negatives = sorted({(first[n["position"]], label2id[n["tag"]]) for n in rec.get("negatives", [])})
            else:
                enc = tok(rec["text"], truncation=True, max_length=cfg["max_length"])
                targets = [(0, label2id[rec["label"]])]
                negatives = sorted({(0, label2id[n]) for n in rec.get("negatives", [])})
            examples.append((enc["input_ids"], targets, negatives))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The Trainer's own rule: no decay on LayerNorm modules' parameters and biases.
    decays = set(transformers.Trainer.get_decay_parameter_names(None, model))
    no_decay = [p for n, p in params if n not in decays]
    decay = [p for n, p in params if n in decays]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.get("optimizer", "adamw") == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg["lr"])
    else:
        opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
    total, g, m = cfg["steps"], cfg["global_batch"], cfg["micro_batch"]
    sched = transformers.get_scheduler(cfg.get("schedule", "linear"), opt, num_warmup_steps=cfg["warmup"], num_training_steps=total)
    per_epoch = len(examples) // g
    losses = []
    for step in range(total):
        start = (step % per_epoch) * g
        batch = examples[start:start + g]
        n_targets = sum(len(e[1]) for e in batch)
        n_negatives = sum(len(e[2]) for e in batch)
        opt.zero_grad()
        step_loss = 0.0
        for i in range(0, g, m):
            micro = batch[i:i + m]
            longest = max(len(e[0]) for e in micro)
            ids = torch.full((len(micro), longest), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(micro), longest), dtype=torch.long)
            for row, e in enumerate(micro):
                ids[row, :len(e[0])] = torch.tensor(e[0])
                mask[row, :len(e[0])] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()

            def at(pairs):
                rows = torch.tensor([r for r, e in enumerate(micro) for _ in pairs(e)], dtype=torch.long)
                cols = torch.tensor([p for e in micro for p, _ in pairs(e)], dtype=torch.long)
                labels = torch.tensor([l for e in micro for _, l in pairs(e)], dtype=torch.long)
                z = logits[rows, cols] if token_task else logits[rows]
                return z, labels

            z, labels = at(lambda e: e[1])
            ce = -torch.log_softmax(z, -1)[torch.arange(len(labels)), labels].sum() / n_targets
            loss = ce
            if cfg["loss"] == "combined" and n_negatives > 0:
                z, labels = at(lambda e: e[2])
                if len(labels) > 0:
                    p = torch.softmax(z, -1)[torch.arange(len(labels)), labels]
                    loss = loss + cfg["negative_weight"] * (-torch.log1p(-p)).sum() / n_negatives
            loss.backward()
            step_loss += loss.item()
        if cfg["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
        opt.step()
        sched.step()
        losses.append(step_loss)
    if cfg.get("lora_init"):
        model.save_pretrained(out + ".adapter")
    else:
        save_file({n: t.detach().contiguous() for n, t in model.state_dict().items()}, out)
    with open(out + ".json", "w") as f:
        json.dump({"losses": losses}, f)
    if cfg.get("logits_of"):
        # Another saved model's logits, in this process (one import of torch).
        write_logits(*cfg["logits_of"])


def peft_task(model_dir: str) -> str:
    cls = model_class(model_dir)
    return "TOKEN_CLS" if cls is transformers.AutoModelForTokenClassification else "SEQ_CLS"


def lora_init(model_dir: str, out: str, r: str, alpha: str, targets: str) -> None:
    import peft
    torch.manual_seed(0)
    model = model_class(model_dir).from_pretrained(model_dir, attn_implementation="eager")
    config = peft.LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=0.0,
                             task_type=peft_task(model_dir), target_modules=targets.split(","))
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)


def lora_check(model_dir: str, ours: str, reference: str, out: str) -> None:
    import os

    import peft

    def base(path=model_dir):
        return model_class(model_dir).from_pretrained(path, attn_implementation="eager").eval()

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)

    def logits(model):
        with torch.no_grad():
            return [model(**tok(t, return_tensors="pt")).logits.float() for t in SENTENCES]

    def worst(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    mine = peft.PeftModel.from_pretrained(base(), ours).eval()
    theirs = peft.PeftModel.from_pretrained(base(), reference).eval()
    result = {
        "peft_vs_reference": worst(logits(mine), logits(theirs)),
        "reference_vs_base": worst(logits(theirs), logits(base())),
    }
    merged_dir = os.path.join(ours, "merged")
    if os.path.isdir(merged_dir):
        merged = base(merged_dir)
        result["merged_vs_peft"] = worst(logits(merged), logits(mine.merge_and_unload().eval()))
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "logits":
        # MODEL OUT, or several pairs in one process (one import of torch).
        if len(args) < 2 or len(args) % 2:
            sys.exit("logits takes MODEL OUT pairs")
        for model_dir, out in zip(args[::2], args[1::2]):
            logits(model_dir, out)
    elif cmd == "train":
        train(*args)
    elif cmd == "lora-init":
        lora_init(*args)
    elif cmd == "lora-check":
        lora_check(*args)
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
