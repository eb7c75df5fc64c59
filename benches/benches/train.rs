//! CPU training tokens/s on the embedded tiny GPT-OSS (vocab 201088, hidden 128, 4 layers,
//! 8 experts top-2 in MXFP4): forward + backward + 8-bit AdamW step with LoRA r=8 on attention
//! and experts, one packed row of 512 tokens with every position trained.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use oxtune_optim::{AdamW8bit, AdamW8bitConfig, Optimizer, Param};
use oxtune_trainer::grad::TrainBatch;
use oxtune_trainer::lora_adapter::{LoraAdapter, LoraSpec};
use oxtune_trainer::tiny::{random_weights, tiny_default_config, DEFAULT_SEED};
use oxtune_trainer::Model;

fn bench(c: &mut Criterion) {
    let cfg = tiny_default_config();
    let model = Model::new(cfg.clone(), random_weights(&cfg, DEFAULT_SEED));
    let mut adapter = LoraAdapter::new(&cfg, LoraSpec::default(), 1).unwrap();
    let t = 512;
    // A deterministic spread of ids over the vocabulary; next-token targets.
    let ids: Vec<u32> = (0..t as u64).map(|i| ((i * 2_654_435_761) % cfg.vocab_size as u64) as u32).collect();
    let batch = TrainBatch {
        targets: ids[1..].iter().map(|&x| x as i64).chain([-100]).collect(),
        pos: (0..t as u32).collect(),
        seg: vec![0; t],
        rows: vec![0..t],
        ids,
    };
    let mut opt = AdamW8bit::new(AdamW8bitConfig::default()).unwrap();
    let mut g = c.benchmark_group("train_cpu_tiny");
    g.sample_size(10);
    g.throughput(Throughput::Elements(t as u64));
    g.bench_function("forward+backward+step 512 tokens", |b| {
        b.iter(|| {
            adapter.zero_grad();
            model.forward_backward(&batch, &adapter, 1.0 / (t - 1) as f32, None).unwrap();
            let mut named = adapter.params();
            let mut params: Vec<Param> = named.iter_mut().map(|(n, v, g)| Param::new(n, v, g)).collect();
            opt.step(&mut params, 1e-4).unwrap();
        })
    });
    g.bench_function("forward (loss only) 512 tokens", |b| {
        b.iter(|| model.eval_loss(&batch, &adapter).unwrap());
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
