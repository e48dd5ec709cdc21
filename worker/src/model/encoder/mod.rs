//! Encoder models for token and sequence classification: BERT, RoBERTa,
//! XLM-RoBERTa, DeBERTa-v2/v3 and ModernBERT on libtorch, read from and written
//! to Hugging Face checkpoints.
//!
//! BERT and RoBERTa differ in the embeddings only: BERT numbers positions `0..T`,
//! RoBERTa from `padding_idx + 1` over the non-padding tokens, and RoBERTa's
//! sequence head is a two-layer `classifier.dense`/`classifier.out_proj` on the
//! first token where BERT's is the pooler (`tanh(dense(h₀))`) then `classifier`.
//! DeBERTa adds disentangled attention over relative positions (`relative.rs`:
//! content-to-position and position-to-content scores from one table shared by
//! every layer), makes absolute positions and token types optional, and pools with
//! its own `pooler.dense` and activation. These are post-LayerNorm transformers
//! with biases everywhere; ModernBERT (`modern.rs`) is pre-norm, rotary, GeGLU,
//! local attention alternating with global, biases optional, with a final norm
//! and a `head.` both classifiers share. Parameter paths equal transformers'
//! state-dict names of `BertForTokenClassification`,
//! `BertForSequenceClassification` and the RoBERTa, XLM-RoBERTa, DeBERTa-v2 and
//! ModernBERT pairs, so a checkpoint those write loads here and what this writes
//! loads there (`transformers.pipeline("token-classification")` included).
//!
//! A checkpoint without a head (a plain `BertModel`, or a masked-LM one) gets a
//! new head initialised as transformers does: weights `N(0, initializer_range)`,
//! biases zero.

mod config;
mod lora;
mod modern;
mod relative;
mod stacked;

pub use config::{Activation, EncoderConfig, Family, Head, Relative};
pub use stacked::Deferred;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::checkpoint::{TensorIndex, copy_side_files, dtype_name, write_json, write_weight_files};
use super::config::ModelType;
use super::layers::{LayerNorm, Linear, TchResult, grad_enabled, param};
use super::stack;
use crate::error::{Error, Result, TorchContext};

#[derive(Debug)]
struct Embeddings {
    word: Tensor,
    /// Absolute positions (DeBERTa-v3 has none).
    position: Option<Tensor>,
    /// Token types (DeBERTa's `type_vocab_size` is 0).
    token_type: Option<Tensor>,
    /// DeBERTa's `embed_proj`, when the embeddings are narrower than the
    /// hidden size.
    project: Option<Linear>,
    norm: LayerNorm,
}

