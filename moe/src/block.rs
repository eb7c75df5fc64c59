//! The MoE block: route, run each expert on its tokens, combine with the routing weights.

use rayon::prelude::*;

use crate::permute::{combine_backward, gather_rows};
use crate::router::{route, route_backward, router_logits};
use crate::{gemm, swiglu, swiglu_backward, Error, Result, Routing, RoutingPlan, SwigluParams};

/// Which expert projection: `GateUp` maps `[n, H] → [n, 2I]` (interleaved gate/up), `Down` maps
/// `[n, I] → [n, H]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    GateUp,
    Down,
}

/// Expert weights in any format (MXFP4, bf16, f32, with or without LoRA).
pub trait ExpertWeights: Sync {
    fn num_experts(&self) -> usize;
    fn hidden(&self) -> usize;
    fn intermediate(&self) -> usize;

    /// `(in, out)` widths of a projection.
    fn dims(&self, proj: Proj) -> (usize, usize) {
        match proj {
            Proj::GateUp => (self.hidden(), 2 * self.intermediate()),
            Proj::Down => (self.intermediate(), self.hidden()),
        }
    }

    /// `out [n, out] = x [n, in] · W_eᵀ + b_e`.
    fn forward(&self, proj: Proj, expert: usize, x: &[f32], out: &mut [f32]);

    /// `dx [n, in] = dy [n, out] · W_e`. `x` is the forward input, for implementations with
    /// trainable parts (LoRA) that accumulate their own weight gradients here.
    fn backward(&self, proj: Proj, expert: usize, x: &[f32], dy: &[f32], dx: &mut [f32]);
}

/// What the backward pass needs from the forward pass.
#[derive(Clone, Debug)]
pub struct MoeCache {
    pub routing: Routing,
    pub plan: RoutingPlan,
    /// Expert inputs per slot `[slots, H]`.
    pub xs: Vec<f32>,
    /// Gate/up outputs per slot `[slots, 2I]`.
    pub h: Vec<f32>,
    /// SwiGLU outputs per slot `[slots, I]`.
    pub z: Vec<f32>,
    /// Expert outputs per slot, bias included `[slots, H]`.
    pub y: Vec<f32>,
}

/// Splits `buf` into the per-expert row ranges of the plan.
fn split_by_expert<'a>(buf: &'a mut [f32], plan: &RoutingPlan, width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(plan.num_experts());
    let mut rest = buf;
    for e in 0..plan.num_experts() {
        let (head, tail) = rest.split_at_mut(plan.range(e).len() * width);
        out.push(head);
        rest = tail;
    }
    out
}

/// MoE forward for `x [T, H]` (already normed): returns `out [T, H]` and the cache.
pub fn moe_forward(
    x: &[f32],
    router_w: &[f32],
    router_b: &[f32],
    experts: &dyn ExpertWeights,
    k: usize,
    act: SwigluParams,
) -> Result<(Vec<f32>, MoeCache)> {
    let (hd, n_e, i2) = (experts.hidden(), experts.num_experts(), 2 * experts.intermediate());
    if !x.len().is_multiple_of(hd) || router_w.len() != n_e * hd || router_b.len() != n_e {
        return Err(Error::Shape(format!(
            "x has {} values (hidden {hd}), router weight {} (want {}), router bias {} (want {n_e})",
            x.len(),
            router_w.len(),
            n_e * hd,
            router_b.len()
        )));
    }
    let t = x.len() / hd;
    let routing = route(&router_logits(x, router_w, router_b, hd), n_e, k)?;
    let plan = RoutingPlan::new(&routing);
    let slots = plan.token.len();
    let xs = gather_rows(x, &plan.token, hd);
    let mut h = vec![0.0f32; slots * i2];
    let mut z = vec![0.0f32; slots * i2 / 2];
    let mut y = vec![0.0f32; slots * hd];
    {
        let xs_e = {
            let mut v = Vec::with_capacity(n_e);
            let mut rest = &xs[..];
            for e in 0..n_e {
                let (a, b) = rest.split_at(plan.range(e).len() * hd);
                v.push(a);
                rest = b;
            }
            v
        };
        let h_e = split_by_expert(&mut h, &plan, i2);
        let z_e = split_by_expert(&mut z, &plan, i2 / 2);
        let y_e = split_by_expert(&mut y, &plan, hd);
        xs_e.into_par_iter().zip(h_e).zip(z_e).zip(y_e).enumerate().for_each(|(e, (((xe, he), ze), ye))| {
            if xe.is_empty() {
                return;
            }
            experts.forward(Proj::GateUp, e, xe, he);
            ze.copy_from_slice(&swiglu(he, act));
            experts.forward(Proj::Down, e, ze, ye);
        });
    }
    // Combine in ascending expert order per token, the order transformers' index_add_ loop uses
    // (permute::combine, the GPU kernel's reference, sums in top-k order: they differ by rounding).
    let mut out = vec![0.0f32; t * hd];
    for s in 0..slots {
        let tok = plan.token[s] as usize;
        let w = plan.weight[s];
        for (o, v) in out[tok * hd..(tok + 1) * hd].iter_mut().zip(&y[s * hd..(s + 1) * hd]) {
            *o += w * v;
        }
    }
    Ok((out, MoeCache { routing, plan, xs, h, z, y }))
}

