//! LoRA against PEFT itself (`tests/reference/peft_reference.py`): PEFT makes
//! an adapter, we train it for 3 steps of DPO, IPO and the combined objective
//! (SGD; the reference is the same model with its adapters off), PEFT trains
//! the same adapter the same way (the papers' losses of dpo_reference.py); the
//! adapters must agree to 1e-5, ours must load into PEFT with the same logits,
//! and our merged model must give the logits of PEFT's `merge_and_unload()`.
//! Freezing (`train.freeze`) is checked against the PyTorch reference with
//! `requires_grad = False` on the same names, and the frozen tensors must not
//! move at all.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fixture, fixtures, max_weight_diff, read_jsonl, run_python, tempdir};
use dpo_worker::model::checkpoint::read_tensors;

const STEPS: u64 = 3;
const GLOBAL: usize = 4;
const LR: f64 = 0.5;
const BETA: f64 = 0.1;

fn train(spec: &Path) -> std::process::Output {
    common::train_output(spec, &[])
}

fn train_ok(spec: &Path) {
    let out = train(spec);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A DPO run of 3 SGD steps on the Qwen2 fixture; `extra` goes at the end.
fn spec(dir: &Path, name: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\n[model]\npath = \"{}\"\n[reference]\npath = \"same\"\n\
             [data]\ntrain = \"{}\"\nshuffle = false\nmax_length = 512\nmax_prompt_length = 256\n\
             [objective]\nloss = \"sigmoid\"\nbeta = {BETA}\n\
             [optim]\nname = \"sgd\"\nlr = {LR}\nmax_grad_norm = 0.0\nschedule = \"constant\"\n\
             [train]\nmax_steps = {STEPS}\nglobal_batch_size = {GLOBAL}\nmicro_batch_size = 2\noutput = \"{}\"\n{extra}\n",
            fixture("qwen2").display(),
            fixtures().join("pairs_tokens.jsonl").display(),
            dir.join(name).display(),
        ),
    )
    .expect("write spec");
    path
}

/// PEFT makes a rank-4 (alpha 8) adapter of `model` on `targets` (comma
/// separated) in `init`, its B matrices drawn too.
fn peft_init(model: &Path, init: &Path, targets: &str) {
    run_python(
        "tests/reference/peft_reference.py",
        &[
            "init",
            model.to_str().expect("utf-8"),
            init.to_str().expect("utf-8"),
            "4",
            "8",
            targets,
        ],
    );
}

/// PEFT's side of a comparison: `case` (written to `dir/name.json`) trains
/// the adapter in `init` with PEFT and loads ours (`ours`) into PEFT; returns
/// our adapter, how far it moved from `init`, its largest difference from
/// PEFT's, and PEFT's `results.json` (logit differences) from `out`.
fn compare_with_peft(
    dir: &Path,
    name: &str,
    case: serde_json::Value,
    init: &Path,
    ours: &Path,
    out: &Path,
) -> (BTreeMap<String, tch::Tensor>, f64, f64, serde_json::Value) {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, case.to_string()).expect("case");
    run_python(
        "tests/reference/peft_reference.py",
        &["check", path.to_str().expect("utf-8")],
    );
    let file = "adapter_model.safetensors";
    let start = read_tensors(&init.join(file)).expect("initial adapter");
    let theirs = read_tensors(&out.join("reference").join(file)).expect("PEFT's");
    let mine = read_tensors(&ours.join(file)).expect("ours");
    let (moved, diff) = (
        max_weight_diff(&mine, &start),
        max_weight_diff(&mine, &theirs),
    );
    let results =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("results"))
            .expect("json");
    (mine, moved, diff, results)
}

