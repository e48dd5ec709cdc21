//! The data plane: a run's datasets tokenized and sharded once at submit
//! (preference pairs, or tagged examples for classification), the shards
//! reopened after a restart, and each rank's share of a batch cut from them.

use std::path::Path;
use std::sync::Arc;

use dpo_data::Example;
use dpo_data::batches::{Shares, shares};

use dpo_proto::{RunSpec, v1};

use crate::engine::reference::{ReferenceStage, to_proto_example};
use crate::engine::{Refusal, Result, RunData, RunRecord, TaggedData};

/// The run's reference stage, or why it has none.
pub(super) fn stage_of<'a>(data: &'a RunData, run: &str) -> Result<&'a ReferenceStage> {
    data.reference.as_ref().ok_or_else(|| {
        Refusal::Invalid(format!(
            "run {run} has no reference stage (reference.precompute is off)"
        ))
    })
}

/// The rank's share of a global batch (train) or of the eval set, with the
/// reference sums when the stage has them all.
pub(crate) fn batch_of(
    data: &RunData,
    req: &v1::FetchBatchRequest,
    rank: usize,
    world: usize,
    total: u64,
) -> Result<v1::Batch> {
    if let Some(tagged) = &data.tagged {
        return tagged_batch_of(data, tagged, req, rank, world, total);
    }
    let eval = req.split == v1::Split::Eval as i32;
    if !eval && req.step >= total {
        return Err(Refusal::Invalid(format!(
            "step {} is past the run's {total} steps",
            req.step
        )));
    }
    let pool = if eval { &data.eval } else { &data.train };
    let (split, epoch) = split_of(data, eval, req.step, world)?;
    let indices = split.by_rank.get(rank).cloned().unwrap_or_default();
    let examples: Vec<Example> = indices
        .iter()
        .filter_map(|&i| pool.get(i).cloned())
        .collect();
    let norm = split.norm;
    let (mut reference_chosen, mut reference_rejected) = (Vec::new(), Vec::new());
    if let Some(stage) = &data.reference
        && let Some(sums) = stage.sums_of(&examples)?
    {
        reference_chosen = sums.iter().map(|s| s[0]).collect();
        reference_rejected = sums.iter().map(|s| s[1]).collect();
    }
    Ok(v1::Batch {
        examples: examples.iter().map(to_proto_example).collect(),
        reference_chosen,
        reference_rejected,
        indices: indices.iter().map(|&i| i as u64).collect(),
        total_examples: norm.examples,
        total_chosen_tokens: norm.chosen_tokens,
        total_negative_tokens: norm.negative_tokens,
        epoch,
        ..Default::default()
    })
}

/// The split among `world` ranks of step `step`'s global batch (or of the
/// eval set), with the step's epoch: the run's last split when it is that
/// one, else made (once: the ranks of a step ask in turn) and kept.
fn split_of(data: &RunData, eval: bool, step: u64, world: usize) -> Result<(Arc<Shares>, u64)> {
    let plan = || {
        data.plan
            .lock()
            .map_err(|_| Refusal::Internal("poisoned plan".into()))
    };
    let key = (i32::from(eval), if eval { 0 } else { step }, world);
    let mut memo = data
        .shares
        .lock()
        .map_err(|_| Refusal::Internal("poisoned shares".into()))?;
    let epoch = if eval { 0 } else { plan()?.position(step).0 };
    if let Some((k, split)) = memo.as_ref()
        && *k == key
    {
        return Ok((split.clone(), epoch));
    }
    let (pool, idx) = if eval {
        (&data.eval, (0..data.eval.len()).collect())
    } else {
        (&data.train, plan()?.indices(step))
    };
    let split = Arc::new(shares(pool, &idx, data.count_negatives, world));
    *memo = Some((key, split.clone()));
    Ok((split, epoch))
}

/// A classification run's batch: this rank's contiguous share of the global
/// batch of `req.step` (or of the eval split), with the global batch's totals.
pub(super) fn tagged_batch_of(
    data: &RunData,
    tagged: &TaggedData,
    req: &v1::FetchBatchRequest,
    rank: usize,
    world: usize,
    total: u64,
) -> Result<v1::Batch> {
    use dpo_data::batches::rank_range;
    let (pool, idx, epoch) = if req.split == v1::Split::Eval as i32 {
        (&tagged.eval, (0..tagged.eval.len()).collect::<Vec<_>>(), 0)
    } else {
        if req.step >= total {
            return Err(Refusal::Invalid(format!(
                "step {} is past the run's {total} steps",
                req.step
            )));
        }
        let mut plan = data
            .plan
            .lock()
            .map_err(|_| Refusal::Internal("poisoned plan".into()))?;
        (
            &tagged.train,
            plan.indices(req.step),
            plan.position(req.step).0,
        )
    };
    let (start, len) = rank_range(idx.len(), world, rank);
    let mine = &idx[start..start + len];
    let count = |f: fn(&dpo_data::tagged::Encoded) -> usize| -> f64 {
        idx.iter().map(|&i| f(&pool[i])).sum::<usize>() as f64
    };
    Ok(v1::Batch {
        tagged: mine.iter().map(|&i| to_tagged_proto(&pool[i])).collect(),
        indices: mine.iter().map(|&i| i as u64).collect(),
        total_targets: count(|e| e.targets.len()),
        total_negatives: count(|e| e.negatives.len()),
        total_examples: idx.len() as f64,
        epoch,
        ..Default::default()
    })
}

