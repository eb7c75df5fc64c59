//! The training loop: data → model → LoRA → optimizer, with gradient accumulation, clipping, a
//! learning-rate schedule, periodic evaluation, atomic checkpoints and an exact resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use oxtune_data::{BatchConfig, BatchMode, Batcher, BatcherState, Example, LoadOptions, MaskPolicy, Tokenizer};
use oxtune_optim::{AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, LrSchedule, Param, ScheduleKind};
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::error::{io_err, Error, Result};
use crate::gpu::step::{DeviceStep, Opt};
use crate::gpu::{Device, EngineOptions, GpuEngine, Precision};
use crate::grad::{SinkGrads, TrainBatch};
use crate::io::{sync_dir, write_atomic};
use crate::lora_adapter::{LoraAdapter, LoraSpec};
use crate::model::Model;
use crate::ops::loss::IGNORE_INDEX;
use crate::tiny;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Adamw8bit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
    CosineMinLr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mask {
    /// The last assistant turn (analysis and final).
    LastTurn,
    AllTurns,
    FinalOnly,
}

/// Every training option. Defaults are what users expect for gpt-oss LoRA; every field is also a
/// `oxtune train` flag and a key of the optional TOML run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face gpt-oss directory; none = the embedded tiny model.
    pub model: Option<PathBuf>,
    /// Training JSONL; none = the embedded persona dataset.
    pub data: Option<PathBuf>,
    /// Held-out JSONL; none = `eval_ratio` of the training data (the embedded eval set for the
    /// embedded dataset).
    pub eval_data: Option<PathBuf>,
    pub eval_ratio: f64,
    pub out: PathBuf,
    pub rank: usize,
    pub alpha: f32,
    pub rslora: bool,
    pub lora_attention: bool,
    pub lora_experts: bool,
    pub train_sinks: bool,
    /// QLoRA: hold the attention projections in NF4 (bitsandbytes' format) while training; the
    /// experts stay in MXFP4 either way.
    pub qlora: bool,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    pub warmup_ratio: f64,
    pub epochs: f64,
    /// Overrides `epochs` when set.
    pub max_steps: Option<u64>,
    /// Sequences' token budget per micro-batch is `micro_batch · max_len` (padding-free rows).
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub max_grad_norm: f64,
    pub mask: Mask,
    pub eval_every: u64,
    pub save_every: u64,
    /// Checkpoints kept (older ones are deleted once a newer one is complete).
    pub keep_checkpoints: usize,
    pub seed: u64,
    pub skip_invalid: bool,
    /// Stop after this many optimizer steps in a row with a non-finite loss or gradient.
    pub max_bad_steps: u32,
    /// Where the model runs: `auto` (the GPU when one is usable), `cuda` or `cpu`.
    pub device: Device,
    /// On the GPU, keep only each layer's input in the forward pass and recompute the layer in
    /// the backward pass (less memory, one more forward pass of compute).
    pub activation_checkpointing: bool,
    /// On the GPU: `exact` (f32-level products, the default) or `bf16` (activations rounded to
    /// bf16 in the tensor-core products, as a bf16 transformers model; faster).
    pub precision: Precision,
    /// On the GPU with checkpointing: keep each layer's input in host memory (long sequences on
    /// less GPU memory, a copy each way per layer and step).
    pub offload_checkpoints: bool,
    /// On the GPU: replay the pass of a micro-batch size seen before from CUDA graphs (captured
    /// the second time that size comes) instead of launching its kernels one by one.
    pub cuda_graphs: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            eval_data: None,
            eval_ratio: 0.05,
            out: PathBuf::from("runs/default"),
            rank: 8,
            alpha: 16.0,
            rslora: false,
            lora_attention: true,
            lora_experts: true,
            train_sinks: false,
            qlora: false,
            optimizer: OptimizerKind::Adamw8bit,
            lr: 2e-4,
            weight_decay: 0.0,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            warmup_ratio: 0.03,
            epochs: 1.0,
            max_steps: None,
            micro_batch: 1,
            grad_accum: 4,
            max_len: 2048,
            max_grad_norm: 1.0,
            mask: Mask::LastTurn,
            eval_every: 50,
            save_every: 100,
            keep_checkpoints: 2,
            seed: 42,
            skip_invalid: false,
            max_bad_steps: 5,
            device: Device::Auto,
            activation_checkpointing: true,
            precision: Precision::Exact,
            offload_checkpoints: false,
            cuda_graphs: true,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML run config; unknown keys are an error naming them.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        toml::from_str(&text).map_err(|e| Error::Config { path: path.into(), msg: e.to_string() })
    }

    pub fn lora_spec(&self) -> LoraSpec {
        LoraSpec {
            r: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            attention: self.lora_attention,
            experts: self.lora_experts,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.rank == 0 {
            return bad("--rank must be at least 1".into());
        }
        if !self.lora_attention && !self.lora_experts && !self.train_sinks {
            return bad("nothing to train: enable LoRA on attention and/or experts, or --train-sinks".into());
        }
        if self.micro_batch == 0 || self.grad_accum == 0 || self.max_len == 0 {
            return bad("--micro-batch, --grad-accum and --max-len must be positive".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr {} must be a positive number", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!("--warmup-ratio {} must be in [0, 1)", self.warmup_ratio));
        }
        if self.offload_checkpoints && !self.activation_checkpointing {
            return bad("--offload-checkpoints keeps the activation checkpoints in host memory: it needs activation \
                 checkpointing (drop --no-activation-checkpointing)"
                .into());
        }
        Ok(())
    }
}

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    Start {
        steps: u64,
        train_examples: usize,
        eval_examples: usize,
        trainable_params: usize,
        resumed_from: Option<u64>,
        /// Where the steps run ("CPU (...)" or the GPU's name and memory).
        device: String,
    },
    Step {
        step: u64,
        steps: u64,
        loss: f64,
        lr: f64,
        grad_norm: f32,
        tokens_per_s: f64,
        eta_s: f64,
    },
    Skipped {
        step: u64,
        reason: String,
    },
    /// The step's loss is more than [`SPIKE_FACTOR`] times the mean of the last
    /// [`SPIKE_WINDOW`] steps' losses (`mean`). The step is applied; this is a warning.
    Spike {
        step: u64,
        loss: f64,
        mean: f64,
    },
    Eval {
        step: u64,
        loss: f64,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
}

/// One line of `metrics.jsonl`. `kind` is `train`, `eval`, or `spike` (a loss spike: the line
/// repeats that step's `train` line).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    pub step: u64,
    pub kind: String,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f32,
    pub tokens: usize,
    pub seconds: f64,
}

