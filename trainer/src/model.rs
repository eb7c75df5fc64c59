//! The GPT-OSS forward pass on the CPU (f32 activations and accumulation), as transformers'
//! `GptOssForCausalLM` computes it, plus greedy decoding with a KV cache.

use std::ops::Range;
use std::path::Path;

use oxtune_moe::{moe_forward, SwigluParams};

use crate::checkpoint::Checkpoint;
use crate::config::{GptOssConfig, LayerType};
use crate::error::{Error, Result};
use crate::ops::attention::{attention, Coords, Heads};
use crate::ops::linear::linear;
use crate::ops::loss::{cross_entropy, shift_labels};
use crate::ops::rmsnorm::rmsnorm;
use crate::ops::rope::Rope;
use crate::weights::{Layer, Weights};

pub struct Model {
    pub cfg: GptOssConfig,
    pub w: Weights,
    pub rope: Rope,
}

/// Keys and values seen so far, per layer (sliding layers keep only their window).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    next_pos: u32,
}

#[derive(Clone, Debug, Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    pos: Vec<u32>,
}

impl KvCache {
    /// Tokens held in the cache of layer `l`.
    pub fn len(&self, l: usize) -> usize {
        self.layers.get(l).map_or(0, |c| c.pos.len())
    }

    pub fn is_empty(&self) -> bool {
        self.next_pos == 0
    }
}

impl Model {
    pub fn new(cfg: GptOssConfig, w: Weights) -> Self {
        let rope = Rope::new(&cfg);
        Self { cfg, w, rope }
    }

