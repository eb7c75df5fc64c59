//! `oxtune data check|render`: inspect a chat dataset the way the trainer
//! will see it.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use oxtune_data::{
    load_bytes, read_conversations, Format, LoadOptions, MaskPolicy, ReasoningEffort, Renderer, Report, SystemConfig,
    Tokenizer, Truncation,
};

#[derive(Subcommand)]
pub enum DataCmd {
    /// Validate a JSONL chat dataset: counts, token lengths, every error.
    Check {
        file: PathBuf,
        #[command(flatten)]
        opts: DataArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one example as the model sees it, with the trained tokens marked.
    Render {
        file: PathBuf,
        /// Which example (0-based, counting non-blank lines).
        #[arg(long, default_value_t = 0)]
        index: usize,
        #[command(flatten)]
        opts: DataArgs,
        /// Print {"input_ids": [...], "labels": [...]} (labels -100 where no
        /// loss is taken, as transformers expects).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct DataArgs {
    /// A tokenizer.json (default: the built-in o200k_harmony).
    #[arg(long, conflicts_with = "model")]
    tokenizer: Option<PathBuf>,
    /// A model directory holding tokenizer.json.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Dataset format (default: detected from the first valid line).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Which tokens carry loss.
    #[arg(long, value_enum, default_value_t = MaskArg::Last)]
    mask: MaskArg,
    /// Longest example in tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// What to do with examples longer than --max-len.
    #[arg(long, value_enum, default_value_t = TruncationArg::Error)]
    truncation: TruncationArg,
    /// Reasoning effort of the system message (an example's own
    /// `reasoning_effort` wins).
    #[arg(long, value_enum, default_value_t = EffortArg::Medium)]
    reasoning_effort: EffortArg,
    /// `Current date:` line of the system message (e.g. 2025-06-28).
    #[arg(long)]
    date: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Messages,
    Sharegpt,
    Alpaca,
    PromptCompletion,
}

#[derive(Clone, Copy, ValueEnum)]
enum MaskArg {
    /// The last assistant turn (analysis included).
    Last,
    /// Every assistant turn.
    All,
    /// Final-channel answers of the last turn only.
    Final,
}

#[derive(Clone, Copy, ValueEnum)]
enum TruncationArg {
    Error,
    Drop,
    Truncate,
}

#[derive(Clone, Copy, ValueEnum)]
enum EffortArg {
    Low,
    Medium,
    High,
}

impl DataArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            format: self.format.map(|f| match f {
                FormatArg::Messages => Format::Messages,
                FormatArg::Sharegpt => Format::ShareGpt,
                FormatArg::Alpaca => Format::Alpaca,
                FormatArg::PromptCompletion => Format::PromptCompletion,
            }),
            mask: match self.mask {
                MaskArg::Last => MaskPolicy::LastTurn,
                MaskArg::All => MaskPolicy::AllTurns,
                MaskArg::Final => MaskPolicy::FinalOnly,
            },
            max_len: self.max_len,
            truncation: match self.truncation {
                TruncationArg::Error => Truncation::Error,
                TruncationArg::Drop => Truncation::Drop,
                TruncationArg::Truncate => Truncation::Truncate,
            },
            skip_invalid: true,
            system: SystemConfig {
                reasoning_effort: Some(match self.reasoning_effort {
                    EffortArg::Low => ReasoningEffort::Low,
                    EffortArg::Medium => ReasoningEffort::Medium,
                    EffortArg::High => ReasoningEffort::High,
                }),
                current_date: self.date.clone(),
                ..SystemConfig::default()
            },
        }
    }

    fn tokenizer(&self) -> anyhow::Result<(Tokenizer, String)> {
        Ok(match (&self.tokenizer, &self.model) {
            (Some(p), _) => (Tokenizer::from_file(p)?, p.display().to_string()),
            (None, Some(d)) => (Tokenizer::from_model_dir(d)?, d.join("tokenizer.json").display().to_string()),
            (None, None) => {
                let tok = Tokenizer::o200k_harmony()?;
                let secs = Tokenizer::builtin_build_time().map_or(0.0, |d| d.as_secs_f64());
                (tok, format!("built-in o200k_harmony (converted in {secs:.2} s)"))
            }
        })
    }
}

pub fn run(cmd: DataCmd) -> anyhow::Result<()> {
    match cmd {
        DataCmd::Check { file, opts, json } => check(&file, &opts, json),
        DataCmd::Render { file, index, opts, json } => render(&file, index, &opts, json),
    }
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn check(file: &Path, args: &DataArgs, json: bool) -> anyhow::Result<()> {
    let bytes = read(file)?;
    let (tok, tok_name) = args.tokenizer()?;
    let ds = load_bytes(&file.display().to_string(), &bytes, &args.load_options(), &tok)?;
    let lengths: Vec<usize> = ds.examples.iter().map(|e| e.len()).collect();
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({ "report": ds.report, "lengths": lengths });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        print_report(&mut out, &ds.report, &tok_name, &lengths)?;
    }
    let invalid = ds.report.skipped_total();
    if invalid > 0 {
        bail!("{invalid} of {} examples are invalid (see above)", ds.report.lines);
    }
    Ok(())
}

