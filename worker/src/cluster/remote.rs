//! Where a cluster rank's batches come from: the coordinator, over gRPC —
//! preference examples for the causal LMs, tagged examples for the encoders.

use super::*;

/// Batches served by the coordinator.
pub(super) struct RemoteBatches {
    pub(super) rt: tokio::runtime::Handle,
    pub(super) client: Client,
    pub(super) worker_id: String,
    pub(super) run_id: String,
    pub(super) shared: Arc<Shared>,
    /// The eval slice of the current (generation, rank), fetched once.
    pub(super) eval_cache: Option<(u64, Slice)>,
    /// A classification run's eval share of the current (generation, rank).
    pub(super) tagged_eval_cache: Option<(u64, Vec<Encoded>)>,
}

pub(super) fn from_proto(e: v1::Example) -> Example {
    Example {
        line: e.line as usize,
        prompt: e.prompt,
        chosen: e.chosen.map(|s| s.ids),
        rejected: e.rejected.into_iter().map(|s| s.ids).collect(),
    }
}

impl RemoteBatches {
    /// This rank's batch of `split` at `step`, as the coordinator serves it.
    fn fetch_raw(&mut self, split: v1::Split, step: u64) -> Result<v1::Batch> {
        let (generation, rank, signal) = {
            let c = self
                .shared
                .current
                .lock()
                .map_err(|_| Error::State("poisoned generation record"))?;
            (c.generation, c.rank, c.signal.clone())
        };
        let req = v1::FetchBatchRequest {
            member: Some(v1::Member {
                worker_id: self.worker_id.clone(),
                run_id: self.run_id.clone(),
                generation,
                rank,
            }),
            step,
            split: split as i32,
        };
        let client = self.client.clone();
        call(&self.rt, &signal, "fetch batch", || {
            let mut c = client.clone();
            let r = req.clone();
            async move { c.fetch_batch(r).await }
        })
    }

    fn fetch(&mut self, split: v1::Split, step: u64) -> Result<Slice> {
        let batch = self.fetch_raw(split, step)?;
        let reference = if batch.reference_chosen.len() == batch.examples.len()
            && batch.reference_rejected.len() == batch.examples.len()
        {
            batch
                .reference_chosen
                .iter()
                .zip(&batch.reference_rejected)
                .map(|(&c, &r)| [c, r])
                .collect()
        } else {
            Vec::new()
        };
        Ok(Slice {
            reference,
            examples: batch.examples.into_iter().map(from_proto).collect(),
            indices: batch.indices.iter().map(|&i| i as usize).collect(),
            norm: Normalizer {
                examples: batch.total_examples,
                chosen_tokens: batch.total_chosen_tokens,
                negative_tokens: batch.total_negative_tokens,
            },
        })
    }
}

impl Batches for RemoteBatches {
    fn train(&mut self, step: u64, _rank: usize, _world: usize) -> Result<Slice> {
        self.fetch(v1::Split::Train, step)
    }

    fn eval(&mut self, _rank: usize, _world: usize) -> Result<Option<Slice>> {
        let generation = self.shared.current.lock().map_or(0, |c| c.generation);
        if let Some((g, s)) = &self.eval_cache
            && *g == generation
        {
            return Ok(Some(s.clone()));
        }
        let slice = self.fetch(v1::Split::Eval, 0)?;
        self.eval_cache = Some((generation, slice.clone()));
        Ok(Some(slice))
    }
}

fn from_tagged_proto(e: v1::TaggedExample) -> Encoded {
    Encoded {
        line: e.line as usize,
        input_ids: e.input_ids,
        targets: e
            .target_positions
            .into_iter()
            .zip(e.target_labels)
            .collect(),
        negatives: e
            .negative_positions
            .into_iter()
            .zip(e.negative_labels)
            .collect(),
        word_starts: e.word_starts,
        gold: e.gold,
    }
}

impl TaggedSource for RemoteBatches {
    fn train(&mut self, step: u64, _rank: usize, _world: usize) -> Result<(Vec<Encoded>, Norm)> {
        let batch = self.fetch_raw(v1::Split::Train, step)?;
        let norm = Norm {
            targets: batch.total_targets,
            negatives: batch.total_negatives,
        };
        Ok((
            batch.tagged.into_iter().map(from_tagged_proto).collect(),
            norm,
        ))
    }

    fn eval(&mut self, _rank: usize, _world: usize) -> Result<Vec<Encoded>> {
        let generation = self.shared.current.lock().map_or(0, |c| c.generation);
        if let Some((g, share)) = &self.tagged_eval_cache
            && *g == generation
        {
            return Ok(share.clone());
        }
        let batch = self.fetch_raw(v1::Split::Eval, 0)?;
        let share: Vec<Encoded> = batch.tagged.into_iter().map(from_tagged_proto).collect();
        self.tagged_eval_cache = Some((generation, share.clone()));
        Ok(share)
    }
}