/// The run's result.
#[derive(Clone, Debug)]
pub struct Summary {
    pub steps: u64,
    pub first_eval: Option<f64>,
    pub last_eval: Option<f64>,
    pub skipped_steps: u64,
    pub adapter_dir: PathBuf,
    /// The run was stopped through [`Trainer::stop_handle`]: a checkpoint of the last step was
    /// saved (`adapter_dir` was not written) and `--resume` continues it.
    pub interrupted: Option<PathBuf>,
}

/// A step's loss is a spike when it exceeds this many times the recent mean.
pub const SPIKE_FACTOR: f64 = 2.0;
/// Steps in the running mean for spike detection; no spike is reported before this many steps.
pub const SPIKE_WINDOW: usize = 20;
const SPIKE_MIN_STEPS: usize = 5;

/// The running mean of `recent` (the last losses, oldest first) when `loss` is a spike against it.
pub fn spike_mean(recent: &[f64], loss: f64) -> Option<f64> {
    let recent = &recent[recent.len().saturating_sub(SPIKE_WINDOW)..];
    if recent.len() < SPIKE_MIN_STEPS {
        return None;
    }
    let mean = recent.iter().sum::<f64>() / recent.len() as f64;
    (mean > 0.0 && loss > SPIKE_FACTOR * mean).then_some(mean)
}

/// Resume state written with every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    batcher: BatcherState,
    skipped_steps: u64,
    bad_in_row: u32,
    metrics: Vec<Metric>,
    config: TrainConfig,
    /// FNV-1a of each file of the checkpoint, to detect a corrupt or partial one.
    checksums: HashMap<String, String>,
}

fn fnv1a(bytes: &[u8]) -> String {
    format!("{:016x}", crate::io::fnv1a64(bytes, crate::io::FNV_OFFSET))
}

/// Loads the model named by the config (or builds the embedded tiny one), with the attention
/// projections in NF4 for QLoRA.
pub fn load_model(cfg: &TrainConfig) -> Result<Model> {
    let mut m = match &cfg.model {
        Some(dir) => Model::load(dir)?,
        None => {
            let c = tiny::tiny_default_config();
            let w = tiny::random_weights(&c, tiny::DEFAULT_SEED);
            Model::new(c, w)
        }
    };
    if cfg.qlora {
        m.w.quantize_attention_nf4()?;
    }
    Ok(m)
}

/// The tokenizer of a model directory, or the built-in o200k_harmony.
pub fn load_tokenizer(model: Option<&Path>) -> Result<Tokenizer> {
    let data_err = |e: oxtune_data::Error| Error::Input(e.to_string());
    match model {
        Some(dir) if dir.join("tokenizer.json").exists() => Tokenizer::from_model_dir(dir).map_err(data_err),
        _ => Tokenizer::o200k_harmony().map_err(data_err),
    }
}

/// Turns a padding-free data batch into the model's batch: next-token targets within each
/// sequence, one attention row per sequence.
pub fn to_train_batch(b: &oxtune_data::Batch) -> TrainBatch {
    let n = b.input_ids.len();
    let mut seg = vec![0u32; n];
    let mut targets = vec![IGNORE_INDEX; n];
    let mut rows = vec![];
    for (s, w) in b.cu_seqlens.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, w[1] as usize);
        rows.push(start..end);
        for t in start..end {
            seg[t] = s as u32;
            if t + 1 < end && b.labels[t + 1] != oxtune_data::IGNORE {
                targets[t] = b.labels[t + 1] as i64;
            }
        }
    }
    TrainBatch { ids: b.input_ids.clone(), pos: b.position_ids.clone(), seg, rows, targets }
}

