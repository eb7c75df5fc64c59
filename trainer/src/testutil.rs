//! Helpers shared by the unit tests.

use rand::{Rng, SeedableRng};

/// Uniform values in `(-scale, scale)` from a seeded generator (fresh, non-zero data per test).
pub fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
}

/// Checks an analytic gradient (from the f32 op) against central differences of an f64
/// reference `f` of the same function (step 1e-6), with `|g - fd| <= tol · (1 + |fd|)`.
pub fn fd_check_f64(x: &[f32], grad: &[f32], f: impl Fn(&[f64]) -> f64, tol: f64) {
    assert_eq!(x.len(), grad.len());
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut worst = (0.0f64, 0usize);
    for i in 0..x.len() {
        let (mut p, mut m) = (x64.clone(), x64.clone());
        p[i] += 1e-6;
        m[i] -= 1e-6;
        let fd = (f(&p) - f(&m)) / 2e-6;
        let err = (grad[i] as f64 - fd).abs() / (1.0 + fd.abs());
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(worst.0 <= tol, "worst gradient error {} at index {} (tolerance {tol})", worst.0, worst.1);
}
