//! Optimizers, gradient clipping and learning-rate schedules, written out so that
//! every step is the documented formula (and matches torch's): AdamW with decoupled
//! weight decay (none on norms and biases), SGD, global-norm clipping, and the
//! constant / linear / cosine schedules with linear warmup of transformers.
//!
//! Parameters kept in bf16/f16 get f32 *master weights*: the update is computed
//! and accumulated in f32 and only its rounding is copied into the model, so
//! updates smaller than a half-precision ulp are not lost (mixed precision as in
//! PyTorch AMP / DeepSpeed). Moments are always f32.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use dpo_proto::{OptimSpec, OptimizerName, Schedule};
use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// Parameters that take no weight decay: norms (`norm.weight`, BERT's
/// `LayerNorm.weight`) and biases (as transformers' Trainer).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.to_ascii_lowercase().ends_with("norm.weight"))
}

/// The optimizer state of one parameter.
#[derive(Debug)]
struct Slot {
    name: String,
    /// The parameter's position in [`Optimizer::params`].
    index: usize,
    param: Tensor,
    /// The flattened elements `(offset, len)` of the parameter this slot
    /// updates (ZeRO: this rank's share); `None`: all of them.
    piece: Option<(i64, i64)>,
    /// A copy of another rank's piece (ZeRO replicas): updated alike, but not
    /// this rank's to count in the gradient norm or to contribute to checkpoints.
    replica: bool,
    decay: bool,
    /// AdamW moments (f32), allocated on the first step.
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    /// The f32 master copy of a half-precision parameter (`None` for f32).
    master: Option<Tensor>,
    /// ZeRO stage 2: the global gradient of this slot's piece, summed here
    /// layer by layer during the backward (the parameter's own `.grad` is
    /// never filled); allocated by the first [`Optimizer::add_to_gradient`].
    grad_shard: Option<Tensor>,
}

impl Slot {
    /// `t` (the parameter or its gradient) restricted to this slot's piece: a
    /// view, so writes land in `t`.
    fn view(&self, t: &Tensor) -> TchResult<Tensor> {
        match self.piece {
            None => Ok(t.shallow_clone()),
            Some((offset, len)) => t.f_view([-1])?.f_narrow(0, offset, len),
        }
    }

    /// The gradient of this slot's piece, if the parameter has one (ZeRO
    /// stage 2: the summed shard, when one has been received).
    fn grad(&self) -> TchResult<Option<Tensor>> {
        if let Some(g) = &self.grad_shard {
            return Ok(Some(g.shallow_clone()));
        }
        let g = self.param.grad();
        if g.defined() {
            Ok(Some(self.view(&g)?))
        } else {
            Ok(None)
        }
    }
}

/// AdamW or SGD over a fixed, named parameter list.
#[derive(Debug)]
pub struct Optimizer {
    spec: OptimSpec,
    slots: Vec<Slot>,
    /// The same tensors as the slots', for gradient all-reduce.
    params: Vec<Tensor>,
    /// Their names.
    names: Vec<String>,
    /// Optimizer steps taken.
    pub step: u64,
}

impl Optimizer {
    /// `params` in a stable order (sorted by name by the caller).
    pub fn new(spec: &OptimSpec, params: Vec<(String, Tensor)>) -> Result<Self> {
        let mut optimizer = Optimizer {
            spec: spec.clone(),
            slots: Vec::new(),
            params: params.iter().map(|(_, t)| t.shallow_clone()).collect(),
            names: params.into_iter().map(|(n, _)| n).collect(),
            step: 0,
        };
        optimizer.reset()?;
        Ok(optimizer)
    }