/// A layer of either shape.
#[derive(Debug)]
enum Block {
    /// BERT's post-norm layer (BERT, RoBERTa, DeBERTa).
    Post(Box<Layer>),
    /// ModernBERT's pre-norm layer.
    Pre(Box<modern::Layer>),
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    /// DeBERTa's own projections of the relative positions (when they do
    /// not share the layer's key and query ones).
    pos_key: Option<Linear>,
    pos_query: Option<Linear>,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// DeBERTa's relative-position embeddings, shared by every layer, and the
/// norm they pass through first.
#[derive(Debug)]
struct RelativeTable {
    weight: Tensor,
    norm: Option<LayerNorm>,
}

#[derive(Debug)]
enum Classifier {
    /// BERT (both heads) and RoBERTa's token head: one linear layer.
    Linear(Linear),
    /// RoBERTa's sequence head: `out_proj(dropout(tanh(dense(dropout(h₀)))))`.
    Roberta { dense: Linear, out_proj: Linear },
    /// ModernBERT's: `classifier(dropout(norm(act(dense(h)))))` on every
    /// token, or on the first token or the real tokens' mean.
    Modern { head: modern::Head, out: Linear },
}

/// An encoder with a classification head.
#[derive(Debug)]
pub struct Encoder {
    config: EncoderConfig,
    head: Head,
    labels: Vec<String>,
    kind: Kind,
    vs: VarStore,
    embeddings: Embeddings,
    layers: Vec<Block>,
    relative: Option<RelativeTable>,
    /// ModernBERT's rotary tables and the norm after its last layer.
    rotary: Option<modern::Rotary>,
    final_norm: Option<LayerNorm>,
    /// The sequence head's pooler (BERT's `bert.pooler`, DeBERTa's
    /// `pooler`): `act(dense(h₀))`.
    pooler: Option<Linear>,
    classifier: Classifier,
    /// Dropout on (training) or off (evaluation, and every forward without
    /// gradients).
    training: bool,
    /// LoRA adapters (their own store) and the `[lora]` they were made by.
    adapters: Option<(VarStore, dpo_proto::LoraSpec)>,
    /// Every adapter's switch (off: the base alone).
    adapters_on: Arc<AtomicBool>,
    /// How a training forward keeps what the layers' backward needs
    /// (`stacked`: gradient checkpointing, ZeRO stage 2's staged backward).
    keep: stack::Keep,
}

/// What every layer's attention takes besides its input.
#[derive(Debug)]
struct Attend {
    /// `[B, 1, T, T]`: which keys each query sees.
    mask: Tensor,
    /// DeBERTa: the relative positions and their (normalised) embeddings.
    relative: Option<relative::Positions>,
    /// ModernBERT: the rotary angles and the local layers' mask.
    modern: Option<modern::Attend>,
}

/// Fills `param` from a normal of `std` cut at `cutoff` standard deviations
/// (PyTorch's `trunc_normal_`: the inverse CDF of a uniform draw between the
/// cut points).
fn truncated_normal(param: &Tensor, std: f64, cutoff: f64) -> TchResult<Tensor> {
    // Φ(±cutoff) = (1 + erf(±cutoff/√2)) / 2, so the uniform's bounds are
    // 2Φ - 1 = erf(±cutoff/√2).
    let z = cutoff / std::f64::consts::SQRT_2;
    let bounds = Vec::<f64>::try_from(&Tensor::f_from_slice(&[-z, z])?.f_erf()?)?;
    let [lo, hi] = bounds.as_slice() else {
        return Err(tch::TchError::Shape("erf of two values".into()));
    };
    param
        .shallow_clone()
        .f_uniform_(*lo, *hi)?
        .f_erfinv_()?
        .f_mul_scalar_(std * std::f64::consts::SQRT_2)?
        .f_clamp_(-cutoff * std, cutoff * std)
}

/// What loading found in the checkpoint, for the caller to report.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Parameters the checkpoint lacked and that were initialised anew (the head
    /// of a checkpoint saved without one).
    pub initialised: Vec<String>,
    /// Checkpoint tensors this model has no use for (a masked-LM head, an
    /// unused pooler).
    pub ignored: Vec<String>,
}

