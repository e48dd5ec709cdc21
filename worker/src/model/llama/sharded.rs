//! ZeRO stage 3's sharded frozen base: each rank holds its share of the decoder
//! layers' weights, read from the model's files, and a layer's weights are
//! made whole just before they are used by a [`LayerGather`] the training side
//! lends the model while it runs (the model knows no collective).

use super::*;

/// The decoder layers' (frozen) parameters under ZeRO stage 3: each rank of a
/// world of `W` keeps chunk `rank` of each layer's flattened parameters;
/// a layer's parameters are all-gathered just before it runs (forward, or
/// recomputation in the backward) and dropped right after.
pub(super) struct ShardedBase {
    /// Per layer: its parameters `(name, shape, tensor)`, in name order.
    pub(super) layers: Vec<Vec<(String, Vec<i64>, Tensor)>>,
    /// Per layer: this rank's chunk (`None` until sharded for a world).
    pub(super) shards: Vec<Option<Tensor>>,
    pub(super) world: usize,
    pub(super) rank: usize,
    /// Where the other shares come from, lent by the trainer while the model runs.
    pub(super) lent: std::sync::Mutex<Option<Box<dyn LayerGather>>>,
}

/// A sharded layer's whole weights, from this rank's share and the others'
/// (ZeRO stage 3: the training side all-gathers them over its world). Lent
/// to the model while it runs ([`CausalLm::lend_gather`]); the model asks
/// for each layer it is about to run and never sees how shares travel.
pub trait LayerGather: Send + std::any::Any {
    /// The `n` elements of a layer's flattened weights, given this rank's
    /// `share` of them (elements `start..start + share.len()`).
    fn gather(&mut self, n: usize, start: usize, share: &[f32]) -> Result<Vec<f32>>;
    /// Back to the lender's own type.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

impl ShardedBase {
    /// Makes layer `l`'s parameters whole: every rank's share, all-gathered
    /// through the lent collective (a world of one holds them all).
    pub(super) fn gather(&self, l: usize) -> Result<()> {
        let params = &self.layers[l];
        let Some(shard) = &self.shards[l] else {
            return Err(crate::error::Error::State(
                "ZeRO stage 3: the frozen base was not sharded for this world",
            ));
        };
        let n: usize = params
            .iter()
            .map(|(_, s, _)| s.iter().product::<i64>() as usize)
            .sum();
        let (kind, device) = (shard.kind(), shard.device());
        let flat = if self.world <= 1 {
            shard.shallow_clone()
        } else {
            let (start, len) = crate::collective::chunk(n, self.world, self.rank);
            let mine = Vec::<f32>::try_from(
                &shard
                    .f_to_kind(Kind::Float)
                    .and_then(|t| t.f_to_device(Device::Cpu))
                    .op("stage 3: share")?,
            )
            .op("stage 3: share")?;
            if mine.len() != len {
                return Err(crate::error::Error::State(
                    "ZeRO stage 3: this rank's share has another size than its chunk",
                ));
            }
            let mut lent = self
                .lent
                .lock()
                .map_err(|_| crate::error::Error::State("ZeRO stage 3: gather lock"))?;
            let Some(source) = lent.as_mut() else {
                return Err(crate::error::Error::State(
                    "ZeRO stage 3: nothing lent to gather a layer with",
                ));
            };
            let values = source.gather(n, start, &mine)?;
            if values.len() != n {
                return Err(crate::error::Error::State(
                    "ZeRO stage 3: a gathered layer has another size than the layer",
                ));
            }
            Tensor::f_from_slice(&values)
                .and_then(|t| t.f_to_kind(kind))
                .and_then(|t| t.f_to_device(device))
                .op("stage 3: gathered layer")?
        };
        let mut at = 0i64;
        for (_, shape, t) in params {
            let size: i64 = shape.iter().product();
            let whole = flat
                .f_narrow(0, at, size)
                .and_then(|v| v.f_view(shape.as_slice()))
                .op("stage 3: gathered layer")?;
            t.shallow_clone()
                .f_set_data(&whole)
                .op("stage 3: gathered layer")?;
            at += size;
        }
        Ok(())
    }

