//! 8-bit AdamW with the semantics of bitsandbytes' `AdamW8bit` CUDA kernels
//! (`kOptimizerStatic8bit2StateBlockwise` for tensors of at least `min_8bit_size` elements,
//! `kOptimizer32bit2State` below that).
//!
//! Per 256-element block of an 8-bit tensor, with `c1 = 1 - beta1^t`, `c2 = sqrt(1 - beta2^t)` and
//! `step_size = -lr * c2 / c1` (all f32):
//!
//! 1. dequantize `m = SIGNED[state1] * absmax1`, `v = UNSIGNED[state2] * absmax2`, then
//!    `v = beta2 v + (1 - beta2) g^2`, `m = beta1 m + (1 - beta1) g`. A NaN or infinite gradient instead sets
//!    both moments of that element to 0 and leaves its parameter untouched (no decay either).
//! 2. the new absmax of each state is the block maximum of the *updated* moments;
//! 3. `p += step_size * m / (sqrt(v) + c2 * eps)`, then decoupled decay `p *= 1 - lr * wd` (after the Adam
//!    step, as in the CUDA kernels; torch and bitsandbytes' CPU backend decay before it);
//! 4. requantize to the nearest code, and if the chosen first-moment code has the opposite sign of `m`, move
//!    one code toward `m`'s sign so that a tiny negative momentum is not stored as zero.
//!
//! Smaller tensors keep fp32 moments and follow the 32-bit kernel, which has no non-finite check (a NaN
//! gradient propagates into the moments and the parameter, as in bitsandbytes).

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::adamw::{AdamState, AdamWConfig};
use crate::quant8::{DynamicMap, BLOCK, SIGNED_MAP, UNSIGNED_MAP};
use crate::state::{self, StateTensor, StateWriter};
use crate::{check_params, Optimizer, Param, Result};

/// Blocks per rayon task; tensors with fewer blocks are stepped on the calling thread.
const BLOCKS_PER_TASK: usize = 64;

/// Hyperparameters of [`AdamW8bit`]; the defaults are bitsandbytes'.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW8bitConfig {
    pub adam: AdamWConfig,
    /// Tensors with fewer elements keep fp32 states.
    pub min_8bit_size: usize,
}

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        Self { adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }, min_8bit_size: 4096 }
    }
}

/// Quantized moments of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BlockwiseState {
    pub step: u64,
    pub state1: Vec<u8>,
    pub state2: Vec<u8>,
    pub absmax1: Vec<f32>,
    pub absmax2: Vec<f32>,
}

impl BlockwiseState {
    pub(crate) fn new(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK);
        // Byte 0 with absmax 0 dequantizes to exactly 0 in both maps.
        Self { step: 0, state1: vec![0; n], state2: vec![0; n], absmax1: vec![0.0; blocks], absmax2: vec![0.0; blocks] }
    }

    pub(crate) fn len(&self) -> usize {
        self.state1.len()
    }
}

#[derive(Clone, Debug)]
pub(crate) enum State {
    Fp32(AdamState),
    Blockwise(BlockwiseState),
}

/// The 8-bit moments of one tensor, for inspection (see [`AdamW8bit::blockwise_state`]).
#[derive(Clone, Copy, Debug)]
pub struct BlockwiseView<'a> {
    pub state1: &'a [u8],
    pub state2: &'a [u8],
    pub absmax1: &'a [f32],
    pub absmax2: &'a [f32],
}

/// bitsandbytes-style 8-bit AdamW, keyed by parameter name.
#[derive(Clone, Debug)]
pub struct AdamW8bit {
    config: AdamW8bitConfig,
    states: BTreeMap<String, State>,
}

/// The f32 scalars of one step, as bitsandbytes' kernels receive them (the GPU kernels receive exactly these).
#[derive(Clone, Copy)]
pub(crate) struct Scalars {
    pub beta1: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub c2_eps: f32,
    pub step_size: f32,
    pub decay: Option<f32>,
}

impl Scalars {
    pub(crate) fn new(cfg: &AdamWConfig, lr: f64, decay: bool, step: u64) -> Self {
        // The kernels receive f32 hyperparameters and do all arithmetic in f32.
        let (beta1, beta2, eps, lr, wd) =
            (cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32, lr as f32, cfg.weight_decay as f32);
        let t = step.min(i32::MAX as u64) as i32;
        let c1 = 1.0 - beta1.powi(t);
        let c2 = (1.0 - beta2.powi(t)).sqrt();
        Self {
            beta1,
            beta2,
            one_minus_beta1: 1.0 - beta1,
            one_minus_beta2: 1.0 - beta2,
            c2_eps: c2 * eps,
            step_size: -lr * c2 / c1,
            decay: (decay && wd > 0.0).then_some(1.0 - lr * wd),
        }
    }
}

