//! The objective family of DESIGN.md over per-sequence log-probabilities.
//!
//! Pairwise losses (`sigmoid`/cDPO, `robust`, `ipo`, `hinge`, each `+ nll_weight`
//! for RPO) use `Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))`;
//! `sft` is the mean token NLL of labelled responses; `combined` adds
//! `negative_weight` × the token-level unlikelihood `−Σ log(1 − p)` of negatives.
//!
//! Every term is normalised over the *global* batch — per-pair losses divided by the
//! number of pairs in it, token terms by its number of tokens — so that summing the
//! micro-batch losses (gradient accumulation) gives exactly the loss, and gradient,
//! of one forward over the whole global batch.

use dpo_data::Example;
use dpo_proto::{Loss, ObjectiveSpec};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TorchContext};
use crate::logps::{HeadGrad, SequenceBatch};
use crate::model::CausalLm;
use crate::model::llama::{Checkpointed, LayerGrads};
use crate::packing::{PackedBatch, Segment};

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// Smallest `1 − p` the unlikelihood term sees, so a negative token the model is
/// certain of gives a large but finite loss.
pub const UNLIKELIHOOD_FLOOR: f64 = 1e-6;

/// A micro-batch laid out as sequences: labelled (chosen) sequences first, then
/// negative (rejected) ones. For pairwise losses pair `i` is sequences `i` and `n + i`.
#[derive(Debug)]
pub struct MicroBatch {
    pub layout: Layout,
    /// Σ over sequences of prompt + response tokens (the same for both layouts).
    pub tokens: f64,
    /// Number of examples in the micro-batch.
    pub examples: usize,
    /// Sequences `0..chosen` are labelled responses.
    pub chosen: usize,
    /// Sequences `chosen..chosen + rejected` are negatives.
    pub rejected: usize,
    pub pairwise: bool,
}

impl MicroBatch {
    /// `pairwise`: every example must be a pair. Otherwise negatives are included
    /// only when `with_negatives` (the combined loss).
    /// `packing`: pack into rows of this many tokens (pair-aware, see
    /// [`crate::packing`]) instead of one padded row per sequence.
    pub fn new(
        examples: &[&Example],
        pairwise: bool,
        with_negatives: bool,
        packing: Option<usize>,
        device: Device,
    ) -> Result<Self> {
        // Sequences: every chosen response, then the rejected ones, in example
        // order; each example's segment lists the sequences it holds.
        let mut seqs: Vec<(&[u32], &[u32])> = Vec::new();
        let mut segments: Vec<Segment<'_>> = examples
            .iter()
            .map(|ex| Segment {
                prompt: &ex.prompt,
                responses: Vec::new(),
            })
            .collect();
        for (ex, seg) in examples.iter().zip(segments.iter_mut()) {
            if let Some(c) = &ex.chosen {
                seg.responses.push((c, seqs.len()));
                seqs.push((&ex.prompt, c));
            }
        }
        let chosen = seqs.len();
        if pairwise || with_negatives {
            for (ex, seg) in examples.iter().zip(segments.iter_mut()) {
                let take = if pairwise { 1 } else { ex.rejected.len() };
                for r in ex.rejected.iter().take(take) {
                    seg.responses.push((r, seqs.len()));
                    seqs.push((&ex.prompt, r));
                }
            }
        }
        let rejected = seqs.len() - chosen;
        let tokens = seqs.iter().map(|(p, r)| p.len() + r.len()).sum::<usize>() as f64;
        let layout = match packing {
            Some(capacity) => {
                segments.retain(|s| !s.responses.is_empty());
                Layout::Packed(PackedBatch::new(&segments, seqs.len(), capacity, device)?)
            }
            None => Layout::Padded(SequenceBatch::new(&seqs, device)?),
        };
        Ok(MicroBatch {
            layout,
            tokens,
            examples: examples.len(),
            chosen,
            rejected,
            pairwise,
        })
    }
}

/// Per-sequence results of one forward pass.
#[derive(Debug)]
pub struct SequenceScores {
    /// Σ log p over response tokens, `[n]`, differentiable.
    pub sums: Tensor,
    /// Response tokens per sequence, `[n]` f32.
    pub counts: Tensor,
    /// Per-token log-probabilities, zero outside responses, `[n, seq − 1]`.
    pub token_logps: Tensor,
    /// 1.0 on response tokens, `[n, seq − 1]`.
    pub mask: Tensor,
    /// Backward work left for after the loss's backward (chunked head,
    /// checkpointed layers): run [`Deferred::backward`] then.
    pub deferred: Deferred,
}

