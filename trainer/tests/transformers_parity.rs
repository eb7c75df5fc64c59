//! The CPU forward pass against transformers 5.17 on tiny random GPT-OSS checkpoints
//! (fixtures/model, written by scripts/make_model_fixtures.py): logits, loss and greedy ids.

use std::path::{Path, PathBuf};

use oxtune_trainer::Model;
use safetensors::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/model")
}

struct Reference {
    ids: Vec<u32>,
    labels: Vec<i64>,
    shape: (usize, usize),
    logits: Vec<f32>,
    loss: f32,
    prompt: Vec<u32>,
    gen: Vec<u32>,
}

fn read_i64(st: &SafeTensors, name: &str) -> (Vec<i64>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    (t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(), t.shape().to_vec())
}

fn read_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixtures().join(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (ids, shape) = read_i64(&st, "input_ids");
    Reference {
        ids: ids.iter().map(|&x| x as u32).collect(),
        labels: read_i64(&st, "labels").0,
        shape: (shape[0], shape[1]),
        logits: read_f32(&st, "logits"),
        loss: read_f32(&st, "loss")[0],
        prompt: read_i64(&st, "gen_prompt").0.iter().map(|&x| x as u32).collect(),
        gen: read_i64(&st, "gen_ids").0.iter().map(|&x| x as u32).collect(),
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn check(model_dir: &str, reference_dir: &str) {
    let r = reference(reference_dir);
    let model = Model::load(&fixtures().join(model_dir)).unwrap();
    let logits = model.forward(&r.ids, r.shape.0, r.shape.1).unwrap();
    let err = rel_err(&logits, &r.logits);
    println!("{model_dir}: ||logits - ref|| / ||ref|| = {err:.3e}");
    assert!(err <= 1e-4, "{model_dir}: logits relative error {err:.3e} > 1e-4");
    let loss = model.loss(&logits, &r.labels, r.shape.1).unwrap();
    println!("{model_dir}: loss {loss} vs {}", r.loss);
    assert!(((loss - r.loss) / r.loss).abs() <= 1e-4, "{model_dir}: loss {loss} vs {}", r.loss);
    let gen = model.generate_greedy(&r.prompt, r.gen.len(), &[]).unwrap();
    assert_eq!(gen, r.gen, "{model_dir}: greedy ids");
}

#[test]
fn top2_mxfp4_sharded_matches_transformers() {
    check("tiny-top2", "tiny-top2");
}

#[test]
fn top4_mxfp4_rope_parameters_matches_transformers() {
    check("tiny-top4", "tiny-top4");
}

#[test]
fn unquantized_layout_written_by_transformers_matches() {
    check("tiny-top2-bf16", "tiny-top2");
}
