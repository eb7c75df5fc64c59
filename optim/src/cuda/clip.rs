//! Global-norm gradient clipping on the device ([`crate::clip_grad_norm`]'s semantics), every tensor
//! in one launch per pass.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use oxtune_kernels::{Error, Gpu};

use super::{CLIP_SRC, THREADS};
use crate::clip::{check_max_norm, clip_coef};

/// Elements per chunk of the multi-tensor kernels (`CHUNK` in clip.cu): one block's share, and one
/// partial sum of the norm.
const CHUNK: usize = 32768;
/// Blocks of the multi-tensor kernels at most (they stride over the chunks).
const MAX_BLOCKS: usize = 8192;

/// The gradient norm and scaling over many tensors, each pass one launch whatever the number of
/// tensors (a LoRA adapter of gpt-oss-20b has ~300): the tensors' table (address, length, first
/// chunk) and the per-chunk partial sums live in device buffers allocated by the first call, grown
/// when a later call has more chunks or tensors, and the table is uploaded only when it changes.
pub struct GradClip {
    /// `[count, 3]` rows of the table last uploaded, as on the device.
    table: Vec<u64>,
    table_dev: Option<CudaSlice<u64>>,
    /// One f64 per chunk, then the accumulator.
    partials: Option<CudaSlice<f64>>,
}

impl Default for GradClip {
    fn default() -> Self {
        Self::new()
    }
}

/// The table rows of tensors given as (device address, length), empty ones left out, and their
/// chunk count.
fn table_of(tensors: &[(u64, usize)]) -> (Vec<u64>, usize) {
    let mut table = Vec::with_capacity(3 * tensors.len());
    let mut chunks = 0usize;
    for &(ptr, n) in tensors.iter().filter(|t| t.1 > 0) {
        table.extend([ptr, n as u64, chunks as u64]);
        chunks += n.div_ceil(CHUNK);
    }
    (table, chunks)
}