#[test]
fn lora_dpo_equals_peft_and_what_we_write_loads_into_peft() {
    let dir = tempdir();
    let init = dir.path().join("init");
    let model = fixture("qwen2");
    peft_init(
        &model,
        &init,
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    );
    // (loss, learning rate): DPO, IPO and the combined objective (labelled
    // chosen responses, rejected ones as negatives).
    for (loss, lr) in [("sigmoid", LR), ("ipo", 0.05), ("combined", LR)] {
        let path = spec(
            dir.path(),
            loss,
            &format!(
                "[lora]\nr = 4\nalpha = 8.0\ntarget_modules = \"all-linear\"\ninit_from = \"{}\"\nmerge = true",
                init.display()
            ),
        );
        let text = std::fs::read_to_string(&path).expect("spec");
        let text = text
            .replace(
                "loss = \"sigmoid\"",
                &format!("loss = \"{loss}\"\nnegative_weight = 0.5"),
            )
            .replace(&format!("lr = {LR}\n"), &format!("lr = {lr}\n"));
        std::fs::write(&path, text).expect("spec");
        train_ok(&path);
        let ours = dir.path().join(loss).join("final");
        assert!(ours.join("adapter_config.json").exists());
        assert!(
            !ours.join("model.safetensors").exists(),
            "a LoRA run writes its adapter, not the whole model"
        );
        let out = dir.path().join(format!("peft-{loss}"));
        let case = serde_json::json!({
            "model": model, "data": fixtures().join("pairs_tokens.jsonl"), "init": init,
            "ours": ours, "steps": STEPS, "global_batch_size": GLOBAL, "lr": lr, "beta": BETA,
            "loss": loss, "negative_weight": 0.5, "out": out,
        });
        let (_, moved, diff, results) =
            compare_with_peft(dir.path(), loss, case, &init, &ours, &out);
        let value = |k: &str| results[k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "LoRA {loss}, 3 SGD steps: adapters moved {moved:.2e}, max |ours − PEFT| {diff:.2e}; \
             logits of our adapter in PEFT vs PEFT's {:.2e} (scale {:.1}); merged {:.2e}",
            value("adapter_logits"),
            value("logits_scale"),
            value("merged_logits")
        );
        assert!(moved > 1e-3, "{loss}: training moves the adapters: {moved}");
        assert!(
            diff <= 1e-5,
            "{loss}: adapters differ from PEFT's by {diff}"
        );
        let logits = value("adapter_logits");
        assert!(
            logits <= 1e-5,
            "{loss}: our adapter in PEFT: logits differ by {logits}"
        );
        let merged = value("merged_logits");
        assert!(merged <= 1e-5, "{loss}: merged logits differ by {merged}");
        let metrics = read_jsonl(&dir.path().join(loss).join("metrics.jsonl"));
        assert_eq!(metrics.len() as u64, STEPS);
    }
}

/// Phi-3's fused projections as PEFT targets them (`qkv_proj`,
/// `gate_up_proj`): PEFT makes the adapter, we train it 3 DPO steps, PEFT
/// trains it the same way (each sequence scored alone: LongRoPE), the
/// adapters agree and ours loads into PEFT with PEFT's logits.
#[test]
fn lora_on_phi3_s_fused_projections_equals_peft() {
    let dir = tempdir();
    let init = dir.path().join("init");
    let model = fixture("phi3");
    peft_init(&model, &init, "qkv_proj,gate_up_proj");
    let path = spec(
        dir.path(),
        "phi3-lora",
        &format!(
            "[lora]\nr = 4\nalpha = 8.0\ntarget_modules = [\"qkv_proj\", \"gate_up_proj\"]\ninit_from = \"{}\"",
            init.display()
        ),
    );
    let text = std::fs::read_to_string(&path).expect("spec");
    let text = text.replace(
        &fixture("qwen2").display().to_string(),
        &model.display().to_string(),
    );
    std::fs::write(&path, text).expect("spec");
    train_ok(&path);
    let ours = dir.path().join("phi3-lora").join("final");
    let out = dir.path().join("peft-phi3");
    let case = serde_json::json!({
        "model": model, "data": fixtures().join("pairs_tokens.jsonl"), "init": init,
        "ours": ours, "steps": STEPS, "global_batch_size": GLOBAL, "lr": LR, "beta": BETA,
        "loss": "sigmoid", "out": out, "per_sequence": true,
    });
    let (mine, moved, diff, results) =
        compare_with_peft(dir.path(), "phi3", case, &init, &ours, &out);
    assert!(
        mine.keys().any(|k| k.contains("qkv_proj.lora_A"))
            && mine.keys().any(|k| k.contains("gate_up_proj.lora_B")),
        "{:?}",
        mine.keys()
    );
    let logits = results["adapter_logits"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "Phi-3 LoRA on qkv_proj + gate_up_proj: adapters moved {moved:.2e}, max |ours − PEFT| {diff:.2e}; logits in PEFT {logits:.2e}"
    );
    assert!(moved > 1e-3, "training moves the adapters: {moved}");
    assert!(diff <= 1e-5, "adapters differ from PEFT's by {diff}");
    assert!(
        logits <= 1e-5,
        "our adapter in PEFT: logits differ by {logits}"
    );
}

