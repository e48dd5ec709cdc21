//! The run spec: everything that defines a training run, read from TOML with
//! `DPO__SECTION__KEY` environment overrides. Unknown keys are errors, and every
//! value is checked with a message naming the key and what is allowed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod values;
pub use values::{Negatives, ReferenceCache, ReferenceModel, UnknownDtype};

/// A run-spec problem, always naming the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// `Ok` when `ok`, else the refusal of `key` for `reason()`.
fn check(ok: bool, key: &'static str, reason: impl FnOnce() -> String) -> Result<(), InvalidKey> {
    if ok {
        Ok(())
    } else {
        Err(InvalidKey {
            key,
            reason: reason(),
        })
    }
}

/// A value of a run spec that is refused: the key (`section.name`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InvalidKey {
    pub key: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Hugging Face model directory.
    pub path: PathBuf,
    #[serde(default)]
    pub dtype: Dtype,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ReferenceSpec {
    /// `"same"` (a frozen copy of the initial policy), a model directory, or
    /// `"none"` (reference-free).
    pub path: ReferenceModel,
    /// Compute reference log-probabilities once before training.
    pub precompute: bool,
    /// Where precomputed reference log-probabilities are kept for later runs
    /// (standalone; a cluster keeps them in the coordinator's data dir).
    pub cache: ReferenceCache,
}

/// `task.type`: what the model learns to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TaskType {
    /// A causal LM (Llama, Mistral, Qwen2) on preference pairs or labelled and
    /// negative responses.
    #[default]
    CausalLm,
    /// An encoder (BERT, RoBERTa) tagging each word: NER.
    TokenClassification,
    /// An encoder labelling each text: sentiment, topic, intent.
    SequenceClassification,
}

impl TaskType {
    /// The encoder tasks.
    pub fn is_classification(self) -> bool {
        !matches!(self, TaskType::CausalLm)
    }
}

/// `[task]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskSpec {
    #[serde(rename = "type")]
    pub kind: TaskType,
    /// The labels in id order; empty: taken from the data in first-seen order
    /// (`O` first for NER).
    pub labels: Vec<String>,
    /// NER: every sub-token of a word carries its label (`B-X` as `I-X`), not
    /// only the first.
    pub label_all_tokens: bool,
    /// Generated negatives (`random`, `adversarial`, `confusion`): how many per
    /// labelled position (NER: per entity word; classification: per text).
    pub negatives_per_label: usize,
}

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec {
            kind: TaskType::CausalLm,
            labels: Vec::new(),
            label_all_tokens: false,
            negatives_per_label: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    #[default]
    Auto,
    /// `{"prompt","chosen","rejected"}` strings.
    Text,
    /// The same keys holding `[{"role","content"}]` lists, rendered with the chat template.
    Conversational,
    /// `{"prompt_ids","chosen_ids","rejected_ids"}`.
    Tokens,
    /// `{"prompt","completion","id"?,"label"?}` labelled (and negative) examples.
    Labelled,
}

/// How a dataset's files are stored (`data.file_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// By extension: `.parquet`, `.arrow`, `.json` (an array, or JSON lines),
    /// `.conll`/`.txt`/`.iob`/`.bio` (NER); a folder by the files in it; JSON
    /// lines otherwise.
    #[default]
    Auto,
    Jsonl,
    /// One JSON array of records.
    Json,
    Parquet,
    /// Arrow IPC (stream or file), as `datasets.save_to_disk` writes it.
    Arrow,
    /// `token … tag` lines, a blank line between sentences (NER only).
    Conll,
}

/// The record keys `data.columns` may rename a file's columns to.
pub const COLUMN_NAMES: &[&str] = &[
    "prompt",
    "chosen",
    "rejected",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "completion",
    "label",
    "id",
    "tokens",
    "tags",
    "text",
    "negatives",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    KeepStart,
    #[default]
    KeepEnd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training data: a file (JSON lines, JSON, Parquet, Arrow), a glob of
    /// shards, or a folder of them (`datasets.save_to_disk` included).
    pub train: PathBuf,
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Negative examples: a file, or `"random"` / `"policy"` to generate them.
    #[serde(default)]
    pub negatives: Option<Negatives>,
    #[serde(default)]
    pub format: DataFormat,
    /// How the files are stored; by extension unless set.
    #[serde(default)]
    pub file_format: FileFormat,
    /// Renames a file's columns to the keys records are read by:
    /// `{ prompt = "question", chosen = "good", rejected = "bad" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: usize,
    #[serde(default)]
    pub truncation: Truncation,
    #[serde(default = "default_true")]
    pub shuffle: bool,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Skip (and count) malformed lines instead of refusing the file.
    #[serde(default)]
    pub skip_bad_lines: bool,
    /// What reading a dataset may cost at most (`[data.limits]`).
    #[serde(default)]
    pub limits: DataLimits,
}

/// Bounds on reading a dataset, so that a hostile or broken file is refused
/// (naming the file, the row and the key that raises the bound) instead of
/// exhausting the memory or the stack of the process that reads it. Each
/// dataset (train, eval, negatives) has its own budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataLimits {
    /// Records (lines, rows) of one dataset.
    pub max_rows: u64,
    /// Bytes one value may decode to: a JSON line or array element (counted
    /// as its decoded size), a Parquet page.
    pub max_value_bytes: u64,
    /// Bytes a dataset's columnar files may decode to in all.
    pub max_decoded_bytes: u64,
    /// Levels of nesting in a columnar file's schema.
    pub max_nesting: usize,
}

impl Default for DataLimits {
    fn default() -> Self {
        DataLimits {
            max_rows: 5_000_000,
            max_value_bytes: 64 << 20,
            max_decoded_bytes: 16 << 30,
            max_nesting: 32,
        }
    }
}

