//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5) on libtorch.
//!
//! One implementation serves the three: they differ only in what `config.json`
//! declares (biases, tied embeddings, sliding windows). Parameter paths equal the
//! safetensors names (`model.layers.0.self_attn.q_proj.weight`), so checkpoints load
//! and save without renaming. Activations follow transformers' dtype conventions
//! (RMSNorm in f32, RoPE angles in f32) so that results agree with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

mod adapters;
mod attention;
mod layer;
mod masks;
mod sharded;
mod staged;

pub use adapters::AdaptersOff;
use attention::Angles;
pub use attention::{KvCache, LayerCache};
use layer::DecoderLayer;
use masks::{AttentionMask, Masks, Unpadded};
pub use sharded::LayerGather;
use sharded::ShardedBase;
pub use staged::{Checkpointed, LayerGrads};

use super::config::ModelConfig;
use super::layers::{self, Linear, RmsNorm, TchResult, param};
use super::rope::Rope;
use super::stack;
use crate::error::{Result, TorchContext};

pub(crate) use super::layers::grad_enabled;

/// A causal language model of the Llama family.
#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    kind: Kind,
    vs: VarStore,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    /// The sliding-window layers' own rotary base (Gemma 3).
    local_rope: Option<Rope>,
    /// Positions whose logits exist at once when scoring ([`CausalLm::head_logps`]).
    head_chunk: i64,
    /// Keep only each layer's input in a training forward; recompute in the
    /// backward ([`CausalLm::backward_checkpointed`]).
    gradient_checkpointing: bool,
    /// Run the layers on a padded batch's real tokens only ([`Unpadded`]).
    unpad: bool,
    /// Without checkpointing: still run the layers' backward one layer at a
    /// time (each layer's graph kept, from a leaf copy of its input), so that
    /// a layer's gradients exist before the layers below it run (ZeRO stage 2).
    staged: bool,
    /// LoRA adapters ([`CausalLm::add_lora`]): their own store, named as the
    /// base's parameters are (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    adapters: Option<(VarStore, dpo_proto::LoraSpec)>,
    /// Whether the adapters take part in the forward.
    adapters_on: Arc<AtomicBool>,
    /// ZeRO stage 3: the decoder layers' frozen parameters, sharded.
    sharded: Option<ShardedBase>,
}

/// Positions per LM-head chunk unless a run says otherwise (`train.head_chunk_tokens`).
pub const DEFAULT_HEAD_CHUNK: i64 = 1024;

impl CausalLm {
    /// Builds the model with zero-filled parameters of dtype `kind` on `device`;
    /// `checkpoint::load` fills them.
    pub fn new(config: ModelConfig, kind: Kind, device: Device) -> Result<Self> {
        Self::build(config, kind, device, false)
    }

    /// [`CausalLm::new`] for ZeRO stage 3: the decoder layers' parameters hold
    /// nothing until [`CausalLm::shard_base`] gives this rank its share.
    pub fn new_sharded(config: ModelConfig, kind: Kind, device: Device) -> Result<Self> {
        Self::build(config, kind, device, true)
    }

