//! `oxtune inspect`, `oxtune forward`, `oxtune generate`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oxtune_trainer::checkpoint::Checkpoint;
use oxtune_trainer::io::{save_safetensors, OwnedTensor};
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

/// `oxtune forward --model DIR --tokens IN --out OUT`
pub fn forward(model: &Path, tokens: &Path, out: &PathBuf) -> Result<()> {
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
    let ids32: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let started = std::time::Instant::now();
    let logits = m.forward(&ids32, b, t)?;
    let mut outs = vec![("logits".to_string(), OwnedTensor::f32(&[b, t, m.cfg.vocab_size], &logits))];
    if let Some((l, _)) = labels {
        let loss = m.loss(&logits, &l, t)?;
        eprintln!("loss {loss:.6}");
        outs.push(("loss".to_string(), OwnedTensor::f32(&[1], &[loss])));
    }
    save_safetensors(out, &outs)?;
    eprintln!("wrote {} ({b}x{t} tokens in {:.2}s)", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// `oxtune generate --model DIR --prompt-ids 1,2,3 --max-new-tokens N`
pub fn generate(model: &Path, prompt_ids: &str, max_new: usize, ignore_eos: bool) -> Result<()> {
    let prompt: Vec<u32> = prompt_ids
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .with_context(|| format!("--prompt-ids: `{s}` is not a token id (expected e.g. 1,2,3)"))
        })
        .collect::<Result<_>>()?;
    let m = Model::load(model)?;
    let stop = if ignore_eos { vec![] } else { m.cfg.eos_token_ids.clone() };
    let ids = m.generate_greedy(&prompt, max_new, &stop)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
