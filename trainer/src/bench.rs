//! The training benchmark on the GPU (`oxtune bench-train`): a model of any gpt-oss shape with
//! random weights in the real layout (MXFP4 experts), one batch of random tokens that all carry a
//! loss, LoRA on attention and experts, and timed optimizer steps exactly as `oxtune train` runs
//! them (forward, backward, clipping and 8-bit AdamW on the device, the host copy of the result).

use std::sync::Arc;
use std::time::Instant;

use oxtune_kernels::Gpu;
use oxtune_optim::{AdamW8bit, AdamW8bitConfig};

use crate::config::GptOssConfig;
use crate::error::{Error, Result};
use crate::gpu::step::{DeviceStep, Opt};
use crate::gpu::{EngineOptions, GpuEngine, Precision};
use crate::grad::TrainBatch;
use crate::lora_adapter::{LoraAdapter, LoraSpec};
use crate::model::Model;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub model: GptOssConfig,
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub lora_experts: bool,
    /// Timed steps, after `warmup` untimed ones (the first compiles the kernels).
    pub steps: usize,
    pub warmup: usize,
    pub checkpointing: bool,
    pub precision: Precision,
    pub offload_checkpoints: bool,
    /// Replay each step's pass from CUDA graphs ([`EngineOptions::cuda_graphs`]).
    pub cuda_graphs: bool,
    pub seed: u64,
}

/// What was measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub seq: usize,
    pub batch: usize,
    pub layers: usize,
    pub experts: usize,
    pub rank: usize,
    pub lora_experts: bool,
    pub checkpointing: bool,
    pub precision: Precision,
    /// Whether the timed steps replayed their pass from CUDA graphs.
    pub cuda_graphs: bool,
    pub trainable: usize,
    /// Median over the timed steps.
    pub step_s: f64,
    pub tok_s: f64,
    /// Device memory in use after the steps (the driver's count: every allocation plus the
    /// context). The engine allocates everything before the first step, so this is the peak.
    pub peak_gib: f64,
    /// Of that, what the engine allocated (weights, LoRA, activations, scratch).
    pub engine_gib: f64,
    /// Model FLOPs per step (6 · active parameters · tokens + attention) over step time, as a
    /// fraction of the H100 SXM's 989 dense bf16 TFLOP/s.
    pub mfu: f64,
    /// Seconds per phase of the median step: forward + backward on the device, the optimizer
    /// (clipping and 8-bit AdamW on the device, then the host's copy of values and state).
    pub fwd_bwd_s: f64,
    pub optimizer_s: f64,
    pub losses: Vec<f64>,
}

/// Dense bf16 tensor-core peak of an H100 SXM, the MFU denominator.
pub const H100_BF16_FLOPS: f64 = 989e12;

/// FLOPs of one training step: `6 · active · tokens` for the weights plus attention's
/// `QKᵀ` and `PV` (forward `4 · d · heads` per visible key, backward twice that).
pub fn step_flops(c: &GptOssConfig, seq: usize, batch: usize) -> f64 {
    let active = crate::sizes::params(c).active as f64;
    let tokens = (seq * batch) as f64;
    let mut attn = 0.0;
    for l in 0..c.num_hidden_layers {
        let keys: f64 = match c.layer_types.get(l) {
            Some(crate::config::LayerType::Sliding) => {
                (0..seq).map(|i| (i + 1).min(c.sliding_window) as f64).sum::<f64>() / seq as f64
            }
            _ => (seq + 1) as f64 / 2.0,
        };
        attn += 3.0 * 4.0 * (c.head_dim * c.num_attention_heads) as f64 * keys * tokens;
    }
    6.0 * active * tokens + attn
}

/// A model of `b`'s shapes with random weights in the real layout (MXFP4 experts), for
/// [`bench_train`] (several runs can share one).
pub fn bench_model(b: &BenchConfig, log: &mut dyn FnMut(&str)) -> Result<Model> {
    let t0 = Instant::now();
    let model = crate::random_ckpt::random_model(&b.model, b.seed)?;
    log(&format!("random weights: {:.1}s", t0.elapsed().as_secs_f64()));
    Ok(model)
}

