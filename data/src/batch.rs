//! Batches for the trainer: padded, packed, or padding-free, with a seeded
//! order and a state that saves and restores exactly.
//!
//! Every batch is a `[rows, row_len]` block flattened row-major, plus
//! `cu_seqlens`: the boundaries of the independent sequences in that
//! flattened stream (flash-attention's varlen convention), padding included
//! as sequences of its own. Position ids restart at 0 at every boundary, so
//! packed conversations never see each other under a block-diagonal causal
//! mask (spec optim-lora.md §5.3).

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::harmony::IGNORE;

/// How examples become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchMode {
    /// One example per row, right-padded to the longest in the batch.
    Padded,
    /// Several examples per row of exactly `max_len` tokens (best-fit
    /// decreasing), the row's tail padded.
    Packed,
    /// One row without any padding, holding whole examples up to
    /// `batch_size * max_len` tokens.
    PaddingFree,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchConfig {
    pub mode: BatchMode,
    /// Rows per batch (`Padded`, `Packed`); `PaddingFree` uses
    /// `batch_size * max_len` as its token budget.
    pub batch_size: usize,
    /// Longest row; every example must fit.
    pub max_len: usize,
    pub shuffle: bool,
    /// `Padded` only: batch examples of similar length together (sorted
    /// within windows of 64 batches) to waste less padding.
    pub bucket_by_length: bool,
    pub seed: u64,
    /// `<|endoftext|>`, gpt-oss's pad token.
    pub pad_id: u32,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            mode: BatchMode::Packed,
            batch_size: 1,
            max_len: 2048,
            shuffle: true,
            bucket_by_length: true,
            seed: 0,
            pad_id: 199_999,
        }
    }
}

/// A batch of `rows × row_len` tokens, flattened row-major.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Batch {
    pub rows: usize,
    pub row_len: usize,
    pub input_ids: Vec<u32>,
    /// Unshifted targets, -100 where no loss is taken (padding, prompts, and
    /// the first token of every sequence).
    pub labels: Vec<i32>,
    /// Restart at 0 at every sequence boundary.
    pub position_ids: Vec<u32>,
    /// Sequence starts in the flattened batch, then its total length.
    pub cu_seqlens: Vec<u32>,
    /// Which examples (indices into the batcher's list) are in the batch.
    pub example_indices: Vec<usize>,
    /// Number of tokens that are not padding.
    pub real_tokens: usize,
}

impl Batch {
    /// Tokens that carry loss; after the shift each predicts from the token
    /// before it in the same sequence.
    pub fn trainable_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }

    pub fn max_seqlen(&self) -> usize {
        self.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }
}

/// Where a batcher is: enough to resume exactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatcherState {
    pub epoch: u64,
    /// Next batch of the epoch.
    pub cursor: usize,
    /// The generator as it was when this epoch's order was drawn.
    pub epoch_rng: ChaCha8Rng,
    /// Hash of the examples' lengths and the config, to refuse a resume on
    /// other data.
    pub fingerprint: u64,
}

/// An endless, epoch-by-epoch stream of batches.
#[derive(Debug, Clone)]
pub struct Batcher {
    examples: Vec<Example>,
    config: BatchConfig,
    state: BatcherState,
    /// Groups of rows (each row a list of example indices), in epoch order.
    plan: Vec<Vec<Vec<usize>>>,
}

impl Batcher {
    pub fn new(examples: Vec<Example>, config: BatchConfig) -> Result<Batcher> {
        if examples.is_empty() {
            return Err(Error::Options("no examples to batch".to_string()));
        }
        if config.batch_size == 0 || config.max_len == 0 {
            return Err(Error::Options("batch_size and max_len must be at least 1".to_string()));
        }
        if let Some((i, ex)) = examples.iter().enumerate().find(|(_, e)| e.len() > config.max_len || e.is_empty()) {
            return Err(Error::Options(format!(
                "example {i} (line {}) has {} tokens, outside 1..={}; load the data with the same max_len and a truncation policy",
                ex.line,
                ex.len(),
                config.max_len
            )));
        }
        let fingerprint = fingerprint(&examples, &config);
        let state =
            BatcherState { epoch: 0, cursor: 0, epoch_rng: ChaCha8Rng::seed_from_u64(config.seed), fingerprint };
        let mut b = Batcher { examples, config, state, plan: Vec::new() };
        b.plan = b.plan_epoch(&mut b.state.epoch_rng.clone());
        Ok(b)
    }

    pub fn state(&self) -> &BatcherState {
        &self.state
    }

    /// Continues from a saved state; the examples and config must be the ones
    /// the state was saved with.
    pub fn restore(&mut self, state: BatcherState) -> Result<()> {
        if state.fingerprint != self.state.fingerprint {
            return Err(Error::State("the examples or the batch config differ".to_string()));
        }
        let plan = self.plan_epoch(&mut state.epoch_rng.clone());
        if state.cursor > plan.len() {
            return Err(Error::State(format!(
                "cursor {} is past the {} batches of an epoch",
                state.cursor,
                plan.len()
            )));
        }
        self.plan = plan;
        self.state = state;
        Ok(())
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// The next batch; past the end of an epoch, the next epoch begins with
    /// a new order.
    pub fn next_batch(&mut self) -> Batch {
        if self.state.cursor == self.plan.len() {
            let mut rng = self.state.epoch_rng.clone();
            // Advance past this epoch's draws so the next order differs.
            self.plan_epoch(&mut rng);
            self.state.epoch_rng = rng;
            self.state.epoch += 1;
            self.state.cursor = 0;
            self.plan = self.plan_epoch(&mut self.state.epoch_rng.clone());
        }
        let batch = self.assemble(&self.plan[self.state.cursor]);
        self.state.cursor += 1;
        batch
    }

    /// The batches of one pass in a fixed order, for evaluation; does not
    /// move the stream.
    pub fn one_epoch(&self) -> impl Iterator<Item = Batch> + '_ {
        self.plan.iter().map(|rows| self.assemble(rows))
    }

