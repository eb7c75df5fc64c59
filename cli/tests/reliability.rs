//! `oxtune train` as a process that is killed, interrupted, runs out of space, diverges or is given
//! bad input: every case ends in a clear message, and a resumed run ends with the adapter an
//! uninterrupted run writes, byte for byte.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_oxtune");
const ADAPTER: &str = "adapter/adapter_model.safetensors";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("oxtune-rel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One held-out conversation, so that the evaluations before and after training are quick.
fn eval_file() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = tmp("eval").join("eval.jsonl");
        let line = r#"{"messages": [{"role": "user", "content": "Bạn tên là gì?"}, {"role": "assistant", "content": "Tôi tên là Thang."}]}"#;
        std::fs::write(&p, format!("{line}\n")).unwrap();
        p
    })
}

/// The small run every test shares: 8 steps of one micro-batch, a checkpoint every 2 steps.
/// A flag in `extra` replaces the default one.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let eval = eval_file().display().to_string();
    let out = out.display().to_string();
    let defaults = [
        ("--max-steps", "8"),
        ("--save-every", "2"),
        ("--grad-accum", "1"),
        ("--max-len", "256"),
        ("--eval-every", "0"),
        ("--keep-checkpoints", "3"),
        ("--eval-data", eval.as_str()),
        ("--out", out.as_str()),
    ];
    let mut a = vec!["train".to_string()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            a.extend([flag.to_string(), value.to_string()]);
        }
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn spawn(args: &[String]) -> Child {
    Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap()
}

/// Reads the child's stdout until a line contains `marker`; panics if it exits first.
fn wait_for(child: &mut Child, marker: &str) {
    let out = child.stdout.as_mut().unwrap();
    let mut lines = BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(marker) => return,
            Some(Ok(_)) => {}
            _ => panic!("oxtune exited before printing {marker:?}: {:?}", child.wait()),
        }
    }
}

/// SIGKILL: nothing of the process runs after it.
fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn checkpoint_steps(out: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    v.sort();
    v
}

/// FNV-1a, as `trainer_state.json` records it.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Every checkpoint directory is complete: its state file lists each other file with the
/// checksum it has.
fn assert_checkpoints_complete(out: &Path) {
    for s in checkpoint_steps(out) {
        let dir = out.join(format!("checkpoint-{s}"));
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
        let sums = state["checksums"].as_object().unwrap();
        assert!(sums.contains_key("adapter_model.safetensors") && sums.contains_key("optimizer.safetensors"));
        for (f, sum) in sums {
            let bytes = std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display()));
            assert_eq!(sum.as_str().unwrap(), fnv1a(&bytes), "{}/{f} is not the file its state lists", dir.display());
        }
    }
}

fn leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// The final adapter of an uninterrupted run.
fn reference() -> &'static [u8] {
    static R: OnceLock<Vec<u8>> = OnceLock::new();
    R.get_or_init(|| {
        let out = tmp("reference");
        let o = run(&train_args(&out, &[]));
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("done: 8 steps") && stdout.contains("(0 skipped)"), "{stdout}");
        std::fs::read(out.join(ADAPTER)).unwrap()
    })
}

