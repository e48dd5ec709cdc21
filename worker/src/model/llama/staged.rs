//! The backward of checkpointed (recomputed) layers, one layer at a time, so
//! ZeRO stage 2 can reduce each layer's gradients as soon as they exist.

use super::*;

/// Where [`CausalLm::backward_checkpointed`] puts the decoder layers'
/// parameter gradients.
pub enum LayerGrads<'a> {
    /// Accumulated into the parameters' `.grad`, as autograd does.
    Accumulate,
    /// Computed for `params[layer]` (a layer's trained parameters, those
    /// with `requires_grad`) and handed to `sink(layer, grads)`, in
    /// `params[layer]` order and never stored: every layer from the top, an
    /// undefined tensor where a gradient is zero.
    Hand {
        params: &'a [Vec<Tensor>],
        sink: &'a mut dyn FnMut(usize, Vec<Tensor>) -> Result<()>,
    },
}

impl std::fmt::Debug for LayerGrads<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerGrads::Accumulate => f.write_str("Accumulate"),
            LayerGrads::Hand { params, .. } => f
                .debug_struct("Hand")
                .field("layers", &params.len())
                .finish_non_exhaustive(),
        }
    }
}

/// What a checkpointed (or staged) forward kept for the layers' backward:
/// each decoder layer's input (no graph), the leaf the final norm ran on, and
/// the RoPE angles and masks to run the layers again — or, staged, each
/// layer's output with its graph from a leaf input.
#[derive(Debug)]
pub struct Checkpointed {
    pub(super) input_ids: Tensor,
    pub(super) inputs: Vec<Tensor>,
    /// Staged: the layers' outputs, with graphs back to `inputs` (leaves);
    /// empty when the layers are recomputed.
    pub(super) outputs: Vec<Tensor>,
    pub(super) top: Tensor,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) masks: Masks,
}

impl CausalLm {
    /// Runs the layers' backward one layer at a time, as ZeRO stage 2 needs
    /// (`train.zero_stage = 2`), even without gradient checkpointing.
    pub fn set_staged_backward(&mut self, on: bool) {
        self.staged = on;
    }

    /// The layers' backward after a checkpointed (or staged) forward: from
    /// the top, each layer is run again on its kept input (now with a graph;
    /// staged, its kept graph is used) and back-propagated with the gradient
    /// of its output, which gives its parameters' gradients (accumulated or
    /// handed on, as `grads` says) and its input's gradient for the layer
    /// below; the embedding last, into its `.grad`. Recomputing, only one
    /// layer's activations exist at a time.
    pub fn backward_checkpointed(&self, c: Checkpointed, mut grads: LayerGrads<'_>) -> Result<()> {
        let mut grad = c.top.grad();
        let n = self.layers.len();
        for i in (0..n).rev() {
            if !grad.defined() {
                // Nothing reaches the layers below: their gradients are zero.
                if let LayerGrads::Hand { params, sink } = &mut grads {
                    for j in (0..=i).rev() {
                        let none = params[j].iter().map(|_| Tensor::new()).collect();
                        sink(j, none)?;
                    }
                }
                return Ok(());
            }
            let (x, out) = match c.outputs.get(i) {
                Some(out) => (c.inputs[i].shallow_clone(), Ok(out.shallow_clone())),
                None => {
                    let x = c.inputs[i]
                        .f_detach()
                        .op("checkpointed input")?
                        .set_requires_grad(true);
                    // ZeRO stage 3: the layer's weights stay gathered until
                    // its backward is done (its graph holds them).
                    if let Some(sh) = &self.sharded {
                        sh.gather(i)?;
                    }
                    let out = self.layers[i].forward(&x, &c.cos, &c.sin, &c.masks, None);
                    (x, out)
                }
            };
            let done = self.layer_backward(i, &x, out, &mut grad, &mut grads);
            if let Some(sh) = &self.sharded {
                sh.release(i)?;
            }
            done?;
        }
        if grad.defined() && self.embed_tokens.requires_grad() {
            self.embed(&c.input_ids)?
                .f_mul(&grad)
                .and_then(|t| t.f_sum(Kind::Float))
                .and_then(|t| t.f_backward())
                .op("checkpointed backward")?;
        }
        Ok(())
    }

    /// The backward of decoder layer `i` whose output `out` was computed from
    /// the leaf `x`, given the output's gradient `grad`; leaves the input's
    /// gradient in `grad`.
    fn layer_backward(
        &self,
        i: usize,
        x: &Tensor,
        out: Result<Tensor>,
        grad: &mut Tensor,
        grads: &mut LayerGrads<'_>,
    ) -> Result<()> {
        let seed = out?
            .f_mul(grad)
            .and_then(|t| t.f_sum(Kind::Float))
            .op("checkpointed backward")?;
        match grads {
            LayerGrads::Accumulate => {
                seed.f_backward().op("checkpointed backward")?;
                *grad = x.grad();
            }
            LayerGrads::Hand { params, sink } => {
                let trained: Vec<&Tensor> =
                    params[i].iter().filter(|p| p.requires_grad()).collect();
                let wanted: Vec<&Tensor> = std::iter::once(x).chain(trained).collect();
                let mut got = Tensor::f_run_backward(&[&seed], &wanted, false, false)
                    .op("staged backward")?
                    .into_iter();
                *grad = got.next().unwrap_or_default();
                let layer: Vec<Tensor> = params[i]
                    .iter()
                    .map(|p| {
                        if p.requires_grad() {
                            got.next().unwrap_or_default()
                        } else {
                            Tensor::new()
                        }
                    })
                    .collect();
                sink(i, layer)?;
            }
        }
        Ok(())
    }
}
