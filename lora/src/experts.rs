//! LoRA on a 3-D expert weight with PEFT's `target_parameters` semantics (`lora.ParamWrapper`).
//!
//! For an expert weight of `E` experts, PEFT keeps one pair `A [r·E, in]`, `B [out, r·E]` where `in` is the
//! side the tokens come in on. For gpt-oss (`is_transposed = True`, weights stored `[E, in, out]` and applied
//! as `x @ W[e]`) that is `gate_up_proj [E, H, 2I]`: A `[r·E, H]`, B `[2I, r·E]`, and `down_proj [E, I, H]`:
//! A `[r·E, I]`, B `[H, r·E]`.
//!
//! Expert `e` uses `A_e` = rows `e·r .. e·r + r` of A (expert-major) but `B_e` = columns `k·E + e`,
//! `k = 0..r` of B (expert index fastest: PEFT reshapes B to `[out, r, E]`). Its output is
//! `y_e = x W[e] + s (x A_e^T) B_e^T`; the merged weight is `W[e] += s (B_e A_e)^T` in the `[in, out]`
//! layout (`s B_e A_e` in an `[out, in]` layout such as the MXFP4 checkpoint blocks). Both are computed here
//! with strided views of B, without gathering B_e or materialising `B_e A_e` in the forward and backward.
//! PEFT allows no dropout on these weights.

use rand::Rng;

use crate::dense::{check_len, kaiming_uniform, rows_of, LoraGrads};
use crate::gemm::{sgemm, View};
use crate::{Error, LoraConfig, Result};

/// How one expert's base weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// `[in, out]`, applied as `x @ W[e]`: transformers' gpt-oss `gate_up_proj` / `down_proj`.
    InOut,
    /// `[out, in]`, applied as `x @ W[e]^T`: the MXFP4 checkpoint layout, Mixtral-style experts.
    OutIn,
}

/// The LoRA pair of one expert weight (all experts).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraExperts {
    experts: usize,
    in_features: usize,
    out_features: usize,
    rank: usize,
    scaling: f32,
    /// `[r·E, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, r·E]`, row-major.
    pub b: Vec<f32>,
}

impl LoraExperts {
    /// A fresh adapter with PEFT's initialisation (A kaiming-uniform over `in`, B zero). `config.r` is the
    /// per-expert rank; `config.dropout` must be 0, as PEFT requires.
    pub fn new(
        experts: usize,
        in_features: usize,
        out_features: usize,
        config: &LoraConfig,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        config.validate()?;
        if config.dropout != 0.0 {
            return Err(Error::Config(format!(
                "lora_dropout = {} is not possible on expert weights (PEFT's ParamWrapper has no dropout); set it to 0",
                config.dropout
            )));
        }
        let a = kaiming_uniform(config.r * experts, in_features, rng);
        let b = vec![0.0; out_features * config.r * experts];
        Self::from_weights(experts, in_features, out_features, a, b, config.scaling())
    }

    /// An adapter from existing weights `a [r·E, in]`, `b [out, r·E]`.
    pub fn from_weights(
        experts: usize,
        in_features: usize,
        out_features: usize,
        a: Vec<f32>,
        b: Vec<f32>,
        scaling: f32,
    ) -> Result<Self> {
        if experts == 0 || in_features == 0 || out_features == 0 {
            return Err(Error::Config(format!(
                "an expert LoRA needs non-empty dimensions, got {experts} experts, in {in_features}, out {out_features}"
            )));
        }
        let total = rows_of("lora_A of the experts", a.len(), in_features)?;
        if total == 0 || total % experts != 0 {
            return Err(crate::shape_err(
                "lora_A of the experts",
                format!("[r * {experts}, {in_features}] with r >= 1"),
                format!("[{total}, {in_features}]"),
            ));
        }
        let rank = total / experts;
        check_len("lora_B of the experts", b.len(), out_features * total, format!("[{out_features}, {total}]"))?;
        Ok(Self { experts, in_features, out_features, rank, scaling, a, b })
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Per-expert rank r.
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    pub fn zero_grads(&self) -> LoraGrads {
        LoraGrads { a: vec![0.0; self.a.len()], b: vec![0.0; self.b.len()] }
    }

    /// Checks the expert index, and the public `a` and `b` against the shapes fixed at construction.
    fn check_expert(&self, e: usize) -> Result<()> {
        let (re, n_in, n_out) = (self.rank * self.experts, self.in_features, self.out_features);
        check_len("lora_A of the experts", self.a.len(), re * n_in, format!("[{re}, {n_in}] (fixed at construction)"))?;
        check_len(
            "lora_B of the experts",
            self.b.len(),
            n_out * re,
            format!("[{n_out}, {re}] (fixed at construction)"),
        )?;
        if e >= self.experts {
            return Err(Error::OutOfRange(format!("expert {e} of an expert LoRA with {} experts", self.experts)));
        }
        Ok(())
    }

    /// `A_e`: rows `e·r .. e·r + r` of A, `[r, in]`.
    fn a_e(&self, e: usize) -> View<'_> {
        View {
            data: &self.a,
            offset: e * self.rank * self.in_features,
            rows: self.rank,
            cols: self.in_features,
            rs: self.in_features,
            cs: 1,
        }
    }

