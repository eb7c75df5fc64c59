//! Training forward and the backward pass of the whole model, written by hand in reverse.
//!
//! One rule throughout (llm.c's): parameter gradients accumulate (`+=`, inside the adapter),
//! activation gradients are assigned, and the residual stream's gradient is carried and added to.
//! Base weights are frozen; only the adapter (and optionally the attention sinks) learn.

use std::ops::Range;

use oxtune_moe::{gemm, moe_backward};

use crate::adapter::{AdaptedExperts, Adapter, Dense};
use crate::error::{Error, Result};
use crate::model::{row_coords, LayerActs, Model};
use crate::ops::attention::attention_backward;
use crate::ops::linear::linear;
use crate::ops::loss::{cross_entropy, IGNORE_INDEX};
use crate::ops::rmsnorm::{rmsnorm, rmsnorm_backward};

/// Tokens of one micro-batch: rows of (possibly packed) sequences. `targets[t]` is the token that
/// position `t` must predict, or −100 where no loss is taken.
#[derive(Clone, Debug, Default)]
pub struct TrainBatch {
    pub ids: Vec<u32>,
    pub pos: Vec<u32>,
    pub seg: Vec<u32>,
    pub rows: Vec<Range<usize>>,
    pub targets: Vec<i64>,
}

impl TrainBatch {
    /// Positions that carry a loss.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Array lengths agree, rows lie inside the batch, targets index the vocabulary.
    pub(crate) fn validate(&self, vocab: usize) -> Result<()> {
        let n = self.ids.len();
        if self.pos.len() != n || self.seg.len() != n || self.targets.len() != n {
            return Err(Error::Input(format!(
                "batch arrays disagree: {n} ids, {} positions, {} segments, {} targets",
                self.pos.len(),
                self.seg.len(),
                self.targets.len()
            )));
        }
        if self.rows.iter().any(|r| r.end > n || r.start > r.end) {
            return Err(Error::Input(format!("batch rows {:?} exceed its {n} tokens", self.rows)));
        }
        if let Some(t) = self.targets.iter().find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
            return Err(Error::Input(format!("target {t} is outside the vocabulary of {vocab} tokens")));
        }
        Ok(())
    }
}

/// Rows of the LM head computed at once: bounds the logits buffer to `HEAD_CHUNK · V` floats.
const HEAD_CHUNK: usize = 32;

/// Gradients of the attention sinks per layer `[L][nq]`, when they are trained.
pub type SinkGrads = Vec<Vec<f32>>;

impl Model {
    /// Cross-entropy of `hidden [N, H]` (after the final norm) against `targets`, computing the LM
    /// head only on positions that carry a loss, in chunks. With `dhidden`, also writes
    /// `∂(grad_scale · Σ loss)/∂hidden` there. Returns `(sum of losses, counted positions)`.
    pub fn head_loss(&self, hidden: &[f32], targets: &[i64], mut dhidden: Option<(&mut [f32], f32)>) -> (f64, usize) {
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let idx: Vec<usize> = (0..targets.len()).filter(|&t| targets[t] != IGNORE_INDEX).collect();
        let (mut sum, mut count) = (0.0f64, 0usize);
        if let Some((d, _)) = dhidden.as_mut() {
            d.fill(0.0);
        }
        for chunk in idx.chunks(HEAD_CHUNK) {
            let rows: Vec<f32> = chunk.iter().flat_map(|&t| hidden[t * h..(t + 1) * h].iter().copied()).collect();
            let tg: Vec<i64> = chunk.iter().map(|&t| targets[t]).collect();
            let logits = linear(&rows, &self.w.lm_head, None, h, v);
            match dhidden.as_mut() {
                None => {
                    let (s, n) = cross_entropy(&logits, &tg, v, None, 1.0);
                    sum += s;
                    count += n;
                }
                Some((d, scale)) => {
                    let mut dl = vec![0.0f32; logits.len()];
                    let (s, n) = cross_entropy(&logits, &tg, v, Some(&mut dl), *scale);
                    sum += s;
                    count += n;
                    let mut dr = vec![0.0f32; rows.len()];
                    gemm::matmul(&dl, &self.w.lm_head, &mut dr, chunk.len(), v, h, false, 0.0);
                    for (i, &t) in chunk.iter().enumerate() {
                        d[t * h..(t + 1) * h].copy_from_slice(&dr[i * h..(i + 1) * h]);
                    }
                }
            }
        }
        (sum, count)
    }