/// One 256-element block of the 8-bit kernel. `m`/`v` are scratch for the updated moments.
fn step_block(s: &Scalars, p: &mut [f32], g: &[f32], c1: &mut [u8], c2: &mut [u8], am1: &mut f32, am2: &mut f32) {
    let n = p.len();
    let (mut m, mut v) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
    let (mut new1, mut new2) = (0.0f32, 0.0f32);
    for j in 0..n {
        if g[j].is_finite() {
            v[j] = UNSIGNED_MAP[c2[j] as usize] * *am2;
            v[j] = v[j] * s.beta2 + s.one_minus_beta2 * g[j] * g[j];
            m[j] = SIGNED_MAP[c1[j] as usize] * *am1;
            m[j] = m[j] * s.beta1 + s.one_minus_beta1 * g[j];
        }
        new1 = new1.max(m[j].abs());
        new2 = new2.max(v[j].abs());
    }
    if n < BLOCK {
        // The kernel loads the lanes past the end of the tensor as g = 0 with state bytes 128 / 0 and lets them
        // into the absmax reduction: their first moment is SIGNED[128] * absmax1 * beta1.
        new1 = new1.max((SIGNED_MAP[128] * *am1 * s.beta1).abs());
    }
    *am1 = new1;
    *am2 = new2;
    for j in 0..n {
        if g[j].is_finite() {
            p[j] += s.step_size * (m[j] / (v[j].sqrt() + s.c2_eps));
            if let Some(d) = s.decay {
                p[j] *= d;
            }
        }
        if new1 == 0.0 {
            // The kernel computes 0/0 = NaN here, whose search lands on code 0 and whose sign fix wraps the
            // byte to 255; both dequantize to 0 with absmax 0. Reproduced so the bytes match bitsandbytes.
            c1[j] = 255;
        } else {
            let mut q = DynamicMap::Signed.quantize(m[j] / new1);
            if SIGNED_MAP[q as usize].is_sign_negative() != m[j].is_sign_negative() {
                q = if m[j] > 0.0 { q.wrapping_add(1) } else { q.wrapping_sub(1) };
            }
            c1[j] = q;
        }
        c2[j] = if new2 == 0.0 { 0 } else { DynamicMap::Unsigned.quantize(v[j] / new2) };
    }
}

fn step_blockwise(s: &Scalars, value: &mut [f32], grad: &[f32], st: &mut BlockwiseState) {
    let task = BLOCK * BLOCKS_PER_TASK;
    let run = |p: &mut [f32], g: &[f32], c1: &mut [u8], c2: &mut [u8], a1: &mut [f32], a2: &mut [f32]| {
        for (((((p, g), c1), c2), a1), a2) in p
            .chunks_mut(BLOCK)
            .zip(g.chunks(BLOCK))
            .zip(c1.chunks_mut(BLOCK))
            .zip(c2.chunks_mut(BLOCK))
            .zip(a1.iter_mut())
            .zip(a2.iter_mut())
        {
            step_block(s, p, g, c1, c2, a1, a2);
        }
    };
    let BlockwiseState { state1, state2, absmax1, absmax2, .. } = st;
    if value.len() <= task {
        run(value, grad, state1, state2, absmax1, absmax2);
    } else {
        value
            .par_chunks_mut(task)
            .zip(grad.par_chunks(task))
            .zip(state1.par_chunks_mut(task))
            .zip(state2.par_chunks_mut(task))
            .zip(absmax1.par_chunks_mut(BLOCKS_PER_TASK))
            .zip(absmax2.par_chunks_mut(BLOCKS_PER_TASK))
            .for_each(|(((((p, g), c1), c2), a1), a2)| run(p, g, c1, c2, a1, a2));
    }
}

/// The 32-bit kernel (`kOptimizer32bit2State`, ADAM) for tensors below `min_8bit_size`.
fn step_fp32(s: &Scalars, value: &mut [f32], grad: &[f32], st: &mut AdamState) {
    for (((p, &g), m), v) in value.iter_mut().zip(grad).zip(st.exp_avg.iter_mut()).zip(st.exp_avg_sq.iter_mut()) {
        *m = *m * s.beta1 + s.one_minus_beta1 * g;
        *v = *v * s.beta2 + s.one_minus_beta2 * (g * g);
        *p += s.step_size * (*m / (v.sqrt() + s.c2_eps));
        if let Some(d) = s.decay {
            *p *= d;
        }
    }
}

impl AdamW8bit {
    pub fn new(config: AdamW8bitConfig) -> Result<Self> {
        config.adam.validate()?;
        Ok(Self { config, states: BTreeMap::new() })
    }

    pub fn config(&self) -> &AdamW8bitConfig {
        &self.config
    }