    /// `B_e`: columns `k·E + e` of B, `[out, r]`.
    fn b_e(&self, e: usize) -> View<'_> {
        let re = self.rank * self.experts;
        View { data: &self.b, offset: e, rows: self.out_features, cols: self.rank, rs: re, cs: self.experts }
    }

    /// `h = x A_e^T [n, r]` alone, for a backward pass whose forward kept nothing.
    pub fn activations_expert(&self, e: usize, x: &[f32]) -> Result<Vec<f32>> {
        self.check_expert(e)?;
        let n = rows_of("expert LoRA input x", x.len(), self.in_features)?;
        let mut h = vec![0.0; n * self.rank];
        sgemm(1.0, View::rm(x, n, self.in_features), self.a_e(e).t(), 0.0, &mut h, 0, self.rank, 1);
        Ok(h)
    }

    /// Adds `s (x A_e^T) B_e^T` into `y [n, out]` for the `n` tokens `x [n, in]` routed to expert `e`, and
    /// returns `h = x A_e^T [n, r]` for the backward pass. `n = 0` is allowed.
    pub fn forward_expert(&self, e: usize, x: &[f32], y: &mut [f32]) -> Result<Vec<f32>> {
        self.check_expert(e)?;
        let n = rows_of("expert LoRA input x", x.len(), self.in_features)?;
        check_len("expert LoRA output y", y.len(), n * self.out_features, format!("[{n}, {}]", self.out_features))?;
        let mut h = vec![0.0; n * self.rank];
        sgemm(1.0, View::rm(x, n, self.in_features), self.a_e(e).t(), 0.0, &mut h, 0, self.rank, 1);
        sgemm(self.scaling, View::rm(&h, n, self.rank), self.b_e(e).t(), 1.0, y, 0, self.out_features, 1);
        Ok(h)
    }

    /// Accumulates expert `e`'s slices of `dA`, `dB` into `grads` and its contribution into `dx [n, in]`,
    /// given the forward's `x [n, in]`, `h [n, r]` and the upstream `dy [n, out]`.
    pub fn backward_expert(
        &self,
        e: usize,
        x: &[f32],
        h: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        self.check_expert(e)?;
        let (r, n_in, n_out) = (self.rank, self.in_features, self.out_features);
        let n = rows_of("expert LoRA input x", x.len(), n_in)?;
        check_len("saved activations h", h.len(), n * r, format!("[{n}, {r}]"))?;
        check_len("upstream gradient dy", dy.len(), n * n_out, format!("[{n}, {n_out}]"))?;
        check_len(
            "grad of the experts' lora_A",
            grads.a.len(),
            self.a.len(),
            format!("[{}, {n_in}]", r * self.experts),
        )?;
        check_len(
            "grad of the experts' lora_B",
            grads.b.len(),
            self.b.len(),
            format!("[{n_out}, {}]", r * self.experts),
        )?;
        if let Some(dx) = dx.as_deref() {
            check_len("input gradient dx", dx.len(), n * n_in, format!("[{n}, {n_in}]"))?;
        }
        let s = self.scaling;
        let re = r * self.experts;
        // dB_e += s dy^T h, written through B_e's strides.
        sgemm(s, View::rm(dy, n, n_out).t(), View::rm(h, n, r), 1.0, &mut grads.b, e, re, self.experts);
        let mut g = vec![0.0; n * r];
        sgemm(1.0, View::rm(dy, n, n_out), self.b_e(e), 0.0, &mut g, 0, r, 1);
        // dA_e += s g^T x
        sgemm(s, View::rm(&g, n, r).t(), View::rm(x, n, n_in), 1.0, &mut grads.a, e * r * n_in, n_in, 1);
        if let Some(dx) = dx {
            sgemm(s, View::rm(&g, n, r), self.a_e(e), 1.0, dx, 0, n_in, 1);
        }
        Ok(())
    }

    /// Expert `e`'s `ΔW` in `layout`: `s (B_e A_e)^T [in, out]` or `s B_e A_e [out, in]`.
    pub fn delta_weight(&self, e: usize, layout: ExpertLayout) -> Result<Vec<f32>> {
        self.check_expert(e)?;
        let mut d = vec![0.0; self.in_features * self.out_features];
        match layout {
            ExpertLayout::OutIn => sgemm(self.scaling, self.b_e(e), self.a_e(e), 0.0, &mut d, 0, self.in_features, 1),
            ExpertLayout::InOut => {
                sgemm(self.scaling, self.a_e(e).t(), self.b_e(e).t(), 0.0, &mut d, 0, self.out_features, 1)
            }
        }
        Ok(d)
    }

    /// `W[e] += ΔW[e]` for every expert of an f32 weight `[E, ..]` in `layout`.
    pub fn merge_into(&self, w: &mut [f32], layout: ExpertLayout) -> Result<()> {
        self.apply_delta(w, layout, 1.0)
    }

    /// `W[e] -= ΔW[e]` for every expert of an f32 weight `[E, ..]` in `layout`.
    pub fn unmerge_from(&self, w: &mut [f32], layout: ExpertLayout) -> Result<()> {
        self.apply_delta(w, layout, -1.0)
    }

    fn apply_delta(&self, w: &mut [f32], layout: ExpertLayout, sign: f32) -> Result<()> {
        let per = self.in_features * self.out_features;
        let shape = match layout {
            ExpertLayout::InOut => format!("[{}, {}, {}]", self.experts, self.in_features, self.out_features),
            ExpertLayout::OutIn => format!("[{}, {}, {}]", self.experts, self.out_features, self.in_features),
        };
        check_len("expert base weight", w.len(), self.experts * per, shape)?;
        for (e, we) in w.chunks_exact_mut(per).enumerate() {
            let d = self.delta_weight(e, layout)?;
            we.iter_mut().zip(d).for_each(|(w, d)| *w += sign * d);
        }
        Ok(())
    }
}
