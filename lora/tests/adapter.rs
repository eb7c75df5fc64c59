//! PEFT adapter files: a PEFT-made gpt-oss adapter loads with the right names, shapes and values; an
//! oxtune-written one has exactly PEFT's key set; mismatches are reported in full; bad files never panic.
//! The fixture comes from `scripts/lora_peft_interop.py write-fixture` (PEFT 0.21 on a tiny GptOss model).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{assert_close, fixture_path, Fixture};
use oxtune_lora::{
    load_adapter, read_adapter_config, save_adapter, AdapterConfig, AdapterTensor, Error, ExpertLayout, GptOssDims,
    LoraExperts, LoraLinear, LoraSite, CONFIG_FILE, GPT_OSS_EXPERT_PARAMS, WEIGHTS_FILE,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;

const ATTENTION: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

fn peft_dir() -> PathBuf {
    PathBuf::from(fixture_path("peft_gptoss"))
}

fn tiny_dims() -> (GptOssDims, usize) {
    let text = std::fs::read_to_string(peft_dir().join("tiny_config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let f = |k: &str| c[k].as_u64().unwrap() as usize;
    let dims = GptOssDims {
        hidden_size: f("hidden_size"),
        num_attention_heads: f("num_attention_heads"),
        num_key_value_heads: f("num_key_value_heads"),
        head_dim: f("head_dim"),
        intermediate_size: f("intermediate_size"),
        num_local_experts: f("num_local_experts"),
    };
    (dims, f("num_hidden_layers"))
}

fn tiny_sites(rank: usize) -> Vec<LoraSite> {
    let (dims, layers) = tiny_dims();
    dims.sites(0..layers, rank, &ATTENTION, &GPT_OSS_EXPERT_PARAMS).unwrap()
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("oxtune-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Keys and shapes of a safetensors file, read independently of the crate's loader.
fn keys_and_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect()
}

fn random_weights(sites: &[LoraSite], seed: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    sites
        .iter()
        .map(|s| {
            let [ra, ca] = s.a_shape();
            let [rb, cb] = s.b_shape();
            (
                (0..ra * ca).map(|_| rng.gen_range(-1.0..1.0)).collect(),
                (0..rb * cb).map(|_| rng.gen_range(-1.0..1.0)).collect(),
            )
        })
        .collect()
}

fn save(
    dir: &Path,
    config: &AdapterConfig,
    sites: &[LoraSite],
    weights: &[(Vec<f32>, Vec<f32>)],
) -> oxtune_lora::Result<()> {
    let tensors: Vec<AdapterTensor<'_>> =
        sites.iter().zip(weights).map(|(site, (a, b))| AdapterTensor { site, a, b }).collect();
    save_adapter(dir, config, &tensors)
}

fn tiny_config() -> AdapterConfig {
    AdapterConfig::new(
        4,
        8.0,
        ATTENTION.iter().map(|s| s.to_string()).collect(),
        GPT_OSS_EXPERT_PARAMS.iter().map(|p| format!("mlp.experts.{p}")).collect(),
    )
}

#[test]
fn gpt_oss_expert_keys_follow_peft_nesting() {
    let sites = tiny_sites(4);
    let keys: Vec<&str> = sites.iter().filter(|s| s.experts() > 1).map(|s| s.key()).collect();
    assert_eq!(
        keys,
        [
            "base_model.model.model.layers.0.mlp.experts.base_layer",
            "base_model.model.model.layers.0.mlp.experts",
            "base_model.model.model.layers.1.mlp.experts.base_layer",
            "base_model.model.model.layers.1.mlp.experts",
        ]
    );
    let only_down = LoraSite::expert_param("m.mlp.experts", "down_proj", &["down_proj"], 4, 32, 64, 4).unwrap();
    assert_eq!(only_down.key(), "m.mlp.experts", "a single targeted weight has no base_layer segment");
    let only_gate_up =
        LoraSite::expert_param("m.mlp.experts", "gate_up_proj", &["gate_up_proj"], 4, 64, 64, 4).unwrap();
    assert_eq!(only_gate_up.key(), "m.mlp.experts");
    assert!(LoraSite::expert_param("m", "router", &GPT_OSS_EXPERT_PARAMS, 4, 1, 1, 1).is_err());
}

#[test]
fn peft_made_adapter_loads_with_peft_names_shapes_and_values() {
    let dir = peft_dir();
    let sites = tiny_sites(4);
    let loaded = load_adapter(&dir, &sites).unwrap();
    assert_eq!((loaded.config.r, loaded.config.lora_alpha, loaded.config.use_rslora), (4, 8.0, false));
    assert_eq!(loaded.config.scaling(), 2.0);
    assert_eq!(
        loaded.config.target_parameters.as_deref(),
        Some(&["mlp.experts.gate_up_proj".to_string(), "mlp.experts.down_proj".to_string()][..])
    );

    // Values: the layer-0 deltas rebuilt from the loaded tensors equal PEFT's own get_delta_weight.
    let reference = Fixture::open_path(&dir.join("reference.safetensors").to_string_lossy());
    let s = loaded.config.scaling();
    let find = |key: &str| sites.iter().position(|x| x.key() == key).unwrap();
    let q = find("base_model.model.model.layers.0.self_attn.q_proj");
    let (d_in, d_out) = (sites[q].a_shape()[1], sites[q].b_shape()[0]);
    let lora = LoraLinear::from_weights(d_in, d_out, loaded.pairs[q].a.clone(), loaded.pairs[q].b.clone(), s).unwrap();
    assert_close(
        "q_proj delta",
        &lora.delta_weight().unwrap(),
        &reference.f32("layers.0.self_attn.q_proj.delta"),
        1e-7,
        1e-6,
    );
    for (param, key) in [
        ("gate_up_proj", "base_model.model.model.layers.0.mlp.experts.base_layer"),
        ("down_proj", "base_model.model.model.layers.0.mlp.experts"),
    ] {
        let i = find(key);
        let site = &sites[i];
        let experts = LoraExperts::from_weights(
            site.experts(),
            site.a_shape()[1],
            site.b_shape()[0],
            loaded.pairs[i].a.clone(),
            loaded.pairs[i].b.clone(),
            s,
        )
        .unwrap();
        let want = reference.f32(&format!("layers.0.mlp.experts.{param}.delta"));
        let per = want.len() / site.experts();
        for e in 0..site.experts() {
            let got = experts.delta_weight(e, ExpertLayout::InOut).unwrap();
            assert_close(&format!("{param} delta expert {e}"), &got, &want[e * per..(e + 1) * per], 1e-7, 1e-6);
        }
    }
}

#[test]
fn oxtune_written_adapter_has_exactly_peft_keys_shapes_and_config() {
    let sites = tiny_sites(4);
    let dir = tmp_dir("keys");
    save(&dir, &tiny_config(), &sites, &random_weights(&sites, 1)).unwrap();
    assert_eq!(keys_and_shapes(&dir.join(WEIGHTS_FILE)), keys_and_shapes(&peft_dir().join(WEIGHTS_FILE)));

    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));

    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir().join(CONFIG_FILE)).unwrap()).unwrap();
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "lora_bias",
        "fan_in_fan_out",
        "use_rslora",
        "use_dora",
        "target_parameters",
        "init_lora_weights",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
    ] {
        assert_eq!(ours[key], peft[key], "adapter_config.json field {key}");
    }
    let sorted = |v: &serde_json::Value| {
        let mut l: Vec<String> = v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
        l.sort();
        l
    };
    assert_eq!(sorted(&ours["target_modules"]), sorted(&peft["target_modules"]));
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn save_then_load_is_exact_and_overwrites() {
    let sites = tiny_sites(4);
    let dir = tmp_dir("roundtrip");
    for seed in [3, 4] {
        let weights = random_weights(&sites, seed);
        save(&dir, &tiny_config(), &sites, &weights).unwrap();
        let loaded = load_adapter(&dir, &sites).unwrap();
        for ((a, b), pair) in weights.iter().zip(&loaded.pairs) {
            assert!(a.iter().zip(&pair.a).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(b.iter().zip(&pair.b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        assert_eq!(loaded.config, tiny_config());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_loaded_peft_config_is_written_back_with_its_unknown_fields() {
    let config = read_adapter_config(&peft_dir()).unwrap();
    assert_eq!(config.other.get("peft_version").and_then(|v| v.as_str()), Some("0.21.0"));
    let sites = tiny_sites(4);
    let dir = tmp_dir("config");
    save(&dir, &config, &sites, &random_weights(&sites, 5)).unwrap();
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir().join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(ours, peft);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loading_reports_every_mismatch_by_name() {
    let sites = tiny_sites(4);
    let dir = tmp_dir("mismatch");
    // Written for r = 4 with only q/v/o on layer 1 and down_proj alone (so without the base_layer nesting).
    let (dims, _) = tiny_dims();
    let mut written = dims.sites(0..1, 4, &ATTENTION, &GPT_OSS_EXPERT_PARAMS).unwrap();
    written.extend(dims.sites(1..2, 4, &["q_proj", "v_proj", "o_proj"], &["down_proj"]).unwrap());
    save(&dir, &tiny_config(), &written, &random_weights(&written, 6)).unwrap();
    let err = load_adapter(&dir, &sites).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::AdapterMismatch { .. }), "{msg}");
    for needle in [
        "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight: missing",
        "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight: missing",
        "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight: missing",
        // layer 1's down_proj was written at ...experts (only target), which the model expects for down_proj
        // too, so those keys match; gate_up_proj is missing instead.
    ] {
        assert!(msg.contains(needle), "message lacks {needle:?}:\n{msg}");
    }

    // Expecting rank 8 where the file has rank 4: every site is named with both shapes.
    let err = load_adapter(&dir, &tiny_sites(8)[..4]).unwrap_err().to_string();
    assert!(err.contains("the model expects rank 8 but adapter_config.json has r = 4"), "{err}");
    assert!(err.contains("q_proj.lora_A.weight: shape [4, 64] in the file, the model expects [8, 64]"), "{err}");
    assert!(err.contains("layers.1.self_attn.q_proj.lora_A.weight: not a LoRA tensor of the model"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn swapped_in_and_out_of_an_expert_weight_is_pointed_out() {
    // An adapter made with the other in/out convention for gate_up_proj (current PEFT on a transformers 4.x
    // gpt-oss, which lacks is_transposed): A [r E, 2I] and B [H, r E] instead of A [r E, H] and B [2I, r E].
    let (h, two_i, e) = (32, 48, 4);
    let module = "base_model.model.model.layers.0.mlp.experts";
    let swapped = LoraSite::expert_param(module, "gate_up_proj", &["gate_up_proj"], e, two_i, h, 4).unwrap();
    let expected = LoraSite::expert_param(module, "gate_up_proj", &["gate_up_proj"], e, h, two_i, 4).unwrap();
    let dir = tmp_dir("swapped");
    let mut config = tiny_config();
    config.target_parameters = Some(vec!["mlp.experts.gate_up_proj".into()]);
    save(&dir, &config, std::slice::from_ref(&swapped), &random_weights(std::slice::from_ref(&swapped), 7)).unwrap();
    let err = load_adapter(&dir, &[expected]).unwrap_err().to_string();
    assert!(err.contains("experts.lora_A.weight: shape [16, 48] in the file, the model expects [16, 32]"), "{err}");
    assert!(err.contains("experts.lora_B.weight: shape [32, 16] in the file, the model expects [48, 16]"), "{err}");
    assert!(err.contains("in and out are swapped"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_peft_options_are_rejected_with_the_option_named() {
    let sites = tiny_sites(4);
    let dir = tmp_dir("unsupported");
    save(&dir, &tiny_config(), &sites, &random_weights(&sites, 8)).unwrap();
    let path = dir.join(CONFIG_FILE);
    let original = std::fs::read_to_string(&path).unwrap();
    for (field, value, needle) in [
        ("use_dora", "true", "DoRA"),
        ("rank_pattern", "{\"q_proj\": 8}", "rank_pattern"),
        ("peft_type", "\"IA3\"", "peft_type"),
        ("modules_to_save", "[\"lm_head\"]", "modules_to_save"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&path, v.to_string()).unwrap();
        let err = load_adapter(&dir, &sites).unwrap_err().to_string();
        assert!(err.contains(needle), "{field}: {err}");
    }
    std::fs::write(&path, "{not json").unwrap();
    assert!(matches!(load_adapter(&dir, &sites).unwrap_err(), Error::Json { .. }));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn save_rejects_wrong_sizes_and_ranks_without_writing() {
    let sites = tiny_sites(4);
    let mut weights = random_weights(&sites, 9);
    weights[3].1.pop();
    let dir = tmp_dir("badsave");
    let err = save(&dir, &tiny_config(), &sites, &weights).unwrap_err().to_string();
    assert!(err.contains("o_proj.lora_B.weight: 255 values given, its shape [64, 4] needs 256"), "{err}");
    assert!(!dir.exists());
    let mut config = tiny_config();
    config.r = 2;
    let err = save(&dir, &config, &sites, &random_weights(&sites, 9)).unwrap_err().to_string();
    assert!(err.contains("rank 4 differs from the config's r = 2"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Damaged weight files are errors, never panics.
    #[test]
    fn damaged_weights_file_never_panics(cut in 0usize..2000, flips in proptest::collection::vec((0usize..30000, any::<u8>()), 0..6)) {
        let sites = tiny_sites(4);
        let dir = tmp_dir(&format!("fuzz-{cut}-{}", flips.len()));
        save(&dir, &tiny_config(), &sites, &random_weights(&sites, 10)).unwrap();
        let path = dir.join(WEIGHTS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        for (i, v) in flips {
            let n = bytes.len();
            bytes[i % n] ^= v;
        }
        bytes.truncate(bytes.len() - cut.min(bytes.len()));
        std::fs::write(&path, &bytes).unwrap();
        let _ = load_adapter(&dir, &sites);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
