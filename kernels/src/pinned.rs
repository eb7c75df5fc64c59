//! [`PinnedBuf`]: page-locked host memory that device buffers are copied into at full PCIe speed
//! (a pageable copy goes through the driver's staging buffer at a fraction of it), readable
//! without a CUDA call: every copy by its own methods has completed when the method returns, so
//! its contents stay readable after the context has failed (a sticky error), which is what a
//! checkpoint saved after a GPU fault needs. [`CopyStream`] queues such copies on a second stream
//! instead, so that they overlap the compute stream's work.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::{Error, Gpu, Result};

/// `len` values of `T` in page-locked host memory (zero-initialised). Holds its context, which
/// the pages belong to, until it is dropped.
pub struct PinnedBuf<T: DeviceRepr> {
    ptr: *mut T,
    len: usize,
    /// The device's address of the pages when they are mapped ([`PinnedBuf::new_mapped`]).
    device: Option<u64>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer owns its allocation like a Vec<T>; every write goes through `&mut self`.
unsafe impl<T: DeviceRepr + Send> Send for PinnedBuf<T> {}
// SAFETY: shared access only reads.
unsafe impl<T: DeviceRepr + Sync> Sync for PinnedBuf<T> {}

impl<T: DeviceRepr + Copy + Default> PinnedBuf<T> {
    /// Allocates `len` values (at least one byte is allocated) on `gpu`'s context.
    pub fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        Self::alloc(gpu, len, false)
    }

    /// As [`PinnedBuf::new`], mapped into the device's address space as well: kernels read it
    /// through [`PinnedBuf::device_address`] over the bus (zero-copy), e.g. the few rows of a large
    /// table that a step needs, without a copy of the table on the device.
    pub fn new_mapped(gpu: &Gpu, len: usize) -> Result<Self> {
        Self::alloc(gpu, len, true)
    }

