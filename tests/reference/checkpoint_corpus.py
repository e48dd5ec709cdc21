#!/usr/bin/env python3
"""A corpus of checkpoint layouts as people download them, built with transformers,
tokenizers and torch alone (nothing is downloaded), and what transformers makes of
each one.

    checkpoint_corpus.py build OUT

writes OUT/decoder/<layout>/ (a tiny Llama) and OUT/encoder/<layout>/ (a tiny BERT
token classifier; one RoBERTa), and OUT/expected.json:

    {"sentences": [...], "words": [[...]], "pairs": FILE,
     "layouts": {"decoder/clean": {
         "plain": [ids of each sentence, add_special_tokens=False],
         "special": [ids of each sentence, add_special_tokens=True],
         "words": [{"ids", "word_ids"} of each word list, is_split_into_words] (encoders),
         "missing": [parameters transformers initialised anew],
         "refused": "what our loader must say" (layouts we refuse),
         "pairs_tokens": FILE (decoders: the pairs tokenized by AutoTokenizer)}}}

and OUT/logits/<kind>-<layout>.safetensors ("logits" of the layout's entry) with
transformers' logits of every sentence (logits.N, from the ids of "special").

Layouts (each a quirk of real checkpoints):
  clean                 save_pretrained as transformers 5 writes it
  padded-tokenizer      tokenizer.json carrying fixed padding to 128 and truncation
                        (as sentence-transformers and many Hub repositories export it)
  sharded               model-0000N-of-0000M.safetensors + model.safetensors.index.json
  pytorch-bin           pytorch_model.bin (torch.save's zip format)
  pytorch-bin-sharded   pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json
  pytorch-bin-legacy    the pre-1.6 torch.save format (refused)
  pytorch-bin-hostile   a torch.save file whose pickle calls os.system (refused, nothing runs)
  base-model            LlamaModel / BertModel saved alone: no task prefix, no head
  vocab-files           no tokenizer.json: GPT-2's vocab.json + merges.txt (decoder),
                        BERT's vocab.txt (encoder, cased), RoBERTa's (roberta-vocab-files)
  vocab-txt-uncased     vocab.txt with do_lower_case and strip_accents
  sentencepiece         a SentencePiece tokenizer.model and no tokenizer.json (refused)
  add-eos-token         tokenizer_config.json with add_bos_token and add_eos_token
  chat-template-file    the chat template in chat_template.jinja (decoder)
  added-tokens          tokens declared only in added_tokens_decoder (decoder: special
                        ChatML markers over tokenizer.json; encoder: vocab-txt-added-tokens)
  tied                  tie_word_embeddings (the clean decoder is untied)
  tied-with-equal-lm-head  tied, with a copy of the embedding as lm_head.weight in the file
  tied-with-other-lm-head  tied in config.json, with a different lm_head.weight in the file
                        (transformers loads it untied)

Nothing here shares code with the Rust implementation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples"))
import tiny_encoder  # noqa: E402
import tiny_model  # noqa: E402

SENTENCES = [
    "the cat sees a dog",
    "Café naïve résumé — Ünïcödé Ångström",
    "東京 と 北京 中文字 混合 text",
    "emoji 🙂🚀 and ☃ here",
    "  extra   spaces\tand\ttabs  at the ends  ",
    "unknownword zxqvbj Supercalifragilistic QWERTY",
    "<|im_start|>user tags <ent>Ann</ent> and <ENT> here<|im_end|>",
]

WORDS = [
    ["Ann", "Lee", "lives", "in", "Oslo"],
    ["Zoë", "visited", "Zürich", "and", "東京"],
    ["an", "unknownword", "🙂"],
]

# Words the encoders' tokenizers also learn, so accents and CJK have pieces.
EXTRA_CORPUS = [
    "Café naïve résumé Zoë Zürich Ångström Ünïcödé",
    "東京 北京 中文字 混合 と",
]

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'].strip() }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def copy_layout(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def hub_cache_layout(src: str, root: str, repo: str, rev: str, escape: str | None = None) -> str:
    """`src` as huggingface_hub's cache holds a download: every file a blob named
    by its sha256 under `models--org--<repo>/blobs/`, and the snapshot folder
    `snapshots/<rev>/` of relative links to them (`../../blobs/<sha>`, one `../`
    more per subfolder). With `escape`, that file of the snapshot links to a
    copy outside the repository instead (absolute), as a hostile one would.
    Returns the layout's name: the snapshot folder, below `root`."""
    repo_dir = os.path.join(root, "hub-cache", f"models--org--{repo}")
    snapshot = os.path.join(repo_dir, "snapshots", rev)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(rev)
    for folder, _, files in os.walk(src):
        rel_folder = os.path.relpath(folder, src)
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            sha = hashlib.sha256(data).hexdigest()
            with open(os.path.join(repo_dir, "blobs", sha), "wb") as f:
                f.write(data)
            link = os.path.normpath(os.path.join(snapshot, rel_folder, name))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            rel = os.path.relpath(link, snapshot)
            if escape is not None and rel == escape:
                outside = os.path.join(root, f"outside-{repo}-{name}")
                with open(outside, "wb") as f:
                    f.write(data)
                os.symlink(os.path.abspath(outside), link)
            else:
                os.symlink(os.path.relpath(os.path.join(repo_dir, "blobs", sha), os.path.dirname(link)), link)
    return os.path.relpath(snapshot, root)


