//! LoRA on a dense linear layer with PEFT's semantics:
//! `y = x W^T + b + s * (dropout(x) A^T) B^T` with `A [r, in]`, `B [out, r]`, `s = alpha / r` (or
//! `alpha / sqrt(r)` with rsLoRA), dropout only on the LoRA branch's input.
//!
//! Backward, with `h = dropout(x) A^T [T, r]` saved from the forward and upstream `dy [T, out]`:
//! `dB += s dy^T h`, `dA += s (dy B)^T dropout(x)`, `dx += s ((dy B) A) * mask / (1 - p)`.

use half::bf16;
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::gemm::{sgemm, View};
use crate::{shape_err, Error, Result};

/// Hyperparameters of one LoRA adapter (PEFT `LoraConfig` fields).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank (per expert for expert weights).
    pub r: usize,
    pub alpha: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Dropout probability on the LoRA input (dense layers only); the trainer draws a [`DropoutMask`] with it
    /// for each forward pass in training.
    pub dropout: f64,
}

impl Default for LoraConfig {
    /// r = 8, alpha = 16, no dropout: the common gpt-oss recipe (OpenAI cookbook, Unsloth).
    fn default() -> Self {
        Self { r: 8, alpha: 16.0, use_rslora: false, dropout: 0.0 }
    }
}

impl LoraConfig {
    /// The factor `s` on the LoRA branch. PEFT computes it in Python floats; it meets the f32 activations as f32.
    pub fn scaling(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Config("LoRA rank r must be at least 1".into()));
        }
        if !self.alpha.is_finite() {
            return Err(Error::Config(format!("lora_alpha = {} must be finite", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!("lora_dropout = {} must be in [0, 1)", self.dropout)));
        }
        Ok(())
    }
}

/// PEFT's default initialisation of A (`kaiming_uniform_(a=sqrt(5))`): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub(crate) fn kaiming_uniform(rows: usize, fan_in: usize, rng: &mut impl Rng) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..rows * fan_in).map(|_| rng.gen_range(-bound..bound) as f32).collect()
}

/// Which inputs of a `[tokens, features]` batch survive dropout, with the survivors scaled by `1 / (1 - p)`.
#[derive(Clone, Debug, PartialEq)]
pub struct DropoutMask {
    p: f64,
    tokens: usize,
    features: usize,
    keep: Vec<u64>,
}

impl DropoutMask {
    /// Draws a mask; row `t` comes from its own ChaCha8 stream of `seed`, so the result does not depend on
    /// the number of threads.
    pub fn sample(p: f64, tokens: usize, features: usize, seed: u64) -> Result<Self> {
        Self::check_p(p)?;
        let words = features.div_ceil(64);
        let mut keep = vec![0u64; tokens * words];
        keep.par_chunks_mut(words.max(1)).enumerate().for_each(|(t, row)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(t as u64);
            for f in 0..features {
                if rng.gen::<f64>() >= p {
                    row[f / 64] |= 1 << (f % 64);
                }
            }
        });
        Ok(Self { p, tokens, features, keep })
    }

    /// A mask from explicit keep flags `[tokens, features]` (e.g. one recorded from torch).
    pub fn from_keep(p: f64, tokens: usize, features: usize, keep: &[bool]) -> Result<Self> {
        Self::check_p(p)?;
        if keep.len() != tokens * features {
            return Err(shape_err("dropout keep flags", format!("{tokens} x {features}"), keep.len()));
        }
        let words = features.div_ceil(64);
        let mut bits = vec![0u64; tokens * words];
        for (i, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
            let (t, f) = (i / features, i % features);
            bits[t * words + f / 64] |= 1 << (f % 64);
        }
        Ok(Self { p, tokens, features, keep: bits })
    }

    fn check_p(p: f64) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Config(format!("dropout probability {p} must be in [0, 1)")));
        }
        Ok(())
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    /// Whether input `feature` of `token` survives (false outside the mask).
    pub fn keeps(&self, token: usize, feature: usize) -> bool {
        if token >= self.tokens || feature >= self.features {
            return false;
        }
        let words = self.features.div_ceil(64);
        self.keep[token * words + feature / 64] >> (feature % 64) & 1 == 1
    }

    /// `out = x * keep / (1 - p)` with torch's f32 rounding of the scale.
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let scale = 1.0f32 / (1.0 - self.p) as f32;
        let f = self.features;
        out.par_chunks_mut(f.max(1)).zip(x.par_chunks(f.max(1))).enumerate().for_each(|(t, (o, xr))| {
            for (i, (o, &v)) in o.iter_mut().zip(xr).enumerate() {
                *o = if self.keeps(t, i) { v * scale } else { 0.0 };
            }
        });
    }

    fn check(&self, tokens: usize, features: usize) -> Result<()> {
        if (self.tokens, self.features) != (tokens, features) {
            return Err(shape_err(
                "dropout mask",
                format!("{tokens} x {features} (the LoRA input)"),
                format!("{} x {}", self.tokens, self.features),
            ));
        }
        Ok(())
    }
}

