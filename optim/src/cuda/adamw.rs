//! [`AdamWGpu`]: torch AdamW with fp32 moments on the device.

use std::collections::BTreeMap;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use oxtune_kernels::pinned::CopyStream;
use oxtune_kernels::Gpu;

use super::mirror::{Cursor, Entry, StateMirror};
use super::{check_params, download, elementwise_config, upload, zeros, GpuParam, ADAMW_SRC};
use crate::adamw::{AdamState, StepScalars};
use crate::{state, AdamW, AdamWConfig, Result};

/// fp32 moments of one tensor on the device.
pub(crate) struct DeviceAdamState {
    pub step: u64,
    pub exp_avg: CudaSlice<f32>,
    pub exp_avg_sq: CudaSlice<f32>,
}

impl DeviceAdamState {
    pub fn zeros(gpu: &Gpu, n: usize) -> Result<Self> {
        Ok(Self { step: 0, exp_avg: zeros(gpu, n)?, exp_avg_sq: zeros(gpu, n)? })
    }

    pub fn upload(gpu: &Gpu, st: &AdamState) -> Result<Self> {
        Ok(Self { step: st.step, exp_avg: upload(gpu, &st.exp_avg)?, exp_avg_sq: upload(gpu, &st.exp_avg_sq)? })
    }

    pub fn download(&self, gpu: &Gpu) -> Result<AdamState> {
        Ok(AdamState {
            step: self.step,
            exp_avg: download(gpu, &self.exp_avg)?,
            exp_avg_sq: download(gpu, &self.exp_avg_sq)?,
        })
    }

    pub fn len(&self) -> usize {
        self.exp_avg.len()
    }

    pub fn bytes(&self) -> usize {
        self.exp_avg.num_bytes() + self.exp_avg_sq.num_bytes()
    }
}

/// AdamW ([`crate::AdamW`]'s update) with its states on the device, keyed by parameter name.
pub struct AdamWGpu {
    config: AdamWConfig,
    states: BTreeMap<String, DeviceAdamState>,
}

impl AdamWGpu {
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, states: BTreeMap::new() })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken for `name` (0 before its first step).
    pub fn step_count(&self, name: &str) -> u64 {
        self.states.get(name).map_or(0, |s| s.step)
    }

    /// Updates every parameter in place from its gradient with learning rate `lr`, as [`crate::AdamW`] does.
    /// Nothing is modified if any parameter is invalid (gradient length, duplicate name, state of another
    /// size). A parameter's moments are allocated on its first step (all of that step's before any update).
    pub fn step(&mut self, gpu: &Gpu, params: &mut [GpuParam<'_>], lr: f64) -> Result<()> {
        check_params(params, lr)?;
        for p in params.iter() {
            if let Some(st) = self.states.get(p.name) {
                state::check_state_len(p.name, st.len(), p.value.len())?;
            }
        }
        // Loading the kernel can fail (NVRTC); do it before anything is modified.
        gpu.function("optim_adamw", ADAMW_SRC, "adamw_step_f32")?;
        let mut fresh = Vec::new();
        for p in params.iter().filter(|p| !self.states.contains_key(p.name)) {
            fresh.push((p.name.to_string(), DeviceAdamState::zeros(gpu, p.value.len())?));
        }
        self.states.extend(fresh);
        for p in params.iter_mut() {
            let Some(st) = self.states.get_mut(p.name) else { unreachable!("every parameter has a state now") };
            let s = StepScalars::new(&self.config, lr, p.weight_decay, st.step + 1);
            adamw_step_gpu(
                gpu,
                &mut p.value.as_view_mut(),
                &mut st.exp_avg.as_view_mut(),
                &mut st.exp_avg_sq.as_view_mut(),
                &p.grad.as_view(),
                s,
            )?;
            st.step += 1;
        }
        Ok(())
    }

    /// Bytes of device memory held by the states.
    pub fn state_bytes(&self) -> usize {
        self.states.values().map(DeviceAdamState::bytes).sum()
    }

    /// The states as a CPU [`AdamW`] (whose `save_state` writes the checkpoint). Synchronizes the stream.
    pub fn to_cpu(&self, gpu: &Gpu) -> Result<AdamW> {
        let mut states = BTreeMap::new();
        for (name, st) in &self.states {
            states.insert(name.clone(), st.download(gpu)?);
        }
        AdamW::from_states(self.config, states)
    }

    /// Copies the states into `m`'s pinned host buffers (after the work queued on the stream) and
    /// waits: the host then holds them at the cost of one PCIe copy; [`AdamWGpu::cpu_from_mirror`]
    /// turns them into a CPU [`AdamW`] when a checkpoint needs one.
    pub fn mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> Result<()> {
        let (views, entries) = self.mirror_views();
        m.fill(gpu, &views, &[], entries)
    }

    /// Allocates `m`'s pinned buffers for these states without copying (see
    /// [`StateMirror::reserve`]); a buffer already large enough is kept.
    pub fn reserve_mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> Result<()> {
        m.reserve(gpu, &self.mirror_views().0, &[])
    }

    /// [`Self::mirror`] queued on `copy` without waiting.
    ///
    /// # Safety
    /// [`CopyStream::download`]'s contract for `m`'s buffers and these states: the next
    /// [`Self::step`] waits for the copies ([`CopyStream::compute_waits`]).
    pub unsafe fn mirror_on(&self, gpu: &Gpu, m: &mut StateMirror, copy: &mut CopyStream) -> Result<()> {
        let (views, entries) = self.mirror_views();
        // SAFETY: the caller's contract.
        unsafe { m.fill_on(gpu, copy, &views, &[], entries) }
    }

    /// The moments' device views as a mirror copies them.
    fn mirror_views(&self) -> (Vec<CudaView<'_, f32>>, Vec<Entry>) {
        let mut views = vec![];
        let mut entries = vec![];
        for (name, st) in &self.states {
            views.push(st.exp_avg.as_view());
            views.push(st.exp_avg_sq.as_view());
            entries.push(Entry { name: name.clone(), step: st.step, n: st.len(), blockwise: false });
        }
        (views, entries)
    }

    /// The CPU [`AdamW`] of the states `m` holds (this optimizer's configuration).
    pub fn cpu_from_mirror(&self, m: &StateMirror) -> Result<AdamW> {
        let mut f = Cursor::new(m.f32s.as_ref().map_or(&[][..], |b| b.as_slice()));
        let mut states = BTreeMap::new();
        for e in &m.entries {
            states.insert(e.name.clone(), AdamState { step: e.step, exp_avg: f.take(e.n), exp_avg_sq: f.take(e.n) });
        }
        AdamW::from_states(self.config, states)
    }

    /// A GPU optimizer holding the configuration and states of `cpu` (e.g. after its `load_state`).
    pub fn from_cpu(gpu: &Gpu, cpu: &AdamW) -> Result<Self> {
        let mut states = BTreeMap::new();
        for (name, st) in cpu.states() {
            states.insert(name.clone(), DeviceAdamState::upload(gpu, st)?);
        }
        Ok(Self { config: *cpu.config(), states })
    }
}

