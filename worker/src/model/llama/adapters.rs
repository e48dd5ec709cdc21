//! LoRA adapters on the decoder's linear layers, freezing, and what trains.

use super::*;

/// While alive, the model runs as its base (adapters off); see
/// [`CausalLm::adapters_off`].
#[derive(Debug)]
pub struct AdaptersOff {
    on: Arc<AtomicBool>,
    was: bool,
}

impl Drop for AdaptersOff {
    fn drop(&mut self) {
        self.on.store(self.was, Ordering::Relaxed);
    }
}

impl CausalLm {
    /// Every linear layer of the decoder with its module name (PEFT's:
    /// `q_proj` … `down_proj`) and its parameter path prefix.
    fn linears_mut(&mut self) -> Vec<(&'static str, String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (module, path, linear) in layer.linears_mut() {
                out.push((module, format!("model.layers.{i}.{path}"), linear));
            }
        }
        out
    }

    /// Adds LoRA adapters to the linear layers `spec.target_modules` names
    /// and freezes every base parameter: only the adapters train. New
    /// adapters start as PEFT's `init_lora_weights` says (A random from
    /// `seed`, B zero, so the model starts as its base).
    pub fn add_lora(&mut self, spec: &dpo_proto::LoraSpec, seed: u64) -> Result<()> {
        let device = self.device();
        let store = VarStore::new(device);
        let targets = spec.target_modules.names();
        let r = spec.r as i64;
        let on = self.adapters_on.clone();
        let root = store.root();
        tch::manual_seed(seed as i64);
        let added = crate::model::layers::attach_lora_to(self.linears_mut(), &root, spec, &on)
            .op("lora: adapter weights")?;
        if added == 0 {
            let names: Vec<&str> = self
                .layers
                .first()
                .map(|l| l.linears().into_iter().map(|(m, _, _)| m).collect())
                .unwrap_or_default();
            return Err(crate::error::Error::Input {
                context: "lora.target_modules".into(),
                reason: format!(
                    "no linear layer of this model is named {targets:?}: a {} layer has {}",
                    self.config.architecture.name(),
                    names.join(", ")
                ),
            });
        }
        for (_, t) in self.vs.variables() {
            let _ = t.set_requires_grad(false);
        }
        tracing::info!(
            adapters = added,
            r,
            alpha = spec.alpha,
            trainable = store.variables().values().map(|t| t.numel()).sum::<usize>(),
            "LoRA adapters added; the base is frozen"
        );
        self.adapters = Some((store, spec.clone()));
        Ok(())
    }

    /// The adapters' store and spec, when the model has LoRA adapters.
    pub fn adapters(&self) -> Option<(&VarStore, &dpo_proto::LoraSpec)> {
        self.adapters.as_ref().map(|(v, s)| (v, s))
    }

    /// Runs the model as its base until the guard is dropped (the reference
    /// of a LoRA run: no second copy of the model).
    pub fn adapters_off(&self) -> AdaptersOff {
        let was = self.adapters_on.swap(false, Ordering::Relaxed);
        AdaptersOff {
            on: self.adapters_on.clone(),
            was,
        }
    }

    /// Freezes the base parameters whose names any of `patterns` matches
    /// (`train.freeze`); each pattern must match at least one. Returns how
    /// many were frozen.
    pub fn freeze(&self, patterns: &[String]) -> Result<usize> {
        let vars = self.vs.variables();
        let mut frozen = std::collections::BTreeSet::new();
        for p in patterns {
            let re = regex::Regex::new(p).map_err(|e| crate::error::Error::Input {
                context: "train.freeze".into(),
                reason: format!("{p:?} is not a regex: {e}"),
            })?;
            let hits: Vec<&String> = vars.keys().filter(|n| re.is_match(n)).collect();
            if hits.is_empty() {
                return Err(crate::error::Error::Input {
                    context: "train.freeze".into(),
                    reason: format!("{p:?} matches no parameter of this model"),
                });
            }
            frozen.extend(hits.into_iter().cloned());
        }
        for name in &frozen {
            if let Some(t) = vars.get(name) {
                let _ = t.set_requires_grad(false);
            }
        }
        tracing::info!(
            frozen = frozen.len(),
            of = vars.len(),
            "frozen parameters (train.freeze)"
        );
        Ok(frozen.len())
    }

    /// The parameters that train, by name: the adapters with LoRA, else the
    /// base parameters not frozen.
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = match &self.adapters {
            Some((store, _)) => store.variables().into_iter().collect(),
            None => self
                .vs
                .variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .collect(),
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The base parameters with every adapter folded in (`W + B A · alpha/r`),
    /// by name: what `[lora] merge` writes.
    pub fn merged_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        if self.sharded.is_some() {
            return Err(crate::error::Error::Input {
                context: "lora.merge".into(),
                reason: "the base is sharded (train.zero_stage = 3): merge the adapter with PEFT's merge_and_unload".into(),
            });
        }
        let mut merged = std::collections::HashMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (_, name, linear) in layer.linears() {
                if let Some(w) = linear.merged_weight().op("lora: merge")? {
                    merged.insert(format!("model.layers.{i}.{name}.weight"), w);
                }
            }
        }
        let mut out: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| match merged.remove(&n) {
                Some(w) => (n, w),
                None => (n, t),
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
