#!/usr/bin/env python3
"""Makes the synthetic tasks of the encoder examples, on the spot (nothing is
downloaded):

- NER (tags O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG): sentences from templates
  filled with made-up names (syllables put together). The dev and test splits use
  names that never occur in train, so a model can only score well by reading the
  context and the shape of a name, not by remembering names.
  Written as JSONL ({"id", "tokens", "tags"}) and, for test, also as CoNLL.
- Sentiment (neg, neu, pos): short reviews whose label follows from their words.

    python examples/make_tasks.py --out /tmp/tasks [--train 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random

SYLLABLES = [
    "ka", "lo", "mir", "den", "sa", "vik", "to", "ran", "bel", "no", "tar", "li", "mo", "ser", "gi", "pa",
    "ron", "ve", "dal", "ki", "mar", "os", "ten", "ul", "bra", "fin", "ho", "zen", "cas", "ne",
]
ORG_SUFFIX = ["Corp", "Bank", "Labs", "Motors", "Systems", "Foods", "Insurance", "Airlines", "Trading"]
LOC_PREFIX = ["New", "East", "Port", "Lake", "Santa"]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def pools(rng: random.Random, n: int) -> dict:
    """Name pools: `n` made-up words per kind, drawn from shared syllables."""
    return {kind: sorted({word(rng) for _ in range(n)}) for kind in ("first", "last", "city", "org")}


def held_out(train: dict, other: dict) -> dict:
    """`other`'s names that never occur in `train`."""
    return {k: [w for w in v if all(w not in t for t in train.values())] for k, v in other.items()}


TEMPLATES = [
    "{PER} lives in {LOC} .",
    "{PER} works for {ORG} in {LOC} .",
    "yesterday {PER} flew from {LOC} to {LOC} .",
    "the {ORG} office in {LOC} hired {PER} last week .",
    "{PER} and {PER} met at the {ORG} stand .",
    "according to {PER} , {ORG} will open a branch in {LOC} .",
    "{ORG} shares rose after {PER} spoke in {LOC} .",
    "a spokesperson for {ORG} said the plant near {LOC} stays open .",
    "{PER} visited {LOC} with friends .",
    "we asked {PER} about the {ORG} deal .",
    "the mayor of {LOC} praised {ORG} .",
    "in {LOC} , {PER} founded {ORG} .",
]


def person(rng: random.Random, names: dict) -> str:
    first = rng.choice(names["first"])
    return first if rng.random() < 0.3 else f"{first} {rng.choice(names['last'])}"


def place(rng: random.Random, names: dict) -> str:
    city = rng.choice(names["city"])
    return f"{rng.choice(LOC_PREFIX)} {city}" if rng.random() < 0.2 else city


def company(rng: random.Random, names: dict) -> str:
    return f"{rng.choice(names['org'])} {rng.choice(ORG_SUFFIX)}"


def sentence(rng: random.Random, names: dict):
    template = rng.choice(TEMPLATES)
    tokens, tags = [], []
    for piece in template.split():
        slot = piece.strip("{}") if piece.startswith("{") else None
        if slot is None:
            tokens.append(piece)
            tags.append("O")
            continue
        name = {"PER": person, "LOC": place, "ORG": company}[slot](rng, names)
        for i, w in enumerate(name.split()):
            tokens.append(w)
            tags.append(("B-" if i == 0 else "I-") + slot)
    return tokens, tags


POS = ["great", "lovely", "excellent", "fun", "moving", "superb", "charming", "brilliant"]
NEG = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "painful"]
NEU = ["long", "recent", "french", "quiet", "new", "short", "colour", "second"]
THINGS = ["film", "book", "album", "show", "play", "novel", "series", "game"]


def review(rng: random.Random):
    label = rng.choice(["neg", "neu", "pos"])
    words = {"pos": POS, "neg": NEG, "neu": NEU}[label]
    a, b = rng.sample(words, 2)
    thing = rng.choice(THINGS)
    text = rng.choice([
        f"the {thing} was {a} and {b}",
        f"a {a} {thing} , {b} too",
        f"i found this {thing} {a} , really {b}",
        f"{a} . {b} . that is the {thing}",
    ])
    return text, label


def write_jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--eval", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    ner = os.path.join(args.out, "ner")
    os.makedirs(ner, exist_ok=True)
    train_names = pools(rng, 200)
    test_names = held_out(train_names, pools(rng, 80))
    splits = {"train": (args.train, train_names), "dev": (args.eval, test_names), "test": (args.eval, test_names)}
    for name, (n, names) in splits.items():
        rows = []
        for i in range(n):
            tokens, tags = sentence(rng, names)
            rows.append({"id": f"{name}-{i}", "tokens": tokens, "tags": tags})
        write_jsonl(os.path.join(ner, f"{name}.jsonl"), rows)
        if name == "test":
            with open(os.path.join(ner, "test.conll"), "w") as f:
                f.write("-DOCSTART- -X- O O\n\n")
                for row in rows:
                    for token, tag in zip(row["tokens"], row["tags"]):
                        f.write(f"{token} _ _ {tag}\n")
                    f.write("\n")
    # Text the tokenizer of a from-scratch model is trained on: the train split only.
    with open(os.path.join(ner, "corpus.txt"), "w") as f:
        for line in open(os.path.join(ner, "train.jsonl")):
            f.write(" ".join(json.loads(line)["tokens"]) + "\n")
    sentiment = os.path.join(args.out, "sentiment")
    os.makedirs(sentiment, exist_ok=True)
    for name, n in [("train", args.train), ("dev", args.eval)]:
        rows = []
        for i in range(n):
            text, label = review(rng)
            rows.append({"id": f"{name}-{i}", "text": text, "label": label})
        write_jsonl(os.path.join(sentiment, f"{name}.jsonl"), rows)
    with open(os.path.join(sentiment, "corpus.txt"), "w") as f:
        for line in open(os.path.join(sentiment, "train.jsonl")):
            f.write(json.loads(line)["text"] + "\n")
    print(f"wrote NER ({args.train}/{args.eval}/{args.eval}) and sentiment ({args.train}/{args.eval}) to {args.out}")


if __name__ == "__main__":
    main()