impl DataSpec {
    /// Setting one length alone never makes a spec invalid: an unset
    /// `max_prompt_length` that would not fit below a given `max_length`
    /// becomes half of it, and an unset `max_length` that a given
    /// `max_prompt_length` would not fit below becomes twice that (the
    /// defaults' ratio, 512 of 1024). Both set and in conflict stays an error.
    fn derive_lengths(&mut self, length_given: bool, prompt_given: bool) {
        if self.max_prompt_length < self.max_length {
            return;
        }
        if length_given && !prompt_given {
            self.max_prompt_length = (self.max_length / 2).max(1);
            tracing::info!(
                max_length = self.max_length,
                max_prompt_length = self.max_prompt_length,
                "data.max_prompt_length is not set: half of data.max_length"
            );
        } else if prompt_given && !length_given {
            self.max_length = self.max_prompt_length.saturating_mul(2);
            tracing::info!(
                max_length = self.max_length,
                max_prompt_length = self.max_prompt_length,
                "data.max_length is not set: twice data.max_prompt_length"
            );
        }
    }
}

fn default_max_length() -> usize {
    1024
}
fn default_max_prompt_length() -> usize {
    512
}
fn default_true() -> bool {
    true
}
fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// DPO; with `label_smoothing`, conservative DPO.
    #[default]
    Sigmoid,
    Robust,
    Ipo,
    Hinge,
    /// Token NLL of the labelled (chosen) response only.
    Sft,
    /// NLL on labelled examples + `negative_weight` × unlikelihood on negatives.
    Combined,
}

impl Loss {
    /// Losses over (chosen, rejected) pairs, which need a reference model.
    pub fn is_pairwise(self) -> bool {
        !matches!(self, Loss::Sft | Loss::Combined)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSpec {
    pub loss: Loss,
    pub beta: f64,
    pub label_smoothing: f64,
    /// RPO: weight of the chosen response's mean token NLL added to a pairwise loss.
    pub nll_weight: f64,
    /// `combined`: weight λ of the unlikelihood term.
    pub negative_weight: f64,
}

impl Default for ObjectiveSpec {
    fn default() -> Self {
        ObjectiveSpec {
            loss: Loss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            nll_weight: 0.0,
            negative_weight: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    #[default]
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSpec {
    pub name: OptimizerName,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
}

impl Default for OptimSpec {
    fn default() -> Self {
        OptimSpec {
            name: OptimizerName::Adamw,
            lr: 1e-6,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            max_grad_norm: 1.0,
            schedule: Schedule::Linear,
            warmup_steps: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub epochs: u64,
    /// Stop after this many optimizer steps whatever `epochs` says (0 = off).
    pub max_steps: u64,
    /// Pairs (or examples) per optimizer step.
    pub global_batch_size: usize,
    /// Pairs per forward pass; 0 means the whole global batch.
    pub micro_batch_size: usize,
    /// Evaluate every this many steps (0 = only at the end, when there is eval data).
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (0 = none before the final model).
    pub checkpoint_every: u64,
    /// Keep only the newest this many checkpoints (0 = keep all), as
    /// transformers' `save_total_limit`. The newest is always the last one
    /// committed (older ones are removed only after a commit).
    pub save_total_limit: u64,
    /// Stop when the best-model metric has not improved for this many
    /// evaluations (0 = off).
    pub early_stopping_patience: u64,
    /// The eval metric that early stopping watches and, for the encoder tasks,
    /// that picks the checkpoint `final/` holds (`eval_loss`, `eval_f1`,
    /// `eval_accuracy`, …).
    pub metric_for_best_model: String,
    /// Whether a larger `metric_for_best_model` is better; unset: false for a
    /// metric whose name ends in `loss`, true otherwise (as transformers).
    pub greater_is_better: Option<bool>,
    /// Output directory; relative paths are relative to the spec file.
    pub output: PathBuf,
    /// Pair-aware packing: each example's prompt once with its responses after
    /// it (each attending to the prompt and itself), several examples per row of
    /// up to `2 × data.max_length` tokens, no padding compute. Same log-probs.
    pub packing: bool,
    /// Response positions whose logits exist at once: the LM head runs on
    /// chunks of this many positions, forward and backward (recomputed), so a
    /// micro-batch never holds `tokens × vocab` logits. 0: all at once.
    pub head_chunk_tokens: usize,
    /// Keep only each decoder layer's input in the forward and recompute the
    /// layers one at a time in the backward (TRL's name): activation memory of
    /// one layer instead of all, for one more forward of the layers.
    pub gradient_checkpointing: bool,
    /// ZeRO: 0 = every rank holds the whole optimizer state; 1 = each rank of a
    /// data-parallel world holds the AdamW moments and f32 master weights of
    /// 1/W of the parameters (gradients reduce-scattered, parameters
    /// all-gathered); 2 = also only 1/W of the gradients: each decoder layer's
    /// gradients are reduce-scattered as soon as its backward is done, every
    /// micro-batch, and never kept whole.
    pub zero_stage: u8,
    /// With `zero_stage` 1 or 2: 2 = each rank also keeps (and updates alike) a
    /// copy of its predecessor's share, so a worker can die without a rollback.
    pub zero_replicas: u8,
    /// Regular expressions over parameter names (`model.embed_tokens.weight`):
    /// the parameters any of them matches (anywhere in the name) are frozen —
    /// no gradient, no optimizer state, no traffic. Each must match something.
    pub freeze: Vec<String>,
    /// Where metrics go besides `metrics.jsonl` (transformers' name):
    /// `["tensorboard"]` (or `"tensorboard"`) writes event files under
    /// `output/runs/<name>/`.
    #[serde(deserialize_with = "one_or_many")]
    pub report_to: Vec<String>,
}

/// A string or a list of strings (transformers' `report_to` takes either).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl TrainSpec {
    /// Whether event files are written (`report_to` names TensorBoard).
    pub fn tensorboard(&self) -> bool {
        self.report_to
            .iter()
            .any(|r| r == "tensorboard" || r == "all")
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            epochs: 1,
            max_steps: 0,
            global_batch_size: 8,
            micro_batch_size: 0,
            eval_every: 0,
            checkpoint_every: 0,
            save_total_limit: 0,
            early_stopping_patience: 0,
            metric_for_best_model: "eval_loss".into(),
            greater_is_better: None,
            output: PathBuf::from("out"),
            packing: false,
            head_chunk_tokens: 1024,
            gradient_checkpointing: false,
            zero_stage: 0,
            zero_replicas: 1,
            freeze: Vec::new(),
            report_to: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Auto,
    Nccl,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSpec {
    pub min_workers: usize,
    pub max_workers: usize,
    pub backend: Backend,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            min_workers: 1,
            max_workers: 1,
            backend: Backend::Auto,
        }
    }
}

/// Where LoRA adapters go: PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"`: every linear layer of the decoder (not the LM head).
    Keyword(String),
    /// Module names, e.g. `["q_proj", "v_proj"]`.
    Names(Vec<String>),
}

/// The encoders' linear modules adapters can target, by PEFT's names (the
/// self-attention's projections: BERT's and RoBERTa's `query`, `key`,
/// `value` — PEFT's default is `query` and `value` —, DeBERTa's
/// `query_proj`, `key_proj`, `value_proj`, and ModernBERT's fused `Wqkv`, its
/// attention's and MLP's output `Wo` and its MLP's `Wi`). Which of them a
/// model has is the model's to say.
pub const ENCODER_LORA_MODULES: &[&str] = &[
    "query",
    "key",
    "value",
    "query_proj",
    "key_proj",
    "value_proj",
    "Wqkv",
    "Wo",
    "Wi",
];

/// The decoders' linear modules, by PEFT's names (Phi-3 fuses q, k and v
/// into `qkv_proj` and gate and up into `gate_up_proj`).
pub const LINEAR_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
];

impl TargetModules {
    /// The module names targeted (validated: known names, or `"all-linear"`).
    pub fn names(&self) -> Vec<String> {
        match self {
            TargetModules::Keyword(_) => LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
            TargetModules::Names(n) => n.clone(),
        }
    }
}

/// How new adapters start: PEFT's `init_lora_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// A: Kaiming-uniform (bound 1/√in), B: zeros (PEFT's `True`).
    #[default]
    Default,
    /// A: normal with std 1/r, B: zeros (PEFT's `"gaussian"`).
    Gaussian,
}

/// `[lora]`: low-rank adapters on the decoder's linear layers; only they
/// train (PEFT's LoRA, written in its format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub init: LoraInit,
    /// Continue training the PEFT adapter in this directory.
    pub init_from: Option<PathBuf>,
    /// Also write `final/merged/`: the base with the adapters folded in.
    pub merge: bool,
}

impl Default for LoraSpec {
    fn default() -> Self {
        // PEFT's defaults (its Llama-family target modules).
        LoraSpec {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            init: LoraInit::Default,
            init_from: None,
            merge: false,
        }
    }
}

impl LoraSpec {
    /// The factor of the adapters' output: `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r.max(1) as f64
    }
}

/// A complete, validated run spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub name: String,
    pub model: ModelSpec,
    #[serde(default)]
    pub reference: ReferenceSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub objective: ObjectiveSpec,
    #[serde(default)]
    pub optim: OptimSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    /// LoRA adapters (a `[lora]` section); without it every parameter not
    /// frozen by `train.freeze` trains.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// `[task]`: a causal LM (default) or an encoder task.
    #[serde(default)]
    pub task: TaskSpec,
}

