//! The optimizers on the GPU: the same updates as [`crate::AdamW`] and [`crate::AdamW8bit`] with their states
//! in device memory, and the global gradient norm. The kernels sit next to their CPU references
//! (`src/adamw.cu`, `src/adamw8bit.cu`, `src/clip.cu`).
//!
//! Both optimizers compute every element with the CPU code's operations in the same order and rounding (the
//! kernels use explicitly rounded intrinsics, the step scalars come from the CPU code on the host), so they are
//! expected to match the CPU optimizers bit for bit; the tests allow the tolerances stated there.
//!
//! Checkpoints keep one file format: `to_cpu` returns the CPU optimizer, whose `save_state` writes the file,
//! and `from_cpu` uploads one filled by `load_state`.

mod adamw;
mod adamw8bit;
mod clip;
mod mirror;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use oxtune_kernels::Gpu;

pub use adamw::AdamWGpu;
pub use adamw8bit::AdamW8bitGpu;
pub use clip::{clip_grad_norm_gpu, global_grad_norm_gpu, scale_grads_gpu, NORM_SCRATCH};
pub use mirror::StateMirror;

pub(crate) const ADAMW_SRC: &str = include_str!("../adamw.cu");
pub(crate) const ADAMW8BIT_SRC: &str = include_str!("../adamw8bit.cu");
pub(crate) const CLIP_SRC: &str = include_str!("../clip.cu");

/// One trainable tensor on the device for an optimizer step (the GPU twin of [`crate::Param`]).
#[derive(Debug)]
pub struct GpuParam<'a> {
    /// Unique, stable key of the tensor (its optimizer state is stored under it).
    pub name: &'a str,
    pub value: &'a mut CudaSlice<f32>,
    pub grad: &'a CudaSlice<f32>,
    /// Whether decoupled weight decay applies (the HF Trainer exempts biases and norms).
    pub weight_decay: bool,
}

impl<'a> GpuParam<'a> {
    /// A parameter that receives weight decay.
    pub fn new(name: &'a str, value: &'a mut CudaSlice<f32>, grad: &'a CudaSlice<f32>) -> Self {
        Self { name, value, grad, weight_decay: true }
    }

    /// A parameter exempt from weight decay.
    pub fn without_decay(name: &'a str, value: &'a mut CudaSlice<f32>, grad: &'a CudaSlice<f32>) -> Self {
        Self { name, value, grad, weight_decay: false }
    }
}

fn check_params(params: &[GpuParam<'_>], lr: f64) -> crate::Result<()> {
    crate::check_step(params.iter().map(|p| (p.name, p.value.len(), p.grad.len())), lr)
}

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;

/// A grid-stride launch over `n > 0` elements; the grid is capped because every kernel loops.
fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).min(1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Uploads `host` into a new device buffer (used only when a state is created or imported).
fn upload<T: DeviceRepr>(gpu: &Gpu, host: &[T]) -> crate::Result<CudaSlice<T>> {
    Ok(gpu.stream.clone_htod(host).map_err(oxtune_kernels::Error::from)?)
}

/// Copies a device buffer to the host and waits for the copy.
fn download<T: DeviceRepr>(gpu: &Gpu, dev: &CudaSlice<T>) -> crate::Result<Vec<T>> {
    let host = gpu.stream.clone_dtoh(dev).map_err(oxtune_kernels::Error::from)?;
    gpu.stream.synchronize().map_err(oxtune_kernels::Error::from)?;
    Ok(host)
}

/// A zero-filled device buffer of `n` elements (a parameter's first step).
fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(gpu: &Gpu, n: usize) -> crate::Result<CudaSlice<T>> {
    Ok(gpu.stream.alloc_zeros(n).map_err(oxtune_kernels::Error::from)?)
}

/// Asserts that two optimizers hold the same state: their checkpoint files have the same tensors,
/// bit for bit, and the same metadata (compared as maps: its order in the file is not fixed).
#[cfg(test)]
pub(crate) fn assert_same_state(a: &dyn crate::Optimizer, b: &dyn crate::Optimizer) {
    use safetensors::SafeTensors;
    let dir = std::env::temp_dir();
    let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id());
    let path = |x: &str| dir.join(format!("oxtune-state-{x}-{tag}.safetensors"));
    let (pa, pb) = (path("a"), path("b"));
    a.save_state(&pa).unwrap();
    b.save_state(&pb).unwrap();
    let (x, y) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
    std::fs::remove_file(&pa).ok();
    std::fs::remove_file(&pb).ok();
    let (ma, mb) = (SafeTensors::read_metadata(&x).unwrap().1, SafeTensors::read_metadata(&y).unwrap().1);
    assert_eq!(ma.metadata(), mb.metadata(), "state metadata");
    let (ta, tb) = (SafeTensors::deserialize(&x).unwrap(), SafeTensors::deserialize(&y).unwrap());
    let mut names = ta.names();
    names.sort();
    let mut names_b = tb.names();
    names_b.sort();
    assert_eq!(names, names_b, "state tensors");
    for n in names {
        let (u, v) = (ta.tensor(n).unwrap(), tb.tensor(n).unwrap());
        assert_eq!((u.dtype(), u.shape()), (v.dtype(), v.shape()), "{n}");
        assert!(u.data() == v.data(), "state tensor {n} differs");
    }
}
