//! The layers every model is built from (candle-nn's place in candle): the
//! parameter registration (with the empty, deferred form ZeRO stage 3's
//! sharded layers use), [`Linear`] (optionally biased, carrying a LoRA
//! adapter in PEFT's form), [`RmsNorm`] and [`LayerNorm`]. A model file holds
//! its architecture only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::Path;
use tch::{Device, Kind, Tensor};

pub(crate) type TchResult<T> = std::result::Result<T, tch::TchError>;

/// Parameters registered empty, by name, with the shapes they will have.
pub(crate) type Deferred = Option<Vec<(String, Vec<i64>)>>;

thread_local! {
    /// While building a model whose decoder layers are sharded (ZeRO stage 3),
    /// their parameters are registered empty and their shapes noted here.
    static DEFERRED: std::cell::RefCell<Deferred> = const { std::cell::RefCell::new(None) };
}

/// Registers a parameter of the given shape at `name` under `p` (dots in
/// `name` are path levels, as in a state-dict name): zero-filled until a
/// checkpoint is loaded; empty, its shape noted, while building sharded
/// layers ([`defer_parameters`]).
pub(crate) fn param(p: &Path, name: &str, dims: &[i64], kind: Kind) -> TchResult<Tensor> {
    let mut parts: Vec<&str> = name.split('.').collect();
    let leaf = parts.pop().unwrap_or(name);
    let mut at = p.clone();
    for part in parts {
        at = at.sub(part);
    }
    let deferred = DEFERRED.with(|d| {
        d.borrow_mut().as_mut().map(|list| {
            list.push((at.path(leaf), dims.to_vec()));
        })
    });
    let shape: &[i64] = if deferred.is_some() { &[0] } else { dims };
    let t = Tensor::f_zeros(shape, (kind, at.device()))?;
    Ok(at.add(leaf, t, true))
}

/// From now on (on this thread), [`param`] registers parameters empty and
/// notes their names and shapes, until [`take_deferred`].
pub(crate) fn defer_parameters() {
    DEFERRED.with(|d| *d.borrow_mut() = Some(Vec::new()));
}

/// The parameters registered empty since [`defer_parameters`], by name with
/// their shapes; [`param`] allocates them again.
pub(crate) fn take_deferred() -> Deferred {
    DEFERRED.with(|d| d.borrow_mut().take())
}

/// A linear layer `x Wᵀ + b` (the bias optional), which can carry a LoRA
/// adapter; freezing is the parameters' own (`requires_grad`).
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    /// `(out, in)`: the weight's shape (also while it is sharded away).
    pub(crate) shape: (i64, i64),
    pub(crate) bias: Option<Tensor>,
    /// A LoRA adapter on this layer, when one targets it.
    pub(crate) lora: Option<Lora>,
}

/// A low-rank adapter (PEFT's LoRA): `x ↦ dropout(x) Aᵀ Bᵀ · alpha / r`, added
/// to the frozen layer's output. Its weights are f32 whatever the base's dtype
/// (PEFT's `autocast_adapter_dtype`): the input is cast to f32 and the result
/// back.
#[derive(Debug)]
pub(crate) struct Lora {
    /// `[r, in]`.
    pub(crate) a: Tensor,
    /// `[out, r]`.
    pub(crate) b: Tensor,
    pub(crate) scaling: f64,
    pub(crate) dropout: f64,
    /// The model's switch: off for the reference ("the base with adapters off").
    pub(crate) on: Arc<AtomicBool>,
}

impl Linear {
    pub(crate) fn new(
        p: Path,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        kind: Kind,
    ) -> TchResult<Self> {
        Ok(Linear {
            weight: param(&p, "weight", &[out_dim, in_dim], kind)?,
            shape: (out_dim, in_dim),
            bias: if bias {
                Some(param(&p, "bias", &[out_dim], kind)?)
            } else {
                None
            },
            lora: None,
        })
    }

