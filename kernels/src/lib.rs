//! CUDA for oxtune through cudarc: device setup with clear errors when the driver or a library is
//! missing, NVRTC compilation of embedded `.cu` sources for the device's architecture with an
//! on-disk CUBIN cache, and ops that keep their CPU reference, their CUDA source and their typed
//! launcher together (`ops::<op>`).
//!
//! Every CUDA library is dlopen'ed at run time, so this crate builds and its CPU references run on
//! machines without CUDA. Kernels compile without a GPU too: `nvrtc::compile_cubin` needs only
//! libnvrtc and the CUDA headers (CI installs both from PyPI wheels).

pub mod blas;
pub mod device;
pub mod nvrtc;
pub mod ops;
pub mod pinned;
pub mod testing;

pub use device::Gpu;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the NVIDIA driver library (libcuda) could not be loaded; dlopen tried {}: {}. Install the NVIDIA driver or add its directory to LD_LIBRARY_PATH, or train on the CPU",
        searched.len(),
        searched.join(", ")
    )]
    NoDriver { searched: Vec<String> },
    #[error(
        "the CUDA library {lib} could not be loaded; dlopen tried {}: {}. Add its directory to LD_LIBRARY_PATH (pip's nvidia-cuda-nvrtc wheel ships libnvrtc.so.13)",
        searched.len(),
        searched.join(", ")
    )]
    NoLibrary { lib: &'static str, searched: Vec<String> },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("NVRTC could not compile kernel source `{name}` with {options:?}:\n{log}")]
    Compile { name: String, options: Vec<String>, log: String },
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(format!("{e:?}"))
    }
}
