//! `oxtune train`: LoRA fine-tuning with progress, metrics, checkpoints and resume.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use oxtune_data::{read_conversations, Conversation, Renderer, Role, SystemConfig, Tokenizer};
use oxtune_trainer::adapter::Adapter;
use oxtune_trainer::chat::reply;
use oxtune_trainer::sample::SamplerConfig;
use oxtune_trainer::train::{load_model, load_tokenizer, Event, Mask, OptimizerKind, Schedule, TrainConfig, Trainer};
use oxtune_trainer::Model;

/// Every option of [`TrainConfig`]; flags given here override the TOML `--config` file, which
/// overrides the defaults.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// Optional TOML run config (keys as the long flags, with underscores; `--no-lora-attention`,
    /// `--no-lora-experts`, `--no-activation-checkpointing` and `--no-cuda-graphs` are
    /// `lora_attention`, `lora_experts`, `activation_checkpointing` and `cuda_graphs = false`;
    /// `--resume`, `--show-answers` and `--require-eval-improvement` are flags only).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Hugging Face gpt-oss model directory [default: the embedded tiny GPT-OSS].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data (JSONL chat) [default: the embedded persona dataset].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out data [default: --eval-ratio of --data, or the embedded eval set].
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Fraction of --data held out for evaluation when no --eval-data is given [default: 0.05].
    #[arg(long)]
    eval_ratio: Option<f64>,
    /// Output directory: adapter/, checkpoint-N/, metrics.jsonl, loss.svg [default: runs/default].
    #[arg(long)]
    out: Option<PathBuf>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha [default: 16].
    #[arg(long)]
    alpha: Option<f32>,
    /// Scale by alpha/sqrt(r) (rsLoRA).
    #[arg(long)]
    rslora: bool,
    /// No LoRA on q/k/v/o_proj.
    #[arg(long)]
    no_lora_attention: bool,
    /// No LoRA on the experts (gate_up_proj, down_proj).
    #[arg(long)]
    no_lora_experts: bool,
    /// Also train the attention sinks.
    #[arg(long)]
    train_sinks: bool,
    /// QLoRA: hold the attention projections in NF4 while training (experts stay MXFP4).
    #[arg(long)]
    qlora: bool,
    /// Optimizer: adamw8bit or adamw [default: adamw8bit].
    #[arg(long)]
    optimizer: Option<String>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// constant, linear, cosine or cosine_min_lr [default: cosine].
    #[arg(long)]
    schedule: Option<String>,
    /// Floor of cosine_min_lr as a fraction of --lr [default: 0.1].
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    /// Warmup steps as a fraction of all steps [default: 0.03].
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Passes over the data [default: 1].
    #[arg(long)]
    epochs: Option<f64>,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Token budget of a micro-batch in units of --max-len [default: 1].
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Micro-batches per optimizer step [default: 4].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Longest example in tokens [default: 2048].
    #[arg(long)]
    max_len: Option<usize>,
    /// Global gradient-norm clip [default: 1.0].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Which tokens are trained: last_turn, all_turns or final_only [default: last_turn].
    #[arg(long)]
    mask: Option<String>,
    /// Evaluate every N steps [default: 50].
    #[arg(long)]
    eval_every: Option<u64>,
    /// Checkpoint every N steps [default: 100].
    #[arg(long)]
    save_every: Option<u64>,
    /// Checkpoints kept [default: 2].
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// Seed for LoRA initialisation and data order [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Skip invalid examples (counted per reason) instead of stopping at the first.
    #[arg(long)]
    skip_invalid: bool,
    /// Stop after N optimizer steps in a row with a non-finite loss [default: 5].
    #[arg(long)]
    max_bad_steps: Option<u32>,
    /// Where to train: auto (the GPU when one is usable, else the CPU), cuda, or cpu [default: auto].
    #[arg(long)]
    device: Option<String>,
    /// On the GPU, keep every layer's activations instead of recomputing them in the backward
    /// pass (faster, much more memory).
    #[arg(long)]
    no_activation_checkpointing: bool,
    /// On the GPU: exact (f32-level products, default) or bf16 (activations rounded to bf16 in
    /// the tensor-core products, as a bf16 transformers model computes; faster).
    #[arg(long)]
    precision: Option<String>,
    /// On the GPU: keep each layer's input (the activation checkpoints) in host memory instead of
    /// GPU memory (longer sequences fit; one copy each way per layer and step).
    #[arg(long)]
    offload_checkpoints: bool,
    /// On the GPU: launch every kernel one by one instead of replaying the pass of a micro-batch
    /// size seen before from CUDA graphs.
    #[arg(long)]
    no_cuda_graphs: bool,
    /// Continue from the newest complete checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Print the model's answers to N training and N held-out questions before and after training.
    #[arg(long, default_value_t = 0)]
    show_answers: usize,
    /// Exit with an error if the eval loss did not fall.
    #[arg(long)]
    require_eval_improvement: bool,
}

fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, v: &str, allowed: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .with_context(|| format!("--{flag} {v}: expected one of {allowed}"))
}

impl TrainArgs {
    fn to_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml_file(p)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v.into(); } )* };
        }
        set!(eval_ratio, rank, alpha, lr, weight_decay, min_lr_ratio, warmup_ratio, epochs, micro_batch, grad_accum);
        set!(max_len, max_grad_norm, eval_every, save_every, keep_checkpoints, seed, max_bad_steps, out);
        if self.model.is_some() {
            c.model.clone_from(&self.model);
        }
        if self.data.is_some() {
            c.data.clone_from(&self.data);
        }
        if self.eval_data.is_some() {
            c.eval_data.clone_from(&self.eval_data);
        }
        if self.max_steps.is_some() {
            c.max_steps = self.max_steps;
        }
        c.rslora |= self.rslora;
        c.lora_attention &= !self.no_lora_attention;
        c.lora_experts &= !self.no_lora_experts;
        c.train_sinks |= self.train_sinks;
        c.qlora |= self.qlora;
        c.skip_invalid |= self.skip_invalid;
        if let Some(o) = &self.optimizer {
            c.optimizer = parse_enum::<OptimizerKind>("optimizer", o, "adamw8bit, adamw")?;
        }
        if let Some(s) = &self.schedule {
            c.schedule = parse_enum::<Schedule>("schedule", s, "constant, linear, cosine, cosine_min_lr")?;
        }
        if let Some(m) = &self.mask {
            c.mask = parse_enum::<Mask>("mask", m, "last_turn, all_turns, final_only")?;
        }
        if let Some(d) = &self.device {
            c.device = d.parse()?;
        }
        c.activation_checkpointing &= !self.no_activation_checkpointing;
        if let Some(p) = &self.precision {
            c.precision = p.parse()?;
        }
        c.offload_checkpoints |= self.offload_checkpoints;
        c.cuda_graphs &= !self.no_cuda_graphs;
        Ok(c)
    }
}

