//! Which files of a model directory a tokenizer is built from, and how, as
//! transformers builds it:
//!
//! 1. `tokenizer.json` (the `tokenizers` serialisation), with the padding and
//!    truncation stored in it switched off: transformers applies neither unless a
//!    call asks for it, and our own length rules are the only truncation;
//! 2. BERT's WordPiece `vocab.txt`, with `do_lower_case`, `strip_accents` and
//!    `tokenize_chinese_chars` from `tokenizer_config.json`;
//! 3. GPT-2's and RoBERTa's byte-level BPE `vocab.json` + `merges.txt`, with
//!    `add_prefix_space`;
//! 4. a SentencePiece model alone (`tokenizer.model`, `spiece.model`,
//!    `sentencepiece.bpe.model`, DeBERTa-v3's `spm.model`) is refused, naming the transformers command that
//!    writes a `tokenizer.json` beside it: its conversion differs per tokenizer class
//!    (normaliser, prefix space, byte fallback) and is not reproduced here.
//!
//! Special tokens come from `tokenizer_config.json`, then `special_tokens_map.json`
//! (older exports keep them there), then the tokenizer class's defaults.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

pub(super) const TOKENIZER_JSON: &str = "tokenizer.json";
pub(super) const CONFIG: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
const VOCAB_TXT: &str = "vocab.txt";
const VOCAB_JSON: &str = "vocab.json";
const MERGES_TXT: &str = "merges.txt";
const SENTENCEPIECE: &[&str] = &[
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
];

/// Every file a tokenizer of any layout may be read from (what a checkpoint
/// carries along, and what keys the reference cache).
pub const FILES: &[&str] = &[
    TOKENIZER_JSON,
    CONFIG,
    SPECIAL_TOKENS_MAP,
    VOCAB_TXT,
    VOCAB_JSON,
    MERGES_TXT,
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "chat_template.jinja",
];

/// Tokenizer files larger than this are refused before they are read (the
/// largest real `tokenizer.json`s are tens of MB).
const MAX_FILE_BYTES: u64 = 512 << 20;

/// The named special tokens, in the order transformers registers them.
pub(super) const SPECIAL_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The tokenizer classes built from vocabulary files; they differ in defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    /// `BertTokenizer` (also DistilBERT's and ELECTRA's): WordPiece.
    Bert,
    /// `RobertaTokenizer`: byte-level BPE with `<s> … </s>` around a sequence.
    Roberta,
    /// `GPT2Tokenizer`: byte-level BPE, no special tokens around a sequence.
    Gpt2,
    /// `DebertaV2Tokenizer`: SentencePiece with BERT's `[CLS] … [SEP]`.
    Deberta,
}

impl Family {
    /// The class's default for a special token (transformers' `__init__` defaults).
    fn default_token(self, key: &str) -> Option<&'static str> {
        match (self, key) {
            (Family::Bert, "unk_token") => Some("[UNK]"),
            (Family::Bert, "sep_token") => Some("[SEP]"),
            (Family::Bert, "pad_token") => Some("[PAD]"),
            (Family::Bert, "cls_token") => Some("[CLS]"),
            (Family::Bert, "mask_token") => Some("[MASK]"),
            (Family::Roberta, "bos_token" | "cls_token") => Some("<s>"),
            (Family::Roberta, "eos_token" | "sep_token") => Some("</s>"),
            (Family::Roberta, "unk_token") => Some("<unk>"),
            (Family::Roberta, "pad_token") => Some("<pad>"),
            (Family::Roberta, "mask_token") => Some("<mask>"),
            (Family::Gpt2, "bos_token" | "eos_token" | "unk_token") => Some("<|endoftext|>"),
            (Family::Deberta, "bos_token" | "cls_token") => Some("[CLS]"),
            (Family::Deberta, "eos_token" | "sep_token") => Some("[SEP]"),
            (Family::Deberta, "unk_token") => Some("[UNK]"),
            (Family::Deberta, "pad_token") => Some("[PAD]"),
            (Family::Deberta, "mask_token") => Some("[MASK]"),
            _ => None,
        }
    }

    /// The class named by `tokenizer_config.json`'s `tokenizer_class`, or else by
    /// `config.json`'s `model_type` (transformers' tokenizer mapping).
    fn of(tokenizer_class: Option<&str>, model_type: Option<&str>) -> Option<Family> {
        if let Some(class) = tokenizer_class {
            let class = class.strip_suffix("Fast").unwrap_or(class);
            return match class {
                "BertTokenizer" | "DistilBertTokenizer" | "ElectraTokenizer" => Some(Family::Bert),
                "RobertaTokenizer" => Some(Family::Roberta),
                "GPT2Tokenizer" => Some(Family::Gpt2),
                "DebertaV2Tokenizer" => Some(Family::Deberta),
                _ => None,
            };
        }
        match model_type? {
            "bert" | "distilbert" | "electra" => Some(Family::Bert),
            "roberta" => Some(Family::Roberta),
            "gpt2" => Some(Family::Gpt2),
            "deberta-v2" => Some(Family::Deberta),
            _ => None,
        }
    }
}

