//! CPU MXFP4 throughput: one gpt-oss-20b expert's gate_up matrix ([5760, 2880]).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use oxtune_mxfp4::{quantize_f32, Mxfp4Tensor};
use rand::{Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    let (rows, cols) = (5760, 2880);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let blocks: Vec<u8> = (0..rows * cols / 2).map(|_| rng.gen()).collect();
    let scales: Vec<u8> = (0..rows * cols / 32).map(|_| rng.gen_range(115..125)).collect();
    let t = Mxfp4Tensor::new(blocks, scales, &[rows, cols]).unwrap();
    let mut g = c.benchmark_group("mxfp4");
    // Throughput counts the packed bytes read (codes + scales).
    g.throughput(Throughput::Bytes(t.nbytes() as u64));
    g.bench_function("dequantize_f32 [5760,2880]", |b| b.iter(|| t.dequantize_f32()));
    let mut rows_out = vec![0.0f32; 64 * cols];
    g.bench_function("dequantize_rows_f32 64 rows", |b| b.iter(|| t.dequantize_rows_f32(1024, &mut rows_out).unwrap()));
    let x = t.dequantize_f32();
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    g.bench_function("quantize_f32 [5760,2880]", |b| b.iter(|| quantize_f32(&x, &[rows, cols]).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
