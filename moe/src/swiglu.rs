//! gpt-oss clamped SwiGLU on interleaved gate/up: for `h [n, 2I]`, `gate = h[:, 0::2]`,
//! `up = h[:, 1::2]`, `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`,
//! `z = (u + 1) · g · sigmoid(alpha · g)`.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SwigluParams {
    pub alpha: f32,
    pub limit: f32,
}

impl Default for SwigluParams {
    /// gpt-oss: alpha 1.702 (hard-coded in the references), limit 7.0 (`swiglu_limit`).
    fn default() -> Self {
        Self { alpha: 1.702, limit: 7.0 }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `h [n, 2I]` (interleaved) → `z [n, I]`.
pub fn swiglu(h: &[f32], p: SwigluParams) -> Vec<f32> {
    h.chunks_exact(2)
        .map(|gu| {
            let g = gu[0].min(p.limit);
            let u = gu[1].clamp(-p.limit, p.limit);
            (u + 1.0) * g * sigmoid(p.alpha * g)
        })
        .collect()
}

/// Backward: `dz [n, I]` → `dh [n, 2I]`. The clamps pass gradient on their boundary (torch's
/// clamp/min do), and none beyond it.
pub fn swiglu_backward(h: &[f32], dz: &[f32], p: SwigluParams) -> Vec<f32> {
    let mut dh = vec![0.0f32; h.len()];
    for ((gu, d), dgu) in h.chunks_exact(2).zip(dz).zip(dh.chunks_exact_mut(2)) {
        let g = gu[0].min(p.limit);
        let u = gu[1].clamp(-p.limit, p.limit);
        let s = sigmoid(p.alpha * g);
        let glu = g * s;
        dgu[0] = if gu[0] <= p.limit { d * (u + 1.0) * (s + p.alpha * g * s * (1.0 - s)) } else { 0.0 };
        dgu[1] = if gu[1].abs() <= p.limit { d * glu } else { 0.0 };
    }
    dh
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(g: f64, u: f64) -> f64 {
        let g = g.min(7.0);
        let u = u.clamp(-7.0, 7.0);
        (u + 1.0) * g / (1.0 + (-1.702 * g).exp())
    }

    #[test]
    fn values_and_clamps() {
        let h = [0.5f32, -0.25, 9.0, 8.0, -3.0, -10.0, 7.0, -7.0];
        let z = swiglu(&h, SwigluParams::default());
        for (i, gu) in h.chunks(2).enumerate() {
            let want = reference(gu[0] as f64, gu[1] as f64);
            assert!((z[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{i}: {} vs {want}", z[i]);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Points away from the clamp kinks, plus points beyond them (zero gradient).
        let h = [0.5f32, -0.25, 9.0, 3.0, -3.0, -10.0, 2.5, 6.5, -0.7, 1.3];
        let dz = [0.3f32, -1.2, 0.8, 1.5, -0.6];
        let dh = swiglu_backward(&h, &dz, SwigluParams::default());
        for i in 0..h.len() {
            let pair = i / 2;
            let f = |delta: f64| {
                let mut g = h[2 * pair] as f64;
                let mut u = h[2 * pair + 1] as f64;
                if i % 2 == 0 {
                    g += delta
                } else {
                    u += delta
                }
                dz[pair] as f64 * reference(g, u)
            };
            let fd = (f(1e-6) - f(-1e-6)) / 2e-6;
            assert!((dh[i] as f64 - fd).abs() <= 1e-4 * (1.0 + fd.abs()), "h[{i}]: {} vs {fd}", dh[i]);
        }
    }
}
