#!/usr/bin/env python3
"""Independent reference training for dpo-cluster's trainer tests.

    dpo_reference.py CASES.json

CASES.json: {"model": DIR, "data": FILE (pre-tokenized pairs), "cases": [{"name",
"loss", "beta", "label_smoothing", "nll_weight", "negative_weight", "optimizer",
"lr", "weight_decay", "max_grad_norm", "warmup_steps", "schedule", "steps",
"global_batch_size", "reference_free", "out"}]}. For each case it trains the
transformers model with the formulas of the papers, the whole global batch in one
forward, torch's own optimizers, clip_grad_norm_ and schedulers, pairs taken in file
order, and writes the final weights to `out` (safetensors). An optional "freeze"
(regexes over parameter names) sets `requires_grad = False` on what they match;
an optional "model" and "data" in a case replace the top-level ones for it.
An optional top-level "device" ("cuda", default "cpu") says where it trains.

Losses over Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), log π
summed over response tokens (IPO: averaged):
  sigmoid  −(1−ε) log σ(βΔ) − ε log σ(−βΔ)              (DPO, cDPO)
  robust   [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε)
  ipo      (Δ − 1/(2β))²
  hinge    max(0, 1 − βΔ)
  + nll_weight × mean token NLL of chosen responses (RPO)
  sft      mean token NLL of chosen responses
  combined sft + negative_weight × mean over rejected tokens of −log(1 − p)
"""

from __future__ import annotations

import copy
import json
import re
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file


def batch(pairs, key):
    """Right-padded prompt+response ids and a response mask (of the predicted token)."""
    seqs = [p["prompt_ids"] + p[key] for p in pairs]
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    attn = torch.zeros(len(seqs), n, dtype=torch.long)
    resp = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(pairs, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, len(p["prompt_ids"]) : len(s)] = True
    return ids.to(DEVICE), attn.to(DEVICE), resp.to(DEVICE)


DEVICE = torch.device("cpu")


PER_SEQUENCE = False


def forward_logits(model, ids, attn):
    """The batch's logits; with PER_SEQUENCE, each sequence's from a forward of
    it alone (LongRoPE chooses its factors by the length a forward reaches:
    alone, that is the sequence's own, as the worker chooses them)."""
    if not PER_SEQUENCE:
        return model(input_ids=ids, attention_mask=attn).logits
    rows = []
    for i in range(ids.shape[0]):
        n = int(attn[i].sum())
        row = model(input_ids=ids[i : i + 1, :n]).logits[0]
        pad = torch.zeros(ids.shape[1] - n, row.shape[-1], dtype=row.dtype, device=row.device)
        rows.append(torch.cat([row, pad], 0))
    return torch.stack(rows)


def token_logps(model, ids, attn, resp):
    logits = forward_logits(model, ids, attn)[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = resp[:, 1:].float()
    return lp * mask, mask


def case_loss(c, policy, reference, pairs):
    beta, eps = c["beta"], c["label_smoothing"]
    chosen = batch(pairs, "chosen_ids")
    rejected = batch(pairs, "rejected_ids")
    lc, mc = token_logps(policy, *chosen)
    lr_, mr = token_logps(policy, *rejected)
    nll = -lc.sum() / mc.sum()
    if c["loss"] == "sft":
        return nll
    if c["loss"] == "combined":
        p = lr_.exp()
        ul = -(torch.clamp(1 - p, min=1e-6).log() * mr).sum() / mr.sum()
        return nll + c["negative_weight"] * ul
    pc, pr = lc.sum(-1), lr_.sum(-1)
    if c["reference_free"]:
        rc = rr = torch.zeros_like(pc)
    else:
        with torch.no_grad():
            rlc, _ = token_logps(reference, *chosen)
            rlr, _ = token_logps(reference, *rejected)
        rc, rr = rlc.sum(-1), rlr.sum(-1)
    if c["loss"] == "ipo":
        pc, pr, rc, rr = pc / mc.sum(-1), pr / mr.sum(-1), rc / mc.sum(-1), rr / mr.sum(-1)
    delta = (pc - rc) - (pr - rr)
    if c["loss"] == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif c["loss"] == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif c["loss"] == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif c["loss"] == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise SystemExit(f"unknown loss {c['loss']}")
    loss = losses.mean()
    if c["nll_weight"]:
        loss = loss + c["nll_weight"] * nll
    return loss


def run_case(c, model_dir, pairs):
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    policy.to(DEVICE)
    policy.train()
    reference = copy.deepcopy(policy).eval()
    # `freeze`: regexes over parameter names (searched anywhere in the name).
    for n, p in policy.named_parameters():
        if any(re.search(f, n) for f in c.get("freeze", [])):
            p.requires_grad_(False)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not (n.endswith(".bias") or n.endswith("norm.weight"))]
    no_decay = [p for n, p in named if n.endswith(".bias") or n.endswith("norm.weight")]
    groups = [{"params": decay, "weight_decay": c["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if c["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=c["lr"])
    else:
        opt = torch.optim.AdamW(groups, lr=c["lr"], betas=(0.9, 0.999), eps=1e-8, foreach=False)
    sched = transformers.get_scheduler(c["schedule"], opt, num_warmup_steps=c["warmup_steps"], num_training_steps=c["steps"])
    g = c["global_batch_size"]
    for step in range(c["steps"]):
        opt.zero_grad()
        loss = case_loss(c, policy, reference, pairs[step * g : (step + 1) * g])
        loss.backward()
        if c["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], c["max_grad_norm"])
        opt.step()
        sched.step()
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    # Tied only when transformers did tie them (a config that asks for it over a
    # file with an lm_head of its own is loaded untied).
    if policy.get_output_embeddings().weight is policy.get_input_embeddings().weight:
        state.pop("lm_head.weight", None)
    save_file(state, c["out"])


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    def pairs_of(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    torch.set_num_threads(2)
    global DEVICE, PER_SEQUENCE
    DEVICE = torch.device(spec.get("device", "cpu"))
    PER_SEQUENCE = bool(spec.get("per_sequence", False))
    for c in spec["cases"]:
        # A case may name its own model and data.
        run_case(c, c.get("model", spec.get("model")), pairs_of(c.get("data", spec.get("data"))))


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    main()