/// The parts of a scoring forward's backward that plain autograd cannot do,
/// in the order they run after the loss's backward: the chunked LM head
/// (recomputed chunk by chunk), then the checkpointed decoder layers
/// (recomputed layer by layer, top down).
#[derive(Debug, Default)]
pub struct Deferred {
    pub head: Option<HeadGrad>,
    pub layers: Option<Checkpointed>,
}

impl Deferred {
    /// Finishes the backward through `model` (the model that scored), the
    /// layers' gradients going where `grads` says.
    pub fn backward(self, model: &CausalLm, grads: LayerGrads<'_>) -> Result<()> {
        if let Some(head) = self.head {
            head.backward()?;
        }
        if let Some(layers) = self.layers {
            model.backward_checkpointed(layers, grads)?;
        }
        Ok(())
    }
}

/// How a micro-batch's sequences are laid out for the forward pass.
#[derive(Debug)]
pub enum Layout {
    /// One right-padded row per sequence.
    Padded(SequenceBatch),
    /// Pair-aware packed rows.
    Packed(PackedBatch),
}

/// Runs `model` on the micro-batch and scores every sequence.
pub fn score(model: &CausalLm, mb: &MicroBatch) -> Result<SequenceScores> {
    let b = match &mb.layout {
        Layout::Padded(b) => b,
        Layout::Packed(p) => return score_packed(model, p),
    };
    let (hidden, layers) = model.hidden_states(&b.input_ids, Some(&b.attention_mask))?;
    let (n, l) = b.input_ids.size2().op("score: input_ids")?;
    let h = *hidden.size().last().unwrap_or(&0);
    // Position i predicts token i + 1; only positions that predict a response
    // token reach the head, and their log-probs are scattered back in place.
    let mask = b
        .response_mask
        .f_narrow(1, 1, l - 1)
        .and_then(|m| m.f_to_kind(Kind::Float))
        .op("response mask")?;
    let (rows, targets, at) = (|| -> TchResult<(Tensor, Tensor, Tensor)> {
        let at = mask.f_reshape([-1])?.f_nonzero()?.f_squeeze_dim(1)?;
        let rows = hidden
            .f_narrow(1, 0, l - 1)?
            .f_reshape([-1, h])?
            .f_index_select(0, &at)?;
        let targets = b
            .input_ids
            .f_narrow(1, 1, l - 1)?
            .f_reshape([-1])?
            .f_index_select(0, &at)?;
        Ok((rows, targets, at))
    })()
    .op("positions that predict a response token")?;
    let (lp, head) = model.head_logps(&rows, &targets)?;
    let per_token = Tensor::f_zeros([n * (l - 1)], (Kind::Float, lp.device()))
        .and_then(|z| z.f_index_add(0, &at, &lp))
        .and_then(|t| t.f_view([n, l - 1]))
        .op("per-token log-probabilities")?;
    let sums = per_token
        .f_sum_dim_intlist(&[-1i64][..], false, Kind::Float)
        .op("sum log-probabilities")?;
    let counts = mask
        .f_sum_dim_intlist(&[-1i64][..], false, Kind::Float)
        .op("count tokens")?;
    Ok(SequenceScores {
        sums,
        counts,
        token_logps: per_token,
        mask,
        deferred: Deferred { head, layers },
    })
}

