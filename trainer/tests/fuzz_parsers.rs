//! Never-panic properties of the parsers that read user files: a model's safetensors header, its
//! `model.safetensors.index.json`, and a LoRA adapter's `adapter_config.json`. Each gets arbitrary
//! bytes and damaged versions of a valid file; every outcome must be `Ok` or an `Err`, never a
//! panic. The case count follows `PROPTEST_CASES` (256 by default; `.ci/run` runs more).

use std::path::PathBuf;

use oxtune_trainer::checkpoint::Checkpoint;
use oxtune_trainer::lora_adapter::{LoraAdapter, LoraSpec};
use oxtune_trainer::tiny::tiny_default_config;
use oxtune_trainer::GptOssConfig;
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("oxtune-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A valid two-tensor safetensors file, the seed that damaged files are made from.
fn valid_safetensors() -> Vec<u8> {
    let a: Vec<u8> = (0..24).map(|i| (i as f32 * 0.25).to_le_bytes()).collect::<Vec<_>>().concat();
    let b: Vec<u8> = (0..8u8).collect();
    let views = vec![
        ("model.norm.weight".to_string(), TensorView::new(Dtype::F32, vec![2, 3, 4], &a).unwrap()),
        (
            "model.layers.0.mlp.experts.gate_up_proj_blocks".to_string(),
            TensorView::new(Dtype::U8, vec![8], &b).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// Reads everything `Checkpoint` offers about every tensor it lists.
fn read_all(c: &Checkpoint) {
    let names: Vec<String> = c.names().map(String::from).collect();
    for n in &names {
        let info = c.info(n).unwrap().clone();
        let _ = c.bytes(&info).len();
        let _ = c.f32(n, &info.shape);
        let _ = c.expect(n, &[Dtype::U8], &[8]);
    }
    let _ = c.bytes_by_dtype();
}

fn damage(mut bytes: Vec<u8>, cut: usize, flips: &[(usize, u8)]) -> Vec<u8> {
    for &(i, v) in flips {
        if !bytes.is_empty() {
            let n = bytes.len();
            bytes[i % n] = v;
        }
    }
    bytes.truncate(cut.min(bytes.len()));
    bytes
}

fn small_model_config() -> GptOssConfig {
    let base = tiny_default_config();
    GptOssConfig {
        hidden_size: 64,
        intermediate_size: 64,
        num_hidden_layers: 2,
        layer_types: base.layer_types[..2].to_vec(),
        ..base
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z_.0-9]{0,12}".prop_map(Value::String),
        Just(Value::from(u64::MAX)),
        Just(Value::from(0)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Keys of a real adapter_config.json, so that mutations reach the checks behind the parser.
const ADAPTER_KEYS: &[&str] = &[
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "target_parameters",
    "peft_type",
    "task_type",
    "bias",
    "fan_in_fan_out",
    "lora_dropout",
    "modules_to_save",
    "base_model_name_or_path",
];

proptest! {
    #[test]
    fn arbitrary_bytes_as_a_model_file_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let d = dir("model-bytes");
        let _ = std::fs::remove_file(d.join("model.safetensors.index.json"));
        std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
        if let Ok(c) = Checkpoint::open(&d) {
            read_all(&c);
        }
    }

    #[test]
    fn damaged_model_file_never_panics(cut in 0usize..400, flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..4)) {
        let d = dir("model-damaged");
        let _ = std::fs::remove_file(d.join("model.safetensors.index.json"));
        let bytes = damage(valid_safetensors(), cut, &flips);
        std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
        match Checkpoint::open(&d) {
            Ok(c) => read_all(&c),
            Err(e) => prop_assert!(e.to_string().contains("model.safetensors"), "error names no file: {e}"),
        }
    }

    #[test]
    fn arbitrary_bytes_as_the_index_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let d = dir("index-bytes");
        std::fs::write(d.join("model.safetensors.index.json"), &bytes).unwrap();
        if let Ok(c) = Checkpoint::open(&d) {
            read_all(&c);
        }
    }

    #[test]
    fn arbitrary_weight_maps_never_panic(
        map in proptest::collection::btree_map(
            prop_oneof![Just("model.norm.weight".to_string()), "[a-z.]{0,10}"],
            prop_oneof![
                Just(Value::from("shard-1.safetensors")),
                Just(Value::from("shard-2.safetensors")),
                Just(Value::from("../shard-1.safetensors")),
                Just(Value::from("")),
                json_value(),
            ],
            0..5,
        ),
        wrap in 0u8..3,
    ) {
        let d = dir("index-map");
        std::fs::write(d.join("shard-1.safetensors"), valid_safetensors()).unwrap();
        std::fs::write(d.join("shard-2.safetensors"), b"not a safetensors file").unwrap();
        let map = Value::Object(map.into_iter().collect());
        let index = match wrap {
            0 => serde_json::json!({ "metadata": {}, "weight_map": map }),
            1 => map,
            _ => serde_json::json!({ "weight_map": [map] }),
        };
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
        if let Ok(c) = Checkpoint::open(&d) {
            read_all(&c);
        }
    }

    #[test]
    fn arbitrary_adapter_config_never_panics(
        base in prop_oneof![Just(true), Just(false)],
        edits in proptest::collection::vec((proptest::sample::select(ADAPTER_KEYS), json_value()), 0..4),
        raw in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
    ) {
        let d = dir("adapter");
        let cfg = small_model_config();
        let spec = LoraSpec { r: 2, alpha: 4.0, rslora: false, attention: true, experts: true };
        if !d.join("adapter_model.safetensors").exists() {
            LoraAdapter::new(&cfg, spec, 7).unwrap().save(&d, None).unwrap();
            std::fs::copy(d.join("adapter_config.json"), d.join("valid_config.json")).unwrap();
        }
        let text = match raw {
            Some(bytes) => bytes,
            None => {
                let mut v: Value = if base {
                    serde_json::from_slice(&std::fs::read(d.join("valid_config.json")).unwrap()).unwrap()
                } else {
                    Value::Object(Default::default())
                };
                for (k, x) in edits {
                    v[k] = x;
                }
                v.to_string().into_bytes()
            }
        };
        std::fs::write(d.join("adapter_config.json"), &text).unwrap();
        let _ = oxtune_lora::read_adapter_config(&d);
        match LoraAdapter::load(&d, &cfg) {
            Ok(a) => prop_assert!(a.spec.r >= 1),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
