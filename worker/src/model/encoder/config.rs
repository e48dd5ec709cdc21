//! An encoder's `config.json`: the family (BERT, RoBERTa), the head, the
//! activation and the sizes, every error naming the file and the key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use crate::error::{Error, Result, io_err};
use crate::model::config::ModelType;
use crate::model::layers::TchResult;

/// The encoder families this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
}

impl Family {
    /// `config.json`'s `model_type`, and the state-dict prefix of the base model.
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
        }
    }

    pub(super) fn class_prefix(self) -> &'static str {
        match self {
            Family::Bert => "Bert",
            Family::Roberta => "Roberta",
        }
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A label per token (`…ForTokenClassification`): logits `[B, T, L]`.
    Token,
    /// A label per sequence (`…ForSequenceClassification`): logits `[B, L]`.
    Sequence,
}

impl Head {
    pub(super) fn class_suffix(self) -> &'static str {
        match self {
            Head::Token => "ForTokenClassification",
            Head::Sequence => "ForSequenceClassification",
        }
    }
}

/// The encoders' hidden activations (transformers' `ACT2FN` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub(super) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    pub(super) fn apply(self, x: &Tensor) -> TchResult<Tensor> {
        match self {
            Activation::Gelu => x.f_gelu("none"),
            Activation::GeluTanh => x.f_gelu("tanh"),
            Activation::Relu => x.f_relu(),
            Activation::Silu => x.f_silu(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawEncoderConfig {
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    intermediate_size: Option<i64>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<i64>,
    type_vocab_size: Option<i64>,
    layer_norm_eps: Option<f64>,
    pad_token_id: Option<i64>,
    initializer_range: Option<f64>,
    hidden_dropout_prob: Option<f64>,
    attention_probs_dropout_prob: Option<f64>,
    classifier_dropout: Option<f64>,
    position_embedding_type: Option<String>,
    id2label: Option<BTreeMap<String, String>>,
}

/// A validated encoder `config.json`.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// The architecture (XLM-RoBERTa is RoBERTa's).
    pub family: Family,
    /// `config.json`'s `model_type` (what the saved model is called).
    pub model_type: ModelType,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: Activation,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    pub pad_token_id: i64,
    pub initializer_range: f64,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    /// The head's dropout (`classifier_dropout`, else `hidden_dropout_prob`).
    pub classifier_dropout: f64,
    /// `id2label` in id order, as the checkpoint declares it (transformers
    /// writes `LABEL_0, LABEL_1` for a model that was never given labels).
    pub labels: Vec<String>,
    /// The file as read, written back with the new labels and architecture.
    pub raw: Value,
}

impl EncoderConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = dpo_data::confined::read_to_string(&path).map_err(io_err(&path))?;
        Self::from_json(&text, &path)
    }

    /// Parses a `config.json` body; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let (raw, c): (Value, RawEncoderConfig) = crate::model::config::parse_config(text, path)?;
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let model_type = ModelType::of_json(&raw, path)?;
        let family = match model_type {
            ModelType::Bert => Family::Bert,
            ModelType::Roberta | ModelType::XlmRoberta => Family::Roberta,
            other => {
                return Err(Error::UnsupportedModel {
                    path: path.to_path_buf(),
                    model_type: other.name().into(),
                });
            }
        };
        let need = |v: Option<i64>, key: &str| -> Result<i64> {
            match v {
                Some(v) if v > 0 => Ok(v),
                Some(v) => Err(bad(format!("{key} must be positive, found {v}"))),
                None => Err(bad(format!("missing key {key}"))),
            }
        };
        let hidden_size = need(c.hidden_size, "hidden_size")?;
        let num_attention_heads = need(c.num_attention_heads, "num_attention_heads")?;
        if hidden_size % num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"
            )));
        }
        let act_name = c.hidden_act.as_deref().unwrap_or("gelu");
        let hidden_act = Activation::parse(act_name).ok_or_else(|| {
            bad(format!(
                "hidden_act {act_name:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"
            ))
        })?;
        if let Some(kind) = c.position_embedding_type.as_deref()
            && kind != "absolute"
        {
            return Err(bad(format!(
                "position_embedding_type {kind:?} is not supported (only absolute)"
            )));
        }
        let probability = |v: Option<f64>, key: &str, default: f64| -> Result<f64> {
            let v = v.unwrap_or(default);
            if (0.0..1.0).contains(&v) {
                Ok(v)
            } else {
                Err(bad(format!("{key} must be in [0, 1), found {v}")))
            }
        };
        let hidden_dropout = probability(c.hidden_dropout_prob, "hidden_dropout_prob", 0.1)?;
        let attention_dropout = probability(
            c.attention_probs_dropout_prob,
            "attention_probs_dropout_prob",
            0.1,
        )?;
        let classifier_dropout =
            probability(c.classifier_dropout, "classifier_dropout", hidden_dropout)?;
        let layer_norm_eps = c.layer_norm_eps.unwrap_or(1e-12);
        if !(layer_norm_eps.is_finite() && layer_norm_eps > 0.0) {
            return Err(bad(format!(
                "layer_norm_eps must be positive, found {layer_norm_eps}"
            )));
        }
        let labels = match &c.id2label {
            None => Vec::new(),
            Some(map) => {
                let mut by_id: Vec<(usize, String)> = Vec::with_capacity(map.len());
                for (k, v) in map {
                    let id: usize = k
                        .parse()
                        .map_err(|_| bad(format!("id2label key {k:?} is not an integer")))?;
                    by_id.push((id, v.clone()));
                }
                by_id.sort();
                for (i, (id, _)) in by_id.iter().enumerate() {
                    if *id != i {
                        return Err(bad(format!(
                            "id2label must number its labels 0..{}, found id {id}",
                            by_id.len()
                        )));
                    }
                }
                by_id.into_iter().map(|(_, v)| v).collect()
            }
        };
        let pad_token_id = c.pad_token_id.unwrap_or(match family {
            Family::Bert => 0,
            Family::Roberta => 1,
        });
        let vocab_size = need(c.vocab_size, "vocab_size")?;
        if pad_token_id < 0 || pad_token_id >= vocab_size {
            return Err(bad(format!(
                "pad_token_id {pad_token_id} is outside the vocabulary (vocab_size {vocab_size})"
            )));
        }
        Ok(EncoderConfig {
            family,
            model_type,
            vocab_size,
            hidden_size,
            num_hidden_layers: need(c.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            intermediate_size: need(c.intermediate_size, "intermediate_size")?,
            hidden_act,
            max_position_embeddings: need(c.max_position_embeddings, "max_position_embeddings")?,
            type_vocab_size: need(c.type_vocab_size.or(Some(2)), "type_vocab_size")?,
            layer_norm_eps,
            pad_token_id,
            initializer_range: c.initializer_range.unwrap_or(0.02),
            hidden_dropout,
            attention_dropout,
            classifier_dropout,
            labels,
            raw,
        })
    }

    /// The longest sequence the position table holds (RoBERTa's first
    /// `padding_idx + 1` rows are never used as positions).
    pub fn max_sequence_length(&self) -> i64 {
        match self.family {
            Family::Bert => self.max_position_embeddings,
            Family::Roberta => self.max_position_embeddings - self.pad_token_id - 1,
        }
    }
}
