//! `oxtune inspect | forward | generate` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn oxtune(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_oxtune")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("oxtune-cli-{}-{name}", std::process::id()))
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn inspect_gpt_oss_20b_from_config_alone() {
    let dir = fixtures().join("configs/gpt-oss-20b");
    let (ok, out, err) = oxtune(&["inspect", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("20.9B total") && out.contains("3.6B active"), "{out}");
    assert!(out.contains("checkpoint 13.76 GB"), "{out}");
    assert!(out.contains("GPU memory estimate"), "{out}");
}

#[test]
fn inspect_gpt_oss_120b() {
    let dir = fixtures().join("configs/gpt-oss-120b");
    let (ok, out, _) = oxtune(&["inspect", dir.to_str().unwrap()]);
    assert!(ok && out.contains("116.8B total") && out.contains("5.1B active") && out.contains("65.25 GB"), "{out}");
}

#[test]
fn forward_reproduces_transformers_logits_and_loss() {
    let model = fixtures().join("model/tiny-top4");
    let reference = model.join("reference.safetensors");
    let out = tmp("fwd.safetensors");
    let (ok, _, err) = oxtune(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        reference.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (got, want) = (std::fs::read(&out).unwrap(), std::fs::read(&reference).unwrap());
    let (got, want) = (SafeTensors::deserialize(&got).unwrap(), SafeTensors::deserialize(&want).unwrap());
    assert_eq!(got.tensor("logits").unwrap().shape(), &[2, 12, 300]);
    let (g, w) = (f32s(&got, "logits"), f32s(&want, "logits"));
    let num: f64 = g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!((num / den).sqrt() <= 1e-4);
    let (gl, wl) = (f32s(&got, "loss")[0], f32s(&want, "loss")[0]);
    assert!(((gl - wl) / wl).abs() <= 1e-4, "{gl} vs {wl}");
    std::fs::remove_file(out).unwrap();
}

#[test]
fn generate_prints_greedy_ids() {
    let model = fixtures().join("model/tiny-top2");
    let bytes = std::fs::read(model.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = |n: &str| -> Vec<i64> {
        st.tensor(n).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let prompt: Vec<String> = ids("gen_prompt").iter().map(|x| x.to_string()).collect();
    let want = ids("gen_ids");
    let (ok, out, err) = oxtune(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &prompt.join(","),
        "--max-new-tokens",
        &want.len().to_string(),
        "--ignore-eos",
    ]);
    assert!(ok, "{err}");
    let got: Vec<i64> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got, want);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = fixtures().join("model/tiny-top2");
    let (ok, _, err) = oxtune(&["generate", "--model", model.to_str().unwrap(), "--prompt-ids", "1,x"]);
    assert!(!ok && err.contains("`x` is not a token id"), "{err}");
    let (ok, _, err) = oxtune(&["generate", "--model", model.to_str().unwrap(), "--prompt-ids", "1,300"]);
    assert!(!ok && err.contains("token id 300") && err.contains("300 tokens"), "{err}");
    let (ok, _, err) = oxtune(&["inspect", "/nonexistent/model"]);
    assert!(!ok && err.contains("/nonexistent/model/config.json"), "{err}");
    let missing = tmp("missing.safetensors");
    let (ok, _, err) =
        oxtune(&["forward", "--model", model.to_str().unwrap(), "--tokens", missing.to_str().unwrap(), "--out", "x"]);
    assert!(!ok && err.contains("missing.safetensors"), "{err}");
    assert!(!err.contains("panicked"));
}
