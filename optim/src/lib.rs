//! Optimizers for oxtune: AdamW with `torch.optim.AdamW` semantics, 8-bit AdamW with bitsandbytes'
//! `AdamW8bit` semantics, global-norm gradient clipping and the transformers learning-rate schedules.
//!
//! # API used by the trainer
//!
//! Parameters are flat row-major `f32` slices named by their adapter key. Each optimizer step the trainer
//! clips the accumulated gradients, asks the schedule for the learning rate and steps the optimizer, which
//! creates a parameter's state on its first step:
//!
//! ```
//! use oxtune_optim::{clip_grad_norm, AdamW8bit, AdamW8bitConfig, LrSchedule, Optimizer, Param, ScheduleKind};
//!
//! # fn main() -> oxtune_optim::Result<()> {
//! let (mut a, mut b) = (vec![0.01f32; 8 * 2880], vec![0.02f32; 4096 * 8]);
//! let (mut ga, mut gb) = (vec![1e-3f32; a.len()], vec![-2e-3f32; b.len()]);
//! let schedule = LrSchedule::new(ScheduleKind::CosineWithMinLr { num_cycles: 0.5, min_lr_rate: 0.1 }, 2e-4, 3, 100)?;
//! let mut opt = AdamW8bit::new(AdamW8bitConfig::default())?;
//! for k in 0..3 {
//!     let grad_norm = clip_grad_norm(&mut [&mut ga[..], &mut gb[..]], 1.0)?;
//!     let mut params = [
//!         Param::new("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", &mut a, &ga),
//!         Param::new("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", &mut b, &gb),
//!     ];
//!     opt.step(&mut params, schedule.lr(k))?;
//!     # let _ = grad_norm;
//! }
//! let path = std::env::temp_dir().join(format!("oxtune-optim-doc-{}.safetensors", std::process::id()));
//! opt.save_state(&path)?;
//! let mut resumed = AdamW8bit::new(AdamW8bitConfig::default())?;
//! resumed.load_state(&path)?;
//! # std::fs::remove_file(&path).ok();
//! # Ok(())
//! # }
//! ```
//!
//! - [`AdamW`] / [`AdamWConfig`]: fp32 moments, torch order of operations (decay, then moments, then the
//!   bias-corrected update).
//! - [`AdamW8bit`] / [`AdamW8bitConfig`]: bitsandbytes' blockwise (256) dynamic 8-bit moments for tensors of at
//!   least `min_8bit_size` (4096) elements, 2 + 8/256 bytes per element; fp32 below that. See `adamw8bit.rs`
//!   for the exact update.
//! - [`Optimizer`]: `step(params, lr)`, `state_bytes()`, `save_state(path)` / `load_state(path)` (safetensors,
//!   exact round trip, atomic write).
//! - [`clip_grad_norm`] / [`global_grad_norm`]: torch's global-norm clipping.
//! - [`LrSchedule`] / [`ScheduleKind`]: constant, linear, cosine and cosine-with-min-lr, each with warmup.
//! - [`quant8`]: the dynamic 8-bit maps and blockwise (de)quantization.
//! - With feature `cuda`, the same updates on the GPU (`cuda::AdamWGpu`, `cuda::AdamW8bitGpu`, states on the
//!   device, exchanged with the CPU optimizers for the state file) and the global gradient norm and
//!   clipping over every tensor in one launch per pass (`cuda::GradClip`).

mod adamw;
mod adamw8bit;
mod clip;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod quant8;
mod schedule;
mod state;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use adamw::{AdamW, AdamWConfig};
pub use adamw8bit::{AdamW8bit, AdamW8bitConfig, BlockwiseView};
pub use clip::{clip_coef, clip_grad_norm, global_grad_norm};
pub use schedule::{LrSchedule, ScheduleKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid optimizer setting: {0}")]
    Config(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error(
        "parameter {name} has {param} elements but its gradient has {grad}; pass the gradient buffer of that parameter"
    )]
    GradLength { name: String, param: usize, grad: usize },
    #[error("parameter {0} appears twice in one optimizer step; give every tensor a unique name")]
    DuplicateName(String),
    #[error(
        "the optimizer state of {name} has {state} elements but the parameter has {param}; the state belongs to a \
         different model or adapter (start a fresh optimizer or load the matching state file)"
    )]
    StateLength { name: String, state: usize, param: usize },
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {source}")]
    SafeTensors { path: PathBuf, source: safetensors::SafeTensorError },
    #[error("optimizer state file {path}: {detail}")]
    StateFile { path: PathBuf, detail: String },
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Gpu(#[from] oxtune_kernels::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One trainable tensor for an optimizer step.
#[derive(Debug)]
pub struct Param<'a> {
    /// Unique, stable key of the tensor (its optimizer state is stored under it).
    pub name: &'a str,
    pub value: &'a mut [f32],
    pub grad: &'a [f32],
    /// Whether decoupled weight decay applies (the HF Trainer exempts biases and norms).
    pub weight_decay: bool,
}

impl<'a> Param<'a> {
    /// A parameter that receives weight decay.
    pub fn new(name: &'a str, value: &'a mut [f32], grad: &'a [f32]) -> Self {
        Self { name, value, grad, weight_decay: true }
    }

    /// A parameter exempt from weight decay.
    pub fn without_decay(name: &'a str, value: &'a mut [f32], grad: &'a [f32]) -> Self {
        Self { name, value, grad, weight_decay: false }
    }
}

/// An optimizer over named f32 tensors.
pub trait Optimizer: Send {
    /// Updates every parameter in place from its gradient with learning rate `lr`. Nothing is modified if
    /// any parameter is invalid (gradient length, duplicate name, state of another size).
    fn step(&mut self, params: &mut [Param<'_>], lr: f64) -> Result<()>;

    /// Bytes held by the optimizer states (allocated capacity).
    fn state_bytes(&self) -> usize;

    /// Writes every state to a safetensors file (atomically: temp file, fsync, rename).
    fn save_state(&self, path: &Path) -> Result<()>;

    /// Replaces every state with the contents of a file written by `save_state` of the same optimizer kind
    /// and hyperparameters.
    fn load_state(&mut self, path: &Path) -> Result<()>;
}

/// Kernel sources of the `cuda` module (module names prefixed `optim_`), for the compile check that CI runs
/// without a GPU.
#[cfg(feature = "cuda")]
pub const SOURCES: &[(&str, &str)] =
    &[("optim_adamw", cuda::ADAMW_SRC), ("optim_adamw8bit", cuda::ADAMW8BIT_SRC), ("optim_clip", cuda::CLIP_SRC)];

pub(crate) fn check_params(params: &[Param<'_>], lr: f64) -> Result<()> {
    check_step(params.iter().map(|p| (p.name, p.value.len(), p.grad.len())), lr)
}

/// The validation of `Optimizer::step` over `(name, value length, gradient length)` of every parameter.
pub(crate) fn check_step<'a>(params: impl Iterator<Item = (&'a str, usize, usize)>, lr: f64) -> Result<()> {
    if !(lr >= 0.0 && lr.is_finite()) {
        return Err(Error::Config(format!("learning rate {lr} must be finite and non-negative")));
    }
    let mut seen = HashSet::new();
    for (name, param, grad) in params {
        if param != grad {
            return Err(Error::GradLength { name: name.to_string(), param, grad });
        }
        if !seen.insert(name) {
            return Err(Error::DuplicateName(name.to_string()));
        }
    }
    Ok(())
}
