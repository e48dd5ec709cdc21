#!/usr/bin/env python3
"""Writes a tiny random BERT, RoBERTa, XLM-RoBERTa or DeBERTa-v2/v3 checkpoint in Hugging Face format.

The tokenizer is made on the spot from a synthetic corpus plus any text files given
(WordPiece for BERT, its vocabulary chosen deterministically; byte-level BPE for
RoBERTa; a SentencePiece-style Unigram with `▁`-prefixed pieces for XLM-RoBERTa
and DeBERTa, as their real tokenizer.json files have, DeBERTa's built by
transformers' own `DebertaV2Tokenizer` with DeBERTa-v3's `[PAD] [CLS] [SEP] [UNK]`
layout), and the weights are random, so nothing is downloaded. What this writes is what transformers' `save_pretrained`
writes, which is exactly what dpo-cluster must read.

    python examples/tiny_encoder.py --out /tmp/bert --family bert --head token \
        --labels O,B-PER,I-PER
    python examples/tiny_encoder.py --out /tmp/base --family bert --head none

`--batch JOBS.json` builds every model of a JSON list of argument lists in one
process. `--head none` saves the plain `BertModel`/`RobertaModel` (no classification head,
state-dict names without the `bert.` prefix), as a pretrained base is published.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tiny_model  # noqa: E402


def corpus(extra_files: list[str]) -> list[str]:
    lines = tiny_model.corpus()
    for path in extra_files:
        with open(path) as f:
            lines += [line.strip() for line in f if line.strip()]
    return lines


def wordpiece_vocab(texts: list[str], size: int, specials: list[str]) -> dict:
    """A WordPiece vocabulary chosen deterministically (the tokenizers trainer breaks
    ties in hash order, so two runs differ): the special tokens, every character
    alone and as a continuation (`##c`), then the most frequent word-initial and
    continuation pieces of 2-4 characters, ties by the piece itself."""
    import collections
    import re

    words = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t))
    chars = sorted({c for w in words for c in w})
    vocab = list(specials) + chars + ["##" + c for c in chars]
    pieces = collections.Counter()
    for w, n in words.items():
        for k in range(2, 5):
            if len(w) >= k:
                pieces[w[:k]] += n
            for i in range(1, len(w) - k + 1):
                pieces["##" + w[i:i + k]] += n
    taken = set(vocab)
    for piece, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if piece not in taken:
            vocab.append(piece)
            taken.add(piece)
    return {t: i for i, t in enumerate(vocab)}


def unigram_vocab(texts: list[str], size: int, specials: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary chosen deterministically (the
    tokenizers trainer breaks ties differently from run to run): the special
    tokens, `▁` and every character alone, then the most frequent pieces of 2-8
    characters of the `▁`-prefixed words (ties by the piece), each scored by the
    log of its frequency."""
    import collections
    import math

    words = collections.Counter("\u2581" + w for t in texts for w in t.split())
    counts = collections.Counter()
    for w, n in words.items():
        for i in range(len(w)):
            for k in range(1, 9):
                if i + k <= len(w):
                    counts[w[i:i + k]] += n
    total = sum(counts.values())
    chars = sorted({p for p in counts if len(p) == 1})
    chosen = list(chars)
    taken = set(chosen)
    for piece, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(specials) + len(chosen) >= size:
            break
        if piece not in taken:
            chosen.append(piece)
            taken.add(piece)
    return [(s, 0.0) for s in specials] + [(p, math.log(counts[p] / total)) for p in chosen]


