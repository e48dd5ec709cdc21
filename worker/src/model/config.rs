//! `config.json` of a Llama-family checkpoint, read as transformers writes it.
//!
//! Both spellings of the rotary settings are accepted: the classic `rope_theta` +
//! `rope_scaling` (with `type` or `rope_type`) and transformers 5's `rope_parameters`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result, io_err};

/// The architectures this crate implements. They share one decoder; they differ in
/// defaults (biases, windows) that `config.json` spells out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2's decoder without QKV biases, with a per-head RMSNorm on q and
    /// k before rotary (`q_norm`, `k_norm`).
    Qwen3,
    /// Llama's decoder with q, k and v in one projection (`qkv_proj`) and the
    /// MLP's gate and up in one (`gate_up_proj`); rotary on a fraction of
    /// each head (`partial_rotary_factor`) and LongRoPE scaling (Phi-3,
    /// Phi-3.5, Phi-4-mini).
    Phi3,
    /// Gemma 2: RMSNorm scaling by `1 + weight`, embeddings scaled by
    /// √hidden, GeGLU (tanh GELU), norms before and after attention and MLP,
    /// attention and final logit soft-capping, `query_pre_attn_scalar`,
    /// sliding-window layers alternating with global ones.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 without soft-capping, with per-head q/k
    /// norms and a rotary base of its own for the sliding-window layers.
    Gemma3,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Phi3 => "phi3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3_text",
        }
    }
}

/// Every `model_type` this system trains: the one place that names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    /// Gemma 3's text model (`Gemma3ForCausalLM`; the multimodal checkpoints'
    /// `gemma3` is not read).
    Gemma3Text,
    Bert,
    Roberta,
    /// XLM-RoBERTa: RoBERTa's architecture (and state-dict prefix) with a
    /// SentencePiece Unigram vocabulary.
    XlmRoberta,
    /// DeBERTa-v2 and v3: disentangled attention over relative positions.
    DebertaV2,
    /// ModernBERT: pre-norm layers with rotary positions, GeGLU, and local
    /// attention alternating with global.
    ModernBert,
}

impl ModelType {
    pub const ALL: [ModelType; 12] = [
        ModelType::Llama,
        ModelType::Mistral,
        ModelType::Qwen2,
        ModelType::Qwen3,
        ModelType::Phi3,
        ModelType::Gemma2,
        ModelType::Gemma3Text,
        ModelType::Bert,
        ModelType::Roberta,
        ModelType::XlmRoberta,
        ModelType::DebertaV2,
        ModelType::ModernBert,
    ];

    /// `config.json`'s spelling.
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
            ModelType::Qwen3 => "qwen3",
            ModelType::Phi3 => "phi3",
            ModelType::Gemma2 => "gemma2",
            ModelType::Gemma3Text => "gemma3_text",
            ModelType::Bert => "bert",
            ModelType::Roberta => "roberta",
            ModelType::XlmRoberta => "xlm-roberta",
            ModelType::DebertaV2 => "deberta-v2",
            ModelType::ModernBert => "modernbert",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Every supported `model_type`, for messages: `llama, mistral, …`.
    pub fn supported() -> String {
        Self::ALL.map(ModelType::name).join(", ")
    }

    /// A bidirectional encoder (token and sequence classification), not a
    /// causal LM.
    pub fn is_encoder(self) -> bool {
        matches!(
            self,
            ModelType::Bert
                | ModelType::Roberta
                | ModelType::XlmRoberta
                | ModelType::DebertaV2
                | ModelType::ModernBert
        )
    }

    /// The decoder architecture of a causal LM.
    pub fn architecture(self) -> Option<Architecture> {
        match self {
            ModelType::Llama => Some(Architecture::Llama),
            ModelType::Mistral => Some(Architecture::Mistral),
            ModelType::Qwen2 => Some(Architecture::Qwen2),
            ModelType::Qwen3 => Some(Architecture::Qwen3),
            ModelType::Phi3 => Some(Architecture::Phi3),
            ModelType::Gemma2 => Some(Architecture::Gemma2),
            ModelType::Gemma3Text => Some(Architecture::Gemma3),
            ModelType::Bert
            | ModelType::Roberta
            | ModelType::XlmRoberta
            | ModelType::DebertaV2
            | ModelType::ModernBert => None,
        }
    }

