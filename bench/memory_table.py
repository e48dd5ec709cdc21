#!/usr/bin/env python3
"""Model-state memory per GPU for the model families the worker trains, at their
published sizes: parameters counted by transformers on the meta device (nothing is
allocated or downloaded: the shapes are the published `config.json` values written
below), bytes per parameter from docs/MEMORY.md (checked against the measured
`memory/state_bytes_per_parameter` by worker/tests/zero.rs).

Arithmetic, not a measurement: activations come on top (see docs/MEMORY.md).

    python bench/memory_table.py            # the markdown table of docs/MEMORY.md
"""

from __future__ import annotations

import torch
import transformers

GB = 1e9

# Published shapes (config.json of each Hub checkpoint).
MODELS = {
    "Qwen3-0.6B": transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-1.7B": transformers.Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-4B": transformers.Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-8B": transformers.Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "Phi-4-mini (3.8B)": transformers.Phi3Config(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "Gemma-2-2B": transformers.Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256),
    "Gemma-3-1B": transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256),
}

LORA_R = 16
W = 8


def count(config) -> tuple[int, int, int]:
    """(all parameters, of the decoder layers, LoRA r=16 all-linear adapter parameters)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            adapter += LORA_R * (module.in_features + module.out_features)
    return total, layers, adapter


def main() -> None:
    print(f"| model | parameters | full DPO, bf16 + f32 masters, AdamW, stage 0 (16 B/param) | "
          f"stage 1 on {W} GPUs (4 + 12/{W}) | stage 2 on {W} (2 + 2r + 16/{W}) | "
          f"bf16 reference model | LoRA r = {LORA_R}, all-linear: bf16 base + adapter state |")
    print("|---|---|---|---|---|---|---|")
    for name, config in MODELS.items():
        total, layers, adapter = count(config)
        r = (total - layers) / total  # parameters outside the decoder layers
        full = 16 * total
        stage1 = (4 + 12 / W) * total
        stage2 = (2 + 2 * r + 16 / W) * total
        reference = 2 * total
        lora = 2 * total + 16 * adapter
        print(f"| {name} | {total / 1e9:.2f} B (r = {r:.2f}) | {full / GB:.1f} GB | {stage1 / GB:.1f} GB | "
              f"{stage2 / GB:.1f} GB | {reference / GB:.1f} GB | {lora / GB:.1f} GB "
              f"({adapter / 1e6:.1f} M adapter parameters) |")


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    main()
