//! The embedded default model: a tiny GPT-OSS (same architecture: sliding + full layers, sinks,
//! YaRN, top-2 MXFP4 experts) with the real o200k_harmony vocabulary, built from a fixed seed.
//! No download: the weights are generated the same way on every machine.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::{GptOssConfig, LayerType};
use crate::weights::{Bytes, ExpertStore, Experts, Layer, Linear, Router, Weights};

/// The seed of the embedded default model's weights.
pub const DEFAULT_SEED: u64 = 20250805;

/// The default tiny config: vocab 201088, hidden 128, 4 layers (sliding window 64, full),
/// 8 heads of 16 (2 KV heads), 8 experts top-2 of intermediate 128; YaRN and the rest as gpt-oss-20b.
pub fn tiny_default_config() -> GptOssConfig {
    GptOssConfig {
        vocab_size: 201088,
        hidden_size: 128,
        intermediate_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 16,
        num_local_experts: 8,
        num_experts_per_tok: 2,
        sliding_window: 64,
        layer_types: (0..4).map(|i| if i % 2 == 0 { LayerType::Sliding } else { LayerType::Full }).collect(),
        ..GptOssConfig::gpt_oss_20b()
    }
}

/// Random weights for `cfg` from `seed`: dense weights rounded through bf16 (as a checkpoint
/// stores them), experts quantized to MXFP4 with [`oxtune_mxfp4::quantize_f32`].
pub fn random_weights(cfg: &GptOssConfig, seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f32, mean: f32| -> Vec<f32> {
        let d = Normal::new(mean, std).expect("finite std");
        (0..n).map(|_| half::bf16::from_f32(d.sample(&mut rng)).to_f32()).collect()
    };
    let (h, i, e, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size);
    let (qw, kw) = (cfg.q_width(), cfg.kv_width());
    let embed = normal(v * h, 1.0, 0.0);
    // Rows of norm ~3.4: after the final RMSNorm a hidden state aligned with one row scores ~40,
    // enough for LoRA to make confident predictions over 201k tokens (at 1/sqrt(h) the largest
    // reachable logit gap, ~11, is below ln(201088)).
    let lm_head = normal(v * h, 0.3, 0.0);
    let norm = normal(h, 0.1, 1.0);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for &kind in &cfg.layer_types {
        let mut lin = |n_in: usize, n_out: usize| {
            Linear::new(normal(n_out * n_in, (n_in as f32).powf(-0.5), 0.0), normal(n_out, 0.1, 0.0), n_in, n_out)
        };
        let (q, k, vv, o) = (lin(h, qw), lin(h, kw), lin(h, kw), lin(qw, h));
        let router = Router { w: normal(e * h, (h as f32).powf(-0.5), 0.0), b: normal(e, 0.1, 0.0) };
        let mut mx = |rows: usize, cols: usize| {
            let w = normal(e * rows * cols, (cols as f32).powf(-0.5), 0.0);
            let t = oxtune_mxfp4::quantize_f32(&w, &[e, rows, cols]).expect("finite weights, cols % 32 == 0");
            let (b, s, shape) = t.into_parts();
            oxtune_mxfp4::Mxfp4Tensor::new(Bytes::Owned(b), Bytes::Owned(s), &shape).expect("shape from quantize")
        };
        let (gate_up, down) = (mx(2 * i, h), mx(h, i));
        layers.push(Layer {
            kind,
            input_norm: normal(h, 0.1, 1.0),
            q,
            k,
            v: vv,
            o,
            sinks: normal(cfg.num_attention_heads, 1.0, 0.0),
            post_norm: normal(h, 0.1, 1.0),
            router,
            experts: Experts {
                store: ExpertStore::Mxfp4 { gate_up, down },
                gate_up_bias: normal(e * 2 * i, 0.1, 0.0),
                down_bias: normal(e * h, 0.1, 0.0),
                num_experts: e,
                hidden: h,
                intermediate: i,
            },
        });
    }
    Weights { embed, layers, norm, lm_head }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Model;

    #[test]
    fn same_seed_same_model_and_it_runs() {
        let cfg = GptOssConfig { vocab_size: 512, ..tiny_default_config() };
        let (a, b) = (random_weights(&cfg, 5), random_weights(&cfg, 5));
        assert_eq!(a.embed, b.embed);
        assert_ne!(a.embed, random_weights(&cfg, 6).embed);
        let m = Model::new(cfg, a);
        let logits = m.forward(&[1, 2, 3, 4], 1, 4).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()) && logits.iter().any(|x| *x != 0.0));
    }
}
