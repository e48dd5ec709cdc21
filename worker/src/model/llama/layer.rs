//! One decoder layer: attention and MLP around their norms and residuals.

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::attention::{Angles, Attention, LayerCache, Qkv};
use super::masks::Masks;
use crate::error::{Result, TorchContext};
use crate::model::config::{Activation, ModelConfig};
use crate::model::layers::{Linear, RmsNorm, TchResult};

/// The MLP's gate and up: two projections, or one (`gate_up_proj`, Phi-3)
/// whose output is the gate, then up.
#[derive(Debug)]
enum GateUp {
    Separate { gate_proj: Linear, up_proj: Linear },
    Fused(Linear),
}

#[derive(Debug)]
pub(super) struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
    intermediate: i64,
    activation: Activation,
}

impl Mlp {
    fn new(p: Path, cfg: &ModelConfig, kind: Kind) -> TchResult<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gate_up = if cfg.fused_gate_up {
            GateUp::Fused(Linear::new(&p / "gate_up_proj", h, 2 * i, bias, kind)?)
        } else {
            GateUp::Separate {
                gate_proj: Linear::new(&p / "gate_proj", h, i, bias, kind)?,
                up_proj: Linear::new(&p / "up_proj", h, i, bias, kind)?,
            }
        };
        Ok(Mlp {
            gate_up,
            down_proj: Linear::new(&p / "down_proj", i, h, bias, kind)?,
            intermediate: i,
            activation: cfg.activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> TchResult<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (gate_proj.forward(xs)?, up_proj.forward(xs)?)
            }
            GateUp::Fused(gate_up_proj) => {
                let both = gate_up_proj.forward(xs)?;
                (
                    both.f_narrow(-1, 0, self.intermediate)?,
                    both.f_narrow(-1, self.intermediate, self.intermediate)?,
                )
            }
        };
        let gate = match self.activation {
            Activation::Silu => gate.f_silu()?,
            Activation::GeluTanh => gate.f_gelu("tanh")?,
        };
        self.down_proj.forward(&gate.f_mul(&up)?)
    }
}

impl DecoderLayer {
    /// The layer's linear layers: PEFT's module name, the path below the
    /// layer, the layer.
    pub(super) fn linears(&self) -> Vec<(&'static str, &'static str, &Linear)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let mut out = Vec::with_capacity(7);
        match &a.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => {
                out.push(("q_proj", "self_attn.q_proj", q_proj));
                out.push(("k_proj", "self_attn.k_proj", k_proj));
                out.push(("v_proj", "self_attn.v_proj", v_proj));
            }
            Qkv::Fused(l) => out.push(("qkv_proj", "self_attn.qkv_proj", l)),
        }
        out.push(("o_proj", "self_attn.o_proj", &a.o_proj));
        match &m.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                out.push(("gate_proj", "mlp.gate_proj", gate_proj));
                out.push(("up_proj", "mlp.up_proj", up_proj));
            }
            GateUp::Fused(l) => out.push(("gate_up_proj", "mlp.gate_up_proj", l)),
        }
        out.push(("down_proj", "mlp.down_proj", &m.down_proj));
        out
    }

    /// [`DecoderLayer::linears`], to change.
    pub(super) fn linears_mut(&mut self) -> Vec<(&'static str, &'static str, &mut Linear)> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let mut out = Vec::with_capacity(7);
        match &mut a.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => {
                out.push(("q_proj", "self_attn.q_proj", q_proj));
                out.push(("k_proj", "self_attn.k_proj", k_proj));
                out.push(("v_proj", "self_attn.v_proj", v_proj));
            }
            Qkv::Fused(l) => out.push(("qkv_proj", "self_attn.qkv_proj", l)),
        }
        out.push(("o_proj", "self_attn.o_proj", &mut a.o_proj));
        match &mut m.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                out.push(("gate_proj", "mlp.gate_proj", gate_proj));
                out.push(("up_proj", "mlp.up_proj", up_proj));
            }
            GateUp::Fused(l) => out.push(("gate_up_proj", "mlp.gate_up_proj", l)),
        }
        out.push(("down_proj", "mlp.down_proj", &mut m.down_proj));
        out
    }
}

/// Gemma's extra norms: after attention (before its residual), before
/// and after the MLP. (Its `post_attention_layernorm` is the first of these;
/// a Llama's is the norm before the MLP.)
#[derive(Debug)]
pub(super) struct Sandwich {
    pub(super) pre_feedforward_layernorm: RmsNorm,
    pub(super) post_feedforward_layernorm: RmsNorm,
}

#[derive(Debug)]
pub(super) struct DecoderLayer {
    pub(super) self_attn: Attention,
    pub(super) mlp: Mlp,
    pub(super) input_layernorm: RmsNorm,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) sandwich: Option<Sandwich>,
    pub(super) sliding_window: Option<i64>,
}

impl DecoderLayer {
    pub(super) fn new(p: Path, cfg: &ModelConfig, index: usize, kind: Kind) -> TchResult<Self> {
        let h = cfg.hidden_size;
        let sandwich = if cfg.sandwich_norms {
            Some(Sandwich {
                pre_feedforward_layernorm: RmsNorm::of(
                    &p / "pre_feedforward_layernorm",
                    h,
                    cfg,
                    kind,
                )?,
                post_feedforward_layernorm: RmsNorm::of(
                    &p / "post_feedforward_layernorm",
                    h,
                    cfg,
                    kind,
                )?,
            })
        } else {
            None
        };
        Ok(DecoderLayer {
            self_attn: Attention::new(&p / "self_attn", cfg, kind)?,
            mlp: Mlp::new(&p / "mlp", cfg, kind)?,
            input_layernorm: RmsNorm::of(&p / "input_layernorm", h, cfg, kind)?,
            post_attention_layernorm: RmsNorm::of(&p / "post_attention_layernorm", h, cfg, kind)?,
            sandwich,
            sliding_window: cfg.sliding_windows.get(index).copied().flatten(),
        })
    }

    pub(super) fn forward(
        &self,
        xs: &Tensor,
        angles: &Angles,
        masks: &Masks,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let sliding = self.sliding_window.is_some();
        let mask = if sliding {
            &masks.windowed
        } else {
            &masks.full
        };
        let normed = self.input_layernorm.forward(xs).op("input_layernorm")?;
        let attn = self.self_attn.forward(
            &normed,
            angles.of(sliding),
            mask,
            cache,
            self.sliding_window,
            masks.unpadded.as_ref(),
        )?;
        let Some(sandwich) = &self.sandwich else {
            let h = xs.f_add(&attn).op("attention residual")?;
            let normed = self
                .post_attention_layernorm
                .forward(&h)
                .op("post_attention_layernorm")?;
            return h
                .f_add(&self.mlp.forward(&normed).op("mlp")?)
                .op("mlp residual");
        };
        let attn = self
            .post_attention_layernorm
            .forward(&attn)
            .op("post_attention_layernorm")?;
        let h = xs.f_add(&attn).op("attention residual")?;
        let normed = sandwich
            .pre_feedforward_layernorm
            .forward(&h)
            .op("pre_feedforward_layernorm")?;
        let out = self.mlp.forward(&normed).op("mlp")?;
        let out = sandwich
            .post_feedforward_layernorm
            .forward(&out)
            .op("post_feedforward_layernorm")?;
        h.f_add(&out).op("mlp residual")
    }
}
