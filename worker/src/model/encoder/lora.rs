//! LoRA on the encoders, as PEFT does it for `TOKEN_CLS` and `SEQ_CLS`:
//! adapters on the self-attention's `query`, `key`, `value` layers (PEFT's
//! default for BERT and RoBERTa is `query` and `value`; DeBERTa's are
//! `query_proj`, `key_proj`, `value_proj`; ModernBERT's linear layers are
//! `Wqkv`, `Wo` — the attention's and the MLP's — and `Wi`), every base parameter
//! frozen except the classification head, which trains whole (PEFT's
//! `modules_to_save`) and is saved with the adapters. `merge` writes the base
//! with the adapters folded in, a plain transformers checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::Tensor;
use tch::nn::VarStore;

use super::{Block, Encoder};
use crate::error::{Error, Result, TorchContext};
use crate::model::layers::Linear;
use crate::model::peft;

/// The head PEFT trains whole for a classification task (`modules_to_save`).
const HEAD: &str = "classifier";

impl Encoder {
    /// The self-attention's projections by PEFT's module names: BERT's and
    /// RoBERTa's `query`, `key`, `value`; DeBERTa's `query_proj`, `key_proj`,
    /// `value_proj` (with `share_att_key`, the adapters on the query and key
    /// projections also turn the relative positions, as in PEFT).
    fn module_names(&self) -> [&'static str; 3] {
        match self.config.family {
            super::Family::Deberta => ["query_proj", "key_proj", "value_proj"],
            // ModernBERT's projections are one fused `Wqkv`.
            super::Family::ModernBert => ["Wqkv", "Wqkv", "Wqkv"],
            _ => ["query", "key", "value"],
        }
    }

