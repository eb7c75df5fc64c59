//! Project automation. `cargo xtask <command>`:
//!
//! - `train [ARGS..]`: the main job; runs `oxtune train` (release build) with ARGS, or with no
//!   arguments on the embedded default (tiny GPT-OSS + the persona dataset).
//! - `gpu-bundle`: builds the GPU crates' test binaries and the trainer's GPU engine tests (release)
//!   into `gpu-bundle/bin/`, the GPU benchmarks into `gpu-bundle/bench/`, the `oxtune` binary into
//!   `gpu-bundle/oxtune`, a `gpu-bundle/run` script that runs the tests, GPU tests included, on
//!   the GPU machine (from the repository root), `gpu-bundle/profile`, which prints the per-kernel
//!   time of one training step under Nsight Compute (`benches/profile/step_kernels.py`), and
//!   `gpu-bundle/profile-kernel`, which prints where one kernel's warps wait
//!   (`benches/profile/kernel_stalls.py`).
//! - `check-deps`: enforces the dependency rule: the domain crates (mxfp4, moe, lora, optim, data)
//!   depend on no other workspace crate except `oxtune-kernels`, and that one only as an optional
//!   dependency behind their `cuda` feature.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

const DOMAIN: [&str; 5] = ["oxtune-mxfp4", "oxtune-moe", "oxtune-lora", "oxtune-optim", "oxtune-data"];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("train") => train(args.collect()),
        Some("check-deps") => check_deps(),
        Some("gpu-bundle") => gpu_bundle(),
        _ => {
            eprintln!("usage: cargo xtask <train [ARGS..] | check-deps | gpu-bundle>");
            std::process::exit(2)
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The main job's settings for the embedded tiny model and persona dataset: a higher learning
/// rate and several epochs, since the tiny model starts from random weights; answers shown before
/// and after, and a failure if the held-out loss does not fall.
const DEFAULT_JOB: &[&str] = &[
    "--out",
    "runs/default",
    "--epochs",
    "6",
    "--lr",
    "3e-3",
    "--grad-accum",
    "1",
    "--max-len",
    "1024",
    "--eval-every",
    "11",
    "--save-every",
    "33",
    "--show-answers",
    "3",
    "--require-eval-improvement",
];

fn train(args: Vec<String>) -> Result<()> {
    let args: Vec<String> = if args.is_empty() { DEFAULT_JOB.iter().map(|s| s.to_string()).collect() } else { args };
    println!("cargo xtask train: oxtune train {}", args.join(" "));
    let status = cargo()
        .args(["run", "--quiet", "--release", "--package", "oxtune-cli", "--bin", "oxtune", "--", "train"])
        .args(&args)
        .status()
        .context("running cargo")?;
    std::process::exit(status.code().unwrap_or(1))
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target`).
fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|| "target".into())
}

/// Test binaries of the crates with GPU code, built for the GPU machine (same x86-64 Linux; every
/// CUDA library is dlopen'ed there).
fn gpu_bundle() -> Result<()> {
    // The GPU crates' whole test suites (CPU references and GPU tests), and the trainer's GPU
    // engine tests (its CPU suite runs in CI).
    let builds: [&[&str]; 2] = [
        &[
            "-p",
            "oxtune-kernels",
            "-p",
            "oxtune-moe",
            "-p",
            "oxtune-optim",
            "--features",
            "oxtune-moe/cuda,oxtune-optim/cuda",
        ],
        &["-p", "oxtune-trainer", "--test", "gpu_engine"],
    ];
    let bin = std::path::Path::new("gpu-bundle/bin");
    let _ = std::fs::remove_dir_all(bin);
    std::fs::create_dir_all(bin)?;
    let mut names = vec![];
    for args in builds {
        let out = cargo()
            .args(["test", "--release", "--no-run", "--message-format=json"])
            .args(args)
            .output()
            .context("running cargo")?;
        if !out.status.success() {
            bail!("building the GPU tests failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
            let (Some(exe), true) = (msg["executable"].as_str(), msg["profile"]["test"].as_bool() == Some(true)) else {
                continue;
            };
            let pkg = msg["package_id"].as_str().and_then(|p| p.split('#').next()).and_then(|p| p.rsplit('/').next());
            let name = format!(
                "{}-{}-{}",
                pkg.unwrap_or("pkg"),
                msg["target"]["name"].as_str().unwrap_or("test"),
                names.len()
            );
            std::fs::copy(exe, bin.join(&name)).with_context(|| format!("copying {exe}"))?;
            // Debug info is most of the size and the device tool carries 64 MiB at most; best effort.
            let _ = Command::new("strip").arg(bin.join(&name)).status();
            names.push(name);
        }
    }
    // GPU benchmarks (they check against the CPU reference, then time with CUDA events).
    let bench = std::path::Path::new("gpu-bundle/bench");
    let _ = std::fs::remove_dir_all(bench);
    std::fs::create_dir_all(bench)?;
    let out = cargo()
        .args(["bench", "--no-run", "--message-format=json", "-p", "oxtune-kernels", "--bench", "gpu"])
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("building the GPU benchmarks failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        if let (Some(exe), Some("bench")) = (msg["executable"].as_str(), msg["target"]["kind"][0].as_str()) {
            let name = format!("kernels-{}", msg["target"]["name"].as_str().unwrap_or("bench"));
            std::fs::copy(exe, bench.join(&name)).with_context(|| format!("copying {exe}"))?;
            let _ = Command::new("strip").arg(bench.join(&name)).status();
        }
    }
    // The CLI too, for GPU runs of `oxtune train`, `oxtune init-random` and `oxtune chat`.
    let st = cargo()
        .args(["build", "--release", "-p", "oxtune-cli", "--bin", "oxtune"])
        .status()
        .context("running cargo")?;
    if !st.success() {
        bail!("building oxtune failed");
    }
    std::fs::copy(target_dir().join("release/oxtune"), "gpu-bundle/oxtune").context("copying oxtune")?;
    let _ = Command::new("strip").arg("gpu-bundle/oxtune").status();
    let script = "#!/bin/sh\n# Runs every GPU test binary, GPU tests included, from the repository root (fixtures are\n# found there); exits non-zero if any fails.\nfail=0\nfor t in \"$(dirname \"$0\")\"/bin/*; do echo \"== $t\"; \"$t\" --include-ignored --nocapture --test-threads 1 || fail=1; done\nexit $fail\n";
    std::fs::write("gpu-bundle/run", script)?;
    // Per-kernel time of one training step under Nsight Compute (installed on the GPU machine).
    std::fs::copy("benches/profile/step_kernels.py", "gpu-bundle/step_kernels.py")
        .context("copying step_kernels.py")?;
    let profile = "#!/bin/sh\n# Per-kernel GPU time of one timed training step: `gpu-bundle/profile [bench-train ARGS]`\n# (e.g. --precision bf16) runs oxtune bench-train --steps 1 --warmup 1 under ncu, keeps its CSV in\n# $OUT (or /tmp) and sums the timed step's kernels by name (benches/profile/step_kernels.py).\nd=\"$(dirname \"$0\")\"\ncsv=\"${OUT:-/tmp}/step-kernels.csv\"\nncu --clock-control none --csv --print-units base --metrics gpu__time_duration.sum \"$d/oxtune\" bench-train --steps 1 --warmup 1 \"$@\" > \"$csv\" || exit 1\npython3 \"$d/step_kernels.py\" \"$csv\"\n";
    std::fs::write("gpu-bundle/profile", profile)?;
    // Where one kernel's warps wait: Nsight Compute's source-level sampling of one launch.
    std::fs::copy("benches/profile/kernel_stalls.py", "gpu-bundle/kernel_stalls.py")
        .context("copying kernel_stalls.py")?;
    let profile_kernel = "#!/bin/sh\n# Where one kernel's warps wait: `gpu-bundle/profile-kernel REGEX [bench-train ARGS]` samples\n# launch SKIP (default 20) of the kernels matching REGEX in oxtune bench-train --steps 1 --warmup 1\n# under ncu, keeps the report, its details and its source page in $OUT (or /tmp) and prints the\n# stalls by region and instruction (benches/profile/kernel_stalls.py).\nd=\"$(dirname \"$0\")\"\nk=\"$1\"\nshift\no=\"${OUT:-/tmp}\"\nncu --clock-control none --kernel-name \"regex:$k\" --launch-skip \"${SKIP:-20}\" --launch-count 1 --section SourceCounters --section WarpStateStats --section SpeedOfLight -f -o \"$o/kernel\" \"$d/oxtune\" bench-train --steps 1 --warmup 1 \"$@\" > \"$o/kernel-ncu.log\" 2>&1 || { tail -20 \"$o/kernel-ncu.log\"; exit 1; }\nncu -i \"$o/kernel.ncu-rep\" --page details > \"$o/kernel-details.txt\" || exit 1\ngrep -E \"Duration|Throughput|Issue Slots Busy|Eligible Warps|Warp Cycles Per Issued\" \"$o/kernel-details.txt\"\nncu -i \"$o/kernel.ncu-rep\" --page source --csv --print-source sass > \"$o/kernel-source.csv\" || exit 1\npython3 \"$d/kernel_stalls.py\" \"$o/kernel-source.csv\"\n";
    std::fs::write("gpu-bundle/profile-kernel", profile_kernel)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["gpu-bundle/run", "gpu-bundle/profile", "gpu-bundle/profile-kernel"] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    println!(
        "gpu-bundle: {} test binaries in gpu-bundle/bin, benchmarks in gpu-bundle/bench, and gpu-bundle/oxtune; on the GPU machine run gpu-bundle/run (gpu-bundle/profile: per-kernel time of a training step; gpu-bundle/profile-kernel REGEX: where one kernel's warps wait)",
        names.len()
    );
    Ok(())
}

/// Violations of the dependency rule in `cargo metadata` output.
fn dependency_violations(meta: &Value) -> Vec<String> {
    let mut bad = vec![];
    let packages = meta["packages"].as_array().cloned().unwrap_or_default();
    let workspace: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    for p in &packages {
        let name = p["name"].as_str().unwrap_or_default();
        if !DOMAIN.contains(&name) {
            continue;
        }
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or_default();
            if !workspace.contains(&dep) {
                continue;
            }
            let optional = d["optional"].as_bool().unwrap_or(false);
            if dep != "oxtune-kernels" {
                bad.push(format!("{name} depends on workspace crate {dep}; domain crates must stay independent (compose them in oxtune-trainer)"));
            } else if !optional {
                bad.push(format!(
                    "{name} depends on oxtune-kernels unconditionally; make it optional behind the `cuda` feature"
                ));
            } else {
                let cuda = &p["features"]["cuda"];
                let gated = cuda
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "dep:oxtune-kernels" || x == "oxtune-kernels"));
                if !gated {
                    bad.push(format!("{name}: oxtune-kernels must be enabled by the `cuda` feature"));
                }
            }
        }
    }
    bad
}

fn check_deps() -> Result<()> {
    let out =
        cargo().args(["metadata", "--format-version", "1", "--no-deps"]).output().context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    let bad = dependency_violations(&meta);
    if bad.is_empty() {
        println!("check-deps: ok ({} domain crates depend on no other workspace crate)", DOMAIN.len());
        Ok(())
    } else {
        bail!("dependency rule broken:\n  {}", bad.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(deps: Value, features: Value) -> Value {
        json!({"packages": [
            {"name": "oxtune-moe", "dependencies": deps, "features": features},
            {"name": "oxtune-mxfp4", "dependencies": [], "features": {}},
            {"name": "oxtune-kernels", "dependencies": [], "features": {}},
        ]})
    }

    #[test]
    fn accepts_kernels_behind_cuda() {
        let m = meta(
            json!([{"name": "oxtune-kernels", "optional": true}, {"name": "half", "optional": false}]),
            json!({"cuda": ["dep:oxtune-kernels"]}),
        );
        assert!(dependency_violations(&m).is_empty());
    }

    #[test]
    fn rejects_domain_to_domain_and_ungated_kernels() {
        let m = meta(json!([{"name": "oxtune-mxfp4", "optional": false}]), json!({}));
        assert!(dependency_violations(&m)[0].contains("oxtune-moe depends on workspace crate oxtune-mxfp4"));
        let m = meta(json!([{"name": "oxtune-kernels", "optional": false}]), json!({}));
        assert!(dependency_violations(&m)[0].contains("unconditionally"));
        let m = meta(json!([{"name": "oxtune-kernels", "optional": true}]), json!({"cuda": []}));
        assert!(dependency_violations(&m)[0].contains("`cuda` feature"));
    }
}
