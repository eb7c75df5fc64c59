//! `oxtune inspect`, `oxtune forward`, `oxtune generate`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use oxtune_data::{Conversation, Message, Renderer, Role, SystemConfig, Tokenizer};
use oxtune_trainer::adapter::{Adapter, NoAdapter};
use oxtune_trainer::chat::{reply_with, CpuGenerator, Generate};
use oxtune_trainer::checkpoint::Checkpoint;
use oxtune_trainer::gpu::{Device, GpuEngine};
use oxtune_trainer::grad::TrainBatch;
use oxtune_trainer::io::{save_safetensors, OwnedTensor};
use oxtune_trainer::lora_adapter::{check_base, model_fingerprint, LoraAdapter, LoraSpec};
use oxtune_trainer::ops::loss::shift_labels;
use oxtune_trainer::sample::{Sampler, SamplerConfig};
use oxtune_trainer::train::{load_model, load_tokenizer, TrainConfig};
use oxtune_trainer::{sizes, GptOssConfig, LayerType, Model};
use safetensors::{Dtype, SafeTensors};

fn bytes(n: u64) -> String {
    match n as f64 {
        x if x >= 1e9 => format!("{:.2} GB", x / 1e9),
        x if x >= 1e6 => format!("{:.2} MB", x / 1e6),
        x if x >= 1e3 => format!("{:.1} KB", x / 1e3),
        x => format!("{x} B"),
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// `oxtune inspect MODEL_DIR`
pub fn inspect(dir: &Path, seq: u64, rank: u64) -> Result<()> {
    let cfg = GptOssConfig::from_dir(dir)?;
    let sliding = cfg.layer_types.iter().filter(|t| **t == LayerType::Sliding).count();
    println!("model        {}", dir.display());
    println!(
        "layers       {} ({} sliding window {}, {} full)",
        cfg.num_hidden_layers,
        sliding,
        cfg.sliding_window,
        cfg.num_hidden_layers - sliding
    );
    println!(
        "hidden       {}   heads {} query / {} kv x {}   vocab {}",
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    );
    println!(
        "experts      {} per layer, top-{}, intermediate {}   swiglu limit {}",
        cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, cfg.swiglu_limit
    );
    println!("rope         theta {} {:?}", cfg.rope_theta, cfg.rope_scaling);
    let p = sizes::params(&cfg);
    println!(
        "parameters   {} total, {} active per token ({} in experts; exact: {} / {})",
        human(p.total),
        human(p.active),
        human(p.experts),
        p.total,
        p.active
    );
    match Checkpoint::open(dir) {
        Ok(ckpt) => {
            let by = ckpt.bytes_by_dtype();
            let total: usize = by.values().sum();
            println!("tensors      {} in checkpoint, {}", ckpt.names().count(), bytes(total as u64));
            for (dtype, b) in by {
                println!("  {dtype:<10} {}", bytes(b as u64));
            }
        }
        Err(e) => {
            let b = sizes::checkpoint_bytes(&cfg);
            println!("tensors      no weights readable here ({e}); estimated from shapes:");
            println!("  checkpoint {} ({} MXFP4 experts + {} bf16)", bytes(b.total()), bytes(b.mxfp4), bytes(b.bf16));
        }
    }
    let m = sizes::lora_memory(&cfg, seq, rank);
    println!(
        "LoRA r={rank} on attention + experts: {} trainable parameters",
        human(sizes::lora_params(&cfg, rank, true, true))
    );
    println!("GPU memory estimate for one sequence of {seq} tokens (experts kept in MXFP4): {}", bytes(m.total()));
    println!(
        "  weights {}, LoRA params+grads+8-bit AdamW {}, layer checkpoints {},",
        bytes(m.weights),
        bytes(m.lora),
        bytes(m.checkpoints)
    );
    println!("  one layer recomputed {}, LM head chunk {}", bytes(m.layer_working_set), bytes(m.lm_head_chunk));
    Ok(())
}

fn read_ids(st: &SafeTensors, name: &str, path: &Path) -> Result<Option<(Vec<i64>, Vec<usize>)>> {
    let t = match st.tensor(name) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let v: Vec<i64> = match t.dtype() {
        Dtype::I64 => t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        Dtype::I32 => {
            t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect()
        }
        d => bail!("{}: tensor `{name}` is {d:?}, expected I64 (or I32)", path.display()),
    };
    if t.shape().len() != 2 {
        bail!("{}: tensor `{name}` has shape {:?}, expected [batch, seq]", path.display(), t.shape());
    }
    Ok(Some((v, t.shape().to_vec())))
}

/// `oxtune forward --model DIR --tokens IN --out OUT [--adapter DIR [--grads]]`
pub fn forward(
    model: &Path,
    tokens: &Path,
    out: &Path,
    adapter: Option<&Path>,
    grads: bool,
    ignore_base_mismatch: bool,
) -> Result<()> {
    let bytes = std::fs::read(tokens).with_context(|| format!("reading {}", tokens.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", tokens.display()))?;
    let (ids, shape) = read_ids(&st, "input_ids", tokens)?
        .with_context(|| format!("{}: no `input_ids` tensor (expected I64 [batch, seq])", tokens.display()))?;
    let (b, t) = (shape[0], shape[1]);
    if let Some(bad) = ids.iter().find(|&&x| x < 0 || x > u32::MAX as i64) {
        bail!("{}: input_ids contains {bad}, expected token ids >= 0", tokens.display());
    }
    let labels = read_ids(&st, "labels", tokens)?;
    if let Some((_, ls)) = &labels {
        if *ls != shape {
            bail!("{}: labels shape {ls:?} differs from input_ids shape {shape:?}", tokens.display());
        }
    }
    let m = Model::load(model)?;
    let mut lora = adapter.map(|dir| load_adapter(dir, Some(model), &m, ignore_base_mismatch)).transpose()?;
    let ids32: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let started = std::time::Instant::now();
    let logits = m.forward_with(&ids32, b, t, hook(&lora))?;
    let mut outs = vec![("logits".to_string(), OwnedTensor::f32(&[b, t, m.cfg.vocab_size], &logits))];
    if let Some((l, _)) = &labels {
        let loss = m.loss(&logits, l, t)?;
        eprintln!("loss {loss:.6}");
        outs.push(("loss".to_string(), OwnedTensor::f32(&[1], &[loss])));
    }
    if grads {
        let (Some(a), Some((l, _))) = (lora.as_mut(), &labels) else {
            bail!("--grads needs --adapter and `labels` in {}", tokens.display());
        };
        let batch = TrainBatch {
            pos: (0..b).flat_map(|_| 0..t as u32).collect(),
            seg: vec![0; ids32.len()],
            rows: (0..b).map(|r| r * t..(r + 1) * t).collect(),
            targets: shift_labels(l, t),
            ids: ids32.clone(),
        };
        let n = batch.counted().max(1);
        // The gradient of the mean loss, as transformers' loss.backward() gives it.
        m.forward_backward(&batch, &*a, 1.0 / n as f32, None)?;
        for (key, shape, g) in a.grads() {
            outs.push((format!("grad.{key}"), OwnedTensor::f32(&shape, g)));
        }
    }
    save_safetensors(out, &outs)?;
    eprintln!("wrote {} ({b}x{t} tokens in {:.2}s)", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Options shared by `generate` and `chat`.
pub struct Decode {
    pub sampling: SamplerConfig,
    pub max_new_tokens: usize,
    pub system: Option<String>,
    pub show_reasoning: bool,
    pub ignore_base_mismatch: bool,
    pub device: Device,
    /// Tokens of context the GPU buffers are sized for (prompt and answer).
    pub context: usize,
}

/// An adapter directory for `m` (loaded from `model`, or the embedded tiny one), refusing one
/// that oxtune recorded as trained on another base unless `ignore_base_mismatch`.
fn load_adapter(dir: &Path, model: Option<&Path>, m: &Model, ignore_base_mismatch: bool) -> Result<LoraAdapter> {
    check_base(dir, &model_fingerprint(model)?, ignore_base_mismatch)?;
    Ok(LoraAdapter::load(dir, &m.cfg)?)
}

/// The model (a directory, or the embedded tiny one) and its optional adapter.
pub fn load(model: Option<&Path>, adapter: Option<&Path>, d: &Decode) -> Result<(Model, Option<LoraAdapter>)> {
    let cfg = TrainConfig { model: model.map(Path::to_path_buf), ..TrainConfig::default() };
    let m = load_model(&cfg)?;
    let a = adapter.map(|dir| load_adapter(dir, model, &m, d.ignore_base_mismatch)).transpose()?;
    Ok((m, a))
}

fn hook(a: &Option<LoraAdapter>) -> &dyn Adapter {
    match a {
        Some(a) => a,
        None => &NoAdapter,
    }
}

/// The model on the device `d` asks for: the GPU engine (with the adapter, if any) or the CPU.
enum Runner {
    Cpu(Box<(Model, Option<LoraAdapter>)>),
    Gpu(Box<GpuEngine>),
}

impl Runner {
    fn new(m: Model, a: Option<LoraAdapter>, d: &Decode) -> Result<Self> {
        let (gpu, why_not) = oxtune_trainer::gpu::open(d.device)?;
        Ok(match gpu {
            Some(gpu) => {
                eprintln!("device: {}", oxtune_trainer::gpu::describe(&gpu));
                let none = LoraSpec { attention: false, experts: false, ..LoraSpec::default() };
                let a = match a {
                    Some(a) => a,
                    None => LoraAdapter::new(&m.cfg, none, 0)?,
                };
                Runner::Gpu(Box::new(GpuEngine::new(gpu, &m, &a, d.context)?))
            }
            None => {
                if let Some(why) = why_not {
                    eprintln!("device: CPU (no usable GPU: {why})");
                }
                Runner::Cpu(Box::new((m, a)))
            }
        })
    }

    fn with<R>(&mut self, f: impl FnOnce(&mut dyn Generate) -> R) -> R {
        match self {
            Runner::Cpu(b) => f(&mut CpuGenerator { model: &b.0, adapter: hook(&b.1) }),
            Runner::Gpu(e) => f(&mut **e),
        }
    }
}

/// `oxtune generate --prompt-ids 1,2,3`: raw ids in, new ids out (JSON).
pub fn generate_ids(
    model: Option<&Path>,
    adapter: Option<&Path>,
    prompt_ids: &str,
    d: &Decode,
    ignore_eos: bool,
) -> Result<()> {
    let prompt: Vec<u32> = prompt_ids
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .with_context(|| format!("--prompt-ids: `{s}` is not a token id (expected e.g. 1,2,3)"))
        })
        .collect::<Result<_>>()?;
    let (m, a) = load(model, adapter, d)?;
    let stop = if ignore_eos { vec![] } else { m.cfg.eos_token_ids.clone() };
    let mut sampler = Sampler::new(d.sampling.clone());
    let mut r = Runner::new(m, a, d)?;
    let ids = r.with(|g| g.generate(&prompt, d.max_new_tokens, &stop, &mut |l| sampler.choose(l)))?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn conversation(system: &Option<String>) -> Conversation {
    Conversation::new(system.iter().map(|s| Message::system(s.clone())).collect())
}

fn answer(run: &mut Runner, tok: &Tokenizer, conv: &Conversation, d: &Decode) -> Result<String> {
    let renderer = Renderer::new(tok.clone(), SystemConfig::default());
    let r = run.with(|g| reply_with(g, &renderer, tok, conv, &d.sampling, d.max_new_tokens))?;
    if d.show_reasoning {
        if let Some(text) = r.completion.as_ref().ok().and_then(|c| c.analysis()) {
            println!("[reasoning] {text}");
        }
    }
    Ok(r.text(tok))
}

/// `oxtune generate --prompt TEXT`: one user message, prints the final answer.
pub fn generate_text(model: Option<&Path>, adapter: Option<&Path>, prompt: &str, d: &Decode) -> Result<()> {
    let (m, a) = load(model, adapter, d)?;
    let tok = load_tokenizer(model)?;
    let mut run = Runner::new(m, a, d)?;
    let mut conv = conversation(&d.system);
    conv.messages.push(Message::user(prompt));
    println!("{}", answer(&mut run, &tok, &conv, d)?);
    Ok(())
}

/// `oxtune chat`: reads user turns from stdin (`/reset` starts over, `/quit` or end of input
/// leaves) and prints the final-channel answers.
pub fn chat(model: Option<&Path>, adapter: Option<&Path>, d: &Decode) -> Result<()> {
    let (m, a) = load(model, adapter, d)?;
    let tok = load_tokenizer(model)?;
    let mut run = Runner::new(m, a, d)?;
    let mut conv = conversation(&d.system);
    eprintln!("chat ready: type a message; /reset starts over, /quit leaves");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("you> ");
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                conv = conversation(&d.system);
                continue;
            }
            text => conv.messages.push(Message::user(text)),
        }
        let text = answer(&mut run, &tok, &conv, d)?;
        println!("assistant> {text}");
        conv.messages.push(Message::new(Role::Assistant, text));
    }
}

/// The configs known by name: `gpt-oss-20b` (or `20b`), `gpt-oss-120b` (or `120b`), `tiny`.
pub fn named_config(name: &str) -> Option<GptOssConfig> {
    match name {
        "gpt-oss-20b" | "20b" => Some(GptOssConfig::gpt_oss_20b()),
        "gpt-oss-120b" | "120b" => Some(GptOssConfig::gpt_oss_120b()),
        "tiny" => Some(GptOssConfig::tiny()),
        _ => None,
    }
}

/// `oxtune init-random`: a random-weight checkpoint in the real layout.
pub fn init_random(config: &str, out: &Path, seed: u64) -> Result<()> {
    let cfg = match named_config(config) {
        Some(c) => c,
        None => GptOssConfig::from_dir(Path::new(config))?,
    };
    let started = std::time::Instant::now();
    oxtune_trainer::random_ckpt::write_random_checkpoint(&cfg, out, seed, &mut |done, total| {
        eprint!("\rwriting {}: shard {done}/{total} ({:.0}s)", out.display(), started.elapsed().as_secs_f64());
    })?;
    eprintln!();
    println!(
        "wrote a random gpt-oss checkpoint ({} layers, {} experts) to {}",
        cfg.num_hidden_layers,
        cfg.num_local_experts,
        out.display()
    );
    Ok(())
}
