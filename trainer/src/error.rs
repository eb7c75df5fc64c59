use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{file}: {msg}")]
    Checkpoint { file: PathBuf, msg: String },
    #[error("tensor `{name}` in {file}: {msg}")]
    Tensor { name: String, file: PathBuf, msg: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("GPU: {0}")]
    Gpu(String),
    #[error(transparent)]
    Mxfp4(#[from] oxtune_mxfp4::Error),
    #[error(transparent)]
    Moe(#[from] oxtune_moe::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Gpu(format!("{e:?}"))
    }
}

impl From<oxtune_kernels::Error> for Error {
    fn from(e: oxtune_kernels::Error) -> Self {
        Error::Gpu(e.to_string())
    }
}