impl Encoder {
    /// An encoder with zeroed parameters for `labels`.
    pub fn new(
        config: EncoderConfig,
        head: Head,
        labels: Vec<String>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if labels.is_empty() {
            return Err(Error::Input {
                context: "encoder".into(),
                reason: "a classification head needs at least one label".into(),
            });
        }
        let vs = VarStore::new(device);
        let root = vs.root();
        let base = root.sub(config.family.name());
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        type Parts = (
            Embeddings,
            Vec<Block>,
            Option<RelativeTable>,
            Option<Linear>,
            Classifier,
            Option<LayerNorm>,
        );
        let deberta = config.family == Family::Deberta;
        // DeBERTa's projections are `query_proj`, `key_proj`, `value_proj`.
        let proj = |name: &str| {
            if deberta {
                format!("{name}_proj")
            } else {
                name.to_string()
            }
        };
        let modern = config.modern.as_ref();
        // ModernBERT's norms may go without bias (`norm_bias`).
        let norm_bias = modern.is_none_or(|m| m.norm_bias);
        let build = || -> TchResult<Parts> {
            let e = base.sub("embeddings");
            let width = config.embedding_size;
            let embeddings = Embeddings {
                word: param(
                    &e,
                    if modern.is_some() {
                        "tok_embeddings.weight"
                    } else {
                        "word_embeddings.weight"
                    },
                    &[config.vocab_size, width],
                    kind,
                )?,
                position: if config.position_biased_input {
                    Some(param(
                        &e,
                        "position_embeddings.weight",
                        &[config.max_position_embeddings, width],
                        kind,
                    )?)
                } else {
                    None
                },
                token_type: if config.type_vocab_size > 0 {
                    Some(param(
                        &e,
                        "token_type_embeddings.weight",
                        &[config.type_vocab_size, width],
                        kind,
                    )?)
                } else {
                    None
                },
                project: if width != h {
                    Some(Linear::new(e.sub("embed_proj"), width, h, false, kind)?)
                } else {
                    None
                },
                norm: LayerNorm::with_bias(
                    e.sub(if modern.is_some() {
                        "norm"
                    } else {
                        "LayerNorm"
                    }),
                    h,
                    eps,
                    norm_bias,
                    kind,
                )?,
            };
            let rel = config.relative.as_ref();
            let own_positions = rel.filter(|r| !r.share_att_key);
            let mut layers = Vec::with_capacity(config.num_hidden_layers as usize);
            for i in 0..config.num_hidden_layers {
                if let Some(m) = modern {
                    let l = base.sub("layers").sub(i.to_string());
                    layers.push(Block::Pre(Box::new(modern::Layer::new(
                        &l, i, &config, m, kind,
                    )?)));
                    continue;
                }
                let l = base.sub("encoder").sub("layer").sub(i.to_string());
                let a = l.sub("attention");
                let at = a.sub("self");
                layers.push(Block::Post(Box::new(Layer {
                    query: Linear::biased(at.sub(proj("query")), h, h, kind)?,
                    key: Linear::biased(at.sub(proj("key")), h, h, kind)?,
                    value: Linear::biased(at.sub(proj("value")), h, h, kind)?,
                    pos_key: match own_positions.filter(|r| r.c2p) {
                        Some(_) => Some(Linear::biased(at.sub("pos_key_proj"), h, h, kind)?),
                        None => None,
                    },
                    pos_query: match own_positions.filter(|r| r.p2c) {
                        Some(_) => Some(Linear::biased(at.sub("pos_query_proj"), h, h, kind)?),
                        None => None,
                    },
                    attention_out: Linear::biased(a.sub("output").sub("dense"), h, h, kind)?,
                    attention_norm: LayerNorm::new(a.sub("output").sub("LayerNorm"), h, eps, kind)?,
                    intermediate: Linear::biased(
                        l.sub("intermediate").sub("dense"),
                        h,
                        config.intermediate_size,
                        kind,
                    )?,
                    output: Linear::biased(
                        l.sub("output").sub("dense"),
                        config.intermediate_size,
                        h,
                        kind,
                    )?,
                    output_norm: LayerNorm::new(l.sub("output").sub("LayerNorm"), h, eps, kind)?,
                })));
            }
            let relative = match rel {
                Some(r) => {
                    let enc = base.sub("encoder");
                    Some(RelativeTable {
                        weight: param(&enc, "rel_embeddings.weight", &[2 * r.span, h], kind)?,
                        norm: if r.layer_norm {
                            Some(LayerNorm::new(enc.sub("LayerNorm"), h, eps, kind)?)
                        } else {
                            None
                        },
                    })
                }
                None => None,
            };
            let n = labels.len() as i64;
            let c = root.sub("classifier");
            let (pooler, classifier) = match (config.family, head) {
                (Family::ModernBert, _) => {
                    let bias = modern.is_some_and(|m| m.classifier_bias);
                    let head_path = root.sub("head");
                    (
                        None,
                        Classifier::Modern {
                            head: modern::Head {
                                dense: Linear::new(head_path.sub("dense"), h, h, bias, kind)?,
                                norm: LayerNorm::with_bias(
                                    head_path.sub("norm"),
                                    h,
                                    eps,
                                    norm_bias,
                                    kind,
                                )?,
                            },
                            out: Linear::biased(c, h, n, kind)?,
                        },
                    )
                }
                (Family::Bert, Head::Sequence) => (
                    Some(Linear::biased(base.sub("pooler").sub("dense"), h, h, kind)?),
                    Classifier::Linear(Linear::biased(c, h, n, kind)?),
                ),
                (Family::Deberta, Head::Sequence) => (
                    Some(Linear::biased(root.sub("pooler").sub("dense"), h, h, kind)?),
                    Classifier::Linear(Linear::biased(c, h, n, kind)?),
                ),
                (Family::Roberta, Head::Sequence) => (
                    None,
                    Classifier::Roberta {
                        dense: Linear::biased(c.sub("dense"), h, h, kind)?,
                        out_proj: Linear::biased(c.sub("out_proj"), h, n, kind)?,
                    },
                ),
                (_, Head::Token) => (None, Classifier::Linear(Linear::biased(c, h, n, kind)?)),
            };
            let final_norm = match modern {
                Some(_) => Some(LayerNorm::with_bias(
                    base.sub("final_norm"),
                    h,
                    eps,
                    norm_bias,
                    kind,
                )?),
                None => None,
            };
            Ok((embeddings, layers, relative, pooler, classifier, final_norm))
        };
        let (embeddings, layers, relative, pooler, classifier, final_norm) =
            build().op("building the encoder")?;
        let rotary = match &config.modern {
            Some(m) => Some(modern::Rotary::new(&config, m, device)?),
            None => None,
        };
        Ok(Encoder {
            config,
            head,
            labels,
            kind,
            vs,
            embeddings,
            layers,
            relative,
            rotary,
            final_norm,
            pooler,
            classifier,
            training: false,
            adapters: None,
            adapters_on: Arc::new(AtomicBool::new(true)),
            keep: stack::Keep::Everything,
        })
    }

