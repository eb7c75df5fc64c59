//! Global-norm gradient clipping on the device ([`crate::clip_grad_norm`]'s semantics).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use oxtune_kernels::{Error, Gpu};

use super::{elementwise_config, CLIP_SRC, THREADS};
use crate::clip::{check_max_norm, clip_coef};

/// Blocks of the sum-of-squares kernel at most: enough to fill an H100 several times over while keeping the
/// f32 atomic additions (one per block) few.
const MAX_SUM_BLOCKS: usize = 1024;

/// Length of the f64 scratch [`global_grad_norm_gpu`] and [`clip_grad_norm_gpu`] take: one
/// partial sum per block and the accumulator.
pub const NORM_SCRATCH: usize = MAX_SUM_BLOCKS + 1;

/// The global L2 norm over all `grads`: squares summed on the device in f64 into `scratch`
/// (`[NORM_SCRATCH]` f64, overwritten), one host read. Blocks write partial sums that one more
/// kernel adds in a fixed order, so the result is the same bits on every run (no atomics).
pub fn global_grad_norm_gpu(
    gpu: &Gpu,
    grads: &[CudaView<'_, f32>],
    scratch: &mut CudaViewMut<'_, f64>,
) -> oxtune_kernels::Result<f32> {
    if scratch.len() != NORM_SCRATCH {
        return Err(Error::Shape(format!(
            "global_grad_norm: scratch has {} elements, expected {NORM_SCRATCH}",
            scratch.len()
        )));
    }
    gpu.stream.memset_zeros(scratch)?;
    let squares = gpu.function("optim_clip", CLIP_SRC, "sum_squares_f32")?;
    let gather = gpu.function("optim_clip", CLIP_SRC, "sum_partials_f64")?;
    let (mut partials, mut acc) = scratch.split_at_mut(MAX_SUM_BLOCKS);
    for g in grads.iter().filter(|g| !g.is_empty()) {
        let n = g.len();
        let blocks = n.div_ceil(THREADS as usize).min(MAX_SUM_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let n64 = n as u64;
        // SAFETY: sum_squares_f32(double* partials, const float* x, unsigned long long n): partials
        // holds MAX_SUM_BLOCKS >= blocks doubles, x n floats; blockDim.x = 256 is a multiple of 32.
        unsafe { gpu.stream.launch_builder(&squares).arg(&mut partials).arg(g).arg(&n64).launch(cfg) }?;
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: sum_partials_f64(double* acc, const double* partials, unsigned count): acc holds 1
        // double, partials at least `blocks` written just before on the same stream.
        unsafe { gpu.stream.launch_builder(&gather).arg(&mut acc).arg(&partials.as_view()).arg(&blocks).launch(one) }?;
    }
    let mut total = [0.0f64];
    gpu.stream.memcpy_dtoh(&acc, &mut total)?;
    // A copy into pageable memory has completed when it returns; the sync makes that explicit.
    gpu.stream.synchronize()?;
    Ok(total[0].sqrt() as f32)
}

/// `g *= s` for every gradient.
pub fn scale_grads_gpu(gpu: &Gpu, grads: &mut [CudaViewMut<'_, f32>], s: f32) -> oxtune_kernels::Result<()> {
    let f = gpu.function("optim_clip", CLIP_SRC, "scale_f32")?;
    for g in grads.iter_mut().filter(|g| !g.is_empty()) {
        let n = g.len();
        let n64 = n as u64;
        // SAFETY: scale_f32(float* x, unsigned long long n, float s): x holds n floats; grid-stride loop.
        unsafe { gpu.stream.launch_builder(&f).arg(g).arg(&n64).arg(&s).launch(elementwise_config(n)) }?;
    }
    Ok(())
}

/// [`crate::clip_grad_norm`] on the device: scales every gradient by `min(1, max_norm / (total + 1e-6))` and
/// returns the pre-clip global norm. `scratch` is `[NORM_SCRATCH]` f64 (see [`global_grad_norm_gpu`]); gradients are
/// left untouched when the coefficient is 1.
pub fn clip_grad_norm_gpu(
    gpu: &Gpu,
    grads: &mut [CudaViewMut<'_, f32>],
    scratch: &mut CudaViewMut<'_, f64>,
    max_norm: f32,
) -> crate::Result<f32> {
    check_max_norm(max_norm)?;
    let views: Vec<CudaView<'_, f32>> = grads.iter().map(|g| g.as_view()).collect();
    let total = global_grad_norm_gpu(gpu, &views, scratch)?;
    drop(views);
    let coef = clip_coef(total, max_norm);
    // x * 1 is x: skip the pass (a NaN coefficient is not 1 and still poisons the gradients, as in torch).
    if coef != 1.0 {
        scale_grads_gpu(gpu, grads, coef)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use cudarc::driver::CudaSlice;
    use oxtune_kernels::testing::{assert_close, randn};

    use super::*;

    /// A gpt-oss LoRA pair (rank 8), odd and single-element tensors, and one long enough that the sum kernel's
    /// 1024 blocks loop.
    const LENGTHS: [usize; 5] = [8 * 2880, 2880 * 8, 17, 1, 1024 * 256 * 3 + 5];

    fn grads(seed: u64, scale: f32) -> Vec<Vec<f32>> {
        LENGTHS.iter().enumerate().map(|(i, &n)| randn(seed + i as u64, n, scale)).collect()
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn global_norm_matches_cpu() {
        let gpu = Gpu::new(0).expect("a GPU");
        let host = grads(1, 0.3);
        let dev: Vec<CudaSlice<f32>> = host.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
        let mut scratch = gpu.stream.alloc_zeros::<f64>(NORM_SCRATCH).unwrap();
        let views: Vec<CudaView<'_, f32>> = dev.iter().map(|g| g.as_view()).collect();
        let got = global_grad_norm_gpu(&gpu, &views, &mut scratch.as_view_mut()).unwrap();
        let want = crate::global_grad_norm(&host.iter().map(|g| g.as_slice()).collect::<Vec<_>>());
        // f64 sums on both sides in different orders; the f32 result rounds once.
        assert_close("global norm", &[got], &[want], 0.0, 1e-6);
        // The scratch is overwritten, not accumulated into, and the sum is deterministic: a second
        // call gives the same bits.
        let again = global_grad_norm_gpu(&gpu, &views, &mut scratch.as_view_mut()).unwrap();
        assert_eq!(again.to_bits(), got.to_bits(), "global norm, second call");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn no_gradients_have_norm_zero() {
        let gpu = Gpu::new(0).expect("a GPU");
        let mut scratch = gpu.stream.clone_htod(&vec![5.0f64; NORM_SCRATCH]).unwrap();
        assert_eq!(global_grad_norm_gpu(&gpu, &[], &mut scratch.as_view_mut()).unwrap(), 0.0);
        let mut long = gpu.stream.alloc_zeros::<f64>(NORM_SCRATCH + 1).unwrap();
        assert!(matches!(global_grad_norm_gpu(&gpu, &[], &mut long.as_view_mut()), Err(Error::Shape(_))));
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn clip_matches_cpu_when_clipping_and_when_not() {
        let gpu = Gpu::new(0).expect("a GPU");
        // The norm of LENGTHS' 812k values of scale 0.3 is about 150: max_norm 1 clips, 1e6 does not.
        for (seed, max_norm) in [(2u64, 1.0f32), (3, 1e6)] {
            let mut host = grads(seed, 0.3);
            let mut dev: Vec<CudaSlice<f32>> = host.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
            let mut scratch = gpu.stream.alloc_zeros::<f64>(NORM_SCRATCH).unwrap();
            let mut views: Vec<CudaViewMut<'_, f32>> = dev.iter_mut().map(|g| g.as_view_mut()).collect();
            let got = clip_grad_norm_gpu(&gpu, &mut views, &mut scratch.as_view_mut(), max_norm).unwrap();
            drop(views);
            let want =
                crate::clip_grad_norm(&mut host.iter_mut().map(|g| g.as_mut_slice()).collect::<Vec<_>>(), max_norm)
                    .unwrap();
            assert_close(&format!("max_norm {max_norm}: norm"), &[got], &[want], 0.0, 1e-5);
            for (i, (d, h)) in dev.iter().zip(&host).enumerate() {
                // The coefficient inherits the norm's relative error (< 1e-5), the multiply is exact-rounded.
                let what = format!("max_norm {max_norm}: grad {i} [{}]", h.len());
                assert_close(&what, &gpu.stream.clone_dtoh(d).unwrap(), h, 1e-12, 1e-5);
            }
        }
        let mut scratch = gpu.stream.alloc_zeros::<f64>(NORM_SCRATCH).unwrap();
        let e = clip_grad_norm_gpu(&gpu, &mut [], &mut scratch.as_view_mut(), 0.0);
        assert!(matches!(e, Err(crate::Error::Config(_))), "{e:?}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn scale_grads_multiplies_every_element() {
        let gpu = Gpu::new(0).expect("a GPU");
        let host = grads(4, 1.0);
        let mut dev: Vec<CudaSlice<f32>> = host.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
        let mut views: Vec<CudaViewMut<'_, f32>> = dev.iter_mut().map(|g| g.as_view_mut()).collect();
        scale_grads_gpu(&gpu, &mut views, 0.37).unwrap();
        drop(views);
        for (d, h) in dev.iter().zip(&host) {
            // One correctly rounded multiply on both sides: exact.
            let want: Vec<f32> = h.iter().map(|x| x * 0.37).collect();
            assert_eq!(gpu.stream.clone_dtoh(d).unwrap(), want);
        }
    }
}
