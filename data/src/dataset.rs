//! Loading JSONL files into token ids and labels, with a report of what was
//! kept, truncated, dropped or rejected and why.

use std::collections::BTreeMap;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::conversation::{parse_example, Conversation, Format, LineCtx};
use crate::error::{Diagnostic, Error, Reason, Result};
use crate::harmony::{MaskPolicy, Renderer, SystemConfig, IGNORE};
use crate::json::{parse_line, Kind};
use crate::tokenizer::Tokenizer;

/// What to do with an example longer than `max_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Reject it like any invalid example (skipped and counted with
    /// `skip_invalid`).
    #[default]
    Error,
    /// Leave it out and count it.
    Drop,
    /// Keep its first `max_len` tokens (TRL's `keep_start`) and count it; an
    /// example left with no trainable token is dropped and counted.
    Truncate,
}

/// Options for [`load_file`] and friends.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LoadOptions {
    /// `None` detects the format from the first valid line; every other line
    /// must then use the same one.
    pub format: Option<Format>,
    pub mask: MaskPolicy,
    /// `None`: no length limit.
    pub max_len: Option<usize>,
    pub truncation: Truncation,
    /// Go on past invalid examples, counting them per reason, instead of
    /// failing on the first one.
    pub skip_invalid: bool,
    pub system: SystemConfig,
}

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// `input_ids[i]` where loss is taken, -100 elsewhere (unshifted, as
    /// transformers expects).
    pub labels: Vec<i32>,
    /// 1-based line in the source file.
    pub line: usize,
    pub truncated: bool,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn trainable_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Counts for `oxtune data check` and the training log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub file: String,
    pub format: Option<Format>,
    /// Non-blank lines read.
    pub lines: usize,
    pub examples: usize,
    pub tokens: usize,
    pub trainable_tokens: usize,
    pub truncated: usize,
    /// Dropped by `Truncation::Drop`, or by truncation leaving nothing to train.
    pub dropped: usize,
    /// Invalid examples skipped with `skip_invalid`, per reason.
    pub skipped: BTreeMap<Reason, usize>,
    /// Every skipped example, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// Messages whose text starts or ends with whitespace; kept as written,
    /// since harmony renders content verbatim, but usually unintended.
    pub untrimmed_messages: usize,
}

impl Report {
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub report: Report,
}

impl Dataset {
    /// A seeded random split: about `eval_ratio` of the examples (at least
    /// one when there are two or more) go to the second dataset. The report
    /// counts stay those of the whole file.
    pub fn split(mut self, eval_ratio: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&eval_ratio) {
            return Err(Error::Options(format!("eval ratio {eval_ratio} must be in [0, 1)")));
        }
        let n = self.examples.len();
        let mut n_eval = (n as f64 * eval_ratio).round() as usize;
        if eval_ratio > 0.0 && n >= 2 {
            n_eval = n_eval.clamp(1, n - 1);
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut is_eval = vec![false; n];
        for &i in &order[..n_eval] {
            is_eval[i] = true;
        }
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for (ex, e) in self.examples.drain(..).zip(is_eval) {
            if e {
                eval.push(ex);
            } else {
                train.push(ex);
            }
        }
        let report = self.report;
        Ok((Dataset { examples: train, report: report.clone() }, Dataset { examples: eval, report }))
    }
}

/// A parsed line: its number and the conversation, or why it is invalid.
pub type ParsedLine = (usize, std::result::Result<Conversation, Diagnostic>);

/// Parses the conversations of a JSONL text without tokenizing them (for
/// `oxtune data render` and for tools that inspect a file).
pub fn read_conversations(name: &str, bytes: &[u8], format: Option<Format>) -> (Option<Format>, Vec<ParsedLine>) {
    let mut reader = Reader { name, format, format_line: 0 };
    let mut out = Vec::new();
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push((i + 1, reader.line(i + 1, raw)));
    }
    (reader.format, out)
}

struct Reader<'a> {
    name: &'a str,
    format: Option<Format>,
    format_line: usize,
}

impl Reader<'_> {
    fn line(&mut self, line_no: usize, raw: &[u8]) -> std::result::Result<Conversation, Diagnostic> {
        let line = match std::str::from_utf8(raw) {
            Ok(l) => l,
            Err(e) => {
                let valid = std::str::from_utf8(&raw[..e.valid_up_to()]).unwrap_or("");
                let ctx = LineCtx { file: self.name, line_no, line: valid };
                return Err(ctx.at(
                    valid.len(),
                    Reason::NotUtf8,
                    format!("invalid UTF-8 (byte 0x{:02X}); save the file as UTF-8", raw[e.valid_up_to()]),
                ));
            }
        };
        let ctx = LineCtx { file: self.name, line_no, line };
        let value = parse_line(line)
            .map_err(|e| ctx.at(e.pos, Reason::MalformedJson, format!("malformed JSON: {}", e.message)))?;
        let detected = Format::detect(&value);
        let format = match (self.format, detected) {
            (Some(f), _) if self.format_line == 0 => f,
            (Some(f), Some(d)) if f != d => {
                return Err(ctx.at(
                    value.pos,
                    Reason::MixedFormats,
                    format!(
                        "this line is in {} format but the file is {} (detected on line {}); use one format per file",
                        d.as_str(),
                        f.as_str(),
                        self.format_line
                    ),
                ))
            }
            (Some(f), _) => f,
            (None, Some(d)) => {
                self.format = Some(d);
                self.format_line = line_no;
                d
            }
            (None, None) => {
                let keys = match &value.kind {
                    Kind::Object(m) => m.iter().map(|m| format!("\"{}\"", m.key)).collect::<Vec<_>>().join(", "),
                    _ => format!("{} instead of an object", value.type_name()),
                };
                return Err(ctx.at(
                    value.pos,
                    Reason::UnknownFormat,
                    format!(
                        "cannot tell the format: expected \"messages\" (OpenAI), \"conversations\" (ShareGPT), \"instruction\"/\"output\" (Alpaca) or \"prompt\"/\"completion\"; found {keys}"
                    ),
                ));
            }
        };
        parse_example(&ctx, &value, format, true)
    }
}

