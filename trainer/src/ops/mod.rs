//! The model's operations on the CPU, each a forward and its backward over row-major f32 slices.
//! These are the references that the GPU kernels are checked against.

pub mod attention;
pub mod linear;
pub mod loss;
pub mod rmsnorm;
pub mod rope;