    /// The parameters, in the optimizer's (name-sorted) order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Keeps only `pieces` — `(parameter index, offset, len)` of the flattened
    /// parameters, at most one per parameter — with their slices of the
    /// moments and master weights; the rest of the state is dropped (ZeRO: this
    /// rank updates only its share). Call on an unsharded optimizer.
    pub fn shard(
        &mut self,
        pieces: &[(usize, i64, i64)],
        replicas: &[(usize, i64, i64)],
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let old = std::mem::take(&mut self.slots);
        let slice = |t: &Option<Tensor>, offset: i64, len: i64| -> TchResult<Option<Tensor>> {
            t.as_ref()
                .map(|t| {
                    t.f_view([-1])?
                        .f_narrow(0, offset, len)?
                        .f_contiguous()?
                        .f_detach()
                })
                .transpose()
        };
        let tagged = pieces
            .iter()
            .map(|p| (p, false))
            .chain(replicas.iter().map(|p| (p, true)));
        let tagged: Vec<_> = tagged.collect();
        for (index, slot) in old.into_iter().enumerate() {
            for &(&(_, offset, len), replica) in tagged.iter().filter(|((i, _, _), _)| *i == index)
            {
                let f = || -> TchResult<Slot> {
                    Ok(Slot {
                        name: slot.name.clone(),
                        index,
                        param: slot.param.shallow_clone(),
                        piece: Some((offset, len)),
                        replica,
                        decay: slot.decay,
                        exp_avg: slice(&slot.exp_avg, offset, len)?,
                        exp_avg_sq: slice(&slot.exp_avg_sq, offset, len)?,
                        master: slice(&slot.master, offset, len)?,
                        grad_shard: None,
                    })
                };
                self.slots.push(f().op("sharding the optimizer state")?);
            }
        }
        Ok(())
    }

    /// Back to whole parameters with no moments (f32 masters from the current
    /// parameters): before a checkpoint or a broadcast fills the state.
    pub fn reset(&mut self) -> Result<()> {
        let mut slots = Vec::with_capacity(self.params.len());
        for (index, (name, param)) in self.names.iter().zip(&self.params).enumerate() {
            slots.push(Slot {
                decay: decays(name),
                master: master_of(param).op("f32 master weights")?,
                name: name.clone(),
                index,
                param: param.shallow_clone(),
                piece: None,
                replica: false,
                exp_avg: None,
                exp_avg_sq: None,
                grad_shard: None,
            });
        }
        self.slots = slots;
        Ok(())
    }