    fn alloc(gpu: &Gpu, len: usize, mapped: bool) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Shape(format!("pinned buffer of {len} values overflows")))?;
        gpu.ctx.bind_to_thread()?;
        let flags = if mapped { sys::CU_MEMHOSTALLOC_DEVICEMAP } else { 0 };
        // SAFETY: cuMemHostAlloc (pinned for this context, cached, host-readable; with DEVICEMAP
        // also mapped for the device); the pointer is checked non-null and suitably aligned
        // (page-aligned by the driver) and the memory is initialised before any read.
        let ptr = unsafe { result::malloc_host(bytes.max(1), flags) }? as *mut T;
        if ptr.is_null() || !ptr.is_aligned() {
            return Err(Error::Driver(format!("cuMemHostAlloc({bytes}) returned an unusable pointer")));
        }
        let mut buf = Self { ptr, len, device: None, ctx: gpu.ctx.clone() };
        if mapped {
            let mut dptr: sys::CUdeviceptr = 0;
            // SAFETY: an out-parameter for the device address of our mapped allocation (flags 0,
            // as the driver requires); on failure `buf` frees the pages.
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr as *mut std::ffi::c_void, 0) }.result()?;
            buf.device = Some(dptr);
        }
        // SAFETY: `ptr` points to at least `len` values of T, exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }.fill(T::default());
        Ok(buf)
    }

    /// The device's address of the buffer when it was allocated by [`PinnedBuf::new_mapped`].
    pub fn device_address(&self) -> Option<u64> {
        self.device
    }

    /// The values, to fill. No kernel or copy may be using the buffer meanwhile: `&mut self` keeps
    /// this crate's copies out, and a kernel that reads it through [`PinnedBuf::device_address`]
    /// must have completed (its caller's contract).
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `ptr` holds `len` initialised values, exclusively borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised values; no copy into them is in flight (every
        // copying method synchronises before returning and needs `&mut self`; copies queued by
        // CopyStream::download are complete or stopped before the buffer is read, by its contract).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Copies `srcs` one after the other into the buffer from its start, on `gpu`'s stream (in
    /// order after the work already queued there), and waits for them. Returns the values
    /// written; fails (with nothing guaranteed about the buffer's contents) if they do not fit or
    /// a copy fails.
    pub fn download(&mut self, gpu: &Gpu, srcs: &[CudaView<'_, T>]) -> Result<usize> {
        let stream = &gpu.stream;
        // SAFETY: the stream is synchronised below before `&mut self` is released.
        let queued = unsafe { self.queue_download(gpu, srcs, stream.cu_stream()) };
        // Even when queueing failed, wait for what was queued: nothing may still write into the
        // buffer once this returns.
        let synced = stream.synchronize();
        let total = queued?;
        synced?;
        Ok(total)
    }

    /// Queues copies of `srcs`, one after the other, into the buffer from its start on `stream`
    /// without waiting. Returns the values queued.
    ///
    /// # Safety
    /// `stream` belongs to `gpu`'s context, and until it has been synchronised (or the context has
    /// failed) the buffer is neither read, written nor dropped, and the sources are neither
    /// written nor freed.
    unsafe fn queue_download(&mut self, gpu: &Gpu, srcs: &[CudaView<'_, T>], stream: sys::CUstream) -> Result<usize> {
        let (copies, total) = self.copies(gpu, srcs)?;
        for c in &copies {
            // SAFETY: the caller keeps both ranges from other users until the stream is synchronised.
            unsafe { c.queue(stream) }?;
        }
        Ok(total)
    }

    /// The copies of `srcs`, one after the other, into the buffer from its start (checked to fit),
    /// and the values they copy.
    fn copies(&mut self, gpu: &Gpu, srcs: &[CudaView<'_, T>]) -> Result<(Vec<HostCopy>, usize)> {
        let total: usize = srcs.iter().map(|s| s.len()).sum();
        if total > self.len {
            return Err(Error::Shape(format!("pinned buffer of {} values, {total} to copy", self.len)));
        }
        gpu.ctx.bind_to_thread()?;
        let size = std::mem::size_of::<T>();
        let mut at = 0;
        let mut out = Vec::with_capacity(srcs.len());
        for src in srcs.iter().filter(|s| !s.is_empty()) {
            let (dptr, _record) = src.device_ptr(&gpu.stream);
            // `at + len <= total <= self.len`: inside the allocation.
            out.push(HostCopy { dst: self.ptr.wrapping_add(at) as u64, src: dptr, bytes: src.len() * size });
            at += src.len();
        }
        Ok((out, total))
    }
}

/// One device-to-host copy: `bytes` from device address `src` to host address `dst`.
struct HostCopy {
    dst: u64,
    src: sys::CUdeviceptr,
    bytes: usize,
}

impl HostCopy {
    /// Queues the copy on `stream`.
    ///
    /// # Safety
    /// The copy came from [`PinnedBuf::copies`] (a device range and a range of that buffer's
    /// allocation, `bytes` each, on the stream's context); neither range is used by anything else
    /// until the stream is synchronised.
    unsafe fn queue(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { sys::cuMemcpyDtoHAsync_v2(self.dst as *mut std::ffi::c_void, self.src, self.bytes, stream) }
            .result()?;
        Ok(())
    }
}

impl<T: DeviceRepr + Copy + Default> PinnedBuf<T> {
    /// Copies the buffer's first `dst.len()` values into `dst` on `gpu`'s stream (after the work
    /// queued there) and waits for the copy.
    pub fn upload(&self, gpu: &Gpu, dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        let n = dst.len();
        if n > self.len {
            return Err(Error::Shape(format!("pinned buffer of {} values, {n} to copy", self.len)));
        }
        if n == 0 {
            return Ok(());
        }
        let stream = &gpu.stream;
        gpu.ctx.bind_to_thread()?;
        let (dptr, _record) = dst.device_ptr_mut(stream);
        // SAFETY: `dptr` is a device view of `n` values of T on this context; the source is the
        // first `n` initialised values of our allocation, which `&self` keeps alive and the
        // synchronisation below keeps unread after return.
        unsafe { result::memcpy_htod_async(dptr, &self.as_slice()[..n], stream.cu_stream()) }?;
        stream.synchronize()?;
        Ok(())
    }
}

impl<T: DeviceRepr> Drop for PinnedBuf<T> {
    fn drop(&mut self) {
        if self.device.is_some() {
            // A kernel may still read mapped pages through their device address: let every queued
            // one finish first (a failed context reports an error here, and nothing runs any more).
            let _ = self.ctx.synchronize();
        }
        // SAFETY: `ptr` came from cuMemHostAlloc in `ctx` (kept alive by the Arc) and is freed
        // once; a failure (a dead context) leaks the pages until the process exits, which is all
        // that can be done.
        let _ = self.ctx.bind_to_thread();
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// A second stream for copies from the device into [`PinnedBuf`]s that overlap the compute
/// stream's work (a copy engine runs them while the kernels run), with the two events that order
/// it against the compute stream. It is a raw driver stream, not a cudarc `CudaStream`, and
/// [`Gpu::new`] turns cudarc's event tracking off (no event recorded per kernel argument): the
/// ordering is the caller's, through [`CopyStream::after_compute`] and
/// [`CopyStream::compute_waits`].
pub struct CopyStream {
    /// Copies queued by [`CopyStream::download`] and not yet submitted ([`CopyStream::flush`]).
    queued: Vec<HostCopy>,
    /// Whether the driver has `cuMemcpyBatchAsync_v2` (CUDA 13): the queued copies go as one call.
    batch: bool,
    device: i32,
    stream: sys::CUstream,
    /// Recorded on the compute stream: what the next copies wait for.
    ready: sys::CUevent,
    /// Recorded on this stream after the queued copies: what the compute stream can wait for.
    done: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: the handles are plain driver handles, usable from any thread that binds the context
// (every method does); `&mut self` guards the queueing.
unsafe impl Send for CopyStream {}
// SAFETY: shared access only waits on the stream.
unsafe impl Sync for CopyStream {}

impl CopyStream {
    /// A non-blocking stream (no implicit synchronisation with the compute stream) on `gpu`'s
    /// context.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        gpu.ctx.bind_to_thread()?;
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)?;
        // SAFETY (both cleanups): handles just created here and not yet shared.
        let ready = result::event::create(flags).inspect_err(|_| unsafe {
            let _ = result::stream::destroy(stream);
        })?;
        let done = result::event::create(flags).inspect_err(|_| unsafe {
            let _ = result::event::destroy(ready);
            let _ = result::stream::destroy(stream);
        })?;
        let mut version = 0;
        // SAFETY: an out-parameter for the driver's CUDA version.
        let batch = unsafe { sys::cuDriverGetVersion(&mut version) }.result().is_ok() && version >= 13000;
        let device = gpu.ctx.ordinal() as i32;
        Ok(Self { queued: vec![], batch, device, stream, ready, done, ctx: gpu.ctx.clone() })
    }

    /// Makes the copies queued next wait for everything queued on `gpu`'s stream so far.
    pub fn after_compute(&mut self, gpu: &Gpu) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: both events and both streams are live handles of this context.
        unsafe {
            result::event::record(self.ready, gpu.stream.cu_stream())?;
            result::stream::wait_event(self.stream, self.ready, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)?;
        }
        Ok(())
    }

    /// Queues copies of `srcs`, one after the other, into `buf` from its start (see
    /// [`PinnedBuf::download`]) on this stream, without waiting: they are submitted, in one driver
    /// call with the others queued since, by the next [`CopyStream::flush`] (or `finish`), and run
    /// in any order among those, after everything flushed before. Returns the values queued.
    ///
    /// # Safety
    /// Until [`CopyStream::synchronize`] has returned (or the context has failed), `buf` is neither
    /// read, written nor dropped, and the sources are neither written nor freed: the compute
    /// stream's work that writes them must wait for [`CopyStream::compute_waits`].
    pub unsafe fn download<T: DeviceRepr + Copy + Default>(
        &mut self,
        gpu: &Gpu,
        buf: &mut PinnedBuf<T>,
        srcs: &[CudaView<'_, T>],
    ) -> Result<usize> {
        let (copies, total) = buf.copies(gpu, srcs)?;
        self.queued.extend(copies);
        Ok(total)
    }

    /// Submits the queued copies on this stream: one `cuMemcpyBatchAsync` (a driver call per copy
    /// would cost the host ~4 µs each, and a step copies hundreds of tensors), or one copy at a
    /// time on a driver older than CUDA 13.
    pub fn flush(&mut self) -> Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        let copies = std::mem::take(&mut self.queued);
        if self.batch && copies.len() > 1 {
            let mut dsts: Vec<sys::CUdeviceptr> = copies.iter().map(|c| c.dst).collect();
            let mut srcs: Vec<sys::CUdeviceptr> = copies.iter().map(|c| c.src).collect();
            let mut sizes: Vec<usize> = copies.iter().map(|c| c.bytes).collect();
            let loc = |type_, id| sys::CUmemLocation { type_, id };
            let mut attrs = sys::CUmemcpyAttributes {
                // The sources are written by the compute stream's work this stream waits for.
                srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
                srcLocHint: loc(sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, self.device),
                dstLocHint: loc(sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, 0),
                flags: sys::CUmemcpyFlags::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE as u32,
            };
            let mut attr_idx = [0usize];
            // SAFETY: `count` entries in each array; every copy is a device range of this context
            // into pinned host memory of the same size (PinnedBuf::copies), kept alive and unread
            // by `download`'s contract; one attribute entry, applying from copy 0.
            let r = unsafe {
                sys::cuMemcpyBatchAsync_v2(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    copies.len(),
                    &mut attrs,
                    attr_idx.as_mut_ptr(),
                    1,
                    self.stream,
                )
            };
            if r.result().is_ok() {
                return Ok(());
            }
            // Not available after all: one copy at a time from now on (the data is the same if
            // some of the batch was queued).
            self.batch = false;
        }
        for c in &copies {
            // SAFETY: as above, one copy at a time.
            unsafe { c.queue(self.stream) }?;
        }
        Ok(())
    }

    /// Submits the queued copies ([`CopyStream::flush`]) and marks the end of the copies so far:
    /// [`CopyStream::compute_waits`] waits for them.
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        // SAFETY: a live event and stream of this context.
        unsafe { result::event::record(self.done, self.stream) }?;
        Ok(())
    }

    /// Makes the work queued next on `gpu`'s stream wait for the copies before the last
    /// [`CopyStream::finish`] (on the device: the host does not wait).
    pub fn compute_waits(&self, gpu: &Gpu) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: a live event of this context and the compute stream.
        unsafe {
            result::stream::wait_event(
                gpu.stream.cu_stream(),
                self.done,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// Waits for every copy queued on this stream; fails when one failed (or the context did).
    /// The wait happens even when binding the context reports an error recorded earlier, so that
    /// an `Err` never leaves copies running.
    pub fn synchronize(&self) -> Result<()> {
        let bound = self.ctx.bind_to_thread();
        // SAFETY: a live stream of this context (the handle carries its context).
        let synced = unsafe { result::stream::synchronize(self.stream) };
        bound?;
        synced?;
        Ok(())
    }

    /// Drops the copies queued and not yet submitted (after an error while queueing them).
    pub fn discard_queued(&mut self) {
        self.queued.clear();
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        // Copies still queued write into buffers their owners are about to free: wait for them
        // (a failed context has stopped them). Nothing more can be done about an error here.
        // Copies never submitted are dropped.
        let _ = self.synchronize();
        // SAFETY: the handles were created in `new` and are destroyed once.
        unsafe {
            let _ = result::event::destroy(self.ready);
            let _ = result::event::destroy(self.done);
            let _ = result::stream::destroy(self.stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use cudarc::driver::CudaSlice;

    use super::*;
    use crate::testing::randn;

    /// Tensors of the lengths a LoRA step copies (odd ones and an empty one included).
    fn tensors(gpu: &Gpu, seed: u64) -> (Vec<Vec<f32>>, Vec<CudaSlice<f32>>) {
        let host: Vec<Vec<f32>> = [8 * 2880, 0, 17, 1, 5760 * 8, 3]
            .iter()
            .enumerate()
            .map(|(i, &n)| randn(seed + i as u64, n, 1.0))
            .collect();
        let dev = host.iter().map(|h| gpu.stream.clone_htod(h).unwrap()).collect();
        (host, dev)
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn downloads_land_in_order_and_too_much_is_an_error() {
        let gpu = Gpu::new(0).expect("a GPU");
        let (host, dev) = tensors(&gpu, 1);
        let total: usize = host.iter().map(Vec::len).sum();
        let views: Vec<CudaView<'_, f32>> = dev.iter().map(|d| d.as_view()).collect();
        let mut buf = PinnedBuf::new(&gpu, total + 5).unwrap();
        assert_eq!(buf.download(&gpu, &views).unwrap(), total);
        assert_eq!(&buf.as_slice()[..total], host.concat().as_slice());
        assert!(buf.as_slice()[total..].iter().all(|&x| x == 0.0), "past the copies: untouched zeros");
        let mut small = PinnedBuf::new(&gpu, total - 1).unwrap();
        let e = small.download(&gpu, &views).unwrap_err().to_string();
        assert!(e.contains(&format!("{} values, {total} to copy", total - 1)), "{e}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn copy_stream_batches_after_the_compute_stream_and_before_its_next_work() {
        let gpu = Gpu::new(0).expect("a GPU");
        let mut copy = CopyStream::new(&gpu).unwrap();
        println!("cuMemcpyBatchAsync: {}", if copy.batch { "used" } else { "not available (one copy at a time)" });
        // The small tensors and one of 64 MB, whose copy over PCIe (milliseconds) outlasts the
        // device-to-device rewrite of every tensor (microseconds) many times over.
        let (mut host, mut dev) = tensors(&gpu, 10);
        host.push(randn(20, 1 << 24, 1.0));
        dev.push(gpu.stream.clone_htod(&host[host.len() - 1]).unwrap());
        let total: usize = host.iter().map(Vec::len).sum();
        // Each round's values, on the device beforehand: the compute stream rewrites the tensors
        // with device copies.
        let rounds = 3;
        let want: Vec<Vec<f32>> =
            (0..rounds).map(|r| host.iter().flat_map(|h| h.iter().map(move |x| x + r as f32)).collect()).collect();
        let srcs: Vec<Vec<CudaSlice<f32>>> = want
            .iter()
            .map(|w| {
                let mut at = 0;
                host.iter()
                    .map(|h| {
                        at += h.len();
                        gpu.stream.clone_htod(&w[at - h.len()..at]).unwrap()
                    })
                    .collect()
            })
            .collect();
        gpu.stream.synchronize().unwrap();
        let mut bufs: Vec<PinnedBuf<f32>> = (0..rounds).map(|_| PinnedBuf::new(&gpu, total).unwrap()).collect();
        // No host wait between the rounds: only the device-side orderings keep them apart. Round
        // r + 1's rewrite waits for round r's copies (compute_waits), and round r's copies wait for
        // round r's rewrite (after_compute); without the first, the rewrite would change the
        // tensors while the 64 MB copy still reads them.
        for (r, buf) in bufs.iter_mut().enumerate() {
            copy.compute_waits(&gpu).unwrap();
            for (d, s) in dev.iter_mut().zip(&srcs[r]) {
                gpu.stream.memcpy_dtod(s, d).unwrap();
            }
            copy.after_compute(&gpu).unwrap();
            let views: Vec<CudaView<'_, f32>> = dev.iter().map(|d| d.as_view()).collect();
            // SAFETY: the buffers are read only after synchronize below; the tensors are rewritten
            // only after compute_waits, the sources never.
            let n = unsafe { copy.download(&gpu, buf, &views) }.unwrap();
            assert_eq!(n, total);
            copy.finish().unwrap();
        }
        copy.synchronize().unwrap();
        for (r, buf) in bufs.iter().enumerate() {
            assert!(buf.as_slice() == want[r].as_slice(), "round {r}: the copy does not hold the round's values");
        }
    }
}