    /// `model_type` of `config.json`'s parsed body (`path` for messages):
    /// missing is a config error naming the key, unknown names what is
    /// supported.
    pub fn of_json(raw: &Value, path: &Path) -> Result<Self> {
        let name = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                reason: "missing key model_type".into(),
            })?;
        Self::parse(name).ok_or_else(|| Error::UnsupportedModel {
            path: path.to_path_buf(),
            model_type: name.to_string(),
        })
    }

    /// The model type of the checkpoint in `dir` (its `config.json`).
    pub fn of_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = dpo_data::confined::read_to_string(&path).map_err(io_err(&path))?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        Self::of_json(&raw, &path)
    }
}

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// LongRoPE (Phi-3's `longrope`, once `su`): each frequency divided by
    /// its `short_factor`, or its `long_factor` in a forward whose positions
    /// pass `original_max_position_embeddings`; `cos` and `sin` scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: f64,
    },
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (Llama, Mistral, Qwen, Phi-3).
    Silu,
    /// `gelu_pytorch_tanh`: GELU's tanh approximation (Gemma).
    GeluTanh,
}

/// A validated model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    /// The leading dimensions of each head that rotary embeddings turn
    /// (`head_dim × partial_rotary_factor`; all of them by default).
    pub rotary_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    /// A per-head RMSNorm on q and k before rotary (Qwen3).
    pub qk_norm: bool,
    /// q, k and v as one projection, `qkv_proj` (Phi-3).
    pub fused_qkv: bool,
    /// The MLP's gate and up as one projection, `gate_up_proj` (Phi-3).
    pub fused_gate_up: bool,
    pub activation: Activation,
    /// RMSNorm scales by `1 + weight`, computed in f32 (Gemma).
    pub norm_offset: bool,
    /// Embeddings multiplied by √hidden (Gemma).
    pub embed_scale: bool,
    /// A norm after attention and around the MLP too (Gemma's
    /// `post_attention_layernorm`, `pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Attention scores soft-capped: `c·tanh(s/c)` (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Final logits soft-capped: `c·tanh(z/c)` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// The attention's scale when not `1/√head_dim` (Gemma's
    /// `query_pre_attn_scalar^-½`).
    pub attn_scale: Option<f64>,
    /// The rotary base and scaling of sliding-window layers when they have
    /// their own (Gemma 3's local base).
    pub local_rope: Option<(f64, RopeScaling)>,
    pub mlp_bias: bool,
    /// Per layer: `Some(w)` when that layer attends to the last `w` positions only.
    pub sliding_windows: Vec<Option<i64>>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// transformers builds the embedding with `padding_idx = pad_token_id`: that
    /// row receives no gradient from the input side. We do the same.
    pub pad_token_id: Option<i64>,
    /// The parsed `config.json`, kept so a saved checkpoint carries every key.
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawConfig {
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<i64>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<i64>,
    layer_types: Option<Vec<String>>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    rope_local_base_freq: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    attention_dropout: Option<f64>,
    resid_pdrop: Option<f64>,
    embd_pdrop: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = dpo_data::confined::read_to_string(&path).map_err(io_err(&path))?;
        Self::from_json(&text, &path)
    }

    /// Parses a `config.json` body; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let (raw_value, raw): (Value, RawConfig) = parse_config(text, path)?;
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let model_type = ModelType::of_json(&raw_value, path)?;
        let architecture = model_type
            .architecture()
            .ok_or_else(|| Error::UnsupportedModel {
                path: path.to_path_buf(),
                model_type: model_type.name().into(),
            })?;
        let need = |v: Option<i64>, key: &str| -> Result<i64> {
            match v {
                Some(v) if v > 0 => Ok(v),
                Some(v) => Err(bad(format!("{key} must be positive, found {v}"))),
                None => Err(bad(format!("missing key {key}"))),
            }
        };
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = need(
            raw.num_key_value_heads.or(Some(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => need(Some(d), "head_dim")?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(bad(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads \
                     ({num_attention_heads}) and head_dim is not given"
                )));
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim must be even for rotary embeddings, found {head_dim}"
            )));
        }
        let gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
        // Gemma names it hidden_activation (its hidden_act is a leftover).
        let (act_key, act) = match (&raw.hidden_activation, &raw.hidden_act) {
            (Some(a), _) if gemma => ("hidden_activation", Some(a.as_str())),
            (_, a) => ("hidden_act", a.as_deref()),
        };
        let activation = match act {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(bad(format!(
                    "{act_key} {other:?} is not supported (silu, gelu_pytorch_tanh)"
                )));
            }
        };
        if raw.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention = true is not supported: this is a causal LM".into(),
            ));
        }
        let softcap = |key: &str, v: Option<f64>| -> Result<Option<f64>> {
            match v {
                None => Ok(None),
                Some(c) if positive(c) => Ok(Some(c)),
                Some(c) => Err(bad(format!("{key} must be positive or null, found {c}"))),
            }
        };
        let (attn_softcap, final_softcap) = if gemma {
            (
                softcap("attn_logit_softcapping", raw.attn_logit_softcapping)?,
                softcap("final_logit_softcapping", raw.final_logit_softcapping)?,
            )
        } else {
            (None, None)
        };
        let attn_scale = match raw.query_pre_attn_scalar {
            Some(q) if gemma && positive(q) => Some(q.powf(-0.5)),
            Some(q) if gemma => {
                return Err(bad(format!(
                    "query_pre_attn_scalar must be positive, found {q}"
                )));
            }
            _ => None,
        };
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !positive(rms_norm_eps) {
            return Err(bad(format!(
                "rms_norm_eps must be positive, found {rms_norm_eps}"
            )));
        }

        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(2048);
        let (rope, local_rope) =
            rope_by_layer_type(&raw, architecture, max_position_embeddings, &bad)?;
        let rotary_dim = match rope.partial_rotary_factor {
            None => head_dim,
            Some(f) if f > 0.0 && f <= 1.0 => {
                // transformers: int(head_dim * partial_rotary_factor).
                let dim = (head_dim as f64 * f) as i64;
                if dim < 2 || dim % 2 != 0 {
                    return Err(bad(format!(
                        "partial_rotary_factor {f} of head_dim {head_dim} gives {dim} rotary dimensions: they must be even and at least 2"
                    )));
                }
                dim
            }
            Some(f) => {
                return Err(bad(format!(
                    "partial_rotary_factor must be in (0, 1], found {f}"
                )));
            }
        };
        let (rope_theta, rope_scaling) = (rope.theta, rope.scaling);
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope_scaling
        {
            let want = (rotary_dim / 2) as usize;
            for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if f.len() != want {
                    return Err(bad(format!(
                        "rope longrope: {name} has {} entries, the {rotary_dim} rotary dimensions need {want}",
                        f.len()
                    )));
                }
            }
        }
        // Dropout in the decoder is not implemented: a checkpoint that
        // trains with it is refused by the key, not trained without it.
        for (key, p) in [
            ("attention_dropout", raw.attention_dropout),
            ("resid_pdrop", raw.resid_pdrop),
            ("embd_pdrop", raw.embd_pdrop),
        ] {
            if let Some(p) = p.filter(|&p| p != 0.0) {
                return Err(bad(format!(
                    "{key} = {p} is not supported: the decoder trains without dropout (set it to 0.0)"
                )));
            }
        }

        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            // Qwen2 always has q/k/v biases and never an output bias.
            Architecture::Qwen2 => (true, false),
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen3 => {
                (attention_bias, attention_bias)
            }
            // Phi-3's projections have no biases.
            Architecture::Phi3 => (false, false),
            Architecture::Gemma2 | Architecture::Gemma3 => (attention_bias, attention_bias),
        };
        let sliding_windows = sliding_windows(architecture, &raw, num_hidden_layers, &bad)?;

        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias,
            o_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            fused_qkv: architecture == Architecture::Phi3,
            fused_gate_up: architecture == Architecture::Phi3,
            activation,
            norm_offset: gemma,
            embed_scale: gemma,
            sandwich_norms: gemma,
            attn_softcap,
            final_softcap,
            attn_scale,
            local_rope,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_windows,
            bos_token_id: raw.bos_token_id.as_ref().and_then(Value::as_i64),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            pad_token_id: raw
                .pad_token_id
                .as_ref()
                .and_then(Value::as_i64)
                .filter(|&id| (0..vocab_size).contains(&id)),
            raw: raw_value,
        })
    }

    /// Number of parameters, counting a tied embedding once.
    pub fn num_parameters(&self) -> i64 {
        let h = self.hidden_size;
        let kv = self.num_key_value_heads * self.head_dim;
        let q = self.num_attention_heads * self.head_dim;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * self.intermediate_size
            + if self.mlp_bias {
                2 * self.intermediate_size + h
            } else {
                0
            };
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers * layer + h + head
    }
}