/// [`score`] on packed rows: the hidden states that predict response tokens go
/// through the head; sums and the dense per-token layout are scattered back per
/// sequence (`token_logps`/`mask` columns index the response's tokens).
fn score_packed(model: &CausalLm, p: &PackedBatch) -> Result<SequenceScores> {
    let (hidden, layers) = model.hidden_states_packed(&p.input_ids, &p.positions, &p.allowed)?;
    let h = *hidden.size().last().unwrap_or(&0);
    let picked = hidden
        .f_reshape([-1, h])
        .and_then(|x| x.f_index_select(0, &p.sources))
        .op("packed: scored positions")?;
    let (lp, head) = model.head_logps(&picked, &p.targets)?;
    let f = move || -> TchResult<SequenceScores> {
        let dev = lp.device();
        let n = p.sequences as i64;
        let ones = Tensor::f_ones_like(&lp)?;
        let sums = Tensor::f_zeros([n], (Kind::Float, dev))?.f_index_add(0, &p.owners, &lp)?;
        let counts = Tensor::f_zeros([n], (Kind::Float, dev))?.f_index_add(0, &p.owners, &ones)?;
        let dense = n * p.max_response as i64;
        let token_logps = Tensor::f_zeros([dense], (Kind::Float, dev))?
            .f_index_add(0, &p.slots, &lp)?
            .f_view([n, p.max_response as i64])?;
        let mask = Tensor::f_zeros([dense], (Kind::Float, dev))?
            .f_index_add(0, &p.slots, &ones)?
            .f_view([n, p.max_response as i64])?;
        Ok(SequenceScores {
            sums,
            counts,
            token_logps,
            mask,
            deferred: Deferred { head, layers },
        })
    };
    f().op("packed log-probabilities")
}

/// `[chosen, rejected]` Σ log p per pair, one forward over the pairs (no gradient),
/// packed into rows of `packing` tokens when given.
pub fn pair_sums(
    model: &CausalLm,
    pairs: &[&Example],
    packing: Option<usize>,
) -> Result<Vec<[f64; 2]>> {
    let _guard = tch::no_grad_guard();
    let mb = MicroBatch::new(pairs, true, false, packing, model.device())?;
    let sums = score(model, &mb)?
        .sums
        .f_to_kind(Kind::Double)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| Vec::<f64>::try_from(&t))
        .op("reading log-probabilities")?;
    let n = pairs.len();
    Ok((0..n).map(|k| [sums[k], sums[n + k]]).collect())
}

pub use dpo_data::examples::Normalizer;

/// Sums for the metrics of a step, accumulated over micro-batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// The objective's value (micro-batch contributions already normalised).
    pub loss: f64,
    pub pairs: f64,
    pub chosen_rewards: f64,
    pub rejected_rewards: f64,
    pub correct: f64,
    pub margins: f64,
    pub chosen_seqs: f64,
    pub rejected_seqs: f64,
    pub chosen_logps: f64,
    pub rejected_logps: f64,
    /// Σ token NLL of labelled responses and their token count.
    pub nll: f64,
    pub nll_tokens: f64,
    /// Σ token unlikelihood of negatives and their token count.
    pub unlikelihood: f64,
    pub unlikelihood_tokens: f64,
    /// All tokens processed (prompt + responses, no padding).
    pub tokens: f64,
}

impl Stats {
    // Positions in `to_vec`'s layout.
    const LOSS: usize = 0;
    const CHOSEN_REWARDS: usize = 2;
    const REJECTED_REWARDS: usize = 3;
    const CORRECT: usize = 4;
    const MARGINS: usize = 5;
    const CHOSEN_LOGPS: usize = 8;
    const REJECTED_LOGPS: usize = 9;
    const NLL: usize = 10;
    const NLL_TOKENS: usize = 11;
    const UNLIKELIHOOD: usize = 12;
    const UNLIKELIHOOD_TOKENS: usize = 13;

    /// The sums as a flat list, for reducing across ranks.
    pub fn to_vec(&self) -> Vec<f64> {
        vec![
            self.loss,
            self.pairs,
            self.chosen_rewards,
            self.rejected_rewards,
            self.correct,
            self.margins,
            self.chosen_seqs,
            self.rejected_seqs,
            self.chosen_logps,
            self.rejected_logps,
            self.nll,
            self.nll_tokens,
            self.unlikelihood,
            self.unlikelihood_tokens,
            self.tokens,
        ]
    }

    /// The inverse of [`Stats::to_vec`]; missing entries are zero.
    pub fn from_slice(v: &[f64]) -> Stats {
        let g = |i: usize| v.get(i).copied().unwrap_or(0.0);
        Stats {
            loss: g(0),
            pairs: g(1),
            chosen_rewards: g(2),
            rejected_rewards: g(3),
            correct: g(4),
            margins: g(5),
            chosen_seqs: g(6),
            rejected_seqs: g(7),
            chosen_logps: g(8),
            rejected_logps: g(9),
            nll: g(10),
            nll_tokens: g(11),
            unlikelihood: g(12),
            unlikelihood_tokens: g(13),
            tokens: g(14),
        }
    }