/// `tokenizer_config.json` and `special_tokens_map.json` of a directory.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub config: Value,
    pub config_path: PathBuf,
    map: Value,
    family: Option<Family>,
}

/// `"<s>"` or `{"content": "<s>", ...}` as tokenizer configs spell special tokens.
fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// An `AddedToken` as `added_tokens_decoder` (or a special-token object) spells it.
fn added_token(value: &Value, special_default: bool) -> Option<AddedToken> {
    let content = token_text(value)?;
    let flag = |key: &str| value.get(key).and_then(Value::as_bool);
    let special = flag("special").unwrap_or(special_default);
    let mut token = AddedToken::from(content, special);
    if let Some(v) = flag("single_word") {
        token = token.single_word(v);
    }
    if let Some(v) = flag("lstrip") {
        token = token.lstrip(v);
    }
    if let Some(v) = flag("rstrip") {
        token = token.rstrip(v);
    }
    if let Some(v) = flag("normalized") {
        token = token.normalized(v);
    }
    Some(token)
}

impl Settings {
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG);
        let config = read_json_if_present(&config_path)?;
        let map = read_json_if_present(&dir.join(SPECIAL_TOKENS_MAP))?;
        let model_type = read_json_if_present(&dir.join("config.json"))
            .ok()
            .and_then(|c| {
                c.get("model_type")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
        let class = config.get("tokenizer_class").and_then(Value::as_str);
        Ok(Settings {
            family: Family::of(class, model_type.as_deref()),
            config,
            config_path,
            map,
        })
    }

    /// A special token: `tokenizer_config.json`, then `special_tokens_map.json`,
    /// then the class's default. An explicit `null` means none.
    pub fn special(&self, key: &str) -> Option<String> {
        for source in [&self.config, &self.map] {
            match source.get(key) {
                Some(Value::Null) => return None,
                Some(v) => return token_text(v),
                None => {}
            }
        }
        self.family
            .and_then(|f| f.default_token(key))
            .map(str::to_string)
    }

    fn special_object(&self, key: &str) -> Option<&Value> {
        [&self.config, &self.map]
            .into_iter()
            .find_map(|s| s.get(key).filter(|v| !v.is_null()))
    }

    pub fn flag(&self, key: &str) -> Option<bool> {
        self.config.get(key).and_then(Value::as_bool)
    }

    /// `model_max_length`, unless it is transformers' "no limit" sentinel.
    pub fn model_max_length(&self) -> Option<usize> {
        let v = self.config.get("model_max_length")?.as_f64()?;
        (1.0..1e15).contains(&v).then_some(v as usize)
    }

    /// Tokens that must be in the tokenizer's added vocabulary, in the order
    /// transformers adds them: `added_tokens_decoder` by id, then the named special
    /// tokens and `additional_special_tokens` / `extra_special_tokens`.
    fn tokens_to_add(&self) -> Vec<AddedToken> {
        let mut out = Vec::new();
        if let Some(Value::Object(decoder)) = self.config.get("added_tokens_decoder") {
            let mut by_id: Vec<(u64, &Value)> = decoder
                .iter()
                .filter_map(|(id, v)| Some((id.parse().ok()?, v)))
                .collect();
            by_id.sort_by_key(|(id, _)| *id);
            out.extend(by_id.into_iter().filter_map(|(_, v)| added_token(v, false)));
        }
        for key in SPECIAL_KEYS {
            let token = match self.special_object(key) {
                Some(v) => added_token(v, true),
                None => self.special(key).map(|t| AddedToken::from(t, true)),
            };
            out.extend(token);
        }
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            for source in [&self.config, &self.map] {
                if let Some(Value::Array(list)) = source.get(key) {
                    out.extend(list.iter().filter_map(|v| added_token(v, true)));
                    break;
                }
            }
        }
        out
    }
}

