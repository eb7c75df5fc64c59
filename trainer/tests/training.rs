//! The training loop on a small GPT-OSS with the real vocabulary: the loss falls, a resumed run
//! ends bit-identical to an uninterrupted one, a corrupt checkpoint falls back to an older one,
//! and the run writes its adapter, metrics and plot.

mod common;

use common::small_model;
use std::path::PathBuf;
use std::time::Instant;

use oxtune_data::Tokenizer;
use oxtune_trainer::train::{Event, OptimizerKind, TrainConfig, Trainer};

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("oxtune-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(out: PathBuf) -> TrainConfig {
    TrainConfig {
        out,
        max_steps: Some(6),
        grad_accum: 2,
        max_len: 256,
        lr: 3e-3,
        eval_every: 0,
        save_every: 3,
        keep_checkpoints: 3,
        optimizer: OptimizerKind::Adamw8bit,
        ..TrainConfig::default()
    }
}

fn values(t: &Trainer) -> Vec<Vec<f32>> {
    t.adapter.tensors().into_iter().map(|(_, _, v)| v.to_vec()).collect()
}

#[test]
fn resume_continues_exactly_and_corrupt_checkpoints_are_skipped() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let mut quiet = |_: Event| {};

    // Uninterrupted run.
    let a_dir = out_dir("a");
    let mut a = Trainer::new(config(a_dir.clone()), small_model(), &tok, false, &mut quiet).unwrap();
    let summary = a.run(&mut quiet).unwrap();
    assert_eq!(summary.steps, 6);
    let want = values(&a);
    assert!(want.iter().flatten().any(|v| *v != 0.0));
    for f in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.svg"] {
        assert!(a_dir.join(f).exists(), "{f} missing");
    }
    let first_eval = summary.first_eval.unwrap();
    let last_eval = summary.last_eval.unwrap();
    assert!(last_eval < first_eval, "eval loss {first_eval} -> {last_eval}");

    // Interrupted after 3 steps (its checkpoint written), then resumed.
    let b_dir = out_dir("b");
    let mut b = Trainer::new(config(b_dir.clone()), small_model(), &tok, false, &mut quiet).unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        assert!(b.train_step(&mut quiet, started, 0).unwrap());
    }
    b.save_checkpoint().unwrap();
    // One more step whose checkpoint is then corrupted: resume must skip it and use step 3.
    assert!(b.train_step(&mut quiet, started, 0).unwrap());
    let bad = b.save_checkpoint().unwrap();
    drop(b);
    let mut bytes = std::fs::read(bad.join("adapter_model.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x5A;
    std::fs::write(bad.join("adapter_model.safetensors"), bytes).unwrap();
    let mut messages = vec![];
    let mut c = Trainer::new(config(b_dir.clone()), small_model(), &tok, true, &mut |e| messages.push(e)).unwrap();
    assert_eq!(c.step, 3, "resumed from the last good checkpoint");
    assert!(messages.iter().any(|e| matches!(e, Event::Skipped { reason, .. } if reason.contains("checksum"))));
    c.run(&mut quiet).unwrap();
    assert_eq!(c.step, 6);
    assert_eq!(values(&c), want, "resumed run differs from the uninterrupted one");

    // Nothing to resume from is a clear error.
    let empty = out_dir("empty");
    let err = Trainer::new(config(empty), small_model(), &tok, true, &mut quiet).err().unwrap().to_string();
    assert!(err.contains("no complete checkpoint"), "{err}");
    for d in [a_dir, b_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn config_from_toml_and_bad_keys() {
    let dir = out_dir("toml");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("run.toml");
    std::fs::write(&p, "rank = 16\nalpha = 32.0\nlr = 1e-4\noptimizer = \"adamw\"\nschedule = \"cosine_min_lr\"\n")
        .unwrap();
    let c = TrainConfig::from_toml_file(&p).unwrap();
    assert_eq!((c.rank, c.alpha, c.lr, c.optimizer), (16, 32.0, 1e-4, OptimizerKind::Adamw));
    std::fs::write(&p, "rnak = 16\n").unwrap();
    let e = TrainConfig::from_toml_file(&p).unwrap_err().to_string();
    assert!(e.contains("run.toml") && e.contains("rnak"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sinks_train_when_asked_and_are_checkpointed() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let mut quiet = |_: Event| {};
    let dir = out_dir("sinks");
    let cfg = TrainConfig {
        train_sinks: true,
        lora_attention: false,
        lora_experts: false,
        max_steps: Some(2),
        ..config(dir.clone())
    };
    let before: Vec<Vec<f32>> = small_model().w.layers.iter().map(|l| l.sinks.clone()).collect();
    let mut t = Trainer::new(cfg.clone(), small_model(), &tok, false, &mut quiet).unwrap();
    t.run(&mut quiet).unwrap();
    let after: Vec<Vec<f32>> = t.model.w.layers.iter().map(|l| l.sinks.clone()).collect();
    assert_ne!(before, after, "sinks did not move");
    // A resumed run restores the trained sinks from the checkpoint.
    let r = Trainer::new(cfg, small_model(), &tok, true, &mut quiet).unwrap();
    let restored: Vec<Vec<f32>> = r.model.w.layers.iter().map(|l| l.sinks.clone()).collect();
    assert_eq!(restored, after);
    let _ = std::fs::remove_dir_all(dir);
}
