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
pub use clip::GradClip;
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

/// Tests: the two device optimizers behind one face, so that one harness steps either beside its
/// CPU twin.
#[cfg(test)]
pub(crate) trait DeviceOptimizer {
    type Cpu: crate::Optimizer;
    fn step(&mut self, gpu: &Gpu, params: &mut [GpuParam<'_>], lr: f64) -> crate::Result<()>;
    fn to_cpu(&self, gpu: &Gpu) -> crate::Result<Self::Cpu>;
    fn mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> crate::Result<()>;
    fn reserve_mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> crate::Result<()>;
    fn cpu_from_mirror(&self, m: &StateMirror) -> crate::Result<Self::Cpu>;
}

#[cfg(test)]
macro_rules! device_optimizer {
    ($dev:ty, $cpu:ty) => {
        impl DeviceOptimizer for $dev {
            type Cpu = $cpu;
            fn step(&mut self, gpu: &Gpu, params: &mut [GpuParam<'_>], lr: f64) -> crate::Result<()> {
                <$dev>::step(self, gpu, params, lr)
            }
            fn to_cpu(&self, gpu: &Gpu) -> crate::Result<$cpu> {
                <$dev>::to_cpu(self, gpu)
            }
            fn mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> crate::Result<()> {
                <$dev>::mirror(self, gpu, m)
            }
            fn reserve_mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> crate::Result<()> {
                <$dev>::reserve_mirror(self, gpu, m)
            }
            fn cpu_from_mirror(&self, m: &StateMirror) -> crate::Result<$cpu> {
                <$dev>::cpu_from_mirror(self, m)
            }
        }
    };
}
#[cfg(test)]
device_optimizer!(AdamWGpu, crate::AdamW);
#[cfg(test)]
device_optimizer!(AdamW8bitGpu, crate::AdamW8bit);

/// Tests: steps `cpu` and `dev` side by side five times (lr 1e-2 / step) on tensors of `lengths`
/// named `layer{i}.weight`, with initial values from `seed`, gradients `grad(step, i, n)` and every
/// second tensor exempt from decay. After steps 1 and 5 it checks that the device's values equal the
/// CPU's (rtol 1e-5: the kernels repeat the CPU's f32 operations with the same rounding, so equality
/// is expected; the tolerance leaves room for a compiler that rounds one operation differently,
/// without hiding a wrong formula, which errs by > 1e-3), that the pinned host mirror (what a GPU run
/// copies after each step) holds the state `to_cpu` reads, then calls `check(step, names, cpu,
/// device state)` for the optimizer-specific comparisons.
#[cfg(test)]
pub(crate) fn lockstep<D: DeviceOptimizer>(
    gpu: &Gpu,
    lengths: &[usize],
    seed: u64,
    grad: impl Fn(u64, usize, usize) -> Vec<f32>,
    cpu: &mut D::Cpu,
    dev: &mut D,
    mut check: impl FnMut(u64, &[String], &D::Cpu, &D::Cpu),
) {
    use crate::{Optimizer, Param};
    use oxtune_kernels::testing::{assert_close, randn};
    let names: Vec<String> = (0..lengths.len()).map(|i| format!("layer{i}.weight")).collect();
    let mut cpu_values: Vec<Vec<f32>> =
        lengths.iter().enumerate().map(|(i, &n)| randn(seed + i as u64, n, 1.0)).collect();
    let mut dev_values: Vec<CudaSlice<f32>> = cpu_values.iter().map(|v| gpu.stream.clone_htod(v).unwrap()).collect();
    for step in 1..=5u64 {
        let lr = 1e-2 / step as f64;
        let grads: Vec<Vec<f32>> = lengths.iter().enumerate().map(|(i, &n)| grad(step, i, n)).collect();
        let dev_grads: Vec<CudaSlice<f32>> = grads.iter().map(|g| gpu.stream.clone_htod(g).unwrap()).collect();
        let mut params: Vec<Param<'_>> = cpu_values
            .iter_mut()
            .zip(&grads)
            .zip(&names)
            .enumerate()
            .map(|(i, ((v, g), name))| Param { name, value: v, grad: g, weight_decay: i % 2 == 0 })
            .collect();
        cpu.step(&mut params, lr).unwrap();
        let mut gparams: Vec<GpuParam<'_>> = dev_values
            .iter_mut()
            .zip(&dev_grads)
            .zip(&names)
            .enumerate()
            .map(|(i, ((v, g), name))| GpuParam { name, value: v, grad: g, weight_decay: i % 2 == 0 })
            .collect();
        dev.step(gpu, &mut gparams, lr).unwrap();
        if step != 1 && step != 5 {
            continue;
        }
        for (i, name) in names.iter().enumerate() {
            let got = gpu.stream.clone_dtoh(&dev_values[i]).unwrap();
            assert_close(&format!("step {step}: {name} [{}]", lengths[i]), &got, &cpu_values[i], 1e-7, 1e-5);
        }
        let back = dev.to_cpu(gpu).unwrap();
        let mut m = StateMirror::default();
        dev.mirror(gpu, &mut m).unwrap();
        assert_same_state(&back, &dev.cpu_from_mirror(&m).unwrap());
        // A mirror reserved beforehand has the buffers the copy needs: the copy allocates none.
        let mut r = StateMirror::default();
        dev.reserve_mirror(gpu, &mut r).unwrap();
        assert_eq!(r.bytes(), m.bytes(), "step {step}: reserved bytes");
        assert_eq!(r.allocations(), 2, "step {step}: f32 and u8 buffers");
        dev.mirror(gpu, &mut r).unwrap();
        assert_eq!(r.allocations(), 2, "step {step}: the copy reallocated a reserved buffer");
        assert_same_state(&back, &dev.cpu_from_mirror(&r).unwrap());
        check(step, &names, cpu, &back);
    }
}
