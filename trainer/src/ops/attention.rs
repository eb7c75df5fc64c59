//! Attention with per-head sinks, causal masking, an optional sliding window and packed-sequence
//! segments, for one row of tokens:
//!
//! `s_ij = (q_i · k_j) · scale` for visible keys; `M_i = max(max_j s_ij, S_h)`;
//! `Z_i = Σ_j exp(s_ij − M_i) + exp(S_h − M_i)`; `o_i = Σ_j exp(s_ij − M_i) / Z_i · v_j`;
//! `lse_i = M_i + ln Z_i` is kept for the backward pass. Key `j` is visible to query `i` when both
//! are in the same segment, `pos_j <= pos_i`, and, with a window `W`, `pos_i − pos_j < W`.

use rayon::prelude::*;

/// Head layout: `nq` query heads share `nkv` key/value heads of width `d` (query head `h` uses
/// KV head `h / (nq / nkv)`).
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub nq: usize,
    pub nkv: usize,
    pub d: usize,
}

/// Token coordinates: positions and segment ids of the queries and the keys.
#[derive(Clone, Copy, Debug)]
pub struct Coords<'a> {
    pub q_pos: &'a [u32],
    pub k_pos: &'a [u32],
    pub q_seg: &'a [u32],
    pub k_seg: &'a [u32],
    pub window: Option<usize>,
}

impl Coords<'_> {
    #[inline]
    fn visible(&self, i: usize, j: usize) -> bool {
        let (qp, kp) = (self.q_pos[i], self.k_pos[j]);
        self.q_seg[i] == self.k_seg[j] && kp <= qp && self.window.is_none_or(|w| ((qp - kp) as usize) < w)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `q [Tq, nq·d]`, `k`, `v [Tk, nkv·d]`, `sinks [nq]` → `(o [Tq, nq·d], lse [nq, Tq])`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: &[f32],
    heads: Heads,
    c: Coords,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Heads { nq, nkv, d } = heads;
    let (tq, tk) = (c.q_pos.len(), c.k_pos.len());
    let group = nq / nkv;
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..nq)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let mut o = vec![0.0f32; tq * d];
            let mut lse = vec![0.0f32; tq];
            let mut s = vec![0.0f32; tk];
            for i in 0..tq {
                let qi = &q[i * nq * d + h * d..][..d];
                let mut m = sinks[h];
                for j in 0..tk {
                    if c.visible(i, j) {
                        s[j] = dot(qi, &k[j * nkv * d + g * d..][..d]) * scale;
                        m = m.max(s[j]);
                    }
                }
                let mut z = (sinks[h] - m).exp();
                let oi = &mut o[i * d..(i + 1) * d];
                for j in 0..tk {
                    if c.visible(i, j) {
                        let p = (s[j] - m).exp();
                        z += p;
                        for (a, b) in oi.iter_mut().zip(&v[j * nkv * d + g * d..][..d]) {
                            *a += p * b;
                        }
                    }
                }
                oi.iter_mut().for_each(|a| *a /= z);
                lse[i] = m + z.ln();
            }
            (o, lse)
        })
        .collect();
    let mut o = vec![0.0f32; tq * nq * d];
    let mut lse = Vec::with_capacity(nq * tq);
    for (h, (oh, lh)) in per_head.into_iter().enumerate() {
        for i in 0..tq {
            o[i * nq * d + h * d..][..d].copy_from_slice(&oh[i * d..(i + 1) * d]);
        }
        lse.extend(lh);
    }
    (o, lse)
}

