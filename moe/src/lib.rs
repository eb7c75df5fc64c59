//! Mixture-of-experts building blocks for gpt-oss (and any top-k MoE):
//!
//! - [`router`]: linear router with bias, top-k selection (ties to the lower expert index), softmax
//!   over the selected k logits only, and its backward.
//! - [`plan`]: the routing plan: token slots sorted by expert, per-expert offsets and weights.
//! - [`swiglu`]: gpt-oss's clamped SwiGLU on interleaved gate/up columns, and its backward.
//! - [`block`]: the MoE block forward/backward over any expert-weight format through the
//!   [`ExpertWeights`] trait, so MXFP4, bf16 and GPU implementations plug in.
//!
//! Activations are row-major f32 slices with shapes named in the docs (`[tokens, hidden]`).

pub mod block;
pub mod gemm;
pub mod plan;
pub mod router;
pub mod swiglu;

pub use block::{moe_backward, moe_forward, ExpertWeights, MoeCache, Proj};
pub use plan::RoutingPlan;
pub use router::{route, route_backward, Routing};
pub use swiglu::{swiglu, swiglu_backward, SwigluParams};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("invalid MoE shapes: {0}")]
    Shape(String),
    #[error("top-k needs 1 <= k <= experts, got k = {k} with {experts} experts")]
    TopK { k: usize, experts: usize },
}

pub type Result<T> = std::result::Result<T, Error>;