    /// Loads the checkpoint in `dir` for `head`. `labels` are the task's; when
    /// `None`, the checkpoint's `id2label` is used (it must have a head then).
    /// A checkpoint whose head has other labels than the task's is refused: its
    /// head would be read as the wrong classes. `seed` initialises a missing head.
    pub fn load(
        dir: &Path,
        head: Head,
        labels: Option<Vec<String>>,
        kind: Kind,
        device: Device,
        seed: u64,
    ) -> Result<(Self, LoadReport)> {
        let config = EncoderConfig::from_dir(dir)?;
        let index = TensorIndex::open(dir)?;
        let prefix = format!("{}.", config.family.name());
        // A head model's file names its base `bert.…`; a plain `BertModel`'s
        // does not.
        let prefixed = index.names().any(|n| n.starts_with(&prefix));
        let has_head = index.names().any(|n| n.starts_with("classifier."));
        let labels = match labels {
            Some(labels) => {
                if has_head && labels != config.labels {
                    return Err(Error::Config {
                        path: dir.join("config.json"),
                        reason: format!(
                            "the checkpoint's classification head predicts {:?}, the task's labels are {:?}; \
                             train from a checkpoint without a head (its base model) to get a new head",
                            config.labels, labels
                        ),
                    });
                }
                labels
            }
            None if has_head => config.labels.clone(),
            None => {
                return Err(Error::Config {
                    path: dir.to_path_buf(),
                    reason: "the checkpoint has no classification head and no labels were given"
                        .into(),
                });
            }
        };
        let model = Encoder::new(config, head, labels, kind, device)?;
        let report = model.read_weights(&index, dir, prefixed, seed)?;
        Ok((model, report))
    }

