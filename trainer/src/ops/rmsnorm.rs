//! RMSNorm as gpt-oss uses it: `y = w · x / sqrt(mean(x²) + eps)`, weight applied in f32.

/// `x [n, h]` → `(y [n, h], rstd [n])`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let mut y = vec![0.0f32; x.len()];
    let mut rstd = Vec::with_capacity(x.len() / h);
    for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
        rstd.push(r);
    }
    (y, rstd)
}

/// `dx = r·(w⊙dy) − x·r³·mean(x⊙w⊙dy)` for each row (the weight is frozen).
pub fn rmsnorm_backward(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32]) -> Vec<f32> {
    let h = w.len();
    let mut dx = vec![0.0f32; x.len()];
    for (((xr, dyr), dxr), &r) in x.chunks_exact(h).zip(dy.chunks_exact(h)).zip(dx.chunks_exact_mut(h)).zip(rstd) {
        let m = xr.iter().zip(dyr).zip(w).map(|((a, b), c)| a * b * c).sum::<f32>() / h as f32;
        for (((o, xv), dv), g) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            *o = r * g * dv - xv * r * r * r * m;
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fd_check_f64, randn};

    #[test]
    fn forward_matches_definition() {
        let x = randn(1, 3 * 8, 2.0);
        let w = randn(2, 8, 1.0);
        let (y, r) = rmsnorm(&x, &w, 1e-5);
        for row in 0..3 {
            let xr = &x[row * 8..(row + 1) * 8];
            let ms: f64 = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 8.0;
            let rr = 1.0 / (ms + 1e-5).sqrt();
            assert!((r[row] as f64 - rr).abs() < 1e-6 * rr);
            for j in 0..8 {
                let want = w[j] as f64 * xr[j] as f64 * rr;
                assert!((y[row * 8 + j] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = randn(3, 2 * 8, 1.0);
        let w = randn(4, 8, 1.0);
        let dy = randn(5, 2 * 8, 1.0);
        let (_, r) = rmsnorm(&x, &w, 1e-5);
        let dx = rmsnorm_backward(&x, &w, &r, &dy);
        // f64 reference: Σ dy · w · x / sqrt(mean(x²) + eps), row by row.
        let f = |xv: &[f64]| -> f64 {
            xv.chunks(8)
                .zip(dy.chunks(8))
                .map(|(xr, dr)| {
                    let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / 8.0 + 1e-5).sqrt();
                    xr.iter().zip(dr).zip(&w).map(|((a, d), g)| *d as f64 * *g as f64 * a * r).sum::<f64>()
                })
                .sum()
        };
        fd_check_f64(&x, &dx, f, 1e-5);
    }
}
