//! Attention with sinks, sliding window, causal mask and packed segments: the CPU reference lives
//! next to its CUDA kernels in `oxtune_kernels::ops::attention`.

pub use oxtune_kernels::ops::attention::*;
