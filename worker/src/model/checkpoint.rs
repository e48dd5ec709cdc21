//! Hugging Face checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, read into a [`CausalLm`] and written back in the
//! same layout, bit for bit.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;
use super::llama::CausalLm;
use super::torch_pickle;
use crate::error::{Error, Result, TorchContext, io_err};

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const BIN_INDEX: &str = "pytorch_model.bin.index.json";
const BIN_SINGLE: &str = "pytorch_model.bin";

/// Files besides the weights and the tokenizer's own (every layout's, see
/// [`dpo_data::tokenizer::layout::FILES`]) that a checkpoint directory carries along.
const SIDE_FILES: &[&str] = &["generation_config.json"];

/// Loads `dir` (config, then weights) as dtype `kind` on `device`.
pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<CausalLm> {
    let config = config_of(dir)?;
    let model = CausalLm::new(config, kind, device)?;
    load_weights(&model, dir)?;
    Ok(model)
}

/// [`load`] for ZeRO stage 3: everything but the decoder layers, which
/// [`CausalLm::shard_base`] fills with a rank's share (see [`TensorIndex`]).
pub fn load_sharded(dir: &Path, kind: Kind, device: Device) -> Result<CausalLm> {
    let config = config_of(dir)?;
    let model = CausalLm::new_sharded(config, kind, device)?;
    load_weights(&model, dir)?;
    Ok(model)
}

/// The model configuration of checkpoint `dir` as transformers 5 builds the
/// model: a config that ties the embeddings, whose weights nevertheless hold an
/// `lm_head.weight` other than the input embedding, is loaded untied (transformers
/// warns and does not tie them); an equal copy is ignored.
pub fn config_of(dir: &Path) -> Result<ModelConfig> {
    let mut config = ModelConfig::from_dir(dir)?;
    if !config.tie_word_embeddings {
        return Ok(config);
    }
    let index = TensorIndex::open_causal_lm(dir)?;
    let embed = "model.embed_tokens.weight";
    if index.shape(LM_HEAD).is_none() || index.shape(embed) != index.shape(LM_HEAD) {
        return Ok(config);
    }
    let _guard = tch::no_grad_guard();
    let read = |name: &str| -> Result<Tensor> {
        let numel: i64 = index.shape(name).map_or(0, |s| s.iter().product());
        index.read_range(name, 0, numel, Kind::Float)
    };
    let same = read(LM_HEAD)?
        .f_equal(&read(embed)?)
        .op("comparing lm_head with the embedding")?;
    if !same {
        tracing::warn!(
            dir = %dir.display(),
            "config.json ties the word embeddings, but the checkpoint's lm_head.weight differs from \
             model.embed_tokens.weight: they are loaded untied, as transformers does (set \
             tie_word_embeddings = false in config.json to say so)"
        );
        config.tie_word_embeddings = false;
        if let Some(raw) = config.raw.as_object_mut() {
            raw.insert("tie_word_embeddings".into(), Value::Bool(false));
        }
    }
    Ok(config)
}

/// Loads a reference model for a policy with `vocab_size` tokens; the two must
/// share a tokenizer, so a different vocabulary size is refused.
pub fn load_reference(dir: &Path, kind: Kind, device: Device, vocab_size: i64) -> Result<CausalLm> {
    let model = load(dir, kind, device)?;
    let found = model.config().vocab_size;
    if found != vocab_size {
        return Err(Error::Config {
            path: dir.join("config.json"),
            reason: format!(
                "reference vocab_size {found} differs from the model's {vocab_size}: they must share a tokenizer"
            ),
        });
    }
    Ok(model)
}

/// The weight files of a checkpoint directory, in a stable order, in
/// transformers' order of preference: safetensors (sharded, then single), then
/// `torch.save` files (sharded, then single).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for (index, single) in [(INDEX, SINGLE), (BIN_INDEX, BIN_SINGLE)] {
        let index = dir.join(index);
        if index.exists() {
            return indexed_files(dir, &index);
        }
        let single = dir.join(single);
        if single.exists() {
            return Ok(vec![single]);
        }
    }
    Err(Error::Config {
        path: dir.to_path_buf(),
        reason: format!(
            "no weights: expected {SINGLE}, {INDEX}, {BIN_SINGLE} or {BIN_INDEX} in this directory"
        ),
    })
}

