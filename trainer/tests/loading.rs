//! Checkpoint loading: both config forms, and every kind of bad checkpoint gives an error naming
//! the tensor or file and what was expected.

use std::path::{Path, PathBuf};

use oxtune_lora::FrozenWeight;
use oxtune_trainer::checkpoint::Checkpoint;
use oxtune_trainer::io::{save_safetensors, OwnedTensor};
use oxtune_trainer::weights::DenseWeight;
use oxtune_trainer::{GptOssConfig, LayerType, Model, RopeScaling};
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

/// A scratch copy of fixtures/model/tiny-top2 that a test may damage.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("oxtune-load-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixture("model/tiny-top2")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        Self(dir)
    }

    /// Rewrites the shard holding `name` with `edit` applied to its tensor list.
    fn edit_shard(&self, shard: &str, edit: impl FnOnce(&mut Vec<(String, OwnedTensor)>)) {
        let path = self.0.join(shard);
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, OwnedTensor)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, OwnedTensor { dtype: t.dtype(), shape: t.shape().to_vec(), data: t.data().to_vec() }))
            .collect();
        edit(&mut tensors);
        save_safetensors(&path, &tensors).unwrap();
    }

    fn load_err(&self) -> String {
        match Model::load(&self.0) {
            Ok(_) => panic!("loading a damaged checkpoint succeeded"),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SHARD0: &str = "model-00000-of-00001.safetensors";
const SHARD1: &str = "model-00001-of-00001.safetensors";
const LAYER0_KEY: &str = "model.layers.0.self_attn.k_proj.weight";

fn shard_of(dir: &Path, name: &str) -> &'static str {
    let ck = Checkpoint::open(dir).unwrap();
    let f = ck.file_of(ck.info(name).unwrap()).file_name().unwrap().to_str().unwrap().to_string();
    if f == SHARD0 {
        SHARD0
    } else {
        SHARD1
    }
}

#[test]
fn real_configs_parse_in_both_rope_forms() {
    let c20 = GptOssConfig::from_dir(&fixture("configs/gpt-oss-20b")).unwrap();
    assert_eq!(c20, GptOssConfig::gpt_oss_20b().with_eos(&[200002]));
    let c120 = GptOssConfig::from_dir(&fixture("configs/gpt-oss-120b")).unwrap();
    assert_eq!((c120.num_hidden_layers, c120.num_local_experts), (36, 128));
    assert_eq!(c120.layer_types[35], LayerType::Full);
    // tiny-top2 uses rope_scaling + rope_theta, tiny-top4 the transformers-5 rope_parameters.
    for name in ["model/tiny-top2", "model/tiny-top4"] {
        let c = GptOssConfig::from_dir(&fixture(name)).unwrap();
        assert!(
            matches!(c.rope_scaling, RopeScaling::Yarn { factor, truncate: false, .. } if factor == 32.0),
            "{name}"
        );
        assert_eq!(c.rope_theta, 150000.0);
    }
}

#[test]
fn config_errors_name_the_key() {
    let bad = r#"{"model_type": "gpt_oss", "hidden_size": 64}"#;
    let e = GptOssConfig::from_json_str(bad, Path::new("x/config.json")).unwrap_err().to_string();
    assert!(e.contains("x/config.json") && e.contains("num_attention_heads"), "{e}");
    let llama = r#"{"model_type": "llama"}"#;
    assert!(GptOssConfig::from_json_str(llama, Path::new("c.json")).unwrap_err().to_string().contains("gpt_oss"));
}

#[test]
fn missing_tensor_is_named() {
    let s = Scratch::new("missing");
    let shard = shard_of(&s.0, LAYER0_KEY);
    s.edit_shard(shard, |t| t.retain(|(n, _)| n != LAYER0_KEY));
    let e = s.load_err();
    assert!(e.contains(LAYER0_KEY) && e.contains("listed in model.safetensors.index.json"), "{e}");
}

#[test]
fn misshaped_tensor_is_named_with_expected_shape() {
    let s = Scratch::new("shape");
    let shard = shard_of(&s.0, LAYER0_KEY);
    s.edit_shard(shard, |t| {
        let (_, x) = t.iter_mut().find(|(n, _)| n == LAYER0_KEY).unwrap();
        x.shape = vec![64, 32];
    });
    let e = s.load_err();
    assert!(e.contains(LAYER0_KEY) && e.contains("[64, 32]") && e.contains("expected [32, 64]"), "{e}");
}

#[test]
fn mistyped_tensor_is_named() {
    let s = Scratch::new("dtype");
    let name = "model.layers.1.mlp.experts.down_proj_scales";
    let shard = shard_of(&s.0, name);
    s.edit_shard(shard, |t| {
        let (_, x) = t.iter_mut().find(|(n, _)| n == name).unwrap();
        x.dtype = safetensors::Dtype::I8;
    });
    let e = s.load_err();
    assert!(e.contains(name) && e.contains("I8") && e.contains("U8"), "{e}");
}

#[test]
fn extra_tensor_is_reported() {
    let s = Scratch::new("extra");
    s.edit_shard(SHARD1, |t| t.push(("model.layers.9.mystery".into(), OwnedTensor::f32(&[2], &[1.0, 2.0]))));
    let e = s.load_err();
    assert!(e.contains("model.layers.9.mystery") && e.contains("unexpected"), "{e}");
}

#[test]
fn missing_shard_is_named() {
    let s = Scratch::new("shard");
    std::fs::remove_file(s.0.join(SHARD1)).unwrap();
    let e = s.load_err();
    assert!(e.contains(SHARD1) && e.contains("missing"), "{e}");
}

#[test]
fn truncated_file_is_rejected() {
    let s = Scratch::new("trunc");
    let p = s.0.join(SHARD0);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let e = s.load_err();
    assert!(e.contains(SHARD0) && e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn non_finite_weight_is_named() {
    let s = Scratch::new("nan");
    let shard = shard_of(&s.0, LAYER0_KEY);
    s.edit_shard(shard, |t| {
        let (_, x) = t.iter_mut().find(|(n, _)| n == LAYER0_KEY).unwrap();
        // bf16 NaN at element 5.
        x.data[10] = 0xC0;
        x.data[11] = 0x7F;
    });
    let e = s.load_err();
    assert!(e.contains(LAYER0_KEY) && e.contains("element 5") && e.contains("NaN"), "{e}");
}

#[test]
fn token_ids_out_of_range_are_an_error() {
    let m = Model::load(&fixture("model/tiny-top2")).unwrap();
    let e = m.forward(&[1, 2, 300], 1, 3).unwrap_err().to_string();
    assert!(e.contains("300") && e.contains("index 2"), "{e}");
    assert!(m.generate_greedy(&[5000], 3, &[]).is_err());
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    // Each step's last-token logits must equal the full forward over the prefix, including past
    // the sliding window (4) where the cache drops old keys.
    let m = Model::load(&fixture("model/tiny-top4")).unwrap();
    let ids: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % 300).collect();
    let mut cache = oxtune_trainer::KvCache::default();
    let mut got = m.step(&ids[..3], &mut cache).unwrap();
    for t in 3..=ids.len() {
        let full = m.forward(&ids[..t], 1, t).unwrap();
        let want = &full[(t - 1) * 300..];
        let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-4, "prefix {t}: max diff {err}");
        if t < ids.len() {
            got = m.step(&ids[t..t + 1], &mut cache).unwrap();
        }
    }
    assert!(cache.len(0) <= 5, "sliding layer cache holds {} > window", cache.len(0));
    assert_eq!(cache.len(1), ids.len());
}

#[test]
fn qlora_nf4_attention_equals_its_dequantized_weights_and_is_small() {
    let full = Model::load(&fixture("model/tiny-top4")).unwrap();
    let mut q = Model::load(&fixture("model/tiny-top4")).unwrap();
    let before = q.w.attention_nbytes();
    q.w.quantize_attention_nf4().unwrap();
    let after = q.w.attention_nbytes();
    // Weights go from 4 bytes to 4.127 bits (NF4 with double-quantized absmax); biases stay f32.
    let weights: usize =
        q.w.layers.iter().map(|l| l.q.n_in * l.q.n_out + l.k.n_in * l.k.n_out * 2 + l.o.n_in * l.o.n_out).sum();
    let biases = (before - 4 * weights) as f64;
    let bits = (after as f64 - biases) * 8.0 / weights as f64;
    assert!((4.0..4.6).contains(&bits), "{bits} bits per NF4 weight");
    // The NF4 model computes exactly what the f32 model computes with the dequantized weights.
    let mut deq = Model::load(&fixture("model/tiny-top4")).unwrap();
    for (dl, ql) in deq.w.layers.iter_mut().zip(&q.w.layers) {
        for (d, qq) in [(&mut dl.q, &ql.q), (&mut dl.k, &ql.k), (&mut dl.v, &ql.v), (&mut dl.o, &ql.o)] {
            let DenseWeight::Nf4(w) = &qq.w else { panic!("not quantized") };
            let mut f = vec![0.0f32; qq.n_out * qq.n_in];
            w.dequantize_rows(0..qq.n_out, &mut f).unwrap();
            d.w = DenseWeight::F32(f);
        }
    }
    let ids: Vec<u32> = (0..12).map(|i| (i * 29 + 3) % 300).collect();
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (num / a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>()).sqrt()
    };
    let (a, b, c) =
        (full.forward(&ids, 1, 12).unwrap(), q.forward(&ids, 1, 12).unwrap(), deq.forward(&ids, 1, 12).unwrap());
    println!(
        "NF4 attention: {bits:.3} bits/weight; logits vs f32 {:.3e}, vs dequantized {:.3e}",
        rel(&a, &b),
        rel(&c, &b)
    );
    assert!(rel(&c, &b) < 1e-5, "NF4 path differs from its dequantized weights");
    assert!(rel(&a, &b) > 1e-3, "quantization changed nothing");
}
