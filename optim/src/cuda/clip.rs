//! Global-norm gradient clipping on the device ([`crate::clip_grad_norm`]'s semantics).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use oxtune_kernels::{Error, Gpu};

use super::{elementwise_config, CLIP_SRC, THREADS};
use crate::clip::{check_max_norm, clip_coef};

/// Blocks of the sum-of-squares kernel at most: enough to fill an H100 several times over while keeping the
/// f32 atomic additions (one per block) few.
const MAX_SUM_BLOCKS: usize = 1024;

/// The global L2 norm over all `grads`: squares summed on the device into `scratch` (`[1]` f32, overwritten),
/// one host read. Each block sums in f64; the block sums meet in one f32 atomic accumulator, so the last bits
/// depend on their order (the CPU [`crate::global_grad_norm`] sums per tensor in f64).
pub fn global_grad_norm_gpu(
    gpu: &Gpu,
    grads: &[CudaView<'_, f32>],
    scratch: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<f32> {
    if scratch.len() != 1 {
        return Err(Error::Shape(format!("global_grad_norm: scratch has {} elements, expected 1", scratch.len())));
    }
    gpu.stream.memset_zeros(scratch)?;
    let f = gpu.function("optim_clip", CLIP_SRC, "sum_squares_f32")?;
    for g in grads.iter().filter(|g| !g.is_empty()) {
        let n = g.len();
        let blocks = n.div_ceil(THREADS as usize).min(MAX_SUM_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let n64 = n as u64;
        // SAFETY: sum_squares_f32(float* acc, const float* x, unsigned long long n): acc holds 1 float (checked
        // above), x n floats; blockDim.x = 256 is a multiple of 32 as the kernel's reduction needs.
        unsafe { gpu.stream.launch_builder(&f).arg(&mut *scratch).arg(g).arg(&n64).launch(cfg) }?;
    }
    let mut total = [0.0f32];
    gpu.stream.memcpy_dtoh(scratch, &mut total)?;
    // A copy into pageable memory has completed when it returns; the sync makes that explicit.
    gpu.stream.synchronize()?;
    Ok(total[0].sqrt())
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
/// returns the pre-clip global norm. `scratch` is `[1]` f32 (see [`global_grad_norm_gpu`]); gradients are
/// left untouched when the coefficient is 1.
pub fn clip_grad_norm_gpu(
    gpu: &Gpu,
    grads: &mut [CudaViewMut<'_, f32>],
    scratch: &mut CudaViewMut<'_, f32>,
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
        let mut scratch = gpu.stream.alloc_zeros::<f32>(1).unwrap();
        let views: Vec<CudaView<'_, f32>> = dev.iter().map(|g| g.as_view()).collect();
        let got = global_grad_norm_gpu(&gpu, &views, &mut scratch.as_view_mut()).unwrap();
        let want = crate::global_grad_norm(&host.iter().map(|g| g.as_slice()).collect::<Vec<_>>());
        // Blocks sum in f64 like the CPU; their ~1200 totals meet in one f32 accumulator, whose rounding errors
        // (2^-24 each, partly cancelling) stay far below 1e-5 relative.
        assert_close("global norm", &[got], &[want], 0.0, 1e-5);
        // The scratch is overwritten, not accumulated into: a second call gives the same norm.
        let again = global_grad_norm_gpu(&gpu, &views, &mut scratch.as_view_mut()).unwrap();
        assert_close("global norm, second call", &[again], &[want], 0.0, 1e-5);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn no_gradients_have_norm_zero() {
        let gpu = Gpu::new(0).expect("a GPU");
        let mut scratch = gpu.stream.clone_htod(&[5.0f32]).unwrap();
        assert_eq!(global_grad_norm_gpu(&gpu, &[], &mut scratch.as_view_mut()).unwrap(), 0.0);
        let mut long = gpu.stream.alloc_zeros::<f32>(2).unwrap();
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
            let mut scratch = gpu.stream.alloc_zeros::<f32>(1).unwrap();
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
        let mut scratch = gpu.stream.alloc_zeros::<f32>(1).unwrap();
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
