//! Checkpoints with random weights in gpt-oss's real layout (bf16 dense tensors, MXFP4 expert
//! blocks and scales, sharded with an index), for any config: benchmarks and GPU runs at the real
//! shapes without downloading anything. Generated in parallel and written shard by shard (one
//! layer per shard), so memory stays at about one layer's tensors.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::config::GptOssConfig;
use crate::error::{io_err, Result};
use crate::io::{save_safetensors, write_atomic, OwnedTensor};

/// Values per independently seeded chunk (so generation is parallel and still deterministic).
const CHUNK: usize = 1 << 16;

/// `n` bf16 values `~ N(mean, std)` as little-endian bytes; `stream` separates tensors.
fn bf16_normal(n: usize, std: f32, mean: f32, seed: u64, stream: u64) -> Vec<u8> {
    let mut out = vec![0u8; 2 * n];
    out.par_chunks_mut(2 * CHUNK).enumerate().for_each(|(c, bytes)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.set_stream(c as u64);
        let d = Normal::new(mean, std).expect("finite std");
        for b in bytes.chunks_exact_mut(2) {
            b.copy_from_slice(&half::bf16::from_f32(d.sample(&mut rng)).to_le_bytes());
        }
    });
    out
}

/// Random MXFP4 blocks `[E, rows, cols/32, 16]` and scales `[E, rows, cols/32]` whose values have
/// a standard deviation near `1/sqrt(cols)` (uniform codes have RMS ≈ 3.1, times the block scale).
fn mxfp4_random(e: usize, rows: usize, cols: usize, seed: u64, stream: u64) -> (OwnedTensor, OwnedTensor) {
    let g = cols / 32;
    let mut blocks = vec![0u8; e * rows * g * 16];
    blocks.par_chunks_mut(CHUNK).enumerate().for_each(|(c, b)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.set_stream(c as u64);
        rng.fill(b);
    });
    let target = 1.0 / (cols as f64).sqrt() / 3.1;
    let exp = target.log2().round() as i32 + 127;
    let scales = vec![exp.clamp(1, 254) as u8; e * rows * g];
    (
        OwnedTensor { dtype: Dtype::U8, shape: vec![e, rows, g, 16], data: blocks },
        OwnedTensor { dtype: Dtype::U8, shape: vec![e, rows, g], data: scales },
    )
}

/// Writes `config.json`, one safetensors shard per layer plus one for the embeddings and the head,
/// and `model.safetensors.index.json` into `dir`. `progress(done, total)` is called after each shard.
pub fn write_random_checkpoint(
    cfg: &GptOssConfig,
    dir: &Path,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    cfg.validate().map_err(|e| crate::error::Error::Input(format!("config: {e}")))?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (h, i, e, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size);
    let (qw, kw, nq) = (cfg.q_width(), cfg.kv_width(), cfg.num_attention_heads);
    let layers = cfg.num_hidden_layers;
    let total = layers + 1;
    let shard = |k: usize| format!("model-{:05}-of-{:05}.safetensors", k + 1, total);
    let mut map = serde_json::Map::new();
    let mut stream = 0u64;
    let mut next = || {
        stream += 1;
        stream
    };
    let bf = |shape: &[usize], data: Vec<u8>| OwnedTensor { dtype: Dtype::BF16, shape: shape.to_vec(), data };
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let mut t: Vec<(String, OwnedTensor)> = vec![];
        let mut put_bf = |name: &str, shape: &[usize], std: f32, mean: f32, s: u64| {
            let n = shape.iter().product();
            t.push((format!("{p}.{name}"), bf(shape, bf16_normal(n, std, mean, seed, s))));
        };
        put_bf("input_layernorm.weight", &[h], 0.1, 1.0, next());
        put_bf("post_attention_layernorm.weight", &[h], 0.1, 1.0, next());
        for (name, n_in, n_out) in [("q_proj", h, qw), ("k_proj", h, kw), ("v_proj", h, kw), ("o_proj", qw, h)] {
            put_bf(&format!("self_attn.{name}.weight"), &[n_out, n_in], (n_in as f32).powf(-0.5), 0.0, next());
            put_bf(&format!("self_attn.{name}.bias"), &[n_out], 0.02, 0.0, next());
        }
        put_bf("self_attn.sinks", &[nq], 1.0, 0.0, next());
        put_bf("mlp.router.weight", &[e, h], (h as f32).powf(-0.5), 0.0, next());
        put_bf("mlp.router.bias", &[e], 0.1, 0.0, next());
        put_bf("mlp.experts.gate_up_proj_bias", &[e, 2 * i], 0.02, 0.0, next());
        put_bf("mlp.experts.down_proj_bias", &[e, h], 0.02, 0.0, next());
        for (name, rows, cols) in [("gate_up_proj", 2 * i, h), ("down_proj", h, i)] {
            let (b, s) = mxfp4_random(e, rows, cols, seed, next());
            t.push((format!("{p}.mlp.experts.{name}_blocks"), b));
            t.push((format!("{p}.mlp.experts.{name}_scales"), s));
        }
        for (name, _) in &t {
            map.insert(name.clone(), shard(l).into());
        }
        save_safetensors(&dir.join(shard(l)), &t)?;
        progress(l + 1, total);
    }
    let t = vec![
        ("model.embed_tokens.weight".to_string(), bf(&[v, h], bf16_normal(v * h, 1.0, 0.0, seed, next()))),
        ("lm_head.weight".to_string(), bf(&[v, h], bf16_normal(v * h, (h as f32).powf(-0.5), 0.0, seed, next()))),
        ("model.norm.weight".to_string(), bf(&[h], bf16_normal(h, 0.1, 1.0, seed, next()))),
    ];
    for (name, _) in &t {
        map.insert(name.clone(), shard(layers).into());
    }
    save_safetensors(&dir.join(shard(layers)), &t)?;
    let index =
        serde_json::json!({ "metadata": { "generator": "oxtune random checkpoint", "seed": seed }, "weight_map": map });
    write_atomic(
        &dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).expect("json").as_bytes(),
    )?;
    write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&cfg.to_json()).expect("json").as_bytes())?;
    progress(total, total);
    Ok(())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.par_chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