def pad_tokenizer_json(path: str, pad_id: int, pad_token: str) -> None:
    """What sentence-transformers (and many repositories) leave in tokenizer.json."""
    tok = read_json(path)
    tok["padding"] = {
        "strategy": {"Fixed": 128},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": pad_id,
        "pad_type_id": 0,
        "pad_token": pad_token,
    }
    tok["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0}
    write_json(path, tok)


def to_torch_bin(dir_: str, shards: int = 1, legacy: bool = False) -> None:
    """Replaces the safetensors weights by torch.save files, as transformers 4 wrote them."""
    state = {}
    for name in sorted(os.listdir(dir_)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(dir_, name)))
            os.remove(os.path.join(dir_, name))
    index = os.path.join(dir_, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)
    names = sorted(state)
    if shards == 1:
        torch.save(state, os.path.join(dir_, "pytorch_model.bin"), _use_new_zipfile_serialization=not legacy)
        return
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        torch.save(part, os.path.join(dir_, file))
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(os.path.join(dir_, "pytorch_model.bin.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map})


def vocab_files_from_bpe(dir_: str, tokenizer_class: str) -> None:
    """Turns a byte-level BPE tokenizer.json into the slow tokenizer's vocab.json +
    merges.txt, as GPT-2 and RoBERTa repositories ship them."""
    tok = read_json(os.path.join(dir_, "tokenizer.json"))
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    write_json(os.path.join(dir_, "vocab.json"), vocab)
    with open(os.path.join(dir_, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for merge in tok["model"]["merges"]:
            f.write((merge if isinstance(merge, str) else " ".join(merge)) + "\n")
    os.remove(os.path.join(dir_, "tokenizer.json"))
    cfg = read_json(os.path.join(dir_, "tokenizer_config.json"))
    cfg["tokenizer_class"] = tokenizer_class
    write_json(os.path.join(dir_, "tokenizer_config.json"), cfg)


def vocab_txt_from_wordpiece(dir_: str, lower: bool) -> None:
    """BERT's vocab.txt (one piece per line, by id) and a tokenizer_config.json as
    transformers writes it for BertTokenizer, instead of tokenizer.json."""
    tok = read_json(os.path.join(dir_, "tokenizer.json"))
    vocab = tok["model"]["vocab"]
    with open(os.path.join(dir_, "vocab.txt"), "w") as f:
        for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            f.write(piece + "\n")
    os.remove(os.path.join(dir_, "tokenizer.json"))
    cfg = read_json(os.path.join(dir_, "tokenizer_config.json"))
    cfg["tokenizer_class"] = "BertTokenizer"
    cfg["do_lower_case"] = lower
    cfg["strip_accents"] = True if lower else None
    cfg["tokenize_chinese_chars"] = True
    write_json(os.path.join(dir_, "tokenizer_config.json"), cfg)


def add_tokens(dir_: str, model, tokens: list[tuple[str, bool]]) -> None:
    """Declares new tokens in tokenizer_config.json's added_tokens_decoder (with
    the flags transformers writes) at the next free ids, and saves `model` with
    its embedding grown to hold them."""
    cfg = read_json(os.path.join(dir_, "tokenizer_config.json"))
    size = len(transformers.AutoTokenizer.from_pretrained(dir_))
    decoder = cfg.setdefault("added_tokens_decoder", {})
    for i, (content, special) in enumerate(tokens):
        decoder[str(size + i)] = {
            "content": content, "lstrip": False, "normalized": not special, "rstrip": False,
            "single_word": False, "special": special,
        }
    write_json(os.path.join(dir_, "tokenizer_config.json"), cfg)
    grown = copy.deepcopy(model)
    torch.manual_seed(0)
    grown.resize_token_embeddings(size + len(tokens), mean_resizing=False)
    for name in os.listdir(dir_):
        if name.endswith(".safetensors") or name == "config.json":
            os.remove(os.path.join(dir_, name))
    grown.save_pretrained(dir_)


def sentencepiece_layout(dir_: str) -> None:
    """A Llama-style repository of the SentencePiece era: tokenizer.model only."""
    import sentencepiece as spm

    corpus = os.path.join(dir_, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(tiny_model.corpus()) + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(dir_, "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, minloglevel=2,
    )
    os.remove(corpus)
    os.remove(os.path.join(dir_, "tokenizer.vocab"))
    os.remove(os.path.join(dir_, "tokenizer.json"))
    cfg = read_json(os.path.join(dir_, "tokenizer_config.json"))
    cfg["tokenizer_class"] = "LlamaTokenizer"
    write_json(os.path.join(dir_, "tokenizer_config.json"), cfg)


class Payload:
    """Unpickles as a call to os.system (writes a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def decoder_layouts(root: str) -> dict[str, str | None]:
    """Layout name -> the refusal our loader must give (None: loaded and checked)."""
    clean = os.path.join(root, "clean")
    args = tiny_model.parser().parse_args(["--out", clean])
    tiny_model.make_model(args)
    layouts: dict[str, str | None] = {"clean": None}

    pad_tokenizer_json(os.path.join(copy_layout(clean, os.path.join(root, "padded-tokenizer")), "tokenizer.json"), 2, "<pad>")
    layouts["padded-tokenizer"] = None

    sharded = os.path.join(root, "sharded")
    model = transformers.AutoModelForCausalLM.from_pretrained(clean)
    shutil.copytree(clean, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(sharded, max_shard_size="40KB")
    layouts["sharded"] = None
    # Downloaded with huggingface_hub: the cache's links into blobs/.
    layouts[hub_cache_layout(sharded, root, "tiny-llama", "5d1c0ffee0ddba11")] = None
    layouts[hub_cache_layout(clean, root, "escape", "e5ca9e", escape="tokenizer.json")] = "may link only within"

    to_torch_bin(copy_layout(clean, os.path.join(root, "pytorch-bin")))
    layouts["pytorch-bin"] = None
    to_torch_bin(copy_layout(clean, os.path.join(root, "pytorch-bin-sharded")), shards=3)
    layouts["pytorch-bin-sharded"] = None
    to_torch_bin(copy_layout(clean, os.path.join(root, "pytorch-bin-legacy")), legacy=True)
    layouts["pytorch-bin-legacy"] = "legacy (PyTorch < 1.6) torch.save format"

    # A weights file that runs code when unpickled (what weights_only=True and our
    # loader exist for): it must be refused, and nothing may run.
    hostile = copy_layout(clean, os.path.join(root, "pytorch-bin-hostile"))
    to_torch_bin(hostile)
    state = torch.load(os.path.join(hostile, "pytorch_model.bin"), weights_only=True)
    state["model.norm.weight"] = Payload(os.path.join(hostile, "PWNED"))
    torch.save(state, os.path.join(hostile, "pytorch_model.bin"))
    layouts["pytorch-bin-hostile"] = "refusing to unpickle posix.system"

    base = os.path.join(root, "base-model")
    shutil.copytree(clean, base, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    model.model.save_pretrained(base)  # LlamaModel: no "model." prefix, no lm_head
    layouts["base-model"] = None

    vocab_files_from_bpe(copy_layout(clean, os.path.join(root, "vocab-files")), "GPT2Tokenizer")
    layouts["vocab-files"] = None

    sentencepiece_layout(copy_layout(clean, os.path.join(root, "sentencepiece")))
    layouts["sentencepiece"] = "a SentencePiece model without tokenizer.json"

    # Tokens a fine-tune added in tokenizer_config.json's added_tokens_decoder only
    # (ChatML markers), the embedding grown to hold them.
    added = copy_layout(clean, os.path.join(root, "added-tokens"))
    add_tokens(added, model, [("<|im_start|>", True), ("<|im_end|>", True), ("<ent>", False)])
    layouts["added-tokens"] = None

    eos = copy_layout(clean, os.path.join(root, "add-eos-token"))
    cfg = read_json(os.path.join(eos, "tokenizer_config.json"))
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = True
    write_json(os.path.join(eos, "tokenizer_config.json"), cfg)
    layouts["add-eos-token"] = None

    chat = copy_layout(clean, os.path.join(root, "chat-template-file"))
    with open(os.path.join(chat, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    layouts["chat-template-file"] = None

    # Tied embeddings as transformers saves them (no lm_head.weight in the file),
    # and as older exports did: an lm_head.weight copy in the file too, equal to
    # the embedding or (a fine-tune that untied them without saying so) not.
    tied = os.path.join(root, "tied")
    tiny_model.make_model(tiny_model.parser().parse_args(["--out", tied, "--tie", "--seed", "3"]))
    layouts["tied"] = None
    tied_model = transformers.AutoModelForCausalLM.from_pretrained(tied)
    for name, scale in (("tied-with-equal-lm-head", 1.0), ("tied-with-other-lm-head", 0.5)):
        dst = os.path.join(root, name)
        shutil.copytree(tied, dst, ignore=shutil.ignore_patterns("*.safetensors"))
        state = {n: t.detach().clone().contiguous() for n, t in tied_model.state_dict().items()}
        state["lm_head.weight"] = (state["model.embed_tokens.weight"] * scale).contiguous()
        save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
        layouts[name] = None
    return layouts


def encoder_layouts(root: str) -> dict[str, str | None]:
    extra = os.path.join(root, "extra-corpus.txt")
    with open(extra, "w") as f:
        f.write("\n".join(EXTRA_CORPUS * 20) + "\n")
    clean = os.path.join(root, "clean")
    common = ["--labels", ",".join(LABELS), "--dropout", "0", "--init-range", "0.1", "--corpus", extra, "--vocab", "500"]
    tiny_encoder.main(["--out", clean, "--family", "bert", "--head", "token", "--seed", "3", *common])
    layouts: dict[str, str | None] = {"clean": None}

    pad_tokenizer_json(os.path.join(copy_layout(clean, os.path.join(root, "padded-tokenizer")), "tokenizer.json"), 0, "[PAD]")
    # sentence-transformers' own files beside the model's.
    padded = os.path.join(root, "padded-tokenizer")
    write_json(os.path.join(padded, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ])
    write_json(os.path.join(padded, "sentence_bert_config.json"), {"max_seq_length": 128, "do_lower_case": False})
    layouts["padded-tokenizer"] = None

    model = transformers.AutoModelForTokenClassification.from_pretrained(clean)
    sharded = os.path.join(root, "sharded")
    shutil.copytree(clean, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(sharded, max_shard_size="30KB")
    layouts["sharded"] = None
    layouts[hub_cache_layout(padded, root, "tiny-bert", "a11ce5bee5")] = None

    to_torch_bin(copy_layout(clean, os.path.join(root, "pytorch-bin")))
    layouts["pytorch-bin"] = None

    base = os.path.join(root, "base-model")
    shutil.copytree(clean, base, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    model.bert.save_pretrained(base)  # BertModel: no "bert." prefix, a pooler, no head
    layouts["base-model"] = None

    vocab_txt_from_wordpiece(copy_layout(clean, os.path.join(root, "vocab-files")), lower=False)
    layouts["vocab-files"] = None
    vocab_txt_from_wordpiece(copy_layout(clean, os.path.join(root, "vocab-txt-uncased")), lower=True)
    layouts["vocab-txt-uncased"] = None

    added = copy_layout(os.path.join(root, "vocab-files"), os.path.join(root, "vocab-txt-added-tokens"))
    add_tokens(added, model, [("<ent>", False), ("</ent>", False), ("[ENT]", True)])
    layouts["vocab-txt-added-tokens"] = None

    roberta = os.path.join(root, "roberta-vocab-files")
    tiny_encoder.main(["--out", roberta, "--family", "roberta", "--head", "token", "--seed", "4", *common])
    vocab_files_from_bpe(roberta, "RobertaTokenizer")
    layouts["roberta-vocab-files"] = None
    os.remove(extra)
    return layouts


def tokenize_pairs(tok, pairs: list[dict]) -> list[dict]:
    """The design's rule, with transformers' tokenizer: the prompt with BOS once
    (when the tokenizer adds one), each response with EOS appended."""
    out = []
    for p in pairs:
        prompt = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and tok(p["prompt"])["input_ids"][:1] == [tok.bos_token_id]:
            prompt = [tok.bos_token_id] + prompt
        resp = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
        out.append({"prompt_ids": prompt, "chosen_ids": resp(p["chosen"]), "rejected_ids": resp(p["rejected"])})
    return out


def text_pairs() -> list[dict]:
    rng = random.Random(7)
    words = tiny_model.WORDS
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    pairs = []
    for i in range(8):
        pairs.append({
            "prompt": f"question {i}: {sentence(rng.randint(1, 5))}? Café 東京",
            "chosen": " " + sentence(rng.randint(1, 4)),
            "rejected": " " + sentence(rng.randint(1, 5)) + " 🙂",
        })
    return pairs


@torch.no_grad()
def describe(kind: str, dir_: str, refused: str | None, pairs: list[dict], out: str) -> dict:
    if refused is not None:
        return {"refused": refused}
    tok = transformers.AutoTokenizer.from_pretrained(dir_)
    entry = {
        "plain": [tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES],
        "special": [tok(s)["input_ids"] for s in SENTENCES],
    }
    if kind == "encoder":
        words = []
        for ws in WORDS:
            enc = tok(ws, is_split_into_words=True)
            words.append({"ids": enc["input_ids"], "word_ids": enc.word_ids()})
        entry["words"] = words
        auto = transformers.AutoModelForTokenClassification
    else:
        auto = transformers.AutoModelForCausalLM
        path = os.path.join(out, "pairs", f"{os.path.basename(dir_)}.tokens.jsonl")
        with open(path, "w") as f:
            for p in tokenize_pairs(tok, pairs):
                f.write(json.dumps(p) + "\n")
        entry["pairs_tokens"] = path
        if tok.chat_template is not None:
            messages = [{"role": "user", "content": "Café 東京?"}, {"role": "assistant", "content": " a dog "}]
            entry["chat"] = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            entry["chat_full"] = tok.apply_chat_template(messages, tokenize=False)
    kwargs = {"num_labels": len(LABELS)} if kind == "encoder" and "base-model" in dir_ else {}
    model, info = auto.from_pretrained(dir_, attn_implementation="eager", output_loading_info=True, **kwargs)
    model.eval()
    entry["missing"] = sorted(info["missing_keys"])
    logits = {}
    for i, ids in enumerate(entry["special"]):
        logits[f"logits.{i}"] = model(input_ids=torch.tensor([ids])).logits[0].float().contiguous()
    entry["logits"] = os.path.join(out, "logits", f"{kind}-{os.path.basename(dir_)}.safetensors")
    save_file(logits, entry["logits"])
    return entry


def build(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    pairs = text_pairs()
    pairs_path = os.path.join(out, "pairs.jsonl")
    with open(pairs_path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    for sub in ("pairs", "logits"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    expected = {"sentences": SENTENCES, "words": WORDS, "labels": LABELS, "pairs": pairs_path, "layouts": {}}
    for kind, make in (("decoder", decoder_layouts), ("encoder", encoder_layouts)):
        root = os.path.join(out, kind)
        os.makedirs(root, exist_ok=True)
        for name, refused in make(root).items():
            expected["layouts"][f"{kind}/{name}"] = describe(kind, os.path.join(root, name), refused, pairs, out)
    write_json(os.path.join(out, "expected.json"), expected)


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "build":
        build(*args)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
