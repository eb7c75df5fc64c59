//! The model's weights in memory: dense tensors as f32, experts either MXFP4 (packed, usually
//! memory-mapped) or dense (the unquantized layout transformers writes).

use std::collections::BTreeSet;

use oxtune_lora::{FrozenWeight, Nf4Weight};
use oxtune_moe::{gemm, ExpertWeights, Proj};
use oxtune_mxfp4::{Mxfp4Tensor, BLOCK};
use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, MmapSlice};
use crate::config::{GptOssConfig, LayerType};
use crate::error::{Error, Result};
use crate::ops::linear::{linear, linear_backward_input};

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

/// A frozen dense weight `W [n_out, n_in]`: f32 (from bf16 checkpoints) or NF4 (QLoRA).
#[derive(Clone, Debug)]
pub enum DenseWeight {
    F32(Vec<f32>),
    Nf4(Nf4Weight),
}

/// `y = x · Wᵀ + b`, `W [n_out, n_in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: DenseWeight,
    pub b: Vec<f32>,
    pub n_in: usize,
    pub n_out: usize,
}

// Shapes are checked when weights are loaded or quantized; activations come from the model.
const SHAPES: &str = "activation shapes match the model's weights";

impl Linear {
    pub fn new(w: Vec<f32>, b: Vec<f32>, n_in: usize, n_out: usize) -> Self {
        Self { w: DenseWeight::F32(w), b, n_in, n_out }
    }

    /// `x [n, in] → y [n, out]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        match &self.w {
            DenseWeight::F32(w) => linear(x, w, Some(&self.b), self.n_in, self.n_out),
            DenseWeight::Nf4(w) => {
                let n = x.len() / self.n_in;
                let mut y: Vec<f32> = (0..n).flat_map(|_| self.b.iter().copied()).collect();
                w.matmul_acc(x, &mut y).expect(SHAPES);
                y
            }
        }
    }

    /// `dy [n, out] → dx [n, in] = dy · W`.
    pub fn backward_input(&self, dy: &[f32]) -> Vec<f32> {
        match &self.w {
            DenseWeight::F32(w) => linear_backward_input(dy, w, self.n_in, self.n_out),
            DenseWeight::Nf4(w) => {
                let mut dx = vec![0.0; dy.len() / self.n_out * self.n_in];
                w.matmul_t_acc(dy, &mut dx).expect(SHAPES);
                dx
            }
        }
    }

    /// Re-stores the weight in NF4 (bitsandbytes' format, block 64, double-quantized absmax).
    pub fn quantize_nf4(&mut self) -> Result<()> {
        if let DenseWeight::F32(w) = &self.w {
            let q = Nf4Weight::quantize(w, self.n_out, self.n_in, true)
                .map_err(|e| Error::Input(format!("NF4 quantization: {e}")))?;
            self.w = DenseWeight::Nf4(q);
        }
        Ok(())
    }

    /// Bytes of the weight and bias.
    pub fn nbytes(&self) -> usize {
        let w = match &self.w {
            DenseWeight::F32(w) => 4 * w.len(),
            DenseWeight::Nf4(w) => w.nbytes(),
        };
        w + 4 * self.b.len()
    }
}

/// The router `logits = x · Wᵀ + b`, `W [E, H]` (kept in f32: it is small and decides routing).
#[derive(Clone, Debug)]
pub struct Router {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// One expert's MXFP4 matrix `[out, in]` as a frozen weight for the `lora` crate's matmuls.
struct Mxfp4Expert<'a>(Mxfp4Tensor<&'a [u8]>);

impl FrozenWeight for Mxfp4Expert<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.0.rows(), self.0.cols())
    }

    fn dequantize_rows(&self, rows: std::ops::Range<usize>, dst: &mut [f32]) -> oxtune_lora::Result<()> {
        oxtune_lora::check_tile(rows.clone(), 0..self.0.cols(), self.0.rows(), self.0.cols(), dst.len())?;
        self.0.dequantize_rows_f32(rows.start, dst).map_err(|e| oxtune_lora::Error::Base(Box::new(e)))
    }

    fn dequantize_tile(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        dst: &mut [f32],
    ) -> oxtune_lora::Result<()> {
        self.0.dequantize_tile_f32(rows, cols, dst).map_err(|e| oxtune_lora::Error::Base(Box::new(e)))
    }

    fn nbytes(&self) -> usize {
        self.0.nbytes()
    }
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
                let w = Mxfp4Expert(t.index(e).expect("expert index checked by the caller"));
                w.matmul_acc(x, out).expect(SHAPES);
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
                let w = Mxfp4Expert(t.index(e).expect("expert index checked by the caller"));
                dx.fill(0.0);
                w.matmul_t_acc(dy, dx).expect(SHAPES);
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
    pub router: Router,
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
        Ok(Linear::new(
            self.f32(&format!("{prefix}.weight"), &[n_out, n_in])?,
            self.f32(&format!("{prefix}.bias"), &[n_out])?,
            n_in,
            n_out,
        ))
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
    /// QLoRA: re-stores the attention projections (q/k/v/o) of every layer in NF4.
    pub fn quantize_attention_nf4(&mut self) -> Result<()> {
        for l in &mut self.layers {
            for lin in [&mut l.q, &mut l.k, &mut l.v, &mut l.o] {
                lin.quantize_nf4()?;
            }
        }
        Ok(())
    }

    /// Bytes of the attention projections (weights and biases).
    pub fn attention_nbytes(&self) -> usize {
        self.layers.iter().map(|l| l.q.nbytes() + l.k.nbytes() + l.v.nbytes() + l.o.nbytes()).sum()
    }

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
                router: Router {
                    w: r.f32(&format!("{p}.mlp.router.weight"), &[e, h])?,
                    b: r.f32(&format!("{p}.mlp.router.bias"), &[e])?,
                },
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
