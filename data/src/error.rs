//! The crate's one error type, and the diagnostics that point into a user's file.

use std::fmt;
use std::path::PathBuf;

/// Where in a dataset file something went wrong: 1-based line and column.
///
/// Columns count Unicode characters, not bytes, so they match what an editor
/// shows on a line of Vietnamese text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Why an example was rejected; `--skip-invalid` reports counts per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    NotUtf8,
    MalformedJson,
    UnknownFormat,
    MixedFormats,
    InvalidField,
    UnknownRole,
    EmptyContent,
    MisplacedMessage,
    NoAssistantTurn,
    TooLong,
    NothingToTrain,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotUtf8 => "not UTF-8",
            Reason::MalformedJson => "malformed JSON",
            Reason::UnknownFormat => "unknown format",
            Reason::MixedFormats => "mixed formats",
            Reason::InvalidField => "invalid field",
            Reason::UnknownRole => "unknown role",
            Reason::EmptyContent => "empty content",
            Reason::MisplacedMessage => "misplaced message",
            Reason::NoAssistantTurn => "no assistant turn",
            Reason::TooLong => "longer than max_len",
            Reason::NothingToTrain => "no trainable token",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rejected example: where, why, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub location: Location,
    pub reason: Reason,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}; check that the path exists and is readable", path.display())]
    Read { path: PathBuf, source: std::io::Error },

    /// An invalid example (when not skipping invalid ones).
    #[error("{0}")]
    Invalid(Diagnostic),

    #[error("{}: no valid example; fix the errors listed by `oxtune data check` first", path.display())]
    NoExamples { path: PathBuf },

    #[error("{}: not a usable tokenizer.json: {message}", path.display())]
    TokenizerFile { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("tokenizer has no special token {0}; load a GPT-OSS (o200k_harmony) tokenizer.json")]
    MissingSpecialToken(String),

    #[error("conversation: {0}")]
    Conversation(String),

    #[error("completion does not follow the harmony format: {0}")]
    Completion(String),

    #[error("invalid options: {0}")]
    Options(String),

    #[error("batcher state does not match this dataset: {0}; resume with the same data and batch options")]
    State(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
