//! Helpers shared by the unit tests (they live in `oxtune_kernels::testing` so that the kernels'
//! references and the trainer's tests share one definition).

pub use oxtune_kernels::testing::{fd_check_f64, randn};
