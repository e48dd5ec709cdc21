//! LoRA adapters in PEFT's format: `adapter_model.safetensors` (tensors named
//! `base_model.model.<parameter path>.lora_A.weight` / `lora_B.weight`, f32)
//! and `adapter_config.json` (PEFT's `LoraConfig` keys), so that
//! `PeftModel.from_pretrained(base, dir)` loads what we write, and we continue
//! training what PEFT wrote (`[lora] init_from`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::checkpoint::{self, read_tensors};
use super::llama::CausalLm;
use crate::error::{Error, Result, TorchContext};

/// The adapter weights' file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter's configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// What PEFT puts before a parameter path in the adapter file.
const PREFIX: &str = "base_model.model.";

/// Writes the model's adapters to `dir` in PEFT's format; `base` is what
/// `base_model_name_or_path` names (the base model's directory). The tokenizer
/// files of `base` come along, as PEFT users save them.
pub fn save_adapter(model: &CausalLm, dir: &Path, base: &Path) -> Result<()> {
    let Some((store, spec)) = model.adapters() else {
        return Err(no_adapters());
    };
    write_adapter(
        dir,
        base,
        spec,
        "CAUSAL_LM",
        &[],
        store.variables().into_iter().collect(),
    )
}

/// Loads the PEFT adapter in `dir` into the model's adapters (made by
/// [`CausalLm::add_lora`] from the run's `[lora]`): its rank, alpha and target
/// modules must be the run's, and it must hold every adapter tensor with the
/// model's shapes. `key` names the spec key for errors (`lora.init_from`, or
/// the checkpoint being restored).
pub fn load_adapter(model: &CausalLm, dir: &Path, key: &str) -> Result<()> {
    let Some((store, spec)) = model.adapters() else {
        return Err(Error::Input {
            context: key.into(),
            reason: "the run has no [lora] section to load an adapter into".into(),
        });
    };
    read_adapter_into(dir, spec, &store.variables())
}

fn no_adapters() -> Error {
    Error::Input {
        context: "lora".into(),
        reason: "this model has no adapters to save".into(),
    }
}

/// Writes `tensors` (named by their parameter paths: the adapters' and the
/// whole modules in `modules_to_save`) to `dir` in PEFT's format for
/// `task_type` (`CAUSAL_LM`, `TOKEN_CLS`, `SEQ_CLS`), with the tokenizer
/// files of `base`.
pub(crate) fn write_adapter(
    dir: &Path,
    base: &Path,
    spec: &dpo_proto::LoraSpec,
    task_type: &str,
    modules_to_save: &[&str],
    tensors: Vec<(String, tch::Tensor)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
    let mut tensors: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| (format!("{PREFIX}{n}"), t))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    checkpoint::write_tensors(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
    let targets = spec.target_modules.names();
    let config = json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base.display().to_string(),
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": match spec.init {
            dpo_proto::LoraInit::Default => json!(true),
            dpo_proto::LoraInit::Gaussian => json!("gaussian"),
        },
        "modules_to_save": if modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(modules_to_save)
        },
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": Value::Null,
        "layers_pattern": Value::Null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": Value::Null,
    });
    checkpoint::write_json(&dir.join(ADAPTER_CONFIG), &config)?;
    checkpoint::copy_side_files(base, dir)?;
    Ok(())
}

/// Reads the PEFT adapter in `dir` into `vars` (parameter path → tensor):
/// its rank and alpha must be `spec`'s, and it must hold every one of `vars`
/// with their shapes and nothing else.
pub(crate) fn read_adapter_into(
    dir: &Path,
    spec: &dpo_proto::LoraSpec,
    vars: &std::collections::HashMap<String, tch::Tensor>,
) -> Result<()> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let config = checkpoint::read_json(&config_path)?;
    let bad = |reason: String| Error::Config {
        path: config_path.clone(),
        reason,
    };
    if config.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad("peft_type is not \"LORA\"".into()));
    }
    let r = config.get("r").and_then(Value::as_u64);
    if r != Some(spec.r as u64) {
        return Err(bad(format!("r is {r:?}; the run's lora.r is {}", spec.r)));
    }
    let alpha = config.get("lora_alpha").and_then(Value::as_f64);
    if alpha.is_none_or(|a| (a - spec.alpha).abs() > 1e-9 * spec.alpha.abs().max(1.0)) {
        return Err(bad(format!(
            "lora_alpha is {alpha:?}; the run's lora.alpha is {}",
            spec.alpha
        )));
    }
    if config.get("use_dora").and_then(Value::as_bool) == Some(true)
        || config.get("use_rslora").and_then(Value::as_bool) == Some(true)
    {
        return Err(bad("DoRA and rsLoRA adapters are not supported".into()));
    }
    let path = dir.join(ADAPTER_WEIGHTS);
    let saved: BTreeMap<String, tch::Tensor> = read_tensors(&path)?
        .into_iter()
        .map(|(k, t)| {
            // PEFT may keep the adapter's name (`lora_A.default.weight`).
            let k = k
                .strip_prefix(PREFIX)
                .unwrap_or(&k)
                .replace(".default.", ".");
            (k, t)
        })
        .collect();
    let _guard = tch::no_grad_guard();
    for (name, var) in vars {
        let Some(t) = saved.get(name) else {
            return Err(Error::MissingTensor {
                dir: dir.to_path_buf(),
                name: format!("{PREFIX}{name}"),
            });
        };
        if t.size() != var.size() {
            return Err(Error::TensorShape {
                path: path.clone(),
                name: format!("{PREFIX}{name}"),
                expected: var.size(),
                found: t.size(),
            });
        }
        var.shallow_clone()
            .f_copy_(t)
            .op("copying an adapter tensor")?;
    }
    if let Some(extra) = saved.keys().find(|k| !vars.contains_key(*k)) {
        return Err(bad(format!(
            "the adapter holds {PREFIX}{extra}, which the run's lora.target_modules ({:?}) do not make",
            spec.target_modules.names()
        )));
    }
    tracing::info!(dir = %dir.display(), tensors = vars.len(), "loaded a LoRA adapter");
    Ok(())
}
