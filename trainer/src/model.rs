//! The GPT-OSS forward pass on the CPU (f32 activations and accumulation), as transformers'
//! `GptOssForCausalLM` computes it, plus greedy decoding with a KV cache.

use std::ops::Range;
use std::path::Path;

use oxtune_moe::{moe_forward, SwigluParams};

use crate::adapter::{AdaptedExperts, Adapter, Dense, NoAdapter};
use crate::checkpoint::Checkpoint;
use crate::config::{GptOssConfig, LayerType};
use crate::error::{Error, Result};
use crate::ops::attention::{attention, Coords, Heads};
use crate::ops::linear::linear;
use crate::ops::loss::{cross_entropy, shift_labels};
use crate::ops::rmsnorm::rmsnorm;
use crate::ops::rope::Rope;
use crate::weights::Weights;

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

    pub(crate) fn heads(&self) -> Heads {
        Heads { nq: self.cfg.num_attention_heads, nkv: self.cfg.num_key_value_heads, d: self.cfg.head_dim }
    }

    pub(crate) fn swiglu(&self) -> SwigluParams {
        SwigluParams { alpha: self.cfg.swiglu_alpha as f32, limit: self.cfg.swiglu_limit as f32 }
    }

    pub(crate) fn check_token_ids(&self, ids: &[u32]) -> Result<()> {
        check_token_ids(ids, self.cfg.vocab_size)
    }

    pub(crate) fn embed_tokens(&self, ids: &[u32]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        ids.iter().flat_map(|&t| self.w.embed[t as usize * h..(t as usize + 1) * h].iter().copied()).collect()
    }

    /// One decoder layer over tokens `x [N, H]` grouped in `rows`; with a cache (one row only),
    /// keys and values of earlier tokens come from it and the new ones are appended. With `save`,
    /// the activations the backward pass needs are kept.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: usize,
        x: &mut [f32],
        pos: &[u32],
        seg: &[u32],
        rows: &[Range<usize>],
        cache: Option<&mut LayerCache>,
        adapter: &dyn Adapter,
        save: Option<&mut Vec<LayerActs>>,
    ) -> Result<()> {
        let layer = &self.w.layers[l];
        let cfg = &self.cfg;
        let (qw, kw) = (cfg.q_width(), cfg.kv_width());
        let eps = cfg.rms_norm_eps as f32;
        let x_in = save.as_ref().map(|_| x.to_vec());
        let (a, rstd1) = rmsnorm(x, &layer.input_norm, eps);
        let proj = |m: Dense, lin: &crate::weights::Linear, input: &[f32]| {
            let mut y = lin.forward(input);
            adapter.dense_forward(l, m, input, &mut y);
            y
        };
        let mut q = proj(Dense::Q, &layer.q, &a);
        let mut k = proj(Dense::K, &layer.k, &a);
        let v = proj(Dense::V, &layer.v, &a);
        self.rope.apply(&mut q, pos, false);
        self.rope.apply(&mut k, pos, false);
        let window = self.layer_window(l);
        let scale = self.attention_scale();
        let mut o = vec![0.0f32; q.len()];
        let mut lse = vec![];
        match cache {
            None => {
                for r in rows {
                    let c = row_coords(pos, seg, r, window);
                    let (or, lr) = attention(
                        &q[r.start * qw..r.end * qw],
                        &k[r.start * kw..r.end * kw],
                        &v[r.start * kw..r.end * kw],
                        &layer.sinks,
                        self.heads(),
                        c,
                        scale,
                    );
                    o[r.start * qw..r.end * qw].copy_from_slice(&or);
                    lse.push(lr);
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
        let attn = proj(Dense::O, &layer.o, &o);
        x.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);
        let x_mid = save.as_ref().map(|_| x.to_vec());
        let (b, rstd2) = rmsnorm(x, &layer.post_norm, eps);
        let experts = AdaptedExperts { base: &layer.experts, adapter, layer: l };
        let (m, moe) =
            moe_forward(&b, &layer.router.w, &layer.router.b, &experts, cfg.num_experts_per_tok, self.swiglu())
                .map_err(|e| Error::Input(format!("layer {l}: {e}")))?;
        x.iter_mut().zip(&m).for_each(|(a, b)| *a += b);
        if let Some(acts) = save {
            acts.push(LayerActs {
                x_in: x_in.expect("saved"),
                a,
                rstd1,
                q,
                k,
                v,
                o,
                lse,
                x_mid: x_mid.expect("saved"),
                rstd2,
                moe,
            });
        }
        Ok(())
    }

    /// Layer `l` of a training forward, keeping what the backward pass needs.
    pub(crate) fn layer_saving(
        &self,
        l: usize,
        x: &mut [f32],
        b: &crate::grad::TrainBatch,
        adapter: &dyn Adapter,
        acts: &mut Vec<LayerActs>,
    ) -> Result<()> {
        self.layer(l, x, &b.pos, &b.seg, &b.rows, None, adapter, Some(acts))
    }

    pub(crate) fn layer_window(&self, l: usize) -> Option<usize> {
        (self.w.layers[l].kind == LayerType::Sliding).then_some(self.cfg.sliding_window)
    }

    pub(crate) fn attention_scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    /// Final hidden states `[N, H]` (after the last norm) for tokens grouped in `rows`, each with
    /// its position and segment id (packed rows restart positions per segment).
    pub fn hidden(
        &self,
        ids: &[u32],
        pos: &[u32],
        seg: &[u32],
        rows: &[Range<usize>],
        adapter: &dyn Adapter,
    ) -> Result<Vec<f32>> {
        self.check_token_ids(ids)?;
        let mut x = self.embed_tokens(ids);
        for l in 0..self.w.layers.len() {
            self.layer(l, &mut x, pos, seg, rows, None, adapter, None)?;
        }
        Ok(rmsnorm(&x, &self.w.norm, self.cfg.rms_norm_eps as f32).0)
    }

    /// `logits [N, V]` from hidden states.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        linear(hidden, &self.w.lm_head, None, self.cfg.hidden_size, self.cfg.vocab_size)
    }

    /// Logits `[B·T, V]` for `ids [B, T]`, each row at positions `0..T`.
    pub fn forward(&self, ids: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>> {
        self.forward_with(ids, batch, seq, &NoAdapter)
    }

    /// As [`Model::forward`], with an adapter.
    pub fn forward_with(&self, ids: &[u32], batch: usize, seq: usize, adapter: &dyn Adapter) -> Result<Vec<f32>> {
        if ids.len() != batch * seq || seq == 0 {
            return Err(Error::Input(format!("{} token ids do not form a [{batch}, {seq}] batch", ids.len())));
        }
        let pos: Vec<u32> = (0..batch).flat_map(|_| 0..seq as u32).collect();
        let seg = vec![0u32; ids.len()];
        let rows: Vec<_> = (0..batch).map(|b| b * seq..(b + 1) * seq).collect();
        Ok(self.logits(&self.hidden(ids, &pos, &seg, &rows, adapter)?))
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
        self.step_with(ids, cache, &NoAdapter)
    }

    /// As [`Model::step`], with an adapter.
    pub fn step_with(&self, ids: &[u32], cache: &mut KvCache, adapter: &dyn Adapter) -> Result<Vec<f32>> {
        self.check_token_ids(ids)?;
        if ids.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        if cache.layers.is_empty() {
            cache.layers = vec![LayerCache::default(); self.w.layers.len()];
        }
        let pos: Vec<u32> = (cache.next_pos..cache.next_pos + ids.len() as u32).collect();
        let seg = vec![0u32; ids.len()];
        let mut x = self.embed_tokens(ids);
        let whole = 0..ids.len();
        for l in 0..self.w.layers.len() {
            let c = Some(&mut cache.layers[l]);
            self.layer(l, &mut x, &pos, &seg, std::slice::from_ref(&whole), c, adapter, None)?;
        }
        cache.next_pos += ids.len() as u32;
        let h = self.cfg.hidden_size;
        let last = &x[(ids.len() - 1) * h..];
        Ok(self.logits(&rmsnorm(last, &self.w.norm, self.cfg.rms_norm_eps as f32).0))
    }

    /// Greedy decoding: up to `max_new` tokens after `prompt`, stopping after any of `stop`.
    pub fn generate_greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        self.generate(prompt, max_new, stop, &NoAdapter, &mut |logits| argmax(logits))
    }

    /// Decoding with any token chooser (greedy, sampling): up to `max_new` tokens after `prompt`,
    /// stopping after any of `stop`.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        adapter: &dyn Adapter,
        choose: &mut dyn FnMut(&[f32]) -> u32,
    ) -> Result<Vec<u32>> {
        let mut cache = KvCache::default();
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }
        let mut logits = self.step_with(prompt, &mut cache, adapter)?;
        loop {
            let next = choose(&logits);
            out.push(next);
            if out.len() == max_new || stop.contains(&next) {
                return Ok(out);
            }
            logits = self.step_with(&[next], &mut cache, adapter)?;
        }
    }
}

/// Every id in `ids` must index a vocabulary of `vocab` tokens (the CPU model and the GPU engine).
pub(crate) fn check_token_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(Error::Input(format!(
            "token id {t} at index {i} is out of range: the model's vocabulary has {vocab} tokens"
        )));
    }
    Ok(())
}

/// Attention coordinates of one row of a batch (queries and keys are the same tokens).
pub(crate) fn row_coords<'a>(pos: &'a [u32], seg: &'a [u32], r: &Range<usize>, window: Option<usize>) -> Coords<'a> {
    Coords { q_pos: &pos[r.clone()], k_pos: &pos[r.clone()], q_seg: &seg[r.clone()], k_seg: &seg[r.clone()], window }
}

/// What one layer's backward pass needs from its forward pass.
pub(crate) struct LayerActs {
    pub x_in: Vec<f32>,
    pub a: Vec<f32>,
    pub rstd1: Vec<f32>,
    /// After RoPE.
    pub q: Vec<f32>,
    /// After RoPE.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub o: Vec<f32>,
    /// Per row `[nq, T_row]`.
    pub lse: Vec<Vec<f32>>,
    pub x_mid: Vec<f32>,
    pub rstd2: Vec<f32>,
    pub moe: oxtune_moe::MoeCache,
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
