//! LoRA forward and backward against PEFT 0.21 (fixtures/lora/peft-tiny-top4, written by
//! scripts/make_lora_fixtures.py): logits and loss with the adapter, and the gradient of every
//! LoRA tensor (attention q/k/v/o and both expert projections).

use std::path::{Path, PathBuf};

use oxtune_trainer::grad::TrainBatch;
use oxtune_trainer::lora_adapter::{LoraAdapter, LoraSpec};
use oxtune_trainer::ops::loss::shift_labels;
use oxtune_trainer::Model;
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    st.tensor(name).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn lora_logits_loss_and_gradients_match_peft() {
    let dir = fixtures().join("lora/peft-tiny-top4");
    let model = Model::load(&fixtures().join("model/tiny-top4")).unwrap();
    let mut adapter = LoraAdapter::load(&dir, &model.cfg).unwrap();
    assert_eq!(adapter.spec, LoraSpec { r: 4, alpha: 8.0, ..LoraSpec::default() });
    // The loaded values are PEFT's, under PEFT's keys.
    let adapter_bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let adapter_st = SafeTensors::deserialize(&adapter_bytes).unwrap();
    let keys: Vec<String> = adapter_st.names().into_iter().map(String::from).collect();
    for (key, _, value) in adapter.tensors() {
        assert_eq!(value, f32s(&adapter_st, &key), "{key}");
    }

    let ref_bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let r = SafeTensors::deserialize(&ref_bytes).unwrap();
    let ids: Vec<u32> = i64s(&r, "input_ids").iter().map(|&x| x as u32).collect();
    let labels = i64s(&r, "labels");
    let (bsz, seq) = (2, 12);
    let logits = model.forward_with(&ids, bsz, seq, &adapter).unwrap();
    let err = rel(&logits, &f32s(&r, "logits"));
    println!("logits relative error {err:.2e}");
    assert!(err <= 1e-4, "logits relative error {err:.2e}");
    let loss = model.loss(&logits, &labels, seq).unwrap();
    let want_loss = f32s(&r, "loss")[0];
    assert!(((loss - want_loss) / want_loss).abs() <= 1e-4, "loss {loss} vs {want_loss}");

    let batch = TrainBatch {
        pos: (0..bsz).flat_map(|_| 0..seq as u32).collect(),
        seg: vec![0; ids.len()],
        rows: (0..bsz).map(|b| b * seq..(b + 1) * seq).collect(),
        targets: shift_labels(&labels, seq),
        ids,
    };
    let n = batch.counted();
    let (sum, counted) = model.forward_backward(&batch, &adapter, 1.0 / n as f32, None).unwrap();
    assert_eq!(counted, n);
    assert!(((sum / n as f64) as f32 - want_loss).abs() <= 1e-4 * want_loss);
    let mut worst = (0.0f64, String::new());
    let grads = adapter.grads();
    assert_eq!(grads.len(), keys.len());
    for (key, _, g) in grads {
        let e = rel(g, &f32s(&r, &format!("grad.{key}")));
        if e > worst.0 {
            worst = (e, key);
        }
    }
    println!("worst LoRA gradient relative error {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 <= 1e-3, "gradient of {} off by {:.2e}", worst.1, worst.0);
}