/// The model [`write_random_checkpoint`] writes for `cfg` and `seed`, built in memory (no files):
/// the same tensors, for benchmarks.
pub fn random_model(cfg: &GptOssConfig, seed: u64) -> Result<crate::Model> {
    use crate::weights::{Bytes, ExpertStore, Experts, Layer, Linear, Router, Weights};
    cfg.validate().map_err(|e| crate::error::Error::Input(format!("config: {e}")))?;
    let (h, i, e, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size);
    let (qw, kw, nq) = (cfg.q_width(), cfg.kv_width(), cfg.num_attention_heads);
    let mut stream = 0u64;
    let mut next = || {
        stream += 1;
        stream
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for &kind in &cfg.layer_types {
        // The same draw order as `write_random_checkpoint`.
        let mut normal = |n: usize, std: f32, mean: f32| f32s(&bf16_normal(n, std, mean, seed, next()));
        let input_norm = normal(h, 0.1, 1.0);
        let post_norm = normal(h, 0.1, 1.0);
        let mut lins = vec![];
        for (n_in, n_out) in [(h, qw), (h, kw), (h, kw), (qw, h)] {
            let w = normal(n_out * n_in, (n_in as f32).powf(-0.5), 0.0);
            lins.push(Linear::new(w, normal(n_out, 0.02, 0.0), n_in, n_out));
        }
        let sinks = normal(nq, 1.0, 0.0);
        let router = Router { w: normal(e * h, (h as f32).powf(-0.5), 0.0), b: normal(e, 0.1, 0.0) };
        let gate_up_bias = normal(e * 2 * i, 0.02, 0.0);
        let down_bias = normal(e * h, 0.02, 0.0);
        let mut mx = |rows: usize, cols: usize| -> Result<oxtune_mxfp4::Mxfp4Tensor<Bytes>> {
            let (b, s) = mxfp4_random(e, rows, cols, seed, next());
            Ok(oxtune_mxfp4::Mxfp4Tensor::from_checkpoint(
                Bytes::Owned(b.data),
                &b.shape,
                Bytes::Owned(s.data),
                &s.shape,
            )?)
        };
        let (gate_up, down) = (mx(2 * i, h)?, mx(h, i)?);
        let mut it = lins.into_iter();
        let mut lin = || it.next().expect("four projections");
        layers.push(Layer {
            kind,
            input_norm,
            q: lin(),
            k: lin(),
            v: lin(),
            o: lin(),
            sinks,
            post_norm,
            router,
            experts: Experts {
                store: ExpertStore::Mxfp4 { gate_up, down },
                gate_up_bias,
                down_bias,
                num_experts: e,
                hidden: h,
                intermediate: i,
            },
        });
    }
    let embed = f32s(&bf16_normal(v * h, 1.0, 0.0, seed, next()));
    let lm_head = f32s(&bf16_normal(v * h, (h as f32).powf(-0.5), 0.0, seed, next()));
    let norm = f32s(&bf16_normal(h, 0.1, 1.0, seed, next()));
    Ok(crate::Model::new(cfg.clone(), Weights { embed, layers, norm, lm_head }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::ExpertStore;

    #[test]
    fn a_random_checkpoint_loads_and_runs() {
        let dir = std::env::temp_dir().join(format!("oxtune-random-ckpt-{}", std::process::id()));
        let cfg = GptOssConfig::tiny();
        let mut calls = 0;
        write_random_checkpoint(&cfg, &dir, 7, &mut |_, _| calls += 1).unwrap();
        assert_eq!(calls, cfg.num_hidden_layers + 1, "one call per shard");
        let m = crate::Model::load(&dir).unwrap();
        assert!(matches!(m.w.layers[0].experts.store, crate::weights::ExpertStore::Mxfp4 { .. }));
        // Expert weights have the intended spread, and the model's logits are finite and not flat.
        let ExpertStore::Mxfp4 { gate_up, .. } = &m.w.layers[1].experts.store else { unreachable!() };
        let w = gate_up.dequantize_f32();
        let rms = (w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt();
        let want = 1.0 / (cfg.hidden_size as f64).sqrt();
        assert!(rms > want / 2.0 && rms < want * 2.0, "expert RMS {rms} vs {want}");
        let logits = m.forward(&[1, 2, 3, 4, 5], 1, 5).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
        let spread = logits.iter().cloned().fold(f32::MIN, f32::max) - logits.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1.0, "logits spread {spread}");
        // Same seed, same bytes.
        let dir2 = dir.with_extension("again");
        write_random_checkpoint(&cfg, &dir2, 7, &mut |_, _| {}).unwrap();
        let f = "model-00001-of-00003.safetensors";
        assert_eq!(std::fs::read(dir.join(f)).unwrap(), std::fs::read(dir2.join(f)).unwrap());
        // The in-memory model is the written one.
        let mem = random_model(&cfg, 7).unwrap();
        assert_eq!(mem.forward(&[1, 2, 3, 4, 5], 1, 5).unwrap(), logits);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }
}
