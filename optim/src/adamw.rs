//! AdamW with the semantics of `torch.optim.AdamW` (single-tensor path): decoupled weight decay applied to
//! the parameter before the moment update, bias-corrected moments, fp32 states.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::state::{self, StateTensor, StateWriter};
use crate::{check_params, Error, Optimizer, Param, Result};

/// Elements per rayon task; smaller tensors are stepped on the calling thread.
const CHUNK: usize = 1 << 14;

/// Hyperparameters of [`AdamW`]; the defaults are torch's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64, range: &str| Err(Error::Config(format!("{what} = {v} must be in {range}")));
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "[0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "[0, 1)");
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("eps", self.eps, "[0, inf)");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", self.weight_decay, "[0, inf)");
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AdamState {
    pub step: u64,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl AdamState {
    pub fn new(n: usize) -> Self {
        Self { step: 0, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n] }
    }
}

/// AdamW with fp32 moments, keyed by parameter name.
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    states: BTreeMap<String, AdamState>,
}

impl AdamW {
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

    /// The first and second moments of `name`, if it has been stepped.
    pub fn moments(&self, name: &str) -> Option<(&[f32], &[f32])> {
        self.states.get(name).map(|s| (s.exp_avg.as_slice(), s.exp_avg_sq.as_slice()))
    }

    /// Every state, for the exchange with the GPU optimizer.
    #[cfg(feature = "cuda")]
    pub(crate) fn states(&self) -> &BTreeMap<String, AdamState> {
        &self.states
    }

    /// An optimizer holding `states` (already validated by their producer).
    #[cfg(feature = "cuda")]
    pub(crate) fn from_states(config: AdamWConfig, states: BTreeMap<String, AdamState>) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, states })
    }
}

/// torch's `lerp(start, end, w)`: it switches formula at w = 0.5 to stay exact at w = 1, and its vectorised
/// CPU kernel fuses the multiply-add.
#[inline]
fn torch_lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(end - start, start)
    } else {
        (w - 1.0).mul_add(end - start, end)
    }
}

/// Scalars of one torch AdamW step, rounded to f32 where torch hands them to an f32 kernel (the GPU kernel
/// receives exactly these).
#[derive(Clone, Copy)]
pub(crate) struct StepScalars {
    pub decay: f32,
    pub w1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub neg_step_size: f32,
}

impl StepScalars {
    /// The scalars of step number `step` (1 for the first step).
    pub fn new(cfg: &AdamWConfig, lr: f64, decay: bool, step: u64) -> Self {
        let t = step as f64;
        // torch computes these in Python floats (f64) and converts them when they meet an f32 tensor.
        Self {
            decay: if decay && cfg.weight_decay != 0.0 { (1.0 - lr * cfg.weight_decay) as f32 } else { 1.0 },
            w1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            bc2_sqrt: (1.0 - cfg.beta2.powf(t)).sqrt() as f32,
            eps: cfg.eps as f32,
            neg_step_size: (-(lr / (1.0 - cfg.beta1.powf(t)))) as f32,
        }
    }
}

#[inline]
fn adamw_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, s: StepScalars) {
    *p *= s.decay;
    *m = torch_lerp(*m, g, s.w1);
    *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
    *p += s.neg_step_size * *m / denom;
}

pub(crate) fn adamw_update(
    cfg: &AdamWConfig,
    lr: f64,
    decay: bool,
    value: &mut [f32],
    grad: &[f32],
    st: &mut AdamState,
) {
    st.step += 1;
    let s = StepScalars::new(cfg, lr, decay, st.step);
    let run = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            adamw_element(p, g, m, v, s);
        }
    };
    if value.len() <= CHUNK {
        run(value, grad, &mut st.exp_avg, &mut st.exp_avg_sq);
    } else {
        value
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(st.exp_avg.par_chunks_mut(CHUNK))
            .zip(st.exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| run(p, g, m, v));
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [Param<'_>], lr: f64) -> Result<()> {
        check_params(params, lr)?;
        for p in params.iter() {
            if let Some(st) = self.states.get(p.name) {
                state::check_state_len(p.name, st.exp_avg.len(), p.value.len())?;
            }
        }
        for p in params.iter_mut() {
            let st = self.states.entry(p.name.to_string()).or_insert_with(|| AdamState::new(p.value.len()));
            adamw_update(&self.config, lr, p.weight_decay, p.value, p.grad, st);
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.states.values().map(|s| 4 * (s.exp_avg.capacity() + s.exp_avg_sq.capacity())).sum()
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        let mut file = StateWriter::new("adamw", state::config_metadata(&self.config));
        for (name, st) in &self.states {
            file.push_adam(name, st);
        }
        file.write(path)
    }

    fn load_state(&mut self, path: &Path) -> Result<()> {
        let mut states = BTreeMap::new();
        for (name, entry) in state::read_state(path, "adamw", &state::config_metadata(&self.config))? {
            match entry {
                StateTensor::Adam(st) => {
                    states.insert(name, st);
                }
                StateTensor::Blockwise(_) => {
                    return Err(Error::StateFile {
                        path: path.to_path_buf(),
                        detail: format!("parameter {name} has 8-bit state; it was saved by AdamW8bit, not AdamW"),
                    })
                }
            }
        }
        self.states = states;
        Ok(())
    }
}