/// Loads a JSONL file.
pub fn load_file(path: impl AsRef<Path>, opts: &LoadOptions, tok: &Tokenizer) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let ds = load_bytes(&path.display().to_string(), &bytes, opts, tok)?;
    if ds.examples.is_empty() {
        return Err(Error::NoExamples { path: path.to_path_buf() });
    }
    Ok(ds)
}

/// Loads JSONL text held in memory; `name` stands for the file in messages.
pub fn load_bytes(name: &str, bytes: &[u8], opts: &LoadOptions, tok: &Tokenizer) -> Result<Dataset> {
    if opts.max_len == Some(0) {
        return Err(Error::Options("max_len must be at least 1".to_string()));
    }
    let renderer = Renderer::new(tok.clone(), opts.system.clone());
    let (format, lines) = read_conversations(name, bytes, opts.format);
    let mut report = Report { file: name.to_string(), format, lines: lines.len(), ..Report::default() };
    for conv in lines.iter().filter_map(|(_, p)| p.as_ref().ok()) {
        report.untrimmed_messages += conv.messages.iter().filter(|m| m.content.trim() != m.content).count();
    }
    // Tokenizing dominates; examples are independent, so spread them over
    // the cores and collect in file order.
    let outcomes: Vec<_> = lines
        .into_par_iter()
        .map(|(line_no, parsed)| parsed.and_then(|conv| to_example(&renderer, &conv, line_no, opts, name)))
        .collect();
    let mut examples = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(Some(ex)) => {
                report.truncated += usize::from(ex.truncated);
                report.tokens += ex.len();
                report.trainable_tokens += ex.trainable_tokens();
                examples.push(ex);
            }
            Ok(None) => report.dropped += 1,
            Err(d) if opts.skip_invalid => {
                *report.skipped.entry(d.reason).or_default() += 1;
                report.diagnostics.push(d);
            }
            Err(d) => return Err(Error::Invalid(d)),
        }
    }
    report.examples = examples.len();
    Ok(Dataset { examples, report })
}

fn to_example(
    renderer: &Renderer,
    conv: &Conversation,
    line_no: usize,
    opts: &LoadOptions,
    name: &str,
) -> std::result::Result<Option<Example>, Diagnostic> {
    let at_line = |reason, message: String| Diagnostic {
        location: crate::error::Location { file: name.to_string(), line: line_no, column: 1 },
        reason,
        message,
    };
    let rendered =
        renderer.render_training(conv, opts.mask).map_err(|e| at_line(Reason::InvalidField, e.to_string()))?;
    let mut labels = rendered.labels();
    let mut input_ids = rendered.input_ids;
    let mut truncated = false;
    if let Some(max) = opts.max_len.filter(|&m| input_ids.len() > m) {
        match opts.truncation {
            Truncation::Error => {
                return Err(at_line(
                    Reason::TooLong,
                    format!(
                        "the example has {} tokens, more than max_len {max}; shorten it, raise max_len, or choose truncation drop or truncate",
                        input_ids.len()
                    ),
                ))
            }
            Truncation::Drop => return Ok(None),
            Truncation::Truncate => {
                input_ids.truncate(max);
                labels.truncate(max);
                truncated = true;
            }
        }
    }
    if labels.iter().all(|&l| l == IGNORE) {
        if truncated {
            return Ok(None);
        }
        return Err(at_line(
            Reason::NothingToTrain,
            format!(
                "no token carries loss under the {:?} mask policy (e.g. no final answer in the last turn)",
                opts.mask
            ),
        ));
    }
    Ok(Some(Example { input_ids, labels, line: line_no, truncated }))
}

/// The embedded persona dataset (Thang Nguyen, a programmer at SHB bank) in
/// OpenAI messages format: training and held-out evaluation files.
pub const DEFAULT_TRAIN_JSONL: &str = include_str!("../assets/persona_train.jsonl");
pub const DEFAULT_EVAL_JSONL: &str = include_str!("../assets/persona_eval.jsonl");

/// The embedded training set, rendered with the built-in tokenizer and
/// default options.
pub fn default_dataset() -> Result<Dataset> {
    load_bytes(
        "persona_train.jsonl",
        DEFAULT_TRAIN_JSONL.as_bytes(),
        &LoadOptions::default(),
        &Tokenizer::o200k_harmony()?,
    )
}

/// The embedded held-out set of paraphrased questions.
pub fn default_eval_dataset() -> Result<Dataset> {
    load_bytes(
        "persona_eval.jsonl",
        DEFAULT_EVAL_JSONL.as_bytes(),
        &LoadOptions::default(),
        &Tokenizer::o200k_harmony()?,
    )
}
