//! [`AdamW8bitGpu`]: bitsandbytes' 8-bit AdamW with its blockwise-quantized moments on the device.

use std::collections::BTreeMap;

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use oxtune_kernels::pinned::CopyStream;
use oxtune_kernels::Gpu;

use super::adamw::DeviceAdamState;
use super::mirror::{Cursor, Entry, StateMirror};
use super::{check_params, download, elementwise_config, upload, zeros, GpuParam, ADAMW8BIT_SRC};
use crate::adamw::AdamState;
use crate::adamw8bit::{BlockwiseState, Scalars, State};
use crate::quant8::{BLOCK, SIGNED_MAP, UNSIGNED_MAP};
use crate::{state, AdamW8bit, AdamW8bitConfig, Result};

/// `struct Code256 { float v[256]; }` of adamw8bit.cu: a dynamic map passed by value.
#[derive(Clone, Copy)]
#[repr(C)]
struct Code256([f32; 256]);

// SAFETY: a plain array of f32 with the layout of the kernel's `Code256`.
unsafe impl DeviceRepr for Code256 {}

/// Quantized moments of one tensor on the device (the layout of [`BlockwiseState`]).
struct DeviceBlockwiseState {
    step: u64,
    state1: CudaSlice<u8>,
    state2: CudaSlice<u8>,
    absmax1: CudaSlice<f32>,
    absmax2: CudaSlice<f32>,
}

impl DeviceBlockwiseState {
    fn upload(gpu: &Gpu, st: &BlockwiseState) -> Result<Self> {
        Ok(Self {
            step: st.step,
            state1: upload(gpu, &st.state1)?,
            state2: upload(gpu, &st.state2)?,
            absmax1: upload(gpu, &st.absmax1)?,
            absmax2: upload(gpu, &st.absmax2)?,
        })
    }

    fn download(&self, gpu: &Gpu) -> Result<BlockwiseState> {
        Ok(BlockwiseState {
            step: self.step,
            state1: download(gpu, &self.state1)?,
            state2: download(gpu, &self.state2)?,
            absmax1: download(gpu, &self.absmax1)?,
            absmax2: download(gpu, &self.absmax2)?,
        })
    }

    fn bytes(&self) -> usize {
        self.state1.num_bytes() + self.state2.num_bytes() + self.absmax1.num_bytes() + self.absmax2.num_bytes()
    }
}

enum DeviceState {
    Fp32(DeviceAdamState),
    Blockwise(DeviceBlockwiseState),
}

impl DeviceState {
    fn len(&self) -> usize {
        match self {
            DeviceState::Fp32(s) => s.len(),
            DeviceState::Blockwise(s) => s.state1.len(),
        }
    }
}

/// 8-bit AdamW ([`crate::AdamW8bit`]'s update) with its states on the device, keyed by parameter name.
pub struct AdamW8bitGpu {
    config: AdamW8bitConfig,
    states: BTreeMap<String, DeviceState>,
    /// The 8-bit tensors' table of the multi-tensor kernel ([`TABLE_WORDS`] words a tensor), on
    /// the device: allocated by the first step, grown when a step has more tensors.
    table_dev: Option<CudaSlice<u64>>,
}

/// u64 words per tensor in the table of `adamw8bit_blockwise_multi_f32` (adamw8bit.cu's
/// `Ada8Tensor`: six addresses, the length, the first block, then the step size, the decay and
/// `c2_eps` as f32, and 4 unused bytes).
const TABLE_WORDS: usize = 10;

/// Blocks of the multi-tensor kernel at most: they stride over the quantization blocks, so that
/// each loads the two 256-entry maps once for many of them (the results do not depend on it).
const MULTI_GRID: usize = 4096;

impl AdamW8bitGpu {
    pub fn new(config: AdamW8bitConfig) -> Result<Self> {
        config.adam.validate()?;
        Ok(Self { config, states: BTreeMap::new(), table_dev: None })
    }

    pub fn config(&self) -> &AdamW8bitConfig {
        &self.config
    }

    /// Steps taken for `name` (0 before its first step).
    pub fn step_count(&self, name: &str) -> u64 {
        match self.states.get(name) {
            Some(DeviceState::Fp32(s)) => s.step,
            Some(DeviceState::Blockwise(s)) => s.step,
            None => 0,
        }
    }