impl RunSpec {
    /// Reads `path` (TOML), applies `DPO__SECTION__KEY` overrides from the
    /// environment, resolves relative paths against the file's directory, validates.
    pub fn from_file(path: &Path) -> Result<RunSpec, SpecError> {
        let read_err = |reason: String| SpecError::Read {
            path: path.to_path_buf(),
            reason,
        };
        if !path.exists() {
            return Err(read_err("no such file".into()));
        }
        let settings = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("DPO")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("optim.betas"),
            )
            .build()
            .map_err(|e| read_err(e.to_string()))?;
        let loss_given = settings.get_string("objective.loss").is_ok();
        let targets_given = settings.get::<config::Value>("lora.target_modules").is_ok();
        let length_given = settings.get_string("data.max_length").is_ok();
        let prompt_given = settings.get_string("data.max_prompt_length").is_ok();
        let mut spec: RunSpec = settings
            .try_deserialize()
            .map_err(|e| read_err(explain(&e.to_string())))?;
        // A classification task's default objective is the founding method's
        // combined loss (cross-entropy alone where there are no negatives).
        if spec.task.kind.is_classification() && !loss_given {
            spec.objective.loss = Loss::Combined;
        }
        // And its LoRA targets PEFT's default for BERT and RoBERTa.
        if spec.task.kind.is_classification() && !targets_given {
            if let Some(l) = spec.lora.as_mut() {
                l.target_modules = TargetModules::Names(vec!["query".into(), "value".into()]);
            }
        }
        spec.data.derive_lengths(length_given, prompt_given);
        // Relative paths end absolute even when the spec's own path is relative
        // (a coordinator elsewhere must see the same files).
        let whole = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = whole.parent().unwrap_or(Path::new("."));
        spec.resolve_paths(base);
        spec.validate()
            .map_err(|InvalidKey { key, reason }| SpecError::Invalid {
                path: path.to_path_buf(),
                key,
                reason,
            })?;
        Ok(spec)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        fix(&mut self.model.path);
        fix(&mut self.data.train);
        if let Some(e) = self.data.eval.as_mut() {
            fix(e);
        }
        fix(&mut self.train.output);
        // A blank directory stays blank, for validation to name.
        if let ReferenceModel::Dir(d) = &mut self.reference.path
            && d.is_relative()
            && !d.to_string_lossy().trim().is_empty()
        {
            *d = base.join(&*d);
        }
        if let ReferenceCache::Dir(d) = &mut self.reference.cache {
            fix(d);
        }
        if let Some(Negatives::File(f)) = &mut self.data.negatives {
            fix(f);
        }
        if let Some(dir) = self.lora.as_mut().and_then(|l| l.init_from.as_mut()) {
            fix(dir);
        }
    }

    /// Replaces each path this run reads (model, reference, adapters to start
    /// from, datasets) by `resolve`'s form of it — for a process that trusts
    /// its own spec (a standalone `dpo-worker train`), its links resolved once
    /// as a coordinator resolves a client's at submit
    /// (`dpo_data::confined::resolved`). The readers then walk each path
    /// through no link and follow links inside a model folder only within it.
    pub fn resolve_links(&mut self, resolve: impl Fn(&Path) -> PathBuf) {
        let set = |p: &mut PathBuf| *p = resolve(p);
        set(&mut self.model.path);
        if let ReferenceModel::Dir(d) = &mut self.reference.path {
            set(d);
        }
        if let Some(dir) = self.lora.as_mut().and_then(|l| l.init_from.as_mut()) {
            set(dir);
        }
        set(&mut self.data.train);
        if let Some(e) = self.data.eval.as_mut() {
            set(e);
        }
        if let Some(Negatives::File(f)) = &mut self.data.negatives {
            set(f);
        }
    }

    /// Whether only a part of the model trains (LoRA adapters, or frozen
    /// parameters), so the rest is a frozen base.
    pub fn partly_frozen(&self) -> bool {
        self.lora.is_some() || !self.train.freeze.is_empty()
    }

    /// The directory of the standalone reference cache (`None`: `"none"`).
    pub fn reference_cache_dir(&self) -> Option<PathBuf> {
        match &self.reference.cache {
            ReferenceCache::Off => None,
            ReferenceCache::User => {
                let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
                if let Some(d) = env("DPO_CACHE_DIR") {
                    return Some(PathBuf::from(d).join("reference"));
                }
                let base = env("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .unwrap_or_else(|| PathBuf::from(".cache"));
                Some(base.join("dpo-cluster").join("reference"))
            }
            ReferenceCache::Dir(dir) => Some(dir.clone()),
        }
    }

    /// Whether a larger `train.metric_for_best_model` is better.
    pub fn greater_is_better(&self) -> bool {
        self.train
            .greater_is_better
            .unwrap_or(!self.train.metric_for_best_model.ends_with("loss"))
    }

    /// The micro-batch size actually used.
    pub fn micro_batch_size(&self) -> usize {
        match self.train.micro_batch_size {
            0 => self.train.global_batch_size,
            m => m,
        }
    }

    /// Optimizer steps of the run: `train.max_steps` when set, else
    /// `epochs × steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        match self.train.max_steps {
            0 => self.train.epochs * steps_per_epoch,
            n => n,
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), InvalidKey> {
        let finite_pos = |x: f64| x.is_finite() && x > 0.0;
        let o = &self.objective;
        let t = &self.train;
        let p = &self.optim;
        let d = &self.data;
        check(!self.name.trim().is_empty(), "name", || {
            "must not be empty".into()
        })?;
        check(
            self.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "name",
            || {
                format!(
                    "{:?}: use letters, digits, '-', '_' and '.' only",
                    self.name
                )
            },
        )?;
        check(finite_pos(o.beta), "objective.beta", || {
            format!("must be > 0, found {}", o.beta)
        })?;
        check(
            (0.0..0.5).contains(&o.label_smoothing),
            "objective.label_smoothing",
            || format!("must be in [0, 0.5), found {}", o.label_smoothing),
        )?;
        check(
            o.label_smoothing == 0.0 || matches!(o.loss, Loss::Sigmoid | Loss::Robust),
            "objective.label_smoothing",
            || {
                format!(
                    "only applies to the sigmoid and robust losses, not {:?}",
                    o.loss
                )
                .to_lowercase()
            },
        )?;
        check(
            o.nll_weight.is_finite() && o.nll_weight >= 0.0,
            "objective.nll_weight",
            || format!("must be >= 0, found {}", o.nll_weight),
        )?;
        check(
            o.nll_weight == 0.0 || o.loss.is_pairwise(),
            "objective.nll_weight",
            || "only applies to pairwise losses (sigmoid, robust, ipo, hinge)".into(),
        )?;
        check(
            o.negative_weight.is_finite() && o.negative_weight >= 0.0,
            "objective.negative_weight",
            || format!("must be >= 0, found {}", o.negative_weight),
        )?;
        check(
            self.reference
                .path
                .dir()
                .is_none_or(|d| !d.to_string_lossy().trim().is_empty()),
            "reference.path",
            || "must be \"same\", \"none\" or a model directory".into(),
        )?;
        for (to, from) in &d.columns {
            check(COLUMN_NAMES.contains(&to.as_str()), "data.columns", || {
                format!("{to:?} is not a record key; expected one of {COLUMN_NAMES:?}")
            })?;
            check(!from.trim().is_empty(), "data.columns", || {
                format!("{to}: the file's column name is empty")
            })?;
            check(
                d.columns.values().filter(|f| *f == from).count() == 1,
                "data.columns",
                || format!("column {from:?} is renamed twice"),
            )?;
        }
        let l = &d.limits;
        check(l.max_rows > 0, "data.limits.max_rows", || {
            "must be at least 1".into()
        })?;
        check(
            l.max_value_bytes >= 1024,
            "data.limits.max_value_bytes",
            || "must be at least 1024".into(),
        )?;
        check(
            l.max_decoded_bytes >= l.max_value_bytes,
            "data.limits.max_decoded_bytes",
            || "must be at least data.limits.max_value_bytes".into(),
        )?;
        check(
            (1..=1024).contains(&l.max_nesting),
            "data.limits.max_nesting",
            || "must be between 1 and 1024".into(),
        )?;
        check(d.max_length >= 2, "data.max_length", || {
            format!("must be >= 2, found {}", d.max_length)
        })?;
        check(d.max_prompt_length >= 1, "data.max_prompt_length", || {
            format!("must be >= 1, found {}", d.max_prompt_length)
        })?;
        check(
            d.max_prompt_length < d.max_length || self.task.kind.is_classification(),
            "data.max_prompt_length",
            || {
                format!(
                    "must be below data.max_length ({}), found {}",
                    d.max_length, d.max_prompt_length
                )
            },
        )?;
        check(finite_pos(p.lr), "optim.lr", || {
            format!("must be > 0, found {}", p.lr)
        })?;
        check(p.lr <= MAX_LR, "optim.lr", || {
            format!("must be at most {MAX_LR}, found {}", p.lr)
        })?;
        check(
            p.weight_decay.is_finite() && p.weight_decay >= 0.0,
            "optim.weight_decay",
            || format!("must be >= 0, found {}", p.weight_decay),
        )?;
        check(
            p.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "optim.betas",
            || format!("both must be in [0, 1), found {:?}", p.betas),
        )?;
        check(finite_pos(p.eps), "optim.eps", || {
            format!("must be > 0, found {}", p.eps)
        })?;
        check(
            p.max_grad_norm.is_finite() && p.max_grad_norm >= 0.0,
            "optim.max_grad_norm",
            || format!("must be >= 0 (0 = off), found {}", p.max_grad_norm),
        )?;
        check(
            (1..=MAX_BATCH).contains(&t.global_batch_size),
            "train.global_batch_size",
            || format!("must be in 1..={MAX_BATCH}, found {}", t.global_batch_size),
        )?;
        check(t.max_steps <= MAX_STEPS, "train.max_steps", || {
            format!("must be at most {MAX_STEPS}, found {}", t.max_steps)
        })?;
        check(t.epochs <= MAX_EPOCHS, "train.epochs", || {
            format!("must be at most {MAX_EPOCHS}, found {}", t.epochs)
        })?;
        check(d.max_length <= MAX_LENGTH, "data.max_length", || {
            format!("must be at most {MAX_LENGTH}, found {}", d.max_length)
        })?;
        let m = self.micro_batch_size();
        check(
            m <= t.global_batch_size && t.global_batch_size % m == 0,
            "train.micro_batch_size",
            || {
                format!(
                    "{m} must divide train.global_batch_size ({})",
                    t.global_batch_size
                )
            },
        )?;
        check(t.epochs >= 1 || t.max_steps >= 1, "train.epochs", || {
            "must be >= 1 unless train.max_steps is set".into()
        })?;
        check(
            p.warmup_steps == 0 || t.max_steps == 0 || p.warmup_steps <= t.max_steps,
            "optim.warmup_steps",
            || {
                format!(
                    "{} exceeds train.max_steps ({})",
                    p.warmup_steps, t.max_steps
                )
            },
        )?;
        let c = &self.cluster;
        check(c.min_workers >= 1, "cluster.min_workers", || {
            "must be >= 1".into()
        })?;
        check(
            c.max_workers >= c.min_workers,
            "cluster.max_workers",
            || format!("must be >= cluster.min_workers ({})", c.min_workers),
        )?;
        check(
            t.head_chunk_tokens <= MAX_LENGTH,
            "train.head_chunk_tokens",
            || {
                format!(
                    "must be at most {MAX_LENGTH} (0 = all at once), found {}",
                    t.head_chunk_tokens
                )
            },
        )?;
        check(t.zero_stage <= 3, "train.zero_stage", || {
            format!("must be 0, 1, 2 or 3, found {}", t.zero_stage)
        })?;
        check(
            t.zero_stage < 3 || self.partly_frozen(),
            "train.zero_stage",
            || {
                "3 (a sharded frozen base) needs a frozen base: a [lora] section or train.freeze; \
                 for full-parameter training use 1 or 2"
                    .into()
            },
        )?;
        check(
            t.zero_stage < 3 || self.lora.is_some(),
            "train.zero_stage",
            || {
                "3 shards a LoRA run's frozen base; with train.freeze use 1 or 2 \
             (the unfrozen parameters' state is then sharded, the base replicated)"
                    .into()
            },
        )?;
        check(
            t.zero_stage < 3 || t.gradient_checkpointing,
            "train.gradient_checkpointing",
            || {
                "must be true with train.zero_stage = 3 (each layer's weights are gathered \
                 for its forward and again for its recomputation, and dropped in between)"
                    .into()
            },
        )?;
        check(
            t.zero_stage < 3 || self.lora.as_ref().is_none_or(|l| !l.merge),
            "lora.merge",
            || {
                "not with train.zero_stage = 3 (no rank holds the whole base): merge the adapter \
                 afterwards with PEFT's merge_and_unload"
                    .into()
            },
        )?;
        for (i, f) in t.freeze.iter().enumerate() {
            check(!f.trim().is_empty(), "train.freeze", || {
                format!("entry {i} is empty")
            })?;
            if let Err(e) = regex::Regex::new(f) {
                return Err(InvalidKey {
                    key: "train.freeze",
                    reason: format!("entry {i} ({f:?}) is not a regex: {e}"),
                });
            }
        }
        if let Some(l) = &self.lora {
            check((1..=MAX_LORA_RANK).contains(&l.r), "lora.r", || {
                format!("must be in 1..={MAX_LORA_RANK}, found {}", l.r)
            })?;
            check(finite_pos(l.alpha), "lora.alpha", || {
                format!("must be > 0, found {}", l.alpha)
            })?;
            check((0.0..1.0).contains(&l.dropout), "lora.dropout", || {
                format!("must be in [0, 1), found {}", l.dropout)
            })?;
            let (modules, family) = if self.task.kind.is_classification() {
                (ENCODER_LORA_MODULES, "an encoder")
            } else {
                (LINEAR_MODULES, "this model family")
            };
            match &l.target_modules {
                TargetModules::Keyword(k) => {
                    check(k == "all-linear", "lora.target_modules", || {
                        format!("must be \"all-linear\" or a list of module names, found {k:?}")
                    })?;
                    check(
                        !self.task.kind.is_classification(),
                        "lora.target_modules",
                        || {
                            format!(
                                "\"all-linear\" is for the causal LMs; name an encoder's modules ({})",
                                ENCODER_LORA_MODULES.join(", ")
                            )
                        },
                    )?;
                }
                TargetModules::Names(names) => {
                    check(!names.is_empty(), "lora.target_modules", || {
                        "must name at least one module".into()
                    })?;
                    for n in names {
                        check(modules.contains(&n.as_str()), "lora.target_modules", || {
                            format!("unknown module {n:?} ({family} has {})", modules.join(", "))
                        })?;
                    }
                }
            }
            check(t.freeze.is_empty(), "train.freeze", || {
                "with [lora] only the adapters train already: leave train.freeze out".into()
            })?;
        }
        check(
            matches!(t.zero_replicas, 1 | 2),
            "train.zero_replicas",
            || format!("must be 1 or 2, found {}", t.zero_replicas),
        )?;
        check(
            t.zero_replicas == 1 || t.zero_stage >= 1,
            "train.zero_replicas",
            || "2 needs train.zero_stage = 1 or 2 (there are no shares to copy without it)".into(),
        )?;
        check(c.max_workers <= MAX_WORKERS, "cluster.max_workers", || {
            format!("must be at most {MAX_WORKERS}, found {}", c.max_workers)
        })?;
        self.validate_task()
    }

    /// The `[task]` section and what it rules out.
    fn validate_task(&self) -> Result<(), InvalidKey> {
        let task = &self.task;
        let t = &self.train;
        for r in &t.report_to {
            check(
                matches!(r.as_str(), "tensorboard" | "all" | "none"),
                "train.report_to",
                || {
                    format!(
                        "{r:?}: only \"tensorboard\" is written here (or \"none\"); \
                         metrics.jsonl is always written"
                    )
                },
            )?;
        }
        check(
            t.metric_for_best_model.starts_with("eval_"),
            "train.metric_for_best_model",
            || {
                format!(
                    "{:?} is not an eval metric (eval_loss, eval_f1, eval_accuracy, …)",
                    t.metric_for_best_model
                )
            },
        )?;
        let mut seen = std::collections::HashSet::new();
        for l in &task.labels {
            check(!l.trim().is_empty(), "task.labels", || {
                "a label must not be empty".into()
            })?;
            check(seen.insert(l.as_str()), "task.labels", || {
                format!("{l:?} appears twice")
            })?;
        }
        check(
            (1..=64).contains(&task.negatives_per_label),
            "task.negatives_per_label",
            || format!("must be 1 to 64, found {}", task.negatives_per_label),
        )?;
        if !task.kind.is_classification() {
            check(task.labels.is_empty(), "task.labels", || {
                "labels are for the classification tasks (task.type = \"token-classification\" or \"sequence-classification\")".into()
            })?;
            return check(
                !matches!(
                    self.data.negatives,
                    Some(Negatives::Adversarial | Negatives::Confusion)
                ),
                "data.negatives",
                || {
                    "\"adversarial\" and \"confusion\" negatives are for the classification tasks; a causal LM takes \"random\", \"policy\" or a file".into()
                },
            );
        }
        if task.kind == TaskType::TokenClassification {
            for l in &task.labels {
                let iob2 = l == "O"
                    || l.strip_prefix("B-")
                        .or_else(|| l.strip_prefix("I-"))
                        .is_some_and(|x| !x.is_empty());
                check(iob2, "task.labels", || {
                    format!("{l:?} is not an IOB2 tag (O, B-TYPE, I-TYPE)")
                })?;
            }
        }
        check(
            matches!(self.objective.loss, Loss::Sft | Loss::Combined),
            "objective.loss",
            || {
                format!(
                    "{:?} compares responses of a causal LM; a classification task trains with \"sft\" (cross-entropy) or \"combined\" (cross-entropy + negatives)",
                    self.objective.loss
                )
                .to_lowercase()
            },
        )?;
        check(
            self.data.negatives != Some(Negatives::Confusion)
                || task.kind == TaskType::TokenClassification,
            "data.negatives",
            || {
                "\"confusion\" negatives are near misses of entity tags: NER (token-classification) only".into()
            },
        )?;
        check(
            self.data.negatives != Some(Negatives::Policy),
            "data.negatives",
            || {
                "\"policy\" samples responses of a causal LM; a classification task takes \"random\", \"adversarial\", \"confusion\" or a file".into()
            },
        )?;
        check(t.zero_stage < 3, "train.zero_stage", || {
            "3 shards a frozen causal-LM base; an encoder takes 1 (optimizer state partitioned) or 2 (and its gradients)".into()
        })?;
        check(!t.packing, "train.packing", || {
            "packing is for the causal LMs".into()
        })?;
        check(!self.reference.precompute, "reference.precompute", || {
            "a classification task has no reference model".into()
        })?;
        Ok(())
    }
}