fn read_json_if_present(path: &Path) -> Result<Value> {
    if !path.exists() {
        return Ok(Value::Null);
    }
    let text = read_bounded(path)?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

fn read_bounded(path: &Path) -> Result<String> {
    check_size(path)?;
    crate::confined::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn check_size(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes: larger than any tokenizer file ({MAX_FILE_BYTES} bytes at most)",
                meta.len()
            ),
        });
    }
    Ok(())
}

/// Whether `dir` has a tokenizer this crate can load (a SentencePiece model
/// alone does not count: loading it is refused with a message).
pub fn present(dir: &Path) -> bool {
    dir.join(TOKENIZER_JSON).is_file()
        || dir.join(VOCAB_TXT).is_file()
        || (dir.join(VOCAB_JSON).is_file() && dir.join(MERGES_TXT).is_file())
}

/// The command that writes a `tokenizer.json` next to the other files.
fn convert_command(dir: &Path) -> String {
    let d = dir.display().to_string().replace('\'', "\\'");
    format!(
        "python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{d}').save_pretrained('{d}')\""
    )
}

/// A backend tokenizer, the file it was built from, and the class it was built as
/// (`None` for `tokenizer.json`, which carries its own pipeline).
pub(super) struct Backend {
    pub tokenizer: Tokenizer,
    pub source: PathBuf,
    pub family: Option<Family>,
}

fn logged_once(path: &Path) -> bool {
    static SEEN: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    match seen.lock() {
        Ok(mut s) => !s.insert(path.to_path_buf()),
        Err(_) => false,
    }
}

/// Builds the backend of `dir` from the first layout present (see the module
/// header), with `settings`' added and special tokens registered.
pub(super) fn backend(dir: &Path, settings: &mut Settings) -> Result<Backend> {
    let json = dir.join(TOKENIZER_JSON);
    let mut backend = if json.is_file() {
        from_tokenizer_json(&json)?
    } else if dir.join(VOCAB_TXT).is_file() {
        word_piece(dir, settings)?
    } else if dir.join(VOCAB_JSON).is_file() && dir.join(MERGES_TXT).is_file() {
        byte_level_bpe(dir, settings)?
    } else if let Some(model) = SENTENCEPIECE
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
    {
        return Err(Error::File {
            path: model,
            reason: format!(
                "a SentencePiece model without tokenizer.json: its conversion depends on the tokenizer \
                 class and is not reproduced here; write tokenizer.json once with transformers: {}",
                convert_command(dir)
            ),
        });
    } else {
        return Err(Error::File {
            path: dir.to_path_buf(),
            reason: format!(
                "no tokenizer: expected {TOKENIZER_JSON}, {VOCAB_TXT} (WordPiece) or {VOCAB_JSON} + \
                 {MERGES_TXT} (byte-level BPE)"
            ),
        });
    };
    register_tokens(&mut backend.tokenizer, settings);
    set_post_processor(&mut backend, settings)?;
    Ok(backend)
}

