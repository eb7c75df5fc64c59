//! `merge`: a LoRA adapter merged into the base model and written as a Hugging Face directory (bf16 or
//! MXFP4), and `export_adapter`. On fixtures/model/tiny-top4 with fixtures/lora/peft-tiny-top4 (PEFT 0.21,
//! r 4, alpha 8, q/k/v/o + experts, A and B random ~0.2, so ΔW is larger than W: a hard case for rounding).

use std::path::{Path, PathBuf};

use half::bf16;
use oxtune_lora::{ExpertLayout, LoraExperts, LoraLinear};
use oxtune_mxfp4::Mxfp4Tensor;
use oxtune_trainer::checkpoint::Checkpoint;
use oxtune_trainer::lora_adapter::{LoraAdapter, LoraSpec};
use oxtune_trainer::merge::{
    base_fingerprint, export_adapter, merge, MergeFormat, MergeOptions, MergeReport, ScaleMode,
};
use oxtune_trainer::{GptOssConfig, Model};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

fn base() -> PathBuf {
    fixture("model/tiny-top4")
}

fn peft_adapter() -> PathBuf {
    fixture("lora/peft-tiny-top4")
}

/// A fresh scratch directory (removed first if a previous run left it).
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-merge-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn opts(format: MergeFormat) -> MergeOptions {
    MergeOptions { format, ..MergeOptions::default() }
}

/// The token ids PEFT's reference was computed on, `[2, 12]`.
fn ids() -> (Vec<u32>, usize, usize) {
    let bytes = std::fs::read(peft_adapter().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("input_ids").unwrap();
    let ids = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect();
    (ids, t.shape()[0], t.shape()[1])
}

/// `||got - want|| / ||want||`, printing the worst element.
fn rel_err(what: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (mut d2, mut n2, mut worst) = (0f64, 0f64, (0f64, 0usize));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (*g as f64 - *w as f64).abs();
        d2 += d * d;
        n2 += (*w as f64).powi(2);
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let rel = (d2 / n2).sqrt();
    println!("{what}: ||got - want|| / ||want|| = {rel:.3e}, worst |diff| {:.3e} at {}", worst.0, worst.1);
    rel
}

/// Logits of the base model with `adapter` applied unmerged (the model's LoRA forward path).
fn adapter_logits(adapter: &Path) -> Vec<f32> {
    let m = Model::load(&base()).unwrap();
    let lora = LoraAdapter::load(adapter, &m.cfg).unwrap();
    let (ids, b, t) = ids();
    m.forward_with(&ids, b, t, &lora).unwrap()
}

fn merged_logits(dir: &Path) -> Vec<f32> {
    let m = Model::load(dir).unwrap();
    let (ids, b, t) = ids();
    m.forward(&ids, b, t).unwrap()
}

/// The fixture adapter with every lora_B scaled by `factor` and, for each `(layer, gate_up?, expert)` in
/// `zero`, that expert's B columns (`k·E + e`, PEFT's layout) set to zero; saved to `dir`.
fn edited_adapter(dir: &Path, factor: f32, zero: &[(usize, bool, usize)]) -> PathBuf {
    let cfg = GptOssConfig::from_dir(&base()).unwrap();
    let mut a = LoraAdapter::load(&peft_adapter(), &cfg).unwrap();
    let e = cfg.num_local_experts;
    for (key, v, _) in a.params() {
        if key.ends_with("lora_B.weight") {
            v.iter_mut().for_each(|x| *x *= factor);
        }
        for &(l, gate_up, ex) in zero {
            let module = if gate_up { "mlp.experts.base_layer" } else { "mlp.experts" };
            if key == format!("base_model.model.model.layers.{l}.{module}.lora_B.weight") {
                let cols = e * RANK;
                for (i, x) in v.iter_mut().enumerate() {
                    if (i % cols) % e == ex {
                        *x = 0.0;
                    }
                }
            }
        }
    }
    let out = dir.join("adapter");
    a.save(&out, Some("fixtures/model/tiny-top4")).unwrap();
    out
}

/// The fixture adapter's rank and scaling (r 4, alpha 8).
const RANK: usize = 4;
const SCALING: f32 = 2.0;

fn bf16s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| w[r * cols + c])).collect()
}

