//! Rotary position embedding, half-split (NeoX) layout, with YaRN frequencies and scaling as
//! transformers' `_compute_yarn_parameters` computes them.

use oxtune_kernels::ops::rope::rope_apply;

use crate::config::{GptOssConfig, RopeScaling};

#[derive(Clone, Debug)]
pub struct Rope {
    /// `[head_dim / 2]`
    pub inv_freq: Vec<f32>,
    /// Multiplied into cos and sin (YaRN mscale; 1 for plain RoPE).
    pub attention_scaling: f32,
    pub head_dim: usize,
}

impl Rope {
    pub fn new(cfg: &GptOssConfig) -> Self {
        let d = cfg.head_dim;
        let base = cfg.rope_theta;
        let half = d / 2;
        // torch computes pos_freqs in f32: base ** (arange(0, d, 2) / d).
        let pos_freq: Vec<f32> = (0..half).map(|i| (base.powf((2 * i) as f64 / d as f64)) as f32).collect();
        match &cfg.rope_scaling {
            RopeScaling::Default => {
                Self { inv_freq: pos_freq.iter().map(|p| 1.0 / p).collect(), attention_scaling: 1.0, head_dim: d }
            }
            RopeScaling::Yarn {
                factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings: l0,
                truncate,
                attention_factor,
            } => {
                let mscale = |s: f64| if s <= 1.0 { 1.0 } else { 0.1 * s.ln() + 1.0 };
                let attention_scaling = attention_factor.unwrap_or_else(|| mscale(*factor));
                let corr = |rot: f64| (d as f64 * (l0 / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv_freq = (0..half)
                    .map(|i| {
                        let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrap_w = 1.0 - ramp;
                        let extrap = 1.0 / pos_freq[i];
                        let interp = 1.0 / (*factor as f32 * pos_freq[i]);
                        interp * (1.0 - extrap_w) + extrap * extrap_w
                    })
                    .collect();
                Self { inv_freq, attention_scaling: attention_scaling as f32, head_dim: d }
            }
        }
    }

    /// `(cos, sin)` for one position, `[head_dim / 2]` each, scaling included.
    pub fn cos_sin(&self, pos: u32) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|f| {
                let a = pos as f32 * f;
                (a.cos() * self.attention_scaling, a.sin() * self.attention_scaling)
            })
            .unzip()
    }

    /// Rotates every head of `x [n, heads * head_dim]` in place; `positions [n]`.
    /// With `inverse`, applies the transposed rotation (the backward pass).
    /// The math is `oxtune_kernels::ops::rope::rope_apply`, next to its CUDA kernel.
    pub fn apply(&self, x: &mut [f32], positions: &[u32], inverse: bool) {
        rope_apply(x, positions, &self.inv_freq, self.attention_scaling, self.head_dim, inverse);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fd_check_f64, randn};

    #[test]
    fn gpt_oss_20b_yarn_values_match_the_spec() {
        // Sample values from the spec (computed from transformers' formula): i=0 → 1.0,
        // i=9 → 0.0317057, i=17 → 1.29319e-4, i=31 → 3.02351e-7; mscale 1.3465735902799727.
        let r = Rope::new(&GptOssConfig::gpt_oss_20b());
        let want = [(0, 1.0f32), (9, 0.0317057), (17, 1.29319e-4), (31, 3.02351e-7)];
        for (i, w) in want {
            assert!((r.inv_freq[i] - w).abs() <= 1e-5 * w, "inv_freq[{i}] = {} vs {w}", r.inv_freq[i]);
        }
        assert!((r.attention_scaling - 1.346_573_6).abs() < 1e-6);
    }

    #[test]
    fn inverse_undoes_forward_and_is_the_gradient() {
        let cfg = GptOssConfig::tiny();
        let r = Rope::new(&cfg);
        let pos = [0u32, 3, 17];
        let x = randn(1, 3 * 2 * cfg.head_dim, 1.0);
        let dy = randn(2, x.len(), 1.0);
        let mut dx = dy.clone();
        r.apply(&mut dx, &pos, true);
        // f64 reference of the rotation with the same (f32) cos and sin.
        let d = cfg.head_dim;
        let f = |xv: &[f64]| -> f64 {
            let mut acc = 0.0;
            let width = xv.len() / pos.len();
            for (t, row) in xv.chunks(width).enumerate() {
                let (c, s) = r.cos_sin(pos[t]);
                for (hh, head) in row.chunks(d).enumerate() {
                    for i in 0..d / 2 {
                        let (a, b) = (head[i], head[i + d / 2]);
                        let base = t * width + hh * d;
                        acc += dy[base + i] as f64 * (a * c[i] as f64 - b * s[i] as f64);
                        acc += dy[base + i + d / 2] as f64 * (b * c[i] as f64 + a * s[i] as f64);
                    }
                }
            }
            acc
        };
        fd_check_f64(&x, &dx, f, 1e-5);
        // The rotation times mscale² is what the inverse composes to.
        let mut y = x.clone();
        r.apply(&mut y, &pos, false);
        r.apply(&mut y, &pos, true);
        let s2 = r.attention_scaling * r.attention_scaling;
        assert!(y.iter().zip(&x).all(|(a, b)| (a - b * s2).abs() < 1e-5));
    }
}