/// Gradients of [`attention`]: `(dq, dk, dv, dsinks)` given `dout [Tq, nq·d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    heads: Heads,
    c: Coords,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let Heads { nq, nkv, d } = heads;
    let (tq, tk) = (c.q_pos.len(), c.k_pos.len());
    let group = nq / nkv;
    type HeadGrads = (Vec<f32>, Vec<f32>, Vec<f32>, f32);
    let per_head: Vec<HeadGrads> = (0..nq)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; tq * d], vec![0.0f32; tk * d], vec![0.0f32; tk * d]);
            let mut dsink = 0.0f32;
            for i in 0..tq {
                let qi = &q[i * nq * d + h * d..][..d];
                let doi = &dout[i * nq * d + h * d..][..d];
                let di = dot(doi, &o[i * nq * d + h * d..][..d]);
                let l = lse[h * tq + i];
                dsink -= (sinks[h] - l).exp() * di;
                for j in 0..tk {
                    if !c.visible(i, j) {
                        continue;
                    }
                    let kj = &k[j * nkv * d + g * d..][..d];
                    let vj = &v[j * nkv * d + g * d..][..d];
                    let p = (dot(qi, kj) * scale - l).exp();
                    let ds = p * (dot(doi, vj) - di) * scale;
                    for t in 0..d {
                        dq[i * d + t] += ds * kj[t];
                        dk[j * d + t] += ds * qi[t];
                        dv[j * d + t] += p * doi[t];
                    }
                }
            }
            (dq, dk, dv, dsink)
        })
        .collect();
    let mut dq = vec![0.0f32; tq * nq * d];
    let mut dk = vec![0.0f32; tk * nkv * d];
    let mut dv = vec![0.0f32; tk * nkv * d];
    let mut dsinks = vec![0.0f32; nq];
    for (h, (dqh, dkh, dvh, ds)) in per_head.into_iter().enumerate() {
        let g = h / group;
        for i in 0..tq {
            dq[i * nq * d + h * d..][..d].copy_from_slice(&dqh[i * d..(i + 1) * d]);
        }
        for j in 0..tk {
            for t in 0..d {
                dk[j * nkv * d + g * d + t] += dkh[j * d + t];
                dv[j * nkv * d + g * d + t] += dvh[j * d + t];
            }
        }
        dsinks[h] = ds;
    }
    (dq, dk, dv, dsinks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fd_check_f64, randn};

    const H: Heads = Heads { nq: 4, nkv: 2, d: 8 };

    /// Straight from the definition with an explicit mask matrix, in f64.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sinks: &[f32],
        mask: &dyn Fn(usize, usize) -> bool,
        t: usize,
    ) -> Vec<f64> {
        let w = |x: &[f32]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
        naive64(&w(q), &w(k), &w(v), &w(sinks), mask, t)
    }

    fn naive64(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        sinks: &[f64],
        mask: &dyn Fn(usize, usize) -> bool,
        t: usize,
    ) -> Vec<f64> {
        let Heads { nq, nkv, d } = H;
        let mut out = vec![0.0f64; t * nq * d];
        for h in 0..nq {
            let g = h / (nq / nkv);
            for i in 0..t {
                let s: Vec<Option<f64>> = (0..t)
                    .map(|j| {
                        mask(i, j).then(|| {
                            (0..d).map(|x| q[i * nq * d + h * d + x] * k[j * nkv * d + g * d + x]).sum::<f64>() * 0.25
                        })
                    })
                    .collect();
                let z: f64 = s.iter().flatten().map(|x| x.exp()).sum::<f64>() + sinks[h].exp();
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        for x in 0..d {
                            out[i * nq * d + h * d + x] += sj.exp() / z * v[j * nkv * d + g * d + x];
                        }
                    }
                }
            }
        }
        out
    }

    fn inputs(t: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        (randn(seed, t * 32, 1.5), randn(seed + 1, t * 16, 1.5), randn(seed + 2, t * 16, 1.0), randn(seed + 3, 4, 1.0))
    }

    fn check(t: usize, window: Option<usize>, seg: &[u32], pos: &[u32]) {
        let (q, k, v, s) = inputs(t, 10 + t as u64);
        let c = Coords { q_pos: pos, k_pos: pos, q_seg: seg, k_seg: seg, window };
        let (o, _) = attention(&q, &k, &v, &s, H, c, 0.25);
        let want = naive(
            &q,
            &k,
            &v,
            &s,
            &|i, j| seg[i] == seg[j] && pos[j] <= pos[i] && window.is_none_or(|w| ((pos[i] - pos[j]) as usize) < w),
            t,
        );
        for (a, b) in o.iter().zip(&want) {
            assert!((*a as f64 - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn window_shorter_than_sequence() {
        let pos: Vec<u32> = (0..9).collect();
        check(9, Some(3), &[0; 9], &pos);
    }

    #[test]
    fn window_longer_than_sequence_equals_full() {
        let pos: Vec<u32> = (0..5).collect();
        check(5, Some(64), &[0; 5], &pos);
        check(5, None, &[0; 5], &pos);
    }

    #[test]
    fn single_token() {
        check(1, Some(4), &[0], &[0]);
    }

    #[test]
    fn packed_segments_do_not_see_each_other() {
        check(7, Some(2), &[0, 0, 0, 1, 1, 1, 1], &[0, 1, 2, 0, 1, 2, 3]);
        check(7, None, &[0, 0, 0, 1, 1, 1, 1], &[0, 1, 2, 0, 1, 2, 3]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let t = 6;
        let pos: Vec<u32> = (0..t as u32).collect();
        let seg = vec![0u32; t];
        let c = Coords { q_pos: &pos, k_pos: &pos, q_seg: &seg, k_seg: &seg, window: Some(3) };
        let (q, k, v, s) = inputs(t, 77);
        let dout = randn(90, q.len(), 1.0);
        let (o, lse) = attention(&q, &k, &v, &s, H, c, 0.25);
        let (dq, dk, dv, ds) = attention_backward(&q, &k, &v, &s, &o, &lse, &dout, H, c, 0.25);
        // f64 reference: the definition with the window-3 causal mask, Σ dout · o.
        let mask = |i: usize, j: usize| j <= i && i - j < 3;
        let loss = |q: &[f64], k: &[f64], v: &[f64], s: &[f64]| -> f64 {
            naive64(q, k, v, s, &mask, t).iter().zip(&dout).map(|(a, b)| a * *b as f64).sum()
        };
        let w = |x: &[f32]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
        let (q6, k6, v6, s6) = (w(&q), w(&k), w(&v), w(&s));
        fd_check_f64(&q, &dq, |x| loss(x, &k6, &v6, &s6), 1e-4);
        fd_check_f64(&k, &dk, |x| loss(&q6, x, &v6, &s6), 1e-4);
        fd_check_f64(&v, &dv, |x| loss(&q6, &k6, x, &s6), 1e-4);
        fd_check_f64(&s, &ds, |x| loss(&q6, &k6, &v6, x), 1e-4);
    }
}