    /// A layer with a bias (BERT's, RoBERTa's).
    pub(crate) fn biased(p: Path, in_dim: i64, out_dim: i64, kind: Kind) -> TchResult<Self> {
        Self::new(p, in_dim, out_dim, true, kind)
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> TchResult<Tensor> {
        let base = xs.f_linear(&self.weight, self.bias.as_ref())?;
        let Some(l) = self.lora.as_ref().filter(|l| l.on.load(Ordering::Relaxed)) else {
            return Ok(base);
        };
        let mut x = xs.f_to_kind(Kind::Float)?;
        if l.dropout > 0.0 && grad_enabled() {
            x = x.f_dropout(l.dropout, true)?;
        }
        let delta = x
            .f_linear(&l.a, None::<&Tensor>)?
            .f_linear(&l.b, None::<&Tensor>)?
            .f_mul_scalar(l.scaling)?;
        base.f_add(&delta.f_to_kind(base.kind())?)
    }

    /// Gives this layer a LoRA adapter under `path` (`lora_A.weight`,
    /// `lora_B.weight`, f32), initialised as PEFT's `init_lora_weights`
    /// says: A random (from the caller's seed), B zero, so the layer starts
    /// as its base. `on` is the model's switch for all its adapters.
    pub(crate) fn attach_lora(
        &mut self,
        path: &Path,
        spec: &dpo_proto::LoraSpec,
        on: Arc<AtomicBool>,
    ) -> TchResult<()> {
        let (out_dim, in_dim) = self.shape;
        let r = spec.r as i64;
        let device = path.device();
        let a = match spec.init {
            dpo_proto::LoraInit::Default => {
                // kaiming_uniform_(a = √5): bound = 1/√in.
                let bound = 1.0 / (in_dim as f64).sqrt();
                Tensor::f_rand([r, in_dim], (Kind::Float, device))?
                    .f_mul_scalar(2.0 * bound)?
                    .f_sub_scalar(bound)?
            }
            dpo_proto::LoraInit::Gaussian => {
                Tensor::f_randn([r, in_dim], (Kind::Float, device))?.f_mul_scalar(1.0 / r as f64)?
            }
        };
        let b = Tensor::f_zeros([out_dim, r], (Kind::Float, device))?;
        self.lora = Some(Lora {
            a: (path / "lora_A").add("weight", a, true),
            b: (path / "lora_B").add("weight", b, true),
            scaling: spec.scaling(),
            dropout: spec.dropout,
            on,
        });
        Ok(())
    }

    /// `W + B A · scaling` (the adapter folded in), in the weight's dtype.
    pub(crate) fn merged_weight(&self) -> TchResult<Option<Tensor>> {
        let Some(l) = &self.lora else {
            return Ok(None);
        };
        let _guard = tch::no_grad_guard();
        let delta = l.b.f_matmul(&l.a)?.f_mul_scalar(l.scaling)?;
        Ok(Some(
            self.weight
                .f_to_kind(Kind::Float)?
                .f_add(&delta)?
                .f_to_kind(self.weight.kind())?,
        ))
    }
}

/// Whether autograd records operations here (not under `no_grad`).
pub(crate) fn grad_enabled() -> bool {
    Tensor::f_ones([1], (Kind::Float, Device::Cpu))
        .map(|t| t.set_requires_grad(true))
        .and_then(|t| t.f_mul_scalar(1.0))
        .is_ok_and(|t| t.requires_grad())
}

/// Gives a LoRA adapter (under `root`, at each site's parameter path) to
/// every site whose module name `spec.target_modules` lists: the one loop
/// both model families add their adapters with. Returns how many it added.
pub(crate) fn attach_lora_to<'a>(
    sites: impl IntoIterator<Item = (&'static str, String, &'a mut Linear)>,
    root: &Path,
    spec: &dpo_proto::LoraSpec,
    on: &Arc<AtomicBool>,
) -> TchResult<usize> {
    let targets = spec.target_modules.names();
    let mut added = 0usize;
    for (module, prefix, linear) in sites {
        if !targets.iter().any(|t| t == module) {
            continue;
        }
        let mut path = root.clone();
        for part in prefix.split('.') {
            path = &path / part;
        }
        linear.attach_lora(&path, spec, on.clone())?;
        added += 1;
    }
    Ok(added)
}

/// RMSNorm as the Llama family has it.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Gemma's: scales by `1 + weight`, in f32, and casts after.
    offset: bool,
}

impl RmsNorm {
    pub(crate) fn new(p: Path, dim: i64, eps: f64, kind: Kind) -> TchResult<Self> {
        Ok(RmsNorm {
            weight: param(&p, "weight", &[dim], kind)?,
            eps,
            offset: false,
        })
    }

    /// The RMSNorm a decoder's config asks for (Gemma's scales by
    /// `1 + weight`).
    pub(crate) fn of(
        p: Path,
        dim: i64,
        cfg: &crate::model::config::ModelConfig,
        kind: Kind,
    ) -> TchResult<Self> {
        let mut norm = Self::new(p, dim, cfg.rms_norm_eps, kind)?;
        norm.offset = cfg.norm_offset;
        Ok(norm)
    }

    /// Normalises in f32 as transformers does: Llama's casts back before
    /// scaling by the weight; Gemma's scales by `1 + weight` in f32, then
    /// casts.
    pub(crate) fn forward(&self, xs: &Tensor) -> TchResult<Tensor> {
        let kind = xs.f_kind()?;
        let x = xs.f_to_kind(Kind::Float)?;
        let variance = x
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(-1, true, Kind::Float)?;
        let normed = x.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        if self.offset {
            let scale = self.weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?;
            return normed.f_mul(&scale)?.f_to_kind(kind);
        }
        self.weight.f_mul(&normed.f_to_kind(kind)?)
    }
}

/// LayerNorm with weight and bias, as BERT and RoBERTa have it.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub(crate) fn new(p: Path, dim: i64, eps: f64, kind: Kind) -> TchResult<Self> {
        Self::with_bias(p, dim, eps, true, kind)
    }

    /// A LayerNorm with or without its bias (ModernBERT's `norm_bias`).
    pub(crate) fn with_bias(
        p: Path,
        dim: i64,
        eps: f64,
        bias: bool,
        kind: Kind,
    ) -> TchResult<Self> {
        let weight = param(&p, "weight", &[dim], kind)?;
        let bias = if bias {
            Some(param(&p, "bias", &[dim], kind)?)
        } else {
            None
        };
        Ok(LayerNorm {
            weight,
            bias,
            eps,
            dim,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> TchResult<Tensor> {
        x.f_layer_norm(
            [self.dim],
            Some(&self.weight),
            self.bias.as_ref(),
            self.eps,
            true,
        )
    }
}