fn print_report(out: &mut impl Write, r: &Report, tok_name: &str, lengths: &[usize]) -> std::io::Result<()> {
    let format = r.format.map_or("unknown", |f| f.as_str());
    writeln!(out, "file:             {} ({format} format)", r.file)?;
    writeln!(out, "tokenizer:        {tok_name}")?;
    writeln!(
        out,
        "examples:         {} valid of {} ({} invalid, {} dropped, {} truncated)",
        r.examples,
        r.lines,
        r.skipped_total(),
        r.dropped,
        r.truncated
    )?;
    let pct = if r.tokens == 0 { 0.0 } else { 100.0 * r.trainable_tokens as f64 / r.tokens as f64 };
    writeln!(out, "tokens:           {}", r.tokens)?;
    writeln!(out, "trainable tokens: {} ({pct:.1}%)", r.trainable_tokens)?;
    if let (Some(min), Some(max)) = (lengths.iter().min(), lengths.iter().max()) {
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        writeln!(out, "length:           min {min}, mean {mean:.0}, max {max}")?;
        writeln!(out, "length histogram (tokens per example):")?;
        for (lo, hi, n) in histogram(lengths) {
            let bar = "#".repeat((n * 40).div_ceil(lengths.len()));
            writeln!(out, "  {lo:>6} - {:<6} {n:>7}  {bar}", hi - 1)?;
        }
    }
    if r.untrimmed_messages > 0 {
        writeln!(
            out,
            "warning: {} messages start or end with whitespace; it is kept and trained on as written",
            r.untrimmed_messages
        )?;
    }
    if !r.skipped.is_empty() {
        writeln!(out, "invalid examples by reason:")?;
        for (reason, n) in &r.skipped {
            writeln!(out, "  {:<22} {n}", reason.as_str())?;
        }
        writeln!(out, "errors:")?;
        for d in &r.diagnostics {
            writeln!(out, "  {d}")?;
        }
    }
    Ok(())
}

/// Power-of-two buckets from 64 tokens up: `(low, high_exclusive, count)`.
fn histogram(lengths: &[usize]) -> Vec<(usize, usize, usize)> {
    let bucket = |l: usize| (l.max(1) / 64 + 1).next_power_of_two().trailing_zeros() as usize;
    let top = lengths.iter().map(|&l| bucket(l)).max().unwrap_or(0);
    (0..=top)
        .map(|b| {
            let lo = if b == 0 { 0 } else { 64 << (b - 1) };
            let hi = 64 << b;
            let n = lengths.iter().filter(|&&l| l >= lo && l < hi).count();
            (lo, hi, n)
        })
        .collect()
}

fn render(file: &Path, index: usize, args: &DataArgs, json: bool) -> anyhow::Result<()> {
    let bytes = read(file)?;
    let opts = args.load_options();
    let name = file.display().to_string();
    let (_, lines) = read_conversations(&name, &bytes, opts.format);
    let Some((line_no, parsed)) = lines.get(index) else {
        bail!("{name} has {} examples; --index must be below that", lines.len());
    };
    let conv = match parsed {
        Ok(c) => c,
        Err(d) => bail!("example {index} (line {line_no}) is invalid:\n{d}"),
    };
    let (tok, _) = args.tokenizer()?;
    let rendered = Renderer::new(tok.clone(), opts.system.clone()).render_training(conv, opts.mask)?;
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "input_ids": rendered.input_ids,
            "labels": rendered.labels(),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let (open, close) = if std::io::stdout().is_terminal() { ("\x1b[1;32m", "\x1b[0m") } else { ("⟦", "⟧") };
    let mut text = String::new();
    let mut at = 0;
    for span in &rendered.trained {
        text.push_str(&tok.decode(&rendered.input_ids[at..span.start])?);
        text.push_str(open);
        text.push_str(&tok.decode(&rendered.input_ids[span.clone()])?);
        text.push_str(close);
        at = span.end;
    }
    text.push_str(&tok.decode(&rendered.input_ids[at..])?);
    writeln!(out, "{text}")?;
    writeln!(
        out,
        "\n-- example {index} (line {line_no}): {} tokens, {} trained (marked {open}like this{close})",
        rendered.input_ids.len(),
        rendered.trainable_tokens()
    )?;
    if let Some(max) = opts.max_len.filter(|&m| rendered.input_ids.len() > m) {
        writeln!(out, "-- longer than --max-len {max}: training would handle it per --truncation")?;
    }
    Ok(())
}