    /// Drops layer `l`'s whole parameters again (the share stays).
    pub(super) fn release(&self, l: usize) -> Result<()> {
        for (_, _, t) in &self.layers[l] {
            let empty = Tensor::f_zeros([0], (t.kind(), t.device())).op("stage 3: release")?;
            t.shallow_clone()
                .f_set_data(&empty)
                .op("stage 3: release")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ShardedBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedBase")
            .field("layers", &self.layers.len())
            .field("world", &self.world)
            .field("rank", &self.rank)
            .finish()
    }
}

impl CausalLm {
    /// The names of the parameters ZeRO stage 3 shards (the decoder layers').
    pub fn sharded_names(&self) -> Vec<String> {
        self.sharded
            .iter()
            .flat_map(|s| s.layers.iter().flatten().map(|(n, _, _)| n.clone()))
            .collect()
    }

    /// Gives this rank its share, for rank `rank` of `world`, of every decoder
    /// layer's parameters, read from the checkpoint `files` (the frozen base:
    /// only the elements of the share are read). Again after a world change.
    pub fn shard_base(
        &mut self,
        files: &crate::model::checkpoint::TensorIndex,
        world: usize,
        rank: usize,
    ) -> Result<()> {
        let kind = self.kind;
        let device = self.device();
        let Some(sh) = self.sharded.as_mut() else {
            return Ok(());
        };
        if sh.world == world && sh.rank == rank && sh.shards.iter().all(Option::is_some) {
            return Ok(());
        }
        let mut bytes = 0usize;
        for (l, params) in sh.layers.iter().enumerate() {
            let n: usize = params
                .iter()
                .map(|(_, s, _)| s.iter().product::<i64>() as usize)
                .sum();
            let (start, len) = crate::collective::chunk(n, world, rank);
            let mut pieces = Vec::new();
            let mut at = 0usize;
            for (name, shape, _) in params {
                let size = shape.iter().product::<i64>() as usize;
                if let Some(found) = files.shape(name)
                    && found != shape.as_slice()
                {
                    return Err(crate::error::Error::TensorShape {
                        path: std::path::PathBuf::from(name),
                        name: name.clone(),
                        expected: shape.clone(),
                        found: found.to_vec(),
                    });
                }
                let (from, to) = (start.max(at), (start + len).min(at + size));
                if from < to {
                    pieces.push(files.read_range(
                        name,
                        (from - at) as i64,
                        (to - from) as i64,
                        kind,
                    )?);
                }
                at += size;
            }
            let shard = if pieces.is_empty() {
                Tensor::f_zeros([0], (kind, device))
            } else {
                Tensor::f_cat(&pieces, 0).and_then(|t| t.f_to_device(device))
            }
            .op("stage 3: this rank's share")?;
            bytes += shard.numel() * kind.elt_size_in_bytes();
            sh.shards[l] = Some(shard);
        }
        sh.world = world;
        sh.rank = rank;
        tracing::info!(
            world,
            rank,
            bytes,
            "ZeRO stage 3: this rank holds its share of the frozen base"
        );
        Ok(())
    }

    /// Lends the model what makes its sharded layers whole while it runs
    /// (ZeRO stage 3); [`CausalLm::take_gather`] returns it.
    pub fn lend_gather(&self, source: Box<dyn LayerGather>) {
        if let Some(sh) = &self.sharded
            && let Ok(mut l) = sh.lent.lock()
        {
            *l = Some(source);
        }
    }

    /// What [`CausalLm::lend_gather`] lent.
    pub fn take_gather(&self) -> Option<Box<dyn LayerGather>> {
        self.sharded
            .as_ref()
            .and_then(|sh| sh.lent.lock().ok().and_then(|mut l| l.take()))
    }

    /// Whether the decoder layers are sharded (ZeRO stage 3).
    pub fn is_sharded(&self) -> bool {
        self.sharded.is_some()
    }
}
