//! `oxtune bench-train`: training speed and memory on the GPU at gpt-oss shapes, optionally side by
//! side with the transformers + PEFT peer measured in the same run.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use oxtune_trainer::bench::{bench_model, bench_train, BenchConfig};
use oxtune_trainer::gpu::Device;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// `gpt-oss-20b`, `gpt-oss-120b` or `tiny` shapes (random weights, MXFP4 experts).
    #[arg(long, default_value = "gpt-oss-20b")]
    config: String,
    /// Tokens per sequence; a comma-separated list runs one benchmark per length (e.g.
    /// `8192,16384,32768,65536`), each with the peer when `--peer` is given.
    #[arg(long, default_value = "2048", value_delimiter = ',')]
    seq: Vec<usize>,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// LoRA rank (alpha = 2 · rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA on attention only (default: attention and every expert).
    #[arg(long)]
    attention_only: bool,
    /// Layers (default: the config's).
    #[arg(long)]
    layers: Option<usize>,
    /// Keep every layer's activations (no recomputation in the backward pass).
    #[arg(long)]
    no_checkpointing: bool,
    /// Tensor-core products: exact (activations split into two bf16 halves, f32-level) or bf16
    /// (activations rounded to bf16 once, as the transformers peer computes).
    #[arg(long, default_value = "exact")]
    precision: String,
    /// Keep each layer's input (the checkpoints) in host memory.
    #[arg(long)]
    offload_checkpoints: bool,
    /// Launch every kernel of a step one by one instead of replaying the step's pass from CUDA
    /// graphs (captured on the second step).
    #[arg(long)]
    no_cuda_graphs: bool,
    /// Timed steps, after the warm-up steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (the first compiles the kernels on a fresh machine).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also run this peer script (benches/peer/hf_peft_baseline.py: transformers + PEFT) with the
    /// same shapes on the same card and print both with their ratio.
    #[arg(long)]
    peer: Option<PathBuf>,
    /// Peer option: gradient checkpointing off.
    #[arg(long)]
    peer_no_grad_ckpt: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let Some(mut model) = crate::model_cmd::named_config(&a.config) else {
        bail!("--config {}: expected gpt-oss-20b, gpt-oss-120b or tiny", a.config)
    };
    if let Some(l) = a.layers {
        model.num_hidden_layers = l;
        model.layer_types.truncate(l);
        if model.layer_types.len() != l {
            bail!("--layers {l}: the config has only {} layers", model.layer_types.len());
        }
    }
    if a.seq.is_empty() || a.seq.contains(&0) {
        bail!("--seq: expected one or more positive lengths, got {:?}", a.seq);
    }
    let precision: oxtune_trainer::gpu::Precision = a.precision.parse()?;
    if a.offload_checkpoints && a.no_checkpointing {
        bail!("--offload-checkpoints keeps the activation checkpoints in host memory: it needs checkpointing (drop --no-checkpointing)");
    }
    let (gpu, _) = oxtune_trainer::gpu::open(Device::Cuda)?;
    let gpu = gpu.context("no GPU")?;
    let mut model_w = None;
    for &seq in &a.seq {
        let cfg = BenchConfig {
            model: model.clone(),
            seq,
            batch: a.batch,
            rank: a.rank,
            lora_experts: !a.attention_only,
            steps: a.steps.max(1),
            warmup: a.warmup,
            checkpointing: !a.no_checkpointing,
            precision,
            offload_checkpoints: a.offload_checkpoints,
            cuda_graphs: !a.no_cuda_graphs,
            seed: 0,
        };
        if model_w.is_none() {
            model_w = Some(bench_model(&cfg, &mut |line| eprintln!("{line}"))?);
        }
        bench_one(gpu.clone(), model_w.as_ref().expect("made above"), &a, &cfg)?;
    }
    Ok(())
}

/// One benchmark (and the peer's at the same shapes when asked), printed.
fn bench_one(
    gpu: std::sync::Arc<oxtune_trainer::gpu::Gpu>,
    weights: &oxtune_trainer::Model,
    a: &BenchArgs,
    cfg: &BenchConfig,
) -> Result<()> {
    let (model, seq) = (&cfg.model, cfg.seq);
    eprintln!("== {} layers, {} experts, {seq} tokens x {}", model.num_hidden_layers, model.num_local_experts, a.batch);
    let r = bench_train(gpu, weights, cfg, &mut |line| eprintln!("{line}"))?;
    println!("RESULT {}", serde_json::to_string(&r)?);
    println!(
        "oxtune: {:.0} tokens/s, {:.3} s/step ({:.3} s forward+backward, {:.3} s optimizer), {:.2} GiB in use ({:.2} GiB allocated by the engine), MFU {:.1}% on {}",
        r.tok_s,
        r.step_s,
        r.fwd_bwd_s,
        r.optimizer_s,
        r.peak_gib,
        r.engine_gib,
        100.0 * r.mfu,
        r.device
    );
    if let Some(script) = &a.peer {
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(["--seq", &seq.to_string(), "--batch", &a.batch.to_string(), "--rank", &a.rank.to_string()])
            .args([
                "--layers",
                &model.num_hidden_layers.to_string(),
                "--experts",
                &model.num_local_experts.to_string(),
            ]);
        if !a.attention_only {
            cmd.arg("--lora-experts");
        }
        if a.peer_no_grad_ckpt || a.no_checkpointing {
            cmd.arg("--no-grad-ckpt");
        }
        eprintln!("peer: {cmd:?}");
        let out = cmd.output().with_context(|| format!("running {}", script.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
            println!("peer: no RESULT line (exit {:?}); its stderr ends with:", out.status.code());
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            for l in tail.into_iter().rev() {
                println!("  {l}");
            }
            return Ok(());
        };
        let p: serde_json::Value = serde_json::from_str(line).context("peer RESULT line")?;
        println!("peer RESULT {line}");
        let (pt, pm) = (p["tok_s"].as_f64().unwrap_or(f64::NAN), p["peak_gib"].as_f64().unwrap_or(f64::NAN));
        println!("| | tokens/s | step s | peak GiB |");
        println!("|---|---|---|---|");
        println!("| oxtune | {:.0} | {:.3} | {:.2} |", r.tok_s, r.step_s, r.peak_gib);
        println!("| transformers+peft | {pt:.0} | {:.3} | {pm:.2} |", p["step_s"].as_f64().unwrap_or(f64::NAN));
        println!("| ratio oxtune/peer | {:.2}x | | {:.2}x |", r.tok_s / pt, r.peak_gib / pm);
    }
    Ok(())
}
