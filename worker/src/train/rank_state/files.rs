//! The optimizer state in checkpoints: whole (`optimizer.safetensors`) or,
//! under ZeRO, one file per rank's share with a `partition.json`; restored
//! whole or as this rank's share under the current world's partition.

use std::path::Path;

use serde_json::{Value, json};
use tch::Tensor;

use super::RankState;
use crate::error::{Error, Result, io_err};
use crate::model::checkpoint as model_io;
use crate::train::checkpoint::{PARTITION_FILE, ShardedState, shard_file, sync_dir, to_device};
use crate::zero::Partition;

impl RankState {
    /// Loads the optimizer state of checkpoint `dir` at `step` (every rank):
    /// under ZeRO in a world of more than one, only this rank's share under
    /// the current world's partition (a sharded checkpoint of any world is
    /// re-cut); otherwise whole. Whatever share this rank held is dropped.
    pub fn restore_optimizer(&mut self, dir: &Path, step: u64, device: tch::Device) -> Result<()> {
        if self.zero.take().is_some() {
            self.optimizer.reset()?;
        }
        if dir.join("optimizer").join(PARTITION_FILE).exists() {
            let sharded = ShardedState::open(&dir.join("optimizer"))?;
            if self.stage > 0 && self.collective.world_size() > 1 {
                return self.restore_shares(&sharded, step);
            }
            let whole = sharded.whole(self.optimizer.names(), self.optimizer.params())?;
            self.optimizer.load_state(step, to_device(whole, device)?)
        } else {
            let path = dir.join("optimizer.safetensors");
            let tensors = to_device(model_io::read_tensors(&path)?, device)?;
            self.optimizer.load_state(step, tensors)
        }
    }

    /// This rank's share (and replica) under the partition of the current
    /// world, read from a sharded checkpoint's files: only the pieces it owns.
    fn restore_shares(&mut self, sharded: &ShardedState, step: u64) -> Result<()> {
        let (world, rank) = (self.collective.world_size(), self.collective.rank());
        let params = self.optimizer.params();
        let names = self.optimizer.names();
        let partition = Partition::new(params, names, world, rank, self.replicas);
        let pieces = partition.pieces(params);
        let copies = partition.replica_pieces(params);
        let own = sharded.pieces(names, params, &pieces)?;
        let replica = sharded.pieces(names, params, &copies)?;
        if self.adamw && step > 0 {
            for &(i, _, _) in pieces.iter().chain(&copies) {
                for kind in ["exp_avg", "exp_avg_sq"] {
                    let has = own
                        .iter()
                        .chain(&replica)
                        .any(|(k, j, _)| *k == kind && *j == i);
                    if !has {
                        return Err(Error::Config {
                            path: sharded.dir.join(PARTITION_FILE),
                            reason: format!("no {kind} for parameter {}", names[i]),
                        });
                    }
                }
            }
        }
        self.optimizer
            .install_pieces(&pieces, own, &copies, replica)?;
        self.optimizer.step = step;
        tracing::info!(
            world,
            rank,
            from_world = sharded.world,
            pieces = pieces.len(),
            "restored this rank's share of a sharded checkpoint"
        );
        self.zero = Some(partition);
        Ok(())
    }

    /// Writes the optimizer state into the checkpoint being assembled in
    /// `tmp` (every rank calls it; rank 0 made `tmp`). Whole: rank 0 writes
    /// `optimizer.safetensors`. Under ZeRO: rank 0 makes `tmp/optimizer/`,
    /// once every rank is past a barrier each writes its own share, and
    /// after a second one rank 0 adds `partition.json`. Returns whether this
    /// rank finishes the checkpoint (rank 0).
    pub fn write_optimizer(&mut self, tmp: &Path) -> Result<bool> {
        let Some(z) = &self.zero else {
            if self.collective.rank() == 0 {
                model_io::write_tensors(
                    &tmp.join("optimizer.safetensors"),
                    &self.optimizer.state(),
                )?;
            }
            return Ok(self.collective.rank() == 0);
        };
        let (world, rank) = (z.world(), z.rank());
        let shards = tmp.join("optimizer");
        if rank == 0 {
            std::fs::create_dir_all(&shards).map_err(io_err(&shards))?;
        }
        self.collective.barrier()?;
        let names = self.optimizer.names();
        let mine: Vec<(String, Tensor)> = self
            .optimizer
            .piece_states(false)
            .into_iter()
            .map(|(kind, i, _, t)| (format!("{kind}.{}", names[i]), t))
            .collect();
        model_io::write_tensors(&shards.join(shard_file(rank, world)), &mine)?;
        drop(mine);
        self.collective.barrier()?;
        if rank != 0 {
            return Ok(false);
        }
        let params = self.optimizer.params();
        let ranks: Vec<Value> = (0..world)
            .map(|r| {
                let pieces: Vec<Value> = z
                    .owners_pieces(params, r)
                    .into_iter()
                    .map(|(i, offset, len)| json!({"name": names[i], "offset": offset, "len": len}))
                    .collect();
                json!({"file": shard_file(r, world), "pieces": pieces})
            })
            .collect();
        let sizes: serde_json::Map<String, Value> = names
            .iter()
            .zip(params)
            .map(|(n, p)| (n.clone(), json!(p.numel())))
            .collect();
        model_io::write_json(
            &shards.join(PARTITION_FILE),
            &json!({"world": world, "stage": self.stage, "elements": sizes, "ranks": ranks}),
        )?;
        sync_dir(&shards)?;
        Ok(true)
    }
}