    fn read_weights(
        &self,
        index: &TensorIndex,
        dir: &Path,
        prefixed: bool,
        seed: u64,
    ) -> Result<LoadReport> {
        let family = self.config.family.name();
        let params = self.vs.variables();
        let mut report = LoadReport::default();
        // Checkpoint name → our parameter name.
        let mut found: BTreeMap<String, String> = BTreeMap::new();
        let mut names: Vec<&String> = index.names().collect();
        names.sort();
        for name in names {
            let top_level = name.starts_with("classifier.")
                || (self.config.family == Family::Deberta && name.starts_with("pooler."))
                || (self.config.family == Family::ModernBert
                    && (name.starts_with("head.") || name.starts_with("decoder.")));
            let ours = if prefixed || top_level {
                name.clone()
            } else {
                format!("{family}.{name}")
            };
            if params.contains_key(&ours) {
                found.insert(ours, name.clone());
                continue;
            }
            // Masked-LM heads (BERT's `cls.`, RoBERTa's `lm_head.`, DeBERTa's
            // `lm_predictions.` and its legacy `cls.`, and the
            // `mask_predictions.` of its pre-training, ModernBERT's
            // `decoder.` — its `head.` is the classifiers' too), a pooler the
            // head does not use, and the absolute positions DeBERTa-v3
            // checkpoints carry without using (`position_biased_input = false`).
            let ignorable = name.ends_with("position_ids")
                || (self.config.family == Family::ModernBert && name.starts_with("decoder."))
                || name.starts_with("cls.")
                || name.starts_with("lm_head.")
                || name.starts_with("lm_predictions.")
                || name.starts_with("mask_predictions.")
                || ours.starts_with(&self.pooler_prefix())
                || (!self.config.position_biased_input
                    && ours == format!("{family}.embeddings.position_embeddings.weight"));
            if !ignorable {
                return Err(Error::UnexpectedTensor {
                    path: index.file(name).map(Path::to_path_buf).unwrap_or_default(),
                    name: name.clone(),
                    model_type: format!("{family} {:?}-classification", self.head),
                });
            }
            report.ignored.push(name.clone());
        }
        let _guard = tch::no_grad_guard();
        let mut wanted: Vec<&String> = params.keys().collect();
        wanted.sort();
        tch::manual_seed(seed as i64);
        for ours in wanted {
            let param = &params[ours];
            let Some(name) = found.get(ours) else {
                // Only a head (and BERT's pooler, which belongs to it) may be new.
                let is_head =
                    ours.starts_with("classifier.") || ours.starts_with(&self.pooler_prefix());
                if !is_head {
                    return Err(Error::MissingTensor {
                        dir: dir.to_path_buf(),
                        name: ours.clone(),
                    });
                }
                let fresh = match &self.config.modern {
                    Some(m) => self.modern_fresh(ours, param, m),
                    None if ours.ends_with(".bias") => param.shallow_clone().f_zero_(),
                    None => param
                        .shallow_clone()
                        .f_normal_(0.0, self.config.initializer_range),
                };
                let _fresh = fresh.op("initialising the head")?;
                report.initialised.push(ours.clone());
                continue;
            };
            let shape = index.shape(name).map(<[i64]>::to_vec).unwrap_or_default();
            if shape != param.size() {
                return Err(Error::TensorShape {
                    path: index.file(name).map(Path::to_path_buf).unwrap_or_default(),
                    name: name.clone(),
                    expected: param.size(),
                    found: shape,
                });
            }
            index.read_into(name, param)?;
        }
        if !report.initialised.is_empty() {
            tracing::warn!(
                dir = %dir.display(),
                new = ?report.initialised,
                "the checkpoint has no classification head: a new one is initialised (train it before use)"
            );
        }
        Ok(report)
    }

    /// A new ModernBERT head as transformers draws it: the weights from a
    /// normal cut at `cutoff` standard deviations (the classifier's of
    /// 1/√hidden, `head.dense`'s of `initializer_range / √(2 · layers)`),
    /// biases zero, the norm's weight one.
    fn modern_fresh(&self, name: &str, param: &Tensor, m: &config::Modern) -> TchResult<Tensor> {
        let c = &self.config;
        if name.ends_with(".bias") {
            return param.shallow_clone().f_zero_();
        }
        if name.starts_with("head.norm.") {
            return param.shallow_clone().f_fill_(1.0);
        }
        let std = if name.starts_with("classifier.") {
            (c.hidden_size as f64).powf(-0.5)
        } else {
            c.initializer_range / (2.0 * c.num_hidden_layers as f64).sqrt()
        };
        truncated_normal(param, std, m.cutoff)
    }

