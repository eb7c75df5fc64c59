//! Causal-LM cross-entropy: the CPU reference lives next to its CUDA kernel in
//! `oxtune_kernels::ops::cross_entropy`.

pub use oxtune_kernels::ops::cross_entropy::{cross_entropy, shift_labels, IGNORE_INDEX};