fn from_tokenizer_json(path: &Path) -> Result<Backend> {
    let text = read_bounded(path)?;
    let mut tokenizer: Tokenizer = text.parse().map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("cannot load tokenizer: {e}"),
    })?;
    let padding = tokenizer.get_padding().is_some();
    let truncation = tokenizer.get_truncation().cloned();
    if padding || truncation.is_some() {
        // As transformers: stored settings apply only when a call asks for them,
        // which ours never do (prompt and response lengths are ours to cut).
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("cannot switch truncation off: {e}"),
        })?;
        if !logged_once(path) {
            tracing::info!(
                file = %path.display(),
                padding,
                truncation_max_length = truncation.map(|t| t.max_length),
                "the tokenizer file stores padding/truncation settings; they are ignored, as \
                 transformers ignores them unless asked (data.max_length and \
                 data.max_prompt_length cut sequences)"
            );
        }
    }
    Ok(Backend {
        tokenizer,
        source: path.to_path_buf(),
        family: None,
    })
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| Error::File {
        path: path.to_path_buf(),
        reason: "the path is not UTF-8".into(),
    })
}

/// `BertTokenizer` from `vocab.txt`, as transformers constructs it.
fn word_piece(dir: &Path, settings: &mut Settings) -> Result<Backend> {
    let vocab = dir.join(VOCAB_TXT);
    check_size(&vocab)?;
    // A vocab.txt that names no class is BERT's (its defaults apply).
    let family = *settings.family.get_or_insert(Family::Bert);
    if family != Family::Bert {
        return Err(unsupported_class(dir, &vocab, settings));
    }
    let unk = settings
        .special("unk_token")
        .unwrap_or_else(|| "[UNK]".into());
    let model = WordPiece::from_file(path_str(&vocab)?)
        .unk_token(unk)
        .build()
        .map_err(|e| Error::File {
            path: vocab.clone(),
            reason: format!("cannot read the WordPiece vocabulary: {e}"),
        })?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(BertNormalizer::new(
        true,
        settings.flag("tokenize_chinese_chars").unwrap_or(true),
        settings.flag("strip_accents"),
        settings.flag("do_lower_case").unwrap_or(true),
    )));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    Ok(Backend {
        tokenizer,
        source: vocab,
        family: Some(Family::Bert),
    })
}

/// `RobertaTokenizer` / `GPT2Tokenizer` from `vocab.json` + `merges.txt`.
fn byte_level_bpe(dir: &Path, settings: &Settings) -> Result<Backend> {
    let vocab = dir.join(VOCAB_JSON);
    let merges = dir.join(MERGES_TXT);
    check_size(&vocab)?;
    check_size(&merges)?;
    let family = match settings.family {
        Some(f @ (Family::Roberta | Family::Gpt2)) => f,
        _ => return Err(unsupported_class(dir, &vocab, settings)),
    };
    let model = BPE::from_file(path_str(&vocab)?, path_str(&merges)?)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| Error::File {
            path: merges.clone(),
            reason: format!("cannot read the BPE vocabulary and merges: {e}"),
        })?;
    let add_prefix_space = settings.flag("add_prefix_space").unwrap_or(false);
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(Backend {
        tokenizer,
        source: vocab,
        family: Some(family),
    })
}

fn unsupported_class(dir: &Path, file: &Path, settings: &Settings) -> Error {
    let class = settings
        .config
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or("(no tokenizer_class, and config.json's model_type names none)");
    Error::File {
        path: file.to_path_buf(),
        reason: format!(
            "tokenizer class {class} without tokenizer.json: built here from vocabulary files are \
             BertTokenizer (vocab.txt), RobertaTokenizer and GPT2Tokenizer (vocab.json + merges.txt); \
             write tokenizer.json once with transformers: {}",
            convert_command(dir)
        ),
    }
}

