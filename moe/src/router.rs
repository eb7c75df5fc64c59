//! Top-k router: `logits = x · Wᵀ + b`, keep the k largest, softmax over those k only.

use crate::{gemm, Error, Result};

/// Routing decision for `[tokens]`: `experts[t * k + j]` and `weights[t * k + j]`, j-th largest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub num_experts: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.k
    }
}

/// Router logits `[tokens, E] = x [tokens, H] · w [E, H]ᵀ + b [E]`.
pub fn router_logits(x: &[f32], w: &[f32], b: &[f32], hidden: usize) -> Vec<f32> {
    let e = b.len();
    let t = x.len() / hidden;
    let mut out: Vec<f32> = (0..t).flat_map(|_| b.iter().copied()).collect();
    gemm::matmul(x, w, &mut out, t, hidden, e, true, 1.0);
    out
}

/// Top-k over `logits [tokens, E]` (descending; equal logits go to the lower expert index, which is
/// what torch.topk returns on CPU), then softmax over the k selected logits.
pub fn route(logits: &[f32], num_experts: usize, k: usize) -> Result<Routing> {
    if k == 0 || k > num_experts {
        return Err(Error::TopK { k, experts: num_experts });
    }
    if logits.len() % num_experts != 0 {
        return Err(Error::Shape(format!("{} logits is not a multiple of {num_experts} experts", logits.len())));
    }
    let t = logits.len() / num_experts;
    let mut experts = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    let mut order: Vec<u32> = Vec::with_capacity(num_experts);
    for row in logits.chunks_exact(num_experts) {
        order.clear();
        order.extend(0..num_experts as u32);
        // total_cmp puts NaN above everything, so a NaN logit is selected and poisons the weights
        // visibly instead of being silently skipped.
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let sel = &order[..k];
        let m = row[sel[0] as usize];
        let exps: Vec<f32> = sel.iter().map(|&e| (row[e as usize] - m).exp()).collect();
        let z: f32 = exps.iter().sum();
        experts.extend_from_slice(sel);
        weights.extend(exps.iter().map(|v| v / z));
    }
    Ok(Routing { k, num_experts, experts, weights })
}

/// Backward of the softmax over the selected logits: given `dweights [tokens, k]`, returns
/// `dlogits [tokens, E]` (zero for unselected experts): `dl_j = w_j (dw_j - Σ_i w_i dw_i)`.
pub fn route_backward(routing: &Routing, dweights: &[f32]) -> Vec<f32> {
    let (k, e) = (routing.k, routing.num_experts);
    let mut dlogits = vec![0.0f32; routing.tokens() * e];
    for (t, ((w, dw), sel)) in
        routing.weights.chunks_exact(k).zip(dweights.chunks_exact(k)).zip(routing.experts.chunks_exact(k)).enumerate()
    {
        let dot: f32 = w.iter().zip(dw).map(|(a, b)| a * b).sum();
        for j in 0..k {
            dlogits[t * e + sel[j] as usize] = w[j] * (dw[j] - dot);
        }
    }
    dlogits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top2_softmax_over_selected_only() {
        let logits = [0.1, 2.0, -1.0, 1.0, /* token 1 */ 5.0, 5.0, 0.0, 4.0];
        let r = route(&logits, 4, 2).unwrap();
        assert_eq!(r.experts, vec![1, 3, 0, 1]);
        let e = (-1.0f32).exp();
        assert!((r.weights[0] - 1.0 / (1.0 + e)).abs() < 1e-7);
        assert!((r.weights[1] - e / (1.0 + e)).abs() < 1e-7);
        assert_eq!(&r.weights[2..], &[0.5, 0.5]);
    }

    #[test]
    fn top4_of_eight() {
        let logits = [3.0, -2.0, 7.0, 0.5, 1.5, 9.0, -0.5, 2.0];
        let r = route(&logits, 8, 4).unwrap();
        assert_eq!(r.experts, vec![5, 2, 0, 7]);
        let sel = [9.0f32, 7.0, 3.0, 2.0];
        let z: f32 = sel.iter().map(|v| (v - 9.0).exp()).sum();
        for (w, s) in r.weights.iter().zip(sel) {
            assert!((w - (s - 9.0).exp() / z).abs() < 1e-7);
        }
    }

    #[test]
    fn k_equal_to_experts_and_invalid_k() {
        assert_eq!(route(&[1.0, 2.0], 2, 2).unwrap().experts, vec![1, 0]);
        assert_eq!(route(&[1.0, 2.0], 2, 3), Err(Error::TopK { k: 3, experts: 2 }));
        assert_eq!(route(&[1.0, 2.0], 2, 0), Err(Error::TopK { k: 0, experts: 2 }));
        assert!(route(&[1.0, 2.0, 3.0], 2, 1).is_err());
    }

    #[test]
    fn router_logits_is_linear_with_bias() {
        // x [2, 3], w [2, 3], b [2].
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        let w = [0.5, -1.0, 2.0, 1.0, 1.0, 1.0];
        let b = [0.25, -0.5];
        let l = router_logits(&x, &w, &b, 3);
        assert_eq!(l, vec![0.5 - 2.0 + 6.0 + 0.25, 6.0 - 0.5, -0.5 - 0.5 + 4.0 + 0.25, 1.5 - 0.5]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let logits = [0.3f64, -1.2, 0.8, 2.1, 0.0, -0.4];
        let dw = [0.7f64, -1.1, 0.4];
        // f(l) = Σ_j dw_j · softmax_topk(l)_j with the selection fixed.
        let f = |l: &[f64]| {
            let r = route(&l.iter().map(|&v| v as f32).collect::<Vec<_>>(), 6, 3).unwrap();
            let sel: Vec<f64> = r.experts.iter().map(|&e| l[e as usize]).collect();
            let m = sel.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sel.iter().map(|v| (v - m).exp()).sum();
            sel.iter().zip(dw).map(|(v, d)| d * (v - m).exp() / z).sum::<f64>()
        };
        let r = route(&logits.map(|v| v as f32), 6, 3).unwrap();
        let g = route_backward(&r, &dw.map(|v| v as f32));
        for i in 0..6 {
            let (mut p, mut n) = (logits, logits);
            p[i] += 1e-5;
            n[i] -= 1e-5;
            let fd = (f(&p) - f(&n)) / 2e-5;
            assert!((g[i] as f64 - fd).abs() < 1e-4, "logit {i}: {} vs {fd}", g[i]);
        }
    }
}