#[test]
fn killed_during_steps_and_checkpoints_then_resumed_gives_the_same_adapter() {
    let want = reference();
    let out = tmp("kill");
    let resume = train_args(&out, &["--resume"]);

    // Killed during step 4 (checkpoint 2 is written before `step 3` is printed).
    let mut c = spawn(&train_args(&out, &[]));
    wait_for(&mut c, "step     3/8");
    std::thread::sleep(std::time::Duration::from_millis(150));
    kill(c);
    assert_eq!(checkpoint_steps(&out), [2]);
    assert_checkpoints_complete(&out);

    // Resumed, then killed at once after step 6 is printed: while checkpoint 6 is being written
    // or just after; either way only complete checkpoints may be left.
    let mut c = spawn(&resume);
    wait_for(&mut c, "step     6/8");
    kill(c);
    let steps = checkpoint_steps(&out);
    assert!(steps == [2, 4] || steps == [2, 4, 6], "{steps:?}");
    assert_checkpoints_complete(&out);

    // Resumed, then killed at once after the last step: during the final evaluation or while the
    // adapter and the last checkpoint are written.
    let mut c = spawn(&resume);
    wait_for(&mut c, "step     8/8");
    kill(c);
    let steps = checkpoint_steps(&out);
    assert!(steps == [2, 4, 6] || steps == [4, 6, 8], "{steps:?}");
    assert_checkpoints_complete(&out);

    // What a kill in the middle of writing a checkpoint leaves (its temporary directory, a
    // temporary file of `write_atomic`), and a newer checkpoint with files missing, as a
    // filesystem without atomic renames could leave it: resume must use the newest complete one.
    let partial = out.join(".checkpoint-10.tmp");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("adapter_model.safetensors"), &want[..want.len() / 2]).unwrap();
    std::fs::write(out.join(".metrics.jsonl.tmp-4242"), b"{\"step\"").unwrap();
    let broken = out.join("checkpoint-9");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(out.join("checkpoint-6/adapter_model.safetensors"), broken.join("adapter_model.safetensors"))
        .unwrap();

    let o = run(&resume);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("checkpoint-9") && stderr.contains("trying an older one"), "{stderr}");
    let from = *steps.last().unwrap();
    assert!(stdout.contains(&format!("resumed from checkpoint at step {from}")), "{stdout}");
    assert_eq!(leftovers(&out), Vec::<String>::new(), "partial files are cleaned up");
    assert!(std::fs::read(out.join(ADAPTER)).unwrap() == want, "resumed adapter differs from the uninterrupted run's");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn ctrl_c_finishes_the_step_saves_a_checkpoint_and_says_how_to_resume() {
    let want = reference();
    let out = tmp("sigint");
    // No periodic checkpoints: the one found afterwards is Ctrl-C's.
    let args = train_args(&out, &["--save-every", "0"]);
    let mut c = Command::new(BIN).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(&mut c, "step     2/8");
    let sent = Command::new("kill").args(["-INT", &c.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let o = c.wait_with_output().unwrap();
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(stderr.contains("Ctrl-C: finishing the current step"), "{stderr}");
    let steps = checkpoint_steps(&out);
    assert_eq!(steps.len(), 1, "{steps:?}");
    let s = steps[0];
    assert!((3..8).contains(&s), "stopped after step {s}");
    assert!(stdout.contains(&format!("step     {s}/8")), "the step in progress finished: {stdout}");
    assert!(stdout.contains(&format!("interrupted after step {s}/8")), "{stdout}");
    assert!(stdout.contains("to continue:") && stdout.contains("--save-every 0") && stdout.contains("--resume"));
    assert!(!out.join(ADAPTER).exists(), "an interrupted run writes no final adapter");
    assert_checkpoints_complete(&out);

    let o = run(&train_args(&out, &["--save-every", "0", "--resume"]));
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::read(out.join(ADAPTER)).unwrap() == want, "resumed adapter differs from the uninterrupted run's");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let want = reference();
    let out = tmp("full");
    let mut c = spawn(&train_args(&out, &[]));
    wait_for(&mut c, "checkpoint step 2");
    kill(c);
    assert_eq!(checkpoint_steps(&out), [2]);
    let before = std::fs::read(out.join("checkpoint-2/optimizer.safetensors")).unwrap();

    // A file-size limit makes writes fail the way a full disk does, and binds root too (a
    // read-only directory does not). SIGXFSZ is ignored so the write returns an error instead.
    let mut args = train_args(&out, &["--resume"]);
    args.insert(0, BIN.to_string());
    let o = Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 64; trap '' XFSZ; exec \"$@\"")
        .arg("oxtune")
        .args(&args)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("checkpoint-4: could not save the checkpoint"), "{stderr}");
    assert!(stderr.contains("File too large"), "the OS error is shown: {stderr}");
    assert!(stderr.contains("checkpoint-2 is intact") && stderr.contains("--resume"), "{stderr}");
    assert_eq!(checkpoint_steps(&out), [2]);
    assert_eq!(leftovers(&out), Vec::<String>::new(), "the partial checkpoint is removed");
    assert!(std::fs::read(out.join("checkpoint-2/optimizer.safetensors")).unwrap() == before);

    let o = run(&train_args(&out, &["--resume"]));
    let (stdout, stderr) = text(&o);
    assert!(o.status.success() && stdout.contains("resumed from checkpoint at step 2"), "{stdout}\n{stderr}");
    assert!(std::fs::read(out.join(ADAPTER)).unwrap() == want);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn non_finite_steps_are_counted_and_too_many_in_a_row_stop_with_good_checkpoints_kept() {
    // lr 1e30 blows the weights up after the first update; later losses are not finite.
    let out = tmp("nan");
    let o =
        run(&train_args(&out, &["--lr", "1e30", "--warmup-ratio", "0", "--save-every", "1", "--max-bad-steps", "3"]));
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("3 steps in a row had a non-finite loss"), "{stderr}");
    assert_eq!(stderr.matches("step skipped").count(), 3, "{stderr}");
    // The newest checkpoint is the one of the last step with a finite loss.
    let good: Vec<u64> =
        stdout.lines().filter_map(|l| l.strip_prefix("step ")?.trim_start().split('/').next()?.parse().ok()).collect();
    let last_good = *good.last().expect("the first step is finite");
    assert_eq!(checkpoint_steps(&out).last(), Some(&last_good), "{stdout}\n{stderr}");
    assert_checkpoints_complete(&out);
    // The losses measured before the run stopped are kept in metrics.jsonl.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("\"kind\":\"train\"").count(), good.len(), "{metrics}");

    // Below the limit the run finishes and reports how many steps it skipped.
    let out2 = tmp("nan-done");
    let o = run(&train_args(&out2, &["--lr", "1e30", "--warmup-ratio", "0", "--max-steps", "4"]));
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let skipped = stderr.matches("step skipped").count();
    assert!(skipped >= 1, "{stderr}");
    assert!(stdout.contains("done: 4 steps") && stdout.contains(&format!("({skipped} skipped)")), "{stdout}");
    for d in [out, out2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Runs `oxtune train` on `data`, expecting a clean failure whose message has every `want`.
fn train_fails(data: &Path, extra: &[&str], want: &[&str]) {
    let out = tmp("bad-input");
    let mut args = train_args(&out, extra);
    args.extend(["--data".to_string(), data.display().to_string()]);
    let o = run(&args);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for w in want {
        assert!(stderr.contains(w), "expected {w:?} in:\n{stderr}");
    }
}

#[test]
fn seed_file_fails_with_and_without_skip_invalid() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data/seed-examples.jsonl");
    train_fails(&seed, &[], &["seed-examples.jsonl:1:227", "malformed JSON"]);
    train_fails(&seed, &["--skip-invalid"], &["seed-examples.jsonl: no valid example"]);
}