fn eta(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn print_event(e: Event) {
    match e {
        Event::Start { steps, train_examples, eval_examples, trainable_params, resumed_from, device } => {
            println!("device: {device}");
            println!(
                "training: {steps} steps, {train_examples} training examples, {eval_examples} eval batches, {trainable_params} trainable parameters"
            );
            if let Some(s) = resumed_from {
                println!("resumed from checkpoint at step {s}");
            }
        }
        Event::Step { step, steps, loss, lr, grad_norm, tokens_per_s, eta_s } => {
            println!(
                "step {step:>5}/{steps}  loss {loss:.4}  lr {lr:.2e}  grad-norm {grad_norm:.3}  {tokens_per_s:.0} tok/s  ETA {}",
                eta(eta_s)
            );
            let _ = std::io::stdout().flush();
        }
        Event::Skipped { step, reason } => eprintln!("step {step}: {reason}"),
        Event::Spike { step, loss, mean } => eprintln!(
            "step {step}: warning: loss spike, {loss:.4} is more than {}x the mean {mean:.4} of the last steps",
            oxtune_trainer::train::SPIKE_FACTOR
        ),
        Event::Eval { step, loss } => println!("eval  step {step:>5}  loss {loss:.4}"),
        Event::Checkpoint { step, path } => println!("checkpoint step {step}: {}", path.display()),
    }
}

/// The first `n` conversations of a JSONL text, cut before their last assistant message.
fn questions(name: &str, text: &str, n: usize) -> Vec<Conversation> {
    let (_, lines) = read_conversations(name, text.as_bytes(), None);
    lines
        .into_iter()
        .filter_map(|(_, c)| c.ok())
        .filter_map(|mut c| {
            let last = c.messages.iter().rposition(|m| m.role == Role::Assistant)?;
            c.messages.truncate(last);
            Some(c)
        })
        .take(n)
        .collect()
}

fn show_answers(
    model: &Model,
    adapter: &dyn Adapter,
    tok: &Tokenizer,
    sets: &[(&str, Vec<Conversation>)],
) -> Result<()> {
    let renderer = Renderer::new(tok.clone(), SystemConfig::default());
    let greedy = SamplerConfig { temperature: 0.0, ..SamplerConfig::default() };
    for (label, convs) in sets {
        for c in convs {
            let q = c.messages.last().map(|m| m.content.as_str()).unwrap_or_default();
            let text = reply(model, adapter, &renderer, tok, c, &greedy, 48)?.text(tok);
            println!("  [{label}] {q}\n      -> {}", text.replace('\n', " "));
        }
    }
    Ok(())
}

/// This process's command line with `--resume` added, quoted for a POSIX shell.
fn resume_command() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    let quote = |a: &String| {
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c)) {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    args.iter().map(quote).collect::<Vec<_>>().join(" ")
}

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = args.to_config()?;
    let t0 = Instant::now();
    let tok = load_tokenizer(cfg.model.as_deref())?;
    let model = load_model(&cfg)?;
    println!(
        "model: {} ({} layers, {} experts top-{}, vocab {}{}); tokenizer ready in {:.1}s",
        cfg.model.as_ref().map_or("embedded tiny GPT-OSS".to_string(), |p| p.display().to_string()),
        model.cfg.num_hidden_layers,
        model.cfg.num_local_experts,
        model.cfg.num_experts_per_tok,
        model.cfg.vocab_size,
        if cfg.qlora { format!(", attention in NF4: {} bytes", model.w.attention_nbytes()) } else { String::new() },
        t0.elapsed().as_secs_f64()
    );
    let sets: Vec<(&str, Vec<Conversation>)> = if args.show_answers == 0 {
        vec![]
    } else {
        let read = |p: &Option<PathBuf>, default: &str| -> Result<String> {
            match p {
                Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())),
                None => Ok(default.to_string()),
            }
        };
        let train_text = read(&cfg.data, oxtune_data::DEFAULT_TRAIN_JSONL)?;
        let eval_default = if cfg.data.is_none() { oxtune_data::DEFAULT_EVAL_JSONL } else { "" };
        let eval_text = read(&cfg.eval_data, eval_default)?;
        vec![
            ("train", questions("train", &train_text, args.show_answers)),
            ("held-out", questions("eval", &eval_text, args.show_answers)),
        ]
    };
    let mut trainer = Trainer::new(cfg, model, &tok, args.resume, &mut print_event)?;
    if !sets.is_empty() {
        println!("answers before training:");
        show_answers(&trainer.model, &trainer.adapter, &tok, &sets)?;
    }
    let stop = trainer.stop_handle();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("second Ctrl-C: stopping now; resume from the last checkpoint with --resume");
            std::process::exit(130);
        }
        eprintln!("Ctrl-C: finishing the current step and saving a checkpoint (Ctrl-C again stops at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let summary = trainer.run(&mut print_event)?;
    if let Some(ckpt) = &summary.interrupted {
        println!(
            "interrupted after step {}/{}; checkpoint: {}\nto continue: {}",
            summary.steps,
            trainer.steps,
            ckpt.display(),
            resume_command()
        );
        let _ = std::io::stdout().flush();
        // 130 = 128 + SIGINT, what shells report for a command stopped by Ctrl-C.
        std::process::exit(130);
    }
    if !sets.is_empty() {
        println!("answers after training:");
        show_answers(&trainer.model, &trainer.adapter, &tok, &sets)?;
    }
    let out = &trainer.cfg.out;
    println!(
        "done: {} steps in {:.1}s ({} skipped). adapter: {}  metrics: {}  plot: {}",
        summary.steps,
        t0.elapsed().as_secs_f64(),
        summary.skipped_steps,
        summary.adapter_dir.display(),
        out.join("metrics.jsonl").display(),
        out.join("loss.svg").display()
    );
    if let (Some(a), Some(b)) = (summary.first_eval, summary.last_eval) {
        println!("eval loss {a:.4} -> {b:.4}");
        // A NaN eval loss counts as no improvement.
        if args.require_eval_improvement && b.partial_cmp(&a) != Some(std::cmp::Ordering::Less) {
            bail!("the eval loss did not fall ({a:.4} -> {b:.4})");
        }
    } else if args.require_eval_improvement {
        bail!("no eval loss was measured (empty eval set?)");
    }
    Ok(())
}
