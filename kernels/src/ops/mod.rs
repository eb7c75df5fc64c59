//! One module per op: the CPU reference, the CUDA source (`include_str!`), the typed launcher and
//! the tests that compare them.

pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod rmsnorm;
pub mod rope;

/// Every kernel source of this crate, for the compile check that CI runs without a GPU.
pub const SOURCES: &[(&str, &str)] = &[
    ("attention", attention::SRC),
    ("cross_entropy", cross_entropy::SRC),
    ("elementwise", elementwise::SRC),
    ("embedding", embedding::SRC),
    ("fault", crate::device::FAULT_SRC),
    ("gemm", gemm::SRC),
    ("rmsnorm", rmsnorm::SRC),
    ("rope", rope::SRC),
];