/// Times training steps of `model` (from [`bench_model`]) as `b` says.
pub fn bench_train(gpu: Arc<Gpu>, model: &Model, b: &BenchConfig, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let spec = LoraSpec { r: b.rank, alpha: 2.0 * b.rank as f32, experts: b.lora_experts, ..LoraSpec::default() };
    let adapter = LoraAdapter::new(&model.cfg, spec, b.seed)?;
    let tokens = b.seq * b.batch;
    let t1 = Instant::now();
    let opts = EngineOptions {
        checkpointing: b.checkpointing,
        precision: b.precision,
        offload_checkpoints: b.offload_checkpoints,
        cuda_graphs: b.cuda_graphs,
        ..Default::default()
    };
    let mut eng = GpuEngine::with_options(gpu.clone(), model, &adapter, tokens, opts)?;
    log(&format!(
        "engine on the device: {:.1}s, {:.2} GiB",
        t1.elapsed().as_secs_f64(),
        eng.bytes as f64 / crate::gpu::GIB
    ));
    if let Some(why) = eng.embeddings_pageable() {
        log(&format!("embedding table in pageable host memory ({why}): each step's rows gathered on the host"));
    }
    let v = b.model.vocab_size as u64;
    let mut x = b.seed | 1;
    let mut next = || {
        // xorshift64*: random token ids without a dependency.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % v
    };
    let ids: Vec<u32> = (0..tokens).map(|_| next() as u32).collect();
    let batch = TrainBatch {
        pos: (0..b.batch).flat_map(|_| 0..b.seq as u32).collect(),
        seg: vec![0; tokens],
        rows: (0..b.batch).map(|r| r * b.seq..(r + 1) * b.seq).collect(),
        targets: (0..tokens).map(|i| if (i + 1) % b.seq == 0 { -100 } else { ids[i + 1] as i64 }).collect(),
        ids,
    };
    let counted = batch.counted().max(1);
    let cpu_opt = AdamW8bit::new(AdamW8bitConfig::default()).map_err(|e| Error::Input(e.to_string()))?;
    let mut dev = DeviceStep::<()>::new(&gpu, &Opt::AdamW8bit(cpu_opt))?;
    let names: Vec<String> = adapter.tensors().into_iter().map(|(k, _, _)| k).collect();
    let (mut times, mut losses) = (vec![], vec![]);
    let warm = b.warmup;
    // Whether graphs were held when the timed steps began (else the first timed step captured them).
    let mut replayed = false;
    for step in 0..b.steps + warm {
        if step == warm {
            replayed = eng.graphed_sizes() > 0;
            eng.reset_profile();
        }
        let s0 = Instant::now();
        eng.zero_grads()?;
        let (sum, n) = eng.forward_backward(&batch, 1.0 / counted as f32)?;
        let fb = s0.elapsed().as_secs_f64();
        // As `oxtune train` on a GPU: clip and step on the device, then the host's copy of the
        // adapter and optimizer state (what a checkpoint after a GPU fault saves).
        eng.clip_grads(false, 1.0)?;
        dev.step(&mut eng, &names, false, 1e-4, ())?;
        if step == 0 {
            log(&format!(
                "host copy of each step: {:.2} GiB pinned (two sets)",
                dev.host_bytes() as f64 / crate::gpu::GIB
            ));
        }
        let total_s = s0.elapsed().as_secs_f64();
        let loss = sum / n.max(1) as f64;
        log(&format!(
            "step {}/{}{}: loss {loss:.4}, {total_s:.3}s ({fb:.3}s forward+backward), {:.0} tok/s",
            step + 1,
            b.steps + warm,
            if step < warm { " (warm-up)" } else { "" },
            tokens as f64 / total_s
        ));
        losses.push(loss);
        if step >= warm {
            times.push((total_s, fb));
        }
    }
    for (phase, secs) in eng.profile() {
        log(&format!("profile (OXTUNE_PROFILE, per timed step): {phase}: {:.4}s", secs / b.steps as f64));
    }
    // The first step of a size runs eagerly, the second is captured: with two warm-up steps the
    // timed ones replay the graphs.
    let cuda_graphs = replayed && eng.graphed_sizes() > 0;
    match eng.cuda_graphs_off() {
        Some(why) => log(&format!("CUDA graphs off: {why}")),
        None if cuda_graphs => log("CUDA graphs: each step's layers forward and backward replayed as two graphs"),
        None if eng.graphed_sizes() > 0 => {
            log("CUDA graphs: captured in the first timed step, replayed in the others (--warmup 2 times replays only)")
        }
        None => log("CUDA graphs: none captured (a size is captured on its second step)"),
    }
    let r = eng.routing_stats();
    if r.plans > 0 {
        // Rows the expert kernels multiply for every row that holds a token: tiles x tile rows / slots.
        let fill = |tiles: usize, rows: usize| (tiles * rows) as f64 / r.slots.max(1) as f64;
        log(&format!(
            "profile (OXTUNE_PROFILE): {} routing plans, {:.0} expert slots each, at most {} rows for one expert; \
             row tiles of 128: {:.2}x the rows (one tile per {:.0} slots); of 256: {:.2}x",
            r.plans,
            r.slots as f64 / r.plans as f64,
            r.max_rows,
            fill(r.tiles_128, 128),
            r.slots as f64 / r.tiles_128.max(1) as f64,
            fill(r.tiles_256, 256),
        ));
    }
    let (free1, total) = gpu.ctx.mem_get_info()?;
    let engine_bytes = eng.bytes;
    // The optimizer first: it waits for its last host copy, which reads the engine's buffers.
    drop(dev);
    drop(eng);
    gpu.release_cached_memory()?;
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (step_s, fwd_bwd_s) = times[times.len() / 2];
    Ok(BenchReport {
        device: crate::gpu::describe(&gpu),
        seq: b.seq,
        batch: b.batch,
        layers: b.model.num_hidden_layers,
        experts: b.model.num_local_experts,
        rank: b.rank,
        lora_experts: b.lora_experts,
        checkpointing: b.checkpointing,
        precision: b.precision,
        cuda_graphs,
        trainable: adapter.num_params(),
        step_s,
        tok_s: tokens as f64 / step_s,
        peak_gib: (total - free1) as f64 / crate::gpu::GIB,
        engine_gib: engine_bytes as f64 / crate::gpu::GIB,
        mfu: step_flops(&b.model, b.seq, b.batch) / step_s / H100_BF16_FLOPS,
        fwd_bwd_s,
        optimizer_s: step_s - fwd_bwd_s,
        losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_of_gpt_oss_20b_at_2048() {
        // 6 × 3.6e9 × 2048 ≈ 44 TFLOP plus attention (a few TFLOP): the arithmetic.
        let f = step_flops(&GptOssConfig::gpt_oss_20b(), 2048, 1);
        assert!(f > 44e12 && f < 52e12, "{f:e}");
    }
}
