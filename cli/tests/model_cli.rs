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

#[test]
fn forward_with_adapter_writes_peft_gradients() {
    let model = fixtures().join("model/tiny-top4");
    let peft = fixtures().join("lora/peft-tiny-top4");
    let reference = peft.join("reference.safetensors");
    let out = tmp("grads.safetensors");
    let (ok, _, err) = oxtune(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        peft.to_str().unwrap(),
        "--tokens",
        reference.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--grads",
    ]);
    assert!(ok, "{err}");
    let (got, want) = (std::fs::read(&out).unwrap(), std::fs::read(&reference).unwrap());
    let (got, want) = (SafeTensors::deserialize(&got).unwrap(), SafeTensors::deserialize(&want).unwrap());
    let grads: Vec<String> = want.names().into_iter().filter(|n| n.starts_with("grad.")).map(String::from).collect();
    assert_eq!(grads.len(), 36);
    for name in grads.iter().chain([&"logits".to_string()]) {
        let (g, w) = (f32s(&got, name), f32s(&want, name));
        let num: f64 = g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!((num / den).sqrt() <= 1e-3, "{name}: relative error {}", (num / den).sqrt());
    }
    std::fs::remove_file(out).unwrap();
    // --grads without labels or adapter is an error, not a panic.
    let no_labels = fixtures().join("model/tiny-top4/reference.safetensors");
    let (ok, _, err) = oxtune(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        no_labels.to_str().unwrap(),
        "--out",
        "x",
        "--grads",
    ]);
    assert!(!ok && err.contains("--grads needs --adapter"), "{err}");
}

#[test]
fn train_then_chat_and_generate_with_the_adapter() {
    let out = tmp("train");
    let (ok, stdout, err) = oxtune(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--grad-accum",
        "1",
        "--max-len",
        "256",
        "--eval-every",
        "0",
        "--lr",
        "1e-3",
    ]);
    assert!(ok, "{err}\n{stdout}");
    assert!(stdout.contains("step     2/2") && stdout.contains("tok/s") && stdout.contains("ETA"), "{stdout}");
    assert!(stdout.contains("eval loss"), "{stdout}");
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint-2/trainer_state.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let adapter = out.join("adapter");
    let (ok, text, err) = oxtune(&[
        "generate",
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "Bạn tên là gì?",
        "--max-new-tokens",
        "4",
    ]);
    assert!(ok && !text.trim().is_empty(), "{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(["chat", "--adapter", adapter.to_str().unwrap(), "--max-new-tokens", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all("Xin chào\n/reset\nBạn làm nghề gì?\n/quit\n".as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let chat = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(chat.matches("assistant>").count(), 2, "{chat}");
    // QLoRA: attention in NF4.
    let q = tmp("qlora");
    let (ok, stdout, err) = oxtune(&[
        "train",
        "--out",
        q.to_str().unwrap(),
        "--qlora",
        "--max-steps",
        "1",
        "--grad-accum",
        "1",
        "--max-len",
        "256",
        "--eval-every",
        "0",
    ]);
    assert!(ok && stdout.contains("attention in NF4") && stdout.contains("step     1/1"), "{err}\n{stdout}");
    let _ = std::fs::remove_dir_all(q);
    // A bad option value names the flag and the choices.
    let (ok, _, err) = oxtune(&["train", "--out", out.to_str().unwrap(), "--optimizer", "sgd"]);
    assert!(!ok && err.contains("--optimizer sgd") && err.contains("adamw8bit"), "{err}");
    let _ = std::fs::remove_dir_all(out);
}