/// Eval batches of one pass over `examples`.
fn eval_batches(examples: &[Example], cfg: &TrainConfig) -> Result<Vec<TrainBatch>> {
    if examples.is_empty() {
        return Ok(vec![]);
    }
    let bc = BatchConfig {
        mode: BatchMode::PaddingFree,
        batch_size: cfg.micro_batch,
        max_len: cfg.max_len,
        shuffle: false,
        bucket_by_length: false,
        seed: 0,
        pad_id: 199_999,
    };
    let b = Batcher::new(examples.to_vec(), bc).map_err(|e| Error::Input(e.to_string()))?;
    Ok(b.one_epoch().map(|x| to_train_batch(&x)).collect())
}

pub fn eval_loss(model: &Model, adapter: &dyn Adapter, batches: &[TrainBatch]) -> Result<f64> {
    mean_loss(batches, |b| model.eval_loss(b, adapter))
}

/// Mean loss over `batches` from `(sum of losses, counted positions)` per batch (NaN if none count).
fn mean_loss(batches: &[TrainBatch], mut loss: impl FnMut(&TrainBatch) -> Result<(f64, usize)>) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for b in batches {
        let (s, c) = loss(b)?;
        sum += s;
        n += c;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

fn load_options(cfg: &TrainConfig) -> LoadOptions {
    LoadOptions {
        mask: match cfg.mask {
            Mask::LastTurn => MaskPolicy::LastTurn,
            Mask::AllTurns => MaskPolicy::AllTurns,
            Mask::FinalOnly => MaskPolicy::FinalOnly,
        },
        max_len: Some(cfg.max_len),
        skip_invalid: cfg.skip_invalid,
        ..LoadOptions::default()
    }
}

/// Train and eval examples as the config asks.
pub fn load_data(cfg: &TrainConfig, tok: &Tokenizer) -> Result<(Vec<Example>, Vec<Example>)> {
    let data_err = |e: oxtune_data::Error| Error::Input(e.to_string());
    let opts = load_options(cfg);
    let train = match &cfg.data {
        Some(p) => oxtune_data::load_file(p, &opts, tok).map_err(data_err)?,
        None => oxtune_data::load_bytes("persona_train.jsonl", oxtune_data::DEFAULT_TRAIN_JSONL.as_bytes(), &opts, tok)
            .map_err(data_err)?,
    };
    let (train, eval) = match (&cfg.eval_data, &cfg.data) {
        (Some(p), _) => (train, oxtune_data::load_file(p, &opts, tok).map_err(data_err)?),
        (None, None) => (
            train,
            oxtune_data::load_bytes("persona_eval.jsonl", oxtune_data::DEFAULT_EVAL_JSONL.as_bytes(), &opts, tok)
                .map_err(data_err)?,
        ),
        (None, Some(_)) if cfg.eval_ratio > 0.0 => train.split(cfg.eval_ratio, cfg.seed).map_err(data_err)?,
        (None, Some(_)) => {
            let empty = oxtune_data::Dataset { examples: vec![], report: train.report.clone() };
            (train, empty)
        }
    };
    if train.examples.is_empty() {
        return Err(Error::Input(format!(
            "no usable training examples in {} ({} lines read); see `oxtune data check`",
            train.report.file, train.report.lines
        )));
    }
    Ok((train.examples, eval.examples))
}

/// A training run in progress.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: Model,
    /// The adapter. On a GPU run the device holds the current values and these (and the sinks in
    /// `model`) are brought up to date by [`Trainer::sync_host`], which [`Trainer::run`] calls
    /// before every checkpoint and the final adapter; call it before reading them after
    /// [`Trainer::train_step`].
    pub adapter: LoraAdapter,
    sinks: Option<SinkGrads>,
    opt: Opt,
    /// The optimizer on the device when the run uses a GPU, with the host's copy of each
    /// completed step (`adapter`, the sinks and `opt` are refreshed from it when a checkpoint is
    /// written: see [`Trainer::sync_host`]). Declared before `engine`, so dropped first: it waits
    /// for its copies, which read the engine's buffers.
    dev: Option<DeviceStep<StepMark>>,
    /// Where the run stood when `dev` was made: what the host holds until a step's copy lands.
    dev_start: Option<StepMark>,
    /// Whether `dev` holds a step that `adapter` / `opt` do not have yet.
    host_stale: bool,
    schedule: LrSchedule,
    batcher: Batcher,
    eval: Vec<TrainBatch>,
    pub step: u64,
    pub steps: u64,
    skipped_steps: u64,
    bad_in_row: u32,
    pub metrics: Vec<Metric>,
    resumed_from: Option<u64>,
    train_examples: usize,
    stop: Arc<AtomicBool>,
    /// The base model's fingerprint, recorded in every adapter directory the run writes.
    fingerprint: String,
    /// The GPU engine when the run uses a GPU.
    engine: Option<GpuEngine>,
    device: String,
    /// A GPU call failed: the device may be unusable (a sticky error); the host state is intact.
    gpu_failed: bool,
    /// Set by [`Trainer::sync_host`] when the last step's host copy had not completed: (that
    /// step, the step the run went back to).
    went_back: Option<(u64, u64)>,
}

/// Where a run stood after a step (the tag of the host copy of a GPU update): what the run goes
/// back to when a GPU fault leaves the host holding that step.
#[derive(Clone)]
struct StepMark {
    step: u64,
    batcher: BatcherState,
    skipped_steps: u64,
    bad_in_row: u32,
}