    /// Steps taken for `name` (0 before its first step).
    pub fn step_count(&self, name: &str) -> u64 {
        match self.states.get(name) {
            Some(State::Fp32(s)) => s.step,
            Some(State::Blockwise(s)) => s.step,
            None => 0,
        }
    }

    /// The quantized moments of `name`, if it has been stepped and takes the 8-bit path.
    pub fn blockwise_state(&self, name: &str) -> Option<BlockwiseView<'_>> {
        match self.states.get(name) {
            Some(State::Blockwise(s)) => {
                Some(BlockwiseView { state1: &s.state1, state2: &s.state2, absmax1: &s.absmax1, absmax2: &s.absmax2 })
            }
            _ => None,
        }
    }

    /// The fp32 moments of `name`, if it has been stepped and is below `min_8bit_size`.
    pub fn fp32_moments(&self, name: &str) -> Option<(&[f32], &[f32])> {
        match self.states.get(name) {
            Some(State::Fp32(s)) => Some((&s.exp_avg, &s.exp_avg_sq)),
            _ => None,
        }
    }

    /// Every state, for the exchange with the GPU optimizer.
    #[cfg(feature = "cuda")]
    pub(crate) fn states(&self) -> &BTreeMap<String, State> {
        &self.states
    }

    /// An optimizer holding `states` (already validated by their producer).
    #[cfg(feature = "cuda")]
    pub(crate) fn from_states(config: AdamW8bitConfig, states: BTreeMap<String, State>) -> Result<Self> {
        config.adam.validate()?;
        Ok(Self { config, states })
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let mut meta = state::config_metadata(&self.config.adam);
        meta.insert("min_8bit_size".into(), self.config.min_8bit_size.to_string());
        meta
    }
}

impl Optimizer for AdamW8bit {
    fn step(&mut self, params: &mut [Param<'_>], lr: f64) -> Result<()> {
        check_params(params, lr)?;
        for p in params.iter() {
            match self.states.get(p.name) {
                Some(State::Fp32(s)) => state::check_state_len(p.name, s.exp_avg.len(), p.value.len())?,
                Some(State::Blockwise(s)) => state::check_state_len(p.name, s.len(), p.value.len())?,
                None => {}
            }
        }
        let min = self.config.min_8bit_size;
        for p in params.iter_mut() {
            let st = self.states.entry(p.name.to_string()).or_insert_with(|| {
                if p.value.len() < min {
                    State::Fp32(AdamState::new(p.value.len()))
                } else {
                    State::Blockwise(BlockwiseState::new(p.value.len()))
                }
            });
            match st {
                State::Fp32(st) => {
                    st.step += 1;
                    step_fp32(&Scalars::new(&self.config.adam, lr, p.weight_decay, st.step), p.value, p.grad, st);
                }
                State::Blockwise(st) => {
                    st.step += 1;
                    let s = Scalars::new(&self.config.adam, lr, p.weight_decay, st.step);
                    step_blockwise(&s, p.value, p.grad, st);
                }
            }
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.states
            .values()
            .map(|s| match s {
                State::Fp32(s) => 4 * (s.exp_avg.capacity() + s.exp_avg_sq.capacity()),
                State::Blockwise(s) => {
                    s.state1.capacity() + s.state2.capacity() + 4 * (s.absmax1.capacity() + s.absmax2.capacity())
                }
            })
            .sum()
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        let mut file = StateWriter::new("adamw8bit", self.metadata());
        for (name, st) in &self.states {
            match st {
                State::Fp32(s) => file.push_adam(name, s),
                State::Blockwise(s) => file.push_blockwise(name, s),
            }
        }
        file.write(path)
    }

    fn load_state(&mut self, path: &Path) -> Result<()> {
        let min = self.config.min_8bit_size;
        let mut states = BTreeMap::new();
        for (name, entry) in state::read_state(path, "adamw8bit", &self.metadata())? {
            let (st, n) = match entry {
                StateTensor::Adam(s) => {
                    let n = s.exp_avg.len();
                    (State::Fp32(s), n)
                }
                StateTensor::Blockwise(s) => {
                    let n = s.len();
                    (State::Blockwise(s), n)
                }
            };
            let expect_8bit = n >= min;
            if expect_8bit != matches!(st, State::Blockwise(_)) {
                return Err(crate::Error::StateFile {
                    path: path.to_path_buf(),
                    detail: format!(
                        "parameter {name} ({n} elements) has {} state, but min_8bit_size = {min} calls for {}",
                        if expect_8bit { "fp32" } else { "8-bit" },
                        if expect_8bit { "8-bit" } else { "fp32" }
                    ),
                });
            }
            states.insert(name, st);
        }
        self.states = states;
        Ok(())
    }
}