/// The multi-tensor kernels' grid: a block per chunk, at most [`MAX_BLOCKS`] (they stride).
fn chunk_grid(chunks: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (chunks.min(MAX_BLOCKS as u32), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl GradClip {
    /// No device memory yet: the first call allocates it.
    pub fn new() -> Self {
        Self { table: vec![], table_dev: None, partials: None }
    }

    /// Uploads the table of `tensors` (device address, length) if it differs from the last one and
    /// makes room for their chunks' partial sums; returns (tensors, chunks).
    fn prepare(&mut self, gpu: &Gpu, tensors: &[(u64, usize)]) -> oxtune_kernels::Result<(u32, u32)> {
        let (table, chunks) = table_of(tensors);
        let count = table.len() / 3;
        let too_many = |what: &str, n: usize| Error::Shape(format!("gradient clipping: {n} {what} exceed 2^32"));
        let chunks32 = u32::try_from(chunks).map_err(|_| too_many("chunks", chunks))?;
        let count32 = u32::try_from(count).map_err(|_| too_many("tensors", count))?;
        if self.partials.as_ref().is_none_or(|p| p.len() < chunks + 1) {
            self.partials = Some(gpu.stream.alloc_zeros::<f64>(chunks + 1)?);
        }
        if table != self.table || self.table_dev.is_none() {
            if self.table_dev.as_ref().is_none_or(|t| t.len() < table.len()) {
                self.table_dev = Some(gpu.stream.alloc_zeros::<u64>(table.len().max(3))?);
            }
            if let Some(dev) = self.table_dev.as_mut() {
                gpu.stream.memcpy_htod(&table, &mut dev.slice_mut(..table.len()))?;
            }
            self.table = table;
        }
        Ok((count32, chunks32))
    }

    /// The global L2 norm over all `grads`: squares summed in f64, one partial sum per chunk of
    /// 32,768 elements, then added in a fixed order by one block (no atomics: the same bits on every
    /// run), and one host read.
    pub fn norm(&mut self, gpu: &Gpu, grads: &[CudaView<'_, f32>]) -> oxtune_kernels::Result<f32> {
        // The addresses with their guards, held until the kernel is queued (they record its use of
        // the buffers when cudarc tracks streams).
        let guarded: Vec<_> = grads.iter().map(|g| (g.device_ptr(&gpu.stream), g.len())).collect();
        let tensors: Vec<(u64, usize)> = guarded.iter().map(|((p, _), n)| (*p, *n)).collect();
        let (count, chunks) = self.prepare(gpu, &tensors)?;
        if chunks == 0 {
            return Ok(0.0);
        }
        let squares = gpu.function("optim_clip", CLIP_SRC, "sum_squares_multi_f32")?;
        let gather = gpu.function("optim_clip", CLIP_SRC, "sum_partials_f64")?;
        let (Some(partials), Some(table)) = (self.partials.as_mut(), self.table_dev.as_ref()) else {
            unreachable!("prepare allocates both")
        };
        let n = chunks as usize;
        let (mut parts, mut acc) = partials.split_at_mut(n);
        let mut acc = acc.slice_mut(..1);
        gpu.stream.memset_zeros(&mut acc)?;
        let cfg = chunk_grid(chunks);
        // SAFETY: sum_squares_multi_f32(double* partials, const TensorRef* t, unsigned count, unsigned
        // chunks): the table holds `count` rows (address, length, first chunk) of live f32 device
        // buffers of this stream's context, borrowed by `grads` for this call (stream order keeps them
        // alive until the kernel ran: their memory is freed on the stream), their chunks numbered
        // 0..chunks in order; partials holds `chunks` doubles; blockDim 256, a multiple of 32.
        unsafe { gpu.stream.launch_builder(&squares).arg(&mut parts).arg(table).arg(&count).arg(&chunks).launch(cfg) }?;
        drop(guarded);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: sum_partials_f64(double* acc, const double* partials, unsigned count): acc holds 1
        // double, partials `chunks`, written just before on the same stream.
        unsafe { gpu.stream.launch_builder(&gather).arg(&mut acc).arg(&parts.as_view()).arg(&chunks).launch(one) }?;
        let mut total = [0.0f64];
        gpu.stream.memcpy_dtoh(&acc, &mut total)?;
        // A copy into pageable memory has completed when it returns; the sync makes that explicit.
        gpu.stream.synchronize()?;
        Ok(total[0].sqrt() as f32)
    }

    /// `g *= s` for every gradient, in one launch.
    pub fn scale(&mut self, gpu: &Gpu, grads: &mut [CudaViewMut<'_, f32>], s: f32) -> oxtune_kernels::Result<()> {
        self.write_each(gpu, grads, Some(s))
    }

    /// `g = 0` for every gradient, in one launch (instead of a memset per tensor).
    pub fn zero(&mut self, gpu: &Gpu, grads: &mut [CudaViewMut<'_, f32>]) -> oxtune_kernels::Result<()> {
        self.write_each(gpu, grads, None)
    }

    /// `g *= s` (`Some(s)`: scale_multi_f32) or `g = 0` (zero_multi_f32) for every gradient.
    fn write_each(
        &mut self,
        gpu: &Gpu,
        grads: &mut [CudaViewMut<'_, f32>],
        s: Option<f32>,
    ) -> oxtune_kernels::Result<()> {
        // As in norm, with write guards.
        let guarded: Vec<_> = grads
            .iter_mut()
            .map(|g| {
                let n = g.len();
                (g.device_ptr_mut(&gpu.stream), n)
            })
            .collect();
        let tensors: Vec<(u64, usize)> = guarded.iter().map(|((p, _), n)| (*p, *n)).collect();
        let (count, chunks) = self.prepare(gpu, &tensors)?;
        if chunks == 0 {
            return Ok(());
        }
        let kernel = if s.is_some() { "scale_multi_f32" } else { "zero_multi_f32" };
        let f = gpu.function("optim_clip", CLIP_SRC, kernel)?;
        let Some(table) = self.table_dev.as_ref() else { unreachable!("prepare allocates it") };
        let cfg = chunk_grid(chunks);
        let mut launch = gpu.stream.launch_builder(&f);
        launch.arg(table).arg(&count).arg(&chunks);
        if let Some(s) = &s {
            launch.arg(s);
        }
        // SAFETY: scale_multi_f32(const TensorRef* t, unsigned count, unsigned chunks, float s) and
        // zero_multi_f32(the same without s): the table rows are the f32 buffers of `grads`, mutably
        // borrowed for this call (stream order keeps them alive until the kernel ran), each written
        // only below its length; distinct tensors do not overlap (each view is a separate &mut
        // borrow).
        unsafe { launch.launch(cfg) }?;
        drop(guarded);
        Ok(())
    }

    /// [`crate::clip_grad_norm`] on the device: scales every gradient by `min(1, max_norm / (total +
    /// 1e-6))` and returns the pre-clip global norm; gradients are left untouched when the
    /// coefficient is 1.
    pub fn clip(&mut self, gpu: &Gpu, grads: &mut [CudaViewMut<'_, f32>], max_norm: f32) -> crate::Result<f32> {
        check_max_norm(max_norm)?;
        let views: Vec<CudaView<'_, f32>> = grads.iter().map(|g| g.as_view()).collect();
        let total = self.norm(gpu, &views)?;
        drop(views);
        let coef = clip_coef(total, max_norm);
        // x * 1 is x: skip the pass (a NaN coefficient is not 1 and still poisons the gradients, as in torch).
        if coef != 1.0 {
            self.scale(gpu, grads, coef)?;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use cudarc::driver::CudaSlice;
    use oxtune_kernels::testing::{assert_close, randn};

    use super::*;

    /// A gpt-oss LoRA pair (rank 8), odd, empty and single-element tensors, and one of many chunks.
    const LENGTHS: [usize; 6] = [8 * 2880, 2880 * 8, 17, 0, 1, 1024 * 256 * 3 + 5];

    fn grads(seed: u64, scale: f32) -> Vec<Vec<f32>> {
        LENGTHS.iter().enumerate().map(|(i, &n)| randn(seed + i as u64, n, scale)).collect()
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn global_norm_matches_cpu() {
        let gpu = Gpu::new(0).expect("a GPU");
        let mut host = grads(1, 0.3);
        // And one of more chunks than the kernels' 8,192 blocks (they loop), uniform in [-1, 1) from a
        // xorshift (268M values: faster than normal draws).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        host.push(
            (0..8192 * 32768 + 77)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect(),
        );
        let dev: Vec<CudaSlice<f32>> = host.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
        let mut clip = GradClip::new();
        let views: Vec<CudaView<'_, f32>> = dev.iter().map(|g| g.as_view()).collect();
        let got = clip.norm(&gpu, &views).unwrap();
        let want = crate::global_grad_norm(&host.iter().map(|g| g.as_slice()).collect::<Vec<_>>());
        // f64 sums on both sides in different orders; the f32 result rounds once.
        assert_close("global norm", &[got], &[want], 0.0, 1e-6);
        // The accumulator is reset, not accumulated into, and the sum is deterministic: a second
        // call (the table already on the device) and a new GradClip give the same bits.
        let again = clip.norm(&gpu, &views).unwrap();
        assert_eq!(again.to_bits(), got.to_bits(), "global norm, second call");
        assert_eq!(GradClip::new().norm(&gpu, &views).unwrap().to_bits(), got.to_bits(), "global norm, new buffers");
        // Fewer tensors after more: the table is replaced, the partial sums' room kept.
        let first = clip.norm(&gpu, &views[..1]).unwrap();
        let want1 = crate::global_grad_norm(&[host[0].as_slice()]);
        assert_close("global norm of the first tensor", &[first], &[want1], 0.0, 1e-6);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn no_gradients_have_norm_zero() {
        let gpu = Gpu::new(0).expect("a GPU");
        let empty = gpu.stream.alloc_zeros::<f32>(0).unwrap();
        let mut clip = GradClip::new();
        assert_eq!(clip.norm(&gpu, &[]).unwrap(), 0.0);
        assert_eq!(clip.norm(&gpu, &[empty.as_view()]).unwrap(), 0.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn clip_matches_cpu_when_clipping_and_when_not() {
        let gpu = Gpu::new(0).expect("a GPU");
        // The norm of LENGTHS' 812k values of scale 0.3 is about 150: max_norm 1 clips, 1e6 does not.
        for (seed, max_norm) in [(2u64, 1.0f32), (3, 1e6)] {
            let mut host = grads(seed, 0.3);
            let mut dev: Vec<CudaSlice<f32>> = host.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
            let mut views: Vec<CudaViewMut<'_, f32>> = dev.iter_mut().map(|g| g.as_view_mut()).collect();
            let got = GradClip::new().clip(&gpu, &mut views, max_norm).unwrap();
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
        let e = GradClip::new().clip(&gpu, &mut [], 0.0);
        assert!(matches!(e, Err(crate::Error::Config(_))), "{e:?}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn scale_grads_multiplies_every_element() {
        let gpu = Gpu::new(0).expect("a GPU");
        let host = grads(4, 1.0);
        let mut dev: Vec<CudaSlice<f32>> = host.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
        let mut views: Vec<CudaViewMut<'_, f32>> = dev.iter_mut().map(|g| g.as_view_mut()).collect();
        GradClip::new().scale(&gpu, &mut views, 0.37).unwrap();
        drop(views);
        for (d, h) in dev.iter().zip(&host) {
            // One correctly rounded multiply on both sides: exact.
            let want: Vec<f32> = h.iter().map(|x| x * 0.37).collect();
            assert_eq!(gpu.stream.clone_dtoh(d).unwrap(), want);
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn zero_grads_zeroes_every_element_of_the_listed_tensors_only() {
        let gpu = Gpu::new(0).expect("a GPU");
        // NaN and infinity included: zeroing is not a multiply by 0.
        let mut host = grads(5, 1.0);
        host[0][3] = f32::NAN;
        host[5][100] = f32::INFINITY;
        let mut dev: Vec<CudaSlice<f32>> = host.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
        let (listed, kept) = dev.split_at_mut(5);
        let mut views: Vec<CudaViewMut<'_, f32>> = listed.iter_mut().map(|g| g.as_view_mut()).collect();
        GradClip::new().zero(&gpu, &mut views).unwrap();
        drop(views);
        for (i, d) in listed.iter().enumerate() {
            assert!(gpu.stream.clone_dtoh(d).unwrap().iter().all(|&x| x == 0.0), "grad {i} not zeroed");
        }
        let last = gpu.stream.clone_dtoh(&kept[0]).unwrap();
        assert!(last[100].is_infinite() && last[..100] == host[5][..100], "a tensor not listed was written");
    }
}