/// The adapter's tensors by key.
fn lora_tensors(adapter: &Path, cfg: &GptOssConfig) -> std::collections::HashMap<String, Vec<f32>> {
    let a = LoraAdapter::load(adapter, cfg).unwrap();
    a.tensors().into_iter().map(|(k, _, v)| (k, v.to_vec())).collect()
}

/// `(layer, proj name, gate_up?)` of every expert weight.
fn expert_weights(cfg: &GptOssConfig) -> Vec<(usize, &'static str, bool)> {
    (0..cfg.num_hidden_layers).flat_map(|l| [(l, "gate_up_proj", true), (l, "down_proj", false)]).collect()
}

/// `(out, in)` of one expert.
fn dims(cfg: &GptOssConfig, gate_up: bool) -> (usize, usize) {
    if gate_up {
        (2 * cfg.intermediate_size, cfg.hidden_size)
    } else {
        (cfg.hidden_size, cfg.intermediate_size)
    }
}

fn base_expert_mxfp4<'a>(ckpt: &'a Checkpoint, l: usize, p: &str) -> Mxfp4Tensor<&'a [u8]> {
    let name = format!("model.layers.{l}.mlp.experts.{p}");
    let b = ckpt.info(&format!("{name}_blocks")).unwrap();
    let s = ckpt.info(&format!("{name}_scales")).unwrap();
    Mxfp4Tensor::from_checkpoint(ckpt.bytes(b), &b.shape, ckpt.bytes(s), &s.shape).unwrap()
}

fn experts_lora(
    t: &std::collections::HashMap<String, Vec<f32>>,
    cfg: &GptOssConfig,
    l: usize,
    gate_up: bool,
) -> LoraExperts {
    let module = if gate_up { "mlp.experts.base_layer" } else { "mlp.experts" };
    let key = |ab: &str| format!("base_model.model.model.layers.{l}.{module}.lora_{ab}.weight");
    let (out, inp) = dims(cfg, gate_up);
    LoraExperts::from_weights(cfg.num_local_experts, inp, out, t[&key("A")].clone(), t[&key("B")].clone(), SCALING)
        .unwrap()
}