    /// Makes this optimizer update `pieces` (a partition's, in its order) with
    /// `state` (`(kind, parameter index, values)`, as [`crate::zero::Partition::repartition`]
    /// returns it); a half-precision piece without a master gets one from the
    /// parameter.
    pub fn install_pieces(
        &mut self,
        pieces: &[(usize, i64, i64)],
        state: Vec<(&'static str, usize, Tensor)>,
        replicas: &[(usize, i64, i64)],
        replica_state: Vec<(&'static str, usize, Tensor)>,
    ) -> Result<()> {
        let mut slots = self.slots_of(pieces, state, false)?;
        slots.extend(self.slots_of(replicas, replica_state, true)?);
        self.slots = slots;
        Ok(())
    }

    fn slots_of(
        &self,
        pieces: &[(usize, i64, i64)],
        mut state: Vec<(&'static str, usize, Tensor)>,
        replica: bool,
    ) -> Result<Vec<Slot>> {
        let mut slots = Vec::with_capacity(pieces.len());
        for &(index, offset, len) in pieces {
            let mut take = |kind: &str| -> Option<Tensor> {
                let at = state
                    .iter()
                    .position(|(k, i, _)| *k == kind && *i == index)?;
                Some(state.swap_remove(at).2)
            };
            let (exp_avg, exp_avg_sq, master) =
                (take("exp_avg"), take("exp_avg_sq"), take("master"));
            let param = self.params[index].shallow_clone();
            let mut slot = Slot {
                name: self.names[index].clone(),
                index,
                decay: decays(&self.names[index]),
                param,
                piece: Some((offset, len)),
                replica,
                exp_avg,
                exp_avg_sq,
                master,
                grad_shard: None,
            };
            if slot.master.is_none() {
                let view = slot.view(&slot.param).op("f32 master weights")?;
                slot.master = master_of(&view).op("f32 master weights")?;
            }
            slots.push(slot);
        }
        Ok(slots)
    }

    /// The f32 state of this rank's own pieces (`replicas`: of the copies it
    /// keeps of another rank's), by kind (`exp_avg`, `exp_avg_sq`, `master`):
    /// `(parameter index, offset, values)` — what a sharded checkpoint gathers.
    pub fn piece_states(&self, replicas: bool) -> Vec<(&'static str, usize, i64, Tensor)> {
        let mut out = Vec::new();
        for s in self.slots.iter().filter(|s| s.replica == replicas) {
            let index = s.index;
            let offset = s.piece.map_or(0, |(o, _)| o);
            for (kind, t) in [
                ("exp_avg", &s.exp_avg),
                ("exp_avg_sq", &s.exp_avg_sq),
                ("master", &s.master),
            ] {
                if let Some(t) = t {
                    out.push((kind, index, offset, t.shallow_clone()));
                }
            }
        }
        out
    }

    /// The names of the parameters, in [`Optimizer::params`] order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The model state this rank holds for its trained parameters: their
    /// count, and the bytes of the parameters, their gradients, the AdamW
    /// moments and the f32 master weights (what ZeRO partitions).
    pub fn state_bytes(&self) -> (u64, u64) {
        let bytes = |t: &Tensor| -> u64 {
            if t.defined() {
                (t.numel() * t.kind().elt_size_in_bytes()) as u64
            } else {
                0
            }
        };
        let mut parameters = 0u64;
        let mut total = 0u64;
        for p in &self.params {
            parameters += p.numel() as u64;
            total += bytes(p) + bytes(&p.grad());
        }
        for s in &self.slots {
            let state = [&s.exp_avg, &s.exp_avg_sq, &s.master, &s.grad_shard];
            for t in state.into_iter().flatten() {
                total += bytes(t);
            }
        }
        (parameters, total)
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_zero_().op("zero_grad")?;
            }
        }
        for s in &mut self.slots {
            if let Some(g) = &mut s.grad_shard {
                let _ = g.f_zero_().op("zero_grad")?;
            }
        }
        Ok(())
    }

    /// ZeRO stage 2: adds `values` (f32, on the host) to the gradient of the
    /// slot that updates parameter `index` from flattened element `offset`
    /// (`replica`: the copy of another rank's piece). The slot's gradient
    /// then stands in for the parameter's `.grad` in clipping and the update.
    pub fn add_to_gradient(
        &mut self,
        index: usize,
        replica: bool,
        offset: i64,
        values: &[f32],
    ) -> Result<()> {
        let Some(s) = self.slots.iter_mut().find(|s| {
            s.index == index && s.replica == replica && s.piece.is_none_or(|(o, _)| o == offset)
        }) else {
            return Err(crate::error::Error::Input {
                context: "ZeRO stage 2".into(),
                reason: format!(
                    "no optimizer slot for {} values of parameter {index} from element {offset}",
                    values.len()
                ),
            });
        };
        let mut f = || -> TchResult<()> {
            let device = s.param.device();
            let add = Tensor::f_from_slice(values)?.f_to_device(device)?;
            match &mut s.grad_shard {
                Some(g) => {
                    let _ = g.f_add_(&add)?;
                }
                None => {
                    // Shaped like the parameter's gradient view (the whole
                    // parameter when this slot is not a piece).
                    let shape = match s.piece {
                        Some(_) => vec![add.numel() as i64],
                        None => s.param.size(),
                    };
                    s.grad_shard = Some(add.f_view(shape.as_slice())?);
                }
            }
            Ok(())
        };
        f().op("ZeRO stage 2 gradient")
    }

    /// Global L2 norm of all gradients; when `max_norm > 0` gradients are scaled by
    /// `min(1, max_norm / (norm + 1e-6))` as `torch.nn.utils.clip_grad_norm_` does.
    /// Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        self.clip_grad_norm_with(max_norm, &mut |x| Ok(x))
    }

