//! oxtune's trainer: the GPT-OSS model assembled from the domain crates (`mxfp4`, `moe`, `lora`,
//! `optim`, `data`): configuration, checkpoint loading, the CPU reference forward and backward passes, the GPU
//! engine (`gpu`), training, sizes and memory estimates.

pub mod adapter;
pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gpu;
pub mod grad;
pub mod io;
pub mod lora_adapter;
pub mod merge;
pub mod model;
pub mod ops;
pub mod plot;
pub mod random_ckpt;
pub mod sample;
pub mod sizes;
pub mod tiny;
pub mod train;
pub mod weights;

#[cfg(test)]
mod testutil;

pub use config::{GptOssConfig, LayerType, RopeScaling};
pub use error::{Error, Result};
pub use model::{KvCache, Model};
