//! RMSNorm: the CPU reference lives next to its CUDA kernels in `oxtune_kernels::ops::rmsnorm`.

pub use oxtune_kernels::ops::rmsnorm::{rmsnorm, rmsnorm_backward};