    /// [`Optimizer::clip_grad_norm`] over the gradients of this optimizer's
    /// pieces, `sum` adding the squared norm across the ranks that hold the
    /// other pieces (ZeRO) — so the norm and the clipping are the global ones.
    pub fn clip_grad_norm_with(
        &mut self,
        max_norm: f64,
        sum: &mut dyn FnMut(f64) -> Result<f64>,
    ) -> Result<f64> {
        // One transfer from the device: the norms' squares summed there.
        let local = || -> TchResult<f64> {
            let mut norms = Vec::new();
            for s in self.slots.iter().filter(|s| !s.replica) {
                if let Some(g) = s.grad()? {
                    norms.push(g.f_to_kind(Kind::Float)?.f_norm()?);
                }
            }
            if norms.is_empty() {
                return Ok(0.0);
            }
            Tensor::f_stack(&norms, 0)?
                .f_to_kind(Kind::Double)?
                .f_square()?
                .f_sum(Kind::Double)?
                .f_double_value(&[])
        };
        let norm = sum(local().op("clip_grad_norm")?)?.sqrt();
        if max_norm > 0.0 {
            let coef = (max_norm / (norm + 1e-6)).min(1.0);
            let f = || -> TchResult<()> {
                for s in &self.slots {
                    if let Some(mut g) = s.grad()? {
                        let _ = g.f_mul_scalar_(coef)?;
                    }
                }
                Ok(())
            };
            f().op("clip_grad_norm")?;
        }
        Ok(norm)
    }

    /// One update with learning rate `lr`.
    pub fn apply(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let step = self.step as f64;
        let spec = &self.spec;
        let (b1, b2) = (spec.betas[0], spec.betas[1]);
        let f = |s: &mut Slot| -> TchResult<()> {
            let Some(grad) = s.grad()? else {
                return Ok(());
            };
            let mut p = s.view(&s.param)?;
            // The f32 weights the update applies to: the master copy, or the
            // parameter itself.
            let current = match &s.master {
                Some(m) => m.shallow_clone(),
                None => p.f_to_kind(Kind::Float)?,
            };
            let updated = match spec.name {
                OptimizerName::Sgd => {
                    // torch.optim.SGD: L2 weight decay added to the gradient.
                    let mut d = grad.f_to_kind(Kind::Float)?;
                    if spec.weight_decay != 0.0 && s.decay {
                        d = d.f_add(&current.f_mul_scalar(spec.weight_decay)?)?;
                    }
                    current.f_sub(&d.f_mul_scalar(lr)?)?
                }
                OptimizerName::Adamw => {
                    let g = grad.f_to_kind(Kind::Float)?;
                    let mut w = current;
                    if spec.weight_decay != 0.0 && s.decay {
                        w = w.f_mul_scalar(1.0 - lr * spec.weight_decay)?;
                    }
                    let m = match s.exp_avg.take() {
                        Some(m) => m,
                        None => g.f_zeros_like()?,
                    };
                    let v = match s.exp_avg_sq.take() {
                        Some(v) => v,
                        None => g.f_zeros_like()?,
                    };
                    // m ← m + (1 − β1)(g − m);  v ← β2 v + (1 − β2) g²
                    let m = m.f_add(&g.f_sub(&m)?.f_mul_scalar(1.0 - b1)?)?;
                    let v = v
                        .f_mul_scalar(b2)?
                        .f_add(&g.f_mul(&g)?.f_mul_scalar(1.0 - b2)?)?;
                    let bc1 = 1.0 - b1.powf(step);
                    let bc2 = 1.0 - b2.powf(step);
                    let denom = v
                        .f_sqrt()?
                        .f_div_scalar(bc2.sqrt())?
                        .f_add_scalar(spec.eps)?;
                    let w = w.f_sub(&m.f_div(&denom)?.f_mul_scalar(lr / bc1)?)?;
                    s.exp_avg = Some(m);
                    s.exp_avg_sq = Some(v);
                    w
                }
            };
            if let Some(m) = &mut s.master {
                m.f_copy_(&updated)?;
            }
            p.f_copy_(&updated)?;
            Ok(())
        };
        for s in &mut self.slots {
            f(s).op("optimizer step")?;
        }
        Ok(())
    }