    /// Updates every parameter in place from its gradient with learning rate `lr`, as [`crate::AdamW8bit`]
    /// does. Nothing is modified if any parameter is invalid (gradient length, duplicate name, state of another
    /// size). A parameter's states are allocated on its first step (all of that step's before any update):
    /// 8-bit for tensors of at least `min_8bit_size` elements, fp32 below.
    pub fn step(&mut self, gpu: &Gpu, params: &mut [GpuParam<'_>], lr: f64) -> Result<()> {
        check_params(params, lr)?;
        for p in params.iter() {
            if let Some(st) = self.states.get(p.name) {
                state::check_state_len(p.name, st.len(), p.value.len())?;
            }
        }
        // Loading the kernels can fail (NVRTC); do it before anything is modified.
        for kernel in ["adamw8bit_blockwise_multi_f32", "adamw8bit_fp32_f32"] {
            gpu.function("optim_adamw8bit", ADAMW8BIT_SRC, kernel)?;
        }
        let mut fresh = Vec::new();
        for p in params.iter().filter(|p| !self.states.contains_key(p.name)) {
            let n = p.value.len();
            let st = if n < self.config.min_8bit_size {
                DeviceState::Fp32(DeviceAdamState::zeros(gpu, n)?)
            } else {
                // Byte 0 with absmax 0 dequantizes to exactly 0 in both maps, as in BlockwiseState::new.
                DeviceState::Blockwise(DeviceBlockwiseState {
                    step: 0,
                    state1: zeros(gpu, n)?,
                    state2: zeros(gpu, n)?,
                    absmax1: zeros(gpu, n.div_ceil(BLOCK))?,
                    absmax2: zeros(gpu, n.div_ceil(BLOCK))?,
                })
            };
            fresh.push((p.name.to_string(), st));
        }
        self.states.extend(fresh);
        // Each parameter's state, borrowed at once (the names are unique: check_params).
        let mut by_name: std::collections::HashMap<&str, &mut DeviceState> =
            self.states.iter_mut().map(|(k, v)| (k.as_str(), v)).collect();
        let stream = &gpu.stream;
        // The 8-bit tensors go into one launch: their table rows, with the addresses' guards held
        // until it is queued (they record its use of the buffers when cudarc tracks streams).
        let mut table: Vec<u64> = Vec::new();
        let mut guards = Vec::new();
        let mut stepped: Vec<&mut u64> = Vec::new();
        let mut blocks = 0usize;
        for p in params.iter_mut() {
            let Some(st) = by_name.remove(p.name) else { unreachable!("every parameter has a state now") };
            match st {
                DeviceState::Fp32(st) => {
                    let s = Scalars::new(&self.config.adam, lr, p.weight_decay, st.step + 1);
                    adamw8bit_fp32_step_gpu(
                        gpu,
                        &mut p.value.as_view_mut(),
                        &mut st.exp_avg.as_view_mut(),
                        &mut st.exp_avg_sq.as_view_mut(),
                        &p.grad.as_view(),
                        &s,
                    )?;
                    st.step += 1;
                }
                DeviceState::Blockwise(st) => {
                    let n = p.value.len();
                    check_blockwise(st, n, p.grad.len())?;
                    if n == 0 {
                        st.step += 1;
                        continue;
                    }
                    let s = Scalars::new(&self.config.adam, lr, p.weight_decay, st.step + 1);
                    let DeviceBlockwiseState { step, state1, state2, absmax1, absmax2 } = st;
                    let (pv, gp) = (p.value.device_ptr_mut(stream), p.grad.device_ptr(stream));
                    let (s1, s2) = (state1.device_ptr_mut(stream), state2.device_ptr_mut(stream));
                    let (a1, a2) = (absmax1.device_ptr_mut(stream), absmax2.device_ptr_mut(stream));
                    let pair = |lo: f32, hi: f32| lo.to_bits() as u64 | (hi.to_bits() as u64) << 32;
                    let row = [pv.0, s1.0, s2.0, a1.0, a2.0, gp.0, n as u64, blocks as u64];
                    table.extend(
                        row.into_iter().chain([pair(s.step_size, s.decay.unwrap_or(1.0)), pair(s.c2_eps, 0.0)]),
                    );
                    guards.push([pv.1, s1.1, s2.1, a1.1, a2.1, gp.1]);
                    blocks += n.div_ceil(BLOCK);
                    stepped.push(step);
                }
            }
        }
        if blocks > 0 {
            debug_assert_eq!(table.len(), TABLE_WORDS * stepped.len());
            let count = u32::try_from(stepped.len()).expect("fewer tensors than 2^32");
            let blocks64 = blocks as u64;
            let grid = blocks.min(MULTI_GRID) as u32;
            if self.table_dev.as_ref().is_none_or(|t| t.len() < table.len()) {
                self.table_dev = Some(stream.alloc_zeros::<u64>(table.len()).map_err(oxtune_kernels::Error::from)?);
            }
            let Some(dev) = self.table_dev.as_mut() else { unreachable!("allocated above") };
            // Stream-ordered: a launch of the last step that reads the old table has run first.
            stream.memcpy_htod(&table, &mut dev.slice_mut(..table.len())).map_err(oxtune_kernels::Error::from)?;
            let f = gpu.function("optim_adamw8bit", ADAMW8BIT_SRC, "adamw8bit_blockwise_multi_f32")?;
            let s = Scalars::new(&self.config.adam, lr, true, 1);
            let (smap, umap) = (Code256(SIGNED_MAP), Code256(UNSIGNED_MAP));
            let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (BLOCK as u32, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: adamw8bit_blockwise_multi_f32(const Ada8Tensor* tensors, unsigned count, unsigned long
            // long blocks, float beta1, float beta2, float one_minus_beta1, float one_minus_beta2, Code256
            // signed_map, Code256 unsigned_map): the table holds `count` rows of TABLE_WORDS words (Ada8Tensor's layout),
            // each the live buffers of one tensor (p, g, state1, state2 of n elements, absmax1/absmax2 of
            // ceil(n / 256): check_blockwise), borrowed by the guards until the launch is queued and kept
            // alive by their owners past it (freed on this stream); first blocks count up from 0 in row
            // order up to `blocks`, over which the grid's blocks of 256 threads (as the kernel assumes) stride.
            unsafe {
                stream
                    .launch_builder(&f)
                    .arg(&*dev)
                    .arg(&count)
                    .arg(&blocks64)
                    .arg(&s.beta1)
                    .arg(&s.beta2)
                    .arg(&s.one_minus_beta1)
                    .arg(&s.one_minus_beta2)
                    .arg(&smap)
                    .arg(&umap)
                    .launch(cfg)
            }
            .map_err(oxtune_kernels::Error::from)?;
        }
        drop(guards);
        for step in stepped {
            *step += 1;
        }
        Ok(())
    }

    /// Bytes of device memory held by the states.
    pub fn state_bytes(&self) -> usize {
        self.states
            .values()
            .map(|s| match s {
                DeviceState::Fp32(s) => s.bytes(),
                DeviceState::Blockwise(s) => s.bytes(),
            })
            .sum()
    }

    /// The states as a CPU [`AdamW8bit`] (whose `save_state` writes the checkpoint). Synchronizes the stream.
    pub fn to_cpu(&self, gpu: &Gpu) -> Result<AdamW8bit> {
        let mut states = BTreeMap::new();
        for (name, st) in &self.states {
            let st = match st {
                DeviceState::Fp32(s) => State::Fp32(s.download(gpu)?),
                DeviceState::Blockwise(s) => State::Blockwise(s.download(gpu)?),
            };
            states.insert(name.clone(), st);
        }
        AdamW8bit::from_states(self.config, states)
    }

    /// Copies the states into `m`'s pinned host buffers (after the work queued on the stream) and
    /// waits; [`AdamW8bitGpu::cpu_from_mirror`] turns them into a CPU [`AdamW8bit`] when needed.
    pub fn mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> Result<()> {
        let (f32s, u8s, entries) = self.mirror_views();
        m.fill(gpu, &f32s, &u8s, entries)
    }

    /// Allocates `m`'s pinned buffers for these states without copying (see
    /// [`StateMirror::reserve`]); a buffer already large enough is kept.
    pub fn reserve_mirror(&self, gpu: &Gpu, m: &mut StateMirror) -> Result<()> {
        let (f32s, u8s, _) = self.mirror_views();
        m.reserve(gpu, &f32s, &u8s)
    }

    /// [`Self::mirror`] queued on `copy` without waiting.
    ///
    /// # Safety
    /// [`CopyStream::download`]'s contract for `m`'s buffers and these states: the next
    /// [`Self::step`] waits for the copies ([`CopyStream::compute_waits`]).
    pub unsafe fn mirror_on(&self, gpu: &Gpu, m: &mut StateMirror, copy: &mut CopyStream) -> Result<()> {
        let (f32s, u8s, entries) = self.mirror_views();
        // SAFETY: the caller's contract.
        unsafe { m.fill_on(gpu, copy, &f32s, &u8s, entries) }
    }

    /// The states' device views as a mirror copies them (f32 moments / absmax, 8-bit moments).
    fn mirror_views(&self) -> (Vec<CudaView<'_, f32>>, Vec<CudaView<'_, u8>>, Vec<Entry>) {
        let (mut f32s, mut u8s, mut entries) = (vec![], vec![], vec![]);
        for (name, st) in &self.states {
            let (step, blockwise) = match st {
                DeviceState::Fp32(s) => {
                    f32s.push(s.exp_avg.as_view());
                    f32s.push(s.exp_avg_sq.as_view());
                    (s.step, false)
                }
                DeviceState::Blockwise(s) => {
                    f32s.push(s.absmax1.as_view());
                    f32s.push(s.absmax2.as_view());
                    u8s.push(s.state1.as_view());
                    u8s.push(s.state2.as_view());
                    (s.step, true)
                }
            };
            entries.push(Entry { name: name.clone(), step, n: st.len(), blockwise });
        }
        (f32s, u8s, entries)
    }

    /// The CPU [`AdamW8bit`] of the states `m` holds (this optimizer's configuration).
    pub fn cpu_from_mirror(&self, m: &StateMirror) -> Result<AdamW8bit> {
        let mut f = Cursor::new(m.f32s.as_ref().map_or(&[][..], |b| b.as_slice()));
        let mut b = Cursor::new(m.u8s.as_ref().map_or(&[][..], |b| b.as_slice()));
        let mut states = BTreeMap::new();
        for e in &m.entries {
            let st = if e.blockwise {
                let blocks = e.n.div_ceil(BLOCK);
                let (absmax1, absmax2) = (f.take(blocks), f.take(blocks));
                State::Blockwise(BlockwiseState {
                    step: e.step,
                    state1: b.take(e.n),
                    state2: b.take(e.n),
                    absmax1,
                    absmax2,
                })
            } else {
                State::Fp32(AdamState { step: e.step, exp_avg: f.take(e.n), exp_avg_sq: f.take(e.n) })
            };
            states.insert(e.name.clone(), st);
        }
        AdamW8bit::from_states(self.config, states)
    }

    /// A GPU optimizer holding the configuration and states of `cpu` (e.g. after its `load_state`).
    pub fn from_cpu(gpu: &Gpu, cpu: &AdamW8bit) -> Result<Self> {
        let mut states = BTreeMap::new();
        for (name, st) in cpu.states() {
            let st = match st {
                State::Fp32(s) => DeviceState::Fp32(DeviceAdamState::upload(gpu, s)?),
                State::Blockwise(s) => DeviceState::Blockwise(DeviceBlockwiseState::upload(gpu, s)?),
            };
            states.insert(name.clone(), st);
        }
        Ok(Self { config: *cpu.config(), states, table_dev: None })
    }
}

fn shape_error(what: &str, len: usize, want: usize) -> oxtune_kernels::Error {
    oxtune_kernels::Error::Shape(format!("adamw8bit: {what} has {len} elements, expected {want}"))
}

/// Checks that a tensor of `n` elements with a gradient of `grad` has the 8-bit state of its size:
/// `state1`, `state2` `[n]`, `absmax1`, `absmax2` `[ceil(n / 256)]`.
fn check_blockwise(st: &DeviceBlockwiseState, n: usize, grad: usize) -> oxtune_kernels::Result<()> {
    let blocks = n.div_ceil(BLOCK);
    for (what, len, want) in [
        ("state1", st.state1.len(), n),
        ("state2", st.state2.len(), n),
        ("absmax1", st.absmax1.len(), blocks),
        ("absmax2", st.absmax2.len(), blocks),
        ("grad", grad, n),
    ] {
        if len != want {
            return Err(shape_error(what, len, want));
        }
    }
    Ok(())
}

/// One step of bitsandbytes' 32-bit path (tensors below `min_8bit_size`): `p`, `m`, `v`, `g` `[n]`.
fn adamw8bit_fp32_step_gpu(
    gpu: &Gpu,
    p: &mut CudaViewMut<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    g: &CudaView<'_, f32>,
    s: &Scalars,
) -> oxtune_kernels::Result<()> {
    let n = p.len();
    for (what, len) in [("exp_avg", m.len()), ("exp_avg_sq", v.len()), ("grad", g.len())] {
        if len != n {
            return Err(shape_error(what, len, n));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("optim_adamw8bit", ADAMW8BIT_SRC, "adamw8bit_fp32_f32")?;
    let n64 = n as u64;
    let decay = s.decay.unwrap_or(1.0);
    // SAFETY: adamw8bit_fp32_f32(float* p, float* m, float* v, const float* g, unsigned long long n, float
    // beta1, float beta2, float one_minus_beta1, float one_minus_beta2, float c2_eps, float step_size, float
    // decay): p, m, v and g hold n floats each (checked above); the kernel loops over n with a grid stride.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(p)
            .arg(m)
            .arg(v)
            .arg(g)
            .arg(&n64)
            .arg(&s.beta1)
            .arg(&s.beta2)
            .arg(&s.one_minus_beta1)
            .arg(&s.one_minus_beta2)
            .arg(&s.c2_eps)
            .arg(&s.step_size)
            .arg(&decay)
            .launch(elementwise_config(n))
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cuda::lockstep;
    use oxtune_kernels::testing::{assert_close, randn};

    use super::*;
    use crate::{AdamWConfig, Error, Optimizer};

    /// Counts differing codes, asserting that none differs by more than one code.
    fn code_mismatches(what: &str, got: &[u8], want: &[u8]) -> usize {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let mut count = 0;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if g != w {
                assert!(g.abs_diff(w) <= 1, "{what}: code {i} is {g} on the GPU and {w} on the CPU");
                count += 1;
            }
        }
        count
    }

    /// Steps a CPU AdamW8bit and an AdamW8bitGpu side by side (every second tensor exempt from decay) on the
    /// gradients `grad(step, tensor, n)` and compares parameters, codes, absmax and fp32 moments after steps 1
    /// and 5.
    ///
    /// The kernels repeat the CPU's f32 operations in the same order with the same rounding (explicit `__f*_rn`
    /// intrinsics, IEEE division and square root, the scalars computed on the host by the CPU code, an
    /// order-independent max), so equal bits are expected. What cannot be promised in general is that two
    /// compilers round every operation identically (a contraction into an FMA, an approximate division or
    /// square root changes the last bit); one such bit moves a value that lies on a code midpoint to the
    /// neighbouring code. Hence the tolerances: at least 99.9% of the codes equal and the others one code apart,
    /// absmax and parameters within rtol 1e-5 (a wrong formula errs by far more).
    fn compare(
        gpu: &Gpu,
        config: AdamW8bitConfig,
        lengths: &[usize],
        grad: impl Fn(u64, usize, usize) -> Vec<f32>,
    ) -> (AdamW8bit, AdamW8bitGpu) {
        let (mut cpu, mut dev) = (AdamW8bit::new(config).unwrap(), AdamW8bitGpu::new(config).unwrap());
        lockstep(gpu, lengths, 7, grad, &mut cpu, &mut dev, |step, names, cpu, back| {
            let (mut mismatches, mut codes) = (0, 0);
            for (i, name) in names.iter().enumerate() {
                let what = format!("step {step}: {name} [{}]", lengths[i]);
                assert_eq!(back.step_count(name), step, "{what}");
                match (cpu.blockwise_state(name), back.blockwise_state(name)) {
                    (Some(want), Some(got)) => {
                        mismatches += code_mismatches(&format!("{what} state1"), got.state1, want.state1);
                        mismatches += code_mismatches(&format!("{what} state2"), got.state2, want.state2);
                        codes += 2 * want.state1.len();
                        assert_close(&format!("{what} absmax1"), got.absmax1, want.absmax1, 1e-12, 1e-5);
                        assert_close(&format!("{what} absmax2"), got.absmax2, want.absmax2, 1e-12, 1e-5);
                    }
                    (None, None) => {
                        let ((m, v), (gm, gv)) = (cpu.fp32_moments(name).unwrap(), back.fp32_moments(name).unwrap());
                        assert_close(&format!("{what} exp_avg"), gm, m, 1e-9, 1e-5);
                        assert_close(&format!("{what} exp_avg_sq"), gv, v, 1e-12, 1e-5);
                    }
                    _ => panic!("{what}: the GPU and the CPU chose different state kinds"),
                }
            }
            println!("step {step}: {mismatches} of {codes} codes differ");
            assert!(mismatches * 1000 <= codes, "step {step}: {mismatches} of {codes} codes differ (more than 0.1%)");
        });
        (cpu, dev)
    }

    fn random_grad(step: u64, i: usize, n: usize) -> Vec<f32> {
        randn(1000 * step + i as u64, n, 0.5)
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn matches_cpu_after_one_and_five_steps() {
        let gpu = Gpu::new(0).expect("a GPU");
        // Default threshold 4096: a gpt-oss LoRA A matrix (90 full blocks), a tensor of exactly min_8bit_size,
        // a partial last block, and two tensors that stay fp32 (bitsandbytes' 32-bit kernel).
        let lengths = [8 * 2880, 4096, 4096 + 17, 100, 1];
        compare(&gpu, AdamW8bitConfig::default(), &lengths, random_grad);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_lengths_and_single_element_on_the_8bit_path() {
        let gpu = Gpu::new(0).expect("a GPU");
        let config = AdamW8bitConfig { min_8bit_size: 1, ..AdamW8bitConfig::default() };
        compare(&gpu, config, &[1, 17, 255, 256, 257, 1000], random_grad);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn non_finite_gradients_and_a_block_of_zero_gradients() {
        let gpu = Gpu::new(0).expect("a GPU");
        let config = AdamW8bitConfig { min_8bit_size: 1, ..AdamW8bitConfig::default() };
        // Block 1 sees only zero gradients (its first moment stays 0: absmax 0 and code 255); block 0 gets NaN
        // and infinities on steps 1 and 3 (those elements keep 0 moments and their parameters); the tail block
        // of 5 elements is zero on step 1 only.
        let grad = |step: u64, i: usize, n: usize| {
            let mut g = random_grad(step, i, n);
            g[256..512].iter_mut().for_each(|x| *x = 0.0);
            if step % 2 == 1 {
                g[3] = f32::NAN;
                g[100] = f32::INFINITY;
                g[200] = f32::NEG_INFINITY;
            }
            if step == 1 {
                g[768..].iter_mut().for_each(|x| *x = 0.0);
            }
            g
        };
        let (cpu, _) = compare(&gpu, config, &[3 * 256 + 5], grad);
        let st = cpu.blockwise_state("layer0.weight").unwrap();
        assert_eq!(st.absmax1[1], 0.0, "the zero block's first moment must stay 0");
        assert!(st.state1[256..512].iter().all(|&c| c == 255));
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn state_file_round_trip_resumes_exactly() {
        let gpu = Gpu::new(0).expect("a GPU");
        let (n8, n32) = (4096 + 300, 77);
        let mut a = gpu.stream.clone_htod(&randn(3, n8, 1.0)).unwrap();
        let mut b = gpu.stream.clone_htod(&randn(4, n32, 1.0)).unwrap();
        let mut opt = AdamW8bitGpu::new(AdamW8bitConfig::default()).unwrap();
        for step in 0..3 {
            let ga = gpu.stream.clone_htod(&randn(10 + step, n8, 1.0)).unwrap();
            let gb = gpu.stream.clone_htod(&randn(20 + step, n32, 1.0)).unwrap();
            opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga), GpuParam::without_decay("b", &mut b, &gb)], 1e-3)
                .unwrap();
        }
        let path = std::env::temp_dir().join(format!("oxtune-optim-gpu-adamw8bit-{}.safetensors", std::process::id()));
        opt.to_cpu(&gpu).unwrap().save_state(&path).unwrap();
        let mut loaded = AdamW8bit::new(AdamW8bitConfig::default()).unwrap();
        loaded.load_state(&path).unwrap();
        std::fs::remove_file(&path).ok();
        let mut resumed = AdamW8bitGpu::from_cpu(&gpu, &loaded).unwrap();
        assert_eq!((resumed.step_count("a"), resumed.step_count("b")), (3, 3));
        assert_eq!(resumed.state_bytes(), opt.state_bytes());
        let (mut a2, mut b2) = (gpu.stream.clone_dtod(&a).unwrap(), gpu.stream.clone_dtod(&b).unwrap());
        let ga = gpu.stream.clone_htod(&randn(30, n8, 1.0)).unwrap();
        let gb = gpu.stream.clone_htod(&randn(31, n32, 1.0)).unwrap();
        opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga), GpuParam::without_decay("b", &mut b, &gb)], 1e-3)
            .unwrap();
        resumed
            .step(&gpu, &mut [GpuParam::new("a", &mut a2, &ga), GpuParam::without_decay("b", &mut b2, &gb)], 1e-3)
            .unwrap();
        // Same kernels on the same bits: exact.
        assert_eq!(gpu.stream.clone_dtoh(&a).unwrap(), gpu.stream.clone_dtoh(&a2).unwrap());
        assert_eq!(gpu.stream.clone_dtoh(&b).unwrap(), gpu.stream.clone_dtoh(&b2).unwrap());
        let (x, y) = (opt.to_cpu(&gpu).unwrap(), resumed.to_cpu(&gpu).unwrap());
        assert_eq!(x.blockwise_state("a").unwrap().state1, y.blockwise_state("a").unwrap().state1);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn invalid_input_modifies_nothing() {
        let gpu = Gpu::new(0).expect("a GPU");
        let before = randn(4, 5000, 1.0);
        let mut a = gpu.stream.clone_htod(&before).unwrap();
        let mut b = gpu.stream.clone_htod(&before).unwrap();
        let ga = gpu.stream.clone_htod(&randn(5, 5000, 1.0)).unwrap();
        let short = gpu.stream.clone_htod(&randn(6, 4999, 1.0)).unwrap();
        let config = AdamW8bitConfig { adam: AdamWConfig::default(), min_8bit_size: 4096 };
        let mut opt = AdamW8bitGpu::new(config).unwrap();
        let e = opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga), GpuParam::new("b", &mut b, &short)], 1e-3);
        assert!(matches!(e, Err(Error::GradLength { .. })), "{e:?}");
        let e = opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga), GpuParam::new("a", &mut b, &ga)], 1e-3);
        assert!(matches!(e, Err(Error::DuplicateName(_))), "{e:?}");
        assert_eq!(opt.state_bytes(), 0, "no state may be allocated by a rejected step");
        assert_eq!(gpu.stream.clone_dtoh(&a).unwrap(), before);
        opt.step(&gpu, &mut [GpuParam::new("a", &mut a, &ga)], 1e-3).unwrap();
        let stepped = gpu.stream.clone_dtoh(&a).unwrap();
        let mut c = gpu.stream.clone_htod(&randn(7, 4999, 1.0)).unwrap();
        let e = opt.step(&gpu, &mut [GpuParam::new("b", &mut b, &ga), GpuParam::new("a", &mut c, &short)], 1e-3);
        assert!(matches!(e, Err(Error::StateLength { .. })), "{e:?}");
        assert_eq!(gpu.stream.clone_dtoh(&b).unwrap(), before);
        assert_eq!(gpu.stream.clone_dtoh(&a).unwrap(), stepped);
        // 2 bytes per element and 2 absmax values per 256-element block.
        assert_eq!(opt.state_bytes(), 2 * 5000 + 2 * 4 * 5000usize.div_ceil(256));
    }
}