/// One torch AdamW step of `p`, its moments `m`, `v` and gradient `g` (all `[n]`).
fn adamw_step_gpu(
    gpu: &Gpu,
    p: &mut CudaViewMut<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    g: &CudaView<'_, f32>,
    s: StepScalars,
) -> oxtune_kernels::Result<()> {
    let n = p.len();
    for (what, len) in [("exp_avg", m.len()), ("exp_avg_sq", v.len()), ("grad", g.len())] {
        if len != n {
            return Err(oxtune_kernels::Error::Shape(format!("adamw: {what} has {len} elements, expected {n}")));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("optim_adamw", ADAMW_SRC, "adamw_step_f32")?;
    let n64 = n as u64;
    // SAFETY: adamw_step_f32(float* p, float* m, float* v, const float* g, unsigned long long n, float decay,
    // float w1, float beta2, float one_minus_beta2, float bc2_sqrt, float eps, float neg_step_size): p, m, v
    // and g hold n floats each (checked above); the kernel loops over n with a grid stride.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(p)
            .arg(m)
            .arg(v)
            .arg(g)
            .arg(&n64)
            .arg(&s.decay)
            .arg(&s.w1)
            .arg(&s.beta2)
            .arg(&s.one_minus_beta2)
            .arg(&s.bc2_sqrt)
            .arg(&s.eps)
            .arg(&s.neg_step_size)
            .launch(elementwise_config(n))
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cuda::lockstep;
    use oxtune_kernels::testing::{assert_close, randn};

    use super::*;
    use crate::{Error, Optimizer};

    /// Steps a CPU AdamW and an AdamWGpu side by side on the same fresh random gradients (every second tensor
    /// exempt from decay) and compares parameters and moments after steps 1 and 5 ([`lockstep`]).
    fn compare(gpu: &Gpu, lengths: &[usize], seed: u64) {
        let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        let (mut cpu, mut dev) = (AdamW::new(config).unwrap(), AdamWGpu::new(config).unwrap());
        let grad = |step: u64, i: usize, n: usize| randn(seed * 1000 + step * 100 + i as u64, n, 0.5);
        lockstep(gpu, lengths, seed, grad, &mut cpu, &mut dev, |step, names, cpu, back| {
            for name in names {
                let (m, v) = cpu.moments(name).unwrap();
                let (gm, gv) = back.moments(name).unwrap();
                assert_close(&format!("step {step}: {name} exp_avg"), gm, m, 1e-9, 1e-5);
                assert_close(&format!("step {step}: {name} exp_avg_sq"), gv, v, 1e-12, 1e-5);
                assert_eq!(back.step_count(name), step);
            }
        });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn matches_cpu_after_one_and_five_steps() {
        let gpu = Gpu::new(0).expect("a GPU");
        // A LoRA A matrix of gpt-oss (rank 8 x hidden 2880) and one just past a full grid (65536 blocks of 256
        // threads), so the grid-stride loop takes a second round.
        compare(&gpu, &[8 * 2880, (1 << 24) + 3], 1);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_lengths_and_single_element() {
        let gpu = Gpu::new(0).expect("a GPU");
        compare(&gpu, &[1, 17, 255, 257, 4097], 2);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn state_file_round_trip_resumes_exactly() {
        let gpu = Gpu::new(0).expect("a GPU");
        let n = 1000;
        let mut value = gpu.stream.clone_htod(&randn(3, n, 1.0)).unwrap();
        let mut opt = AdamWGpu::new(AdamWConfig::default()).unwrap();
        for step in 0..3 {
            let grad = gpu.stream.clone_htod(&randn(10 + step, n, 1.0)).unwrap();
            opt.step(&gpu, &mut [GpuParam::new("w", &mut value, &grad)], 1e-3).unwrap();
        }
        let path = std::env::temp_dir().join(format!("oxtune-optim-gpu-adamw-{}.safetensors", std::process::id()));
        opt.to_cpu(&gpu).unwrap().save_state(&path).unwrap();
        let mut loaded = AdamW::new(AdamWConfig::default()).unwrap();
        loaded.load_state(&path).unwrap();
        std::fs::remove_file(&path).ok();
        let mut resumed = AdamWGpu::from_cpu(&gpu, &loaded).unwrap();
        assert_eq!(resumed.step_count("w"), 3);
        assert_eq!(resumed.state_bytes(), opt.state_bytes());
        let mut value2 = gpu.stream.clone_dtod(&value).unwrap();
        let grad = gpu.stream.clone_htod(&randn(20, n, 1.0)).unwrap();
        opt.step(&gpu, &mut [GpuParam::new("w", &mut value, &grad)], 1e-3).unwrap();
        resumed.step(&gpu, &mut [GpuParam::new("w", &mut value2, &grad)], 1e-3).unwrap();
        // Same kernel on the same bits: exact.
        assert_eq!(gpu.stream.clone_dtoh(&value).unwrap(), gpu.stream.clone_dtoh(&value2).unwrap());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn invalid_input_modifies_nothing() {
        let gpu = Gpu::new(0).expect("a GPU");
        let before = randn(4, 300, 1.0);
        let mut a = gpu.stream.clone_htod(&before).unwrap();
        let mut b = gpu.stream.clone_htod(&before).unwrap();
        let ga = gpu.stream.clone_htod(&randn(5, 300, 1.0)).unwrap();
        let short = gpu.stream.clone_htod(&randn(6, 299, 1.0)).unwrap();
        let mut opt = AdamWGpu::new(AdamWConfig::default()).unwrap();
        let e = opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga), GpuParam::new("b", &mut b, &short)], 1e-3);
        assert!(matches!(e, Err(Error::GradLength { .. })), "{e:?}");
        let e = opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga), GpuParam::new("a", &mut b, &ga)], 1e-3);
        assert!(matches!(e, Err(Error::DuplicateName(_))), "{e:?}");
        let e = opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga)], f64::NAN);
        assert!(matches!(e, Err(Error::Config(_))), "{e:?}");
        assert_eq!(opt.state_bytes(), 0, "no state may be allocated by a rejected step");
        assert_eq!(gpu.stream.clone_dtoh(&a).unwrap(), before);
        assert_eq!(gpu.stream.clone_dtoh(&b).unwrap(), before);
        // A state of another size: rejected before the valid parameter next to it is touched.
        opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga)], 1e-3).unwrap();
        let stepped = gpu.stream.clone_dtoh(&a).unwrap();
        let mut c = gpu.stream.clone_htod(&randn(7, 299, 1.0)).unwrap();
        let e = opt.step(&gpu, &mut [GpuParam::new("b", &mut b, &ga), GpuParam::new("a", &mut c, &short)], 1e-3);
        assert!(matches!(e, Err(Error::StateLength { .. })), "{e:?}");
        assert_eq!(gpu.stream.clone_dtoh(&b).unwrap(), before);
        assert_eq!(gpu.stream.clone_dtoh(&a).unwrap(), stepped);
        assert_eq!(opt.step_count("a"), 1);
        assert_eq!(opt.step_count("b"), 0);
        assert_eq!(opt.state_bytes(), 2 * 4 * 300);
    }
}
