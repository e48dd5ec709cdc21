#!/usr/bin/env python3
"""Writes a tiny random Llama-family checkpoint in Hugging Face format.

The tokenizer is a byte-level BPE trained on the spot on a synthetic corpus, and the
weights are random, so nothing is downloaded. The result is what `transformers`
itself saves (`save_pretrained`), which is exactly what dpo-cluster must read.

    python examples/tiny_model.py --out /tmp/tiny --arch llama
"""

from __future__ import annotations

import argparse
import json
import os
import random

WORDS = (
    "the a one two three four five six seven eight nine ten cat dog bird fish tree "
    "house river hill red blue green small big fast slow runs sits sees eats likes "
    "and or not yes no is was will can good bad answer question add plus minus equals"
).split()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(3, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)) + rng.choice([".", "?", "!", ""]))
    lines += [str(i) for i in range(200)] + [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]
    return lines


ARCH_TOKENS = {
    # (bos, eos, pad, extra specials, add_bos)
    "llama": ("<s>", "</s>", "<pad>", [], True),
    "mistral": ("<s>", "</s>", "<pad>", [], True),
    "qwen2": (None, "<|endoftext|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], False),
    "qwen3": (None, "<|endoftext|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], False),
    "phi3": ("<s>", "<|endoftext|>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|end|>"], False),
    "gemma2": ("<bos>", "<eos>", "<pad>", ["<start_of_turn>", "<end_of_turn>"], True),
    "gemma3_text": ("<bos>", "<eos>", "<pad>", ["<start_of_turn>", "<end_of_turn>"], True),
}


def train_tokenizer(arch: str, vocab_size: int, out: str) -> int:
    """Trains and saves tokenizer.json + tokenizer_config.json; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, extra, add_bos = ARCH_TOKENS[arch]
    specials = [t for t in dict.fromkeys([bos, eos, pad, *extra]) if t is not None]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.save_pretrained(out)
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["add_bos_token"] = add_bos
    cfg["add_eos_token"] = False
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return tok.get_vocab_size(with_added_tokens=True)


def build_config(arch: str, vocab: int, args, tok_ids: dict):
    import transformers

    # Like many real checkpoints, the embedding may be larger than the tokenizer.
    vocab = max(vocab, args.model_vocab or 0)

    common = dict(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=args.tie,
        bos_token_id=tok_ids.get("bos"),
        eos_token_id=tok_ids.get("eos"),
        pad_token_id=tok_ids.get("pad"),
    )
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": args.rope_theta,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    elif args.rope_scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": args.rope_theta, "factor": 2.0}
    elif args.rope_scaling == "longrope":
        # Phi-3 / Phi-4-mini's LongRoPE: a factor per rotary frequency, short
        # within the original context and long past it (here 16 positions,
        # so the test inputs cross it).
        rotary = int(args.hidden // args.heads * args.partial_rotary)
        rope = {
            "rope_type": "longrope",
            "rope_theta": args.rope_theta,
            "short_factor": [1.0 + 0.1 * i for i in range(rotary // 2)],
            "long_factor": [1.5 + 0.7 * i for i in range(rotary // 2)],
            "original_max_position_embeddings": 16,
        }
    if args.partial_rotary != 1.0:
        rope["partial_rotary_factor"] = args.partial_rotary
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_parameters=rope, attention_bias=args.attention_bias)
    if arch == "mistral":
        return transformers.MistralConfig(**common, rope_parameters=rope, sliding_window=args.sliding_window)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters=rope)
    if arch == "qwen3":
        # As the real ones: head_dim independent of hidden/heads (here twice
        # it), q/k norms, no attention bias.
        return transformers.Qwen3Config(**common, rope_parameters=rope,
                                        head_dim=2 * args.hidden // args.heads)
    if arch == "phi3":
        # Fused qkv_proj and gate_up_proj; Phi-4-mini's partial rotary and
        # LongRoPE when asked.
        extra = {}
        if args.rope_scaling == "longrope":
            extra["original_max_position_embeddings"] = 16
        return transformers.Phi3Config(**common, rope_parameters=rope, sliding_window=args.sliding_window,
                                       **extra)
    if arch in ("gemma2", "gemma3_text"):
        # As the real ones: head_dim apart from hidden/heads, a
        # query_pre_attn_scalar that is not head_dim, sliding layers (here
        # with a window shorter than the inputs) alternating with global
        # ones. Gemma 2's soft-caps are set low enough to bite.
        gemma = dict(head_dim=2 * args.hidden // args.heads, query_pre_attn_scalar=24,
                     sliding_window=args.sliding_window or 6,
                     layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention"
                                  for i in range(args.layers)])
        if arch == "gemma2":
            return transformers.Gemma2Config(**common, **gemma, rope_parameters=rope,
                                             attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
        # Gemma 3: a rotary base per layer type, linear scaling on the global one.
        per_type = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
        }
        return transformers.Gemma3TextConfig(**common, **gemma, rope_parameters=per_type)
    raise SystemExit(f"unknown arch {arch}")


def make_model(args) -> None:
    import torch
    import transformers

    os.makedirs(args.out, exist_ok=True)
    vocab = train_tokenizer(args.arch, args.vocab, args.out)
    tok = transformers.AutoTokenizer.from_pretrained(args.out)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    config = build_config(args.arch, vocab, args, ids)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # transformers' default init (std 0.02) gives nearly uniform next-token
    # distributions; larger random weights make every component matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, args.init_std)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = model.to(dtype)
    kwargs = {"max_shard_size": args.shard_size} if args.shard_size else {}
    model.save_pretrained(args.out, **kwargs)
    if args.legacy_config:
        # The spelling of most checkpoints on the Hub, written by transformers 4.x.
        path = os.path.join(args.out, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type")
        cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
        cfg["torch_dtype"] = cfg.pop("dtype")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=sorted(ARCH_TOKENS), default="llama")
    p.add_argument("--vocab", type=int, default=384, help="BPE vocabulary size to train")
    p.add_argument("--model-vocab", type=int, default=None, help="pad the embedding to this many rows")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=160)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=256)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--rope-scaling", choices=["none", "llama3", "linear", "longrope"], default="none")
    p.add_argument("--partial-rotary", type=float, default=1.0, help="partial_rotary_factor (Phi-4-mini: 0.75)")
    p.add_argument("--sliding-window", type=int, default=None)
    p.add_argument("--attention-bias", action="store_true")
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--init-std", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--shard-size", default=None, help="e.g. 40KB: write sharded safetensors with an index")
    p.add_argument("--legacy-config", action="store_true", help="write rope_theta/rope_scaling/torch_dtype")
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    make_model(parser().parse_args())