    fn plan_epoch(&self, rng: &mut ChaCha8Rng) -> Vec<Vec<Vec<usize>>> {
        let cfg = &self.config;
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        if cfg.shuffle {
            order.shuffle(rng);
        }
        let len = |i: usize| self.examples[i].len();
        let mut batches: Vec<Vec<Vec<usize>>> = match cfg.mode {
            BatchMode::Padded => {
                if cfg.bucket_by_length {
                    for window in order.chunks_mut(cfg.batch_size * 64) {
                        window.sort_by_key(|&i| len(i));
                    }
                }
                order.chunks(cfg.batch_size).map(|c| c.iter().map(|&i| vec![i]).collect()).collect()
            }
            BatchMode::Packed => {
                let rows = best_fit_decreasing(&order, len, cfg.max_len);
                rows.chunks(cfg.batch_size).map(<[_]>::to_vec).collect()
            }
            BatchMode::PaddingFree => best_fit_decreasing(&order, len, cfg.batch_size * cfg.max_len)
                .into_iter()
                .map(|row| vec![row])
                .collect(),
        };
        if cfg.shuffle {
            batches.shuffle(rng);
        }
        batches
    }

    fn assemble(&self, rows: &[Vec<usize>]) -> Batch {
        let row_len = match self.config.mode {
            BatchMode::Packed => self.config.max_len,
            BatchMode::Padded | BatchMode::PaddingFree => {
                rows.iter().map(|r| r.iter().map(|&i| self.examples[i].len()).sum::<usize>()).max().unwrap_or(0)
            }
        };
        let n = rows.len() * row_len;
        let mut b = Batch {
            rows: rows.len(),
            row_len,
            input_ids: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            position_ids: Vec::with_capacity(n),
            cu_seqlens: vec![0],
            example_indices: Vec::new(),
            real_tokens: 0,
        };
        for row in rows {
            let mut used = 0;
            for &i in row {
                let ex = &self.examples[i];
                b.input_ids.extend_from_slice(&ex.input_ids);
                b.labels.extend_from_slice(&ex.labels);
                // Nothing before a sequence's first token may predict it.
                let first = b.labels.len() - ex.len();
                b.labels[first] = IGNORE;
                b.position_ids.extend(0..ex.len() as u32);
                b.cu_seqlens.push((b.input_ids.len()) as u32);
                b.example_indices.push(i);
                used += ex.len();
            }
            b.real_tokens += used;
            let pad = row_len - used;
            if pad > 0 {
                b.input_ids.extend(std::iter::repeat_n(self.config.pad_id, pad));
                b.labels.extend(std::iter::repeat_n(IGNORE, pad));
                b.position_ids.extend(0..pad as u32);
                b.cu_seqlens.push(b.input_ids.len() as u32);
            }
        }
        b
    }
}

/// Packs items into bins of `capacity`, longest first, each into the
/// fullest bin that still fits it. Ties keep the incoming (shuffled) order.
fn best_fit_decreasing(order: &[usize], len: impl Fn(usize) -> usize, capacity: usize) -> Vec<Vec<usize>> {
    let mut sorted = order.to_vec();
    sorted.sort_by_key(|&i| std::cmp::Reverse(len(i)));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (remaining room, bin): the first entry with room >= len is the best fit.
    let mut by_room: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in sorted {
        let l = len(i);
        let (room, bin) = match by_room.range((l, 0)..).next().copied() {
            Some(entry) => {
                by_room.remove(&entry);
                entry
            }
            None => {
                bins.push(Vec::new());
                (capacity, bins.len() - 1)
            }
        };
        bins[bin].push(i);
        by_room.insert((room - l, bin));
    }
    bins
}

/// FNV-1a of the examples and the config: unlike std's `DefaultHasher`,
/// stable across Rust releases, so a run resumes under a newer build.
fn fingerprint(examples: &[Example], config: &BatchConfig) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(examples.len() as u64);
    for e in examples {
        eat(e.len() as u64);
        e.input_ids.iter().for_each(|&t| eat(u64::from(t)));
        e.labels.iter().for_each(|&l| eat(l as u64));
    }
    let mode = match config.mode {
        BatchMode::Padded => 0,
        BatchMode::Packed => 1,
        BatchMode::PaddingFree => 2,
    };
    for x in [
        mode,
        config.batch_size as u64,
        config.max_len as u64,
        u64::from(config.shuffle),
        u64::from(config.bucket_by_length),
        config.seed,
        u64::from(config.pad_id),
    ] {
        eat(x);
    }
    h
}
