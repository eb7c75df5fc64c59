//! Loss spikes and stop requests in the training loop itself (the process-level cases, kills,
//! Ctrl-C, full disks, are in `cli/tests/reliability.rs`).

mod common;

use common::small_model;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use oxtune_data::Tokenizer;
use oxtune_trainer::train::{Event, Metric, TrainConfig, Trainer, SPIKE_FACTOR};

fn config(tag: &str) -> TrainConfig {
    let out = std::env::temp_dir().join(format!("oxtune-reliability-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    TrainConfig {
        out,
        max_steps: Some(12),
        grad_accum: 1,
        max_len: 256,
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    }
}

fn train_losses(metrics: &[Metric]) -> Vec<f64> {
    metrics.iter().filter(|m| m.kind == "train").map(|m| m.loss).collect()
}

#[test]
fn loss_spike_is_reported_and_recorded() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let mut t = Trainer::new(config("spike"), small_model(), &tok, false, &mut |_| {}).unwrap();
    let mut events = vec![];
    let started = Instant::now();
    for _ in 0..6 {
        assert!(t.train_step(&mut |e| events.push(e), started, 0).unwrap());
    }
    assert!(!events.iter().any(|e| matches!(e, Event::Spike { .. })), "no spike in ordinary steps");
    let before = train_losses(&t.metrics);
    // Sharper logits: the loss of the next step jumps, but stays finite.
    t.model.w.lm_head.iter_mut().for_each(|x| *x *= 40.0);
    assert!(t.train_step(&mut |e| events.push(e), started, 0).unwrap());
    let loss = *train_losses(&t.metrics).last().unwrap();
    let mean = before.iter().sum::<f64>() / before.len() as f64;
    assert!(loss.is_finite() && loss > SPIKE_FACTOR * mean, "the test needs a spike: {loss} vs mean {mean}");
    let spike = events.iter().find_map(|e| match e {
        Event::Spike { step, loss, mean } => Some((*step, *loss, *mean)),
        _ => None,
    });
    assert_eq!(spike, Some((7, loss, mean)));
    let recorded: Vec<&Metric> = t.metrics.iter().filter(|m| m.kind == "spike").collect();
    assert_eq!(recorded.len(), 1);
    assert_eq!((recorded[0].step, recorded[0].loss), (7, loss));
}

#[test]
fn stop_request_ends_the_run_with_a_checkpoint_of_the_current_step() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let cfg = config("stop");
    let out: PathBuf = cfg.out.clone();
    let mut t = Trainer::new(cfg, small_model(), &tok, false, &mut |_| {}).unwrap();
    let stop = t.stop_handle();
    let mut steps = 0;
    let summary = t
        .run(&mut |e| {
            if let Event::Step { step, .. } = e {
                steps = step;
                if step == 2 {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
    assert_eq!((steps, summary.steps), (2, 2));
    assert_eq!(summary.interrupted, Some(out.join("checkpoint-2")));
    assert!(out.join("checkpoint-2/trainer_state.json").is_file());
    assert!(!out.join("adapter").exists(), "the final adapter is only written by a finished run");
    // The stopped run continues where it stopped.
    let mut r = Trainer::new(t.cfg.clone(), small_model(), &tok, true, &mut |_| {}).unwrap();
    assert_eq!(r.step, 2);
    assert_eq!(r.run(&mut |_| {}).unwrap().steps, 12);
    let _ = std::fs::remove_dir_all(out);
}