    /// Where the sequence head's pooler sits: inside the base model
    /// (`bert.pooler.`), or beside it (DeBERTa's `pooler.`); ModernBERT's
    /// head (`head.`) is both heads'.
    fn pooler_prefix(&self) -> String {
        match self.config.family {
            Family::Deberta => "pooler.".into(),
            Family::ModernBert => "head.".into(),
            family => format!("{}.pooler.", family.name()),
        }
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// The task's labels, in id order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// Dropout on while training (as `model.train()`), off otherwise.
    pub fn set_training(&mut self, on: bool) {
        self.training = on;
    }

    fn dropout(&self, x: Tensor, p: f64) -> TchResult<Tensor> {
        if self.training && p > 0.0 && grad_enabled() {
            x.f_dropout(p, true)
        } else {
            Ok(x)
        }
    }

    /// Position ids: `0..T` for BERT and DeBERTa; RoBERTa counts non-padding
    /// tokens from `padding_idx + 1` and gives padding `padding_idx`.
    fn position_ids(&self, input_ids: &Tensor) -> TchResult<Tensor> {
        let (b, t) = input_ids.size2()?;
        match self.config.family {
            Family::Bert | Family::Deberta | Family::ModernBert => {
                Tensor::f_arange(t, (Kind::Int64, input_ids.device()))?
                    .f_unsqueeze(0)?
                    .f_expand([b, t], false)
            }
            Family::Roberta => {
                let pad = self.config.pad_token_id;
                let mask = input_ids.f_ne(pad)?.f_to_kind(Kind::Int64)?;
                mask.f_cumsum(1, Kind::Int64)?
                    .f_mul(&mask)?
                    .f_add_scalar(pad)
            }
        }
    }

    /// The last hidden states `[B, T, H]`. `attention_mask` is `[B, T]` with 1
    /// for real tokens; `token_type_ids` defaults to zeros.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.hidden_inner(input_ids, attention_mask, token_type_ids)
            .op("encoder forward")
    }

