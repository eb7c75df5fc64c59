//! The GPU: context, stream, architecture, and kernels loaded from their CUBINs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaViewMut};
use cudarc::nvrtc::Ptx;

use crate::{nvrtc, Error, Result};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// The stream every op runs on: a stream of its own (not the legacy default stream, which
    /// cannot be captured into a CUDA graph), with cudarc's per-buffer event tracking off: the
    /// ops are ordered by this one stream, and work on other streams (the host copies of
    /// `pinned::CopyStream`) is ordered by explicit events.
    pub stream: Arc<CudaStream>,
    /// NVRTC target: `sm_90a` on Hopper (wgmma, TMA), `sm_XY` elsewhere.
    pub arch: String,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    /// Scratch of the ops that stage their operands (the bf16 splits of attention and of the
    /// MXFP4 expert GEMM's A): one buffer, reused call after call on the stream ([`Gpu::with_scratch`]).
    scratch: Mutex<Option<CudaSlice<u16>>>,
    /// Bumped whenever the shared scratch is replaced or freed ([`Gpu::scratch_generation`]).
    scratch_gen: AtomicU64,
}

/// Whether libcuda can be loaded (a GPU machine).
pub fn driver_available() -> bool {
    // SAFETY: only dlopen's the library; no driver call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A kernel that writes to an invalid address (after a delay it is given): CUDA_ERROR_ILLEGAL_ADDRESS,
/// a sticky error that poisons the context. Only for testing how callers survive a GPU fault
/// ([`Gpu::inject_fault`], [`Gpu::queue_fault`]).
pub const FAULT_SRC: &str = r#"
// Waits delay_ns of GPU time (the global timer), then writes to address 8, which the driver
// reports as an illegal address: a sticky error, as after a real fault.
extern "C" __global__ void oxtune_illegal_address(unsigned long long delay_ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < delay_ns);
    *(volatile int*)8 = 1;
}
"#;

impl Gpu {
    /// Provokes a sticky CUDA error (an illegal address) and returns it. Testing hook: after this
    /// every call on this context fails, as after a real fault.
    pub fn inject_fault(&self) -> Result<()> {
        self.queue_fault(std::time::Duration::ZERO)?;
        self.stream.synchronize()?;
        Ok(())
    }

