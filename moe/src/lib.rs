//! Mixture-of-experts building blocks for gpt-oss (and any top-k MoE):
//!
//! - [`router`]: linear router with bias, top-k selection (ties to the lower expert index), softmax
//!   over the selected k logits only, and its backward.
//! - [`plan`]: the routing plan: token slots sorted by expert, per-expert offsets and weights (and,
//!   with `cuda`, built on the device from the router's output).
//! - [`permute`]: rows between token order and slot order (gather, combine and their backwards)
//!   and the per-expert bias.
//! - [`swiglu`]: gpt-oss's clamped SwiGLU on interleaved gate/up columns, and its backward.
//! - [`block`]: the MoE block forward/backward over any expert-weight format through the
//!   [`ExpertWeights`] trait, so MXFP4, bf16 and GPU implementations plug in.
//!
//! Activations are row-major f32 slices with shapes named in the docs (`[tokens, hidden]`).
//!
//! With the `cuda` feature, each op's module also holds its CUDA source (`SRC`) and typed
//! launchers (`<op>_gpu`, through `oxtune-kernels`) that write into caller-provided device buffers.

pub mod block;
pub mod gemm;
#[cfg(feature = "cuda")]
mod gpu_util;
pub mod permute;
pub mod plan;
pub mod router;
pub mod swiglu;

pub use block::{moe_backward, moe_forward, ExpertWeights, MoeCache, Proj};
pub use plan::RoutingPlan;
pub use router::{route, route_backward, Routing};
pub use swiglu::{swiglu, swiglu_backward, SwigluParams};

/// Every kernel source of this crate with its module name (unique in the workspace), for the
/// compile check that CI runs without a GPU.
#[cfg(feature = "cuda")]
pub const SOURCES: &[(&str, &str)] =
    &[("moe_router", router::SRC), ("moe_plan", plan::SRC), ("moe_permute", permute::SRC), ("moe_swiglu", swiglu::SRC)];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("invalid MoE shapes: {0}")]
    Shape(String),
    #[error("top-k needs 1 <= k <= experts, got k = {k} with {experts} experts")]
    TopK { k: usize, experts: usize },
}

pub type Result<T> = std::result::Result<T, Error>;