    /// Every linear layer an adapter can sit on, with its module name (PEFT's)
    /// and its parameter path prefix.
    fn lora_sites_mut(&mut self) -> Vec<(&'static str, String, &mut Linear)> {
        let base = self.config.family.name();
        let [q, k, v] = self.module_names();
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            match layer {
                Block::Post(layer) => {
                    let at = format!("{base}.encoder.layer.{i}.attention.self");
                    out.push((q, format!("{at}.{q}"), &mut layer.query));
                    out.push((k, format!("{at}.{k}"), &mut layer.key));
                    out.push((v, format!("{at}.{v}"), &mut layer.value));
                }
                Block::Pre(layer) => {
                    let at = format!("{base}.layers.{i}");
                    out.push(("Wqkv", format!("{at}.attn.Wqkv"), &mut layer.wqkv));
                    out.push(("Wo", format!("{at}.attn.Wo"), &mut layer.attn_out));
                    out.push(("Wi", format!("{at}.mlp.Wi"), &mut layer.wi));
                    out.push(("Wo", format!("{at}.mlp.Wo"), &mut layer.mlp_out));
                }
            }
        }
        out
    }

    fn lora_sites(&self) -> Vec<(String, &Linear)> {
        let base = self.config.family.name();
        let [q, k, v] = self.module_names();
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                Block::Post(layer) => {
                    let at = format!("{base}.encoder.layer.{i}.attention.self");
                    out.push((format!("{at}.{q}"), &layer.query));
                    out.push((format!("{at}.{k}"), &layer.key));
                    out.push((format!("{at}.{v}"), &layer.value));
                }
                Block::Pre(layer) => {
                    let at = format!("{base}.layers.{i}");
                    out.push((format!("{at}.attn.Wqkv"), &layer.wqkv));
                    out.push((format!("{at}.attn.Wo"), &layer.attn_out));
                    out.push((format!("{at}.mlp.Wi"), &layer.wi));
                    out.push((format!("{at}.mlp.Wo"), &layer.mlp_out));
                }
            }
        }
        out
    }

    /// Adds LoRA adapters to the layers `spec.target_modules` names and
    /// freezes the base but for the classification head. New adapters start
    /// as PEFT's `init_lora_weights` says (A random from `seed`, B zero).
    /// BERT's names stand for DeBERTa's projections (`query` is
    /// `query_proj`): the spec's default (PEFT's `query`, `value`) and a spec
    /// written for one encoder family fit another. The adapters are written
    /// with the model's own names, as PEFT writes them.
    pub fn add_lora(&mut self, spec: &dpo_proto::LoraSpec, seed: u64) -> Result<()> {
        let own = self.module_names();
        let mut spec = spec.clone();
        if let dpo_proto::TargetModules::Names(names) = &mut spec.target_modules {
            for name in names.iter_mut() {
                if let Some(i) = ["query", "key", "value"].iter().position(|b| b == name) {
                    *name = own[i].to_string();
                }
            }
            let mut seen = std::collections::HashSet::new();
            names.retain(|n| seen.insert(n.clone()));
        }
        let spec = &spec;
        let store = VarStore::new(self.device());
        let root = store.root();
        let targets = spec.target_modules.names();
        // A name this family does not have is refused, not skipped: the
        // adapters it asked for would silently not exist.
        let has: std::collections::HashSet<&'static str> = self
            .lora_sites_mut()
            .into_iter()
            .map(|(module, _, _)| module)
            .collect();
        if let Some(missing) = targets.iter().find(|t| !has.contains(t.as_str())) {
            let mut names: Vec<&str> = has.into_iter().collect();
            names.sort();
            return Err(Error::Input {
                context: "lora.target_modules".into(),
                reason: format!(
                    "this {} encoder has no module {missing:?} (its modules: {})",
                    self.config.model_type.name(),
                    names.join(", ")
                ),
            });
        }
        let on = self.adapters_on.clone();
        tch::manual_seed(seed as i64);
        let added = crate::model::layers::attach_lora_to(self.lora_sites_mut(), &root, spec, &on)
            .op("lora: adapter weights")?;
        if added == 0 {
            return Err(Error::Input {
                context: "lora.target_modules".into(),
                reason: format!("no linear layer of this encoder is named {targets:?}"),
            });
        }
        for (name, t) in self.vs.variables() {
            let _ = t.set_requires_grad(is_head(&name));
        }
        tracing::info!(
            adapters = added,
            r = spec.r,
            alpha = spec.alpha,
            trainable = store.variables().values().map(|t| t.numel()).sum::<usize>()
                + self
                    .head_parameters()
                    .values()
                    .map(|t| t.numel())
                    .sum::<usize>(),
            "LoRA adapters added; the base is frozen but for the classification head"
        );
        self.adapters = Some((store, spec.clone()));
        Ok(())
    }

    /// The adapters' store and spec, when the encoder has LoRA adapters.
    pub fn adapters(&self) -> Option<(&VarStore, &dpo_proto::LoraSpec)> {
        self.adapters.as_ref().map(|(v, s)| (v, s))
    }

    fn head_parameters(&self) -> HashMap<String, Tensor> {
        self.vs
            .variables()
            .into_iter()
            .filter(|(n, _)| is_head(n))
            .collect()
    }

    /// What trains, by name in name order: with LoRA the adapters and the
    /// classification head, else every parameter.
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params: Vec<(String, Tensor)> = match &self.adapters {
            Some((store, _)) => store
                .variables()
                .into_iter()
                .chain(self.head_parameters())
                .collect(),
            None => self.vs.variables().into_iter().collect(),
        };
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    /// The adapters and the head, by parameter path: what a PEFT adapter of
    /// this encoder holds.
    fn adapter_tensors(&self) -> Result<(HashMap<String, Tensor>, &dpo_proto::LoraSpec)> {
        let Some((store, spec)) = &self.adapters else {
            return Err(Error::Input {
                context: "lora".into(),
                reason: "this encoder has no adapters".into(),
            });
        };
        let mut all = store.variables();
        all.extend(self.head_parameters());
        Ok((all, spec))
    }

    /// PEFT's task type for this encoder's head.
    fn task_type(&self) -> &'static str {
        match self.head {
            super::Head::Token => "TOKEN_CLS",
            super::Head::Sequence => "SEQ_CLS",
        }
    }

    /// Writes the adapters and the head to `dir` in PEFT's format, for
    /// `PeftModel.from_pretrained(AutoModelFor…Classification(base), dir)`.
    pub fn save_adapter(&self, dir: &Path, base: &Path) -> Result<()> {
        let (tensors, spec) = self.adapter_tensors()?;
        peft::write_adapter(
            dir,
            base,
            spec,
            self.task_type(),
            &[HEAD],
            tensors.into_iter().collect(),
        )
    }

    /// Loads the PEFT adapter in `dir` (adapters and head) into this encoder.
    pub fn load_adapter(&self, dir: &Path) -> Result<()> {
        let (tensors, spec) = self.adapter_tensors()?;
        peft::read_adapter_into(dir, spec, &tensors)
    }

    /// Writes the base with the adapters folded in (`W + B A · alpha/r`) and
    /// the trained head: a plain transformers checkpoint.
    pub fn save_merged(
        &self,
        dir: &Path,
        source_dir: Option<&Path>,
        max_shard_bytes: u64,
    ) -> Result<()> {
        let mut merged = BTreeMap::new();
        for (prefix, linear) in self.lora_sites() {
            if let Some(w) = linear.merged_weight().op("merging an adapter")? {
                merged.insert(format!("{prefix}.weight"), w);
            }
        }
        self.save_weights(dir, source_dir, max_shard_bytes, merged)
    }
}

fn is_head(name: &str) -> bool {
    name.starts_with("classifier.")
}
