//! Assembles the train and eval examples of a run from its spec: detects or forces
//! the file format, tokenizes, joins labelled examples with their negatives (a file,
//! or generated), shapes examples for the objective, truncates, and checks every
//! token id against the model's vocabulary. Whatever is dropped is counted.

use std::path::Path;

use dpo_proto::{DataFormat, Loss, Negatives, RunSpec, Truncation};
use serde::{Deserialize, Serialize};

use crate::examples::{self, Example, Truncation as Cut};
use crate::records::{Layout, Row};
use crate::{Error, PairFormat, Result, TextTokenizer};

/// What happened to one data file on its way to examples.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DataReport {
    pub file: String,
    pub format: String,
    /// Examples ready for training.
    pub examples: usize,
    /// Malformed lines skipped (only with `data.skip_bad_lines`).
    pub skipped_lines: usize,
    /// Examples the objective cannot use (e.g. no negative for a pairwise loss).
    pub unusable: usize,
    /// Examples left with no response token after truncation.
    pub truncated_away: usize,
}

fn peek_format(path: &Path, layout: &Layout) -> Result<DataFormat> {
    let keys = ["prompt", "chosen", "completion", "prompt_ids", "chosen_ids"];
    let first = crate::records::open(path, layout, &keys)?.next();
    if let Some(Ok(Row { value: Ok(obj), .. })) = first {
        if obj.contains_key("completion") {
            return Ok(DataFormat::Labelled);
        }
        if obj.contains_key("prompt_ids") || obj.contains_key("chosen_ids") {
            return Ok(DataFormat::Tokens);
        }
        if matches!(obj.get("prompt"), Some(serde_json::Value::Array(_)))
            || matches!(obj.get("chosen"), Some(serde_json::Value::Array(_)))
        {
            return Ok(DataFormat::Conversational);
        }
    }
    // Unreadable or empty: let the pair reader report it with its position.
    Ok(DataFormat::Text)
}

fn format_name(f: DataFormat) -> &'static str {
    match f {
        DataFormat::Auto => "auto",
        DataFormat::Text => "text",
        DataFormat::Conversational => "conversational",
        DataFormat::Tokens => "tokens",
        DataFormat::Labelled => "labelled",
    }
}

/// Produces a negative response for a labelled example (`None`: could not).
pub type NegativeSampler<'a> =
    dyn FnMut(&Example) -> std::result::Result<Option<Vec<u32>>, SamplerError> + 'a;

/// Why a negative could not be sampled (the model failed).
pub type SamplerError = Box<dyn std::error::Error + Send + Sync>;

/// Loads one dataset (`train` or `eval`: a file, a glob or a folder of
/// shards, any format [`crate::records`] reads) of the run as examples.
/// `layout` is the run's ([`Layout::of`], one for all its datasets, so
/// `data.limits` bound the run). `sampler` provides the negatives when
/// `data.negatives = "policy"`. A problem names the file and its line or
/// row, also inside a dataset of several files.
pub fn load(
    spec: &RunSpec,
    layout: &Layout,
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    vocab_size: Option<i64>,
    is_train: bool,
    sampler: Option<&mut NegativeSampler<'_>>,
) -> Result<(Vec<Example>, DataReport)> {
    load_from(spec, layout, path, tokenizer, vocab_size, is_train, sampler).map_err(|e| {
        let e = crate::records::relocate(e, path, layout);
        match spec.data.negatives.as_ref().and_then(|n| n.file()) {
            Some(negatives) => crate::records::relocate(e, negatives, layout),
            None => e,
        }
    })
}

