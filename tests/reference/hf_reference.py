#!/usr/bin/env python3
"""Independent reference numbers for dpo-cluster's tests, computed with transformers.

    hf_reference.py fixtures OUT   build the tiny test checkpoints and their references
    hf_reference.py logits MODEL INPUTS OUT
                                   logits of each sequence in INPUTS (a safetensors file
                                   with input_ids.N tensors), one sequence at a time

Log-probabilities follow TRL's conventions: prompt and response tokenized separately,
the prompt with the tokenizer's own special tokens (BOS where configured), the
response without, plus EOS; the sum of log p(token) over response tokens, one pair at
a time with no padding. Nothing here shares code with the Rust implementation.
"""

from __future__ import annotations

import json
import os
import random
import sys
from types import SimpleNamespace

import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import tiny_model  # noqa: E402

# name -> tiny_model arguments
FIXTURES = {
    # Llama 3 style: llama3 rope scaling, GQA, classic config spelling, sharded weights.
    "llama": dict(arch="llama", rope_scaling="llama3", legacy_config=True, shard_size="40KB"),
    # A second Llama with other weights and the same tokenizer: the reference model.
    "llama-ref": dict(arch="llama", seed=1),
    # Qwen2: q/k/v biases, tied embeddings, no BOS, transformers 5 config spelling.
    "qwen2": dict(arch="qwen2", tie=True),
    # Mistral: multi-query attention and a sliding window shorter than the inputs.
    "mistral": dict(arch="mistral", kv_heads=1, sliding_window=6, rope_scaling="linear"),
    # Qwen2 with the same shapes and other weights.
    "qwen2-other": dict(arch="qwen2", tie=True, seed=5),
    # Qwen3: per-head q/k RMSNorm, no attention bias, head_dim twice hidden/heads,
    # GQA, tied embeddings (as the small Qwen3 checkpoints).
    "qwen3": dict(arch="qwen3", tie=True, kv_heads=2, seed=3),
    # Phi-4-mini's shape of Phi-3: fused qkv_proj / gate_up_proj, rotary on
    # 3/4 of each head, LongRoPE past 16 positions (the longest input has 20).
    "phi3": dict(arch="phi3", rope_scaling="longrope", partial_rotary=0.75, seed=4),
    # Gemma 2: (1 + w) norms, √hidden embeddings, GeGLU, four norms a layer,
    # attention and final logit soft-caps (low enough to bite), a sliding
    # layer (window 6) and a global one, query_pre_attn_scalar ≠ head_dim.
    "gemma2": dict(arch="gemma2", tie=True, seed=6),
    # Gemma 3 (text): q/k norms, no soft-caps, a rotary base per layer type
    # (linear scaling on the global one).
    "gemma3": dict(arch="gemma3_text", tie=True, seed=7),
    # bf16 weights, attention biases, tied embeddings.
    "llama-bf16": dict(arch="llama", dtype="bfloat16", attention_bias=True, tie=True, seed=2),
}

SEQ_LENGTHS = [7, 13, 20]

# Chat templates given to fixtures: ChatML (Qwen2 style, no BOS) and one that writes
# the BOS token itself (Llama 3 style), which must not end up doubled.
CHAT_TEMPLATES = {
    "qwen2": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama": "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'].strip() }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}",
}


def fixture_args(out: str, overrides: dict) -> SimpleNamespace:
    args = tiny_model.parser().parse_args(["--out", out])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def load(model_dir: str, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    model.eval()
    return model


@torch.no_grad()
def logits_of(model, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    out = {}
    for i, ids in enumerate(sequences):
        x = torch.tensor([ids], dtype=torch.long)
        out[f"logits.{i}"] = model(input_ids=x).logits[0].contiguous()
    return out


@torch.no_grad()
def response_logps(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response], dtype=torch.long)
    logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = ids[0, 1:]
    per_token = logp.gather(-1, targets[:, None])[:, 0]
    return float(per_token[len(prompt) - 1 :].sum())


def text_pairs(rng: random.Random, n: int) -> list[dict]:
    words = tiny_model.WORDS
    pairs = []
    for i in range(n):
        sentence = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
        pairs.append(
            {
                "prompt": f"question {i}: {sentence(rng.randint(1, 6))}?",
                "chosen": " " + sentence(rng.randint(1, 5)),
                "rejected": " " + sentence(rng.randint(1, 7)) + "!",
                "source": "synthetic",  # extra columns are ignored
            }
        )
    pairs.append({"prompt": "a", "chosen": "", "rejected": " 1 + 1 = 3"})  # empty text response: EOS only
    return pairs


def token_pairs(rng: random.Random, n: int, vocab: int) -> list[dict]:
    ids = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
    return [
        {"prompt_ids": ids(rng.randint(1, 9)), "chosen_ids": ids(rng.randint(1, 8)), "rejected_ids": ids(rng.randint(1, 8))}
        for _ in range(n)
    ]


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a full forward of the whole sequence (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def chat_pairs(rng: random.Random, n: int) -> list[dict]:
    words = tiny_model.WORDS
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    rows = []
    for _ in range(n):
        prompt = [{"role": "user", "content": sentence(rng.randint(2, 6))}]
        if rng.random() < 0.5:
            prompt = [{"role": "system", "content": sentence(3)}] + prompt
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": sentence(rng.randint(1, 5))}],
                "rejected": [{"role": "assistant", "content": " " + sentence(rng.randint(1, 5)) + " "}],
            }
        )
    return rows