    pub fn add(&mut self, o: &Stats) {
        self.loss += o.loss;
        self.pairs += o.pairs;
        self.chosen_rewards += o.chosen_rewards;
        self.rejected_rewards += o.rejected_rewards;
        self.correct += o.correct;
        self.margins += o.margins;
        self.chosen_seqs += o.chosen_seqs;
        self.rejected_seqs += o.rejected_seqs;
        self.chosen_logps += o.chosen_logps;
        self.rejected_logps += o.rejected_logps;
        self.nll += o.nll;
        self.nll_tokens += o.nll_tokens;
        self.unlikelihood += o.unlikelihood;
        self.unlikelihood_tokens += o.unlikelihood_tokens;
        self.tokens += o.tokens;
    }

    /// TRL's metric names and values.
    pub fn metrics(&self, objective: &Objective) -> Vec<(&'static str, f64)> {
        let mean = |s: f64, n: f64| if n > 0.0 { s / n } else { 0.0 };
        let mut m = vec![("loss", self.loss)];
        if objective.loss.is_pairwise() {
            m.extend([
                ("rewards/chosen", mean(self.chosen_rewards, self.pairs)),
                ("rewards/rejected", mean(self.rejected_rewards, self.pairs)),
                ("rewards/accuracies", mean(self.correct, self.pairs)),
                ("rewards/margins", mean(self.margins, self.pairs)),
            ]);
        }
        m.push(("logps/chosen", mean(self.chosen_logps, self.chosen_seqs)));
        if self.rejected_seqs > 0.0 {
            m.push((
                "logps/rejected",
                mean(self.rejected_logps, self.rejected_seqs),
            ));
        }
        if self.nll_tokens > 0.0 {
            m.push(("nll_loss", mean(self.nll, self.nll_tokens)));
        }
        if self.unlikelihood_tokens > 0.0 {
            m.push((
                "unlikelihood_loss",
                mean(self.unlikelihood, self.unlikelihood_tokens),
            ));
        }
        m
    }
}

/// Scalars a micro-batch computes on the device for its metrics, moved to the
/// host in one transfer (one synchronisation per micro-batch, not one each).
#[derive(Debug, Default)]
struct DeviceScalars(Vec<(usize, Tensor)>);

impl DeviceScalars {
    /// Sets the `Stats` field at `slot` (a later value for a slot wins).
    fn set(&mut self, slot: usize, t: Tensor) -> TchResult<()> {
        self.0.push((slot, t.f_detach()?.f_to_kind(Kind::Float)?));
        Ok(())
    }

    fn fetch_into(self, stats: &mut Stats) -> TchResult<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let (slots, values): (Vec<usize>, Vec<Tensor>) = self.0.into_iter().unzip();
        let host = Tensor::f_stack(&values, 0)?
            .f_to_kind(Kind::Double)?
            .f_to_device(tch::Device::Cpu)?;
        let host = Vec::<f64>::try_from(&host)?;
        let mut v = stats.to_vec();
        for (slot, x) in slots.into_iter().zip(host) {
            v[slot] = x;
        }
        *stats = Stats::from_slice(&v);
        Ok(())
    }
}

/// A configured objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub loss: Loss,
    pub beta: f64,
    pub label_smoothing: f64,
    pub nll_weight: f64,
    pub negative_weight: f64,
}

impl Objective {
    pub fn from_spec(spec: &ObjectiveSpec) -> Self {
        Objective {
            loss: spec.loss,
            beta: spec.beta,
            label_smoothing: spec.label_smoothing,
            nll_weight: spec.nll_weight,
            negative_weight: spec.negative_weight,
        }
    }

    /// Pairwise losses compare against a reference model.
    pub fn needs_reference(&self) -> bool {
        self.loss.is_pairwise()
    }

    /// IPO works on log-probabilities averaged over response tokens (as TRL).
    pub fn length_normalized(&self) -> bool {
        self.loss == Loss::Ipo
    }