/// What the forward pass keeps for the backward pass: `h = dropout(x) A^T` `[tokens, r]`.
#[derive(Clone, Debug)]
pub struct LoraActivations {
    pub tokens: usize,
    pub h: Vec<f32>,
}

/// Gradients of A and B, accumulated with `+=`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGrads {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl LoraGrads {
    pub fn zero(&mut self) {
        self.a.iter_mut().for_each(|v| *v = 0.0);
        self.b.iter_mut().for_each(|v| *v = 0.0);
    }
}

/// A LoRA adapter on a dense layer `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLinear {
    in_features: usize,
    out_features: usize,
    rank: usize,
    scaling: f32,
    /// `[r, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, r]`, row-major.
    pub b: Vec<f32>,
}

/// Rows of `x` (`len / features`), or an error naming `what`.
pub(crate) fn rows_of(what: &str, len: usize, features: usize) -> Result<usize> {
    if features == 0 || !len.is_multiple_of(features) {
        return Err(shape_err(what, format!("[tokens, {features}]"), format!("{len} elements")));
    }
    Ok(len / features)
}

pub(crate) fn check_len(what: &str, got: usize, want: usize, shape: String) -> Result<()> {
    if got != want {
        return Err(shape_err(what, shape, format!("{got} elements")));
    }
    Ok(())
}

impl LoraLinear {
    /// A fresh adapter with PEFT's default initialisation: A kaiming-uniform, B zero (an exact no-op).
    pub fn new(in_features: usize, out_features: usize, config: &LoraConfig, rng: &mut impl Rng) -> Result<Self> {
        config.validate()?;
        let a = kaiming_uniform(config.r, in_features, rng);
        Self::from_weights(in_features, out_features, a, vec![0.0; out_features * config.r], config.scaling())
    }