def encode_chat(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """TRL's split of a conversation: the prompt rendered with the generation prompt,
    each response the rest of prompt + response; BOS once, EOS unless already there."""
    prompt_text = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    wants_bos = tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id
    if wants_bos and prompt[:1] != [tok.bos_token_id]:
        prompt = [tok.bos_token_id] + prompt
    responses = []
    for key in ("chosen", "rejected"):
        full = tok.apply_chat_template(pair["prompt"] + pair[key], tokenize=False)
        assert full.startswith(prompt_text)
        ids = tok(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        if ids[-1:] != [tok.eos_token_id]:
            ids = ids + [tok.eos_token_id]
        responses.append(ids)
    return prompt, responses[0], responses[1]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def fixtures(out: str) -> None:
    os.makedirs(os.path.join(out, "ref"), exist_ok=True)
    rng = random.Random(1234)
    for name, overrides in FIXTURES.items():
        tiny_model.make_model(fixture_args(os.path.join(out, name), overrides))
        if name in CHAT_TEMPLATES:
            tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, name))
            tok.chat_template = CHAT_TEMPLATES[name]
            tok.save_pretrained(os.path.join(out, name))

    vocab = transformers.AutoConfig.from_pretrained(os.path.join(out, "llama")).vocab_size
    sequences = [[rng.randrange(vocab) for _ in range(n)] for n in SEQ_LENGTHS]
    inputs = {f"input_ids.{i}": torch.tensor(s, dtype=torch.long) for i, s in enumerate(sequences)}
    save_file(inputs, os.path.join(out, "ref", "inputs.safetensors"))

    write_jsonl(os.path.join(out, "pairs_text.jsonl"), text_pairs(rng, 10))
    write_jsonl(os.path.join(out, "pairs_tokens.jsonl"), token_pairs(rng, 12, vocab))
    write_jsonl(os.path.join(out, "pairs_chat.jsonl"), chat_pairs(rng, 8))

    for name, overrides in FIXTURES.items():
        model_dir = os.path.join(out, name)
        dtype = torch.bfloat16 if overrides.get("dtype") == "bfloat16" else torch.float32
        model = load(model_dir, dtype)
        save_file(logits_of(model, sequences), os.path.join(out, "ref", f"{name}.logits.safetensors"))
        with open(os.path.join(out, "ref", f"{name}.greedy.json"), "w") as f:
            json.dump({"prompt": sequences[1], "tokens": greedy(model, sequences[1], 12)}, f)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        for kind in ("text", "tokens", "chat"):
            if kind == "chat" and name not in CHAT_TEMPLATES:
                continue
            rows = []
            with open(os.path.join(out, f"pairs_{kind}.jsonl")) as f:
                for line in f:
                    pair = json.loads(line)
                    if kind == "text":
                        prompt = tok(pair["prompt"])["input_ids"]
                        chosen = tok(pair["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                        rejected = tok(pair["rejected"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                    elif kind == "chat":
                        prompt, chosen, rejected = encode_chat(tok, pair)
                    else:
                        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
                    rows.append(
                        {
                            "prompt_ids": prompt,
                            "chosen_logps": response_logps(model, prompt, chosen),
                            "rejected_logps": response_logps(model, prompt, rejected),
                            "chosen_tokens": len(chosen),
                            "rejected_tokens": len(rejected),
                        }
                    )
            write_jsonl(os.path.join(out, "ref", f"{name}.{kind}.jsonl"), rows)


def logits(model_dir: str, inputs: str, out: str) -> None:
    tensors = load_file(inputs)
    sequences = [tensors[f"input_ids.{i}"].tolist() for i in range(len(tensors))]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    dtype = getattr(config, "dtype", None) or torch.float32
    save_file(logits_of(load(model_dir, dtype), sequences), out)


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    command, *rest = sys.argv[1:] or ["help"]
    if command == "fixtures" and len(rest) == 1:
        fixtures(rest[0])
    elif command == "logits" and len(rest) == 3:
        logits(*rest)
    else:
        sys.exit(__doc__)
