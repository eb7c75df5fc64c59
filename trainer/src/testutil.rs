//! Helpers shared by the unit tests.

use rand::{Rng, SeedableRng};

/// Uniform values in `(-scale, scale)` from a seeded generator (fresh, non-zero data per test).
pub fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
}

/// Checks an analytic gradient against central differences of `f` (computed in f64 from f32
/// inputs, step 1e-3), with relative tolerance `tol` on `|g - fd| / (1 + |fd|)`.
pub fn fd_check(x: &[f32], grad: &[f32], f: impl Fn(&[f32]) -> f64, tol: f64) {
    assert_eq!(x.len(), grad.len());
    let mut worst = (0.0f64, 0usize);
    for i in 0..x.len() {
        let (mut p, mut m) = (x.to_vec(), x.to_vec());
        p[i] += 1e-3;
        m[i] -= 1e-3;
        let fd = (f(&p) - f(&m)) / ((p[i] - m[i]) as f64);
        let err = (grad[i] as f64 - fd).abs() / (1.0 + fd.abs());
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(worst.0 <= tol, "worst gradient error {} at index {} (tolerance {tol})", worst.0, worst.1);
}
