//! `y [n, out] = x [n, in] · Wᵀ + b` with `W [out, in]` (PyTorch layout).

use oxtune_moe::gemm;

/// Forward.
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, n_in: usize, n_out: usize) -> Vec<f32> {
    let n = x.len() / n_in;
    let mut y = match b {
        Some(b) => (0..n).flat_map(|_| b.iter().copied()).collect(),
        None => vec![0.0; n * n_out],
    };
    gemm::matmul(x, w, &mut y, n, n_in, n_out, true, 1.0);
    y
}

/// Input gradient `dx [n, in] = dy [n, out] · W` (the weights are frozen).
pub fn linear_backward_input(dy: &[f32], w: &[f32], n_in: usize, n_out: usize) -> Vec<f32> {
    let n = dy.len() / n_out;
    let mut dx = vec![0.0; n * n_in];
    gemm::matmul(dy, w, &mut dx, n, n_out, n_in, false, 0.0);
    dx
}
