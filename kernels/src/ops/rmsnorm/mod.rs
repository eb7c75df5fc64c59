//! RMSNorm as gpt-oss uses it: `y = w · x / sqrt(mean(x²) + eps)`, weight applied in f32, and its
//! backward `dx = r·(w⊙dy) − x·r³·mean(x⊙w⊙dy)`: the CPU reference and the CUDA kernels.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("rmsnorm.cu");

/// CPU reference: `x [n, h]` → `(y [n, h], rstd [n])`.
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

/// CPU reference of the backward (the weight is frozen).
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

fn launch_config(rows: usize, h: usize) -> LaunchConfig {
    let threads = h.next_power_of_two().clamp(32, 1024) as u32;
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn check(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!("rmsnorm: {what} has {got} elements, expected {want}")))
    }
}

/// GPU forward: `x [rows, h]`, `w [h]` → `y [rows, h]`, `rstd [rows]` (rows = `rstd.len()`).
pub fn rmsnorm_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    eps: f32,
    y: &mut CudaViewMut<'_, f32>,
    rstd: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (h, rows) = (w.len(), rstd.len());
    check("x", x.len(), rows * h)?;
    check("y", y.len(), rows * h)?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("rmsnorm", SRC, "rmsnorm_fwd_f32")?;
    let h32 = h as u32;
    // SAFETY: rmsnorm_fwd_f32(float* y, float* rstd, const float* x, const float* w, unsigned h,
    // float eps): y and x hold rows·h floats, rstd rows, w h (checked above); one block per row.
    unsafe {
        gpu.stream.launch_builder(&f).arg(y).arg(rstd).arg(x).arg(w).arg(&h32).arg(&eps).launch(launch_config(rows, h))
    }?;
    Ok(())
}

/// GPU backward: `dx [rows, h]` from `x`, `w`, the forward's `rstd` and `dy` (assigned).
pub fn rmsnorm_backward_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    backward(gpu, x, w, rstd, dy, dx, false)
}

/// [`rmsnorm_backward_gpu`] added to `dx` (`dx += ∂/∂x`, a residual stream's gradient): the bits
/// of the assignment into a scratch buffer followed by an f32 add, in one pass.
pub fn rmsnorm_backward_add_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    backward(gpu, x, w, rstd, dy, dx, true)
}

fn backward(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    let (h, rows) = (w.len(), rstd.len());
    check("x", x.len(), rows * h)?;
    check("dy", dy.len(), rows * h)?;
    check("dx", dx.len(), rows * h)?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("rmsnorm", SRC, "rmsnorm_bwd_f32")?;
    let (h32, acc) = (h as u32, accumulate as i32);
    // SAFETY: rmsnorm_bwd_f32(float* dx, const float* x, const float* w, const float* rstd,
    // const float* dy, unsigned h, int accumulate): x, dy, dx hold rows·h floats, rstd rows, w h
    // (checked above); one block per row.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dx)
            .arg(x)
            .arg(w)
            .arg(rstd)
            .arg(dy)
            .arg(&h32)
            .arg(&acc)
            .launch(launch_config(rows, h))
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn};

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
    fn backward_matches_f64_finite_differences() {
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
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for i in 0..x.len() {
            let (mut p, mut m) = (x64.clone(), x64.clone());
            p[i] += 1e-6;
            m[i] -= 1e-6;
            let fd = (f(&p) - f(&m)) / 2e-6;
            assert!((dx[i] as f64 - fd).abs() <= 1e-5 * (1.0 + fd.abs()), "dx[{i}] {} vs {fd}", dx[i]);
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gpu_matches_cpu_reference() {
        let gpu = Gpu::new(0).expect("a GPU");
        // Hidden sizes: gpt-oss (2880), odd, smaller than a warp, and one row.
        for (seed, rows, h) in [(1u64, 7usize, 2880usize), (2, 5, 65), (3, 3, 17), (4, 1, 1024)] {
            let x = randn(seed, rows * h, 3.0);
            let w = randn(seed + 100, h, 1.5);
            let dy = randn(seed + 200, rows * h, 1.0);
            let (y, r) = rmsnorm(&x, &w, 1e-5);
            let dx = rmsnorm_backward(&x, &w, &r, &dy);
            let s = &gpu.stream;
            let (xd, wd, dyd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap(), s.clone_htod(&dy).unwrap());
            let (mut yg, mut rg, mut dxg) = (
                s.alloc_zeros::<f32>(rows * h).unwrap(),
                s.alloc_zeros::<f32>(rows).unwrap(),
                s.alloc_zeros::<f32>(rows * h).unwrap(),
            );
            rmsnorm_gpu(&gpu, &xd.as_view(), &wd.as_view(), 1e-5, &mut yg.as_view_mut(), &mut rg.as_view_mut())
                .unwrap();
            rmsnorm_backward_gpu(
                &gpu,
                &xd.as_view(),
                &wd.as_view(),
                &rg.as_view(),
                &dyd.as_view(),
                &mut dxg.as_view_mut(),
            )
            .unwrap();
            // The accumulating form: the bits of the assignment plus an f32 add.
            let base = randn(seed + 300, rows * h, 1.0);
            let mut acc = s.clone_htod(&base).unwrap();
            rmsnorm_backward_add_gpu(
                &gpu,
                &xd.as_view(),
                &wd.as_view(),
                &rg.as_view(),
                &dyd.as_view(),
                &mut acc.as_view_mut(),
            )
            .unwrap();
            let assigned = s.clone_dtoh(&dxg).unwrap();
            let want: Vec<f32> = base.iter().zip(&assigned).map(|(b, g)| b + g).collect();
            let got = s.clone_dtoh(&acc).unwrap();
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "dx += [{rows}, {h}] differs from the assignment plus an add"
            );
            // f32 on both sides, different summation order: rtol 1e-5 (STYLE's fp32 default).
            assert_close(&format!("y [{rows}, {h}]"), &s.clone_dtoh(&yg).unwrap(), &y, 1e-6, 1e-5);
            assert_close(&format!("rstd [{rows}]"), &s.clone_dtoh(&rg).unwrap(), &r, 1e-6, 1e-5);
            assert_close(&format!("dx [{rows}, {h}]"), &s.clone_dtoh(&dxg).unwrap(), &dx, 1e-5, 1e-4);
        }
    }
}
