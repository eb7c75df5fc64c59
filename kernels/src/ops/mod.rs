//! One module per op: the CPU reference, the CUDA source (`include_str!`), the typed launcher and
//! the tests that compare them.

pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod lowrank;
pub mod rmsnorm;
pub mod rope;

/// How the tensor-core kernels multiply f32 operands on bf16 tensor cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mma {
    /// Each f32 operand split into bf16 `hi + lo` (to ~2^-17 of itself) and the partial products
    /// summed in f32: about as exact as f32, two to three times the tensor-core work.
    #[default]
    Split,
    /// Operands rounded to bf16 once (as a bf16 model in PyTorch computes): one product.
    Bf16,
}

impl Mma {
    /// bf16 parts each f32 operand is staged as: hi and lo, or hi alone.
    pub const fn parts(self) -> usize {
        match self {
            Mma::Split => 2,
            Mma::Bf16 => 1,
        }
    }
}

/// Every kernel source of this crate, for the compile check that CI runs without a GPU.
pub const SOURCES: &[(&str, &str)] = &[
    ("attention", attention::SRC),
    ("attention_bf16", attention::SRC_ONE_PASS),
    ("cross_entropy", cross_entropy::SRC),
    ("elementwise", elementwise::SRC),
    ("embedding", embedding::SRC),
    ("fault", crate::device::FAULT_SRC),
    ("gemm", gemm::SRC),
    ("gemm_bf16", gemm::SRC_ONE_PASS),
    ("gemm_two_stage", gemm::SRC_TWO_STAGE),
    ("gemm_two_stage_bf16", gemm::SRC_TWO_STAGE_ONE_PASS),
    ("lowrank", lowrank::SRC),
    ("rmsnorm", rmsnorm::SRC),
    ("rope", rope::SRC),
];