fn load_from(
    spec: &RunSpec,
    layout: &Layout,
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    vocab_size: Option<i64>,
    is_train: bool,
    sampler: Option<&mut NegativeSampler<'_>>,
) -> Result<(Vec<Example>, DataReport)> {
    let format = match spec.data.format {
        DataFormat::Auto => peek_format(path, layout)?,
        f => f,
    };
    let mut report = DataReport {
        file: path.display().to_string(),
        format: format_name(format).into(),
        ..Default::default()
    };
    let skip = spec.data.skip_bad_lines;
    let need_tokenizer = || {
        tokenizer.ok_or_else(|| Error::Invalid {
            context: path.display().to_string(),
            reason: "text data needs the model's tokenizer: tokenizer.json, vocab.txt, or \
                     vocab.json + merges.txt (a SentencePiece tokenizer.model alone must be \
                     converted once: python -c \"from transformers import AutoTokenizer; \
                     AutoTokenizer.from_pretrained('DIR').save_pretrained('DIR')\")"
                .into(),
        })
    };
    let mut examples: Vec<Example> = match format {
        DataFormat::Text | DataFormat::Tokens | DataFormat::Conversational | DataFormat::Auto => {
            let forced = match format {
                DataFormat::Text => PairFormat::Text,
                DataFormat::Tokens => PairFormat::Tokens,
                DataFormat::Conversational => PairFormat::Chat,
                _ => PairFormat::Auto,
            };
            // Each pair is tokenized as it is read: the dataset's text is
            // never held, only its token ids.
            let mut examples = Vec::new();
            let skipped = crate::pairs::for_each_pair(path, layout, forced, skip, &mut |r| {
                let tok = match r.value {
                    crate::Pair::Tokens { .. } => None,
                    _ => Some(need_tokenizer()?),
                };
                examples.push(Example::from(crate::pairs::tokenize_pair(path, r, tok)?));
                Ok(())
            })?;
            log_skipped(&skipped);
            report.skipped_lines = skipped.len();
            examples
        }
        DataFormat::Labelled => {
            let tok = need_tokenizer()?;
            if let Some(Negatives::Adversarial | Negatives::Confusion) = &spec.data.negatives {
                // Refused by the spec's validation for a causal LM.
                return Err(Error::Invalid {
                    context: "data.negatives".into(),
                    reason: "\"adversarial\" and \"confusion\" negatives are for the classification tasks".into(),
                });
            }
            // Each record is tokenized and joined as it is read: the text is
            // never held, only token ids ("policy" negatives are sampled
            // below, once the labelled examples are token ids).
            let random = spec.data.negatives == Some(Negatives::Random);
            let mut join = examples::LabelledJoin::new(tok, random);
            let skipped =
                examples::for_each_labelled(path, layout, skip, &mut |r| join.labelled(path, r))?;
            log_skipped(&skipped);
            report.skipped_lines = skipped.len();
            if let Some(Negatives::File(file)) = &spec.data.negatives {
                let skipped = examples::for_each_labelled(file, layout, skip, &mut |r| {
                    join.negative(file, r)
                })?;
                log_skipped(&skipped);
                report.skipped_lines += skipped.len();
            }
            let mut joined = join.finish(path, spec.data.seed)?;
            if spec.data.negatives == Some(Negatives::Policy) {
                let sampler = sampler.ok_or_else(|| Error::Invalid {
                    context: "data.negatives".into(),
                    reason: "\"policy\" needs a model to sample from".into(),
                })?;
                let t = std::time::Instant::now();
                let mut made = 0usize;
                for e in joined.iter_mut().filter(|e| e.chosen.is_some()) {
                    let sampled = sampler(e).map_err(|err| Error::Invalid {
                        context: format!("{}:{}", path.display(), e.line),
                        reason: format!("sampling a policy negative: {err}"),
                    })?;
                    if let Some(negative) = sampled {
                        e.rejected.push(negative);
                        made += 1;
                    }
                }
                tracing::info!(
                    file = %path.display(),
                    negatives = made,
                    seconds = t.elapsed().as_secs_f64(),
                    "sampled policy negatives from the reference model"
                );
            }
            if !is_train {
                // Negatives of the train split that matched no eval example stay out of eval.
                joined.retain(|e| e.chosen.is_some());
            }
            joined
        }
    };

    // Shape for the objective.
    let before = examples.len();
    match spec.objective.loss {
        l if l.is_pairwise() => {
            let (pairs, unusable) = examples::into_pairs(examples);
            examples = pairs;
            report.unusable = unusable;
        }
        Loss::Sft => {
            examples.retain(|e| e.chosen.is_some());
            report.unusable = before - examples.len();
        }
        _ => {}
    }

    let cut = Cut {
        max_length: spec.data.max_length,
        max_prompt_length: spec.data.max_prompt_length,
        keep_end: spec.data.truncation == Truncation::KeepEnd,
    };
    let before = examples.len();
    examples.retain_mut(|e| cut.apply(e));
    if spec.objective.loss.is_pairwise() {
        // A pair whose rejected response was truncated away is no longer a pair.
        examples.retain(Example::is_pair);
    }
    report.truncated_away = before - examples.len();

    if let Some(vocab_size) = vocab_size {
        for e in &examples {
            check_vocabulary(path, e.line, e.ids(), vocab_size)?;
        }
    }
    if spec.objective.loss == Loss::Combined
        && is_train
        && examples.iter().all(|e| e.rejected.is_empty())
    {
        return Err(Error::Invalid {
            context: "data.negatives".into(),
            reason: format!(
                "the combined loss needs negative examples and {} has none: give preference pairs, \
                 a negatives file, \"random\", or labelled lines with \"label\": false",
                path.display()
            ),
        });
    }
    report.examples = examples.len();
    if examples.is_empty() {
        return Err(Error::Invalid {
            context: path.display().to_string(),
            reason: format!(
                "no usable examples for the {:?} loss ({} unusable, {} truncated away)",
                spec.objective.loss, report.unusable, report.truncated_away
            )
            .to_lowercase(),
        });
    }
    if report.unusable > 0 || report.truncated_away > 0 || report.skipped_lines > 0 {
        tracing::warn!(
            file = %path.display(),
            unusable = report.unusable,
            truncated_away = report.truncated_away,
            skipped_lines = report.skipped_lines,
            "examples dropped"
        );
    }
    Ok((examples, report))
}

/// Refuses, by `file:line`, a token id the model has no embedding for (libtorch
/// would otherwise fail deep inside the forward pass).
pub fn check_vocabulary(
    path: &Path,
    line: usize,
    ids: impl IntoIterator<Item = u32>,
    vocab_size: i64,
) -> Result<()> {
    match ids.into_iter().find(|&t| i64::from(t) >= vocab_size) {
        Some(id) => Err(Error::Line {
            path: path.to_path_buf(),
            line,
            reason: format!(
                "token id {id} is out of range for a model with vocab_size {vocab_size}"
            ),
        }),
        None => Ok(()),
    }
}

fn log_skipped(skipped: &[Error]) {
    for e in skipped.iter().take(5) {
        tracing::warn!("skipped: {e}");
    }
    if skipped.len() > 5 {
        tracing::warn!("skipped {} more bad lines", skipped.len() - 5);
    }
}
