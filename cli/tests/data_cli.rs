//! `oxtune data check | render` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn oxtune(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_oxtune")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_reports_the_seed_files_errors_with_positions() {
    let seed = root().join("fixtures/data/seed-examples.jsonl");
    let (ok, out, err) = oxtune(&["data", "check", seed.to_str().unwrap()]);
    assert!(!ok, "a file with invalid examples must fail the check");
    let all = out + &err;
    assert!(all.contains("seed-examples.jsonl:1:227") && all.contains("malformed JSON"), "{all}");
    assert!(all.contains("0 valid of 6"), "{all}");
}

#[test]
fn check_summarizes_a_valid_file() {
    let train = root().join("data/assets/persona_train.jsonl");
    let (ok, out, err) = oxtune(&["data", "check", train.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("93 valid of 93") && out.contains("trainable tokens"), "{out}");
}

#[test]
fn render_marks_the_trained_span_and_json_has_transformers_labels() {
    let eval = root().join("data/assets/persona_eval.jsonl");
    let (ok, out, err) = oxtune(&["data", "render", eval.to_str().unwrap(), "--index", "0"]);
    assert!(ok, "{err}");
    // The trained span runs from <|channel|> of the answer through <|return|>.
    assert!(out.contains("<|start|>assistant⟦<|channel|>final<|message|>") && out.contains("<|return|>⟧"), "{out}");
    let (ok, json, err) = oxtune(&["data", "render", eval.to_str().unwrap(), "--index", "0", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ids = v["input_ids"].as_array().unwrap();
    let labels = v["labels"].as_array().unwrap();
    assert_eq!(ids.len(), labels.len());
    assert_eq!(ids[0], 200006, "starts with <|start|>");
    assert_eq!(labels.last().unwrap(), &serde_json::json!(200002), "ends with a trained <|return|>");
    let trained = labels.iter().filter(|l| **l != -100).count();
    assert!(trained > 3 && trained < ids.len() / 2, "{trained} of {}", ids.len());
    let (ok, _, err) = oxtune(&["data", "render", eval.to_str().unwrap(), "--index", "999"]);
    assert!(!ok && !err.contains("panicked"), "{err}");
}