fn optimizer(cfg: &TrainConfig) -> Result<Opt> {
    let e = |e: oxtune_optim::Error| Error::Input(e.to_string());
    let adam = AdamWConfig { weight_decay: cfg.weight_decay, ..AdamWConfig::default() };
    Ok(match cfg.optimizer {
        OptimizerKind::Adamw => Opt::AdamW(AdamW::new(adam).map_err(e)?),
        OptimizerKind::Adamw8bit => {
            Opt::AdamW8bit(AdamW8bit::new(AdamW8bitConfig { adam, ..AdamW8bitConfig::default() }).map_err(e)?)
        }
    })
}

impl Trainer {
    /// Sets up a run: model, data, adapter, optimizer; with `resume`, continues from the newest
    /// complete checkpoint in `cfg.out` (a corrupt one is reported and the one before it used).
    pub fn new(
        cfg: TrainConfig,
        model: Model,
        tok: &Tokenizer,
        resume: bool,
        log: &mut dyn FnMut(Event),
    ) -> Result<Self> {
        cfg.validate()?;
        let (train, eval) = load_data(&cfg, tok)?;
        let train_examples = train.len();
        let bc = BatchConfig {
            mode: BatchMode::PaddingFree,
            batch_size: cfg.micro_batch,
            max_len: cfg.max_len,
            shuffle: true,
            bucket_by_length: false,
            seed: cfg.seed,
            pad_id: 199_999,
        };
        let batcher = Batcher::new(train, bc).map_err(|e| Error::Input(e.to_string()))?;
        let per_epoch = (batcher.batches_per_epoch() as u64).div_ceil(cfg.grad_accum as u64).max(1);
        let steps = cfg.max_steps.unwrap_or(((per_epoch as f64) * cfg.epochs).ceil() as u64).max(1);
        let kind = match cfg.schedule {
            Schedule::Constant => ScheduleKind::Constant,
            Schedule::Linear => ScheduleKind::Linear,
            Schedule::Cosine => ScheduleKind::Cosine { num_cycles: 0.5 },
            Schedule::CosineMinLr => ScheduleKind::CosineWithMinLr { num_cycles: 0.5, min_lr_rate: cfg.min_lr_ratio },
        };
        let warmup = LrSchedule::warmup_from_ratio(cfg.warmup_ratio, steps);
        let schedule = LrSchedule::new(kind, cfg.lr, warmup, steps).map_err(|e| Error::Input(e.to_string()))?;
        let adapter = LoraAdapter::new(&model.cfg, cfg.lora_spec(), cfg.seed)?;
        let sinks =
            cfg.train_sinks.then(|| vec![vec![0.0f32; model.cfg.num_attention_heads]; model.cfg.num_hidden_layers]);
        let cfg_model = cfg.model.clone();
        let mut t = Self {
            opt: optimizer(&cfg)?,
            eval: eval_batches(&eval, &cfg)?,
            cfg,
            model,
            adapter,
            sinks,
            schedule,
            batcher,
            step: 0,
            steps,
            skipped_steps: 0,
            bad_in_row: 0,
            metrics: vec![],
            resumed_from: None,
            train_examples,
            fingerprint: crate::lora_adapter::model_fingerprint(cfg_model.as_deref())?,
            stop: Arc::new(AtomicBool::new(false)),
            engine: None,
            dev: None,
            host_stale: false,
            device: String::new(),
            gpu_failed: false,
            went_back: None,
            dev_start: None,
        };
        if resume {
            t.resume(log)?;
        }
        let (gpu, why_not) = crate::gpu::open(t.cfg.device)?;
        t.device = match gpu {
            Some(gpu) => {
                let d = crate::gpu::describe(&gpu);
                let budget = t.cfg.micro_batch * t.cfg.max_len;
                let ckpt = t.cfg.activation_checkpointing;
                t.dev = Some(DeviceStep::new(&gpu, &t.opt)?);
                t.dev_start = Some(t.mark());
                let opts = EngineOptions {
                    checkpointing: ckpt,
                    precision: t.cfg.precision,
                    offload_checkpoints: t.cfg.offload_checkpoints,
                    cuda_graphs: t.cfg.cuda_graphs,
                    ..Default::default()
                };
                let eng = GpuEngine::with_options(gpu, &t.model, &t.adapter, budget, opts)?;
                let d = match eng.embeddings_pageable() {
                    Some(why) => format!("{d}; embedding rows gathered on the host ({why})"),
                    None => d,
                };
                t.engine = Some(eng);
                d
            }
            None => match why_not {
                Some(why) => format!("CPU ({} threads; no usable GPU: {why})", rayon::current_num_threads()),
                None => format!("CPU ({} threads)", rayon::current_num_threads()),
            },
        };
        Ok(t)
    }

