//! ZeRO stage 2 (`train.zero_stage = 2`): gradients partitioned during the
//! backward, for any model whose layers run as a stack
//! ([`crate::model::stack`]: the decoder's, the encoder's).
//!
//! The layers' backward runs one layer at a time from the top
//! ([`LayerGrads::Hand`]); as soon as a layer's gradients
//! exist they are reduce-scattered bucket by bucket, this rank adds its summed
//! chunk to its optimizer pieces' gradients ([`Optimizer::add_to_gradient`]),
//! and the full-size gradients are dropped. The parameters outside the layers
//! (embedding, final norm, LM head) are reduced the same way from their
//! `.grad` once the micro-batch's backward is done. This happens every
//! micro-batch — gradient accumulation happens in the shards — so every rank
//! must reduce the same buckets the same number of times: a rank with fewer
//! micro-batches in a step reduces zeros for the missing ones.

use tch::Tensor;

use crate::collective::Collective;
use crate::error::{Result, TorchContext};
use crate::model::stack::LayerGrads;
use crate::optim::Optimizer;
use crate::zero::{Partition, layer_of};

/// Which optimizer parameters belong to which layer of the stack.
#[derive(Debug)]
pub(crate) struct LayerMap {
    /// Per layer, its parameters (the optimizer's tensors) in `indices` order.
    params: Vec<Vec<Tensor>>,
    /// Per layer, the optimizer indices of its parameters.
    indices: Vec<Vec<usize>>,
    /// The parameters outside the decoder layers.
    rest: Vec<usize>,
    /// Every parameter, in the optimizer's order (the same tensors).
    all: Vec<Tensor>,
}

impl LayerMap {
    pub(crate) fn new(optimizer: &Optimizer, layers: usize) -> Self {
        let mut map = LayerMap {
            params: (0..layers).map(|_| Vec::new()).collect(),
            indices: vec![Vec::new(); layers],
            rest: Vec::new(),
            all: optimizer
                .params()
                .iter()
                .map(Tensor::shallow_clone)
                .collect(),
        };
        for (i, (name, p)) in optimizer.names().iter().zip(optimizer.params()).enumerate() {
            match layer_of(name).filter(|&l| l < layers) {
                Some(l) => {
                    map.params[l].push(p.shallow_clone());
                    map.indices[l].push(i);
                }
                None => map.rest.push(i),
            }
        }
        map
    }

    /// Finishes one micro-batch's backward (after the loss's backward):
    /// `layers` runs the stack's backward with the gradients it is given
    /// (the model's deferred backward) and says whether there was a stack
    /// to run; then all of the micro-batch's gradients are reduced into the
    /// shards.
    pub(crate) fn backward(
        &self,
        layers: impl FnOnce(LayerGrads<'_>) -> Result<bool>,
        zero: &Partition,
        optimizer: &mut Optimizer,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let params = &self.all;
        let layered = {
            let mut sink = |layer: usize, grads: Vec<Tensor>| -> Result<()> {
                let pairs: Vec<(usize, Tensor)> =
                    self.indices[layer].iter().copied().zip(grads).collect();
                reduce(zero, params, &pairs, optimizer, collective)
            };
            layers(LayerGrads::Hand {
                params: &self.params,
                sink: &mut sink,
            })?
        };
        if !layered {
            // The forward kept no per-layer graph (autograd was off for the
            // layers): their gradients, if any, are in `.grad`.
            for l in (0..self.indices.len()).rev() {
                self.reduce_from_grad(&self.indices[l], params, zero, optimizer, collective)?;
            }
        }
        self.reduce_from_grad(&self.rest, params, zero, optimizer, collective)
    }

    /// After this rank's `done` micro-batches of a step in which the rank
    /// with the most had `rounds`: zeros for each one missing, so every rank
    /// reduces the same buckets the same number of times (nothing before the
    /// world enters ZeRO).
    pub(crate) fn reduce_missing(
        &self,
        done: u64,
        rounds: u64,
        world: &mut crate::train::RankState,
    ) -> Result<()> {
        let Some(zero) = &world.zero else {
            return Ok(());
        };
        for _ in done..rounds {
            self.reduce_zeros(zero, &mut world.optimizer, world.collective.as_mut())?;
        }
        Ok(())
    }

    /// A micro-batch this rank does not have (another rank has more): zeros,
    /// in the order a real one reduces its buckets.
    fn reduce_zeros(
        &self,
        zero: &Partition,
        optimizer: &mut Optimizer,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let params = &self.all;
        for indices in self.indices.iter().rev().chain(std::iter::once(&self.rest)) {
            let none: Vec<(usize, Tensor)> = indices.iter().map(|&i| (i, Tensor::new())).collect();
            reduce(zero, params, &none, optimizer, collective)?;
        }
        Ok(())
    }

    /// Reduces `indices`' accumulated `.grad` and zeroes it (the next
    /// micro-batch starts from nothing; its sum lives in the shards).
    fn reduce_from_grad(
        &self,
        indices: &[usize],
        params: &[Tensor],
        zero: &Partition,
        optimizer: &mut Optimizer,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let pairs: Vec<(usize, Tensor)> = indices.iter().map(|&i| (i, params[i].grad())).collect();
        reduce(zero, params, &pairs, optimizer, collective)?;
        for (_, mut g) in pairs {
            if g.defined() {
                let _ = g.f_zero_().op("zero_grad")?;
            }
        }
        Ok(())
    }
}

fn reduce(
    zero: &Partition,
    params: &[Tensor],
    pairs: &[(usize, Tensor)],
    optimizer: &mut Optimizer,
    collective: &mut dyn Collective,
) -> Result<()> {
    zero.reduce_scatter_into(
        params,
        pairs,
        collective,
        &mut |i, replica, offset, values| optimizer.add_to_gradient(i, replica, offset, values),
    )
}
