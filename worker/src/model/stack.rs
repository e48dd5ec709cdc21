//! A stack of layers (a decoder's, an encoder's) run so that its backward
//! can go one layer at a time: gradient checkpointing (each layer's input
//! kept without a graph and the layer run again in the backward) and the
//! staged backward ZeRO stage 2 needs (each layer's graph kept from a leaf
//! input, so its gradients can be taken and reduced as soon as they exist).
//! Every model builds its stack from these; what a layer is stays the
//! model's.

use tch::{Kind, Tensor};

use crate::error::{Result, TorchContext};

/// Where a stacked backward puts the layers' parameter gradients.
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

/// How a stack's forward keeps what its backward needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Plain autograd: every layer's activations (no stacked backward).
    Everything,
    /// Gradient checkpointing: each layer's input, without a graph.
    Inputs,
    /// Staged: each layer's graph from a leaf copy of its input.
    Graphs,
}

/// What a checkpointed or staged forward kept for the layers' backward.
#[derive(Debug)]
pub struct Stacked {
    /// Each layer's input: without a graph (recomputed), or the leaf its
    /// kept graph starts from (staged).
    pub inputs: Vec<Tensor>,
    /// Staged: the layers' outputs, with graphs back to `inputs`; empty
    /// when the layers are recomputed.
    pub outputs: Vec<Tensor>,
    /// The leaf the rest of the model ran on; its gradient, once the loss's
    /// backward is done, starts the layers' backward.
    pub top: Tensor,
    /// Per layer, the seed its random draws (dropout) were made with, so a
    /// recomputation draws the same; `None` when nothing is random.
    pub seeds: Option<Vec<i64>>,
}

/// Runs `n` layers on `x` (`layer(i, x)` is layer `i`), keeping what `keep`
/// says. With `Inputs` or `Graphs` the result is a leaf that requires a
/// gradient and the [`Stacked`] record its backward takes; `random`: the
/// layers draw random numbers (dropout in training), so each runs under a
/// seed drawn here and kept for its recomputation.
pub fn forward(
    n: usize,
    x: Tensor,
    keep: Keep,
    random: bool,
    layer: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Option<Stacked>)> {
    let mut xs = x;
    if keep == Keep::Everything {
        for i in 0..n {
            xs = layer(i, &xs)?;
        }
        return Ok((xs, None));
    }
    let mut inputs = Vec::with_capacity(n);
    let mut outputs = Vec::new();
    let mut seeds = random.then(|| Vec::with_capacity(n));
    for i in 0..n {
        if let Some(seeds) = &mut seeds {
            // A seed from the current stream, so the run stays a function
            // of the step's seed.
            let s = Tensor::f_randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu))
                .and_then(|t| t.f_int64_value(&[0]))
                .op("a layer's seed")?;
            tch::manual_seed(s);
            seeds.push(s);
        }
        match keep {
            Keep::Inputs => {
                let _guard = tch::no_grad_guard();
                let out = layer(i, &xs)?;
                inputs.push(xs);
                xs = out;
            }
            _ => {
                let x = xs.f_detach().op("staged input")?.set_requires_grad(true);
                let out = layer(i, &x)?;
                xs = out.f_detach().op("staged output")?;
                inputs.push(x);
                outputs.push(out);
            }
        }
    }
    let top = xs.set_requires_grad(true);
    Ok((
        top.shallow_clone(),
        Some(Stacked {
            inputs,
            outputs,
            top,
            seeds,
        }),
    ))
}

/// The layers' backward after [`forward`] kept `s` and the loss's backward
/// left the gradient of `s.top`: from the top, each layer is run again on
/// its kept input (`rerun(i, x)`, now with a graph; staged, its kept graph is
/// used) and back-propagated with the gradient of its output, which gives
/// its parameters' gradients (accumulated or handed on, as `grads` says) and
/// its input's gradient for the layer below. `done(i)` runs after layer
/// `i`'s backward, whether it succeeded or not. Returns the gradient of the
/// stack's input (undefined when nothing reaches it). Recomputing, only one
/// layer's activations exist at a time.
pub fn backward(
    s: Stacked,
    rerun: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    done: &mut dyn FnMut(usize) -> Result<()>,
    grads: LayerGrads<'_>,
) -> Result<Tensor> {
    Ok(backward_sharing(s, &[], rerun, done, grads)?.0)
}

/// [`backward`] for layers that also read `shared` tensors (leaves that
/// require a gradient, made outside the stack: DeBERTa's relative-position
/// table): returns besides the input's gradient each shared tensor's,
/// summed over the layers (undefined where none reached it), for the caller
/// to carry on into what made them.
pub fn backward_sharing(
    s: Stacked,
    shared: &[Tensor],
    rerun: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    done: &mut dyn FnMut(usize) -> Result<()>,
    mut grads: LayerGrads<'_>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut grad = s.top.grad();
    let mut sums: Vec<Tensor> = shared.iter().map(|_| Tensor::new()).collect();
    let n = s.inputs.len();
    for i in (0..n).rev() {
        if !grad.defined() {
            // Nothing reaches the layers below: their gradients are zero.
            if let LayerGrads::Hand { params, sink } = &mut grads {
                for j in (0..=i).rev() {
                    let none = params[j].iter().map(|_| Tensor::new()).collect();
                    sink(j, none)?;
                }
            }
            break;
        }
        let (x, out) = match s.outputs.get(i) {
            Some(out) => (s.inputs[i].shallow_clone(), Ok(out.shallow_clone())),
            None => {
                let x = s.inputs[i]
                    .f_detach()
                    .op("checkpointed input")?
                    .set_requires_grad(true);
                if let Some(seeds) = &s.seeds {
                    tch::manual_seed(seeds[i]);
                }
                let out = rerun(i, &x);
                (x, out)
            }
        };
        let result = layer_backward(i, &x, shared, &mut sums, out, &mut grad, &mut grads);
        done(i)?;
        result?;
    }
    if matches!(grads, LayerGrads::Accumulate) {
        // Autograd accumulated them in the leaves.
        sums = shared.iter().map(Tensor::grad).collect();
    }
    Ok((grad, sums))
}

/// The backward of layer `i` whose output `out` was computed from the leaf
/// `x`, given the output's gradient `grad`; leaves the input's gradient in
/// `grad`.
fn layer_backward(
    i: usize,
    x: &Tensor,
    shared: &[Tensor],
    sums: &mut [Tensor],
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
            let trained: Vec<&Tensor> = params[i].iter().filter(|p| p.requires_grad()).collect();
            let wanted: Vec<&Tensor> = std::iter::once(x)
                .chain(shared.iter())
                .chain(trained)
                .collect();
            let mut got = Tensor::f_run_backward(&[&seed], &wanted, false, false)
                .op("staged backward")?
                .into_iter();
            *grad = got.next().unwrap_or_default();
            for sum in sums.iter_mut() {
                let g = got.next().unwrap_or_default();
                if !g.defined() {
                    continue;
                }
                *sum = if sum.defined() {
                    sum.f_add(&g).op("a shared tensor's gradient")?
                } else {
                    g
                };
            }
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
