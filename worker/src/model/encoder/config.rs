//! An encoder's `config.json`: the family (BERT, RoBERTa, DeBERTa-v2/v3,
//! ModernBERT), the head, the activation, the sizes, DeBERTa's relative
//! attention and ModernBERT's rotary and local attention, every error naming
//! the file and the key.

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
    /// DeBERTa-v2 and v3 (`deberta-v2`): BERT's post-norm layers with
    /// disentangled attention over relative positions.
    Deberta,
    /// ModernBERT (`modernbert`): pre-norm layers, rotary positions, GeGLU,
    /// local attention alternating with global, no biases.
    ModernBert,
}

impl Family {
    /// The state-dict prefix of the base model (`bert.`, `roberta.`,
    /// `deberta.`, ModernBERT's `model.`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::Deberta => "deberta",
            Family::ModernBert => "model",
        }
    }

    pub(super) fn class_prefix(self) -> &'static str {
        match self {
            Family::Bert => "Bert",
            Family::Roberta => "Roberta",
            Family::Deberta => "DebertaV2",
            Family::ModernBert => "ModernBert",
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
    /// BERT's pooler.
    Tanh,
}

impl Activation {
    pub(super) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            _ => return None,
        })
    }

    pub(super) fn apply(self, x: &Tensor) -> TchResult<Tensor> {
        match self {
            Activation::Gelu => x.f_gelu("none"),
            Activation::GeluTanh => x.f_gelu("tanh"),
            Activation::Relu => x.f_relu(),
            Activation::Silu => x.f_silu(),
            Activation::Tanh => x.f_tanh(),
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
    // DeBERTa-v2/v3.
    relative_attention: Option<bool>,
    max_relative_positions: Option<i64>,
    position_buckets: Option<i64>,
    pos_att_type: Option<Value>,
    share_att_key: Option<bool>,
    norm_rel_ebd: Option<String>,
    position_biased_input: Option<bool>,
    embedding_size: Option<i64>,
    attention_head_size: Option<i64>,
    pooler_hidden_size: Option<i64>,
    pooler_hidden_act: Option<String>,
    pooler_dropout: Option<f64>,
    cls_dropout: Option<f64>,
    conv_kernel_size: Option<i64>,
    // ModernBERT.
    hidden_activation: Option<String>,
    norm_eps: Option<f64>,
    norm_bias: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    classifier_bias: Option<bool>,
    classifier_activation: Option<String>,
    classifier_pooling: Option<String>,
    embedding_dropout: Option<f64>,
    attention_dropout: Option<f64>,
    mlp_dropout: Option<f64>,
    local_attention: Option<i64>,
    global_attn_every_n_layers: Option<i64>,
    global_rope_theta: Option<f64>,
    local_rope_theta: Option<f64>,
    layer_types: Option<Vec<String>>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    initializer_cutoff_factor: Option<f64>,
}

/// ModernBERT's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Modern {
    /// Per layer: attends to every position (`full_attention`), else within
    /// `window` positions either side (`sliding_attention`).
    pub global: Vec<bool>,
    /// The rotary base of the global layers and of the local ones.
    pub global_theta: f64,
    pub local_theta: f64,
    /// Half of `local_attention`: a local layer's query sees the keys at
    /// most this far away.
    pub window: i64,
    /// Biases of the norms, of the attention's and the MLP's linear layers,
    /// and of the head's dense layer.
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub classifier_bias: bool,
    /// The head's activation (`classifier_activation`).
    pub classifier_act: Activation,
    /// The sequence head pools the mean of the real tokens (`"mean"`), else
    /// the first token (`"cls"`).
    pub mean_pooling: bool,
    /// Dropout on the embeddings' output (`embedding_dropout`).
    pub embedding_dropout: f64,
    /// A new head's weights are drawn from a normal cut at this many
    /// standard deviations (`initializer_cutoff_factor`).
    pub cutoff: f64,
}