    /// Loss of a batch without gradients: `(sum of losses, counted positions)`.
    pub fn eval_loss(&self, b: &TrainBatch, adapter: &dyn Adapter) -> Result<(f64, usize)> {
        b.validate(self.cfg.vocab_size)?;
        let hidden = self.hidden(&b.ids, &b.pos, &b.seg, &b.rows, adapter)?;
        Ok(self.head_loss(&hidden, &b.targets, None))
    }

    /// Forward and backward over one micro-batch. The gradient is that of `grad_scale · Σ loss`
    /// (pass `1 / trainable tokens of the accumulation window` for transformers' mean). Adapter
    /// gradients accumulate inside the adapter; sink gradients into `sinks` when given.
    /// Returns `(sum of losses, counted positions)`.
    pub fn forward_backward(
        &self,
        b: &TrainBatch,
        adapter: &dyn Adapter,
        grad_scale: f32,
        sinks: Option<&mut SinkGrads>,
    ) -> Result<(f64, usize)> {
        b.validate(self.cfg.vocab_size)?;
        self.check_token_ids(&b.ids)?;
        let x0 = self.embed_tokens(&b.ids);
        let (loss, n, _) = self.backward_from(x0, b, adapter, grad_scale, sinks)?;
        Ok((loss, n))
    }

