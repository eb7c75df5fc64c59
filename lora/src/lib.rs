//! LoRA and QLoRA layers for oxtune, with PEFT-compatible adapter files.
//!
//! # API used by the trainer
//!
//! Activations are row-major f32 slices `[tokens, features]` on the CPU; every backward accumulates parameter
//! gradients with `+=` and adds its input-gradient contribution into `dx` with `+=`.
//!
//! - [`LoraLinear`] (dense layers, e.g. `q_proj`): `A [r, in]`, `B [out, r]` as plain `Vec<f32>`.
//!   `forward(x, y, dropout)` adds `s (dropout(x) A^T) B^T` into `y` and returns the [`LoraActivations`] the
//!   backward needs; `backward(x, act, dy, dx, dropout, grads)` accumulates [`LoraGrads`] and `dx`.
//!   `merge_into` / `unmerge_from` fold `ΔW = s B A` into an f32 or bf16 base weight. Dropout masks
//!   ([`DropoutMask`]) are drawn per call from a seed and reused by the backward.
//! - [`LoraExperts`] (3-D expert weights, PEFT `target_parameters`): `A [r·E, in]`, `B [out, r·E]`;
//!   `forward_expert(e, x_e, y_e)` / `backward_expert(e, ...)` for the tokens routed to expert `e`, and
//!   `merge_into(w, layout)` per expert ([`ExpertLayout`]: transformers' `[E, in, out]` or checkpoint `[E, out, in]`).
//! - [`FrozenWeight`]: the frozen base `W [out, in]` in any storage (`dequantize_rows`, `nbytes`), with
//!   `matmul_acc` (`y += x W^T`) and `matmul_t_acc` (`dx += dy W`) provided tile by tile. Implemented by
//!   [`Bf16Weight`] and [`Nf4Weight`] (bitsandbytes NF4, optionally double-quantized); `trainer` implements it
//!   for MXFP4 experts.
//! - [`save_adapter`] / [`load_adapter`]: PEFT adapter directories. The caller describes each LoRA pair by a
//!   [`LoraSite`] built from its PEFT module path (`LoraSite::linear`, `LoraSite::expert_param`); loading checks
//!   every name and shape and reports all mismatches at once. [`GptOssDims::sites`] lists the sites of a
//!   gpt-oss adapter (attention projections and expert weights, with PEFT's nesting of the latter).
//!
//! ```
//! use oxtune_lora::{load_adapter, save_adapter, AdapterConfig, AdapterTensor, Bf16Weight, FrozenWeight,
//!                   LoraConfig, LoraLinear, LoraSite};
//! use rand::SeedableRng;
//!
//! # fn main() -> oxtune_lora::Result<()> {
//! let (tokens, d_in, d_out) = (3, 64, 32);
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let base = Bf16Weight::new(vec![half::bf16::from_f32(0.01); d_out * d_in], d_out, d_in)?;
//! let mut lora = LoraLinear::new(d_in, d_out, &LoraConfig { r: 4, alpha: 8.0, ..Default::default() }, &mut rng)?;
//! lora.b.iter_mut().for_each(|b| *b = 0.1); // as if trained
//!
//! let x = vec![0.5f32; tokens * d_in];
//! let mut y = vec![0.0f32; tokens * d_out];
//! base.matmul_acc(&x, &mut y)?; // y = x W^T
//! let act = lora.forward(&x, &mut y, None)?; // y += s (x A^T) B^T
//!
//! let dy = vec![1.0f32; tokens * d_out];
//! let mut dx = vec![0.0f32; tokens * d_in];
//! let mut grads = lora.zero_grads();
//! base.matmul_t_acc(&dy, &mut dx)?;
//! lora.backward(&x, &act, &dy, Some(&mut dx), None, &mut grads)?;
//!
//! let site = LoraSite::linear("base_model.model.model.layers.0.self_attn.q_proj", d_in, d_out, 4);
//! let dir = std::env::temp_dir().join(format!("oxtune-lora-doc-{}", std::process::id()));
//! let config = AdapterConfig::new(4, 8.0, vec!["q_proj".into()], vec![]);
//! save_adapter(&dir, &config, &[AdapterTensor { site: &site, a: &lora.a, b: &lora.b }])?;
//! let loaded = load_adapter(&dir, &[site])?;
//! assert_eq!(loaded.pairs[0].b, lora.b);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

mod adapter;
mod dense;
mod experts;
mod frozen;
mod gemm;
pub mod nf4;

use std::path::PathBuf;

pub use adapter::{
    load_adapter, read_adapter_config, save_adapter, AdapterConfig, AdapterTensor, GptOssDims, LoadedAdapter, LoraPair,
    LoraSite, TargetModules, CONFIG_FILE, GPT_OSS_EXPERT_PARAMS, WEIGHTS_FILE,
};
pub use dense::{DropoutMask, LoraActivations, LoraConfig, LoraGrads, LoraLinear};
pub use experts::{ExpertLayout, LoraExperts};
pub use frozen::{check_tile, Bf16Weight, FrozenWeight};
pub use nf4::{Nf4Absmax, Nf4Tensor, Nf4Weight};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} has the wrong shape: expected {expected}, got {got}")]
    Shape { what: String, expected: String, got: String },
    #[error("invalid LoRA setting: {0}")]
    Config(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("{what}: element {index} is {value}; only finite values can be quantized")]
    NonFinite { what: String, index: usize, value: f32 },
    #[error(
        "the adapter in {path} does not match the model:\n  {problems}\nCheck that it was trained for this model \
         with the same target_modules, target_parameters and r."
    )]
    AdapterMismatch { path: PathBuf, problems: String },
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {source}")]
    SafeTensors { path: PathBuf, source: safetensors::SafeTensorError },
    #[error("{path} is not a valid adapter config: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    /// A [`FrozenWeight`] implementation outside this crate (e.g. MXFP4 in `trainer`) failed to decode.
    #[error("the frozen base weight could not be decoded: {0}")]
    Base(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn shape_err(what: &str, expected: impl ToString, got: impl ToString) -> Error {
    Error::Shape { what: what.to_string(), expected: expected.to_string(), got: got.to_string() }
}