/// DeBERTa's disentangled attention: besides content to content, content to
/// position (`c2p`) and position to content (`p2c`) scores, from a table of
/// relative-position embeddings every layer shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Relative {
    /// Half the table's rows: relative positions (or buckets) `-span..span`.
    pub span: i64,
    /// `(position_buckets, max_relative_positions)`: distances beyond half
    /// the buckets share log-spaced buckets up to the maximum.
    pub buckets: Option<(i64, i64)>,
    pub c2p: bool,
    pub p2c: bool,
    /// The positions are projected by the layer's own query and key
    /// projections (DeBERTa-v3), not `pos_query_proj`/`pos_key_proj`.
    pub share_att_key: bool,
    /// The table passes through `encoder.LayerNorm` first (`norm_rel_ebd =
    /// "layer_norm"`).
    pub layer_norm: bool,
}

impl Relative {
    /// How many terms the attention's scale divides among (`√(d · factor)`).
    pub fn scale_factor(&self) -> i64 {
        1 + i64::from(self.c2p) + i64::from(self.p2c)
    }
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
    /// The sequence head's dropout before its classifier (`classifier_dropout`,
    /// DeBERTa's `cls_dropout`, else `hidden_dropout_prob`).
    pub classifier_dropout: f64,
    /// The token head's dropout (BERT's is `classifier_dropout`, DeBERTa's
    /// `hidden_dropout_prob`).
    pub token_classifier_dropout: f64,
    /// Absolute position embeddings added to the tokens' (DeBERTa-v3 has
    /// none: `position_biased_input = false`).
    pub position_biased_input: bool,
    /// The embeddings' width; projected to `hidden_size` when it differs
    /// (DeBERTa's `embedding_size`, `embed_proj`).
    pub embedding_size: i64,
    /// DeBERTa's relative attention, when `relative_attention` is on.
    pub relative: Option<Relative>,
    /// The sequence head's pooler activation (BERT: tanh; DeBERTa:
    /// `pooler_hidden_act`) and the dropout before it (DeBERTa's
    /// `pooler_dropout`).
    pub pooler_act: Activation,
    pub pooler_dropout: f64,
    /// ModernBERT's settings.
    pub modern: Option<Modern>,
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
            ModelType::DebertaV2 => Family::Deberta,
            ModelType::ModernBert => Family::ModernBert,
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
        let modern_family = family == Family::ModernBert;
        let (act_key, act_name) = if modern_family {
            ("hidden_activation", c.hidden_activation.as_deref())
        } else {
            ("hidden_act", c.hidden_act.as_deref())
        };
        let act_name = act_name.unwrap_or("gelu");
        let hidden_act = Activation::parse(act_name).ok_or_else(|| {
            bad(format!(
                "{act_key} {act_name:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"
            ))
        })?;
        // ModernBERT's checkpoints carry BERT's `position_embedding_type`
        // without using it.
        if let Some(kind) = c.position_embedding_type.as_deref()
            && kind != "absolute"
            && !modern_family
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
        // ModernBERT: `mlp_dropout` inside the MLP (where BERT drops the
        // layer's outputs), `attention_dropout` on the probabilities and the
        // attention's output.
        let hidden_dropout = if modern_family {
            probability(c.mlp_dropout, "mlp_dropout", 0.0)?
        } else {
            probability(c.hidden_dropout_prob, "hidden_dropout_prob", 0.1)?
        };
        let attention_dropout = if modern_family {
            probability(c.attention_dropout, "attention_dropout", 0.0)?
        } else {
            probability(
                c.attention_probs_dropout_prob,
                "attention_probs_dropout_prob",
                0.1,
            )?
        };
        let deberta = family == Family::Deberta;
        let (classifier_dropout, token_classifier_dropout) = if modern_family {
            let cls = probability(c.classifier_dropout, "classifier_dropout", 0.0)?;
            (cls, cls)
        } else if deberta {
            let cls = probability(c.cls_dropout, "cls_dropout", hidden_dropout)?;
            (cls, hidden_dropout)
        } else {
            let cls = probability(c.classifier_dropout, "classifier_dropout", hidden_dropout)?;
            (cls, cls)
        };
        let (eps_key, layer_norm_eps) = if modern_family {
            ("norm_eps", c.norm_eps.unwrap_or(1e-5))
        } else {
            ("layer_norm_eps", c.layer_norm_eps.unwrap_or(1e-12))
        };
        if !(layer_norm_eps.is_finite() && layer_norm_eps > 0.0) {
            return Err(bad(format!(
                "{eps_key} must be positive, found {layer_norm_eps}"
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
            Family::Bert | Family::Deberta => 0,
            Family::Roberta => 1,
            Family::ModernBert => 50283,
        });
        let vocab_size = need(c.vocab_size, "vocab_size")?;
        let max_position_embeddings = need(c.max_position_embeddings, "max_position_embeddings")?;
        let deberta_keys = if deberta {
            Some(deberta_settings(
                &c,
                hidden_size,
                num_attention_heads,
                max_position_embeddings,
                &bad,
            )?)
        } else {
            None
        };
        let num_hidden_layers = need(c.num_hidden_layers, "num_hidden_layers")?;
        let modern = if modern_family {
            Some(modern_settings(&c, num_hidden_layers, &bad)?)
        } else {
            None
        };
        // DeBERTa's default is no token types; BERT's two; ModernBERT has none.
        let type_vocab_size = if modern_family {
            0
        } else {
            c.type_vocab_size.unwrap_or(if deberta { 0 } else { 2 })
        };
        if type_vocab_size < 0 || (!deberta && !modern_family && type_vocab_size == 0) {
            return Err(bad(format!(
                "type_vocab_size must be positive, found {type_vocab_size}"
            )));
        }
        let pooler_dropout = probability(c.pooler_dropout, "pooler_dropout", 0.0)?;
        let pooler_act = match (deberta, c.pooler_hidden_act.as_deref()) {
            (false, _) => Activation::Tanh,
            (true, name) => {
                let name = name.unwrap_or("gelu");
                Activation::parse(name).ok_or_else(|| {
                    bad(format!(
                        "pooler_hidden_act {name:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu, tanh)"
                    ))
                })?
            }
        };
        let (position_biased_input, embedding_size, relative) =
            deberta_keys.unwrap_or((!modern_family, hidden_size, None));
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
            num_hidden_layers,
            num_attention_heads,
            intermediate_size: need(c.intermediate_size, "intermediate_size")?,
            hidden_act,
            max_position_embeddings,
            type_vocab_size,
            layer_norm_eps,
            pad_token_id,
            initializer_range: c.initializer_range.unwrap_or(0.02),
            hidden_dropout,
            attention_dropout,
            classifier_dropout,
            token_classifier_dropout,
            position_biased_input,
            embedding_size,
            relative,
            pooler_act,
            pooler_dropout,
            modern,
            labels,
            raw,
        })
    }

    /// The longest sequence the position table holds (RoBERTa's first
    /// `padding_idx + 1` rows are never used as positions).
    pub fn max_sequence_length(&self) -> i64 {
        match self.family {
            Family::Bert | Family::Deberta | Family::ModernBert => self.max_position_embeddings,
            Family::Roberta => self.max_position_embeddings - self.pad_token_id - 1,
        }
    }
}