/// A `config.json` body as JSON and as the typed keys a model reads (`T`);
/// `path` names the file in errors. Every model family's reader starts here.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<(Value, T)> {
    let raw: Value = serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let typed = serde_json::from_value(raw.clone()).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((raw, typed))
}

/// True for finite numbers above zero (false for NaN).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn token_ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

/// The rotary settings of a `config.json`.
struct RopeSettings {
    theta: f64,
    scaling: RopeScaling,
    partial_rotary_factor: Option<f64>,
}

/// The rotary settings of the global layers, and of the sliding-window ones
/// when they differ: transformers 5 writes Gemma 3's as `rope_parameters`
/// keyed by layer type; earlier files give the local base apart
/// (`rope_local_base_freq`).
fn rope_by_layer_type(
    raw: &RawConfig,
    arch: Architecture,
    max_position_embeddings: i64,
    bad: &dyn Fn(String) -> Error,
) -> Result<(RopeSettings, Option<(f64, RopeScaling)>)> {
    let by_type = raw
        .rope_parameters
        .as_ref()
        .and_then(Value::as_object)
        .filter(|o| o.get("full_attention").is_some_and(Value::is_object));
    if let Some(o) = by_type {
        let global = parse_rope(
            o.get("full_attention").cloned(),
            "rope_parameters.full_attention",
            raw,
            max_position_embeddings,
            bad,
        )?;
        let local = match o.get("sliding_attention") {
            Some(v @ Value::Object(_)) => {
                let l = parse_rope(
                    Some(v.clone()),
                    "rope_parameters.sliding_attention",
                    raw,
                    max_position_embeddings,
                    bad,
                )?;
                Some((l.theta, l.scaling))
            }
            _ => None,
        };
        return Ok((global, local));
    }
    // transformers 5 folds rope_theta into rope_parameters; older files keep them apart.
    let (params, key) = match (raw.rope_parameters.clone(), raw.rope_scaling.clone()) {
        (Some(p @ Value::Object(_)), _) => (Some(p), "rope_parameters"),
        (_, Some(s @ Value::Object(_))) => (Some(s), "rope_scaling"),
        (_, Some(Value::Null)) | (_, None) => (None, "rope_scaling"),
        (Some(Value::Null), _) => (None, "rope_parameters"),
        (Some(other), _) | (None, Some(other)) => {
            return Err(bad(format!(
                "rope settings must be an object, found {other}"
            )));
        }
    };
    let global = parse_rope(params, key, raw, max_position_embeddings, bad)?;
    let local = match (arch, raw.rope_local_base_freq) {
        (Architecture::Gemma3, base) => {
            let base = base.unwrap_or(10000.0);
            if !positive(base) {
                return Err(bad(format!(
                    "rope_local_base_freq must be positive, found {base}"
                )));
            }
            Some((base, RopeScaling::None))
        }
        _ => None,
    };
    Ok((global, local))
}

