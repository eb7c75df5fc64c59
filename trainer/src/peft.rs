//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{io_err, Error, Result};
use crate::io::{save_safetensors, write_atomic, OwnedTensor};
use crate::lora_adapter::{LoraAdapter, LoraSpec};

/// Writes the adapter as PEFT does (fp32 tensors, PEFT's key names and config fields).
pub fn write_adapter(dir: &Path, a: &LoraAdapter, base_model: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tensors: Vec<(String, OwnedTensor)> =
        a.tensors.iter().map(|t| (t.name.clone(), OwnedTensor::f32(&t.shape, &t.value))).collect();
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    write_atomic(&dir.join("adapter_config.json"), config_json(&a.spec, base_model).as_bytes())
}

/// `adapter_config.json` for a spec.
pub fn config_json(spec: &LoraSpec, base_model: Option<&str>) -> String {
    let modules: Vec<&str> = if spec.attention { vec!["k_proj", "o_proj", "q_proj", "v_proj"] } else { vec![] };
    let params: Option<Vec<&str>> = spec.experts.then(|| vec!["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]);
    let v = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": null,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "target_parameters": params,
        "exclude_modules": null,
        "bias": "none",
        "lora_bias": false,
        "fan_in_fan_out": false,
        "use_rslora": spec.rslora,
        "use_dora": false,
        "init_lora_weights": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "inference_mode": true,
    });
    serde_json::to_string_pretty(&v).expect("serializable")
}

/// Reads the spec from `adapter_config.json`.
pub fn read_spec(dir: &Path) -> Result<LoraSpec> {
    let p = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: p.clone(), source })?;
    let err = |m: &str| Error::Config { path: p.clone(), msg: m.into() };
    if v["peft_type"].as_str() != Some("LORA") {
        return Err(err("peft_type must be \"LORA\""));
    }
    let list = |k: &str| -> Vec<String> {
        v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let modules = list("target_modules");
    let params = list("target_parameters");
    let attention = ["q_proj", "k_proj", "v_proj", "o_proj"].iter().all(|m| modules.iter().any(|x| x == m));
    if !attention && !modules.is_empty() {
        return Err(err("target_modules must list all of q_proj, k_proj, v_proj, o_proj (or none)"));
    }
    let experts = !params.is_empty();
    if experts
        && !(params.iter().any(|p| p.ends_with("gate_up_proj")) && params.iter().any(|p| p.ends_with("down_proj")))
    {
        return Err(err("target_parameters must name both mlp.experts.gate_up_proj and mlp.experts.down_proj"));
    }
    Ok(LoraSpec {
        r: v["r"].as_u64().ok_or_else(|| err("missing integer `r`"))? as usize,
        alpha: v["lora_alpha"].as_f64().ok_or_else(|| err("missing `lora_alpha`"))? as f32,
        rslora: v["use_rslora"].as_bool().unwrap_or(false),
        attention,
        experts,
    })
}

/// Reads every tensor of `adapter_model.safetensors` as f32 (F32, BF16 or F16 files).
pub fn read_adapter_tensors(dir: &Path) -> Result<HashMap<String, Vec<f32>>> {
    let p = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).map_err(io_err(&p))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Checkpoint { file: p.clone(), msg: format!("not a valid safetensors file: {e}") })?;
    let mut out = HashMap::new();
    for (name, t) in st.tensors() {
        let d = t.data();
        let v: Vec<f32> = match t.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(Error::Tensor {
                    name,
                    file: p.clone(),
                    msg: format!("dtype {other:?}, expected F32, BF16 or F16"),
                })
            }
        };
        out.insert(name, v);
    }
    Ok(out)
}

/// Loads an adapter directory for a model.
pub fn load_adapter(dir: &Path, cfg: &crate::GptOssConfig) -> Result<LoraAdapter> {
    let spec = read_spec(dir)?;
    LoraAdapter::from_values(cfg, spec, read_adapter_tensors(dir)?)
}
