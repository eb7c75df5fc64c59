//! Cross-crate benchmarks (see `benches/`): CPU training throughput of the embedded tiny GPT-OSS.
//! Per-crate benchmarks live next to each crate.