    /// Queues the kernel of [`Gpu::inject_fault`] on the stream without waiting; it faults `delay`
    /// after it starts (the stream's later work waits behind it), so the error surfaces at a later
    /// call: with a delay longer than the calls that follow take to queue their work, at the first
    /// call that waits for the stream. Testing hook.
    pub fn queue_fault(&self, delay: std::time::Duration) -> Result<()> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        let f = self.function("fault", FAULT_SRC, "oxtune_illegal_address")?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: it is not: the kernel writes to address 8 on purpose, which the driver reports
        // as an illegal address (the context is poisoned, host memory is untouched).
        unsafe { self.stream.launch_builder(&f).arg(&ns).launch(cfg) }?;
        Ok(())
    }

    /// Opens device `ordinal`, or says clearly what is missing (never a panic from dlopen).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_available() {
            return Err(Error::NoDriver { searched: cudarc::get_lib_name_candidates("cuda") });
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = if (major, minor) == (9, 0) { "sm_90a".to_string() } else { format!("sm_{major}{minor}") };
        // SAFETY: every op of this crate and its users runs on `stream`; the one other stream
        // (`pinned::CopyStream`) orders its copies against it with explicit events. No buffer is
        // used by two streams without them, so cudarc's automatic events are not needed (and
        // they would record an event per kernel argument, also inside a CUDA graph capture).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Ok(Self {
            ctx,
            stream,
            arch,
            modules: Mutex::new(HashMap::new()),
            scratch: Mutex::new(None),
            scratch_gen: AtomicU64::new(0),
        })
    }

    /// Frees the shared scratch ([`Gpu::reserve_scratch`]; the next op that needs it allocates
    /// it again), waits for the stream, then returns the memory that freed buffers left in the
    /// device's stream-ordered pool to the driver (freed `CudaSlice`s stay reserved there
    /// otherwise), so that free memory is what the next allocation can have, e.g. between two
    /// engines.
    pub fn release_cached_memory(&self) -> Result<()> {
        use cudarc::driver::sys;
        *self.scratch_lock() = None;
        self.scratch_gen.fetch_add(1, Ordering::Relaxed);
        self.stream.synchronize()?;
        self.ctx.bind_to_thread()?;
        let mut pool = std::mem::MaybeUninit::uninit();
        // SAFETY: a pool handle out-parameter for this context's device; the handle is only used
        // for the trim below.
        unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), self.ctx.cu_device()) }.result()?;
        // SAFETY: the device's default pool, every allocation from it already completed or freed.
        unsafe { sys::cuMemPoolTrimTo(pool.assume_init(), 0) }.result()?;
        Ok(())
    }

    /// Makes the shared scratch hold at least `elems` u16 (2 bytes each), allocating now, so that
    /// ops that need at most that much allocate nothing when they run: a training engine reserves
    /// what its largest step needs (e.g. `ops::attention::scratch_elems`,
    /// `ops::gemm::mxfp4_scratch_elems`) when it is built. Without a reservation the scratch
    /// grows on first use.
    pub fn reserve_scratch(&self, elems: usize) -> Result<()> {
        self.grow_scratch(&mut self.scratch_lock(), elems, true)
    }

    /// A number that changes whenever the shared scratch is replaced (it grew) or freed: work
    /// recorded with its address (a CUDA graph) is stale once it differs.
    pub fn scratch_generation(&self) -> u64 {
        self.scratch_gen.load(Ordering::Relaxed)
    }

    /// Elements (u16) the shared scratch holds now.
    pub fn scratch_elems(&self) -> usize {
        self.scratch_lock().as_ref().map_or(0, |b| b.len())
    }

    /// The scratch's lock; the buffer holds no invariant, so a panic of an earlier holder is moot.
    fn scratch_lock(&self) -> MutexGuard<'_, Option<CudaSlice<u16>>> {
        self.scratch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces `scratch` by `elems` u16 (uninitialised) if it holds fewer. The shared buffer
    /// (`shared`) is not replaced while the stream is being captured into a CUDA graph: the graph
    /// would hold the old buffer's free and the new one's allocation, and the new buffer would not
    /// be backed if the graph were then dropped (the caller runs the work eagerly instead). An op's
    /// own buffer, allocated and freed inside the graph, is.
    fn grow_scratch(&self, scratch: &mut Option<CudaSlice<u16>>, elems: usize, shared: bool) -> Result<()> {
        if scratch.as_ref().is_none_or(|b| b.len() < elems) {
            if shared {
                use cudarc::driver::sys::CUstreamCaptureStatus;
                if self.stream.capture_status()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                    return Err(Error::Driver(format!(
                        "the operand scratch would grow to {elems} u16 while the stream is being captured into a \
                         CUDA graph (reserve it first: Gpu::reserve_scratch)"
                    )));
                }
                self.scratch_gen.fetch_add(1, Ordering::Relaxed);
            }
            // Freed in stream order: kernels queued on the old buffer finish first.
            *scratch = None;
            // SAFETY: every op writes the scratch before it reads it (with_scratch's contract).
            *scratch = Some(unsafe { self.stream.alloc::<u16>(elems.max(1)) }?);
        }
        Ok(())
    }

    /// Runs `f` with `elems` u16 of scratch on this stream, uninitialised: `f` must write what it
    /// reads and must not keep the view past its kernels (the next op reuses the memory, in
    /// stream order). The shared buffer grows if it is smaller; if it is in use (an op inside
    /// another, or another thread's op or [`Gpu::scratch_elems`] at that moment), `f` gets a
    /// buffer of its own, freed in stream order. `f` must not call [`Gpu::reserve_scratch`],
    /// [`Gpu::scratch_elems`] or [`Gpu::release_cached_memory`] (the lock is held: deadlock).
    /// The buffer holds no invariant, so a panic inside `f` does not disable it.
    pub(crate) fn with_scratch<R>(&self, elems: usize, f: impl FnOnce(CudaViewMut<'_, u16>) -> Result<R>) -> Result<R> {
        let mut scratch = match self.scratch.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let mut own = None;
                self.grow_scratch(&mut own, elems, false)?;
                return f(own.as_mut().expect("allocated above").slice_mut(0..elems));
            }
        };
        self.grow_scratch(&mut scratch, elems, true)?;
        f(scratch.as_mut().expect("allocated above").slice_mut(0..elems))
    }

    /// Kernel `function` of source `name` (compiled for this device, through the CUBIN cache).
    pub fn function(&self, name: &str, src: &str, function: &str) -> Result<CudaFunction> {
        let mut modules = self.modules.lock().expect("no thread panicked while loading a module");
        let module = match modules.get(name) {
            Some(m) => m.clone(),
            None => {
                let cubin = nvrtc::cached_cubin(name, src, &self.arch)?;
                let m = self.ctx.load_module(Ptx::from_binary(cubin))?;
                modules.insert(name.to_string(), m.clone());
                m
            }
        };
        Ok(module.load_function(function)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn scratch_is_reserved_reused_grown_and_never_shared_by_nested_ops() {
        let gpu = Gpu::new(0).expect("a GPU");
        gpu.reserve_scratch(1000).unwrap();
        assert_eq!(gpu.scratch_elems(), 1000);
        // Within the reservation: the same memory, no growth.
        let ptr = |v: &CudaViewMut<'_, u16>| {
            use cudarc::driver::DevicePtr;
            v.device_ptr(&gpu.stream).0
        };
        let first = gpu.with_scratch(600, |v| Ok(ptr(&v))).unwrap();
        let again = gpu.with_scratch(1000, |v| Ok(ptr(&v))).unwrap();
        assert_eq!(first, again, "the reserved buffer is reused");
        assert_eq!(gpu.scratch_elems(), 1000);
        // A nested op gets its own buffer: the outer one's contents survive the inner one's writes.
        let outer: Vec<u16> = (0..500).map(|i| (i * 7 + 3) as u16).collect();
        let kept = gpu
            .with_scratch(500, |mut v| {
                gpu.stream.memcpy_htod(&outer, &mut v)?;
                gpu.with_scratch(500, |mut w| {
                    assert_ne!(ptr(&w), ptr(&v), "a nested op must not get the buffer in use");
                    Ok(gpu.stream.memset_zeros(&mut w)?)
                })?;
                Ok(gpu.stream.clone_dtoh(&v)?)
            })
            .unwrap();
        assert_eq!(kept, outer);
        // Past the reservation it grows; releasing the cached memory frees it.
        gpu.with_scratch(3000, |_| Ok(())).unwrap();
        assert_eq!(gpu.scratch_elems(), 3000);
        gpu.release_cached_memory().unwrap();
        assert_eq!(gpu.scratch_elems(), 0);
    }
}