    fn build(config: ModelConfig, kind: Kind, device: Device, shard: bool) -> Result<Self> {
        let vs = VarStore::new(device);
        let deferred_layers: std::cell::RefCell<layers::Deferred> = std::cell::RefCell::new(None);
        let root = vs.root();
        let build = || -> TchResult<(Tensor, Vec<DecoderLayer>, RmsNorm, Tensor)> {
            let model = &root / "model";
            let embed_tokens = param(
                &(&model / "embed_tokens"),
                "weight",
                &[config.vocab_size, config.hidden_size],
                kind,
            )?;
            if shard {
                layers::defer_parameters();
            }
            let layers = (0..config.num_hidden_layers as usize)
                .map(|i| DecoderLayer::new(&model / "layers" / i, &config, i, kind))
                .collect::<TchResult<Vec<_>>>();
            // Only the decoder layers are sharded.
            *deferred_layers.borrow_mut() = layers::take_deferred();
            let layers = layers?;
            let norm = RmsNorm::of(&model / "norm", config.hidden_size, &config, kind)?;
            let lm_head = if config.tie_word_embeddings {
                embed_tokens.shallow_clone()
            } else {
                param(
                    &(&root / "lm_head"),
                    "weight",
                    &[config.vocab_size, config.hidden_size],
                    kind,
                )?
            };
            Ok((embed_tokens, layers, norm, lm_head))
        };
        let built = build();
        layers::take_deferred();
        let deferred = deferred_layers.take();
        let (embed_tokens, layers, norm, lm_head) = built.op("allocating parameters")?;
        let sharded = match deferred {
            Some(list) => {
                let vars = vs.variables();
                let mut per_layer: Vec<Vec<(String, Vec<i64>, Tensor)>> =
                    (0..layers.len()).map(|_| Vec::new()).collect();
                for (name, shape) in list {
                    let layer = crate::zero::layer_of(&name).filter(|&l| l < per_layer.len());
                    if let (Some(l), Some(t)) = (layer, vars.get(&name)) {
                        let _ = t.set_requires_grad(false);
                        per_layer[l].push((name, shape, t.shallow_clone()));
                    }
                }
                for l in &mut per_layer {
                    l.sort_by(|a, b| a.0.cmp(&b.0));
                }
                Some(ShardedBase {
                    shards: per_layer.iter().map(|_| None).collect(),
                    layers: per_layer,
                    world: 0,
                    rank: 0,
                    lent: std::sync::Mutex::new(None),
                })
            }
            None => None,
        };
        let rope = Rope::new(
            config.rotary_dim,
            config.rope_theta,
            &config.rope_scaling,
            device,
        )?;
        let local_rope = match &config.local_rope {
            Some((theta, scaling)) => Some(Rope::new(config.rotary_dim, *theta, scaling, device)?),
            None => None,
        };
        Ok(CausalLm {
            config,
            kind,
            vs,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            local_rope,
            head_chunk: DEFAULT_HEAD_CHUNK,
            gradient_checkpointing: false,
            staged: false,
            unpad: true,
            adapters: None,
            adapters_on: Arc::new(AtomicBool::new(true)),
            sharded,
        })
    }

    /// Positions whose logits [`CausalLm::head_logps`] computes at once (0: all).
    pub fn set_head_chunk(&mut self, positions: usize) {
        self.head_chunk = i64::try_from(positions).unwrap_or(i64::MAX);
    }

    /// Log-probs `[n]` of `targets` given the final hidden states `rows`
    /// (`[n, hidden]`), at most `head_chunk` positions' logits at a time; see
    /// [`crate::logps::head_logps`] for the deferred backward it may return.
    pub fn head_logps(
        &self,
        rows: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, Option<crate::logps::HeadGrad>)> {
        crate::logps::head_logps(
            rows,
            &self.lm_head,
            targets,
            self.head_chunk,
            self.config.final_softcap,
        )
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
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

    /// Logits `[batch, seq, vocab]` in the model's dtype.
    ///
    /// `attention_mask` (`[batch, seq]`, 1 = token, 0 = padding) may pad on either side;
    /// positions count real tokens only, as transformers derives them for padded
    /// batches. Without a mask every token is real.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (positions, masks) = self.padded_layout(input_ids, attention_mask)?;
        let (hidden, _) = self.run_layers(input_ids, &positions, masks, false)?;
        // `forward` keeps plain autograd whatever the training mode.
        self.lm_head(&hidden)
    }

