//! The whole model on the GPU (bf16 dense GEMMs, MXFP4 experts, f32 activations) against the CPU
//! reference (f32) and the transformers / PEFT fixtures: logits, loss, LoRA and sink gradients,
//! and 50 training steps. These need an NVIDIA GPU: on the GPU machine run `cargo xtask
//! gpu-bundle`, then `gpu-bundle/run`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use oxtune_kernels::Gpu;
use oxtune_trainer::gpu::{Device, EngineOptions, GpuEngine, Precision};
use oxtune_trainer::grad::TrainBatch;
use oxtune_trainer::lora_adapter::{LoraAdapter, LoraSpec};
use oxtune_trainer::ops::loss::shift_labels;
use oxtune_trainer::train::{Event, TrainConfig, Trainer};
use oxtune_trainer::Model;
use safetensors::SafeTensors;

const NEEDS_GPU: &str = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)";

/// The repository's fixtures: next to the sources this was built from, or under the working
/// directory (the GPU machine runs the bundled binary from a copy of the repository).
fn fixtures() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    if built.exists() {
        built
    } else {
        PathBuf::from("fixtures")
    }
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    st.tensor(name).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite values");
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn gpu() -> Arc<Gpu> {
    Arc::new(Gpu::new(0).unwrap_or_else(|e| panic!("{NEEDS_GPU}: {e}")))
}

