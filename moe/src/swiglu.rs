//! gpt-oss clamped SwiGLU on interleaved gate/up: for `h [n, 2I]`, `gate = h[:, 0::2]`,
//! `up = h[:, 1::2]`, `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`,
//! `z = (u + 1) · g · sigmoid(alpha · g)`. The CPU reference and, with the `cuda` feature, the
//! kernels.

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
#[cfg(feature = "cuda")]
use oxtune_kernels::Gpu;

#[cfg(feature = "cuda")]
use crate::gpu_util::{check_len, shape_err};

/// CUDA source of [`swiglu_gpu`] and [`swiglu_backward_gpu`].
#[cfg(feature = "cuda")]
pub const SRC: &str = include_str!("swiglu.cu");

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

/// One thread per output element, blocks striding over them.
#[cfg(feature = "cuda")]
fn elementwise(elems: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (elems.div_ceil(256).min(65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `h` must be `[n, 2I]`: an even number of values; returns `n · I`.
#[cfg(feature = "cuda")]
fn pairs(op: &str, h: usize) -> oxtune_kernels::Result<usize> {
    if h.is_multiple_of(2) {
        Ok(h / 2)
    } else {
        Err(shape_err(format!("{op}: h has {h} elements, expected an even number ([n, 2I], gate/up interleaved)")))
    }
}

/// GPU [`swiglu`]: `h [n, 2I]` (interleaved) → `z [n, I]` (assigned). Differs from the reference
/// only by `expf`'s rounding.
#[cfg(feature = "cuda")]
pub fn swiglu_gpu(
    gpu: &Gpu,
    h: &CudaView<'_, f32>,
    p: SwigluParams,
    z: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    let elems = pairs("swiglu", h.len())?;
    check_len("swiglu", "z", z.len(), elems)?;
    if elems == 0 {
        return Ok(());
    }
    let f = gpu.function("moe_swiglu", SRC, "swiglu_f32")?;
    let elems64 = elems as u64;
    // SAFETY: swiglu_f32(float* z, const float* h, unsigned long long elems, float alpha, float
    // limit): z holds elems floats and h 2·elems (checked above); threads stride over elems.
    unsafe {
        gpu.stream.launch_builder(&f).arg(z).arg(h).arg(&elems64).arg(&p.alpha).arg(&p.limit).launch(elementwise(elems))
    }?;
    Ok(())
}

/// GPU [`swiglu_backward`]: `h [n, 2I]`, `dz [n, I]` → `dh [n, 2I]` (assigned), with the same
/// boundary rule for the clamps. Differs from the reference only by `expf`'s rounding and FMA
/// contraction.
#[cfg(feature = "cuda")]
pub fn swiglu_backward_gpu(
    gpu: &Gpu,
    h: &CudaView<'_, f32>,
    dz: &CudaView<'_, f32>,
    p: SwigluParams,
    dh: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    let elems = pairs("swiglu_backward", h.len())?;
    check_len("swiglu_backward", "dz", dz.len(), elems)?;
    check_len("swiglu_backward", "dh", dh.len(), 2 * elems)?;
    if elems == 0 {
        return Ok(());
    }
    let f = gpu.function("moe_swiglu", SRC, "swiglu_bwd_f32")?;
    let elems64 = elems as u64;
    // SAFETY: swiglu_bwd_f32(float* dh, const float* h, const float* dz, unsigned long long elems,
    // float alpha, float limit): dh and h hold 2·elems floats, dz elems (checked above); threads
    // stride over elems.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dh)
            .arg(h)
            .arg(dz)
            .arg(&elems64)
            .arg(&p.alpha)
            .arg(&p.limit)
            .launch(elementwise(elems))
    }?;
    Ok(())
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

#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use oxtune_kernels::testing::{assert_close, randn};

    fn check(gpu: &Gpu, h: &[f32], p: SwigluParams, seed: u64) {
        let n = h.len() / 2;
        let dz = randn(seed, n, 1.0);
        let s = &gpu.stream;
        let (h_d, dz_d) = (s.clone_htod(h).unwrap(), s.clone_htod(&dz).unwrap());
        let (mut z_d, mut dh_d) = (s.alloc_zeros::<f32>(n).unwrap(), s.alloc_zeros::<f32>(2 * n).unwrap());
        swiglu_gpu(gpu, &h_d.as_view(), p, &mut z_d.as_view_mut()).unwrap();
        swiglu_backward_gpu(gpu, &h_d.as_view(), &dz_d.as_view(), p, &mut dh_d.as_view_mut()).unwrap();
        // z is a product of (u + 1), g and sigmoid(alpha·g): only expf's rounding (2 ulp) differs,
        // so the error is relative: rtol 1e-5.
        assert_close(&format!("swiglu z [{n}]"), &s.clone_dtoh(&z_d).unwrap(), &swiglu(h, p), 1e-7, 1e-5);
        // The gate gradient d·(u + 1)·(s + alpha·g·s·(1 − s)) cancels near the minimum of g·sigmoid
        // (g ≈ −1.28 for alpha 1.702), where its relative error is unbounded. The bracket's terms
        // are at most 1 and 0.23 in size, so expf's and FMA's rounding leave a few 1e-7 in it,
        // times |d·(u + 1)| <= 8: atol 1e-5, rtol 1e-5.
        assert_close(
            &format!("swiglu dh [{n}]"),
            &s.clone_dtoh(&dh_d).unwrap(),
            &swiglu_backward(h, &dz, p),
            1e-5,
            1e-5,
        );
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn values_beyond_the_limit() {
        let gpu = Gpu::new(0).expect("a GPU");
        // Uniform in [-12, 12): about 40% of the gates and ups lie beyond ±7.
        let mut h = randn(1, 2 * 4096, 12.0);
        // On the boundaries (gradient passes), just beyond, and NaN (min ignores it, clamp keeps it).
        h.extend([7.0, 7.0, 7.0, -7.0, -7.0, 7.0, 7.0000005, -7.0000005, 1.0, f32::NAN, f32::NAN, 2.0]);
        check(&gpu, &h, SwigluParams::default(), 2);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gpt_oss_intermediate() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, &randn(3, 33 * 2 * 2880, 4.0), SwigluParams::default(), 4);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_lengths() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, &randn(5, 3 * 2 * 5, 4.0), SwigluParams::default(), 6);
        check(&gpu, &randn(7, 2, 4.0), SwigluParams::default(), 8);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn other_alpha_and_limit() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, &randn(9, 2 * 1000, 5.0), SwigluParams { alpha: 1.0, limit: 3.0 }, 10);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn more_elements_than_threads_in_the_grid() {
        let gpu = Gpu::new(0).expect("a GPU");
        // 65535 blocks of 256 threads cover 16.8M outputs; the rest take a second pass.
        check(&gpu, &randn(11, 2 * 17_000_000, 9.0), SwigluParams::default(), 12);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_h_is_a_shape_error() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let h = s.alloc_zeros::<f32>(7).unwrap();
        let mut z = s.alloc_zeros::<f32>(3).unwrap();
        let e = swiglu_gpu(&gpu, &h.as_view(), SwigluParams::default(), &mut z.as_view_mut()).unwrap_err();
        assert!(e.to_string().starts_with("swiglu: h has 7 elements, expected an even number"), "{e}");
    }
}