    fn hidden_inner(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> TchResult<Tensor> {
        let (mut x, attend) = self.embed(input_ids, attention_mask, token_type_ids)?;
        let dropout = self.training && grad_enabled();
        for i in 0..self.layers.len() {
            x = self.layer_forward(i, &x, &attend, dropout)?;
        }
        self.final_norm(x)
    }

    /// ModernBERT's norm after the last layer (the others have none).
    fn final_norm(&self, x: Tensor) -> TchResult<Tensor> {
        match &self.final_norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }

    /// The embedding's output `[B, T, H]` (normalised, dropout applied) and
    /// what the layers' attention takes besides it.
    fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> TchResult<(Tensor, Attend)> {
        let (b, t) = input_ids.size2()?;
        let limit = self.config.max_sequence_length();
        if t > limit {
            return Err(tch::TchError::Shape(format!(
                "sequence of {t} tokens is longer than the model's {limit} positions"
            )));
        }
        let e = &self.embeddings;
        let lookup =
            |table: &Tensor, ids: &Tensor| Tensor::f_embedding(table, ids, -1, false, false);
        let positions = match &e.position {
            Some(table) => Some(lookup(table, &self.position_ids(input_ids)?)?),
            None => None,
        };
        let types = match &e.token_type {
            Some(table) => {
                let ids = match token_type_ids {
                    Some(tt) => tt.shallow_clone(),
                    None => Tensor::f_zeros([b, t], (Kind::Int64, input_ids.device()))?,
                };
                Some(lookup(table, &ids)?)
            }
            None => None,
        };
        let mut x = lookup(&e.word, input_ids)?;
        // Each family's order of the sum: BERT's types then positions,
        // DeBERTa's positions then types.
        let parts = match self.config.family {
            Family::Deberta => [positions, types],
            _ => [types, positions],
        };
        for part in parts.into_iter().flatten() {
            x = x.f_add(&part)?;
        }
        if let Some(project) = &e.project {
            x = project.forward(&x)?;
        }
        let mut x = e.norm.forward(&x)?;
        let keys = attention_mask.f_ne(0)?;
        if self.config.family == Family::Deberta {
            // DeBERTa zeroes the padding's embeddings.
            x = x.f_mul(&keys.f_unsqueeze(-1)?.f_to_kind(x.kind())?)?;
        }
        // ModernBERT's embeddings have a dropout of their own.
        let p = self
            .config
            .modern
            .as_ref()
            .map_or(self.config.hidden_dropout, |m| m.embedding_dropout);
        let x = self.dropout(x, p)?;
        let modern = match (&self.config.modern, &self.rotary) {
            (Some(m), Some(rotary)) => Some(
                modern::Attend::new(rotary, &keys, m.window, x.kind())
                    .map_err(|e| tch::TchError::Torch(e.to_string()))?,
            ),
            _ => None,
        };
        let attend = match (&self.config.relative, &self.relative) {
            (Some(r), Some(table)) => {
                // DeBERTa's mask: a query and a key both real (a padding
                // query's row is all masked and attends evenly).
                let keys = keys.f_view([b, 1, 1, t])?;
                let mask = keys.f_logical_and(&keys.f_transpose(-1, -2)?)?;
                let table_rows = match &table.norm {
                    Some(norm) => norm.forward(&table.weight)?,
                    None => table.weight.shallow_clone(),
                };
                Attend {
                    mask,
                    relative: Some(relative::Positions::new(
                        r,
                        t,
                        table_rows,
                        input_ids.device(),
                    )?),
                    modern: None,
                }
            }
            _ => Attend {
                mask: keys.f_view([b, 1, 1, t])?.f_expand([b, 1, t, t], false)?,
                relative: None,
                modern,
            },
        };
        Ok((x, attend))
    }

    /// Encoder layer `i` on `x` `[B, T, H]` with what `attend` holds;
    /// `dropout`: draw the dropout masks (a training forward; also without
    /// autograd, when a checkpointed layer runs first).
    fn layer_forward(
        &self,
        i: usize,
        x: &Tensor,
        attend: &Attend,
        dropout: bool,
    ) -> TchResult<Tensor> {
        let (b, t, _) = x.size3()?;
        let heads = self.config.num_attention_heads;
        let d = self.config.hidden_size / heads;
        let split =
            |y: Tensor| -> TchResult<Tensor> { y.f_view([b, t, heads, d])?.f_transpose(1, 2) };
        let c = &self.config;
        let (p_attn, p_hidden) = if dropout {
            (c.attention_dropout, c.hidden_dropout)
        } else {
            (0.0, 0.0)
        };
        let drop = |x: Tensor| {
            if p_hidden > 0.0 {
                x.f_dropout(p_hidden, true)
            } else {
                Ok(x)
            }
        };
        let layer = match &self.layers[i] {
            Block::Post(layer) => layer,
            Block::Pre(layer) => {
                let Some(modern) = &attend.modern else {
                    return Err(tch::TchError::Shape(
                        "a ModernBERT layer without its rotary angles".into(),
                    ));
                };
                return layer.forward(x, c, &attend.mask, modern, (p_attn, p_hidden));
            }
        };
        let q = split(layer.query.forward(x)?)?;
        let k = split(layer.key.forward(x)?)?;
        let v = split(layer.value.forward(x)?)?;
        let a = match (&attend.relative, &c.relative) {
            (Some(positions), Some(r)) => {
                let projections = relative::Projections {
                    query: layer.pos_query.as_ref().unwrap_or(&layer.query),
                    key: layer.pos_key.as_ref().unwrap_or(&layer.key),
                };
                relative::attention(
                    r,
                    positions,
                    projections,
                    (&q, &k, &v),
                    &attend.mask,
                    (p_attn, p_hidden),
                )?
            }
            _ => Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&attend.mask),
                p_attn,
                false,
                None,
                false,
            )?,
        }
        .f_transpose(1, 2)?
        .f_reshape([b, t, self.config.hidden_size])?;
        let a = drop(layer.attention_out.forward(&a)?)?;
        let h = layer.attention_norm.forward(&a.f_add(x)?)?;
        let inner = self
            .config
            .hidden_act
            .apply(&layer.intermediate.forward(&h)?)?;
        let o = drop(layer.output.forward(&inner)?)?;
        layer.output_norm.forward(&o.f_add(&h)?)
    }

    /// Logits: `[B, T, L]` for the token head, `[B, L]` for the sequence head.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.hidden_inner(input_ids, attention_mask, token_type_ids)
            .and_then(|x| self.logits_of(&x, attention_mask))
            .op("encoder forward")
    }

    /// The head on the last hidden states `x` (`attention_mask` for a
    /// head that pools the real tokens' mean).
    fn logits_of(&self, x: &Tensor, attention_mask: &Tensor) -> TchResult<Tensor> {
        let c = &self.config;
        match (&self.classifier, self.head) {
            (Classifier::Modern { head, out }, which) => {
                let mean = c.modern.as_ref().is_some_and(|m| m.mean_pooling);
                let act = c
                    .modern
                    .as_ref()
                    .map_or(Activation::Gelu, |m| m.classifier_act);
                let h = match which {
                    Head::Token => x.shallow_clone(),
                    Head::Sequence if mean => {
                        let real = attention_mask.f_to_kind(x.kind())?.f_unsqueeze(-1)?;
                        let sum = x.f_mul(&real)?.f_sum_dim_intlist(1, false, x.kind())?;
                        sum.f_div(&real.f_sum_dim_intlist(1, false, x.kind())?)?
                    }
                    Head::Sequence => x.f_select(1, 0)?,
                };
                let h = head.norm.forward(&act.apply(&head.dense.forward(&h)?)?)?;
                out.forward(&self.dropout(h, c.classifier_dropout)?)
            }
            (Classifier::Linear(linear), Head::Token) => {
                linear.forward(&self.dropout(x.shallow_clone(), c.token_classifier_dropout)?)
            }
            (Classifier::Linear(linear), Head::Sequence) => {
                let first = x.f_select(1, 0)?;
                let pooled = match &self.pooler {
                    Some(pooler) => {
                        let first = self.dropout(first, c.pooler_dropout)?;
                        c.pooler_act.apply(&pooler.forward(&first)?)?
                    }
                    None => first,
                };
                linear.forward(&self.dropout(pooled, c.classifier_dropout)?)
            }
            (Classifier::Roberta { dense, out_proj }, _) => {
                let p = c.classifier_dropout;
                let first = self.dropout(x.f_select(1, 0)?, p)?;
                let h = dense.forward(&first)?.f_tanh()?;
                out_proj.forward(&self.dropout(h, p)?)
            }
        }
    }

    /// Saves an HF model directory: `config.json` with this head's
    /// architecture and `id2label`/`label2id`, the weights, and the tokenizer
    /// files of `source_dir`.
    pub fn save(&self, dir: &Path, source_dir: Option<&Path>, max_shard_bytes: u64) -> Result<()> {
        self.save_weights(dir, source_dir, max_shard_bytes, BTreeMap::new())
    }

    /// [`Self::save`] with the tensors of `replaced` (by name) in place of
    /// the parameters' own (the merged weights of LoRA layers).
    fn save_weights(
        &self,
        dir: &Path,
        source_dir: Option<&Path>,
        max_shard_bytes: u64,
        mut replaced: BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| {
                let t = replaced.remove(&n).unwrap_or(t);
                (n, t)
            })
            .collect();
        let (files, bytes) = write_weight_files(&vars, dir, max_shard_bytes)?;
        write_json(&dir.join("config.json"), &self.config_json())?;
        if let Some(src) = source_dir {
            copy_side_files(src, dir)?;
        }
        tracing::debug!(dir = %dir.display(), files, bytes, "saved encoder weights");
        Ok(())
    }

    /// `config.json` as written by [`Encoder::save`].
    pub fn config_json(&self) -> Value {
        let mut config = self.config.raw.clone();
        if let Some(obj) = config.as_object_mut() {
            let prefix = match self.config.model_type {
                ModelType::XlmRoberta => "XLMRoberta",
                _ => self.config.family.class_prefix(),
            };
            let arch = format!("{prefix}{}", self.head.class_suffix());
            obj.insert("architectures".into(), Value::from(vec![arch]));
            let id2label: serde_json::Map<String, Value> = self
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), Value::from(l.as_str())))
                .collect();
            let label2id: serde_json::Map<String, Value> = self
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), Value::from(i)))
                .collect();
            obj.insert("id2label".into(), Value::Object(id2label));
            obj.insert("label2id".into(), Value::Object(label2id));
            obj.remove("num_labels");
            let key = if obj.contains_key("torch_dtype") {
                "torch_dtype"
            } else {
                "dtype"
            };
            obj.insert(key.into(), Value::from(dtype_name(self.kind)));
        }
        config
    }
}
