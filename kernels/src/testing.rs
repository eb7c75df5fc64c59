//! Helpers for tests that compare a kernel with its CPU reference (used by this crate's tests and
//! by the `cuda` tests of the domain crates).

use rand::{Rng, SeedableRng};

/// `n` values uniform in `[-scale, scale)` from `seed` (fresh inputs, never zeros).
pub fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
}

/// STYLE's tolerance formula: `|got − want| <= atol + rtol·|want|` everywhere. Prints
/// `||got − want|| / ||want||` and panics naming the worst element (NaN counts as a failure).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f32, usize::MAX);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let excess = if g.is_finite() == w.is_finite() { (g - w).abs() - (atol + rtol * w.abs()) } else { f32::MAX };
        if excess > worst.0 || (g.is_nan() && !w.is_nan()) {
            worst = (excess.max(f32::MIN_POSITIVE), i);
        }
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    println!("{what}: ||got - want|| / ||want|| = {:.2e} over {} values", (num / den.max(1e-300)).sqrt(), got.len());
    assert!(
        worst.1 == usize::MAX,
        "{what}: element {} = {} vs {} (|diff| {} > atol {atol} + rtol {rtol} * |want|)",
        worst.1,
        got[worst.1],
        want[worst.1],
        (got[worst.1] - want[worst.1]).abs()
    );
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
