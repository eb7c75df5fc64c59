//! The GPU engine: the model's forward and backward passes on one CUDA device, op for op the CPU
//! reference's (`model.rs`, `grad.rs`), built from the kernels next to those references.
//!
//! Precision: dense weights (attention, embedding, LM head) are bf16 on the device, as checkpoints
//! store them; their GEMMs split each f32 activation into two bf16 halves and run two bf16
//! tensor-core GEMMs with f32 accumulation (cuBLAS), which is about as exact as f32 (rounding the
//! activations to one bf16 put the LoRA gradients 3-6% away from the f32 reference; the split
//! brings them to the f32 level). Experts stay MXFP4 and are dequantized inside the grouped expert
//! GEMM; the router, norms, RoPE, attention, SwiGLU, the loss and every activation are f32; LoRA
//! parameters and their gradients are f32.
//!
//! Activation checkpointing (the default): the forward pass keeps only each layer's input; the
//! backward pass recomputes a layer just before differentiating it, so one layer's activations
//! exist at a time.
//!
//! Memory: every buffer is allocated once, when the engine is built for a token budget (the
//! largest micro-batch), in named groups: weights, LoRA (values and gradients), per-layer saved
//! activations, and scratch. A step allocates nothing. Before allocating, the engine compares what
//! it needs with the device's free memory and says what to change when it does not fit.
//!
//! Routing is decided on the device; each MoE layer copies the chosen experts (4 bytes per token
//! and choice) to the host to build the expert-sorted plan, the one synchronisation per layer.

mod engine;
mod weights;

use std::sync::Arc;

pub use engine::GpuEngine;
use oxtune_kernels::Gpu;

use crate::error::{Error, Result};

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cuda,
    Cpu,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "cpu" => Ok(Device::Cpu),
            _ => Err(Error::Input(format!("device {s:?}: expected auto, cuda or cpu"))),
        }
    }
}

/// Opens GPU 0 for `device`: `None` for the CPU (asked for, or `auto` on a machine without a
/// usable GPU: the reason is returned so it can be reported), an error when `cuda` was asked for
/// and cannot be had.
pub fn open(device: Device) -> Result<(Option<Arc<Gpu>>, Option<String>)> {
    match device {
        Device::Cpu => Ok((None, None)),
        Device::Cuda => Gpu::new(0)
            .map(|g| (Some(Arc::new(g)), None))
            .map_err(|e| Error::Gpu(format!("--device cuda: {e}. Use --device cpu (or auto) to run on the CPU"))),
        Device::Auto => match Gpu::new(0) {
            Ok(g) => Ok((Some(Arc::new(g)), None)),
            Err(e) => Ok((None, Some(e.to_string()))),
        },
    }
}

/// A description of the device for logs: name, memory and architecture.
pub fn describe(gpu: &Gpu) -> String {
    let name = gpu.ctx.name().unwrap_or_else(|_| "CUDA device".into());
    let total = gpu.ctx.total_mem().unwrap_or(0);
    format!("{name} ({:.1} GiB, {})", total as f64 / GIB, gpu.arch)
}

pub(crate) const GIB: f64 = (1u64 << 30) as f64;

/// What to do when the device runs out of memory, for the error messages.
pub(crate) fn oom_advice(what: &str, need: usize, free: usize, total: usize) -> Error {
    Error::Gpu(format!(
        "out of GPU memory: {what} needs {:.2} GiB but {:.2} GiB of {:.2} GiB are free. Lower max_len or \
         micro_batch (activations grow with the tokens of a micro-batch), train LoRA on fewer weights \
         (attention only), close other programs using the GPU, or run on the CPU with --device cpu",
        need as f64 / GIB,
        free as f64 / GIB,
        total as f64 / GIB
    ))
}