/// Every tensor of the bf16 merge, checked element by element against the f32 merge rounded once to
/// bf16, built here from the base checkpoint and the lora crate's ΔW (PEFT's math, tested against PEFT
/// in the lora crate): attention `bf16(W + s·B·A)`, experts `bf16(W_e + s·(B_e A_e)ᵀ)` in transformers'
/// `[E, in, out]` layout; everything else the base's bytes.
#[test]
fn bf16_merge_is_the_f32_merge_rounded_once() {
    let dir = scratch("bf16-exact");
    let out = dir.join("out");
    merge(&base(), &peft_adapter(), &out, &opts(MergeFormat::Bf16)).unwrap();
    let cfg = GptOssConfig::from_dir(&base()).unwrap();
    let (b, m) = (Checkpoint::open(&base()).unwrap(), Checkpoint::open(&out).unwrap());
    let lora = lora_tensors(&peft_adapter(), &cfg);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none(), "bf16 output must not claim MXFP4");
    assert_eq!(config["num_local_experts"], 8);
    let mut checked = 0;
    for name in m.names() {
        let got = m.info(name).unwrap();
        if let Some(rest) = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
            let l: usize = rest.0.parse().unwrap();
            let site =
                |proj: &str, ab: &str| format!("base_model.model.model.layers.{l}.self_attn.{proj}.lora_{ab}.weight");
            if let Some(proj) = rest.1.strip_prefix("self_attn.").and_then(|r| r.strip_suffix(".weight")) {
                let (n_out, n_in) = (got.shape[0], got.shape[1]);
                let lin = LoraLinear::from_weights(
                    n_in,
                    n_out,
                    lora[&site(proj, "A")].clone(),
                    lora[&site(proj, "B")].clone(),
                    SCALING,
                )
                .unwrap();
                let w = b.f32(name, &got.shape).unwrap();
                let want: Vec<f32> =
                    w.iter().zip(lin.delta_weight().unwrap()).map(|(w, d)| bf16::from_f32(w + d).to_f32()).collect();
                assert_eq!(got.dtype, Dtype::BF16);
                assert_eq!(bf16s(m.bytes(got)), want, "{name}");
                checked += 1;
                continue;
            }
            if let Some((p, gate_up)) = [("gate_up_proj", true), ("down_proj", false)]
                .into_iter()
                .find(|(p, _)| rest.1 == format!("mlp.experts.{p}"))
            {
                let (out_f, in_f) = dims(&cfg, gate_up);
                assert_eq!((got.dtype, &got.shape[..]), (Dtype::BF16, &[8, in_f, out_f][..]), "{name}");
                let q = base_expert_mxfp4(&b, l, p);
                let le = experts_lora(&lora, &cfg, l, gate_up);
                let mut want = vec![];
                for e in 0..8 {
                    let w = transpose(&q.index(e).unwrap().dequantize_f32(), out_f, in_f);
                    let d = le.delta_weight(e, ExpertLayout::InOut).unwrap();
                    want.extend(round_bf16(&w.iter().zip(d).map(|(w, d)| w + d).collect::<Vec<_>>()));
                }
                assert_eq!(bf16s(m.bytes(got)), want, "{name}");
                checked += 1;
                continue;
            }
        }
        let bi = b.info(name).unwrap_or_else(|| panic!("{name} is not a base tensor"));
        assert_eq!((bi.dtype, &bi.shape), (got.dtype, &got.shape), "{name}");
        assert_eq!(b.bytes(bi), m.bytes(got), "{name} must be copied unchanged");
    }
    assert_eq!(checked, 3 * (4 + 2));
    assert!(b.names().filter(|n| n.ends_with("_blocks") || n.ends_with("_scales")).all(|n| m.info(n).is_none()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Tolerance: the merged model differs from base + adapter only by rounding W + ΔW to bf16 once (relative
/// 2^-9 per weight). With this fixture's large random ΔW that moves the logits by 2.17e-2 relative, the
/// same as PEFT's own merge_and_unload rounded to bf16 (measured with transformers 5.17 / peft 0.21: f32
/// merge 2.6e-6, bf16-rounded 2.17e-2). Bound: 3e-2. Small shards check the index path too.
#[test]
fn bf16_merge_loads_and_matches_the_adapter_within_bf16_rounding() {
    let dir = scratch("bf16-logits");
    let out = dir.join("out");
    let o = MergeOptions { max_shard_bytes: 300_000, ..opts(MergeFormat::Bf16) };
    let report = merge(&base(), &peft_adapter(), &out, &o).unwrap();
    assert!(report.files.len() > 1, "300 kB shards split the 1.2 MB model");
    for f in &report.files {
        let size = f.nbytes();
        assert!(size <= 300_000 || f.tensors.len() == 1, "{} has {size} bytes", f.name);
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let total: u64 = report.files.iter().map(|f| f.nbytes()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 54);
    let got = merged_logits(&out);
    let want = adapter_logits(&peft_adapter());
    assert!(rel_err("bf16 merge vs base + adapter", &got, &want) <= 3e-2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The MXFP4 merge's experts are exactly `quantize(bf16 merge)` (oxtune_mxfp4's triton rounding), checked
/// against the bf16 output's experts; the printed error is `||q - m|| / ||m||` of those; everything
/// else equals the bf16 merge (attention) or the base's bytes, with the base's names, shapes and files.
#[test]
fn mxfp4_merge_is_the_bf16_merge_requantized() {
    let dir = scratch("mxfp4-exact");
    let (ob, om) = (dir.join("bf16"), dir.join("mxfp4"));
    merge(&base(), &peft_adapter(), &ob, &opts(MergeFormat::Bf16)).unwrap();
    let report = merge(&base(), &peft_adapter(), &om, &opts(MergeFormat::Mxfp4)).unwrap();
    let cfg = GptOssConfig::from_dir(&base()).unwrap();
    let (b, mb, mq) =
        (Checkpoint::open(&base()).unwrap(), Checkpoint::open(&ob).unwrap(), Checkpoint::open(&om).unwrap());
    assert_eq!(std::fs::read(base().join("config.json")).unwrap(), std::fs::read(om.join("config.json")).unwrap());
    assert_eq!(b.names().collect::<Vec<_>>(), mq.names().collect::<Vec<_>>());
    for name in b.names() {
        let (bi, qi) = (b.info(name).unwrap(), mq.info(name).unwrap());
        assert_eq!((bi.dtype, &bi.shape), (qi.dtype, &qi.shape), "{name}");
        assert_eq!(b.file_of(bi).file_name(), mq.file_of(qi).file_name(), "{name} must stay in its shard");
        if name.contains("self_attn.") && name.ends_with("proj.weight") {
            assert_eq!(mq.bytes(qi), mb.bytes(mb.info(name).unwrap()), "{name} = the bf16 merge");
        } else if !name.ends_with("_blocks") && !name.ends_with("_scales") {
            assert_eq!(mq.bytes(qi), b.bytes(bi), "{name} copied");
        }
    }
    assert_eq!(report.quant_errors.len(), 6);
    for (l, p, gate_up) in expert_weights(&cfg) {
        let (out_f, in_f) = dims(&cfg, gate_up);
        let merged = bf16s(mb.bytes(mb.info(&format!("model.layers.{l}.mlp.experts.{p}")).unwrap()));
        let m: Vec<f32> = merged.chunks_exact(in_f * out_f).flat_map(|w| transpose(w, in_f, out_f)).collect();
        let want = oxtune_mxfp4::quantize_f32(&m, &[8, out_f, in_f]).unwrap();
        let got = base_expert_mxfp4(&mq, l, p);
        assert_eq!(got.blocks(), want.blocks(), "layer {l} {p} blocks");
        assert_eq!(got.scales(), want.scales(), "layer {l} {p} scales");
        let rel = rel_err(&format!("layer {l} {p} MXFP4 vs bf16 merge"), &got.dequantize_f32(), &m);
        let q = report.quant_errors.iter().find(|q| q.layer == l && q.proj == p).unwrap();
        assert!((q.rel - rel).abs() <= 1e-6 * rel, "reported {} vs {rel}", q.rel);
        assert_eq!(q.copied_experts, 0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Re-quantizing the merged experts costs accuracy; how much depends on |ΔW| against the MXFP4 grid.
/// Each case prints the logits error of the MXFP4 merge, the bf16 merge and the unmerged base, all
/// against base + adapter.
#[test]
fn mxfp4_merge_loads_and_stays_within_the_quantization_bound() {
    let dir = scratch("mxfp4-logits");
    let base_logits = merged_logits(&base());
    for (factor, mx_bound) in [(1.0, 0.5), (0.05, 0.2)] {
        let adapter = if factor == 1.0 { peft_adapter() } else { edited_adapter(&dir, factor, &[]) };
        let want = adapter_logits(&adapter);
        let (om, ob) = (dir.join(format!("mx-{factor}")), dir.join(format!("bf16-{factor}")));
        let report = merge(&base(), &adapter, &om, &opts(MergeFormat::Mxfp4)).unwrap();
        merge(&base(), &adapter, &ob, &opts(MergeFormat::Bf16)).unwrap();
        let worst =
            |f: fn(&oxtune_trainer::merge::QuantError) -> f64| report.quant_errors.iter().map(f).fold(0.0, f64::max);
        println!(
            "B x {factor}: worst ||q - m|| / ||m|| {:.3e}, ||q - m|| / ||dW|| {:.3e}",
            worst(|q| q.rel),
            worst(|q| q.delta_rel)
        );
        let mx = rel_err(&format!("B x {factor}: mxfp4 merge"), &merged_logits(&om), &want);
        let bf = rel_err(&format!("B x {factor}: bf16 merge"), &merged_logits(&ob), &want);
        let none = rel_err(&format!("B x {factor}: base alone"), &base_logits, &want);
        assert!(mx <= mx_bound, "{mx}");
        assert!(bf <= 3e-2, "{bf}");
        // The merge must carry (part of) the adapter: closer to base + adapter than the base alone.
        assert!(mx < none, "mxfp4 merge {mx} vs base {none}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Expert `e`'s `(blocks, scales)` bytes.
/// `--mxfp4-scales min-error` picks, per block, the better of two scales: never a larger weight error
/// than triton's ROUND_UP, for each layer; its output still loads and carries the adapter.
#[test]
fn min_error_scales_never_lose_to_round_up() {
    let dir = scratch("min-error");
    let adapter = edited_adapter(&dir, 0.05, &[]);
    let up = merge(&base(), &adapter, &dir.join("up"), &opts(MergeFormat::Mxfp4)).unwrap();
    let out = dir.join("min");
    let o = MergeOptions { scale_mode: ScaleMode::MinError, ..opts(MergeFormat::Mxfp4) };
    let min = merge(&base(), &adapter, &out, &o).unwrap();
    for (a, b) in up.quant_errors.iter().zip(&min.quant_errors) {
        println!("layer {} {}: round-up {:.3e}, min-error {:.3e}", a.layer, a.proj, a.rel, b.rel);
        assert_eq!((a.layer, a.proj), (b.layer, b.proj));
        assert!(b.rel <= a.rel, "{b:?} vs {a:?}");
    }
    let want = adapter_logits(&adapter);
    let got = rel_err("min-error mxfp4 merge, B x 0.05", &merged_logits(&out), &want);
    let up_logits = rel_err("round-up mxfp4 merge, B x 0.05", &merged_logits(&dir.join("up")), &want);
    assert!(got <= 0.2, "{got} (round-up: {up_logits})");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn expert_bytes(ckpt: &Checkpoint, l: usize, p: &str, e: usize) -> (Vec<u8>, Vec<u8>) {
    let t = base_expert_mxfp4(ckpt, l, p);
    let (nb, ns) = (t.blocks().len() / 8, t.scales().len() / 8);
    (t.blocks()[e * nb..(e + 1) * nb].to_vec(), t.scales()[e * ns..(e + 1) * ns].to_vec())
}

/// An expert whose ΔW is zero keeps its bytes (re-quantizing its dequantized values could pick other
/// bytes for the same values); its neighbours are re-quantized.
#[test]
fn experts_without_lora_are_byte_identical() {
    let dir = scratch("zero-expert");
    let adapter = edited_adapter(&dir, 1.0, &[(1, true, 3), (2, false, 0)]);
    let out = dir.join("out");
    let report = merge(&base(), &adapter, &out, &opts(MergeFormat::Mxfp4)).unwrap();
    let (b, m) = (Checkpoint::open(&base()).unwrap(), Checkpoint::open(&out).unwrap());
    assert_eq!(expert_bytes(&b, 1, "gate_up_proj", 3), expert_bytes(&m, 1, "gate_up_proj", 3));
    assert_eq!(expert_bytes(&b, 2, "down_proj", 0), expert_bytes(&m, 2, "down_proj", 0));
    assert_ne!(expert_bytes(&b, 1, "gate_up_proj", 2), expert_bytes(&m, 1, "gate_up_proj", 2));
    let copied: Vec<_> = report
        .quant_errors
        .iter()
        .filter(|q| q.copied_experts > 0)
        .map(|q| (q.layer, q.proj, q.copied_experts))
        .collect();
    assert_eq!(copied, vec![(1, "gate_up_proj", 1), (2, "down_proj", 1)]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An attention-only adapter leaves every expert tensor byte-identical, and the merge prints no
/// quantization error.
#[test]
fn attention_only_adapter_copies_all_experts() {
    let dir = scratch("attn-only");
    let cfg = GptOssConfig::from_dir(&base()).unwrap();
    let spec = LoraSpec { r: 2, alpha: 4.0, rslora: false, attention: true, experts: false };
    let mut a = LoraAdapter::new(&cfg, spec, 3).unwrap();
    for (k, v, _) in a.params() {
        if k.ends_with("lora_B.weight") {
            v.iter_mut().enumerate().for_each(|(i, x)| *x = ((i % 7) as f32 - 3.0) * 0.01);
        }
    }
    let adapter = dir.join("adapter");
    a.save(&adapter, None).unwrap();
    let out = dir.join("out");
    let report = merge(&base(), &adapter, &out, &opts(MergeFormat::Mxfp4)).unwrap();
    assert!(report.quant_errors.is_empty());
    let (b, m) = (Checkpoint::open(&base()).unwrap(), Checkpoint::open(&out).unwrap());
    let experts: Vec<&str> = b.names().filter(|n| n.contains(".mlp.experts.")).collect();
    assert_eq!(experts.len(), 3 * 6);
    for n in experts {
        assert_eq!(b.bytes(b.info(n).unwrap()), m.bytes(m.info(n).unwrap()), "{n}");
    }
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(b.bytes(b.info(q).unwrap()), m.bytes(m.info(q).unwrap()), "attention is merged");
    let rel = rel_err("attention-only mxfp4 merge", &merged_logits(&out), &{
        let m = Model::load(&base()).unwrap();
        let (ids, bt, t) = ids();
        m.forward_with(&ids, bt, t, &LoraAdapter::load(&adapter, &m.cfg).unwrap()).unwrap()
    });
    // Only bf16 rounding of the attention weights: no expert changed.
    assert!(rel <= 1e-2, "{rel}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// transformers' unquantized base layout merges too (experts read from `[E, in, out]` bf16).
#[test]
fn bf16_base_merges_to_bf16() {
    let dir = scratch("bf16-base");
    let model = fixture("model/tiny-top2-bf16");
    let cfg = GptOssConfig::from_dir(&model).unwrap();
    let mut a = LoraAdapter::new(&cfg, LoraSpec { r: 2, alpha: 4.0, ..LoraSpec::default() }, 5).unwrap();
    for (k, v, _) in a.params() {
        if k.ends_with("lora_B.weight") {
            v.iter_mut().enumerate().for_each(|(i, x)| *x = ((i % 5) as f32 - 2.0) * 0.02);
        }
    }
    let adapter = dir.join("adapter");
    a.save(&adapter, None).unwrap();
    let out = dir.join("out");
    merge(&model, &adapter, &out, &opts(MergeFormat::Bf16)).unwrap();
    let m = Model::load(&model).unwrap();
    let ids: Vec<u32> = (0..10).map(|i| (i * 37 % cfg.vocab_size) as u32).collect();
    let want = m.forward_with(&ids, 1, 10, &LoraAdapter::load(&adapter, &cfg).unwrap()).unwrap();
    let got = Model::load(&out).unwrap().forward(&ids, 1, 10).unwrap();
    assert!(rel_err("bf16 base merged", &got, &want) <= 1e-2);
    let err = merge(&model, &adapter, &dir.join("mx"), &opts(MergeFormat::Mxfp4)).unwrap_err().to_string();
    assert!(err.contains("use --format bf16"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--dry-run` lists exactly the files and tensors a real run writes, and writes nothing.
#[test]
fn dry_run_writes_nothing() {
    let dir = scratch("dry-run");
    for format in [MergeFormat::Bf16, MergeFormat::Mxfp4] {
        let out = dir.join(format!("{format:?}"));
        let dry: MergeReport =
            merge(&base(), &peft_adapter(), &out, &MergeOptions { dry_run: true, ..opts(format) }).unwrap();
        assert!(!out.exists(), "dry run created {}", out.display());
        let real = merge(&base(), &peft_adapter(), &out, &opts(format)).unwrap();
        let names = |r: &MergeReport| -> Vec<(String, Vec<String>)> {
            r.files.iter().map(|f| (f.name.clone(), f.tensors.iter().map(|t| t.name.clone()).collect())).collect()
        };
        assert_eq!(names(&dry), names(&real));
        assert!(dry.quant_errors.is_empty());
        let mut written: Vec<String> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        written.sort();
        let mut listed: Vec<String> = dry.files.iter().map(|f| f.name.clone()).chain(dry.side_files.clone()).collect();
        listed.sort();
        assert_eq!(written, listed, "no temporary file left behind");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = scratch("bad");
    let o = opts(MergeFormat::Bf16);
    let err = |r: oxtune_trainer::Result<MergeReport>| r.unwrap_err().to_string();
    // An adapter made for another model (tiny-top2: hidden 64, 4 experts).
    let e = err(merge(&fixture("model/tiny-top2"), &peft_adapter(), &dir.join("a"), &o));
    assert!(e.contains("does not fit the model"), "{e}");
    let e = err(merge(&dir.join("nope"), &peft_adapter(), &dir.join("b"), &o));
    assert!(e.contains("--model") && e.contains("no such directory"), "{e}");
    let e = err(merge(&base(), &dir.join("nope"), &dir.join("c"), &o));
    assert!(e.contains("--adapter") && e.contains("no such directory"), "{e}");
    // A model directory that is not one.
    let e = err(merge(&peft_adapter(), &peft_adapter(), &dir.join("d"), &o));
    assert!(e.contains("config.json"), "{e}");
    // A non-empty output directory is never overwritten.
    std::fs::create_dir_all(dir.join("full")).unwrap();
    std::fs::write(dir.join("full/keep.txt"), b"x").unwrap();
    let e = err(merge(&base(), &peft_adapter(), &dir.join("full"), &o));
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read_dir(dir.join("full")).unwrap().count(), 1);
    for d in ["a", "b", "c", "d"] {
        assert!(!dir.join(d).exists(), "a failed merge created {d}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One safetensors file with PEFT's keys and values and metadata naming the rank, alpha, targets and
/// the base model's fingerprint, which differs between models and not between copies.
#[test]
fn export_adapter_writes_one_file_with_metadata() {
    let dir = scratch("export");
    let out = dir.join("adapter.safetensors");
    export_adapter(&base(), &peft_adapter(), &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().unwrap();
    assert_eq!(md["r"], "4");
    assert_eq!(md["lora_alpha"], "8");
    assert_eq!(md["use_rslora"], "false");
    assert_eq!(md["format"], "pt");
    let modules: Vec<String> = serde_json::from_str(&md["target_modules"]).unwrap();
    assert_eq!(modules, ["k_proj", "o_proj", "q_proj", "v_proj"]);
    let params: Vec<String> = serde_json::from_str(&md["target_parameters"]).unwrap();
    assert_eq!(params, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]);
    let fp = base_fingerprint(&base()).unwrap();
    assert_eq!(md["base_model_fingerprint"], fp);
    assert!(fp.starts_with("fnv1a64:") && fp.len() == 8 + 16, "{fp}");
    assert_ne!(fp, base_fingerprint(&fixture("model/tiny-top2")).unwrap());
    // A copy of the base has the same fingerprint.
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(base()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    assert_eq!(base_fingerprint(&copy).unwrap(), fp);
    // Same tensors, bit for bit, as PEFT's adapter_model.safetensors.
    let peft = std::fs::read(peft_adapter().join("adapter_model.safetensors")).unwrap();
    let (p, o) = (SafeTensors::deserialize(&peft).unwrap(), SafeTensors::deserialize(&bytes).unwrap());
    assert_eq!(p.len(), o.len());
    for (name, t) in p.tensors() {
        let g = o.tensor(&name).unwrap();
        assert_eq!((t.dtype(), t.shape(), t.data()), (g.dtype(), g.shape(), g.data()), "{name}");
    }
    let e = export_adapter(&fixture("model/tiny-top2"), &peft_adapter(), &dir.join("x.safetensors")).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
