//! The model's weights in memory: dense tensors as f32, experts either MXFP4 (packed, usually
//! memory-mapped) or dense (the unquantized layout transformers writes).

use std::collections::BTreeSet;

use oxtune_moe::{gemm, ExpertWeights, Proj};
use oxtune_mxfp4::{Mxfp4Tensor, BLOCK};
use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, MmapSlice};
use crate::config::{GptOssConfig, LayerType};
use crate::error::{Error, Result};

/// Bytes backing an MXFP4 tensor: mapped from a checkpoint or owned (generated models).
#[derive(Clone, Debug)]
pub enum Bytes {
    Mapped(MmapSlice),
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m.as_ref(),
            Bytes::Owned(v) => v,
        }
    }
}

/// `y = x · Wᵀ + b`, `W [n_out, n_in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub n_in: usize,
    pub n_out: usize,
}

/// Expert projection weights.
#[derive(Clone, Debug)]
pub enum ExpertStore {
    /// `gate_up [E, 2I, H]`, `down [E, H, I]` (rows = outputs, quantized along the input).
    Mxfp4 { gate_up: Mxfp4Tensor<Bytes>, down: Mxfp4Tensor<Bytes> },
    /// transformers' parameter layout: `gate_up [E, H, 2I]`, `down [E, I, H]` (`x · W`).
    Dense { gate_up: Vec<f32>, down: Vec<f32> },
}

#[derive(Clone, Debug)]
pub struct Experts {
    pub store: ExpertStore,
    /// `[E, 2I]`
    pub gate_up_bias: Vec<f32>,
    /// `[E, H]`
    pub down_bias: Vec<f32>,
    pub num_experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
}

/// Rows of an MXFP4 matrix decoded per GEMM tile: bounds scratch memory to `TILE · in` floats.
const TILE: usize = 256;

impl Experts {
    fn bias(&self, proj: Proj, e: usize) -> &[f32] {
        let (_, n_out) = self.dims(proj);
        let b = if proj == Proj::GateUp { &self.gate_up_bias } else { &self.down_bias };
        &b[e * n_out..(e + 1) * n_out]
    }
}

impl ExpertWeights for Experts {
    fn num_experts(&self) -> usize {
        self.num_experts
    }
    fn hidden(&self) -> usize {
        self.hidden
    }
    fn intermediate(&self) -> usize {
        self.intermediate
    }

    fn forward(&self, proj: Proj, e: usize, x: &[f32], out: &mut [f32]) {
        let (n_in, n_out) = self.dims(proj);
        let n = x.len() / n_in;
        let bias = self.bias(proj, e);
        for row in out.chunks_exact_mut(n_out) {
            row.copy_from_slice(bias);
        }
        match &self.store {
            ExpertStore::Dense { gate_up, down } => {
                let w = if proj == Proj::GateUp { gate_up } else { down };
                gemm::matmul(x, &w[e * n_in * n_out..(e + 1) * n_in * n_out], out, n, n_in, n_out, false, 1.0);
            }
            ExpertStore::Mxfp4 { gate_up, down } => {
                let t = if proj == Proj::GateUp { gate_up } else { down };
                let w = t.index(e).expect("expert index checked by the caller");
                let mut tile = vec![0.0f32; TILE * n_in];
                for r0 in (0..n_out).step_by(TILE) {
                    let rows = TILE.min(n_out - r0);
                    let tile = &mut tile[..rows * n_in];
                    w.dequantize_rows_f32(r0, tile).expect("tile inside the expert");
                    // out[:, r0..r0+rows] += x · tileᵀ
                    gemm::sgemm_strided(n, n_in, rows, x, (n_in, 1), tile, (1, n_in), 1.0, &mut out[r0..], n_out);
                }
            }
        }
    }

