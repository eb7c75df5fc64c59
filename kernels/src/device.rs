//! The GPU: context, stream, architecture, and kernels loaded from their CUBINs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::{nvrtc, Error, Result};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// NVRTC target: `sm_90a` on Hopper (wgmma, TMA), `sm_XY` elsewhere.
    pub arch: String,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
}

/// Whether libcuda can be loaded (a GPU machine).
pub fn driver_available() -> bool {
    // SAFETY: only dlopen's the library; no driver call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A kernel that writes to an invalid address: CUDA_ERROR_ILLEGAL_ADDRESS, a sticky error that
/// poisons the context. Only for testing how callers survive a GPU fault ([`Gpu::inject_fault`]).
pub const FAULT_SRC: &str = "extern \"C\" __global__ void oxtune_illegal_address() { *(volatile int*)8 = 1; }\n";

impl Gpu {
    /// Provokes a sticky CUDA error (an illegal address) and returns it. Testing hook: after this
    /// every call on this context fails, as after a real fault.
    pub fn inject_fault(&self) -> Result<()> {
        use cudarc::driver::LaunchConfig;
        let f = self.function("fault", FAULT_SRC, "oxtune_illegal_address")?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: it is not: the kernel writes to address 8 on purpose, which the driver reports
        // as an illegal address (the context is poisoned, host memory is untouched).
        unsafe { self.stream.launch_builder(&f).launch(cfg) }?;
        self.stream.synchronize()?;
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
        let stream = ctx.default_stream();
        Ok(Self { ctx, stream, arch, modules: Mutex::new(HashMap::new()) })
    }

    /// Waits for the stream, then returns the memory that freed buffers left in the device's
    /// stream-ordered pool to the driver (freed `CudaSlice`s stay reserved there otherwise), so
    /// that free memory is what the next allocation can have, e.g. between two engines.
    pub fn release_cached_memory(&self) -> Result<()> {
        use cudarc::driver::sys;
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
