//! Optimizer step throughput (elements/s) for fp32 AdamW and 8-bit AdamW on one tensor the size of a
//! gpt-oss-20b attention LoRA layer's trainable parameters at r = 8 (q, k, v, o: 55,808 elements) and on one
//! large tensor (4M elements, where the work is split over rayon tasks).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use oxtune_optim::{AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, Optimizer, Param};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

fn bench_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("optimizer_step");
    for n in [55_808usize, 1 << 22] {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let grad: Vec<f32> = (0..n).map(|_| rng.sample::<f32, _>(StandardNormal) * 1e-3).collect();
        let mut value: Vec<f32> = (0..n).map(|_| rng.sample::<f32, _>(StandardNormal) * 0.02).collect();
        group.throughput(Throughput::Elements(n as u64));
        let optimizers: [(&str, Box<dyn Optimizer>); 2] = [
            ("adamw_fp32", Box::new(AdamW::new(AdamWConfig::default()).unwrap())),
            ("adamw_8bit", Box::new(AdamW8bit::new(AdamW8bitConfig::default()).unwrap())),
        ];
        for (name, mut opt) in optimizers {
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| opt.step(&mut [Param::new("w", &mut value, &grad)], 1e-4).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