#[test]
fn frozen_parameters_stay_bit_identical_and_the_rest_train_as_in_pytorch() {
    let dir = tempdir();
    // The embedding (tied to the head in Qwen2) and the first layer frozen.
    let freeze = [r"^model\.embed_tokens\.", r"^model\.layers\.0\."];
    let toml_list = freeze
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let path = spec(dir.path(), "frozen", &format!("freeze = [{toml_list}]"));
    train_ok(&path);
    let case = dir.path().join("cases.json");
    let reference = dir.path().join("frozen.reference.safetensors");
    std::fs::write(
        &case,
        serde_json::json!({
            "model": fixture("qwen2"), "data": fixtures().join("pairs_tokens.jsonl"),
            "cases": [{
                "name": "frozen", "loss": "sigmoid", "beta": BETA, "label_smoothing": 0.0,
                "nll_weight": 0.0, "negative_weight": 0.0, "optimizer": "sgd", "lr": LR,
                "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0,
                "schedule": "constant_with_warmup", "steps": STEPS, "global_batch_size": GLOBAL,
                "reference_free": false, "freeze": freeze, "out": reference,
            }],
        })
        .to_string(),
    )
    .expect("case");
    run_python("tests/reference/dpo_reference.py", &[&case]);
    let initial = read_tensors(&fixture("qwen2").join("model.safetensors")).expect("initial");
    let ours = read_tensors(&dir.path().join("frozen/final/model.safetensors")).expect("ours");
    let theirs = read_tensors(&reference).expect("pytorch");
    let re: Vec<regex::Regex> = freeze
        .iter()
        .map(|f| regex::Regex::new(f).expect("regex"))
        .collect();
    let (mut frozen, mut trained) = (0, 0);
    for (name, t) in &ours {
        let before = &initial[name];
        if re.iter().any(|r| r.is_match(name)) {
            frozen += 1;
            assert!(t.equal(before), "{name} moved although frozen");
        } else if !t.equal(before) {
            trained += 1;
        }
    }
    let diff = max_weight_diff(&ours, &theirs);
    eprintln!(
        "freeze: {frozen} tensors bit-identical, {trained} trained; max |ours − pytorch| {diff:.2e}"
    );
    assert!(
        frozen >= 2 && trained > 0,
        "{frozen} frozen, {trained} trained"
    );
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn bad_lora_and_freeze_settings_are_errors_naming_the_key() {
    let dir = tempdir();
    let cases = [
        (
            "target",
            "[lora]\nr = 4\ntarget_modules = [\"q_proj\", \"qkv\"]",
            "lora.target_modules",
            "unknown module \"qkv\"",
        ),
        ("rank", "[lora]\nr = 0", "lora.r", "must be in 1..="),
        (
            "nothing",
            "freeze = [\"^model\\\\.vision\\\\.\"]",
            "train.freeze",
            "matches no parameter of this model",
        ),
        (
            "stage3",
            "zero_stage = 3",
            "train.zero_stage",
            "needs a frozen base",
        ),
        (
            "stage3-lora",
            "zero_stage = 3\n[lora]\nr = 4",
            "train.gradient_checkpointing",
            "must be true with train.zero_stage = 3",
        ),
        (
            "stage3-freeze",
            "zero_stage = 3\ngradient_checkpointing = true\nfreeze = [\"embed\"]",
            "train.zero_stage",
            "3 shards a LoRA run's frozen base",
        ),
        (
            "keyword",
            "[lora]\ntarget_modules = \"every-linear\"",
            "lora.target_modules",
            "must be \"all-linear\"",
        ),
    ];
    for (name, extra, key, reason) in cases {
        let out = train(&spec(dir.path(), name, extra));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(reason),
            "{name}: wants {key}: {reason} in {stderr}"
        );
        assert!(
            !dir.path().join(name).join("metrics.jsonl").exists(),
            "{name}: nothing trained"
        );
    }
}

/// Trains `spec` on `world` ranks of `--peers` (each exits 0).
fn train_world(spec: &Path, world: usize) {
    let peers = common::free_ports(world);
    let children: Vec<std::process::Child> = (0..world)
        .map(|r| {
            common::train_process(
                spec,
                &[
                    "--peers".to_string(),
                    peers.clone(),
                    "--rank".to_string(),
                    r.to_string(),
                ],
            )
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_sharded_frozen_base_trains_the_adapters_of_a_replicated_one() {
    let dir = tempdir();
    let lora = "gradient_checkpointing = true\n[lora]\nr = 4\nalpha = 8.0\ntarget_modules = \"all-linear\"\ninit = \"gaussian\"";
    train_ok(&spec(dir.path(), "replicated", lora));
    let file = "final/adapter_model.safetensors";
    let replicated = read_tensors(&dir.path().join("replicated").join(file)).expect("adapter");
    for world in [2usize, 3] {
        let name = format!("sharded{world}");
        let path = spec(
            dir.path(),
            &name,
            &lora.replace(
                "gradient_checkpointing = true",
                "gradient_checkpointing = true\nzero_stage = 3",
            ),
        );
        train_world(&path, world);
        let sharded = read_tensors(&dir.path().join(&name).join(file)).expect("adapter");
        let d = max_weight_diff(&replicated, &sharded);
        eprintln!("LoRA, frozen base sharded over {world} ranks: max |Δ| adapters {d:.2e}");
        assert!(d <= 1e-5, "{world} ranks: {d}");
    }
}