    /// Loads `config.json` and the safetensors weights of a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = GptOssConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let w = Weights::load(&ckpt, &cfg)?;
        Ok(Self::new(cfg, w))
    }

    fn heads(&self) -> Heads {
        Heads { nq: self.cfg.num_attention_heads, nkv: self.cfg.num_key_value_heads, d: self.cfg.head_dim }
    }

    fn act(&self) -> SwigluParams {
        SwigluParams { alpha: self.cfg.swiglu_alpha as f32, limit: self.cfg.swiglu_limit as f32 }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {t} at index {i} is out of range: the model's vocabulary has {} tokens",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    fn embed(&self, ids: &[u32]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        ids.iter().flat_map(|&t| self.w.embed[t as usize * h..(t as usize + 1) * h].iter().copied()).collect()
    }

    /// One decoder layer over tokens `x [N, H]` grouped in `rows`; with a cache (one row only),
    /// keys and values of earlier tokens come from it and the new ones are appended.
    fn layer(
        &self,
        l: usize,
        layer: &Layer,
        x: &mut [f32],
        pos: &[u32],
        seg: &[u32],
        rows: &[Range<usize>],
        cache: Option<&mut LayerCache>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (h, qw, kw) = (cfg.hidden_size, cfg.q_width(), cfg.kv_width());
        let eps = cfg.rms_norm_eps as f32;
        let (a, _) = rmsnorm(x, &layer.input_norm, eps);
        let mut q = linear(&a, &layer.q.w, Some(&layer.q.b), h, qw);
        let mut k = linear(&a, &layer.k.w, Some(&layer.k.b), h, kw);
        let v = linear(&a, &layer.v.w, Some(&layer.v.b), h, kw);
        self.rope.apply(&mut q, pos, false);
        self.rope.apply(&mut k, pos, false);
        let window = (layer.kind == LayerType::Sliding).then_some(cfg.sliding_window);
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let mut o = vec![0.0f32; q.len()];
        match cache {
            None => {
                for r in rows {
                    let c = Coords {
                        q_pos: &pos[r.clone()],
                        k_pos: &pos[r.clone()],
                        q_seg: &seg[r.clone()],
                        k_seg: &seg[r.clone()],
                        window,
                    };
                    let (or, _) = attention(
                        &q[r.start * qw..r.end * qw],
                        &k[r.start * kw..r.end * kw],
                        &v[r.start * kw..r.end * kw],
                        &layer.sinks,
                        self.heads(),
                        c,
                        scale,
                    );
                    o[r.start * qw..r.end * qw].copy_from_slice(&or);
                }
            }
            Some(c) => {
                c.k.extend_from_slice(&k);
                c.v.extend_from_slice(&v);
                c.pos.extend_from_slice(pos);
                let kseg = vec![0u32; c.pos.len()];
                let coords = Coords { q_pos: pos, k_pos: &c.pos, q_seg: &kseg[..pos.len()], k_seg: &kseg, window };
                let (or, _) = attention(&q, &c.k, &c.v, &layer.sinks, self.heads(), coords, scale);
                o.copy_from_slice(&or);
                if let Some(w) = window {
                    // Later queries are further right, so keys older than the window are dead.
                    let drop = c.pos.len().saturating_sub(w);
                    c.k.drain(..drop * kw);
                    c.v.drain(..drop * kw);
                    c.pos.drain(..drop);
                }
            }
        }
        let attn = linear(&o, &layer.o.w, Some(&layer.o.b), qw, h);
        x.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);
        let (b, _) = rmsnorm(x, &layer.post_norm, eps);
        let (m, _) =
            moe_forward(&b, &layer.router.w, &layer.router.b, &layer.experts, cfg.num_experts_per_tok, self.act())
                .map_err(|e| Error::Input(format!("layer {l}: {e}")))?;
        x.iter_mut().zip(&m).for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// Final hidden states `[N, H]` (after the last norm) for tokens grouped in `rows`, each with
    /// its position and segment id (packed rows restart positions per segment).
    pub fn hidden(&self, ids: &[u32], pos: &[u32], seg: &[u32], rows: &[Range<usize>]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let mut x = self.embed(ids);
        for (l, layer) in self.w.layers.iter().enumerate() {
            self.layer(l, layer, &mut x, pos, seg, rows, None)?;
        }
        Ok(rmsnorm(&x, &self.w.norm, self.cfg.rms_norm_eps as f32).0)
    }

    /// `logits [N, V]` from hidden states.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        linear(hidden, &self.w.lm_head, None, self.cfg.hidden_size, self.cfg.vocab_size)
    }

    /// Logits `[B·T, V]` for `ids [B, T]`, each row at positions `0..T`.
    pub fn forward(&self, ids: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>> {
        if ids.len() != batch * seq || seq == 0 {
            return Err(Error::Input(format!("{} token ids do not form a [{batch}, {seq}] batch", ids.len())));
        }
        let pos: Vec<u32> = (0..batch).flat_map(|_| 0..seq as u32).collect();
        let seg = vec![0u32; ids.len()];
        let rows: Vec<_> = (0..batch).map(|b| b * seq..(b + 1) * seq).collect();
        Ok(self.logits(&self.hidden(ids, &pos, &seg, &rows)?))
    }

    /// transformers' causal-LM loss for `labels [B, T]` (−100 ignored): mean over counted tokens.
    pub fn loss(&self, logits: &[f32], labels: &[i64], seq: usize) -> Result<f32> {
        let v = self.cfg.vocab_size;
        if let Some(&bad) = labels.iter().find(|&&l| l != -100 && (l < 0 || l as usize >= v)) {
            return Err(Error::Input(format!(
                "label {bad} is out of range (vocabulary {v}; use -100 to ignore a position)"
            )));
        }
        let (sum, n) = cross_entropy(logits, &shift_labels(labels, seq), v, None, 1.0);
        Ok(if n == 0 { f32::NAN } else { (sum / n as f64) as f32 })
    }

    /// Runs `ids` through the model after what the cache holds; returns the last token's logits.
    pub fn step(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        if ids.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        if cache.layers.is_empty() {
            cache.layers = vec![LayerCache::default(); self.w.layers.len()];
        }
        let pos: Vec<u32> = (cache.next_pos..cache.next_pos + ids.len() as u32).collect();
        let seg = vec![0u32; ids.len()];
        let mut x = self.embed(ids);
        let whole = 0..ids.len();
        for (l, layer) in self.w.layers.iter().enumerate() {
            self.layer(l, layer, &mut x, &pos, &seg, std::slice::from_ref(&whole), Some(&mut cache.layers[l]))?;
        }
        cache.next_pos += ids.len() as u32;
        let h = self.cfg.hidden_size;
        let last = &x[(ids.len() - 1) * h..];
        Ok(self.logits(&rmsnorm(last, &self.w.norm, self.cfg.rms_norm_eps as f32).0))
    }

    /// Greedy decoding: up to `max_new` tokens after `prompt`, stopping after any of `stop`.
    pub fn generate_greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        let mut cache = KvCache::default();
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }
        let mut logits = self.step(prompt, &mut cache)?;
        loop {
            let next = argmax(&logits);
            out.push(next);
            if out.len() == max_new || stop.contains(&next) {
                return Ok(out);
            }
            logits = self.step(&[next], &mut cache)?;
        }
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}
