//! Throughput of the data pipeline: JSONL → harmony tokens with labels.
//!
//! `cargo bench -p oxtune-data` prints conversations/s and tokens/s for
//! load + render + tokenize of the embedded persona set (and of a
//! longer-message variant), the raw tokenizer speed, packing, and the
//! one-time conversion of the built-in tokenizer.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use oxtune_data::{load_bytes, BatchConfig, Batcher, LoadOptions, Tokenizer, DEFAULT_TRAIN_JSONL};

/// The persona set with every answer repeated to ~10× its length, so that
/// tokenization (not fixed per-message costs) dominates.
fn long_variant() -> String {
    DEFAULT_TRAIN_JSONL
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for m in v["messages"].as_array_mut().unwrap() {
                if m["role"] == "assistant" {
                    let c = m["content"].as_str().unwrap().to_string();
                    m["content"] = serde_json::Value::String(vec![c; 10].join(" "));
                }
            }
            v.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn pipeline(c: &mut Criterion) {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let opts = LoadOptions::default();
    for (name, text) in [("persona", DEFAULT_TRAIN_JSONL.to_string()), ("persona_long_answers", long_variant())] {
        let ds = load_bytes(name, text.as_bytes(), &opts, &tok).unwrap();
        let (convs, tokens) = (ds.examples.len() as u64, ds.report.tokens as u64);
        for (unit, n) in [("conversations", convs), ("tokens", tokens)] {
            let mut g = c.benchmark_group(format!("load_render_tokenize/{unit}"));
            g.throughput(Throughput::Elements(n));
            g.bench_function(name, |b| b.iter(|| load_bytes(name, black_box(text.as_bytes()), &opts, &tok).unwrap()));
            g.finish();
        }
    }

    let text = long_variant();
    let n_tokens = tok.encode(&text).unwrap().len() as u64;
    let mut g = c.benchmark_group("encode/tokens");
    g.throughput(Throughput::Elements(n_tokens));
    g.bench_function("oxtune_tokenizers", |b| b.iter(|| tok.encode(black_box(&text)).unwrap()));
    let rs = tiktoken_rs::o200k_harmony_singleton();
    g.bench_function("tiktoken_rs_reference", |b| b.iter(|| rs.encode_ordinary(black_box(&text))));
    g.finish();

    let examples = load_bytes("persona", DEFAULT_TRAIN_JSONL.as_bytes(), &opts, &tok).unwrap().examples;
    let mut g = c.benchmark_group("pack_epoch/conversations");
    g.throughput(Throughput::Elements(examples.len() as u64));
    g.bench_function("packed_max_len_2048", |b| {
        let batcher = Batcher::new(examples.clone(), BatchConfig::default()).unwrap();
        b.iter(|| batcher.one_epoch().count())
    });
    g.finish();

    let mut g = c.benchmark_group("tokenizer_conversion");
    g.sample_size(10);
    g.bench_function("o200k_harmony_from_ranks", |b| b.iter(|| Tokenizer::build_o200k_harmony().unwrap()));
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
