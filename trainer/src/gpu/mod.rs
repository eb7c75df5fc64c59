//! The GPU engine: the model's forward and backward passes on one CUDA device, op for op the CPU
//! reference's (`model.rs`, `grad.rs`), built from the kernels next to those references.
//!
//! Precision ([`Precision`]): dense weights (attention, LM head) are bf16 on the device, as
//! checkpoints store them. By default ([`Precision::Exact`]) their GEMMs split each f32 activation
//! into two bf16 halves and run two bf16 tensor-core products with f32 accumulation, which is
//! about as exact as f32 (rounding the activations to one bf16 put the LoRA gradients 3-6% away
//! from the f32 reference; the split brings them to the f32 level); [`Precision::Bf16`] rounds
//! them once, as a bf16 transformers model does, for half the tensor-core work. Experts stay MXFP4
//! and are dequantized inside the grouped expert GEMM; the router, norms, RoPE, attention, SwiGLU,
//! the loss and every activation are f32; LoRA parameters and their gradients are f32.
//!
//! Activation checkpointing (the default): the forward pass keeps only each layer's input; the
//! backward pass recomputes a layer just before differentiating it, so one layer's activations
//! exist at a time, and the experts' activations exist for one chunk of [`MOE_CHUNK`] tokens at a
//! time (each chunk's experts are recomputed just before their backward), which is what lets a
//! 65,536-token sequence train on one GPU.
//!
//! Memory: every buffer is allocated once, when the engine is built for a token budget (the
//! largest micro-batch), in named groups: weights, LoRA (values and gradients), per-layer saved
//! activations, and scratch (with the [`Gpu`]'s shared scratch, where the attention and expert
//! kernels stage bf16 splits of their operands, reserved for the largest op). A step allocates
//! nothing. Before allocating, the engine compares what
//! it needs with the device's free memory and says what to change when it does not fit. The
//! embedding table stays in host memory, page-locked and mapped for the device: the embedding
//! kernel reads each batch's rows over the bus (where the table cannot be page-locked, the host
//! gathers them and uploads them).
//!
//! Routing is decided on the device; each MoE layer copies the chosen experts (4 bytes per token
//! and choice) to the host to build each chunk's expert-sorted plan, the one synchronisation per
//! layer. With checkpointing the forward pass keeps each layer's routing, and the recomputation
//! before the layer's backward reuses it: no router and no synchronisation there.
//!
//! After each optimizer step (`step::DeviceStep`) the trainable values and the optimizer state
//! are copied into page-locked host buffers allocated once, on a second stream while the next
//! step runs (two sets, so a complete step survives a copy that a fault stops half-way: the last
//! step or the one before); they become the CPU adapter and optimizer only when a checkpoint is
//! written.

mod engine;
mod graphs;
pub(crate) mod step;
mod weights;

use std::sync::Arc;

pub use engine::{GpuEngine, RoutingStats, MOE_CHUNK};
pub use oxtune_kernels::Gpu;

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

/// How the tensor-core products treat their f32 activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Each activation split into two bf16 halves (`x = hi + lo` to ~2^-17), two products: about as
    /// exact as f32 (LoRA gradients within ~1e-4 of the f32 reference), twice the tensor-core work.
    #[default]
    Exact,
    /// Activations rounded to bf16 once, as transformers computes a bf16 model: one product,
    /// LoRA gradients within a few percent of the f32 reference.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(Precision::Exact),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::Input(format!("precision {s:?}: expected exact or bf16"))),
        }
    }
}

/// How a [`GpuEngine`] is built besides its token budget.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Keep only each layer's input and recompute the layer in the backward pass.
    pub checkpointing: bool,
    /// With checkpointing, MoE layers run in chunks of this many tokens ([`MOE_CHUNK`]).
    pub moe_chunk: usize,
    pub precision: Precision,
    /// With checkpointing, keep each layer's input in page-locked host memory instead of on the
    /// device (4 · hidden bytes per token and layer: 18 GB at 65,536 tokens for gpt-oss), copied
    /// out in the forward pass and back before the layer's recomputation.
    pub offload_checkpoints: bool,
    /// Keep the embedding table in pageable host memory and gather each batch's rows on the host
    /// (the fallback when the table cannot be page-locked) instead of mapped page-locked memory
    /// that the embedding kernel reads.
    pub pageable_embeddings: bool,
    /// Replay the training pass of a micro-batch size seen before as two CUDA graphs (the layers
    /// forward; the layers backward), captured the second time that size comes, instead of
    /// launching its ~3,000 kernels one by one. The LM head and loss between them are launched
    /// as usual. Off: every pass launched one kernel at a time.
    pub cuda_graphs: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            checkpointing: true,
            moe_chunk: MOE_CHUNK,
            precision: Precision::Exact,
            offload_checkpoints: false,
            pageable_embeddings: false,
            cuda_graphs: true,
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
         (attention only), keep the activation checkpoints in host memory (--offload-checkpoints), close other programs using the GPU, or run on the CPU with --device cpu",
        need as f64 / GIB,
        free as f64 / GIB,
        total as f64 / GIB
    ))
}