    fn checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.cfg.out)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_prefix("checkpoint-").and_then(|s| s.parse().ok()).map(|s| (s, e.path()))
            })
            .collect();
        v.sort();
        v
    }

    fn resume(&mut self, log: &mut dyn FnMut(Event)) -> Result<()> {
        for (step, dir) in self.checkpoints().into_iter().rev() {
            match self.load_checkpoint(&dir) {
                Ok(()) => {
                    self.resumed_from = Some(step);
                    return Ok(());
                }
                Err(e) => log(Event::Skipped {
                    step,
                    reason: format!("checkpoint {} unusable ({e}); trying an older one", dir.display()),
                }),
            }
        }
        Err(Error::Input(format!("--resume: no complete checkpoint in {}", self.cfg.out.display())))
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(io_err(&sp))?;
        let st: TrainerState =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: sp.clone(), source })?;
        for (file, sum) in &st.checksums {
            let p = dir.join(file);
            let bytes = std::fs::read(&p).map_err(io_err(&p))?;
            if &fnv1a(&bytes) != sum {
                return Err(Error::Checkpoint { file: p, msg: "checksum mismatch (corrupt or partial file)".into() });
            }
        }
        if st.config.lora_spec() != self.cfg.lora_spec() || st.config.seed != self.cfg.seed {
            return Err(Error::Input("the checkpoint was made with other LoRA settings or seed".into()));
        }
        crate::lora_adapter::check_base(dir, &self.fingerprint, false)?;
        let adapter = LoraAdapter::load(dir, &self.model.cfg)?;
        if adapter.spec != self.cfg.lora_spec() {
            return Err(Error::Input("the checkpoint's adapter has other LoRA settings".into()));
        }
        self.adapter = adapter;
        self.opt.cpu().load_state(&dir.join("optimizer.safetensors")).map_err(|e| Error::Input(e.to_string()))?;
        if let Some(s) = &mut self.sinks {
            let p = dir.join("sinks.json");
            let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
            let sinks: Vec<Vec<f32>> = serde_json::from_str(&text).map_err(|source| Error::Json { path: p, source })?;
            for (layer, v) in self.model.w.layers.iter_mut().zip(&sinks) {
                layer.sinks.clone_from(v);
            }
            s.iter_mut().for_each(|g| g.fill(0.0));
        }
        self.batcher.restore(st.batcher).map_err(|e| Error::Input(e.to_string()))?;
        self.step = st.step;
        self.skipped_steps = st.skipped_steps;
        self.bad_in_row = st.bad_in_row;
        self.metrics = st.metrics;
        Ok(())
    }

    /// A flag that, once set (from a Ctrl-C handler, say), makes [`Trainer::run`] stop after the
    /// current step with a checkpoint.
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Writes `out/checkpoint-STEP` atomically: files go to a temporary directory that is renamed
    /// once complete; older checkpoints beyond `keep_checkpoints` are then removed. On failure (a
    /// full disk, say) the temporary directory is removed and the older checkpoints are untouched.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.sync_host()?;
        let final_dir = self.cfg.out.join(format!("checkpoint-{}", self.step));
        let tmp = self.cfg.out.join(format!(".checkpoint-{}.tmp", self.step));
        if let Err(e) = self.write_checkpoint(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            let previous = match self.checkpoints().last() {
                Some((_, p)) => format!("the previous checkpoint {} is intact", p.display()),
                None => "there is no earlier checkpoint".to_string(),
            };
            return Err(Error::Checkpoint {
                file: final_dir,
                msg: format!(
                    "could not save the checkpoint: {e}; {previous}. Free disk space (or fix the permissions) and run again with --resume"
                ),
            });
        }
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
        sync_dir(&self.cfg.out);
        let all = self.checkpoints();
        for (_, old) in all.iter().take(all.len().saturating_sub(self.cfg.keep_checkpoints.max(1))) {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(final_dir)
    }

    /// Every file of a checkpoint, into `tmp`.
    fn write_checkpoint(&self, tmp: &Path) -> Result<()> {
        let _ = std::fs::remove_dir_all(tmp);
        std::fs::create_dir_all(tmp).map_err(io_err(tmp))?;
        self.save_adapter(tmp)?;
        self.opt.cpu_ref().save_state(&tmp.join("optimizer.safetensors")).map_err(|e| Error::Input(e.to_string()))?;
        let mut files = vec!["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"];
        if self.sinks.is_some() {
            let sinks: Vec<&Vec<f32>> = self.model.w.layers.iter().map(|l| &l.sinks).collect();
            write_atomic(&tmp.join("sinks.json"), serde_json::to_string(&sinks).expect("floats").as_bytes())?;
            files.push("sinks.json");
        }
        let mut checksums = HashMap::new();
        for f in files {
            let p = tmp.join(f);
            checksums.insert(f.to_string(), fnv1a(&std::fs::read(&p).map_err(io_err(&p))?));
        }
        let st = TrainerState {
            step: self.step,
            batcher: self.batcher.state().clone(),
            skipped_steps: self.skipped_steps,
            bad_in_row: self.bad_in_row,
            metrics: self.metrics.clone(),
            config: self.cfg.clone(),
            checksums,
        };
        write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(&st).expect("serializable").as_bytes(),
        )
    }

    /// Removes what a killed run left half-written in `out`: `.checkpoint-N.tmp` directories and
    /// [`write_atomic`]'s temporary files. Complete checkpoints are never touched.
    fn remove_partial_files(&self) {
        for e in std::fs::read_dir(&self.cfg.out).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix('.') else { continue };
            if rest.starts_with("checkpoint-") && rest.ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(e.path());
            } else if rest.rsplit_once(".tmp-").is_some_and(|(_, pid)| pid.parse::<u32>().is_ok()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The optimizer step on the device, then the host's copy of the result (adapter values,
    /// sinks, optimizer state) beside the next step's work, tagged with where the run stands
    /// after this step: [`Trainer::sync_host`] takes the last step whose copy completed, which is
    /// what a checkpoint after a GPU fault saves.
    fn gpu_update(&mut self, lr: f64, sink_names: &[String]) -> Result<()> {
        let mark = self.mark();
        let eng = self.engine.as_mut().expect("called with an engine");
        let trains_sinks = self.sinks.is_some();
        let mut names: Vec<String> = self.adapter.tensors().into_iter().map(|(k, _, _)| k).collect();
        if trains_sinks {
            names.extend(sink_names.iter().cloned());
        }
        self.dev.as_mut().expect("a device optimizer with the engine").step(eng, &names, trains_sinks, lr, mark)?;
        self.host_stale = true;
        Ok(())
    }

    /// Where the run stands now, as a host copy of a step records it.
    fn mark(&self) -> StepMark {
        StepMark {
            step: self.step,
            batcher: self.batcher.state().clone(),
            skipped_steps: self.skipped_steps,
            bad_in_row: self.bad_in_row,
        }
    }

    /// Brings the adapter, the sinks and the optimizer state up to the last completed step from
    /// the host's copy of it (a GPU run; a no-op on the CPU). Needs no GPU call, so it works after
    /// a GPU fault. When a fault stopped the copy of the last update (it overlaps the next step),
    /// the host holds the update before it: the run goes back to that step (its step count, data
    /// order and metrics), so that a checkpoint saved now resumes exactly.
    pub fn sync_host(&mut self) -> Result<()> {
        if !self.host_stale {
            return Ok(());
        }
        let Some(dev) = &mut self.dev else { return Ok(()) };
        let (held, latest) = dev.settle();
        let back_to = if latest { None } else { held.cloned().or_else(|| self.dev_start.clone()) };
        if let Some(vals) = dev.host_params() {
            let n_lora = self.adapter.tensors().len();
            for ((_, dst, _), src) in self.adapter.params().into_iter().zip(&vals) {
                dst.copy_from_slice(src);
            }
            for (layer, v) in self.model.w.layers.iter_mut().zip(&vals[n_lora.min(vals.len())..]) {
                layer.sinks = v.to_vec();
            }
        }
        if let Some(opt) = dev.host_opt() {
            self.opt = opt?;
        }
        if let Some(m) = back_to {
            self.batcher.restore(m.batcher).map_err(|e| Error::Input(format!("restoring the data order: {e}")))?;
            self.went_back = Some((self.step, m.step));
            self.step = m.step;
            self.skipped_steps = m.skipped_steps;
            self.bad_in_row = m.bad_in_row;
            self.metrics.retain(|x| x.step <= m.step);
        }
        self.host_stale = false;
        Ok(())
    }

    /// A GPU call failed during a step: puts the data order back to the step's start and marks the
    /// run so that [`Trainer::run`] saves the last completed step before stopping.
    fn gpu_step_failed(&mut self, e: Error, batcher_before: Option<BatcherState>) -> Error {
        if let Some(st) = batcher_before {
            if let Err(re) = self.batcher.restore(st) {
                return Error::Input(format!("{e}; restoring the data order also failed: {re}"));
            }
        }
        self.gpu_failed = true;
        e
    }

    /// Writes the adapter in PEFT's format into `dir`.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let base = self.cfg.model.as_ref().map(|p| p.display().to_string());
        self.adapter.save_for_base(dir, base.as_deref(), &self.fingerprint)
    }

    /// Runs one optimizer step (`grad_accum` micro-batches). Returns false once the run is over.
    pub fn train_step(&mut self, log: &mut dyn FnMut(Event), started: Instant, start_step: u64) -> Result<bool> {
        if self.step >= self.steps {
            return Ok(false);
        }
        let t0 = Instant::now();
        // A GPU fault during the step leaves the host state (adapter, optimizer) at the last
        // step whose host copy completed (this one's predecessor, or the one before it when the
        // fault stopped that copy: sync_host then goes back to it); the data order is put back too
        // so a checkpoint taken then resumes exactly.
        let batcher_before = self.engine.as_ref().map(|_| self.batcher.state().clone());
        let micro: Vec<TrainBatch> =
            (0..self.cfg.grad_accum).map(|_| to_train_batch(&self.batcher.next_batch())).collect();
        let counted: usize = micro.iter().map(TrainBatch::counted).sum();
        let tokens: usize = micro.iter().map(|b| b.ids.len()).sum();
        self.adapter.zero_grad();
        if let Some(s) = &mut self.sinks {
            s.iter_mut().for_each(|g| g.fill(0.0));
        }
        let (mut loss_sum, mut n) = (0.0, 0usize);
        // On the GPU: gradients stay on the device; their norm (and whether they are finite) is
        // computed there, with the clipping.
        let max_norm = self.cfg.max_grad_norm as f32;
        let mut gpu_norm = None;
        if let Some(eng) = &mut self.engine {
            let trains_sinks = self.sinks.is_some();
            let passes = (|| {
                eng.zero_grads()?;
                let (mut sum, mut n) = (0.0, 0usize);
                if counted > 0 {
                    for b in &micro {
                        let (s, c) = eng.forward_backward(b, 1.0 / counted as f32)?;
                        sum += s;
                        n += c;
                    }
                }
                Ok::<_, Error>((sum, n, eng.clip_grads(trains_sinks, max_norm)?))
            })();
            match passes {
                Ok((s, c, norm)) => (loss_sum, n, gpu_norm) = (s, c, Some(norm)),
                Err(e) => return Err(self.gpu_step_failed(e, batcher_before)),
            }
        } else if counted > 0 {
            let scale = 1.0 / counted as f32;
            for b in &micro {
                let (s, c) = self.model.forward_backward(b, &self.adapter, scale, self.sinks.as_mut())?;
                loss_sum += s;
                n += c;
            }
        }
        let loss = if n == 0 { f64::NAN } else { loss_sum / n as f64 };
        let lr = self.schedule.lr(self.step);
        let finite = loss.is_finite()
            && match gpu_norm {
                Some(norm) => norm.is_finite(),
                None => {
                    self.adapter.grads().iter().all(|(_, _, g)| g.iter().all(|x| x.is_finite()))
                        && self.sinks.iter().flatten().flatten().all(|x| x.is_finite())
                }
            };
        self.step += 1;
        if !finite {
            self.skipped_steps += 1;
            self.bad_in_row += 1;
            log(Event::Skipped {
                step: self.step,
                reason: format!(
                    "non-finite loss or gradient (loss {loss}); step skipped ({} in a row, the run stops at {})",
                    self.bad_in_row, self.cfg.max_bad_steps
                ),
            });
            if self.bad_in_row >= self.cfg.max_bad_steps {
                return Err(Error::Input(format!(
                    "{} steps in a row had a non-finite loss or gradient; stopping (the last good checkpoint is kept). Try a lower --lr.",
                    self.bad_in_row
                )));
            }
            return Ok(true);
        }
        // Reset before the update: the host copy of this step records the counters after it.
        let bad_before = std::mem::take(&mut self.bad_in_row);
        let sink_names: Vec<String> =
            (0..self.model.w.layers.len()).map(|l| format!("model.layers.{l}.self_attn.sinks")).collect();
        let grad_norm = match gpu_norm {
            Some(norm) => {
                if let Err(e) = self.gpu_update(lr, &sink_names) {
                    // The step did not happen: the counters go back with the step count.
                    self.step -= 1;
                    self.bad_in_row = bad_before;
                    return Err(self.gpu_step_failed(e, batcher_before));
                }
                norm
            }
            None => {
                let mut grads: Vec<&mut [f32]> = self.adapter.grads().into_iter().map(|(_, _, g)| g).collect();
                if let Some(s) = self.sinks.as_mut() {
                    grads.extend(s.iter_mut().map(|g| g.as_mut_slice()));
                }
                let norm =
                    oxtune_optim::clip_grad_norm(&mut grads, max_norm).map_err(|e| Error::Input(e.to_string()))?;
                let mut adapter_params = self.adapter.params();
                let mut params: Vec<Param> = adapter_params.iter_mut().map(|(n, v, g)| Param::new(n, v, g)).collect();
                if let Some(s) = &self.sinks {
                    for ((layer, g), name) in self.model.w.layers.iter_mut().zip(s).zip(&sink_names) {
                        params.push(Param::without_decay(name, &mut layer.sinks, g));
                    }
                }
                self.opt.cpu().step(&mut params, lr).map_err(|e| Error::Input(e.to_string()))?;
                norm
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        let done = (self.step - start_step) as f64;
        let per_step = started.elapsed().as_secs_f64() / done.max(1.0);
        let mut recent: Vec<f64> =
            self.metrics.iter().rev().filter(|m| m.kind == "train").take(SPIKE_WINDOW).map(|m| m.loss).collect();
        recent.reverse();
        let metric = Metric { step: self.step, kind: "train".into(), loss, lr, grad_norm, tokens, seconds: secs };
        self.metrics.push(metric.clone());
        if let Some(mean) = spike_mean(&recent, loss) {
            self.metrics.push(Metric { kind: "spike".into(), ..metric });
            log(Event::Spike { step: self.step, loss, mean });
        }
        log(Event::Step {
            step: self.step,
            steps: self.steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            eta_s: per_step * (self.steps - self.step) as f64,
        });
        Ok(true)
    }

    pub fn evaluate(&mut self, log: &mut dyn FnMut(Event)) -> Result<Option<f64>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let loss = match &mut self.engine {
            Some(eng) => mean_loss(&self.eval, |b| eng.eval_loss(b)).inspect_err(|_| self.gpu_failed = true)?,
            None => eval_loss(&self.model, &self.adapter, &self.eval)?,
        };
        self.metrics.push(Metric {
            step: self.step,
            kind: "eval".into(),
            loss,
            lr: 0.0,
            grad_norm: 0.0,
            tokens: 0,
            seconds: 0.0,
        });
        log(Event::Eval { step: self.step, loss });
        Ok(Some(loss))
    }

    /// The whole run: evaluation before training, steps with periodic evaluation and
    /// checkpoints, a final evaluation, the final adapter in `out/adapter`, `metrics.jsonl` and `loss.svg`.
    ///
    /// Stops early, with a checkpoint of the last step, when [`Trainer::stop_handle`] is set or
    /// `max_bad_steps` steps in a row are non-finite (then an error; no checkpoint is written
    /// while the last step was non-finite, so the last good ones are kept).
    pub fn run(&mut self, log: &mut dyn FnMut(Event)) -> Result<Summary> {
        std::fs::create_dir_all(&self.cfg.out).map_err(io_err(&self.cfg.out))?;
        self.remove_partial_files();
        log(Event::Start {
            steps: self.steps,
            train_examples: self.train_examples,
            eval_examples: self.eval.len(),
            trainable_params: self.adapter.num_params(),
            resumed_from: self.resumed_from,
            device: self.device.clone(),
        });
        if self.step == 0 {
            if let Err(e) = self.evaluate(log) {
                return Err(self.after_failure(e, log));
            }
        }
        let started = Instant::now();
        let start_step = self.step;
        loop {
            match self.train_step(log, started, start_step) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    // Keep what the run measured (the losses before a divergence, say), after the
                    // checkpoint: going back to the last step the host holds trims the metrics.
                    let e = self.after_failure(e, log);
                    let _ = self.write_metrics();
                    return Err(e);
                }
            }
            let last = self.step == self.steps;
            if self.cfg.eval_every > 0 && self.step.is_multiple_of(self.cfg.eval_every) && !last {
                if let Err(e) = self.evaluate(log) {
                    return Err(self.after_failure(e, log));
                }
            }
            let mut saved = None;
            if self.cfg.save_every > 0 && self.step.is_multiple_of(self.cfg.save_every) && !last && self.bad_in_row == 0
            {
                let p = self.save_checkpoint()?;
                log(Event::Checkpoint { step: self.step, path: p.clone() });
                saved = Some(p);
            }
            if self.stop.load(Ordering::SeqCst) && !last {
                let p = match saved {
                    Some(p) => p,
                    None => {
                        let p = self.save_checkpoint()?;
                        log(Event::Checkpoint { step: self.step, path: p.clone() });
                        p
                    }
                };
                self.write_metrics()?;
                return Ok(self.summary(Some(p)));
            }
        }
        if let Err(e) = self.evaluate(log) {
            return Err(self.after_failure(e, log));
        }
        let adapter_dir = self.cfg.out.join("adapter");
        std::fs::create_dir_all(&adapter_dir).map_err(io_err(&adapter_dir))?;
        self.sync_host()?;
        self.save_adapter(&adapter_dir)?;
        let p = self.save_checkpoint()?;
        log(Event::Checkpoint { step: self.step, path: p });
        self.write_metrics()?;
        crate::plot::loss_svg(&self.metrics, &self.cfg.out.join("loss.svg"))?;
        Ok(self.summary(None))
    }

    /// After a failed step or evaluation: when the GPU failed, saves the last completed step from
    /// the host (which holds the adapter, optimizer and data order) and says how to continue.
    fn after_failure(&mut self, e: Error, log: &mut dyn FnMut(Event)) -> Error {
        if !self.gpu_failed {
            return e;
        }
        let cause = match e {
            Error::Gpu(m) => m,
            other => other.to_string(),
        };
        match self.save_checkpoint() {
            Ok(p) => {
                log(Event::Checkpoint { step: self.step, path: p.clone() });
                let back = match self.went_back {
                    Some((lost, to)) => {
                        format!(
                            " (step {lost}'s copy to the host had not completed, so the run went back to step {to})"
                        )
                    }
                    None => String::new(),
                };
                Error::Gpu(format!(
                    "{cause}\nThe GPU failed after step {}{back}; the run stopped after saving that step to {}. \
                     Continue it with --resume (on this or another GPU, or with --device cpu).",
                    self.step,
                    p.display()
                ))
            }
            Err(save) => Error::Gpu(format!("{cause}\nThe GPU failed and saving a checkpoint failed too: {save}")),
        }
    }

    fn write_metrics(&self) -> Result<()> {
        let lines: String =
            self.metrics.iter().map(|m| serde_json::to_string(m).expect("serializable") + "\n").collect();
        write_atomic(&self.cfg.out.join("metrics.jsonl"), lines.as_bytes())
    }

    fn summary(&self, interrupted: Option<PathBuf>) -> Summary {
        let evals: Vec<f64> = self.metrics.iter().filter(|m| m.kind == "eval").map(|m| m.loss).collect();
        Summary {
            steps: self.step,
            first_eval: evals.first().copied(),
            last_eval: evals.last().copied(),
            skipped_steps: self.skipped_steps,
            adapter_dir: self.cfg.out.join("adapter"),
            interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spike_needs_history_and_twice_the_recent_mean() {
        let flat = [1.0; 30];
        assert_eq!(spike_mean(&flat[..SPIKE_MIN_STEPS - 1], 100.0), None, "too little history");
        assert_eq!(spike_mean(&flat, 2.0), None, "exactly twice is not a spike");
        assert_eq!(spike_mean(&flat, 2.5), Some(1.0));
        // Only the last SPIKE_WINDOW losses count: an old high loss does not hide a new spike.
        let mut v = vec![100.0; 10];
        v.extend([1.0; SPIKE_WINDOW]);
        assert_eq!(spike_mean(&v, 3.0), Some(1.0));
        assert_eq!(spike_mean(&flat, f64::INFINITY), Some(1.0));
    }
}