fn to_tagged_proto(e: &dpo_data::tagged::Encoded) -> v1::TaggedExample {
    v1::TaggedExample {
        line: e.line as u64,
        input_ids: e.input_ids.clone(),
        target_positions: e.targets.iter().map(|t| t.0).collect(),
        target_labels: e.targets.iter().map(|t| t.1).collect(),
        negative_positions: e.negatives.iter().map(|t| t.0).collect(),
        negative_labels: e.negatives.iter().map(|t| t.1).collect(),
        word_starts: e.word_starts.clone(),
        gold: e.gold.clone(),
    }
}

/// Tokenizes and shards a run's datasets (train and eval) once.
pub(super) fn prepare(spec: &RunSpec, shard_dir: &Path, cache_root: &Path) -> Result<RunData> {
    if spec.task.kind.is_classification() {
        return prepare_tagged(spec, shard_dir);
    }
    if spec.data.negatives == Some(dpo_proto::Negatives::Policy) {
        return Err(Refusal::Invalid(
            "data.negatives: \"policy\" negatives need a model to sample from; the cluster does not sample them yet (use `dpo-worker train`)".into(),
        ));
    }
    let tokenizer = if dpo_data::TextTokenizer::present(&spec.model.path) {
        Some(
            dpo_data::TextTokenizer::from_dir(&spec.model.path)
                .map_err(|e| Refusal::Invalid(e.to_string()))?,
        )
    } else {
        None
    };
    let vocab = dpo_data::confined::read(&spec.model.path.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("vocab_size").and_then(serde_json::Value::as_i64));
    let invalid = |e: dpo_data::Error| Refusal::Invalid(e.to_string());
    // One layout for the run's datasets: data.limits bound them together.
    let layout = dpo_data::records::Layout::of(&spec.data);
    let (train, _) = dpo_data::dataset::load(
        spec,
        &layout,
        &spec.data.train,
        tokenizer.as_ref(),
        vocab,
        true,
        None,
    )
    .map_err(invalid)?;
    let eval = match &spec.data.eval {
        Some(path) => {
            dpo_data::dataset::load(spec, &layout, path, tokenizer.as_ref(), vocab, false, None)
                .map_err(invalid)?
                .0
        }
        None => Vec::new(),
    };
    std::fs::create_dir_all(shard_dir)
        .map_err(|e| Refusal::Internal(format!("{}: {e}", shard_dir.display())))?;
    dpo_data::shard::write(&shard_dir.join("train.shard"), &train)
        .map_err(|e| Refusal::Internal(e.to_string()))?;
    dpo_data::shard::write(&shard_dir.join("eval.shard"), &eval)
        .map_err(|e| Refusal::Internal(e.to_string()))?;
    let n = train.len();
    let mut data = RunData::new(spec, train, eval).ok_or_else(|| {
        Refusal::Invalid(format!(
            "train.global_batch_size: {} exceeds the {n} usable training examples of {}",
            spec.train.global_batch_size,
            spec.data.train.display()
        ))
    })?;
    data.reference = ReferenceStage::open(spec, cache_root)
        .map_err(|e| Refusal::Invalid(format!("reference.precompute: {e}")))?;
    Ok(data)
}

/// A classification run's data: read, checked, labels fixed, encoded with the
/// model's tokenizer once, and kept in the run's shard directory.
pub(super) fn prepare_tagged(spec: &RunSpec, shard_dir: &Path) -> Result<RunData> {
    use dpo_data::task_data;
    let invalid = |e: dpo_data::Error| Refusal::Invalid(e.to_string());
    let tokenizer = dpo_data::TextTokenizer::from_dir(&spec.model.path).map_err(invalid)?;
    let max_positions = task_data::max_positions(&spec.model.path).map_err(invalid)?;
    let data = task_data::load(spec, &tokenizer, max_positions).map_err(invalid)?;
    let tagged = TaggedData {
        labels: data.labels.names().to_vec(),
        train: data.train.examples,
        eval: data.eval.map(|e| e.examples).unwrap_or_default(),
    };
    std::fs::create_dir_all(shard_dir)
        .map_err(|e| Refusal::Internal(format!("{}: {e}", shard_dir.display())))?;
    dpo_data::tagged::write_shard(
        &shard_dir.join(TAGGED_SHARD),
        &tagged.labels,
        &tagged.train,
        &tagged.eval,
    )
    .map_err(|e| Refusal::Internal(e.to_string()))?;
    let n = tagged.train.len();
    RunData::new_tagged(spec, tagged).ok_or_else(|| {
        Refusal::Invalid(format!(
            "train.global_batch_size: {} exceeds the {n} training examples of {}",
            spec.train.global_batch_size,
            spec.data.train.display()
        ))
    })
}

/// A classification run's encoded examples and labels in its shard directory.
const TAGGED_SHARD: &str = "tagged.shard";

pub(super) fn load_shards(
    record: &RunRecord,
    cache_root: &Path,
) -> std::result::Result<RunData, dpo_data::Error> {
    if record.spec.task.kind.is_classification() {
        let path = record.shard_dir.join(TAGGED_SHARD);
        let (labels, train, eval) = dpo_data::tagged::read_shard(&path)?;
        let tagged = TaggedData {
            labels,
            train,
            eval,
        };
        return RunData::new_tagged(&record.spec, tagged).ok_or_else(|| dpo_data::Error::File {
            path,
            reason: "fewer examples than one global batch".into(),
        });
    }
    let train = dpo_data::shard::read(&record.shard_dir.join("train.shard"))?;
    let eval = dpo_data::shard::read(&record.shard_dir.join("eval.shard"))?;
    let mut data =
        RunData::new(&record.spec, train, eval).ok_or_else(|| dpo_data::Error::File {
            path: record.shard_dir.join("train.shard"),
            reason: "fewer examples than one global batch".into(),
        })?;
    data.reference = ReferenceStage::open(&record.spec, cache_root)?;
    Ok(data)
}