    /// The body of [`Model::forward_backward`] from embedded inputs; also returns `∂/∂x0`.
    pub(crate) fn backward_from(
        &self,
        x0: Vec<f32>,
        b: &TrainBatch,
        adapter: &dyn Adapter,
        grad_scale: f32,
        mut sinks: Option<&mut SinkGrads>,
    ) -> Result<(f64, usize, Vec<f32>)> {
        let cfg = &self.cfg;
        let (qw, kw) = (cfg.q_width(), cfg.kv_width());
        let eps = cfg.rms_norm_eps as f32;
        let mut x = x0;
        let mut acts: Vec<LayerActs> = Vec::with_capacity(self.w.layers.len());
        for l in 0..self.w.layers.len() {
            self.layer_saving(l, &mut x, b, adapter, &mut acts)?;
        }
        let (hf, rstd_f) = rmsnorm(&x, &self.w.norm, eps);
        let mut dh = vec![0.0f32; hf.len()];
        let (loss, n) = self.head_loss(&hf, &b.targets, Some((&mut dh, grad_scale)));
        let mut dx = rmsnorm_backward(&x, &self.w.norm, &rstd_f, &dh);
        for (l, act) in acts.iter().enumerate().rev() {
            let layer = &self.w.layers[l];
            // MoE block: x = x_mid + moe(norm2(x_mid)).
            let experts = AdaptedExperts { base: &layer.experts, adapter, layer: l };
            let (db, _) = moe_backward(&act.moe, &dx, &layer.router.w, &experts, self.swiglu());
            let dnorm2 = rmsnorm_backward(&act.x_mid, &layer.post_norm, &act.rstd2, &db);
            dx.iter_mut().zip(&dnorm2).for_each(|(a, g)| *a += g);
            // Attention block: x_mid = x_in + o_proj(attn(q, k, v)).
            let mut dout = layer.o.backward_input(&dx);
            adapter.dense_backward(l, Dense::O, &act.o, &dx, &mut dout);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0f32; act.q.len()], vec![0.0f32; act.k.len()], vec![0.0f32; act.v.len()]);
            let window = self.layer_window(l);
            for (ri, r) in b.rows.iter().enumerate() {
                let c = row_coords(&b.pos, &b.seg, r, window);
                let (qs, ks) = (r.start * qw..r.end * qw, r.start * kw..r.end * kw);
                let (gq, gk, gv, gs) = attention_backward(
                    &act.q[qs.clone()],
                    &act.k[ks.clone()],
                    &act.v[ks.clone()],
                    &layer.sinks,
                    &act.o[qs.clone()],
                    &act.lse[ri],
                    &dout[qs.clone()],
                    self.heads(),
                    c,
                    self.attention_scale(),
                );
                dq[qs].copy_from_slice(&gq);
                dk[ks.clone()].copy_from_slice(&gk);
                dv[ks].copy_from_slice(&gv);
                if let Some(s) = sinks.as_deref_mut() {
                    s[l].iter_mut().zip(&gs).for_each(|(a, g)| *a += g);
                }
            }
            self.rope.apply(&mut dq, &b.pos, true);
            self.rope.apply(&mut dk, &b.pos, true);
            let mut da = layer.q.backward_input(&dq);
            for (m, lin, g) in [(Dense::K, &layer.k, &dk), (Dense::V, &layer.v, &dv)] {
                let d = lin.backward_input(g);
                da.iter_mut().zip(&d).for_each(|(a, x)| *a += x);
                adapter.dense_backward(l, m, &act.a, g, &mut da);
            }
            adapter.dense_backward(l, Dense::Q, &act.a, &dq, &mut da);
            let dnorm1 = rmsnorm_backward(&act.x_in, &layer.input_norm, &act.rstd1, &da);
            dx.iter_mut().zip(&dnorm1).for_each(|(a, g)| *a += g);
        }
        Ok((loss, n, dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use std::path::Path;

    fn tiny() -> Model {
        Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/model/tiny-top4")).unwrap()
    }

    /// Two packed rows: [0..5) holds two sequences (3 + 2 tokens), [5..11) one sequence of 6
    /// tokens (longer than the window 5 of the sliding layers).
    fn batch() -> TrainBatch {
        let ids: Vec<u32> = (0..11).map(|i| (i * 53 + 7) % 300).collect();
        TrainBatch {
            pos: vec![0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5],
            seg: vec![0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
            rows: vec![0..5, 5..11],
            targets: vec![12, -100, 40, 3, -100, 77, 5, -100, 250, 8, 19],
            ids,
        }
    }

    #[test]
    fn loss_equals_forward_logits_cross_entropy() {
        let m = tiny();
        let b = batch();
        let (sum, n) = m.eval_loss(&b, &crate::adapter::NoAdapter).unwrap();
        let hidden = m.hidden(&b.ids, &b.pos, &b.seg, &b.rows, &crate::adapter::NoAdapter).unwrap();
        let (want, wn) = cross_entropy(&m.logits(&hidden), &b.targets, 300, None, 1.0);
        assert_eq!(n, wn);
        assert!((sum - want).abs() < 1e-4 * want, "{sum} vs {want}");
    }

    #[test]
    fn whole_model_backward_matches_finite_differences() {
        // ∂loss/∂(embedded input) through every layer: norms, attention with sinks, sliding
        // window and packed segments, RoPE, the MoE block with routing, and the LM head + loss.
        let m = tiny();
        let b = batch();
        let x0 = m.embed_tokens(&b.ids);
        let mut sinks = vec![vec![0.0f32; 6]; 3];
        let (_, n, dx) = m.backward_from(x0.clone(), &b, &crate::adapter::NoAdapter, 1.0, Some(&mut sinks)).unwrap();
        assert_eq!(n, 8);
        // The loss and every layer's expert selection at an input.
        let loss_at = |x: &[f32]| -> (f64, Vec<Vec<u32>>) {
            let mut xv = x.to_vec();
            let mut acts = vec![];
            for l in 0..m.w.layers.len() {
                m.layer_saving(l, &mut xv, &b, &crate::adapter::NoAdapter, &mut acts).unwrap();
            }
            let (hf, _) = rmsnorm(&xv, &m.w.norm, 1e-5);
            (m.head_loss(&hf, &b.targets, None).0, acts.into_iter().map(|a| a.moe.routing.experts).collect())
        };
        let routing = loss_at(&x0).1;
        // Central differences on random coordinates, skipping those where the step changes an
        // expert selection (the loss is not differentiable across a routing switch).
        let picks: Vec<usize> = randn(4, 80, 1.0).iter().map(|r| ((r.abs() * 1e6) as usize) % x0.len()).collect();
        let mut worst = (0.0f64, 0usize);
        let mut checked = 0;
        for &i in &picks {
            let (mut p, mut q) = (x0.clone(), x0.clone());
            p[i] += 1e-2;
            q[i] -= 1e-2;
            let ((lp, rp), (lq, rq)) = (loss_at(&p), loss_at(&q));
            if rp != routing || rq != routing {
                continue;
            }
            let fd = (lp - lq) / 2e-2;
            let err = (dx[i] as f64 - fd).abs() / (1e-2 + fd.abs());
            if err > worst.0 {
                worst = (err, i);
            }
            checked += 1;
        }
        assert!(checked >= 40, "only {checked} coordinates without a routing flip");
        assert!(worst.0 < 2e-2, "worst relative error {} at input {}", worst.0, worst.1);
        assert!(sinks.iter().flatten().any(|s| *s != 0.0));
    }
}