    /// Every state tensor — AdamW moments (allocating zeros where none exist yet),
    /// then the f32 master weights — in parameter order, so ranks can exchange
    /// optimizer state tensor by tensor.
    pub fn moments_mut(&mut self) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        let moments = self.spec.name != OptimizerName::Sgd; // SGD keeps none
        for s in self.slots.iter_mut().filter(|_| moments) {
            for slot in [&mut s.exp_avg, &mut s.exp_avg_sq] {
                if slot.is_none() {
                    let z =
                        Tensor::f_zeros(s.param.size().as_slice(), (Kind::Float, s.param.device()))
                            .op("optimizer state")?;
                    *slot = Some(z);
                }
                if let Some(t) = slot {
                    out.push(t.shallow_clone());
                }
            }
        }
        out.extend(
            self.slots
                .iter()
                .filter_map(|s| s.master.as_ref().map(Tensor::shallow_clone)),
        );
        Ok(out)
    }

    /// Moments by `exp_avg.NAME` / `exp_avg_sq.NAME`, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.slots {
            if let (Some(m), Some(v)) = (&s.exp_avg, &s.exp_avg_sq) {
                out.push((format!("exp_avg.{}", s.name), m.shallow_clone()));
                out.push((format!("exp_avg_sq.{}", s.name), v.shallow_clone()));
            }
            if let Some(m) = &s.master {
                out.push((format!("master.{}", s.name), m.shallow_clone()));
            }
        }
        out
    }

    /// Restores moments and master weights written by [`Optimizer::state`] and the
    /// step count (call after loading the model's weights: a checkpoint without
    /// master weights starts them from the parameters).
    pub fn load_state(&mut self, step: u64, mut tensors: BTreeMap<String, Tensor>) -> Result<()> {
        self.step = step;
        for s in &mut self.slots {
            let saved = tensors.remove(&format!("master.{}", s.name));
            if let Some(m) = &mut s.master {
                let _guard = tch::no_grad_guard();
                let from = saved.as_ref().unwrap_or(&s.param);
                m.f_copy_(from).op("master weights")?;
            }
            let m = tensors.remove(&format!("exp_avg.{}", s.name));
            let v = tensors.remove(&format!("exp_avg_sq.{}", s.name));
            match (m, v) {
                (Some(m), Some(v)) => {
                    let dev = s.param.device();
                    s.exp_avg = Some(m.f_to_device(dev).op("optimizer state")?);
                    s.exp_avg_sq = Some(v.f_to_device(dev).op("optimizer state")?);
                }
                (None, None) if self.spec.name == OptimizerName::Sgd || step == 0 => {}
                _ => {
                    return Err(Error::Input {
                        context: "optimizer state".into(),
                        reason: format!("no moments for parameter {}", s.name),
                    });
                }
            }
        }
        if let Some(name) = tensors.keys().next() {
            return Err(Error::Input {
                context: "optimizer state".into(),
                reason: format!("unknown entry {name}"),
            });
        }
        Ok(())
    }
}

/// An f32 copy of a half-precision parameter (`None` when it is f32 already).
fn master_of(param: &Tensor) -> TchResult<Option<Tensor>> {
    if param.kind() == Kind::Float {
        return Ok(None);
    }
    let _guard = tch::no_grad_guard();
    Ok(Some(param.f_to_kind(Kind::Float)?.f_detach()?))
}