    /// An adapter from existing weights `a [r, in]`, `b [out, r]` (r is inferred from `a`).
    pub fn from_weights(
        in_features: usize,
        out_features: usize,
        a: Vec<f32>,
        b: Vec<f32>,
        scaling: f32,
    ) -> Result<Self> {
        if in_features == 0 || out_features == 0 {
            return Err(Error::Config(format!(
                "a LoRA layer needs non-empty dimensions, got in {in_features}, out {out_features}"
            )));
        }
        let rank = rows_of("lora_A", a.len(), in_features)?;
        if rank == 0 {
            return Err(Error::Config("lora_A is empty; the rank must be at least 1".into()));
        }
        check_len("lora_B", b.len(), out_features * rank, format!("[{out_features}, {rank}]"))?;
        Ok(Self { in_features, out_features, rank, scaling, a, b })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// Zero gradients shaped like this adapter.
    pub fn zero_grads(&self) -> LoraGrads {
        LoraGrads { a: vec![0.0; self.a.len()], b: vec![0.0; self.b.len()] }
    }

    /// The public `a` and `b` may have been replaced since construction; every computation checks them first.
    fn check_params(&self) -> Result<()> {
        let (r, n_in, n_out) = (self.rank, self.in_features, self.out_features);
        check_len("lora_A", self.a.len(), r * n_in, format!("[{r}, {n_in}] (fixed at construction)"))?;
        check_len("lora_B", self.b.len(), n_out * r, format!("[{n_out}, {r}] (fixed at construction)"))
    }

    /// The activations `h = dropout(x) A^T` alone, for a backward pass whose forward kept nothing.
    pub fn activations(&self, x: &[f32], dropout: Option<&DropoutMask>) -> Result<LoraActivations> {
        self.check_params()?;
        let tokens = rows_of("LoRA input x", x.len(), self.in_features)?;
        Ok(LoraActivations { tokens, h: self.hidden(x, tokens, dropout)? })
    }

    /// `h = dropout(x) A^T [tokens, r]`.
    fn hidden(&self, x: &[f32], tokens: usize, dropout: Option<&DropoutMask>) -> Result<Vec<f32>> {
        let dropped;
        let xd = match dropout {
            Some(mask) => {
                mask.check(tokens, self.in_features)?;
                let mut buf = vec![0.0; x.len()];
                mask.apply(x, &mut buf);
                dropped = buf;
                &dropped[..]
            }
            None => x,
        };
        let mut h = vec![0.0; tokens * self.rank];
        sgemm(
            1.0,
            View::rm(xd, tokens, self.in_features),
            View::rm(&self.a, self.rank, self.in_features).t(),
            0.0,
            &mut h,
            0,
            self.rank,
            1,
        );
        Ok(h)
    }

    /// Adds `s * (dropout(x) A^T) B^T` into `y [tokens, out]` for `x [tokens, in]`.
    pub fn forward(&self, x: &[f32], y: &mut [f32], dropout: Option<&DropoutMask>) -> Result<LoraActivations> {
        self.check_params()?;
        let tokens = rows_of("LoRA input x", x.len(), self.in_features)?;
        check_len("LoRA output y", y.len(), tokens * self.out_features, format!("[{tokens}, {}]", self.out_features))?;
        let h = self.hidden(x, tokens, dropout)?;
        sgemm(
            self.scaling,
            View::rm(&h, tokens, self.rank),
            View::rm(&self.b, self.out_features, self.rank).t(),
            1.0,
            y,
            0,
            self.out_features,
            1,
        );
        Ok(LoraActivations { tokens, h })
    }

    /// Accumulates `dA`, `dB` into `grads` and, if given, the LoRA branch's contribution into `dx [tokens, in]`.
    /// `x` and `dropout` must be those of the forward pass that produced `act`.
    pub fn backward(
        &self,
        x: &[f32],
        act: &LoraActivations,
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dropout: Option<&DropoutMask>,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        self.check_params()?;
        let t = act.tokens;
        let (r, n_in, n_out) = (self.rank, self.in_features, self.out_features);
        check_len("LoRA input x", x.len(), t * n_in, format!("[{t}, {n_in}]"))?;
        check_len("saved activations h", act.h.len(), t * r, format!("[{t}, {r}]"))?;
        check_len("upstream gradient dy", dy.len(), t * n_out, format!("[{t}, {n_out}]"))?;
        check_len("grad of lora_A", grads.a.len(), self.a.len(), format!("[{r}, {n_in}]"))?;
        check_len("grad of lora_B", grads.b.len(), self.b.len(), format!("[{n_out}, {r}]"))?;
        if let Some(dx) = dx.as_deref() {
            check_len("input gradient dx", dx.len(), t * n_in, format!("[{t}, {n_in}]"))?;
        }
        if let Some(mask) = dropout {
            mask.check(t, n_in)?;
        }
        let s = self.scaling;
        // dB += s dy^T h
        sgemm(s, View::rm(dy, t, n_out).t(), View::rm(&act.h, t, r), 1.0, &mut grads.b, 0, r, 1);
        // g = dy B  [T, r]
        let mut g = vec![0.0; t * r];
        sgemm(1.0, View::rm(dy, t, n_out), View::rm(&self.b, n_out, r), 0.0, &mut g, 0, r, 1);
        let dropped;
        let xd = match dropout {
            Some(mask) => {
                let mut buf = vec![0.0; x.len()];
                mask.apply(x, &mut buf);
                dropped = buf;
                &dropped[..]
            }
            None => x,
        };
        // dA += s g^T dropout(x)
        sgemm(s, View::rm(&g, t, r).t(), View::rm(xd, t, n_in), 1.0, &mut grads.a, 0, n_in, 1);
        if let Some(dx) = dx {
            match dropout {
                None => sgemm(s, View::rm(&g, t, r), View::rm(&self.a, r, n_in), 1.0, dx, 0, n_in, 1),
                Some(mask) => {
                    let mut dxd = vec![0.0; t * n_in];
                    sgemm(s, View::rm(&g, t, r), View::rm(&self.a, r, n_in), 0.0, &mut dxd, 0, n_in, 1);
                    let mut masked = vec![0.0; t * n_in];
                    mask.apply(&dxd, &mut masked);
                    dx.par_iter_mut().zip(masked.par_iter()).for_each(|(d, m)| *d += m);
                }
            }
        }
        Ok(())
    }

    /// `ΔW = s B A`, `[out, in]`.
    pub fn delta_weight(&self) -> Result<Vec<f32>> {
        self.check_params()?;
        let mut d = vec![0.0; self.out_features * self.in_features];
        sgemm(
            self.scaling,
            View::rm(&self.b, self.out_features, self.rank),
            View::rm(&self.a, self.rank, self.in_features),
            0.0,
            &mut d,
            0,
            self.in_features,
            1,
        );
        Ok(d)
    }

    fn check_weight(&self, len: usize) -> Result<()> {
        check_len(
            "base weight",
            len,
            self.out_features * self.in_features,
            format!("[{}, {}]", self.out_features, self.in_features),
        )
    }

    /// `W += ΔW` for an f32 base weight `[out, in]`.
    pub fn merge_into(&self, w: &mut [f32]) -> Result<()> {
        self.check_weight(w.len())?;
        w.iter_mut().zip(self.delta_weight()?).for_each(|(w, d)| *w += d);
        Ok(())
    }

    /// `W -= ΔW` for an f32 base weight `[out, in]`.
    pub fn unmerge_from(&self, w: &mut [f32]) -> Result<()> {
        self.check_weight(w.len())?;
        w.iter_mut().zip(self.delta_weight()?).for_each(|(w, d)| *w -= d);
        Ok(())
    }

    /// `W += ΔW` for a bf16 base weight, as PEFT does on CPU: ΔW in f32, rounded to bf16, then added in bf16.
    pub fn merge_into_bf16(&self, w: &mut [bf16]) -> Result<()> {
        self.check_weight(w.len())?;
        w.iter_mut()
            .zip(self.delta_weight()?)
            .for_each(|(w, d)| *w = bf16::from_f32(w.to_f32() + bf16::from_f32(d).to_f32()));
        Ok(())
    }

    /// `W -= ΔW` for a bf16 base weight (the inverse of [`merge_into_bf16`](Self::merge_into_bf16), up to bf16 rounding).
    pub fn unmerge_from_bf16(&self, w: &mut [bf16]) -> Result<()> {
        self.check_weight(w.len())?;
        w.iter_mut()
            .zip(self.delta_weight()?)
            .for_each(|(w, d)| *w = bf16::from_f32(w.to_f32() - bf16::from_f32(d).to_f32()));
        Ok(())
    }
}
