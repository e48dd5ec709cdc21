#!/usr/bin/env python3
"""Writes synthetic datasets with rules a tiny model can learn, for demos and tests.

    python examples/make_pairs.py --task copy --out DIR [--n 400] [--eval-n 100] [--seed 0]

Tasks (all text, so they exercise tokenization):
  copy      preference pairs: the prompt lists words; the chosen answer repeats the
            first word, the rejected one another word of the prompt. Held-out
            prompts are new word sequences, so accuracy measures the rule.
  add       preference pairs: "a + b =" with the right sum chosen and a sum off by
            one to three rejected; held-out operand pairs never appear in training.
  classify  labelled examples {"prompt","completion"}: the label names the kind of
            the prompt's first word (colour, animal, number). Also writes
            eval_pairs.jsonl: each eval prompt with its right label chosen and a
            wrong one rejected, to measure classification accuracy.
Writes OUT/train.jsonl and OUT/eval.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random

KINDS = {
    "colour": "red blue green white black yellow".split(),
    "animal": "cat dog bird fish horse cow".split(),
    "number": "one two three four five six".split(),
}
FILLER = "the a and or is was will can good bad small big fast slow runs sits sees eats likes".split()


def copy_pair(rng: random.Random) -> dict:
    words = rng.sample(sum(KINDS.values(), []), k=rng.randint(3, 5))
    other = rng.choice(words[1:])
    return {"prompt": " ".join(words) + " :", "chosen": " " + words[0], "rejected": " " + other}


def add_pair(rng: random.Random, operands: list[tuple[int, int]]) -> dict:
    a, b = rng.choice(operands)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    if wrong < 0:
        wrong = a + b + 1
    return {"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {wrong}"}


def classify_example(rng: random.Random) -> dict:
    kind = rng.choice(sorted(KINDS))
    words = [rng.choice(KINDS[kind])] + rng.sample(FILLER, k=rng.randint(2, 4))
    return {"prompt": "kind of " + " ".join(words) + " ?", "completion": " " + kind}


def write(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["copy", "add", "classify"], default="copy")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=400, help="training rows")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if args.task == "copy":
        seen = set()
        train = []
        while len(train) < args.n:
            row = copy_pair(rng)
            seen.add(row["prompt"])
            train.append(row)
        evals = []
        while len(evals) < args.eval_n:
            row = copy_pair(rng)
            if row["prompt"] not in seen:
                evals.append(row)
    elif args.task == "add":
        operands = [(a, b) for a in range(10) for b in range(10)]
        rng.shuffle(operands)
        train = [add_pair(rng, operands[20:]) for _ in range(args.n)]
        evals = [add_pair(rng, operands[:20]) for _ in range(args.eval_n)]
    else:
        train = [classify_example(rng) for _ in range(args.n)]
        evals = [classify_example(rng) for _ in range(args.eval_n)]
        pairs = []
        for row in evals:
            wrong = rng.choice([k for k in sorted(KINDS) if " " + k != row["completion"]])
            pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": " " + wrong})
        write(os.path.join(args.out, "eval_pairs.jsonl"), pairs)
    write(os.path.join(args.out, "train.jsonl"), train)
    write(os.path.join(args.out, "eval.jsonl"), evals)


if __name__ == "__main__":
    main()