/// ModernBERT's keys, in both the form the published checkpoints have
/// (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`)
/// and the one transformers 5 writes (`layer_types`, `rope_parameters` per
/// layer type). A rotary scaling is refused by its key: ModernBERT is
/// trained without one, and an approximation would change every logit.
fn modern_settings(
    c: &RawEncoderConfig,
    layers: i64,
    bad: &dyn Fn(String) -> Error,
) -> Result<Modern> {
    let global = match &c.layer_types {
        Some(types) => {
            if types.len() as i64 != layers {
                return Err(bad(format!(
                    "layer_types has {} entries for {layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(true),
                    "sliding_attention" => Ok(false),
                    other => Err(bad(format!(
                        "layer_types entry {other:?} is not supported (full_attention, sliding_attention)"
                    ))),
                })
                .collect::<Result<Vec<bool>>>()?
        }
        None => {
            let every = c.global_attn_every_n_layers.unwrap_or(3);
            if every < 1 {
                return Err(bad(format!(
                    "global_attn_every_n_layers must be positive, found {every}"
                )));
            }
            (0..layers).map(|i| i % every == 0).collect()
        }
    };
    if let Some(v) = &c.rope_scaling
        && !v.is_null()
    {
        return Err(bad(format!(
            "rope_scaling {v} is not supported (ModernBERT's rotary is unscaled)"
        )));
    }
    let mut theta = [
        c.global_rope_theta.unwrap_or(160_000.0),
        c.local_rope_theta.unwrap_or(10_000.0),
    ];
    if let Some(params) = c.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        let Some(map) = params.as_object() else {
            return Err(bad(format!(
                "rope_parameters must map full_attention and sliding_attention to their settings, found {params}"
            )));
        };
        for (key, entry) in map {
            let slot = match key.as_str() {
                "full_attention" => 0,
                "sliding_attention" => 1,
                other => {
                    return Err(bad(format!(
                        "rope_parameters.{other} is not a layer type (full_attention, sliding_attention)"
                    )));
                }
            };
            if let Some(kind) = entry.get("rope_type").and_then(Value::as_str)
                && kind != "default"
            {
                return Err(bad(format!(
                    "rope_parameters.{key}.rope_type {kind:?} is not supported (only default)"
                )));
            }
            if let Some(t) = entry.get("rope_theta") {
                theta[slot] = t.as_f64().ok_or_else(|| {
                    bad(format!(
                        "rope_parameters.{key}.rope_theta must be a number, found {t}"
                    ))
                })?;
            }
        }
    }
    for (t, key) in theta.iter().zip(["global_rope_theta", "local_rope_theta"]) {
        if !(t.is_finite() && *t > 0.0) {
            return Err(bad(format!("{key} must be positive, found {t}")));
        }
    }
    let local = c.local_attention.unwrap_or(128);
    if local < 2 {
        return Err(bad(format!(
            "local_attention must be at least 2, found {local}"
        )));
    }
    let act_name = c.classifier_activation.as_deref().unwrap_or("gelu");
    let classifier_act = Activation::parse(act_name).ok_or_else(|| {
        bad(format!(
            "classifier_activation {act_name:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu, tanh)"
        ))
    })?;
    let mean_pooling = match c.classifier_pooling.as_deref().unwrap_or("cls") {
        "cls" => false,
        "mean" => true,
        other => {
            return Err(bad(format!(
                "classifier_pooling {other:?} is not supported (cls, mean)"
            )));
        }
    };
    let embedding_dropout = c.embedding_dropout.unwrap_or(0.0);
    if !(0.0..1.0).contains(&embedding_dropout) {
        return Err(bad(format!(
            "embedding_dropout must be in [0, 1), found {embedding_dropout}"
        )));
    }
    let cutoff = c.initializer_cutoff_factor.unwrap_or(2.0);
    if !(cutoff.is_finite() && cutoff > 0.0) {
        return Err(bad(format!(
            "initializer_cutoff_factor must be positive, found {cutoff}"
        )));
    }
    Ok(Modern {
        global,
        global_theta: theta[0],
        local_theta: theta[1],
        window: local / 2,
        norm_bias: c.norm_bias.unwrap_or(false),
        attention_bias: c.attention_bias.unwrap_or(false),
        mlp_bias: c.mlp_bias.unwrap_or(false),
        classifier_bias: c.classifier_bias.unwrap_or(false),
        classifier_act,
        mean_pooling,
        embedding_dropout,
        cutoff,
    })
}

/// DeBERTa's own keys: whether absolute positions are added, the embedding
/// width, and the relative attention. What this implementation does not
/// compute (the convolution of DeBERTa-v2-xlarge's first layer, a head size
/// of its own, a pooler width other than the hidden size) is refused by key.
fn deberta_settings(
    c: &RawEncoderConfig,
    hidden_size: i64,
    heads: i64,
    max_position_embeddings: i64,
    bad: &dyn Fn(String) -> Error,
) -> Result<(bool, i64, Option<Relative>)> {
    if let Some(k) = c.conv_kernel_size
        && k > 0
    {
        return Err(bad(format!(
            "conv_kernel_size {k} is not supported (DeBERTa's convolution layer; 0 or absent)"
        )));
    }
    if let Some(d) = c.attention_head_size
        && d != hidden_size / heads
    {
        return Err(bad(format!(
            "attention_head_size {d} is not supported (only hidden_size / num_attention_heads = {})",
            hidden_size / heads
        )));
    }
    if let Some(p) = c.pooler_hidden_size
        && p != hidden_size
    {
        return Err(bad(format!(
            "pooler_hidden_size {p} is not supported (only hidden_size, {hidden_size})"
        )));
    }
    let embedding_size = c.embedding_size.unwrap_or(hidden_size);
    if embedding_size <= 0 {
        return Err(bad(format!(
            "embedding_size must be positive, found {embedding_size}"
        )));
    }
    let position_biased_input = c.position_biased_input.unwrap_or(true);
    if !c.relative_attention.unwrap_or(false) {
        return Ok((position_biased_input, embedding_size, None));
    }
    let kinds: Vec<String> = match &c.pos_att_type {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s
            .to_lowercase()
            .split('|')
            .map(|x| x.trim().to_string())
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(|s| s.trim().to_lowercase()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("pos_att_type must be a string or a list of strings".into()))?,
        Some(other) => {
            return Err(bad(format!(
                "pos_att_type must be a string or a list of strings, found {other}"
            )));
        }
    };
    for k in &kinds {
        if !matches!(k.as_str(), "c2p" | "p2c" | "") {
            return Err(bad(format!(
                "pos_att_type {k:?} is not supported (c2p, p2c)"
            )));
        }
    }
    let norm: Vec<String> = c
        .norm_rel_ebd
        .as_deref()
        .unwrap_or("none")
        .to_lowercase()
        .split('|')
        .map(|x| x.trim().to_string())
        .collect();
    if let Some(k) = norm
        .iter()
        .find(|k| !matches!(k.as_str(), "none" | "layer_norm"))
    {
        return Err(bad(format!(
            "norm_rel_ebd {k:?} is not supported (none, layer_norm)"
        )));
    }
    let max_relative = match c.max_relative_positions {
        Some(m) if m >= 1 => m,
        _ => max_position_embeddings,
    };
    let buckets = c.position_buckets.filter(|&b| b > 0);
    if let Some(b) = buckets
        && b < 2
    {
        return Err(bad(format!(
            "position_buckets must be at least 2 (or -1: none), found {b}"
        )));
    }
    Ok((
        position_biased_input,
        embedding_size,
        Some(Relative {
            span: buckets.unwrap_or(max_relative),
            buckets: buckets.map(|b| (b, max_relative)),
            c2p: kinds.iter().any(|k| k == "c2p"),
            p2c: kinds.iter().any(|k| k == "p2c"),
            share_att_key: c.share_att_key.unwrap_or(false),
            layer_norm: norm.iter().any(|k| k == "layer_norm"),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str, model_type: &str) -> Result<EncoderConfig> {
        let text = format!(
            r#"{{"model_type": "{model_type}", "vocab_size": 100, "hidden_size": 32,
                "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
                "max_position_embeddings": 64, "pad_token_id": 0 {extra}}}"#
        );
        EncoderConfig::from_json(&text, Path::new("m/config.json"))
    }

    /// The error of `extra` names the file and `key`.
    fn refused(extra: &str, model_type: &str, key: &str) {
        let err = parse(extra, model_type).expect_err(extra).to_string();
        assert!(
            err.contains("m/config.json") && err.contains(key),
            "{extra}: {err}"
        );
    }

    #[test]
    fn deberta_options_it_does_not_compute_are_refused_by_key() {
        refused(
            r#", "conv_kernel_size": 3"#,
            "deberta-v2",
            "conv_kernel_size",
        );
        refused(
            r#", "attention_head_size": 16"#,
            "deberta-v2",
            "attention_head_size",
        );
        refused(
            r#", "pooler_hidden_size": 16"#,
            "deberta-v2",
            "pooler_hidden_size",
        );
        refused(
            r#", "relative_attention": true, "pos_att_type": "p2c|c2q""#,
            "deberta-v2",
            "pos_att_type",
        );
        refused(
            r#", "relative_attention": true, "norm_rel_ebd": "batch_norm""#,
            "deberta-v2",
            "norm_rel_ebd",
        );
        refused(
            r#", "relative_attention": true, "position_buckets": 1"#,
            "deberta-v2",
            "position_buckets",
        );
        // 0 means no convolution, as transformers reads it.
        assert!(parse(r#", "conv_kernel_size": 0"#, "deberta-v2").is_ok());
    }

    /// DeBERTa's `pos_att_type` as the published v3 configs spell it (one
    /// string) and as transformers writes it (a list) mean the same.
    #[test]
    fn deberta_pos_att_type_is_read_in_both_spellings() {
        let rel = |spelling: &str| {
            parse(
                &format!(r#", "relative_attention": true, "pos_att_type": {spelling}"#),
                "deberta-v2",
            )
            .expect("parses")
            .relative
            .expect("relative")
        };
        let a = rel(r#""p2c|c2p""#);
        let b = rel(r#"["c2p", "p2c"]"#);
        assert_eq!(a, b);
        assert!(a.c2p && a.p2c);
        assert!(!rel(r#"["c2p"]"#).p2c);
    }

    #[test]
    fn modernbert_is_read_in_both_config_forms() {
        let hub = parse(
            r#", "global_attn_every_n_layers": 2, "global_rope_theta": 160000.0,
                "local_rope_theta": 10000.0, "local_attention": 8,
                "position_embedding_type": "absolute""#,
            "modernbert",
        )
        .expect("the published form");
        let new = parse(
            r#", "layer_types": ["full_attention", "sliding_attention", "full_attention",
                "sliding_attention"], "local_attention": 8,
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}"#,
            "modernbert",
        )
        .expect("transformers 5's form");
        assert_eq!(hub.modern, new.modern);
        let m = hub.modern.expect("modern");
        assert_eq!(m.global, [true, false, true, false]);
        assert_eq!(
            (m.global_theta, m.local_theta, m.window),
            (160000.0, 10000.0, 4)
        );
        // Defaults as transformers': a global layer every third, no biases,
        // the first token pooled, norm_eps 1e-5.
        let d = parse("", "modernbert").expect("defaults");
        let m = d.modern.expect("modern");
        assert_eq!(m.global, [true, false, false, true]);
        assert!(!m.norm_bias && !m.attention_bias && !m.mlp_bias && !m.mean_pooling);
        assert_eq!(d.layer_norm_eps, 1e-5);
        assert_eq!(d.type_vocab_size, 0);
        assert!(!d.position_biased_input);
    }

    #[test]
    fn modernbert_options_it_does_not_compute_are_refused_by_key() {
        refused(
            r#", "rope_scaling": {"rope_type": "linear", "factor": 2.0}"#,
            "modernbert",
            "rope_scaling",
        );
        refused(
            r#", "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}"#,
            "modernbert",
            "rope_parameters.full_attention.rope_type",
        );
        refused(
            r#", "layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]"#,
            "modernbert",
            "layer_types",
        );
        refused(
            r#", "layer_types": ["full_attention"]"#,
            "modernbert",
            "layer_types",
        );
        refused(
            r#", "classifier_pooling": "max""#,
            "modernbert",
            "classifier_pooling",
        );
        refused(
            r#", "hidden_activation": "mish""#,
            "modernbert",
            "hidden_activation",
        );
        refused(r#", "local_attention": 1"#, "modernbert", "local_attention");
        refused(r#", "mlp_dropout": 1.5"#, "modernbert", "mlp_dropout");
        refused(r#", "norm_eps": 0"#, "modernbert", "norm_eps");
    }
}
