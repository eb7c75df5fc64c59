//! `oxtune merge` and `oxtune export-adapter`: a merged Hugging Face model directory (bf16 or MXFP4)
//! and a single-file adapter that names its base model.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oxtune_trainer::merge::{self, MergeFormat, MergeOptions, ScaleMode};

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Base model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter directory (PEFT format) made for this model.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory; must not exist or be empty.
    #[arg(long)]
    out: PathBuf,
    /// bf16: transformers' unquantized layout (experts dequantized, no quantization_config).
    /// mxfp4: the base's layout, merged experts re-quantized.
    #[arg(long, value_parser = ["bf16", "mxfp4"])]
    format: String,
    /// mxfp4: how each re-quantized block's scale is chosen. round-up: triton's downcast_to_mxfp, as
    /// transformers quantizes. min-error: per block the better of that scale and the one below it.
    #[arg(long, value_parser = ["round-up", "min-error"], default_value = "round-up")]
    mxfp4_scales: String,
    /// bf16: start a new shard before one would exceed this many bytes.
    #[arg(long, default_value_t = merge::DEFAULT_MAX_SHARD_BYTES as f64)]
    max_shard_bytes: f64,
    /// Print the files and tensors that would be written, and write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
pub struct ExportAdapterArgs {
    /// LoRA adapter directory (PEFT format).
    #[arg(long)]
    adapter: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Base model directory, for the fingerprint [default: the adapter's base_model_name_or_path].
    #[arg(long)]
    model: Option<PathBuf>,
}

/// Writes `text` to stdout; a closed pipe (`oxtune merge --dry-run | head`) is not an error.
fn print_all(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.3} GB", bytes as f64 / 1e9)
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let format = if a.format == "mxfp4" { MergeFormat::Mxfp4 } else { MergeFormat::Bf16 };
    if !(a.max_shard_bytes.is_finite() && a.max_shard_bytes >= 1.0) {
        bail!("--max-shard-bytes must be a positive number of bytes, got {}", a.max_shard_bytes);
    }
    let scale_mode = if a.mxfp4_scales == "min-error" { ScaleMode::MinError } else { ScaleMode::RoundUp };
    let opts = MergeOptions { format, scale_mode, max_shard_bytes: a.max_shard_bytes as u64, dry_run: a.dry_run };
    let started = std::time::Instant::now();
    let report = merge::merge(&a.model, &a.adapter, &a.out, &opts)?;
    let verb = if a.dry_run { "would write" } else { "wrote" };
    let mut o = String::new();
    for f in &report.files {
        writeln!(o, "{verb} {} ({}, {} tensors)", a.out.join(&f.name).display(), gb(f.nbytes()), f.tensors.len())?;
        if a.dry_run {
            for t in &f.tensors {
                writeln!(o, "  {:<60} {:>5} {:?} {}", t.name, format!("{:?}", t.dtype), t.shape, t.action())?;
            }
        }
    }
    for s in &report.side_files {
        writeln!(o, "{verb} {}", a.out.join(s).display())?;
    }
    for q in &report.quant_errors {
        writeln!(
            o,
            "layer {:>3} {:<12} MXFP4 re-quantization: ||q - m|| / ||m|| = {:.3e}, ||q - m|| / ||dW|| = {:.3e} ({} experts without LoRA copied)",
            q.layer, q.proj, q.rel, q.delta_rel, q.copied_experts
        )?;
    }
    print_all(&o)?;
    if let Some(q) =
        report.quant_errors.iter().filter(|q| q.delta_rel >= 0.5).max_by(|a, b| a.delta_rel.total_cmp(&b.delta_rel))
    {
        let hint = if scale_mode == ScaleMode::RoundUp { "; --mxfp4-scales min-error adds less error" } else { "" };
        eprintln!(
            "warning: re-quantizing to MXFP4 loses most of the adapter's expert update (layer {} {}: error {:.2} x ||dW||); \
             the bf16 format keeps it{hint}",
            q.layer, q.proj, q.delta_rel
        );
    }
    if !a.dry_run {
        let total: u64 = report.files.iter().map(|f| f.nbytes()).sum();
        eprintln!("merged in {:.1}s, {} of weights", started.elapsed().as_secs_f64(), gb(total));
    }
    Ok(())
}

fn base_of(adapter: &Path) -> Result<PathBuf> {
    let cfg = std::fs::read_to_string(adapter.join("adapter_config.json"))
        .with_context(|| format!("reading {}", adapter.join("adapter_config.json").display()))?;
    let v: serde_json::Value = serde_json::from_str(&cfg)?;
    match v.get("base_model_name_or_path").and_then(|p| p.as_str()).map(PathBuf::from) {
        Some(p) if p.is_dir() => Ok(p),
        Some(p) => {
            bail!("the adapter's base_model_name_or_path {} is not a local directory; pass --model DIR", p.display())
        }
        None => bail!("the adapter names no base model; pass --model DIR"),
    }
}

pub fn export_adapter(a: ExportAdapterArgs) -> Result<()> {
    let model = match a.model {
        Some(m) => m,
        None => base_of(&a.adapter)?,
    };
    let meta = merge::export_adapter(&model, &a.adapter, &a.out)?;
    let mut o = format!("wrote {}\n", a.out.display());
    for (k, v) in &meta {
        writeln!(o, "  {k}: {v}")?;
    }
    print_all(&o)
}