def train_tokenizer(family: str, vocab_size: int, texts: list[str], out: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    import transformers
    from transformers import PreTrainedTokenizerFast

    if family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(wordpiece_vocab(texts, vocab_size, specials), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    elif family == "deberta-v2":
        # DeBERTa-v3's layout: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, pieces, [MASK] last.
        specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
        vocab = unigram_vocab(texts, vocab_size - 1, specials) + [("[MASK]", 0.0)]
        fast = transformers.DebertaV2Tokenizer(vocab=vocab, unk_id=3)
    elif family == "modernbert":
        # ModernBERT's layout (OLMo's byte-level BPE): the pieces first, the
        # specials added after them ([UNK] [CLS] [SEP] [PAD] [MASK] at the end
        # of the vocabulary), no prefix space — each word of a pre-split
        # sentence is encoded as if it began the text, as transformers does
        # for this tokenizer —, `[CLS] $A [SEP]`.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 5, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]",
        )
    elif family == "xlm-roberta":
        # XLM-R's layout: <s>=0, <pad>=1, </s>=2, <unk>=3, pieces, <mask> last.
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.Unigram(unigram_vocab(texts, vocab_size - 1, specials), unk_id=3))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
        fast = transformers.XLMRobertaTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            cls_token="<s>", sep_token="</s>", mask_token="<mask>",
        )
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # add_prefix_space: words given one by one (NER) tokenize as inside a sentence.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=True)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            cls_token="<s>", sep_token="</s>", mask_token="<mask>", add_prefix_space=True,
        )
    fast.save_pretrained(out)
    return fast


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--batch"] and len(argv) == 2:
        # A JSON list of argument lists: every model built in this one process.
        import json

        with open(argv[1]) as f:
            for job in json.load(f):
                main(job)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=["bert", "roberta", "xlm-roberta", "deberta-v2", "modernbert"], default="bert")
    p.add_argument("--deberta", choices=["v3", "v2"], default="v3",
                   help="v3: shared attention keys, log-bucketed positions, normed table, no absolute positions "
                        "(DeBERTa-v3's config); v2: position projections of their own, clamped distances, "
                        "absolute positions and token types too, embeddings narrower than the hidden size")
    p.add_argument("--head", choices=["none", "token", "sequence", "mlm"], default="none",
                   help="mlm: ModernBERT's masked-LM checkpoint, as the base model is published")
    p.add_argument("--global-every", type=int, default=3, help="ModernBERT: a global layer every N")
    p.add_argument("--local-attention", type=int, default=8, help="ModernBERT: the local layers' window")
    p.add_argument("--pooling", choices=["cls", "mean"], default="mean", help="ModernBERT's sequence head")
    p.add_argument("--biases", action="store_true", help="ModernBERT: biases in norms and linear layers")
    p.add_argument("--labels", default="", help="comma-separated labels of the head (id order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=400)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=64)
    p.add_argument("--max-positions", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--init-range", type=float, default=0.02)
    p.add_argument("--act", default="gelu")
    p.add_argument("--corpus", action="append", default=[], help="text file(s) the tokenizer also learns from")
    args = p.parse_args(argv)

    import torch
    import transformers

    os.makedirs(args.out, exist_ok=True)
    fast = train_tokenizer(args.family, args.vocab, corpus(args.corpus), args.out)
    labels = [x for x in args.labels.split(",") if x]
    common = dict(
        vocab_size=len(fast),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        hidden_act=args.act,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        initializer_range=args.init_range,
        pad_token_id=fast.pad_token_id,
    )
    if labels:
        common["id2label"] = dict(enumerate(labels))
        common["label2id"] = {label: i for i, label in enumerate(labels)}
    if args.family == "modernbert":
        # ModernBERT's own key names and settings (answerdotai/ModernBERT-base's,
        # at this size): a global layer every `--global-every`, the others
        # attending within `--local-attention` positions, no biases, mean
        # pooling for the sequence head when asked.
        config = transformers.ModernBertConfig(
            vocab_size=len(fast), hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, intermediate_size=args.intermediate, hidden_activation=args.act,
            max_position_embeddings=args.max_positions, initializer_range=args.init_range,
            embedding_dropout=args.dropout, attention_dropout=args.dropout, mlp_dropout=args.dropout,
            classifier_dropout=args.dropout, pad_token_id=fast.pad_token_id, cls_token_id=fast.cls_token_id,
            sep_token_id=fast.sep_token_id, bos_token_id=fast.cls_token_id, eos_token_id=fast.sep_token_id,
            global_attn_every_n_layers=args.global_every, local_attention=args.local_attention,
            classifier_pooling=args.pooling, norm_bias=args.biases, attention_bias=args.biases,
            mlp_bias=args.biases, classifier_bias=args.biases,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            **({"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}
               if labels else {}),
        )
        classes = {"none": transformers.ModernBertModel, "token": transformers.ModernBertForTokenClassification,
                   "sequence": transformers.ModernBertForSequenceClassification,
                   "mlm": transformers.ModernBertForMaskedLM}
    elif args.family == "deberta-v2":
        if args.deberta == "v3":
            # microsoft/deberta-v3-base's settings, at this size (16 buckets:
            # the test sentences reach the log-bucketed distances).
            extra = dict(relative_attention=True, position_buckets=16, max_relative_positions=-1,
                         norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type="p2c|c2p",
                         position_biased_input=False, type_vocab_size=0)
        else:
            extra = dict(relative_attention=True, position_buckets=-1, max_relative_positions=6,
                         norm_rel_ebd="none", share_att_key=False, pos_att_type=["c2p", "p2c"],
                         position_biased_input=True, type_vocab_size=2, embedding_size=args.hidden // 2,
                         pooler_hidden_act="tanh", cls_dropout=0.0)
        config = transformers.DebertaV2Config(max_position_embeddings=args.max_positions, layer_norm_eps=1e-7,
                                              **extra, **common)
        classes = {"none": transformers.DebertaV2Model, "token": transformers.DebertaV2ForTokenClassification,
                   "sequence": transformers.DebertaV2ForSequenceClassification}
    elif args.family == "bert":
        config = transformers.BertConfig(max_position_embeddings=args.max_positions, type_vocab_size=2, **common)
        classes = {"none": transformers.BertModel, "token": transformers.BertForTokenClassification,
                   "sequence": transformers.BertForSequenceClassification}
    elif args.family == "xlm-roberta":
        # RoBERTa's architecture (positions after padding_idx too).
        config = transformers.XLMRobertaConfig(
            max_position_embeddings=args.max_positions + fast.pad_token_id + 1, type_vocab_size=1,
            bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, **common
        )
        classes = {"none": transformers.XLMRobertaModel, "token": transformers.XLMRobertaForTokenClassification,
                   "sequence": transformers.XLMRobertaForSequenceClassification}
    else:
        # RoBERTa's positions start after padding_idx: two more rows than usable positions.
        config = transformers.RobertaConfig(
            max_position_embeddings=args.max_positions + fast.pad_token_id + 1, type_vocab_size=1,
            bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, **common
        )
        classes = {"none": transformers.RobertaModel, "token": transformers.RobertaForTokenClassification,
                   "sequence": transformers.RobertaForSequenceClassification}
    torch.manual_seed(args.seed)
    model = classes[args.head](config)
    model.save_pretrained(args.out)
    print(f"wrote {args.family} ({args.head} head, {sum(p.numel() for p in model.parameters())} parameters) to {args.out}")


if __name__ == "__main__":
    main()
