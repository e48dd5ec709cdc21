#!/usr/bin/env python3
"""Writes a synthetic preference dataset with a rule a tiny model can learn.

Task `add`: the prompt asks for a sum of two digits; the chosen answer is right, the
rejected one is off by one to three. Splits are disjoint by operand pair, so held-out
accuracy measures the rule, not memorisation.

    python examples/make_pairs.py --out data/ --n 400 --seed 0
writes OUT/train.jsonl and OUT/eval.jsonl (text pairs: prompt/chosen/rejected).
"""

from __future__ import annotations

import argparse
import json
import os
import random


def pairs(operands: list[tuple[int, int]], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.choice(operands)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        if wrong < 0:
            wrong = a + b + 1
        rows.append({"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {wrong}"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=400, help="training pairs")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    operands = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(operands)
    held_out = operands[:20]
    train = operands[20:]
    os.makedirs(args.out, exist_ok=True)
    for name, ops, n in (("train", train, args.n), ("eval", held_out, args.eval_n)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            for row in pairs(ops, n, rng):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
