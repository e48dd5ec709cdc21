//! The model's tokenizer (`tokenizer.json`, or the vocabulary files of older
//! exports: see [`layout`]) with the special-token rules of
//! `tokenizer_config.json`, applied the way TRL builds preference sequences:
//! prompt and response are tokenized separately without special tokens, the prompt
//! gets BOS once when the tokenizer asks for it, every response gets EOS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};

pub mod layout;

/// A tokenizer plus the special tokens sequences are built with.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    pad_id: Option<u32>,
    model_max_length: Option<usize>,
    chat: Option<Arc<ChatTemplate>>,
}

/// Token ids with special tokens, as an encoder reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// The word of each token (pre-split input), `None` for special tokens.
    pub word_ids: Vec<Option<u32>>,
    /// Tokens were cut to fit `max_length`.
    pub truncated: bool,
}

impl TextTokenizer {
    /// Loads the tokenizer of model directory `dir` from whichever layout it has
    /// (see [`layout`]), with the special-token rules of `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut settings = layout::Settings::read(dir)?;
        let layout::Backend {
            tokenizer: inner,
            source: path,
            ..
        } = layout::backend(dir, &mut settings)?;
        let id_of = |key: &str| -> Result<Option<u32>> {
            Ok(layout::token_id(&inner, &settings, key, &path)?.map(|(_, id)| id))
        };
        let bos_id = id_of("bos_token")?;
        let eos_id = id_of("eos_token")?;
        let pad_id = id_of("pad_token")?;
        let chat = ChatTemplate::from_dir(
            dir,
            &settings.config,
            settings.special("bos_token").as_deref(),
            settings.special("eos_token").as_deref(),
        )?
        .map(Arc::new);
        // BOS is wanted when the tokenizer itself puts it in front of a sequence
        // (its post-processor, which the config's add_bos_token built for the
        // vocabulary layouts): transformers' `tokenizer(prompt)`, as TRL uses it.
        let add_bos = match bos_id {
            Some(bos) => inner
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&bos))
                .unwrap_or(false),
            None => false,
        };
        tracing::debug!(path = %path.display(), ?bos_id, ?eos_id, add_bos, "loaded tokenizer");
        Ok(TextTokenizer {
            inner,
            path,
            bos_id,
            eos_id,
            add_bos,
            pad_id,
            model_max_length: settings.model_max_length(),
            chat,
        })
    }

    /// Whether `dir` holds a tokenizer of a layout this crate reads.
    pub fn present(dir: &Path) -> bool {
        layout::present(dir)
    }

    /// `model_max_length` of `tokenizer_config.json` (absent when it is the
    /// "no limit" sentinel transformers writes).
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Warns when sequences of `max_length` tokens (the spec's `data.max_length`)
    /// may exceed the `model_max_length` the tokenizer declares, as transformers
    /// warns about a longer input; training goes on (the model's own position
    /// limit is checked where it matters).
    pub fn warn_if_longer_than_model(&self, max_length: usize) {
        if let Some(limit) = self.model_max_length.filter(|&m| max_length > m) {
            tracing::warn!(
                tokenizer = %self.path.display(),
                data.max_length = max_length,
                model_max_length = limit,
                "data.max_length is larger than the tokenizer's model_max_length: sequences \
                 longer than the model was trained on may be indexed wrongly"
            );
        }
    }

    /// Token ids of `text` with the tokenizer's special tokens around it (as
    /// transformers' `tokenizer(text)["input_ids"]`), no truncation.
    pub fn encode_plain_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.failed(e))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether prompts get a BOS token in front.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::File {
                path: self.path.clone(),
                reason: format!("tokenization failed: {e}"),
            })
    }

    /// A prompt: BOS once (if the tokenizer asks for it and the text does not
    /// already start with it), then the text.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        match self.bos_id {
            Some(bos) if self.add_bos && ids.first() != Some(&bos) => {
                let mut with_bos = Vec::with_capacity(ids.len() + 1);
                with_bos.push(bos);
                with_bos.extend(ids);
                Ok(with_bos)
            }
            _ => Ok(ids),
        }
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_deref()
    }

    /// A response rendered by the chat template: EOS is appended unless the
    /// template already ended it with EOS (no double EOS).
    pub fn encode_chat_response(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        match (self.eos_id, ids.last()) {
            (Some(eos), Some(&last)) if last == eos => Ok(ids),
            _ => self.encode_response(text),
        }
    }

    /// `text` as an encoder reads it: the tokenizer's special tokens around it
    /// (`[CLS] … [SEP]`), cut to `max_length` tokens in all (the text is cut,
    /// the special tokens stay).
    pub fn encode_with_special_tokens(&self, text: &str, max_length: usize) -> Result<Encoded> {
        let enc = self.inner.encode(text, false).map_err(|e| self.failed(e))?;
        self.finish(enc, max_length)
    }

    /// Pre-split `words` (NER) with the special tokens, cut to `max_length`
    /// tokens in all, and the word each token came from (`None` for special
    /// tokens), as transformers' `is_split_into_words` gives them.
    pub fn encode_words(&self, words: &[String], max_length: usize) -> Result<Encoded> {
        let input =
            tokenizers::InputSequence::from(words.iter().map(String::as_str).collect::<Vec<_>>());
        let enc = self
            .inner
            .encode(tokenizers::EncodeInput::Single(input), false)
            .map_err(|e| self.failed(e))?;
        self.finish(enc, max_length)
    }

    fn finish(&self, mut enc: tokenizers::Encoding, max_length: usize) -> Result<Encoded> {
        use tokenizers::PostProcessor;
        let specials = self
            .inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_length <= specials {
            return Err(Error::File {
                path: self.path.clone(),
                reason: format!(
                    "max_length {max_length} leaves no room next to the {specials} special tokens"
                ),
            });
        }
        let room = max_length - specials;
        let truncated = enc.len() > room;
        enc.truncate(room, 0, tokenizers::TruncationDirection::Right);
        let enc = self
            .inner
            .post_process(enc, None, true)
            .map_err(|e| self.failed(e))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            word_ids: enc.get_word_ids().to_vec(),
            truncated,
        })
    }

    fn failed(&self, e: impl std::fmt::Display) -> Error {
        Error::File {
            path: self.path.clone(),
            reason: format!("tokenization failed: {e}"),
        }
    }

    /// The padding token's id (`pad_token` of `tokenizer_config.json`).
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// A response: the text, then EOS.
    pub fn encode_response(&self, text: &str) -> Result<Vec<u32>> {
        let eos = self.eos_id.ok_or_else(|| Error::File {
            path: self.path.clone(),
            reason: "the tokenizer has no eos_token, so a text response cannot be terminated \
                     (set eos_token in tokenizer_config.json)"
                .into(),
        })?;
        let mut ids = self.encode(text)?;
        ids.push(eos);
        Ok(ids)
    }
}
