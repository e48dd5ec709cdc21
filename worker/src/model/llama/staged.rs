//! The decoder's layer-by-layer backward ([`super::super::stack`]): after a
//! checkpointed (recomputed) or staged forward, so ZeRO stage 2 can reduce
//! each layer's gradients as soon as they exist and ZeRO stage 3 can gather
//! each layer's weights only while it runs.

use super::*;
pub use crate::model::stack::LayerGrads;

/// What a checkpointed (or staged) forward kept for the layers' backward:
/// the stack's record (each decoder layer's input, or its graph, and the
/// leaf the final norm ran on), the token ids to run the embedding again,
/// and the RoPE angles and masks to run the layers again.
#[derive(Debug)]
pub struct Checkpointed {
    pub(super) input_ids: Tensor,
    pub(super) layers: stack::Stacked,
    pub(super) angles: Angles,
    pub(super) masks: Masks,
}

impl CausalLm {
    /// Runs the layers' backward one layer at a time, as ZeRO stage 2 needs
    /// (`train.zero_stage = 2`), even without gradient checkpointing.
    pub fn set_staged_backward(&mut self, on: bool) {
        self.staged = on;
    }

    /// The layers' backward after a checkpointed (or staged) forward
    /// ([`stack::backward`]), the layers' parameter gradients going where
    /// `grads` says; the embedding last, into its `.grad`. Under ZeRO stage
    /// 3 each layer's weights are gathered while it runs again and released
    /// after its backward.
    pub fn backward_checkpointed(&self, c: Checkpointed, grads: LayerGrads<'_>) -> Result<()> {
        let Checkpointed {
            input_ids,
            layers,
            angles,
            masks,
        } = c;
        let grad = stack::backward(
            layers,
            &mut |i, x| {
                // ZeRO stage 3: the layer's weights stay gathered until its
                // backward is done (its graph holds them).
                if let Some(sh) = &self.sharded {
                    sh.gather(i)?;
                }
                self.layers[i].forward(x, &angles, &masks, None)
            },
            &mut |i| match &self.sharded {
                Some(sh) => sh.release(i),
                None => Ok(()),
            },
            grads,
        )?;
        if grad.defined() && self.embed_tokens.requires_grad() {
            self.embed(&input_ids)?
                .f_mul(&grad)
                .and_then(|t| t.f_sum(Kind::Float))
                .and_then(|t| t.f_backward())
                .op("checkpointed backward")?;
        }
        Ok(())
    }
}