    fn backward(&self, proj: Proj, e: usize, _x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let (n_in, n_out) = self.dims(proj);
        let n = dy.len() / n_out;
        match &self.store {
            ExpertStore::Dense { gate_up, down } => {
                let w = if proj == Proj::GateUp { gate_up } else { down };
                gemm::matmul(dy, &w[e * n_in * n_out..(e + 1) * n_in * n_out], dx, n, n_out, n_in, true, 0.0);
            }
            ExpertStore::Mxfp4 { gate_up, down } => {
                let t = if proj == Proj::GateUp { gate_up } else { down };
                let w = t.index(e).expect("expert index checked by the caller");
                dx.fill(0.0);
                let mut tile = vec![0.0f32; TILE * n_in];
                for r0 in (0..n_out).step_by(TILE) {
                    let rows = TILE.min(n_out - r0);
                    let tile = &mut tile[..rows * n_in];
                    w.dequantize_rows_f32(r0, tile).expect("tile inside the expert");
                    // dx += dy[:, r0..r0+rows] · tile
                    gemm::sgemm_strided(n, rows, n_in, &dy[r0..], (n_out, 1), tile, (n_in, 1), 1.0, dx, n_in);
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub kind: LayerType,
    pub input_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub sinks: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub router: Linear,
    pub experts: Experts,
}

#[derive(Clone, Debug)]
pub struct Weights {
    /// `[V, H]`
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `[V, H]` (a copy of `embed` when tied)
    pub lm_head: Vec<f32>,
}

/// Reads tensors by name and remembers which ones were used, to report the rest as unexpected.
struct Reader<'a> {
    ckpt: &'a Checkpoint,
    used: BTreeSet<String>,
}

impl Reader<'_> {
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.used.insert(name.to_string());
        self.ckpt.f32(name, shape)
    }

    fn linear(&mut self, prefix: &str, n_in: usize, n_out: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.f32(&format!("{prefix}.weight"), &[n_out, n_in])?,
            b: self.f32(&format!("{prefix}.bias"), &[n_out])?,
            n_in,
            n_out,
        })
    }

    fn mxfp4(&mut self, name: &str, e: usize, rows: usize, cols: usize) -> Result<Mxfp4Tensor<Bytes>> {
        let (bn, sn) = (format!("{name}_blocks"), format!("{name}_scales"));
        let g = cols / BLOCK;
        let bi = self.ckpt.expect(&bn, &[Dtype::U8], &[e, rows, g, 16])?.clone();
        let si = self.ckpt.expect(&sn, &[Dtype::U8], &[e, rows, g])?.clone();
        self.used.insert(bn);
        self.used.insert(sn);
        Ok(Mxfp4Tensor::from_checkpoint(
            Bytes::Mapped(self.ckpt.slice(&bi)),
            &bi.shape,
            Bytes::Mapped(self.ckpt.slice(&si)),
            &si.shape,
        )?)
    }
}

impl Weights {
    /// Loads every tensor of a gpt-oss checkpoint, checking names, dtypes and shapes against
    /// `cfg`; tensors the model does not use are an error too.
    pub fn load(ckpt: &Checkpoint, cfg: &GptOssConfig) -> Result<Self> {
        let (h, i, e, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size);
        let mut r = Reader { ckpt, used: BTreeSet::new() };
        let embed = r.f32("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings && ckpt.info("lm_head.weight").is_none() {
            embed.clone()
        } else {
            r.f32("lm_head.weight", &[v, h])?
        };
        let norm = r.f32("model.norm.weight", &[h])?;
        let mxfp4 = ckpt.info("model.layers.0.mlp.experts.gate_up_proj_blocks").is_some();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (l, &kind) in cfg.layer_types.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let store = if mxfp4 {
                ExpertStore::Mxfp4 {
                    gate_up: r.mxfp4(&format!("{p}.mlp.experts.gate_up_proj"), e, 2 * i, h)?,
                    down: r.mxfp4(&format!("{p}.mlp.experts.down_proj"), e, h, i)?,
                }
            } else {
                ExpertStore::Dense {
                    gate_up: r.f32(&format!("{p}.mlp.experts.gate_up_proj"), &[e, h, 2 * i])?,
                    down: r.f32(&format!("{p}.mlp.experts.down_proj"), &[e, i, h])?,
                }
            };
            layers.push(Layer {
                kind,
                input_norm: r.f32(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: r.linear(&format!("{p}.self_attn.q_proj"), h, cfg.q_width())?,
                k: r.linear(&format!("{p}.self_attn.k_proj"), h, cfg.kv_width())?,
                v: r.linear(&format!("{p}.self_attn.v_proj"), h, cfg.kv_width())?,
                o: r.linear(&format!("{p}.self_attn.o_proj"), cfg.q_width(), h)?,
                sinks: r.f32(&format!("{p}.self_attn.sinks"), &[cfg.num_attention_heads])?,
                post_norm: r.f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                router: r.linear(&format!("{p}.mlp.router"), h, e)?,
                experts: Experts {
                    store,
                    gate_up_bias: r.f32(&format!("{p}.mlp.experts.gate_up_proj_bias"), &[e, 2 * i])?,
                    down_bias: r.f32(&format!("{p}.mlp.experts.down_proj_bias"), &[e, h])?,
                    num_experts: e,
                    hidden: h,
                    intermediate: i,
                },
            });
        }
        let extra: Vec<&str> = ckpt.names().filter(|n| !r.used.contains(*n)).collect();
        if let Some(first) = extra.first() {
            let info = ckpt.info(first).expect("listed by the checkpoint");
            return Err(Error::Tensor {
                name: first.to_string(),
                file: ckpt.file_of(info).to_path_buf(),
                msg: format!(
                    "not part of a gpt-oss model with this config.json ({} unexpected tensors in all: {}); check that config.json matches the weights",
                    extra.len(),
                    extra.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(Self { embed, layers, norm, lm_head })
    }
}