/// The files a `*.index.json` names, each once.
fn indexed_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            reason: "missing object weight_map".into(),
        })?;
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            reason: format!("weight_map.{name} must be a file name"),
        })?;
        if file.contains('/') || file.contains('\\') || file.contains("..") {
            return Err(Error::Config {
                path: index.to_path_buf(),
                reason: format!(
                    "weight_map.{name}: {file:?} is not a file in the checkpoint directory"
                ),
            });
        }
        if seen.insert(file.to_string()) {
            files.push(dir.join(file));
        }
    }
    files.sort();
    Ok(files)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        _ => return None,
    })
}

/// Copies every tensor of the checkpoint in `dir` into the model's parameters,
/// converting dtypes. Every parameter must be present with its exact shape, and
/// every tensor in the files must be a parameter (stale rotary buffers and a tied
/// `lm_head.weight` excepted, as transformers does).
pub fn load_weights(model: &CausalLm, dir: &Path) -> Result<()> {
    // Each tensor is read by its own byte range: no file is held whole.
    let index = TensorIndex::open_causal_lm(dir)?;
    // ZeRO stage 3: the decoder layers' parameters come as shares instead.
    let sharded: HashSet<String> = model.sharded_names().into_iter().collect();
    let model_type = model.config().architecture.name();
    let tied = model.config().tie_word_embeddings;
    let params = model.var_store().variables();
    let mut names: Vec<&String> = index.entries.keys().collect();
    names.sort();
    for name in names {
        let ignorable = sharded.contains(name)
            || name.ends_with("rotary_emb.inv_freq")
            || (name == LM_HEAD && tied);
        if !ignorable && !params.contains_key(name) {
            return Err(Error::UnexpectedTensor {
                path: index.entries[name].file.clone(),
                name: name.clone(),
                model_type: model_type.to_string(),
            });
        }
    }
    let mut wanted: Vec<&String> = params.keys().filter(|n| !sharded.contains(*n)).collect();
    wanted.sort();
    let _guard = tch::no_grad_guard();
    let mut initialised = Vec::new();
    for name in &wanted {
        let param = &params[*name];
        let Some(e) = index.entries.get(*name) else {
            if name.as_str() == LM_HEAD && index.base_model {
                // A base model (`LlamaModel`) has no head: a new one, initialised as
                // transformers' `_init_weights` does, seeded so that every rank
                // and the reference model start from the same head.
                let std = model
                    .config()
                    .raw
                    .get("initializer_range")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.02);
                tch::manual_seed(NEW_HEAD_SEED);
                let _initialised = param
                    .shallow_clone()
                    .f_normal_(0.0, std)
                    .op("initialising lm_head")?;
                initialised.push(LM_HEAD);
                continue;
            }
            return Err(Error::MissingTensor {
                dir: dir.to_path_buf(),
                name: (*name).clone(),
            });
        };
        if e.shape != param.size() {
            return Err(Error::TensorShape {
                path: e.file.clone(),
                name: (*name).clone(),
                expected: param.size(),
                found: e.shape.clone(),
            });
        }
        index.read_into(name, param)?;
    }
    if !initialised.is_empty() {
        tracing::warn!(
            dir = %dir.display(),
            new = ?initialised,
            "some weights were not in the checkpoint and are newly initialised (train them before use)"
        );
    }
    tracing::debug!(dir = %dir.display(), tensors = wanted.len(), "loaded checkpoint");
    Ok(())
}

/// The output projection of a causal LM.
const LM_HEAD: &str = "lm_head.weight";

/// The seed of a newly initialised head (the same on every rank and run).
pub const NEW_HEAD_SEED: i64 = 0x5eed;