/// Registers `added_tokens_decoder` and the named special tokens that the
/// tokenizer does not hold as added tokens yet (transformers does the same on load).
fn register_tokens(tokenizer: &mut Tokenizer, settings: &Settings) {
    let mut present: HashSet<String> = tokenizer
        .get_added_vocabulary()
        .get_vocab()
        .keys()
        .cloned()
        .collect();
    let mut missing = Vec::new();
    for token in settings.tokens_to_add() {
        if present.insert(token.content.clone()) {
            missing.push(token);
        }
    }
    if !missing.is_empty() {
        tokenizer.add_tokens(&missing);
    }
}

/// The special token `key` names and its id; a named token the tokenizer
/// (built from `source`) lacks is an error naming both files.
pub(super) fn token_id(
    tokenizer: &Tokenizer,
    settings: &Settings,
    key: &str,
    source: &Path,
) -> Result<Option<(String, u32)>> {
    let Some(token) = settings.special(key) else {
        return Ok(None);
    };
    match tokenizer.token_to_id(&token) {
        Some(id) => Ok(Some((token, id))),
        None => Err(Error::File {
            path: settings.config_path.clone(),
            reason: format!(
                "{key} {token:?} is not in the vocabulary of {}",
                source.display()
            ),
        }),
    }
}