#[test]
fn empty_dataset_is_an_error() {
    let p = tmp("empty").join("empty.jsonl");
    std::fs::write(&p, "").unwrap();
    train_fails(&p, &[], &["empty.jsonl", "no valid example"]);
}

#[test]
fn every_example_longer_than_max_len_is_an_error() {
    let p = tmp("long").join("long.jsonl");
    let line = r#"{"messages": [{"role": "user", "content": "Bạn tên là gì? Hãy kể thật dài về bản thân bạn."}, {"role": "assistant", "content": "Tôi tên là Thang Nguyen, một lập trình viên thích AI."}]}"#;
    std::fs::write(&p, format!("{line}\n{line}\n")).unwrap();
    train_fails(&p, &["--max-len", "16"], &["long.jsonl:1", "more than max_len 16"]);
    train_fails(&p, &["--max-len", "16", "--skip-invalid"], &["long.jsonl: no valid example"]);
}

#[test]
fn non_utf8_dataset_is_an_error() {
    let p = tmp("latin1").join("latin1.jsonl");
    std::fs::write(&p, b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}\n").unwrap();
    train_fails(&p, &[], &["latin1.jsonl:1:47", "invalid UTF-8 (byte 0xE9)"]);
}

#[test]
fn chat_with_an_adapter_of_another_rank_is_an_error() {
    reference();
    let dir = tmp("rank");
    let src = std::env::temp_dir().join(format!("oxtune-rel-{}-reference/adapter", std::process::id()));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // The tensors are rank 8; the config now says 4.
    let cfg = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(v["r"], 8);
    v["r"] = 4.into();
    std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
    let o = Command::new(BIN).args(["chat", "--adapter", dir.to_str().unwrap()]).stdin(Stdio::null()).output().unwrap();
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Every mismatched tensor is named with the shape found and the shape expected.
    assert!(stderr.contains(&format!("the adapter in {} does not match the model", dir.display())), "{stderr}");
    let q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: shape [8, 128] in the file, the model expects [4, 128]";
    assert!(stderr.contains(q), "{stderr}");
}

#[test]
fn asking_for_a_gpu_without_one_is_a_clear_error() {
    if oxtune_kernels::device::driver_available() {
        // This machine has an NVIDIA driver, so the message for a missing one cannot be provoked;
        // the GPU machine checks the other faults (trainer/tests/gpu_engine.rs).
        eprintln!("SKIPPED: an NVIDIA driver is present; this test checks the no-driver message");
        return;
    }
    let out = tmp("no-gpu");
    let o = run(&train_args(&out, &["--device", "cuda", "--max-steps", "1"]));
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for want in ["--device cuda", "libcuda", "LD_LIBRARY_PATH", "--device cpu"] {
        assert!(stderr.contains(want), "expected {want:?} in:\n{stderr}");
    }
    // With `auto` the same machine trains on the CPU and says why.
    let o = run(&train_args(&out, &["--device", "auto", "--max-steps", "1", "--save-every", "0"]));
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("device: CPU") && stdout.contains("no usable GPU"), "{stdout}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn gpu_memory_options_that_cannot_work_are_clear_errors() {
    // These are refused before any device is opened, so they are checked on every machine.
    let out = tmp("gpu-options");
    let o = run(&train_args(&out, &["--offload-checkpoints", "--no-activation-checkpointing", "--device", "cpu"]));
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("--offload-checkpoints") && stderr.contains("--no-activation-checkpointing"), "{stderr}");
    let o = run(&train_args(&out, &["--precision", "fp8", "--device", "cpu"]));
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("fp8") && stderr.contains("exact or bf16"), "{stderr}");
    let bench = |args: &[&str]| {
        let o = Command::new(BIN).arg("bench-train").args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "bench-train {args:?}: {:?}", text(&o));
        let e = text(&o).1;
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let e = bench(&["--seq", "2048,0"]);
    assert!(e.contains("--seq") && e.contains("positive"), "{e}");
    let e = bench(&["--precision", "half"]);
    assert!(e.contains("half") && e.contains("exact or bf16"), "{e}");
    let e = bench(&["--offload-checkpoints", "--no-checkpointing"]);
    assert!(e.contains("--offload-checkpoints") && e.contains("--no-checkpointing"), "{e}");
    let _ = std::fs::remove_dir_all(out);
}
