//! LoRA forward/backward on gpt-oss-20b shapes (r = 8), NF4 dequantization and the NF4 base matmul.
//!
//! - dense: q_proj (2880 -> 4096) on 512 tokens; throughput in tokens.
//! - experts: gate_up_proj LoRA of one expert (2880 -> 5760, E = 32) on the 64 tokens routed to it.
//! - nf4: dequantizing one expert's gate_up weight (5760 x 2880 = 16.6M elements, double-quantized);
//!   throughput in elements.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use oxtune_lora::{FrozenWeight, LoraConfig, LoraExperts, LoraLinear, Nf4Weight};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn bench_dense(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (t, d_in, d_out) = (512, 2880, 4096);
    let cfg = LoraConfig { r: 8, alpha: 16.0, ..LoraConfig::default() };
    let mut lora = LoraLinear::new(d_in, d_out, &cfg, &mut rng).unwrap();
    lora.b = uniform(&mut rng, lora.b.len(), 0.01);
    let x = uniform(&mut rng, t * d_in, 1.0);
    let dy = uniform(&mut rng, t * d_out, 1.0);
    let mut y = vec![0f32; t * d_out];
    let mut dx = vec![0f32; t * d_in];
    let mut grads = lora.zero_grads();
    let mut g = c.benchmark_group("lora_dense_q_proj_r8");
    g.throughput(Throughput::Elements(t as u64));
    g.bench_function(BenchmarkId::new("forward", t), |b| b.iter(|| lora.forward(&x, &mut y, None).unwrap()));
    let act = lora.forward(&x, &mut y, None).unwrap();
    g.bench_function(BenchmarkId::new("backward", t), |b| {
        b.iter(|| lora.backward(&x, &act, &dy, Some(&mut dx), None, &mut grads).unwrap())
    });
    g.finish();
}

fn bench_experts(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (e, n, d_in, d_out) = (32, 64, 2880, 5760);
    let cfg = LoraConfig { r: 8, alpha: 16.0, ..LoraConfig::default() };
    let mut lora = LoraExperts::new(e, d_in, d_out, &cfg, &mut rng).unwrap();
    lora.b = uniform(&mut rng, lora.b.len(), 0.01);
    let x = uniform(&mut rng, n * d_in, 1.0);
    let dy = uniform(&mut rng, n * d_out, 1.0);
    let mut y = vec![0f32; n * d_out];
    let mut dx = vec![0f32; n * d_in];
    let mut grads = lora.zero_grads();
    let mut g = c.benchmark_group("lora_expert_gate_up_r8");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("forward", n), |b| b.iter(|| lora.forward_expert(5, &x, &mut y).unwrap()));
    let h = lora.forward_expert(5, &x, &mut y).unwrap();
    g.bench_function(BenchmarkId::new("backward", n), |b| {
        b.iter(|| lora.backward_expert(5, &x, &h, &dy, Some(&mut dx), &mut grads).unwrap())
    });
    g.finish();
}

fn bench_nf4(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (out, d_in) = (5760, 2880);
    let w = uniform(&mut rng, out * d_in, 0.02);
    let nf4 = Nf4Weight::quantize(&w, out, d_in, true).unwrap();
    let mut g = c.benchmark_group("nf4");
    g.sample_size(20);
    g.throughput(Throughput::Elements((out * d_in) as u64));
    g.bench_function("dequantize_5760x2880", |b| b.iter(|| nf4.tensor().dequantize()));
    let t = 64;
    let x = uniform(&mut rng, t * d_in, 1.0);
    let mut y = vec![0f32; t * out];
    g.throughput(Throughput::Elements((out * d_in) as u64));
    g.bench_function("matmul_acc_64_tokens", |b| b.iter(|| nf4.matmul_acc(&x, &mut y).unwrap()));
    g.finish();
}

criterion_group!(benches, bench_dense, bench_experts, bench_nf4);
criterion_main!(benches);