/// Learning rate of the optimizer step that follows `step` completed steps, out of
/// `total`: linear warmup from 0, then constant, linear decay to 0, or half a
/// cosine to 0 — transformers' `get_*_schedule_with_warmup`.
pub fn learning_rate(schedule: Schedule, base: f64, warmup: u64, step: u64, total: u64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let after = (step - warmup) as f64;
    let span = total.saturating_sub(warmup).max(1) as f64;
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total as f64 - step as f64) / span).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (PI * after / span).cos())).max(0.0),
    };
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        let lr = |s, step| learning_rate(s, 1.0, 2, step, 10);
        assert_eq!(lr(Schedule::Linear, 0), 0.0, "warmup starts at zero");
        assert_eq!(lr(Schedule::Linear, 1), 0.5);
        assert_eq!(lr(Schedule::Linear, 2), 1.0);
        assert_eq!(lr(Schedule::Linear, 6), 0.5);
        assert_eq!(lr(Schedule::Constant, 9), 1.0);
        assert!((lr(Schedule::Cosine, 6) - 0.5).abs() < 1e-12);
        assert_eq!(
            learning_rate(Schedule::Linear, 1.0, 0, 0, 10),
            1.0,
            "no warmup: full rate"
        );
    }

    #[test]
    fn no_decay_on_norms_and_biases() {
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
        assert!(decays("model.embed_tokens.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
    }

    /// AdamW on f(w) = Σ w², two steps, against the update written out by hand.
    #[test]
    fn adamw_matches_hand_computation() {
        let spec = OptimSpec {
            lr: 0.1,
            weight_decay: 0.5,
            ..OptimSpec::default()
        };
        let w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt =
            Optimizer::new(&spec, vec![("w.weight".into(), w.shallow_clone())]).expect("opt");
        let (b1, b2, eps, lr, wd) = (0.9f64, 0.999f64, 1e-8, 0.1, 0.5);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            opt.zero_grad().expect("zero");
            (&w * &w).sum(Kind::Float).backward();
            opt.apply(lr).expect("step");
            for i in 0..2 {
                let g = 2.0 * want[i];
                want[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                want[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let got = Vec::<f64>::try_from(w.to_kind(Kind::Double)).expect("vec");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// A bf16 weight of 1.0 under steps of 1e-3: each step alone is below half
    /// a bf16 ulp (2^-8 at 1.0), so without master weights nothing ever moves;
    /// with them the f32 copy accumulates and the model follows its rounding.
    #[test]
    fn half_precision_weights_keep_f32_masters() {
        for name in [OptimizerName::Sgd, OptimizerName::Adamw] {
            let spec = OptimSpec {
                name,
                lr: 1e-3,
                weight_decay: 0.0,
                ..OptimSpec::default()
            };
            let w = Tensor::from_slice(&[1.0f32])
                .to_kind(Kind::BFloat16)
                .set_requires_grad(true);
            let mut opt =
                Optimizer::new(&spec, vec![("w.weight".into(), w.shallow_clone())]).expect("opt");
            for _ in 0..20 {
                opt.zero_grad().expect("zero");
                // d/dw of w is 1: SGD moves by lr, AdamW by ~lr (m̂/√v̂ = 1).
                w.sum(Kind::Float).backward();
                opt.apply(1e-3).expect("step");
            }
            let state: BTreeMap<String, Tensor> = opt.state().into_iter().collect();
            let master = state["master.w.weight"].double_value(&[0]);
            assert!((master - 0.98).abs() < 1e-5, "{name:?}: master {master}");
            let model = w.double_value(&[0]);
            assert_eq!(
                model,
                Tensor::from(master as f32)
                    .to_kind(Kind::BFloat16)
                    .double_value(&[]),
                "{name:?}: the model holds the master's rounding"
            );
            assert!(model < 0.99, "{name:?}: the weight moved ({model})");

            // A restored optimizer continues from the saved masters, not from
            // the rounded model weights.
            let w2 = Tensor::from_slice(&[model as f32])
                .to_kind(Kind::BFloat16)
                .set_requires_grad(true);
            let mut restored =
                Optimizer::new(&spec, vec![("w.weight".into(), w2.shallow_clone())]).expect("opt");
            restored.load_state(20, state).expect("load");
            let again: BTreeMap<String, Tensor> = restored.state().into_iter().collect();
            assert_eq!(again["master.w.weight"].double_value(&[0]), master);
        }
    }
}