/// What surrounds a sequence encoded with special tokens: `tokenizer.json`'s own
/// post-processor; the class's for BERT and RoBERTa; for GPT-2, BOS and EOS as
/// `add_bos_token` / `add_eos_token` say (neither by default).
fn set_post_processor(backend: &mut Backend, settings: &Settings) -> Result<()> {
    let bad = |e: String| Error::File {
        path: backend.source.clone(),
        reason: format!("cannot build the post-processor: {e}"),
    };
    let tokenizer = &backend.tokenizer;
    let source = backend.source.as_path();
    match backend.family {
        Some(Family::Bert) => {
            let cls = token_id(tokenizer, settings, "cls_token", source)?;
            let sep = token_id(tokenizer, settings, "sep_token", source)?;
            let (Some((cls, cls_id)), Some((sep, sep_id))) = (cls, sep) else {
                return Err(bad("BertTokenizer needs cls_token and sep_token".into()));
            };
            let template = TemplateProcessing::builder()
                .try_single(format!("{cls}:0 $A:0 {sep}:0"))
                .and_then(|b| b.try_pair(format!("{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1")))
                .map_err(|e| bad(e.to_string()))?
                .special_tokens(vec![(cls, cls_id), (sep, sep_id)])
                .build()
                .map_err(|e| bad(e.to_string()))?;
            backend.tokenizer.with_post_processor(Some(template));
        }
        Some(Family::Roberta) => {
            let cls = token_id(tokenizer, settings, "cls_token", source)?;
            let sep = token_id(tokenizer, settings, "sep_token", source)?;
            let (Some(cls), Some(sep)) = (cls, sep) else {
                return Err(bad("RobertaTokenizer needs cls_token and sep_token".into()));
            };
            let processor = RobertaProcessing::new(sep, cls)
                .trim_offsets(settings.flag("trim_offsets").unwrap_or(true))
                .add_prefix_space(settings.flag("add_prefix_space").unwrap_or(false));
            backend.tokenizer.with_post_processor(Some(processor));
        }
        // A tokenizer.json's own post-processor decides: transformers drops
        // add_bos_token / add_eos_token when it loads one. (DeBERTa's is only
        // ever read from one.)
        None | Some(Family::Deberta) => {}
        Some(Family::Gpt2) => {
            // A flag without its token is dropped, as transformers drops it.
            let wanted = |flag: &str, key: &str| -> Result<Option<(String, u32)>> {
                if settings.flag(flag).unwrap_or(false) {
                    token_id(tokenizer, settings, key, source)
                } else {
                    Ok(None)
                }
            };
            let bos = wanted("add_bos_token", "bos_token")?;
            let eos = wanted("add_eos_token", "eos_token")?;
            let mut single = String::new();
            let mut pair = String::new();
            if let Some((b, _)) = &bos {
                single.push_str(&format!("{b}:0 "));
            }
            single.push_str("$A:0");
            if let Some((e, _)) = &eos {
                single.push_str(&format!(" {e}:0"));
            }
            pair.push_str(&single);
            if let Some((b, _)) = &bos {
                pair.push_str(&format!(" {b}:1"));
            }
            pair.push_str(" $B:1");
            if let Some((e, _)) = &eos {
                pair.push_str(&format!(" {e}:1"));
            }
            let template = TemplateProcessing::builder()
                .try_single(single)
                .and_then(|b| b.try_pair(pair))
                .map_err(|e| bad(e.to_string()))?
                .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
                .build()
                .map_err(|e| bad(e.to_string()))?;
            backend.tokenizer.with_post_processor(Some(template));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TextTokenizer;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    const VOCAB: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n##s\ncafe\nHello\n";

    #[test]
    fn a_bert_vocab_txt_lowercases_strips_accents_and_adds_cls_sep() {
        let dir = dir_with(&[("vocab.txt", VOCAB)]);
        let tok = TextTokenizer::from_dir(dir.path()).expect("loads");
        // do_lower_case defaults to true and strips accents with it.
        assert_eq!(tok.encode("Hello worlds Café").expect("ids"), [5, 6, 7, 8]);
        assert_eq!(
            tok.encode_plain_with_special_tokens("hello").expect("ids"),
            [2, 5, 3]
        );
        assert_eq!(tok.pad_id(), Some(0));
        let cased = dir_with(&[
            ("vocab.txt", VOCAB),
            ("tokenizer_config.json", r#"{"do_lower_case": false}"#),
        ]);
        let tok = TextTokenizer::from_dir(cased.path()).expect("loads");
        assert_eq!(tok.encode("Hello zzz").expect("ids"), [9, 1]);
    }

    #[test]
    fn special_tokens_fall_back_to_special_tokens_map() {
        let dir = dir_with(&[
            ("vocab.txt", VOCAB),
            (
                "tokenizer_config.json",
                r#"{"tokenizer_class": "BertTokenizer"}"#,
            ),
            (
                "special_tokens_map.json",
                r#"{"pad_token": {"content": "[MASK]"}}"#,
            ),
        ]);
        let tok = TextTokenizer::from_dir(dir.path()).expect("loads");
        assert_eq!(tok.pad_id(), Some(4));
    }

    #[test]
    fn a_sentencepiece_model_alone_is_refused_with_the_command() {
        let dir = dir_with(&[("tokenizer.model", "not read")]);
        assert!(!present(dir.path()));
        let err = TextTokenizer::from_dir(dir.path())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("tokenizer.model"), "{err}");
        assert!(err.contains("AutoTokenizer.from_pretrained("), "{err}");
        let none = dir_with(&[]);
        let err = TextTokenizer::from_dir(none.path())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("no tokenizer"), "{err}");
    }

    #[test]
    fn an_unknown_class_with_vocabulary_files_is_refused_by_name() {
        let dir = dir_with(&[
            ("vocab.json", r#"{"a": 0}"#),
            ("merges.txt", "#version: 0.2\n"),
            (
                "tokenizer_config.json",
                r#"{"tokenizer_class": "Qwen2Tokenizer"}"#,
            ),
        ]);
        let err = TextTokenizer::from_dir(dir.path())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("Qwen2Tokenizer"), "{err}");
    }

    #[test]
    fn model_max_length_ignores_transformers_no_limit_sentinel() {
        let dir = dir_with(&[
            ("vocab.txt", VOCAB),
            (
                "tokenizer_config.json",
                r#"{"model_max_length": 1000000000000000019884624838656}"#,
            ),
        ]);
        let tok = TextTokenizer::from_dir(dir.path()).expect("loads");
        assert_eq!(tok.model_max_length(), None);
        let dir = dir_with(&[
            ("vocab.txt", VOCAB),
            ("tokenizer_config.json", r#"{"model_max_length": 512}"#),
        ]);
        let tok = TextTokenizer::from_dir(dir.path()).expect("loads");
        assert_eq!(tok.model_max_length(), Some(512));
    }
}
