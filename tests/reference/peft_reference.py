#!/usr/bin/env python3
"""PEFT's own LoRA as the reference for dpo-cluster's adapters (worker/tests/lora.rs).

    peft_reference.py init  MODEL OUT R ALPHA TARGETS
    peft_reference.py check CASE.json

`init` wraps the transformers model in `get_peft_model` (LoraConfig with r,
lora_alpha, target_modules — comma-separated or "all-linear" — no dropout), gives
both A and B random values (PEFT starts B at zero, which would leave A without a
gradient in the first step), and saves the adapter with `save_pretrained(OUT)`.

`check` (CASE.json: {"model", "data", "init", "ours", "steps", "global_batch_size",
"lr", "beta", "loss", "out"}) trains PEFT's model from the `init` adapter with the
loss of the papers (dpo_reference.py's: sigmoid, ipo, combined, …) — the policy with
its adapters, the reference the same model under `disable_adapter()` — and torch's SGD, pairs in file order, the whole
global batch in one forward; saves the trained adapter to `out/reference`; then
loads OUR trained adapter (`ours`, our `final/`) into PEFT with
`PeftModel.from_pretrained` and writes to `out/results.json` the max |Δ| of logits
between it and the PEFT-trained model, and between PEFT's `merge_and_unload()` of
our adapter and the merged model we wrote (`ours/merged`, loaded by transformers).
"""

from __future__ import annotations

import json
import os
import sys

import peft
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_reference  # noqa: E402  (the losses, as the papers write them)


def base(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                             attn_implementation="eager")


def init(model_dir, out, r, alpha, targets):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules="all-linear" if targets == "all-linear" else targets.split(","))
    model = peft.get_peft_model(base(model_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)


class AdaptersOff:
    """The PEFT model called with its adapters disabled (the reference)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


def check(case_path):
    with open(case_path) as f:
        c = json.load(f)
    with open(c["data"]) as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    # Each sequence scored alone, as the worker scores it (LongRoPE).
    dpo_reference.PER_SEQUENCE = bool(c.get("per_sequence", False))
    torch.manual_seed(0)
    model = peft.PeftModel.from_pretrained(base(c["model"]), c["init"], is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=c["lr"])
    g = c["global_batch_size"]
    # The losses of dpo_reference.py (the papers' formulas), with the reference
    # being this same model under disable_adapter().
    loss_case = {"loss": c.get("loss", "sigmoid"), "beta": c["beta"], "label_smoothing": 0.0,
                 "nll_weight": 0.0, "negative_weight": c.get("negative_weight", 0.5), "reference_free": False}
    for step in range(c["steps"]):
        opt.zero_grad()
        loss = dpo_reference.case_loss(loss_case, model, AdaptersOff(model), pairs[step * g:(step + 1) * g])
        loss.backward()
        opt.step()
    os.makedirs(c["out"], exist_ok=True)
    model.save_pretrained(os.path.join(c["out"], "reference"))
    model.eval()

    ids, attn, _ = dpo_reference.batch(pairs[:4], "chosen_ids")
    ours = peft.PeftModel.from_pretrained(base(c["model"]), c["ours"]).eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attn).logits
        got = ours(input_ids=ids, attention_mask=attn).logits
        mask = attn.bool()
        results = {"adapter_logits": (want - got).abs()[mask].max().item(),
                   "logits_scale": want.abs()[mask].max().item()}
        merged_dir = os.path.join(c["ours"], "merged")
        if os.path.isdir(merged_dir):
            peft_merged = ours.merge_and_unload()
            ours_merged = base(merged_dir).eval()
            a = peft_merged(input_ids=ids, attention_mask=attn).logits
            b = ours_merged(input_ids=ids, attention_mask=attn).logits
            results["merged_logits"] = (a - b).abs()[mask].max().item()
    with open(os.path.join(c["out"], "results.json"), "w") as f:
        json.dump(results, f)


def main():
    torch.set_num_threads(2)
    if sys.argv[1] == "init":
        init(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    elif sys.argv[1] == "check":
        check(sys.argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    main()
