//! Hooks through which trainable adapters (LoRA) join the frozen model's linear maps.
//!
//! The model calls [`Adapter`] after each frozen projection: `forward` adds the adapter's output,
//! `backward` adds its input gradient and accumulates its own parameter gradients (`+=`).

use oxtune_moe::{ExpertWeights, Proj};

use crate::weights::Experts;

/// The dense projections of an attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dense {
    Q,
    K,
    V,
    O,
}

impl Dense {
    pub const ALL: [Dense; 4] = [Dense::Q, Dense::K, Dense::V, Dense::O];

    /// The module name in Hugging Face / PEFT key paths.
    pub fn name(self) -> &'static str {
        match self {
            Dense::Q => "q_proj",
            Dense::K => "k_proj",
            Dense::V => "v_proj",
            Dense::O => "o_proj",
        }
    }
}

pub trait Adapter: Sync {
    /// `y [n, out] += Δ(x [n, in])` for a dense projection of layer `layer`.
    fn dense_forward(&self, layer: usize, m: Dense, x: &[f32], y: &mut [f32]);
    /// `dx [n, in] += ∂Δ/∂x · dy`; accumulates the adapter's parameter gradients.
    fn dense_backward(&self, layer: usize, m: Dense, x: &[f32], dy: &[f32], dx: &mut [f32]);
    /// As `dense_forward` for expert `e`'s projection (tokens routed to it only).
    fn expert_forward(&self, layer: usize, p: Proj, e: usize, x: &[f32], y: &mut [f32]);
    /// As `dense_backward` for expert `e`'s projection.
    fn expert_backward(&self, layer: usize, p: Proj, e: usize, x: &[f32], dy: &[f32], dx: &mut [f32]);
}

/// The frozen model alone.
pub struct NoAdapter;

impl Adapter for NoAdapter {
    fn dense_forward(&self, _: usize, _: Dense, _: &[f32], _: &mut [f32]) {}
    fn dense_backward(&self, _: usize, _: Dense, _: &[f32], _: &[f32], _: &mut [f32]) {}
    fn expert_forward(&self, _: usize, _: Proj, _: usize, _: &[f32], _: &mut [f32]) {}
    fn expert_backward(&self, _: usize, _: Proj, _: usize, _: &[f32], _: &[f32], _: &mut [f32]) {}
}

/// A layer's experts with the adapter applied, as the MoE block sees them.
pub struct AdaptedExperts<'a> {
    pub base: &'a Experts,
    pub adapter: &'a dyn Adapter,
    pub layer: usize,
}

impl ExpertWeights for AdaptedExperts<'_> {
    fn num_experts(&self) -> usize {
        self.base.num_experts
    }
    fn hidden(&self) -> usize {
        self.base.hidden
    }
    fn intermediate(&self) -> usize {
        self.base.intermediate
    }
    fn forward(&self, proj: Proj, expert: usize, x: &[f32], out: &mut [f32]) {
        self.base.forward(proj, expert, x, out);
        self.adapter.expert_forward(self.layer, proj, expert, x, out);
    }
    fn backward(&self, proj: Proj, expert: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        self.base.backward(proj, expert, x, dy, dx);
        self.adapter.expert_backward(self.layer, proj, expert, x, dy, dx);
    }
}
