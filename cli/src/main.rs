//! `oxtune`: fine-tune GPT-OSS with LoRA / QLoRA.

mod data_cmd;
mod model_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "oxtune", version, about = "Fine-tune OpenAI GPT-OSS models with LoRA / QLoRA")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Summarize a model directory: config, tensors, bytes by dtype, parameters, and an estimate of
    /// GPU memory for LoRA training. Works from config.json alone.
    Inspect {
        model_dir: PathBuf,
        /// Tokens per micro-batch for the memory estimate.
        #[arg(long, default_value_t = 2048)]
        seq: u64,
        /// LoRA rank for the memory estimate.
        #[arg(long, default_value_t = 8)]
        rank: u64,
    },
    /// Run the model on token ids and write logits (and the loss when labels are given).
    Forward {
        /// Model directory (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Safetensors file with `input_ids` (I64 [B, T]) and optionally `labels` (I64 [B, T], -100 = ignored).
        #[arg(long)]
        tokens: PathBuf,
        /// Output safetensors file: `logits` (F32 [B, T, V]) and `loss` (F32 [1]) when labels are given.
        #[arg(long)]
        out: PathBuf,
    },
    /// Greedy decoding with a KV cache; prints the new token ids as a JSON array.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated prompt token ids, e.g. 1,2,3.
        #[arg(long)]
        prompt_ids: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Do not stop at the config's eos_token_id.
        #[arg(long)]
        ignore_eos: bool,
    },
    /// Check and render chat datasets (JSONL) in the harmony format.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Inspect { model_dir, seq, rank } => model_cmd::inspect(&model_dir, seq, rank),
        Cmd::Forward { model, tokens, out } => model_cmd::forward(&model, &tokens, &out),
        Cmd::Generate { model, prompt_ids, max_new_tokens, ignore_eos } => {
            model_cmd::generate(&model, &prompt_ids, max_new_tokens, ignore_eos)
        }
        Cmd::Data(c) => data_cmd::run(c),
    }
}