fn no_lora(m: &Model) -> LoraAdapter {
    LoraAdapter::new(&m.cfg, LoraSpec { attention: false, experts: false, ..LoraSpec::default() }, 0).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn gpu_logits_match_cpu_and_transformers() {
    let gpu = gpu();
    for (model_dir, reference) in
        [("tiny-top2", "tiny-top2"), ("tiny-top4", "tiny-top4"), ("tiny-top2-bf16", "tiny-top2")]
    {
        let m = Model::load(&fixtures().join("model").join(model_dir)).unwrap();
        let bytes = std::fs::read(fixtures().join("model").join(reference).join("reference.safetensors")).unwrap();
        let r = SafeTensors::deserialize(&bytes).unwrap();
        let ids: Vec<u32> = i64s(&r, "input_ids").iter().map(|&x| x as u32).collect();
        let want = f32s(&r, "logits");
        let seq = r.tensor("input_ids").unwrap().shape()[1];
        let mut eng = GpuEngine::new(gpu.clone(), &m, &no_lora(&m), 64).unwrap();
        let mut got = vec![];
        for row in ids.chunks(seq) {
            got.extend(eng.logits(row).unwrap());
        }
        let cpu = m.forward(&ids, ids.len() / seq, seq).unwrap();
        let (e_cpu, e_hf) = (rel(&got, &cpu), rel(&got, &want));
        println!("{model_dir}: GPU vs CPU logits {e_cpu:.2e}, GPU vs transformers {e_hf:.2e}");
        // The issue asks for 2e-2 (bf16); the split-bf16 GEMMs measure ~6e-6 on an H100, so a
        // regression to plain bf16 rounding (~3e-3) fails here.
        assert!(e_cpu <= 1e-4 && e_hf <= 1e-4, "{model_dir}: logits relative error {e_cpu:.2e} / {e_hf:.2e} > 1e-4");
        // Fresh random ids at a longer length than the sliding window, packed with a second sequence.
        let t = 37;
        let ids: Vec<u32> = (0..t).map(|i| ((i * 7919 + 13) % m.cfg.vocab_size) as u32).collect();
        let got = eng.logits(&ids).unwrap();
        let cpu = m.forward(&ids, 1, t).unwrap();
        let e = rel(&got, &cpu);
        println!("{model_dir}: 37 tokens, GPU vs CPU logits {e:.2e}");
        assert!(e <= 1e-4, "{model_dir}: {e:.2e}");
    }
}

/// Rows of packed sequences (each row's sequence lengths in turn): token `i` of the batch gets
/// `id(i)`, and at position `p` of its sequence the target `target(i, p)` (`None`: not counted).
fn packed(rows: &[&[usize]], id: impl Fn(usize) -> u32, target: impl Fn(usize, usize) -> Option<i64>) -> TrainBatch {
    let (mut b, mut start) = (TrainBatch::default(), 0);
    for row in rows {
        for (s, &len) in row.iter().enumerate() {
            for p in 0..len {
                let i = b.ids.len();
                b.ids.push(id(i));
                b.pos.push(p as u32);
                b.seg.push(s as u32);
                b.targets.push(target(i, p).unwrap_or(-100));
            }
        }
        b.rows.push(start..b.ids.len());
        start = b.ids.len();
    }
    b
}

/// A batch of two rows: three packed sequences, one longer than the sliding window.
fn packed_batch(vocab: usize) -> TrainBatch {
    packed(
        &[&[5, 9], &[23]],
        |i| ((i * 104729 + 7) % vocab) as u32,
        |i, p| (p % 4 != 3).then_some(((i * 31 + 5) % vocab) as i64),
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn gpu_lora_gradients_match_cpu_and_peft() {
    let gpu = gpu();
    let dir = fixtures().join("lora/peft-tiny-top4");
    let m = Model::load(&fixtures().join("model/tiny-top4")).unwrap();
    let mut cpu_adapter = LoraAdapter::load(&dir, &m.cfg).unwrap();
    let mut gpu_adapter = LoraAdapter::load(&dir, &m.cfg).unwrap();

    // PEFT's batch: [2, 12] with labels.
    let ref_bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let r = SafeTensors::deserialize(&ref_bytes).unwrap();
    let ids: Vec<u32> = i64s(&r, "input_ids").iter().map(|&x| x as u32).collect();
    let (bsz, seq) = (2, 12);
    let peft = TrainBatch {
        pos: (0..bsz).flat_map(|_| 0..seq as u32).collect(),
        seg: vec![0; ids.len()],
        rows: (0..bsz).map(|b| b * seq..(b + 1) * seq).collect(),
        targets: shift_labels(&i64s(&r, "labels"), seq),
        ids,
    };
    let mut eng = GpuEngine::new(gpu.clone(), &m, &gpu_adapter, 64).unwrap();
    // Without checkpointing every layer's activations are kept instead of recomputed: the same
    // kernels in the same order, so the gradients must be bit-identical.
    let mut keep_all = GpuEngine::with_checkpointing(gpu.clone(), &m, &gpu_adapter, 64, false).unwrap();
    let mut keep_adapter = LoraAdapter::load(&dir, &m.cfg).unwrap();
    // MoE layers in chunks of 7 tokens (ragged: the batches have 24 and 37 tokens), each chunk's
    // experts recomputed before its backward: the same values per token, LoRA gradients summed
    // chunk by chunk (only the order of the sums differs).
    let mut chunked = GpuEngine::with_options(
        gpu.clone(),
        &m,
        &gpu_adapter,
        64,
        EngineOptions { moe_chunk: 7, ..Default::default() },
    )
    .unwrap();
    let mut chunked_adapter = LoraAdapter::load(&dir, &m.cfg).unwrap();
    // Precision::Bf16: activations rounded to bf16 once in every tensor-core product, as a bf16
    // transformers model computes.
    let bf16 = EngineOptions { precision: Precision::Bf16, ..Default::default() };
    let mut fast = GpuEngine::with_options(gpu.clone(), &m, &gpu_adapter, 64, bf16).unwrap();
    let mut fast_adapter = LoraAdapter::load(&dir, &m.cfg).unwrap();
    // Layer inputs in host memory: the same values copied out and back, bit-identical gradients;
    // and the embedding rows gathered on the host (the fallback of a table that cannot be
    // page-locked) instead of read from mapped host memory by the kernel: the same rows.
    let host = EngineOptions { offload_checkpoints: true, pageable_embeddings: true, ..Default::default() };
    let mut offloaded = GpuEngine::with_options(gpu.clone(), &m, &gpu_adapter, 64, host).unwrap();
    let mut offloaded_adapter = LoraAdapter::load(&dir, &m.cfg).unwrap();
    for (name, batch) in [("PEFT batch", peft.clone()), ("packed batch", packed_batch(m.cfg.vocab_size))] {
        let n = batch.counted();
        cpu_adapter.zero_grad();
        let mut cpu_sinks = vec![vec![0.0f32; m.cfg.num_attention_heads]; m.cfg.num_hidden_layers];
        let (cl, cn) = m.forward_backward(&batch, &cpu_adapter, 1.0 / n as f32, Some(&mut cpu_sinks)).unwrap();
        eng.zero_grads().unwrap();
        let (gl, gn) = eng.forward_backward(&batch, 1.0 / n as f32).unwrap();
        let mut gpu_sinks = vec![vec![0.0f32; m.cfg.num_attention_heads]; m.cfg.num_hidden_layers];
        eng.download_grads(&mut gpu_adapter, Some(&mut gpu_sinks)).unwrap();
        assert_eq!(cn, gn);
        keep_all.zero_grads().unwrap();
        let (kl, _) = keep_all.forward_backward(&batch, 1.0 / n as f32).unwrap();
        keep_all.download_grads(&mut keep_adapter, None).unwrap();
        assert_eq!(kl, gl, "{name}: loss with and without checkpointing");
        for ((key, _, a), (_, _, b)) in gpu_adapter.grads().into_iter().zip(keep_adapter.grads()) {
            assert!(a == b, "{name}: {key} differs with and without activation checkpointing");
        }
        offloaded.zero_grads().unwrap();
        let (ol, _) = offloaded.forward_backward(&batch, 1.0 / n as f32).unwrap();
        offloaded.download_grads(&mut offloaded_adapter, None).unwrap();
        assert!(offloaded.embeddings_pageable().is_some() && eng.embeddings_pageable().is_none());
        assert_eq!(ol, gl, "{name}: loss with the checkpoints in host memory");
        for ((key, _, a), (_, _, b)) in gpu_adapter.grads().into_iter().zip(offloaded_adapter.grads()) {
            assert!(a == b, "{name}: {key} differs with the checkpoints in host memory");
        }
        chunked.zero_grads().unwrap();
        let (ml, _) = chunked.forward_backward(&batch, 1.0 / n as f32).unwrap();
        chunked.download_grads(&mut chunked_adapter, None).unwrap();
        assert_eq!(ml, gl, "{name}: loss with MoE chunks of 7 tokens and without");
        let mut worst = 0.0f64;
        for ((_, _, a), (_, _, b)) in gpu_adapter.grads().into_iter().zip(chunked_adapter.grads()) {
            worst = worst.max(rel(b, a));
        }
        println!("{name}: LoRA gradients with MoE chunks of 7 tokens vs one chunk: {worst:.2e}");
        assert!(worst <= 1e-5, "{name}: MoE chunks change the gradients by {worst:.2e}");
        println!("{name}: loss CPU {:.6} GPU {:.6}", cl / cn as f64, gl / gn as f64);
        assert!(((gl - cl) / cl).abs() <= 1e-5, "{name}: loss {gl} vs {cl}");
        let want: Vec<Vec<f32>> = cpu_adapter.grads().into_iter().map(|(_, _, g)| g.to_vec()).collect();
        let mut worst = (0.0f64, String::new());
        for ((key, _, g), w) in gpu_adapter.grads().into_iter().zip(&want) {
            let e = rel(g, w);
            if e > worst.0 {
                worst = (e, key);
            }
        }
        println!("{name}: worst LoRA gradient relative error GPU vs CPU {:.2e} ({})", worst.0, worst.1);
        fast.zero_grads().unwrap();
        let (fl, _) = fast.forward_backward(&batch, 1.0 / n as f32).unwrap();
        fast.download_grads(&mut fast_adapter, None).unwrap();
        let fast_worst =
            fast_adapter.grads().into_iter().zip(&want).map(|((_, _, g), w)| rel(g, w)).fold(0.0, f64::max);
        let fast_all: Vec<f32> = fast_adapter.grads().into_iter().flat_map(|(_, _, g)| g.to_vec()).collect();
        let fast_overall = rel(&fast_all, &want.concat());
        println!(
            "{name}: Precision::Bf16: loss {:.6}, LoRA gradients vs CPU: {fast_overall:.2e} overall, worst tensor {fast_worst:.2e}",
            fl / gn as f64
        );
        // bf16 operands (2^-9 relative) in every product of the 2 layers, forward and backward.
        // Each kernel's one-pass variant is checked on its own against a reference (the MXFP4
        // GEMM against the product of the rounded inputs, to f32 accuracy; attention within 2e-2);
        // here their sum over the model. Measured on an H100: PEFT batch loss 5.6e-4 relative,
        // gradients 6.05e-2 overall (worst tensor 1.66e-1); packed batch (37 tokens, three
        // sequences, one past the window) loss 3.0e-3, gradients 2.80e-1 (worst 3.53e-1): the
        // attention backward's dP − D cancels, as in any bf16 attention. A wrong product errs
        // by ~100% and moves the loss by far more.
        assert!(((fl - cl) / cl).abs() <= 5e-3, "{name}: bf16 loss {fl} vs {cl}");
        assert!(fast_overall <= 0.35, "{name}: bf16 gradients off by {fast_overall:.2e} overall");
        assert!(fast_worst <= 0.5, "{name}: a bf16 gradient tensor off by {fast_worst:.2e}");
        // The issue asks for 5e-2; measured ~8e-5 (one bf16 rounding of the activations gave 3-6e-2).
        assert!(worst.0 <= 1e-3, "{name}: gradient of {} off by {:.2e}", worst.1, worst.0);
        let e = rel(&gpu_sinks.concat(), &cpu_sinks.concat());
        println!("{name}: sink gradients relative error {e:.2e}");
        assert!(e <= 1e-3, "{name}: sink gradients {e:.2e}");
        if name == "PEFT batch" {
            let mut worst = 0.0f64;
            for (key, _, g) in gpu_adapter.grads() {
                worst = worst.max(rel(g, &f32s(&r, &format!("grad.{key}"))));
            }
            println!("PEFT batch: worst LoRA gradient relative error GPU vs PEFT {worst:.2e}");
            assert!(worst <= 1e-3, "GPU vs PEFT gradients {worst:.2e}");
        }
    }
}

/// A rank-4 LoRA adapter on attention and every expert (`LoraAdapter::new` with `seed`) whose B
/// factors, which PEFT starts at zero (hiding the LoRA's input-gradient terms), are drawn in
/// ±0.05 from `state`.
fn with_nonzero_b(m: &Model, seed: u64, mut state: u64) -> LoraAdapter {
    let mut a = LoraAdapter::new(&m.cfg, LoraSpec { r: 4, ..LoraSpec::default() }, seed).unwrap();
    for (key, b, _) in a.params().into_iter().filter(|(k, _, _)| k.contains("lora_B")) {
        for x in b.iter_mut() {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            *x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        }
        assert!(b.iter().any(|&x| x != 0.0), "{key} stayed zero");
    }
    a
}

/// Dense experts (the bf16 checkpoint) with LoRA on attention and every expert: the experts' bias
/// and LoRA terms, which the MXFP4 kernels add as they store their products, run as passes of
/// their own here. PEFT starts B at zero, which would hide the LoRA's input-gradient term, so both
/// adapters get the same nonzero B first. GPU vs CPU loss and gradients.
#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn gpu_lora_gradients_on_dense_experts_match_cpu() {
    let gpu = gpu();
    let m = Model::load(&fixtures().join("model/tiny-top2-bf16")).unwrap();
    let adapter = || with_nonzero_b(&m, 11, 0x9e37_79b9_7f4a_7c15);
    let (mut cpu_adapter, mut gpu_adapter) = (adapter(), adapter());
    let batch = packed_batch(m.cfg.vocab_size);
    let n = batch.counted();
    cpu_adapter.zero_grad();
    let (cl, _) = m.forward_backward(&batch, &cpu_adapter, 1.0 / n as f32, None).unwrap();
    let mut eng = GpuEngine::new(gpu, &m, &gpu_adapter, 64).unwrap();
    eng.zero_grads().unwrap();
    let (gl, _) = eng.forward_backward(&batch, 1.0 / n as f32).unwrap();
    eng.download_grads(&mut gpu_adapter, None).unwrap();
    println!("dense experts: loss CPU {cl:.6} GPU {gl:.6}");
    assert!(((gl - cl) / cl).abs() <= 1e-5, "dense experts: loss {gl} vs {cl}");
    let want: Vec<Vec<f32>> = cpu_adapter.grads().into_iter().map(|(_, _, g)| g.to_vec()).collect();
    let mut worst = (0.0f64, String::new());
    for ((key, _, g), w) in gpu_adapter.grads().into_iter().zip(&want) {
        assert!(w.iter().any(|&x| x != 0.0), "{key}: the CPU gradient is zero, the test checks nothing");
        let e = rel(g, w);
        if e > worst.0 {
            worst = (e, key);
        }
    }
    println!("dense experts: worst LoRA gradient relative error GPU vs CPU {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 <= 1e-3, "dense experts: gradient of {} off by {:.2e}", worst.1, worst.0);
}

/// A second batch of `packed_batch`'s size (37 tokens) with other ids, targets and sequences.
fn other_batch_of_37(vocab: usize) -> TrainBatch {
    packed(
        &[&[14], &[11, 12]],
        |i| ((i * 7727 + 101) % vocab) as u32,
        |i, p| (p % 3 != 0).then_some(((i * 53 + 17) % vocab) as i64),
    )
}

/// CUDA graphs: a micro-batch size runs eagerly the first time, is captured the second and
/// replayed after; every pass must give the bits of the same pass launched kernel by kernel
/// (the loss and every LoRA and sink gradient), for both batches of one size in turn (their ids,
/// sequences, targets and loss scale are not part of the graphs), in both precisions, with
/// MoE chunks, and with the embedding rows gathered on the host.
#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn cuda_graph_replays_give_the_bits_of_eager_passes() {
    let gpu = gpu();
    let m = Model::load(&fixtures().join("model/tiny-top4")).unwrap();
    let adapter = || with_nonzero_b(&m, 5, 0x2545_f491_4f6c_dd1d);
    let batches = [packed_batch(m.cfg.vocab_size), other_batch_of_37(m.cfg.vocab_size)];
    assert_eq!(batches[0].ids.len(), batches[1].ids.len());
    assert_ne!(batches[0].counted(), batches[1].counted(), "the loss scales should differ");
    let layers = m.cfg.num_hidden_layers;
    let nq = m.cfg.num_attention_heads;
    let pass = |eng: &mut GpuEngine, a: &mut LoraAdapter, b: &TrainBatch| {
        eng.zero_grads().unwrap();
        let (loss, n) = eng.forward_backward(b, 1.0 / b.counted() as f32).unwrap();
        let mut sinks = vec![vec![0.0f32; nq]; layers];
        eng.download_grads(a, Some(&mut sinks)).unwrap();
        let mut grads: Vec<Vec<f32>> = a.grads().into_iter().map(|(_, _, g)| g.to_vec()).collect();
        grads.extend(sinks);
        (loss, n, grads)
    };
    let cases = [
        ("exact", EngineOptions::default()),
        ("bf16", EngineOptions { precision: Precision::Bf16, ..Default::default() }),
        ("MoE chunks of 7", EngineOptions { moe_chunk: 7, ..Default::default() }),
        ("pageable embeddings", EngineOptions { pageable_embeddings: true, ..Default::default() }),
        ("without checkpointing", EngineOptions { checkpointing: false, ..Default::default() }),
    ];
    let mut want_exact = None;
    for (name, opts) in cases {
        let mut a = adapter();
        let mut eager =
            GpuEngine::with_options(gpu.clone(), &m, &a, 64, EngineOptions { cuda_graphs: false, ..opts }).unwrap();
        assert!(eager.cuda_graphs_off().is_some());
        let want: Vec<_> = batches.iter().map(|b| pass(&mut eager, &mut a, b)).collect();
        for (loss, _, grads) in &want {
            assert!(loss.is_finite() && *loss > 0.0);
            assert!(grads.iter().flatten().any(|&g| g != 0.0), "{name}: all gradients zero, nothing is checked");
        }
        assert!(want[0].0 != want[1].0, "{name}: the two batches should have different losses");
        drop(eager);
        if want_exact.is_none() {
            want_exact = Some(want.clone());
        }
        let mut graphed = GpuEngine::with_options(gpu.clone(), &m, &a, 64, opts).unwrap();
        // Eager (first sight), captured and launched, then replayed three times.
        for (i, which) in [0usize, 1, 0, 1, 0].into_iter().enumerate() {
            let got = pass(&mut graphed, &mut a, &batches[which]);
            assert_eq!(graphed.cuda_graphs_off(), None, "{name}: pass {i}");
            assert_eq!(graphed.graphed_sizes(), usize::from(i >= 1), "{name}: graphs held after pass {i}");
            let (loss, n, grads) = &want[which];
            assert_eq!((got.0, got.1), (*loss, *n), "{name}: pass {i} (batch {which}): loss");
            for (t, (g, w)) in got.2.iter().zip(grads).enumerate() {
                assert!(g == w, "{name}: pass {i} (batch {which}): gradient tensor {t} differs from the eager pass");
            }
        }
        println!("{name}: 5 passes (eager, captured, 3 replays) bit for bit as launched one by one");
    }
    // A capture that fails falls back to launching the pass eagerly, for good: here the shared
    // scratch is freed after the first pass, and growing it again is refused inside a capture.
    let want = want_exact.expect("the exact case ran first");
    let mut a = adapter();
    let mut eng = GpuEngine::new(gpu.clone(), &m, &a, 64).unwrap();
    for (i, which) in [0usize, 1, 0, 1].into_iter().enumerate() {
        if i == 1 {
            gpu.release_cached_memory().unwrap();
        }
        let got = pass(&mut eng, &mut a, &batches[which]);
        let off = eng.cuda_graphs_off().map(str::to_string);
        if i == 0 {
            assert_eq!(off, None);
        } else {
            let off = off.expect("the capture should have failed");
            assert!(off.contains("capture failed") && off.contains("scratch"), "{off}");
            assert_eq!(eng.graphed_sizes(), 0);
        }
        let (loss, n, grads) = &want[which];
        assert_eq!((got.0, got.1), (*loss, *n), "fallback: pass {i} (batch {which}): loss");
        assert!(&got.2 == grads, "fallback: pass {i} (batch {which}): gradients differ from the eager pass");
    }
    println!("a failed capture: {}", eng.cuda_graphs_off().unwrap_or_default());
}

fn run(device: Device, out: &Path) -> Vec<f64> {
    let cfg = TrainConfig {
        out: out.to_path_buf(),
        max_steps: Some(50),
        max_len: 256,
        grad_accum: 1,
        eval_every: 0,
        save_every: 0,
        lr: 1e-3,
        device,
        ..TrainConfig::default()
    };
    let _ = std::fs::remove_dir_all(out);
    let model = oxtune_trainer::train::load_model(&cfg).unwrap();
    let tok = oxtune_trainer::train::load_tokenizer(None).unwrap();
    let mut losses = vec![];
    let mut t = Trainer::new(cfg, model, &tok, false, &mut |_| {}).unwrap();
    t.run(&mut |e| {
        if let Event::Step { loss, .. } = e {
            losses.push(loss)
        }
        if let Event::Start { device, .. } = &e {
            println!("device: {device}");
        }
    })
    .unwrap();
    losses
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn fifty_gpu_steps_follow_the_cpu_loss_curve() {
    let _ = gpu();
    let base = std::env::temp_dir().join(format!("oxtune-gpu-curve-{}", std::process::id()));
    let cpu = run(Device::Cpu, &base.join("cpu"));
    let gpu = run(Device::Cuda, &base.join("gpu"));
    assert_eq!((cpu.len(), gpu.len()), (50, 50));
    let rel = |g: f64, c: f64| (g - c).abs() / c.abs();
    let mut steps: Vec<f64> = cpu.iter().zip(&gpu).map(|(&c, &g)| rel(g, c)).collect();
    for (s, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        if s % 10 == 0 || s == 49 {
            println!("step {:>2}: CPU {c:.4}  GPU {g:.4}", s + 1);
        }
    }
    // Mean |relative difference| of each 10 steps (no cancellation between steps).
    let windows: Vec<f64> = steps.chunks(10).map(|w| w.iter().sum::<f64>() / w.len() as f64).collect();
    let worst_window = windows.iter().copied().fold(0.0, f64::max);
    let worst_step = steps.iter().copied().fold(0.0, f64::max);
    steps.sort_by(f64::total_cmp);
    let median = steps[steps.len() / 2];
    println!(
        "relative loss difference over 50 steps: median {median:.2e}, largest {worst_step:.2e}; \
         mean over 10 steps: largest {worst_window:.2e}"
    );
    let (c0, c1) = (cpu[..5].iter().sum::<f64>(), cpu[45..].iter().sum::<f64>());
    assert!(c1 < c0, "the CPU run itself must learn ({c0} -> {c1})");
    // The two runs round differently (f32 in another order, attention's hi/lo bf16 products), so
    // they drift apart slowly; and where a token's 4th and 5th router logits are nearly tied, the
    // difference can send it to another expert on one device only, a jump in that step's loss
    // after which the runs follow slightly different paths. Measured on an H100: a tie 8e-6 wide
    // (step 11, layer 2) moved one step by 1.8e-3 and the largest step by 8.9e-3 later, while the
    // median step stayed at 4.4e-4 and the mean over any 10 steps within 2.1e-3 (with other
    // attention kernels, no flip in 50 steps: largest step 2.5e-4). So the curve is compared where
    // one flip cannot dominate: the typical step and every 10 steps' mean difference, with a loose
    // cap on any single step. A wrong gradient moves them all (the gradients themselves are
    // checked to 1e-3 in gpu_lora_gradients_match_cpu_and_peft).
    assert!(median <= 2e-3, "GPU losses leave the CPU curve: median step {median:.2e}");
    assert!(worst_window <= 5e-3, "GPU losses leave the CPU curve: 10 steps by {worst_window:.2e} on average");
    assert!(worst_step <= 3e-2, "GPU losses leave the CPU curve: a step by {worst_step:.2e}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn running_out_of_gpu_memory_says_what_to_change() {
    let gpu = gpu();
    let m = Model::load(&fixtures().join("model/tiny-top4")).unwrap();
    // 200M tokens of activations cannot fit any card.
    let e = GpuEngine::new(gpu, &m, &no_lora(&m), 200_000_000).err().expect("too big").to_string();
    println!("{e}");
    for want in ["out of GPU memory", "GiB", "max_len", "micro_batch", "--device cpu"] {
        assert!(e.contains(want), "expected {want:?} in: {e}");
    }
}

fn fault_config(out: &Path) -> TrainConfig {
    TrainConfig {
        out: out.to_path_buf(),
        max_steps: Some(6),
        max_len: 256,
        grad_accum: 1,
        eval_every: 0,
        save_every: 0,
        device: Device::Cuda,
        ..TrainConfig::default()
    }
}

fn train(cfg: TrainConfig, resume: bool) -> Result<(), String> {
    let model = oxtune_trainer::train::load_model(&cfg).unwrap();
    let tok = oxtune_trainer::train::load_tokenizer(None).unwrap();
    let mut t = Trainer::new(cfg, model, &tok, resume, &mut |_| {}).map_err(|e| e.to_string())?;
    t.run(&mut |_| {}).map(|_| ()).map_err(|e| e.to_string())
}

/// Runs as a child process of `a_sticky_gpu_error_saves_the_last_step_and_the_run_resumes`
/// (a sticky error poisons the process's CUDA context, so it must not happen in the parent).
#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn child_process_of_the_sticky_error_test() {
    let Ok(out) = std::env::var("OXTUNE_FAULT_TEST_OUT") else {
        println!("does nothing unless started by a_sticky_gpu_error_saves_the_last_step_and_the_run_resumes");
        return;
    };
    let e = train(fault_config(Path::new(&out)), false).expect_err("the injected fault must stop the run");
    println!("CHILD ERROR: {e}");
    assert!(e.contains("GPU failed after step 2") && e.contains("checkpoint-2") && e.contains("--resume"), "{e}");
    // Faulted right after step 3's update, the run went back from step 3 (in sync_host, as its
    // copy never landed); faulted at step 3's start, it never left step 2.
    let in_copy = std::env::var("OXTUNE_FAULT_IN_COPY_AT_STEP").is_ok();
    assert_eq!(
        e.contains("step 3's copy to the host had not completed, so the run went back to step 2"),
        in_copy,
        "{e}"
    );
    assert!(e.contains("ILLEGAL_ADDRESS") || e.contains("illegal"), "the CUDA error is named: {e}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn a_sticky_gpu_error_saves_the_last_step_and_the_run_resumes() {
    let _ = gpu();
    let base = std::env::temp_dir().join(format!("oxtune-gpu-fault-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // The child's third forward-backward hits an illegal address (a sticky error), after every
    // stream is idle: the host holds step 2. Then the fault comes right after step 3's update
    // (200 ms later on the device: the host has moved on to step 4), before its host copy (which
    // overlaps the next step) can run: the host still holds step 2, and the run must go back to
    // it (step count, data order) so that it resumes exactly (the child checks it said so).
    for (hook, run) in [("OXTUNE_FAULT_AT_STEP", "faulted"), ("OXTUNE_FAULT_IN_COPY_AT_STEP", "faulted-in-copy")] {
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_process_of_the_sticky_error_test", "--include-ignored", "--nocapture"])
            .env(hook, "3")
            .env("OXTUNE_FAULT_TEST_OUT", base.join(run))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        println!("{hook}: {}", stdout.lines().filter(|l| l.starts_with("CHILD")).collect::<Vec<_>>().join("\n"));
        assert!(
            o.status.success() && stdout.contains("1 passed"),
            "{hook}: child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(base.join(run).join("checkpoint-2/adapter_model.safetensors").exists(), "{hook}");
        assert!(!base.join(run).join("checkpoint-3").exists(), "{hook}: step 3 never reached the host");
        // Resume here (a fresh CUDA context).
        train(fault_config(&base.join(run)), true).unwrap();
    }
    // A run that never failed.
    train(fault_config(&base.join("clean")), false).unwrap();
    let read = |run: &str| std::fs::read(base.join(run).join("adapter/adapter_model.safetensors")).unwrap();
    for run in ["faulted", "faulted-in-copy"] {
        assert!(read(run) == read("clean"), "{run}: the resumed run's adapter differs from the uninterrupted one");
    }
    println!("resumed after either fault: final adapter bit-identical to an uninterrupted GPU run");
    let _ = std::fs::remove_dir_all(&base);
}
