//! Chat datasets (JSONL) → GPT-OSS harmony token ids with exact loss masks.
//!
//! No GPU and no other workspace crate is needed. The pieces, in the order
//! the trainer uses them:
//!
//! * **Tokenizer** — [`Tokenizer::o200k_harmony`] (built in, converted once
//!   per process from the o200k ranks tiktoken-rs ships, vocab 201088) or
//!   [`Tokenizer::from_model_dir`] / [`Tokenizer::from_file`] for a
//!   `tokenizer.json`. [`Tokenizer::encode`] encodes ordinary text (text such
//!   as `<|end|>` stays text), [`Tokenizer::decode`],
//!   [`Tokenizer::special_token_id`]`("<|return|>")`, [`Tokenizer::vocab_size`].
//! * **Loading** — [`load_file`] (or [`load_bytes`], [`default_dataset`],
//!   [`default_eval_dataset`]) with [`LoadOptions`]: format (auto-detected:
//!   OpenAI `messages`, ShareGPT, Alpaca, prompt/completion), [`MaskPolicy`],
//!   `max_len` and [`Truncation`], `skip_invalid`, and the [`SystemConfig`] of
//!   the harmony system message. The result is a [`Dataset`]: [`Example`]s
//!   with `input_ids: Vec<u32>` and `labels: Vec<i32>` (-100 = no loss,
//!   unshifted as in transformers) and a [`Report`] of counts (examples,
//!   tokens, trainable tokens, truncated, dropped, skipped per [`Reason`]).
//!   [`Dataset::split`] makes a seeded train/eval split.
//! * **Chat / generation** — [`Renderer::render_prompt`] turns a
//!   [`Conversation`] of [`Message`]s into a prompt ending in
//!   `<|start|>assistant`; [`parse_completion`] turns generated ids back into
//!   messages ([`Completion::analysis`], [`Completion::final_text`], tool
//!   calls), stopping at `<|return|>` or `<|call|>`.
//! * **Batching** — [`Batcher`] with a [`BatchConfig`]: padded (optionally
//!   length-bucketed), packed rows of `max_len` (best-fit decreasing), or
//!   padding-free; each [`Batch`] has `input_ids`, `labels`, `position_ids`
//!   restarting per conversation and `cu_seqlens` boundaries for varlen
//!   attention. [`Batcher::state`] / [`Batcher::restore`] save and resume
//!   the stream exactly (serde).
//!
//! Bad input never panics: every rejected example is a [`Diagnostic`] with
//! `file:line:column`, a [`Reason`] and what to do.
//!
//! ```no_run
//! use oxtune_data::{load_file, Batcher, BatchConfig, LoadOptions, Tokenizer};
//! let tok = Tokenizer::o200k_harmony()?;
//! let opts = LoadOptions { max_len: Some(2048), ..LoadOptions::default() };
//! let data = load_file("train.jsonl", &opts, &tok)?;
//! let (train, eval) = data.split(0.05, 42)?;
//! let mut batches = Batcher::new(train.examples, BatchConfig::default())?;
//! let batch = batches.next_batch();
//! # let _ = (batch, eval);
//! # Ok::<(), oxtune_data::Error>(())
//! ```

mod batch;
mod conversation;
mod dataset;
mod error;
mod harmony;
mod json;
mod tokenizer;

pub use batch::{Batch, BatchConfig, BatchMode, Batcher, BatcherState};
pub use conversation::{Conversation, Format, Message, ReasoningEffort, Role, ToolCall, ToolSpec};
pub use dataset::{
    default_dataset, default_eval_dataset, load_bytes, load_file, read_conversations, Dataset, Example, LoadOptions,
    ParsedLine, Report, Truncation, DEFAULT_EVAL_JSONL, DEFAULT_TRAIN_JSONL,
};
pub use error::{Diagnostic, Error, Location, Reason, Result};
pub use harmony::{
    parse_completion, Completion, MaskPolicy, ParsedMessage, Rendered, Renderer, Stop, SystemConfig, IGNORE,
};
pub use tokenizer::{HarmonyTokens, Tokenizer, NAMED_SPECIALS, O200K_HARMONY_VOCAB, O200K_RANKS};
