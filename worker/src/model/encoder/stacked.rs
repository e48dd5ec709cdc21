//! The encoder's layers run as a stack ([`crate::model::stack`]): gradient
//! checkpointing (`train.gradient_checkpointing`: each layer's input kept,
//! the layer run again in the backward) and the staged backward ZeRO stage
//! 2 reduces layer by layer.

use tch::{Kind, Tensor};

use super::{Attend, Encoder};
use crate::error::{Result, TorchContext};
use crate::model::layers::grad_enabled;
use crate::model::stack::{self, Keep, LayerGrads, Stacked};

/// What a stacked training forward kept for the layers' backward: run
/// [`Encoder::backward_deferred`] with it once the loss's backward is done.
#[derive(Debug)]
pub struct Deferred {
    /// The embedding's output, with its graph (the stack ran on a copy).
    embedded: Tensor,
    /// What the layers' attention took.
    attend: Attend,
    /// DeBERTa's relative-position table with its graph, when it trains:
    /// the layers read a leaf copy of it (in `attend`), whose gradient is
    /// summed over them and carried on into the table once.
    table: Option<Tensor>,
    layers: Stacked,
}

impl Encoder {
    /// Gradient checkpointing for training forwards (`forward_deferred`).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        if on {
            self.keep = Keep::Inputs;
        } else if self.keep == Keep::Inputs {
            self.keep = Keep::Everything;
        }
    }

    /// The staged backward ZeRO stage 2 needs (each layer's graph kept from
    /// a leaf, to take its gradients on their own); checkpointing, when on,
    /// already goes layer by layer.
    pub fn set_staged_backward(&mut self, on: bool) {
        match (on, self.keep) {
            (true, Keep::Everything) => self.keep = Keep::Graphs,
            (false, Keep::Graphs) => self.keep = Keep::Everything,
            _ => {}
        }
    }

    /// Logits like [`Encoder::forward`]; in a training forward with
    /// checkpointing or the staged backward on, the layers' backward is left
    /// for [`Encoder::backward_deferred`] (what it needs is returned).
    /// Dropout draws are the same in a layer's recomputation: each layer
    /// runs under a seed drawn from the step's stream.
    pub fn forward_deferred(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<(Tensor, Option<Deferred>)> {
        if self.keep == Keep::Everything || !grad_enabled() {
            return Ok((self.forward(input_ids, attention_mask, None)?, None));
        }
        let (embedded, mut attend) = self
            .embed(input_ids, attention_mask, None)
            .op("encoder forward")?;
        // The layers share the table: each reads a leaf of it, so that one
        // layer's backward does not run through the others' graph.
        let mut table = None;
        if let Some(positions) = &mut attend.relative
            && positions.table.requires_grad()
        {
            let leaf = positions
                .table
                .f_detach()
                .op("relative positions")?
                .set_requires_grad(true);
            table = Some(std::mem::replace(&mut positions.table, leaf));
        }
        let c = &self.config;
        // Dropout in the layers (ModernBERT's `mlp_dropout` is `hidden_dropout`).
        let random = self.training && (c.hidden_dropout > 0.0 || c.attention_dropout > 0.0);
        let (top, layers) = stack::forward(
            self.layers.len(),
            embedded.shallow_clone(),
            self.keep,
            random,
            &mut |i, x| {
                self.layer_forward(i, x, &attend, self.training)
                    .op("encoder layer")
            },
        )?;
        let logits = self
            .final_norm(top)
            .and_then(|top| self.logits_of(&top, attention_mask))
            .op("encoder head")?;
        Ok((
            logits,
            layers.map(|layers| Deferred {
                embedded,
                attend,
                table,
                layers,
            }),
        ))
    }

    /// The layers' backward after [`Encoder::forward_deferred`] and the
    /// loss's backward: one layer at a time from the top (gradients where
    /// `grads` says), then the embedding's, into its `.grad`.
    pub fn backward_deferred(&self, d: Deferred, grads: LayerGrads<'_>) -> Result<()> {
        let Deferred {
            embedded,
            attend,
            table,
            layers,
        } = d;
        let leaves: Vec<Tensor> = match (&table, &attend.relative) {
            (Some(_), Some(positions)) => vec![positions.table.shallow_clone()],
            _ => Vec::new(),
        };
        let (grad, shared) = stack::backward_sharing(
            layers,
            &leaves,
            &mut |i, x| {
                self.layer_forward(i, x, &attend, self.training)
                    .op("encoder layer")
            },
            &mut |_| Ok(()),
            grads,
        )?;
        if let (Some(table), Some(g)) = (table, shared.first())
            && g.defined()
        {
            table
                .f_mul(g)
                .and_then(|t| t.f_sum(Kind::Float))
                .and_then(|t| t.f_backward())
                .op("relative positions backward")?;
        }
        if grad.defined() && embedded.requires_grad() {
            embedded
                .f_mul(&grad)
                .and_then(|t| t.f_sum(Kind::Float))
                .and_then(|t| t.f_backward())
                .op("embedding backward")?;
        }
        Ok(())
    }
}