// Bounds a run spec must keep: far beyond any real run, low enough that no
// value overflows a counter or asks the coordinator for absurd memory.
const MAX_LR: f64 = 10.0;
const MAX_STEPS: u64 = 1_000_000_000;
const MAX_EPOCHS: u64 = 1_000_000;
const MAX_BATCH: usize = 1 << 20;
const MAX_LENGTH: usize = 1 << 20;
const MAX_WORKERS: usize = 65_536;
const MAX_LORA_RANK: usize = 4096;

/// Removes `.` and `..` components lexically (`a/b/../c` → `a/c`), so paths in
/// logs read the way the user thinks of them. A `..` that cannot be removed
/// stays (`../x`, `/../x`).
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The values each enum-typed key accepts, for error messages.
const ENUMS: &[(&str, &str)] = &[
    ("Dtype", "f32, bf16, f16"),
    ("DataFormat", "auto, text, conversational, tokens, labelled"),
    ("Truncation", "keep_start, keep_end"),
    ("Loss", "sigmoid, robust, ipo, hinge, sft, combined"),
    ("OptimizerName", "adamw, sgd"),
    ("Schedule", "constant, linear, cosine"),
    ("Backend", "auto, nccl, tcp"),
    ("LoraInit", "default, gaussian"),
];

/// Rewrites the config crate's "enum X does not have variant constructor v for key
/// `k`" into "k: unknown value "v" (expected one of ...)".
fn explain(message: &str) -> String {
    let parsed = (|| {
        let rest = message.strip_prefix("enum ")?;
        let (name, rest) = rest.split_once(" does not have variant constructor ")?;
        let (value, rest) = rest.split_once(" for key `")?;
        let key = rest.split('`').next()?;
        let allowed = ENUMS.iter().find(|(n, _)| *n == name)?.1;
        Some(format!(
            "{key}: unknown value {value:?} (expected one of {allowed})"
        ))
    })();
    parsed.unwrap_or_else(|| message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MINIMAL: &str = r#"
name = "tiny"
[model]
path = "model"
[data]
train = "train.jsonl"
"#;

    fn load(text: &str) -> Result<RunSpec, SpecError> {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp");
        f.write_all(text.as_bytes()).expect("write");
        RunSpec::from_file(f.path())
    }

    fn err(text: &str) -> String {
        load(text).expect_err("must be rejected").to_string()
    }

    /// Each spec text is refused with a message containing its reason.
    fn each_refused(cases: &[(String, &str)]) {
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

    #[test]
    fn one_length_set_alone_never_traps() {
        let with = |data: &str| load(&MINIMAL.replace("[data]\n", &format!("[data]\n{data}")));
        // TRL accepts max_length = 512 with its default prompt limit of 512.
        let spec = with("max_length = 512\n").expect("valid");
        assert_eq!(
            (spec.data.max_length, spec.data.max_prompt_length),
            (512, 256)
        );
        let spec = with("max_prompt_length = 2048\n").expect("valid");
        assert_eq!(
            (spec.data.max_length, spec.data.max_prompt_length),
            (4096, 2048)
        );
        // Unchanged when they fit, and both given in conflict still names the key.
        let spec = with("max_length = 2048\n").expect("valid");
        assert_eq!(spec.data.max_prompt_length, 512);
        let e = with("max_length = 512\nmax_prompt_length = 512\n")
            .expect_err("conflict")
            .to_string();
        assert!(
            e.contains("data.max_prompt_length: must be below data.max_length (512)"),
            "{e}"
        );
    }

    #[test]
    fn file_formats_columns_and_report_to_are_read_and_checked_by_key() {
        let spec = load(&format!(
            "{MINIMAL}file_format = \"parquet\"\ncolumns = {{ prompt = \"question\", chosen = \"good\" }}\n\
             [train]\nreport_to = \"tensorboard\"\n"
        ))
        .expect("valid");
        assert_eq!(spec.data.file_format, FileFormat::Parquet);
        assert_eq!(
            spec.data.columns.get("prompt").map(String::as_str),
            Some("question")
        );
        assert!(spec.train.tensorboard());
        let spec = load(&format!("{MINIMAL}[train]\nreport_to = [\"none\"]\n")).expect("valid");
        assert!(!spec.train.tensorboard());
        assert!(!load(MINIMAL).expect("valid").train.tensorboard());
        let cases = [
            (
                format!("{MINIMAL}columns = {{ answer = \"x\" }}\n"),
                "data.columns: \"answer\" is not a record key",
            ),
            (
                format!("{MINIMAL}columns = {{ chosen = \"x\", rejected = \"x\" }}\n"),
                "data.columns: column \"x\" is renamed twice",
            ),
            (format!("{MINIMAL}file_format = \"csv\"\n"), "file_format"),
            (
                format!("{MINIMAL}[train]\nreport_to = [\"wandb\"]\n"),
                "train.report_to: \"wandb\": only \"tensorboard\"",
            ),
        ];
        each_refused(&cases);
    }

    #[test]
    fn data_limits_are_read_and_checked_by_key() {
        let spec = load(&format!(
            "{MINIMAL}[data.limits]\nmax_rows = 100\nmax_value_bytes = 4096\n"
        ))
        .expect("valid");
        assert_eq!(spec.data.limits.max_rows, 100);
        assert_eq!(spec.data.limits.max_value_bytes, 4096);
        assert_eq!(
            spec.data.limits.max_nesting,
            DataLimits::default().max_nesting
        );
        let with = |extra: &str| format!("{MINIMAL}[data.limits]\n{extra}\n");
        let cases = [
            (
                with("max_rows = 0"),
                "data.limits.max_rows: must be at least 1",
            ),
            (
                with("max_value_bytes = 10"),
                "data.limits.max_value_bytes: must be at least 1024",
            ),
            (
                with("max_value_bytes = 4096\nmax_decoded_bytes = 2048"),
                "data.limits.max_decoded_bytes",
            ),
            (with("max_nesting = 0"), "data.limits.max_nesting"),
            (with("max_depth = 3"), "max_depth"),
        ];
        each_refused(&cases);
    }

    #[test]
    fn a_classification_task_is_read_and_checked_by_key() {
        let ner = format!(
            "{MINIMAL}[task]\ntype = \"token-classification\"\nlabels = [\"O\", \"B-PER\", \"I-PER\"]\n\
             [train]\nmetric_for_best_model = \"eval_f1\"\n"
        );
        let spec = load(&ner).expect("valid");
        assert_eq!(spec.task.kind, TaskType::TokenClassification);
        assert_eq!(spec.task.labels, vec!["O", "B-PER", "I-PER"]);
        // The founding method's loss by default; a larger F1 is better.
        assert_eq!(spec.objective.loss, Loss::Combined);
        assert!(spec.greater_is_better());
        assert!(!load(MINIMAL).expect("valid").greater_is_better());
        let with =
            |extra: &str| format!("{MINIMAL}[task]\ntype = \"token-classification\"\n{extra}");
        let cases = [
            (
                with("labels = [\"O\", \"PER\"]\n"),
                "task.labels: \"PER\" is not an IOB2 tag",
            ),
            (
                with("labels = [\"O\", \"O\"]\n"),
                "task.labels: \"O\" appears twice",
            ),
            (
                with("[objective]\nloss = \"sigmoid\"\n"),
                "objective.loss: sigmoid compares responses",
            ),
            (
                format!("{MINIMAL}negatives = \"adversarial\"\n"),
                "data.negatives: \"adversarial\" and \"confusion\" negatives are for the classification tasks",
            ),
            (
                format!(
                    "{MINIMAL}negatives = \"confusion\"\n[task]\ntype = \"sequence-classification\"\n"
                ),
                "data.negatives: \"confusion\" negatives are near misses of entity tags",
            ),
            (
                format!(
                    "{MINIMAL}negatives = \"policy\"\n[task]\ntype = \"sequence-classification\"\n"
                ),
                "data.negatives: \"policy\"",
            ),
            (
                with("[lora]\n[train]\nzero_stage = 3\ngradient_checkpointing = true\n"),
                "train.zero_stage: 3 shards a frozen causal-LM base",
            ),
            (
                with("[train]\nmetric_for_best_model = \"f1\"\n"),
                "train.metric_for_best_model: \"f1\" is not an eval metric",
            ),
            (
                with("negatives_per_label = 0\n"),
                "task.negatives_per_label: must be 1 to 64",
            ),
            (format!("{MINIMAL}[task]\ntype = \"ner\"\n"), "task.type"),
            (
                format!("{MINIMAL}[task]\nlabels = [\"a\"]\n"),
                "task.labels: labels are for the classification tasks",
            ),
            (
                with("[lora]\ntarget_modules = [\"q_proj\"]\n"),
                "lora.target_modules: unknown module \"q_proj\" (an encoder has query, key, value, query_proj, key_proj, value_proj, Wqkv, Wo, Wi)",
            ),
            (
                with("[lora]\ntarget_modules = \"all-linear\"\n"),
                "lora.target_modules: \"all-linear\" is for the causal LMs",
            ),
        ];
        each_refused(&cases);
        // LoRA on an encoder targets PEFT's default (query, value) unless told.
        let lora = load(&with("[lora]\nr = 4\n")).expect("valid");
        let names = lora.lora.as_ref().map(|l| l.target_modules.names());
        assert_eq!(names, Some(vec!["query".to_string(), "value".to_string()]));
        let key = load(&with("[lora]\ntarget_modules = [\"key\"]\n")).expect("valid");
        let names = key.lora.as_ref().map(|l| l.target_modules.names());
        assert_eq!(names, Some(vec!["key".to_string()]));
        // A causal LM keeps PEFT's Llama-family default.
        let lm = load(&format!("{MINIMAL}[lora]\nr = 4\n")).expect("valid");
        let names = lm.lora.as_ref().map(|l| l.target_modules.names());
        assert_eq!(
            names,
            Some(vec!["q_proj".to_string(), "v_proj".to_string()])
        );
    }

    #[test]
    fn minimal_spec_gets_trl_defaults_and_resolved_paths() {
        let spec = load(MINIMAL).expect("valid");
        assert_eq!(spec.objective.loss, Loss::Sigmoid);
        assert_eq!(spec.objective.beta, 0.1);
        assert_eq!(spec.optim.lr, 1e-6);
        assert_eq!(spec.optim.schedule, Schedule::Linear);
        assert_eq!(spec.data.truncation, Truncation::KeepEnd);
        assert_eq!(spec.micro_batch_size(), 8);
        assert!(
            spec.model.path.is_absolute(),
            "resolved against the spec's directory"
        );
        assert_eq!(spec.reference.path, ReferenceModel::Same);
    }

    #[test]
    fn string_valued_keys_read_as_enums_and_write_back_the_same() {
        let spec = load(&format!(
            "{MINIMAL}\n[reference]\npath = \"ref\"\ncache = \"none\"\n"
        ))
        .expect("valid");
        let ReferenceModel::Dir(dir) = &spec.reference.path else {
            panic!("{:?}", spec.reference.path);
        };
        assert!(dir.is_absolute() && dir.ends_with("ref"), "{dir:?}");
        assert_eq!(spec.reference.cache, ReferenceCache::Off);
        assert_eq!(spec.data.negatives, None);
        let spec = load(&format!("{MINIMAL}negatives = \"policy\"\n")).expect("valid");
        assert_eq!(spec.data.negatives, Some(Negatives::Policy));
        // JSON (the wire and the store) spells them as the TOML does.
        let json = serde_json::to_value(&spec).expect("json");
        assert_eq!(json["reference"]["path"], "same");
        assert_eq!(json["reference"]["cache"], "");
        assert_eq!(json["data"]["negatives"], "policy");
        let back: RunSpec = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, spec);
        let e = err(&format!("{MINIMAL}\n[reference]\npath = \" \"\n"));
        assert!(e.contains("reference.path: must be"), "{e}");
        assert_eq!("bfloat16".parse::<Dtype>(), Ok(Dtype::Bf16));
        assert_eq!(Dtype::F16.as_str(), "f16");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err(&format!("{MINIMAL}\n[optim]\nlearning_rate = 0.1\n"));
        assert!(e.contains("learning_rate"), "{e}");
        let e = err(&format!("{MINIMAL}\nbogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("[objective]\nbeta = 0.0", "objective.beta: must be > 0"),
            (
                "[objective]\nlabel_smoothing = 0.5",
                "objective.label_smoothing: must be in [0, 0.5)",
            ),
            (
                "[objective]\nloss = \"ipo\"\nlabel_smoothing = 0.1",
                "objective.label_smoothing: only applies",
            ),
            (
                "[train]\nglobal_batch_size = 8\nmicro_batch_size = 3",
                "train.micro_batch_size: 3 must divide",
            ),
            (
                "[optim]\nbetas = [0.9, 1.5]",
                "optim.betas: both must be in [0, 1)",
            ),
            ("[optim]\nlr = -1.0", "optim.lr: must be > 0"),
            ("[optim]\nlr = 1e308", "optim.lr: must be at most 10"),
            (
                "[train]\nmax_steps = 9223372036854775807",
                "train.max_steps: must be at most 1000000000",
            ),
            (
                "[train]\nglobal_batch_size = 4294967296",
                "train.global_batch_size: must be in 1..=1048576",
            ),
            (
                "[cluster]\nmax_workers = 1000000",
                "cluster.max_workers: must be at most 65536",
            ),
        ];
        for (extra, want) in cases {
            let e = err(&format!("{MINIMAL}\n{extra}\n"));
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let e = err(&format!("{MINIMAL}\n[objective]\nloss = \"kto\"\n"));
        assert!(
            e.ends_with("objective.loss: unknown value \"kto\" (expected one of sigmoid, robust, ipo, hinge, sft, combined)"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}\n[optim]\nlr = \"fast\"\n"));
        assert!(e.contains("optim.lr"), "{e}");
    }
}
