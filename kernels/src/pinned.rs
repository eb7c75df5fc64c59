//! [`PinnedBuf`]: page-locked host memory that device buffers are copied into at full PCIe speed
//! (a pageable copy goes through the driver's staging buffer at a fraction of it), readable at any
//! time without a CUDA call: every copy into it has completed when the copying method returns, so
//! its contents stay readable after the context has failed (a sticky error), which is what a
//! checkpoint saved after a GPU fault needs.

use std::sync::Arc;

use cudarc::driver::{result, CudaContext, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::{Error, Gpu, Result};

/// `len` values of `T` in page-locked host memory (zero-initialised). Holds its context, which
/// the pages belong to, until it is dropped.
pub struct PinnedBuf<T: DeviceRepr> {
    ptr: *mut T,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer owns its allocation like a Vec<T>; every write goes through `&mut self`.
unsafe impl<T: DeviceRepr + Send> Send for PinnedBuf<T> {}
// SAFETY: shared access only reads.
unsafe impl<T: DeviceRepr + Sync> Sync for PinnedBuf<T> {}

impl<T: DeviceRepr + Copy + Default> PinnedBuf<T> {
    /// Allocates `len` values (at least one byte is allocated) on `gpu`'s context.
    pub fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Shape(format!("pinned buffer of {len} values overflows")))?;
        gpu.ctx.bind_to_thread()?;
        // SAFETY: cuMemHostAlloc with no flags (pinned for this context, cached, host-readable);
        // the pointer is checked non-null and suitably aligned (page-aligned by the driver) and
        // the memory is initialised before any read.
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }? as *mut T;
        if ptr.is_null() || !ptr.is_aligned() {
            return Err(Error::Driver(format!("cuMemHostAlloc({bytes}) returned an unusable pointer")));
        }
        // SAFETY: `ptr` points to at least `len` values of T, exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }.fill(T::default());
        Ok(Self { ptr, len, ctx: gpu.ctx.clone() })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised values; no copy into them is in flight (every
        // copying method synchronises before returning and needs `&mut self`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Copies `srcs` one after the other into the buffer from its start, on `gpu`'s stream (in
    /// order after the work already queued there), and waits for them. Returns the values
    /// written; fails (with nothing guaranteed about the buffer's contents) if they do not fit or
    /// a copy fails.
    pub fn download(&mut self, gpu: &Gpu, srcs: &[CudaView<'_, T>]) -> Result<usize> {
        let total: usize = srcs.iter().map(|s| s.len()).sum();
        if total > self.len {
            return Err(Error::Shape(format!("pinned buffer of {} values, {total} to copy", self.len)));
        }
        let stream = &gpu.stream;
        gpu.ctx.bind_to_thread()?;
        let mut at = 0;
        let mut queued = Ok(());
        for src in srcs {
            let n = src.len();
            if n == 0 {
                continue;
            }
            let (dptr, _record) = src.device_ptr(stream);
            // SAFETY: the destination is `n` values of our allocation (bounds checked above);
            // `&mut self` keeps every reader away until the stream is synchronised below.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), n) };
            // SAFETY: `dptr` is the start of a device view of `n` values of T on this context.
            queued = unsafe { result::memcpy_dtoh_async(dst, dptr, stream.cu_stream()) };
            if queued.is_err() {
                break;
            }
            at += n;
        }
        // Even when queueing failed, wait for what was queued: nothing may still write into the
        // buffer once this returns.
        let synced = stream.synchronize();
        queued?;
        synced?;
        Ok(total)
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
        // SAFETY: `ptr` came from cuMemHostAlloc in `ctx` (kept alive by the Arc) and is freed
        // once; a failure (a dead context) leaks the pages until the process exits, which is all
        // that can be done.
        let _ = self.ctx.bind_to_thread();
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}