/// A tensor's bytes, ready for serialisation.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn tensor_bytes(name: &str, t: &Tensor) -> Result<Bytes> {
    let kind = t.f_kind().op("saving: dtype")?;
    let dtype = dtype_of(kind).ok_or_else(|| Error::Input {
        context: format!("saving {name}"),
        reason: format!("dtype {kind:?} cannot be written"),
    })?;
    let t = t
        .f_detach()
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_contiguous())
        .op("saving: copy to host")?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)
        .op("saving: read tensor bytes")?;
    Ok(Bytes {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    })
}

/// Writes `bytes` to `path` crash-safely (see [`dpo_data::atomic`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    dpo_data::atomic::write(path, bytes).map_err(io_err(path))
}

pub(crate) fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// Saves the model to `dir` in Hugging Face format: `config.json` (with the saved
/// dtype), weights as one `model.safetensors` or, past `max_shard_bytes`, numbered
/// shards with an index; the tokenizer files of `source_dir` are copied along.
pub fn save(
    model: &CausalLm,
    dir: &Path,
    source_dir: Option<&Path>,
    max_shard_bytes: u64,
) -> Result<()> {
    let vars: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    save_tensors(model, &vars, dir, source_dir, max_shard_bytes)
}

/// [`save`] with `vars` as the model's weights (e.g. with adapters merged in).
pub fn save_tensors(
    model: &CausalLm,
    vars: &[(String, Tensor)],
    dir: &Path,
    source_dir: Option<&Path>,
    max_shard_bytes: u64,
) -> Result<()> {
    let (n, total) = write_weight_files(vars, dir, max_shard_bytes)?;
    let mut config = model.config().raw.clone();
    if let Some(obj) = config.as_object_mut() {
        let name = Value::String(dtype_name(model.kind()).to_string());
        let key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.to_string(), name);
    }
    write_json(&dir.join("config.json"), &config)?;

    if let Some(src) = source_dir {
        copy_side_files(src, dir)?;
    }
    tracing::debug!(dir = %dir.display(), shards = n, bytes = total, "saved model weights");
    Ok(())
}

/// Writes `vars` into `dir` as transformers lays weights out: one
/// `model.safetensors` or, past `max_shard_bytes`, numbered shards with an index
/// (a stale index is removed). Returns the number of files and the bytes written.
pub fn write_weight_files(
    vars: &[(String, Tensor)],
    dir: &Path,
    max_shard_bytes: u64,
) -> Result<(usize, u64)> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tensors: BTreeMap<String, Bytes> = BTreeMap::new();
    for (name, t) in vars {
        tensors.insert(name.clone(), tensor_bytes(name, t)?);
    }
    let total: u64 = tensors.values().map(|b| b.data.len() as u64).sum();

    // Greedy sharding in name order, as transformers does it.
    let mut shards: Vec<Vec<&str>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, b) in &tensors {
        let size = b.data.len() as u64;
        let last = shards.last().map_or(0, Vec::len);
        if last > 0 && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        if let Some(shard) = shards.last_mut() {
            shard.push(name);
        }
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            SINGLE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let views = names.iter().map(|name| (*name, &tensors[*name]));
        let path = dir.join(&file_name);
        let bytes = safetensors::tensor::serialize(views, metadata.clone()).map_err(|e| {
            Error::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        write_atomically(&path, &bytes)?;
        for name in names {
            weight_map.insert(name.to_string(), Value::String(file_name.clone()));
        }
    }
    let stale_index = dir.join(INDEX);
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_json(&stale_index, &index)?;
    } else if stale_index.exists() {
        std::fs::remove_file(&stale_index).map_err(io_err(&stale_index))?;
    }
    Ok((n, total))
}

