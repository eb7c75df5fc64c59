//! `oxtune`: fine-tune GPT-OSS with LoRA / QLoRA.

mod bench_cmd;
mod data_cmd;
mod merge_cmd;
mod model_cmd;
mod train_cmd;

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
        /// A LoRA adapter directory (PEFT format) applied on top of the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Also write `grad.<key>` for every adapter tensor: the gradient of the mean loss (needs
        /// --adapter and labels).
        #[arg(long)]
        grads: bool,
        /// Use an adapter that oxtune recorded as trained on another base model.
        #[arg(long)]
        ignore_base_mismatch: bool,
    },
    /// Generate a reply: `--prompt TEXT` prints the assistant's final answer; `--prompt-ids 1,2,3`
    /// continues raw token ids and prints the new ids as JSON. Greedy unless --temperature > 0.
    Generate {
        /// Model directory [default: the embedded tiny GPT-OSS].
        #[arg(long)]
        model: Option<PathBuf>,
        /// LoRA adapter directory (PEFT format).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A user message, rendered in the harmony chat format.
        #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
        prompt: Option<String>,
        /// Comma-separated prompt token ids, e.g. 1,2,3.
        #[arg(long)]
        prompt_ids: Option<String>,
        /// With --prompt-ids: do not stop at the config's eos_token_id.
        #[arg(long)]
        ignore_eos: bool,
        #[command(flatten)]
        decode: DecodeArgs,
    },
    /// Chat with the model in the terminal (harmony format; prints the final channel).
    Chat {
        /// Model directory [default: the embedded tiny GPT-OSS].
        #[arg(long)]
        model: Option<PathBuf>,
        /// LoRA adapter directory (PEFT format).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[command(flatten)]
        decode: DecodeArgs,
    },
    /// Fine-tune with LoRA: prints progress (step, loss, lr, tokens/s, ETA), writes the adapter
    /// (PEFT format), checkpoints, metrics.jsonl and loss.svg to --out.
    Train(Box<train_cmd::TrainArgs>),
    /// Measure training speed and GPU memory at gpt-oss shapes with random weights (GPU only),
    /// optionally side by side with the transformers + PEFT peer on the same card.
    BenchTrain(bench_cmd::BenchArgs),
    /// Write a checkpoint with random weights in gpt-oss's real layout (bf16 dense tensors, MXFP4
    /// experts, sharded with an index) for benchmarks and GPU runs at real shapes, no download.
    InitRandom {
        /// `gpt-oss-20b`, `gpt-oss-120b`, `tiny`, or a directory whose config.json to use.
        #[arg(long, default_value = "gpt-oss-20b")]
        config: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Check and render chat datasets (JSONL) in the harmony format.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// Merge a LoRA adapter into its base model: a Hugging Face directory in bf16 or MXFP4.
    Merge(merge_cmd::MergeArgs),
    /// Write an adapter as one safetensors file whose metadata names rank, alpha, targets and the base.
    ExportAdapter(merge_cmd::ExportAdapterArgs),
}

#[derive(clap::Args)]
struct DecodeArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with probability >= P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// A system prompt (rendered as the developer message's instructions).
    #[arg(long)]
    system: Option<String>,
    /// Also print the analysis channel (chain of thought).
    #[arg(long)]
    show_reasoning: bool,
    /// Use an adapter that oxtune recorded as trained on another base model.
    #[arg(long)]
    ignore_base_mismatch: bool,
    /// Where to run: auto (the GPU when one is usable, else the CPU), cuda, or cpu.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Tokens of context (prompt and answer) the GPU buffers are sized for.
    #[arg(long, default_value_t = 4096)]
    context: usize,
}

impl DecodeArgs {
    fn decode(self) -> anyhow::Result<model_cmd::Decode> {
        Ok(model_cmd::Decode {
            sampling: oxtune_trainer::sample::SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            max_new_tokens: self.max_new_tokens,
            system: self.system,
            show_reasoning: self.show_reasoning,
            ignore_base_mismatch: self.ignore_base_mismatch,
            device: self.device.parse()?,
            context: self.context,
        })
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Inspect { model_dir, seq, rank } => model_cmd::inspect(&model_dir, seq, rank),
        Cmd::Forward { model, tokens, out, adapter, grads, ignore_base_mismatch } => {
            model_cmd::forward(&model, &tokens, &out, adapter.as_deref(), grads, ignore_base_mismatch)
        }
        Cmd::Generate { model, adapter, prompt, prompt_ids, ignore_eos, decode } => {
            let d = decode.decode()?;
            match (prompt, prompt_ids) {
                (Some(p), _) => model_cmd::generate_text(model.as_deref(), adapter.as_deref(), &p, &d),
                (None, Some(ids)) => {
                    model_cmd::generate_ids(model.as_deref(), adapter.as_deref(), &ids, &d, ignore_eos)
                }
                (None, None) => anyhow::bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
            }
        }
        Cmd::Chat { model, adapter, decode } => {
            model_cmd::chat(model.as_deref(), adapter.as_deref(), &decode.decode()?)
        }
        Cmd::InitRandom { config, out, seed } => model_cmd::init_random(&config, &out, seed),
        Cmd::Train(a) => train_cmd::run(*a),
        Cmd::BenchTrain(a) => bench_cmd::run(a),
        Cmd::Data(c) => data_cmd::run(c),
        Cmd::Merge(a) => merge_cmd::merge(a),
        Cmd::ExportAdapter(a) => merge_cmd::export_adapter(a),
    }
}