fn parse_rope(
    params: Option<Value>,
    key: &str,
    raw: &RawConfig,
    max_position_embeddings: i64,
    bad: &dyn Fn(String) -> Error,
) -> Result<RopeSettings> {
    let rope_theta = raw.rope_theta;
    let get = |name: &str| params.as_ref().and_then(|p| p.get(name));
    let num = |name: &str| -> Result<Option<f64>> {
        match get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(format!("{key}.{name} must be a number, found {v}"))),
        }
    };
    let theta = num("rope_theta")?.or(rope_theta).unwrap_or(10000.0);
    if !positive(theta) {
        return Err(bad(format!("rope_theta must be positive, found {theta}")));
    }
    let kind = get("rope_type")
        .or_else(|| get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || -> Result<f64> {
        match num("factor")? {
            Some(f) if f > 0.0 => Ok(f),
            Some(f) => Err(bad(format!("{key}.factor must be positive, found {f}"))),
            None => Err(bad(format!(
                "{key}.factor is required for rope_type {kind:?}"
            ))),
        }
    };
    let factors = |name: &str| -> Result<Vec<f64>> {
        let list = get(name).and_then(Value::as_array).ok_or_else(|| {
            bad(format!(
                "{key}.{name} is required for rope_type longrope (a list of numbers)"
            ))
        })?;
        list.iter()
            .map(|v| match v.as_f64() {
                Some(f) if positive(f) => Ok(f),
                _ => Err(bad(format!("{key}.{name}: {v} is not a positive number"))),
            })
            .collect()
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "longrope" | "su" => {
            let original = num("original_max_position_embeddings")?
                .or(raw.original_max_position_embeddings)
                .ok_or_else(|| {
                    bad(format!(
                        "{key}: rope_type longrope needs original_max_position_embeddings"
                    ))
                })?;
            if !positive(original) {
                return Err(bad(format!(
                    "original_max_position_embeddings must be positive, found {original}"
                )));
            }
            // As transformers: the factor is the context's growth unless given.
            let factor = num("factor")?.unwrap_or(max_position_embeddings as f64 / original);
            let attention_factor = match num("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => {
            let field = |name: &str| -> Result<f64> {
                num(name)?
                    .ok_or_else(|| bad(format!("{key}.{name} is required for rope_type llama3")))
            };
            let low = field("low_freq_factor")?;
            let high = field("high_freq_factor")?;
            if !positive(high - low) {
                return Err(bad(format!(
                    "{key}: high_freq_factor ({high}) must exceed low_freq_factor ({low})"
                )));
            }
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(bad(format!(
                "{key}: rope_type {other:?} is not supported (default, linear, llama3, longrope)"
            )));
        }
    };
    Ok(RopeSettings {
        theta,
        scaling,
        partial_rotary_factor: num("partial_rotary_factor")?.or(raw.partial_rotary_factor),
    })
}

fn sliding_windows(
    arch: Architecture,
    raw: &RawConfig,
    layers: i64,
    bad: &dyn Fn(String) -> Error,
) -> Result<Vec<Option<i64>>> {
    let n = layers as usize;
    if let Some(types) = &raw.layer_types {
        if types.len() != n {
            return Err(bad(format!(
                "layer_types has {} entries, num_hidden_layers is {layers}",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => raw.sliding_window.map(Some).ok_or_else(|| {
                    bad("layer_types names sliding_attention but sliding_window is null".into())
                }),
                other => Err(bad(format!(
                    "layer_types: unsupported layer type {other:?}"
                ))),
            })
            .collect();
    }
    Ok(match arch {
        // Phi-3: every layer, when the config has a window.
        Architecture::Mistral | Architecture::Phi3 => vec![raw.sliding_window; n],
        Architecture::Qwen2 | Architecture::Qwen3 if raw.use_sliding_window.unwrap_or(false) => {
            // Older Qwen2 configs: layers from max_window_layers on use the window.
            let first = raw.max_window_layers.unwrap_or(layers);
            (0..layers)
                .map(|i| if i >= first { raw.sliding_window } else { None })
                .collect()
        }
        Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Llama => vec![None; n],
        // Older Gemma 2 files: even layers slide, odd ones are global.
        Architecture::Gemma2 => (0..n)
            .map(|i| if i % 2 == 0 { raw.sliding_window } else { None })
            .collect(),
        // Older Gemma 3 files: five sliding layers, then a global one.
        Architecture::Gemma3 => (0..n)
            .map(|i| {
                if (i + 1) % 6 != 0 {
                    raw.sliding_window
                } else {
                    None
                }
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(json, Path::new("m/config.json"))
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2"#;

    #[test]
    fn legacy_and_v5_rope_spellings_agree() {
        let legacy = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0,
            "rope_scaling": {{"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .expect("legacy config parses");
        let v5 = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_type": "llama3",
            "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .expect("v5 config parses");
        assert_eq!(legacy.rope_theta, 500000.0);
        assert_eq!(legacy.rope_theta, v5.rope_theta);
        assert_eq!(legacy.rope_scaling, v5.rope_scaling);
        assert!(matches!(legacy.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(legacy.num_key_value_heads, 2, "defaults to the head count");
        assert_eq!(legacy.head_dim, 4);
    }

    #[test]
    fn every_model_type_is_named_once_and_knows_what_it_is() {
        for t in ModelType::ALL {
            assert_eq!(ModelType::parse(t.name()), Some(t));
            assert_eq!(t.is_encoder(), t.architecture().is_none(), "{t:?}");
        }
        assert_eq!(ModelType::parse("gpt2"), None);
        let path = Path::new("m/config.json");
        let missing = ModelType::of_json(&serde_json::json!({}), path).expect_err("no key");
        assert!(
            missing.to_string().contains("missing key model_type"),
            "{missing}"
        );
        let unknown =
            ModelType::of_json(&serde_json::json!({"model_type": "gpt2"}), path).expect_err("gpt2");
        assert!(
            matches!(unknown, Error::UnsupportedModel { .. }),
            "{unknown}"
        );
        // An encoder's config is not a causal LM's.
        let bert = r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}"#;
        let err = parse(bert).expect_err("bert is an encoder");
        assert!(err.to_string().contains("bert"), "{err}");
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let err =
            parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).expect_err("must be rejected");
        let msg = err.to_string();
        assert!(
            msg.contains("m/config.json") && msg.contains("\"gpt2\""),
            "{msg}"
        );
    }

    #[test]
    fn missing_and_bad_keys_are_named() {
        let msg = parse(r#"{"model_type": "llama", "vocab_size": 10}"#)
            .expect_err("must be rejected")
            .to_string();
        assert!(msg.contains("missing key hidden_size"), "{msg}");
        let msg = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "num_key_value_heads": 3}}"#
        ))
        .expect_err("must be rejected")
        .to_string();
        assert!(
            msg.contains("not a multiple of num_key_value_heads"),
            "{msg}"
        );
        let msg = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"type": "yarn", "factor": 4.0}}}}"#
        ))
        .expect_err("must be rejected")
        .to_string();
        assert!(msg.contains("\"yarn\" is not supported"), "{msg}");
        let msg = parse("{not json")
            .expect_err("must be rejected")
            .to_string();
        assert!(msg.starts_with("m/config.json: invalid JSON"), "{msg}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_layer_windows() {
        let c = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "sliding_window": 4,
            "layer_types": ["full_attention", "sliding_attention"]}}"#
        ))
        .expect("qwen2 parses");
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.sliding_windows, vec![None, Some(4)]);
    }

    #[test]
    fn phi3_fuses_projections_and_reads_longrope_and_partial_rotary() {
        let factors = |n: usize, x: f64| format!("[{}]", vec![x.to_string(); n].join(", "));
        let phi3 = |rope: &str, extra: &str| {
            parse(&format!(
                r#"{{"model_type": "phi3", "vocab_size": 10, "hidden_size": 64,
                "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 256, "original_max_position_embeddings": 16,
                "rope_scaling": {rope}{extra}}}"#
            ))
        };
        let c = phi3(
            &format!(
                r#"{{"type": "longrope", "short_factor": {}, "long_factor": {}}}"#,
                factors(6, 1.0),
                factors(6, 2.0)
            ),
            r#", "partial_rotary_factor": 0.75"#,
        )
        .expect("phi3 parses");
        assert!(c.fused_qkv && c.fused_gate_up && !c.qkv_bias);
        assert_eq!((c.head_dim, c.rotary_dim), (16, 12));
        match &c.rope_scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                attention_factor,
                ..
            } => {
                assert_eq!(*original_max_position_embeddings, 16.0);
                // As transformers: sqrt(1 + ln(256/16) / ln 16).
                assert!((attention_factor - 2f64.sqrt()).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        // Factors that do not fit the rotary dimensions, dropout: by key.
        let err = phi3(
            &format!(
                r#"{{"type": "longrope", "short_factor": {}, "long_factor": {}}}"#,
                factors(8, 1.0),
                factors(8, 2.0)
            ),
            r#", "partial_rotary_factor": 0.75"#,
        )
        .expect_err("8 factors for 12 dimensions")
        .to_string();
        assert!(err.contains("short_factor has 8 entries"), "{err}");
        let err = phi3("null", r#", "resid_pdrop": 0.1"#)
            .expect_err("dropout")
            .to_string();
        assert!(err.contains("resid_pdrop = 0.1 is not supported"), "{err}");
        let err = phi3(r#"{"type": "longrope", "short_factor": [1.0]}"#, "")
            .expect_err("no long factors")
            .to_string();
        assert!(err.contains("long_factor is required"), "{err}");
    }

    #[test]
    fn parameter_count_matches_hand_count() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "tie_word_embeddings": true}}"#
        ))
        .expect("parses");
        // embed 80 + 2 layers * (attn 4*64 + mlp 3*128 + norms 16) + final norm 8
        assert_eq!(c.num_parameters(), 80 + 2 * (256 + 384 + 16) + 8);
    }
}