/// Copies the tokenizer and generation files of checkpoint `src` into `dir`.
pub fn copy_side_files(src: &Path, dir: &Path) -> Result<()> {
    let tokenizer_files = dpo_data::tokenizer::layout::FILES;
    for name in SIDE_FILES.iter().chain(tokenizer_files) {
        let from = src.join(name);
        if from.exists() && src != dir {
            let bytes = dpo_data::confined::read(&from).map_err(io_err(&from))?;
            write_atomically(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// Writes named tensors as one safetensors file, atomically.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut bytes: BTreeMap<&str, Bytes> = BTreeMap::new();
    for (name, t) in tensors {
        bytes.insert(name, tensor_bytes(name, t)?);
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let data = safetensors::tensor::serialize(bytes.iter().map(|(n, b)| (*n, b)), metadata)
        .map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    write_atomically(path, &data)
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = dpo_data::confined::read(path).map_err(io_err(path))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in file.iter() {
        let kind = kind_of(view.dtype()).ok_or_else(|| Error::Safetensors {
            path: path.to_path_buf(),
            reason: format!("tensor {name}: unsupported dtype {:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind).op("reading tensor")?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Reads and parses a JSON file; errors name the file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = dpo_data::confined::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_atomically(path, text.as_bytes())
}

/// Where each tensor of a checkpoint directory lies in its files, so that a
/// part of one can be read without reading the rest (a rank's share of the
/// frozen base under ZeRO stage 3).
#[derive(Debug)]
pub struct TensorIndex {
    entries: HashMap<String, IndexEntry>,
    /// A causal LM's base model saved alone (its names read under `model.`):
    /// it has no head, and gets a new one. A `…ForCausalLM` checkpoint without
    /// its head is an error instead (most likely a wrong `tie_word_embeddings`).
    base_model: bool,
}

#[derive(Debug, Clone)]
struct IndexEntry {
    file: PathBuf,
    /// `Err(dtype)`: a dtype this project cannot hold (refused when read).
    kind: std::result::Result<Kind, UnsupportedDtype>,
    shape: Vec<i64>,
    /// Byte offset of the tensor's data in the file.
    start: u64,
    /// A non-contiguous tensor of a `torch.save` file: its strides, and the
    /// elements of its storage from its first one on.
    strided: Option<(Vec<i64>, i64)>,
}

fn safetensors_entries(file: &Path) -> Result<Vec<(String, IndexEntry)>> {
    use std::io::Read;
    let bad = |reason: String| Error::Safetensors {
        path: file.to_path_buf(),
        reason,
    };
    let mut f = dpo_data::confined::open_read(file).map_err(io_err(file))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io_err(file))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(bad(format!("header of {n} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io_err(file))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let kind = match info.get("dtype").and_then(Value::as_str) {
            Some("F32") => Ok(Kind::Float),
            Some("BF16") => Ok(Kind::BFloat16),
            Some("F16") => Ok(Kind::Half),
            Some("F64") => Ok(Kind::Double),
            other => Err(UnsupportedDtype(format!("{other:?}"))),
        };
        let shape: Option<Vec<i64>> = info
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect());
        let start = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_u64);
        let (Some(shape), Some(start)) = (shape, start) else {
            return Err(bad(format!("tensor {name}: no shape or data_offsets")));
        };
        out.push((
            name,
            IndexEntry {
                file: file.to_path_buf(),
                kind,
                shape,
                start: 8 + n + start,
                strided: None,
            },
        ));
    }
    Ok(out)
}

/// A stored tensor's dtype this project cannot hold, as the file names it
/// (refused when the tensor is read, not when the index is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported dtype {0}")]
pub struct UnsupportedDtype(pub String);

fn torch_entries(file: &Path) -> Result<Vec<(String, IndexEntry)>> {
    Ok(torch_pickle::read_index(file)?
        .into_iter()
        .map(|t| {
            let kind = match t.kind {
                Ok(k @ (Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double)) => Ok(k),
                Ok(other) => Err(UnsupportedDtype(format!("{other:?}"))),
                Err(storage) => Err(storage),
            };
            let entry = IndexEntry {
                file: file.to_path_buf(),
                kind,
                shape: t.shape,
                start: t.start,
                strided: t.strides.map(|s| (s, t.storage_len)),
            };
            (t.name, entry)
        })
        .collect())
}

impl TensorIndex {
    /// Reads the headers of every weight file of `dir` (nothing else): the
    /// safetensors headers, or the pickled state dicts of `torch.save` files.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut entries = HashMap::new();
        for file in weight_files(dir)? {
            let found = if torch_pickle::is_torch_file(&file) {
                torch_entries(&file)?
            } else {
                safetensors_entries(&file)?
            };
            for (name, entry) in found {
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(Error::Config {
                        path: file.clone(),
                        reason: format!("tensor {name} is stored twice in this checkpoint"),
                    });
                }
            }
        }
        Ok(TensorIndex {
            entries,
            base_model: false,
        })
    }

    /// [`TensorIndex::open`] for a causal LM, with a base model's names
    /// (`LlamaModel`, `Qwen2Model`: `embed_tokens.weight`, `layers.0.…`) read as the
    /// `…ForCausalLM` names under `model.`, as transformers reads them.
    pub fn open_causal_lm(dir: &Path) -> Result<Self> {
        let mut index = Self::open(dir)?;
        let base = !index.entries.keys().any(|n| n.starts_with("model."))
            && index
                .entries
                .keys()
                .any(|n| n.starts_with("layers.") || n.starts_with("embed_tokens."));
        index.base_model = base;
        if base {
            tracing::info!(dir = %dir.display(), "a base model checkpoint (no \"model.\" prefix)");
            index.entries = std::mem::take(&mut index.entries)
                .into_iter()
                .map(|(name, e)| {
                    let name = if name == LM_HEAD {
                        name
                    } else {
                        format!("model.{name}")
                    };
                    (name, e)
                })
                .collect();
        }
        Ok(index)
    }

    /// Elements `from .. from + len` of tensor `name` (flattened), as `kind`.
    pub fn read_range(&self, name: &str, from: i64, len: i64, kind: Kind) -> Result<Tensor> {
        use std::io::{Read, Seek, SeekFrom};
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            dir: PathBuf::new(),
            name: name.to_string(),
        })?;
        let numel: i64 = e.shape.iter().product();
        if from < 0 || len < 0 || from + len > numel {
            return Err(Error::Safetensors {
                path: e.file.clone(),
                reason: format!("tensor {name}: elements {from}..{} of {numel}", from + len),
            });
        }
        let stored = e.kind.clone().map_err(|dtype| Error::Safetensors {
            path: e.file.clone(),
            reason: format!("tensor {name}: {dtype}"),
        })?;
        let size = stored.elt_size_in_bytes() as u64;
        let read = |first: i64, count: i64| -> Result<Tensor> {
            let mut f = dpo_data::confined::open_read(&e.file).map_err(io_err(&e.file))?;
            f.seek(SeekFrom::Start(e.start + first as u64 * size))
                .map_err(io_err(&e.file))?;
            let mut bytes = vec![0u8; (count as u64 * size) as usize];
            f.read_exact(&mut bytes).map_err(io_err(&e.file))?;
            Tensor::f_from_data_size(&bytes, &[count], stored).op("reading a tensor range")
        };
        let values = match &e.strided {
            None => read(from, len)?,
            // A strided view (a transposed tensor saved as such): its storage
            // span, viewed with its strides, then the elements wanted.
            Some((strides, storage_len)) => read(0, *storage_len)?
                .f_as_strided(e.shape.as_slice(), strides.as_slice(), 0)
                .and_then(|t| t.f_reshape([-1]))
                .and_then(|t| t.f_narrow(0, from, len))
                .and_then(|t| t.f_contiguous())
                .op("reading a strided tensor")?,
        };
        values.f_to_kind(kind).op("reading a tensor range")
    }

    /// The shape of tensor `name`, if the checkpoint has it.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Copies tensor `name` whole into `param` (same number of elements),
    /// converting its dtype.
    pub fn read_into(&self, name: &str, param: &Tensor) -> Result<()> {
        let values = self
            .read_range(name, 0, param.numel() as i64, param.kind())?
            .f_view(param.size().as_slice())
            .op("reading tensor")?;
        param
            .shallow_clone()
            .f_copy_(&values)
            .op("copying tensor into parameter")?;
        Ok(())
    }

    /// The file that holds tensor `name`.
    pub fn file(&self, name: &str) -> Option<&Path> {
        self.entries.get(name).map(|e| e.file.as_path())
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }
}
