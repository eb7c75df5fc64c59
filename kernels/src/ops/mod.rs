//! One module per op: the CPU reference, the CUDA source (`include_str!`), the typed launcher and
//! the tests that compare them.

pub mod rmsnorm;

/// Every kernel source, for the compile check that CI runs without a GPU.
pub const SOURCES: &[(&str, &str)] = &[("rmsnorm", rmsnorm::SRC)];