/// MoE backward: `dout [T, H]` → `dx [T, H]` (through the experts and the router's softmax into
/// the normed input; the router weights themselves are frozen). Also returns the router-logit
/// gradient `[T, E]`.
pub fn moe_backward(
    cache: &MoeCache,
    dout: &[f32],
    router_w: &[f32],
    experts: &dyn ExpertWeights,
    act: SwigluParams,
) -> (Vec<f32>, Vec<f32>) {
    let (hd, n_e, i2) = (experts.hidden(), experts.num_experts(), 2 * experts.intermediate());
    let plan = &cache.plan;
    let k = cache.routing.k;
    let t = dout.len() / hd;
    let slots = plan.token.len();
    // dweights and the weighted upstream gradient of every slot.
    let (dys, dweights) = combine_backward(dout, &cache.y, &plan.weight, &plan.token, &plan.choice, k, hd);
    let mut dxs = vec![0.0f32; slots * hd];
    {
        let ranges: Vec<_> = (0..n_e).map(|e| plan.range(e)).collect();
        let dx_e = split_by_expert(&mut dxs, plan, hd);
        dx_e.into_par_iter().zip(ranges).enumerate().for_each(|(e, (dxe, r))| {
            if r.is_empty() {
                return;
            }
            let mut dz = vec![0.0f32; r.len() * i2 / 2];
            experts.backward(
                Proj::Down,
                e,
                &cache.z[r.start * i2 / 2..r.end * i2 / 2],
                &dys[r.start * hd..r.end * hd],
                &mut dz,
            );
            let dh = swiglu_backward(&cache.h[r.start * i2..r.end * i2], &dz, act);
            experts.backward(Proj::GateUp, e, &cache.xs[r.start * hd..r.end * hd], &dh, dxe);
        });
    }
    let mut dx = vec![0.0f32; t * hd];
    for s in 0..slots {
        let tok = plan.token[s] as usize;
        for (o, v) in dx[tok * hd..(tok + 1) * hd].iter_mut().zip(&dxs[s * hd..(s + 1) * hd]) {
            *o += v;
        }
    }
    let dlogits = route_backward(&cache.routing, &dweights);
    gemm::matmul(&dlogits, router_w, &mut dx, t, n_e, hd, false, 1.0);
    (dx, dlogits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Dense f32 experts `[E, out, in]` for tests.
    struct Dense {
        e: usize,
        h: usize,
        i: usize,
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: Vec<f32>,
    }

    impl ExpertWeights for Dense {
        fn num_experts(&self) -> usize {
            self.e
        }
        fn hidden(&self) -> usize {
            self.h
        }
        fn intermediate(&self) -> usize {
            self.i
        }
        fn forward(&self, proj: Proj, e: usize, x: &[f32], out: &mut [f32]) {
            let (din, dout) = self.dims(proj);
            let (w, b) = match proj {
                Proj::GateUp => (&self.w1, &self.b1),
                Proj::Down => (&self.w2, &self.b2),
            };
            let n = x.len() / din;
            for r in 0..n {
                out[r * dout..(r + 1) * dout].copy_from_slice(&b[e * dout..(e + 1) * dout]);
            }
            gemm::matmul(x, &w[e * dout * din..(e + 1) * dout * din], out, n, din, dout, true, 1.0);
        }
        fn backward(&self, proj: Proj, e: usize, _x: &[f32], dy: &[f32], dx: &mut [f32]) {
            let (din, dout) = self.dims(proj);
            let w = if proj == Proj::GateUp { &self.w1 } else { &self.w2 };
            gemm::matmul(dy, &w[e * dout * din..(e + 1) * dout * din], dx, dy.len() / dout, dout, din, false, 0.0);
        }
    }

    fn randn(rng: &mut impl Rng, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0) * s).collect()
    }

    fn setup(seed: u64, e: usize) -> (Dense, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (h, i, t) = (8, 6, 5);
        let d = Dense {
            e,
            h,
            i,
            w1: randn(&mut rng, e * 2 * i * h, 0.8),
            b1: randn(&mut rng, e * 2 * i, 0.3),
            w2: randn(&mut rng, e * h * i, 0.8),
            b2: randn(&mut rng, e * h, 0.3),
        };
        (d, randn(&mut rng, t * h, 1.5), randn(&mut rng, e * h, 1.0), randn(&mut rng, e, 0.5))
    }

    /// The block computed token by token, straight from the definition, in f64.
    fn naive(d: &Dense, x: &[f32], rw: &[f32], rb: &[f32], k: usize) -> Vec<f64> {
        let (h, i) = (d.h, d.i);
        let mut out = vec![0.0f64; x.len()];
        for (t, xt) in x.chunks(h).enumerate() {
            let logits: Vec<f32> =
                (0..d.e).map(|e| rb[e] + (0..h).map(|j| rw[e * h + j] * xt[j]).sum::<f32>()).collect();
            let r = route(&logits, d.e, k).unwrap();
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                let e = e as usize;
                let hv: Vec<f64> = (0..2 * i)
                    .map(|o| {
                        d.b1[e * 2 * i + o] as f64
                            + (0..h).map(|j| d.w1[(e * 2 * i + o) * h + j] as f64 * xt[j] as f64).sum::<f64>()
                    })
                    .collect();
                let z: Vec<f64> = (0..i)
                    .map(|j| {
                        let g = hv[2 * j].min(7.0);
                        let u = hv[2 * j + 1].clamp(-7.0, 7.0);
                        (u + 1.0) * g / (1.0 + (-1.702 * g).exp())
                    })
                    .collect();
                for o in 0..h {
                    let y =
                        d.b2[e * h + o] as f64 + (0..i).map(|j| d.w2[(e * h + o) * i + j] as f64 * z[j]).sum::<f64>();
                    out[t * h + o] += w as f64 * y;
                }
            }
        }
        out
    }

    #[test]
    fn top2_and_top4_match_naive() {
        for (k, e) in [(2, 4), (4, 8), (1, 3), (3, 3)] {
            let (d, x, rw, rb) = setup(k as u64 * 10 + e as u64, e);
            let (out, _) = moe_forward(&x, &rw, &rb, &d, k, SwigluParams::default()).unwrap();
            let want = naive(&d, &x, &rw, &rb, k);
            for (j, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() <= 1e-5 + 1e-5 * b.abs(), "k={k} [{j}] {a} vs {b}");
            }
        }
    }

    #[test]
    fn expert_with_zero_tokens_is_skipped() {
        let (d, x, mut rw, mut rb) = setup(3, 6);
        // Experts 2 and 5 can never win: huge negative bias, zero weights.
        for e in [2, 5] {
            rb[e] = -1e6;
            rw[e * 8..(e + 1) * 8].fill(0.0);
        }
        let (out, cache) = moe_forward(&x, &rw, &rb, &d, 2, SwigluParams::default()).unwrap();
        assert!(cache.plan.range(2).is_empty() && cache.plan.range(5).is_empty());
        let want = naive(&d, &x, &rw, &rb, 2);
        assert!(out.iter().zip(&want).all(|(a, b)| (*a as f64 - b).abs() <= 1e-5 + 1e-5 * b.abs()));
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (d, x, rw, rb) = setup(11, 4);
        let k = 2;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
        let dout = randn(&mut rng, x.len(), 1.0);
        let (_, cache) = moe_forward(&x, &rw, &rb, &d, k, SwigluParams::default()).unwrap();
        let (dx, _) = moe_backward(&cache, &dout, &rw, &d, SwigluParams::default());
        let loss =
            |xv: &[f32]| -> f64 { naive(&d, xv, &rw, &rb, k).iter().zip(&dout).map(|(a, b)| a * *b as f64).sum() };
        let mut worst = 0.0f64;
        for j in 0..x.len() {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[j] += 1e-3;
            m[j] -= 1e-3;
            // Skip coordinates where the perturbation flips the top-k selection.
            let sel = |v: &[f32]| moe_forward(v, &rw, &rb, &d, k, SwigluParams::default()).unwrap().1.routing.experts;
            if sel(&p) != cache.routing.experts || sel(&m) != cache.routing.experts {
                continue;
            }
            let fd = (loss(&p) - loss(&m)) / 2e-3;
            worst = worst.max((dx[j] as f64 - fd).abs() / (1.0 + fd.abs()));
        }
        assert!(worst < 2e-3, "worst relative error {worst}");
    }
}