    /// Per-pair loss from `x = Δ` (policy minus reference log-ratio), `[n]`.
    pub fn pair_losses(&self, x: &Tensor) -> TchResult<Tensor> {
        let (b, e) = (self.beta, self.label_smoothing);
        let bx = x.f_mul_scalar(b)?;
        let logsig_pos = bx.f_log_sigmoid()?;
        let logsig_neg = bx.f_neg()?.f_log_sigmoid()?;
        match self.loss {
            Loss::Sigmoid => logsig_pos
                .f_mul_scalar(-(1.0 - e))?
                .f_sub(&logsig_neg.f_mul_scalar(e)?),
            Loss::Robust => logsig_pos
                .f_mul_scalar(-(1.0 - e))?
                .f_add(&logsig_neg.f_mul_scalar(e)?)?
                .f_div_scalar(1.0 - 2.0 * e),
            Loss::Ipo => x.f_sub_scalar(1.0 / (2.0 * b))?.f_square(),
            Loss::Hinge => bx.f_neg()?.f_add_scalar(1.0)?.f_relu(),
            Loss::Sft | Loss::Combined => x.f_zeros_like(),
        }
    }

    /// The micro-batch's share of the global-batch loss (differentiable) and its
    /// metric sums. `reference` holds reference Σ log p per sequence (`[n]`, no grad),
    /// or `None` for reference-free training.
    pub fn micro_batch_loss(
        &self,
        mb: &MicroBatch,
        scores: &SequenceScores,
        reference: Option<&Tensor>,
        norm: &Normalizer,
    ) -> Result<(Tensor, Stats)> {
        let f = || -> TchResult<(Tensor, Stats)> {
            let dev = scores.sums.device();
            let mut stats = Stats {
                tokens: mb.tokens,
                ..Default::default()
            };
            let mut loss = Tensor::f_zeros([], (Kind::Float, dev))?;
            let (c, r) = (mb.chosen as i64, mb.rejected as i64);
            let chosen_sums = scores.sums.f_narrow(0, 0, c)?;
            let rejected_sums = scores.sums.f_narrow(0, c, r)?;
            stats.chosen_seqs = c as f64;
            stats.rejected_seqs = r as f64;
            let mut dev = DeviceScalars::default();
            dev.set(Stats::CHOSEN_LOGPS, chosen_sums.f_sum(Kind::Float)?)?;
            dev.set(Stats::REJECTED_LOGPS, rejected_sums.f_sum(Kind::Float)?)?;

            // NLL of labelled tokens: needed by sft/combined and by RPO.
            let chosen_nll = chosen_sums.f_sum(Kind::Float)?.f_neg()?;
            if c > 0 && (!self.loss.is_pairwise() || self.nll_weight > 0.0) {
                dev.set(Stats::NLL, chosen_nll.shallow_clone())?;
                dev.set(
                    Stats::NLL_TOKENS,
                    scores.counts.f_narrow(0, 0, c)?.f_sum(Kind::Float)?,
                )?;
            }

            if self.loss.is_pairwise() {
                let per_seq = if self.length_normalized() {
                    scores.sums.f_div(&scores.counts)?
                } else {
                    scores.sums.shallow_clone()
                };
                let ref_seq = match reference {
                    Some(t) if self.length_normalized() => t.f_div(&scores.counts)?,
                    Some(t) => t.shallow_clone(),
                    None => per_seq.f_zeros_like()?,
                };
                let pc = per_seq.f_narrow(0, 0, c)?;
                let pr = per_seq.f_narrow(0, c, r)?;
                let rc = ref_seq.f_narrow(0, 0, c)?;
                let rr = ref_seq.f_narrow(0, c, r)?;
                let chosen_logratio = pc.f_sub(&rc)?;
                let rejected_logratio = pr.f_sub(&rr)?;
                let delta = chosen_logratio.f_sub(&rejected_logratio)?;
                let losses = self.pair_losses(&delta)?;
                loss = loss.f_add(&losses.f_sum(Kind::Float)?.f_div_scalar(norm.examples)?)?;
                if self.nll_weight > 0.0 && norm.chosen_tokens > 0.0 {
                    loss = loss
                        .f_add(&chosen_nll.f_mul_scalar(self.nll_weight / norm.chosen_tokens)?)?;
                }
                let cr = chosen_logratio.f_detach()?.f_mul_scalar(self.beta)?;
                let rj = rejected_logratio.f_detach()?.f_mul_scalar(self.beta)?;
                stats.pairs = c as f64;
                dev.set(Stats::CHOSEN_REWARDS, cr.f_sum(Kind::Float)?)?;
                dev.set(Stats::REJECTED_REWARDS, rj.f_sum(Kind::Float)?)?;
                dev.set(Stats::CORRECT, cr.f_gt_tensor(&rj)?.f_sum(Kind::Float)?)?;
                dev.set(Stats::MARGINS, cr.f_sub(&rj)?.f_sum(Kind::Float)?)?;
                if self.length_normalized() {
                    // logps/* follow the values the loss used, as TRL reports them
                    // (set after the sums above, so these win).
                    dev.set(Stats::CHOSEN_LOGPS, pc.f_sum(Kind::Float)?)?;
                    dev.set(Stats::REJECTED_LOGPS, pr.f_sum(Kind::Float)?)?;
                }
            } else {
                if norm.chosen_tokens > 0.0 {
                    loss = loss.f_add(&chosen_nll.f_div_scalar(norm.chosen_tokens)?)?;
                }
                if self.loss == Loss::Combined && r > 0 && norm.negative_tokens > 0.0 {
                    // −Σ log(1 − p) over negative tokens.
                    let neg_logps = scores.token_logps.f_narrow(0, c, r)?;
                    let neg_mask = scores.mask.f_narrow(0, c, r)?;
                    let one_minus_p = neg_logps
                        .f_exp()?
                        .f_neg()?
                        .f_add_scalar(1.0)?
                        .f_clamp_min(UNLIKELIHOOD_FLOOR)?;
                    let ul = one_minus_p
                        .f_log()?
                        .f_mul(&neg_mask)?
                        .f_sum(Kind::Float)?
                        .f_neg()?;
                    dev.set(Stats::UNLIKELIHOOD, ul.shallow_clone())?;
                    dev.set(Stats::UNLIKELIHOOD_TOKENS, neg_mask.f_sum(Kind::Float)?)?;
                    loss =
                        loss.f_add(&ul.f_mul_scalar(self.negative_weight / norm.negative_tokens)?)?;
                }
            }
            dev.set(Stats::LOSS, loss.shallow_clone())?;
            dev.fetch_into(&mut stats)?;
            Ok((loss, stats))
        };
        f().op("objective")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(loss: Loss, beta: f64, eps: f64) -> Objective {
        Objective {
            loss,
            beta,
            label_smoothing: eps,
            nll_weight: 0.0,
            negative_weight: 1.0,
        }
    }

    fn ls(x: f64) -> f64 {
        // log σ(x)
        -(1.0 + (-x).exp()).ln()
    }

    /// Each pairwise loss against its formula evaluated by hand.
    #[test]
    fn pair_losses_match_the_papers_formulas() {
        let xs = [-3.0, -0.5, 0.0, 0.7, 4.0];
        let x = Tensor::from_slice(&xs).to_kind(Kind::Float);
        let (b, e) = (0.3, 0.1);
        type Formula = Box<dyn Fn(f64) -> f64>;
        let cases: Vec<(Objective, Formula)> = vec![
            (obj(Loss::Sigmoid, b, 0.0), Box::new(move |d| -ls(b * d))),
            (
                obj(Loss::Sigmoid, b, e),
                Box::new(move |d| -(1.0 - e) * ls(b * d) - e * ls(-b * d)),
            ),
            (
                obj(Loss::Robust, b, e),
                Box::new(move |d| (-(1.0 - e) * ls(b * d) + e * ls(-b * d)) / (1.0 - 2.0 * e)),
            ),
            (
                obj(Loss::Ipo, b, 0.0),
                Box::new(move |d| (d - 1.0 / (2.0 * b)).powi(2)),
            ),
            (
                obj(Loss::Hinge, b, 0.0),
                Box::new(move |d| (1.0 - b * d).max(0.0)),
            ),
        ];
        for (o, formula) in cases {
            let got = Vec::<f64>::try_from(o.pair_losses(&x).expect("loss").to_kind(Kind::Double))
                .expect("vec");
            for (d, g) in xs.iter().zip(got) {
                let want = formula(*d);
                assert!(
                    (g - want).abs() < 1e-5,
                    "{:?} eps {} at Δ={d}: {g} vs {want}",
                    o.loss,
                    o.label_smoothing
                );
            }
        }
    }
}