    /// Final hidden states `[batch, seq, hidden]` (after the last norm). With
    /// gradient checkpointing on (and autograd on), the layers' backward is
    /// deferred: run [`CausalLm::backward_checkpointed`] with the returned
    /// [`Checkpointed`] once the hidden states' gradient is in.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Checkpointed>)> {
        let (positions, mut masks) = self.padded_layout(input_ids, attention_mask)?;
        if self.unpad {
            masks.unpadded = Unpadded::of(attention_mask).op("forward: real tokens")?;
        }
        self.run_layers(input_ids, &positions, masks, true)
    }

    /// RoPE positions and attention masks of right- or left-padded rows.
    fn padded_layout(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Masks)> {
        let (b, l) = input_ids
            .size2()
            .op("forward: input_ids must be [batch, seq]")?;
        let device = self.device();
        let positions = match attention_mask {
            Some(m) => m
                .f_to_kind(Kind::Int64)
                .and_then(|m| m.f_cumsum(-1, Kind::Int64))
                .and_then(|c| c.f_sub_scalar(1))
                .and_then(|c| c.f_clamp_min(0))
                .op("forward: positions")?,
            None => Tensor::f_arange(l, (Kind::Int64, device))
                .and_then(|p| p.f_unsqueeze(0))
                .and_then(|p| p.f_expand([b, l], false))
                .op("forward: positions")?,
        };
        let masks = self
            .masks(b, l, attention_mask)
            .op("forward: attention mask")?;
        Ok((positions, masks))
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let padding_idx = self.config.pad_token_id.unwrap_or(-1);
        let xs = Tensor::f_embedding(&self.embed_tokens, input_ids, padding_idx, false, false)
            .op("embed_tokens")?;
        if !self.config.embed_scale {
            return Ok(xs);
        }
        // Gemma: × √hidden, the factor rounded to the weights' dtype first
        // (as transformers does: 55.4256 is 55.5 in bf16).
        let scale = Tensor::from((self.config.hidden_size as f64).sqrt() as f32)
            .f_to_kind(self.kind)
            .and_then(|s| s.f_to_device(xs.device()))
            .op("embedding scale")?;
        xs.f_mul(&scale).op("embedding scale")
    }

    /// The rotary angles at `positions`: the global layers', and the
    /// sliding-window layers' when they have a base of their own.
    fn angles(&self, positions: &Tensor) -> Result<Angles> {
        let (cos, sin) = self.rope.cos_sin(positions, self.kind)?;
        let local = match &self.local_rope {
            Some(r) => Some(r.cos_sin(positions, self.kind)?),
            None => None,
        };
        Ok(Angles { cos, sin, local })
    }

    /// Embedding, every decoder layer and the final norm, at RoPE `positions`.
    /// With `deferred` (and autograd on) the training mode applies: with
    /// gradient checkpointing the layers run without a graph and only each
    /// layer's input is kept; staged, each layer runs on a leaf copy of its
    /// input and keeps its graph. Either way the final norm runs on a leaf copy
    /// of the last layer's output, whose gradient
    /// [`CausalLm::backward_checkpointed`] carries down one layer at a time.
    fn run_layers(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        masks: Masks,
        deferred: bool,
    ) -> Result<(Tensor, Option<Checkpointed>)> {
        let angles = self.angles(positions)?;
        let autograd = grad_enabled();
        let recompute = self.gradient_checkpointing;
        // Unpadded, the layers see only the real tokens; the final hidden
        // states are padded back to `[batch, seq, hidden]` (zeros at padding).
        let input_ids = match &masks.unpadded {
            Some(u) => u.ids(input_ids).op("forward: real tokens")?,
            None => input_ids.shallow_clone(),
        };
        let input_ids = &input_ids;
        let finish = |hidden: Tensor| -> Result<Tensor> {
            match &masks.unpadded {
                Some(u) => u.pad(&hidden).op("forward: pad hidden states"),
                None => Ok(hidden),
            }
        };
        if !(deferred && autograd && (recompute || self.staged)) {
            let mut xs = self.embed(input_ids)?;
            for i in 0..self.layers.len() {
                xs = self.layer_forward(i, &xs, &angles, &masks, None)?;
            }
            let hidden = finish(self.norm.forward(&xs).op("norm")?)?;
            return Ok((hidden, None));
        }
        // The embedding is run again in the backward (it is cheap).
        let xs = {
            let _guard = tch::no_grad_guard();
            self.embed(input_ids)?
        };
        let keep = if recompute {
            stack::Keep::Inputs
        } else {
            stack::Keep::Graphs
        };
        let (top, stacked) = stack::forward(self.layers.len(), xs, keep, false, &mut |i, x| {
            self.layer_forward(i, x, &angles, &masks, None)
        })?;
        let Some(layers) = stacked else {
            return Err(crate::error::Error::State("a stacked forward kept nothing"));
        };
        let hidden = finish(self.norm.forward(&top).op("norm")?)?;
        Ok((
            hidden,
            Some(Checkpointed {
                input_ids: input_ids.shallow_clone(),
                layers,
                angles,
                masks,
            }),
        ))
    }

    /// Turns gradient checkpointing on or off for [`CausalLm::hidden_states`]
    /// and [`CausalLm::hidden_states_packed`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Runs decoder layer `i`; under ZeRO stage 3 its parameters are
    /// gathered from the ranks first and dropped after.
    fn layer_forward(
        &self,
        i: usize,
        xs: &Tensor,
        angles: &Angles,
        masks: &Masks,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let Some(sh) = &self.sharded else {
            return self.layers[i].forward(xs, angles, masks, cache);
        };
        sh.gather(i)?;
        let out = self.layers[i].forward(xs, angles, masks, cache);
        sh.release(i)?;
        out
    }

    /// Whether [`CausalLm::hidden_states`] runs the layers on a padded
    /// batch's real tokens only (on by default; off computes on the padding
    /// too, with the same results for the real tokens).
    pub fn set_unpadding(&mut self, on: bool) {
        self.unpad = on;
    }

    /// Final hidden states `[batch, seq, hidden]` of packed rows, where several
    /// sequences share a row: `positions` (`[batch, seq]` int64) are each token's
    /// RoPE positions within its own sequence, and `allowed` (`[batch, seq, seq]`
    /// bool) says which keys each query may attend to (it must include the query
    /// itself). Sliding-window layers also drop keys `w` or more positions back,
    /// measured in `positions`, exactly as in the unpacked sequence.
    pub fn hidden_states_packed(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        allowed: &Tensor,
    ) -> Result<(Tensor, Option<Checkpointed>)> {
        let (b, l) = input_ids
            .size2()
            .op("forward_packed: input_ids must be [batch, seq]")?;
        let window = self.config.sliding_windows.iter().flatten().copied().min();
        let masks = (|| -> TchResult<Masks> {
            let full = allowed.f_view([b, 1, l, l])?;
            let windowed = match window {
                Some(w) => {
                    let q = positions.f_view([b, 1, l, 1])?;
                    let k = positions.f_view([b, 1, 1, l])?;
                    AttentionMask::Explicit(full.f_logical_and(&q.f_sub(&k)?.f_lt(w)?)?)
                }
                None => AttentionMask::Explicit(full.shallow_clone()),
            };
            Ok(Masks {
                full: AttentionMask::Explicit(full),
                windowed,
                unpadded: None,
            })
        })()
        .op("forward_packed: attention mask")?;
        self.run_layers(input_ids, positions, masks, true)
    }

    /// Logits of final hidden states (`[..., hidden]` → `[..., vocab]`).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = hidden
            .f_linear(&self.lm_head, None::<&Tensor>)
            .op("lm_head")?;
        match self.config.final_softcap {
            Some(cap) => crate::logps::softcap(&logits, cap).op("final logit soft-capping"),
            None => Ok(logits),
        }
    }

    /// An empty KV cache for [`CausalLm::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: self.layers.iter().map(|_| LayerCache::default()).collect(),
            len: 0,
            tokens: Vec::new(),
        }
    }

    /// Logits `[1, n, vocab]` of `input_ids` (`[1, n]`) continuing the sequence held
    /// in `cache`: the whole prompt first (any `n`), then one token at a time.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, n) = input_ids
            .size2()
            .op("forward_cached: input_ids must be [1, seq]")?;
        if b != 1 || (cache.len > 0 && n != 1) {
            return Err(crate::error::Error::Input {
                context: "forward_cached".into(),
                reason: format!(
                    "expects one sequence, then one token per call; got [{b}, {n}] after {} cached positions",
                    cache.len
                ),
            });
        }
        if cache.len > 0 && self.rope.is_long(cache.len + n) && !self.rope.is_long(cache.len) {
            // LongRoPE: the sequence just grew past the original context, so
            // every position now turns with the long factors — the cached
            // keys too. Run the whole sequence again, as a forward of it
            // would.
            let mut all = std::mem::take(&mut cache.tokens);
            all.extend(token_ids(input_ids)?);
            let whole = Tensor::f_from_slice(&all)
                .and_then(|t| t.f_view([1, -1]))
                .and_then(|t| t.f_to_device(self.device()))
                .op("forward_cached: the sequence again")?;
            *cache = self.new_cache();
            let logits = self.forward_cached(&whole, cache)?;
            let total = logits.size()[1];
            return logits
                .f_narrow(1, total - n, n)
                .op("forward_cached: the new positions");
        }
        let positions =
            Tensor::f_arange_start(cache.len, cache.len + n, (Kind::Int64, self.device()))
                .and_then(|p| p.f_unsqueeze(0))
                .op("forward_cached: positions")?;
        let masks = if cache.len == 0 {
            self.masks(1, n, None).op("forward_cached: mask")?
        } else {
            Masks {
                full: AttentionMask::All,
                windowed: AttentionMask::All,
                unpadded: None,
            }
        };
        let angles = self.angles(&positions)?;
        let mut xs = self.embed(input_ids)?;
        for (i, lc) in cache.layers.iter_mut().enumerate() {
            xs = self.layer_forward(i, &xs, &angles, &masks, Some(lc))?;
        }
        cache.len += n;
        if self.rope.has_long_factors() && !self.rope.is_long(cache.len) {
            // LongRoPE, still within the original context: keep the tokens,
            // in case the sequence grows past it.
            cache.tokens.extend(token_ids(input_ids)?);
        }
        let hidden = self.norm.forward(&xs).op("norm")?;
        self.lm_head(&hidden)
    }
}

/// The token ids of `input_ids` (`[1, n]`), on the host.
fn token_ids(input_ids: &Tensor) -> Result<Vec<i64>> {
    input_ids
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_view([-1]))
        .and_then(|t| Vec::<i64>::try_from(&t))
        .op("forward_cached: tokens")
}
