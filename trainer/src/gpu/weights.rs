//! The frozen model on the device (the embedding table stays in host memory): dense weights in bf16, experts as they are stored (MXFP4 blocks
//! and scales, or f32 for transformers' unquantized layout), norms, biases, sinks and router in f32.

use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use oxtune_kernels::pinned::PinnedBuf;
use oxtune_kernels::Gpu;

use crate::config::LayerType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::weights::{DenseWeight, ExpertStore, Linear};

/// Bytes allocated so far, to report what was resident when memory ran out.
pub(crate) struct Alloc<'a> {
    pub gpu: &'a Gpu,
    pub bytes: usize,
}

impl Alloc<'_> {
    fn fail(&self, what: &str, n: usize) -> Error {
        let (free, total) = self.gpu.ctx.mem_get_info().unwrap_or((0, 0));
        crate::gpu::oom_advice(
            &format!("{what} ({n} bytes, after {} bytes already allocated)", self.bytes),
            n,
            free,
            total,
        )
    }

    pub fn upload<T: DeviceRepr>(&mut self, what: &str, host: &[T]) -> Result<CudaSlice<T>> {
        let n = std::mem::size_of_val(host);
        let s = self.gpu.stream.clone_htod(host).map_err(|_| self.fail(what, n))?;
        self.bytes += n;
        Ok(s)
    }

    /// Grows the GPU's shared scratch to `elems` u16 (counted here only if it grows).
    pub fn scratch(&mut self, elems: usize) -> Result<()> {
        let before = self.gpu.scratch_elems();
        self.gpu.reserve_scratch(elems).map_err(|_| self.fail("operand scratch", 2 * elems))?;
        self.bytes += 2 * (self.gpu.scratch_elems() - before);
        Ok(())
    }

    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &mut self,
        what: &str,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        let n = len.max(1) * std::mem::size_of::<T>();
        let s = self.gpu.stream.alloc_zeros::<T>(len.max(1)).map_err(|_| self.fail(what, n))?;
        self.bytes += n;
        Ok(s)
    }
}

pub(crate) struct GpuLinear {
    pub w: CudaSlice<bf16>,
    pub b: CudaSlice<f32>,
    pub n_in: usize,
    pub n_out: usize,
}

pub(crate) enum ExpertW {
    /// `[E, rows = out, cols / 32, 16]` codes and `[E, rows, cols / 32]` scales.
    Mxfp4 { blocks: CudaSlice<u8>, scales: CudaSlice<u8> },
    /// `[E, in, out]`, applied as `x · W[e]`.
    Dense(CudaSlice<f32>),
}

pub(crate) struct GpuLayer {
    pub window: Option<usize>,
    pub input_norm: CudaSlice<f32>,
    pub post_norm: CudaSlice<f32>,
    pub q: GpuLinear,
    pub k: GpuLinear,
    pub v: GpuLinear,
    pub o: GpuLinear,
    pub sinks: CudaSlice<f32>,
    /// `[E, H]` and `[E]`
    pub router_w: CudaSlice<f32>,
    pub router_b: CudaSlice<f32>,
    pub gate_up: ExpertW,
    pub gate_up_bias: CudaSlice<f32>,
    pub down: ExpertW,
    pub down_bias: CudaSlice<f32>,
}

/// The embedding table `[V, H]` in host memory: a step needs only its tokens' rows (1.1 GB of
/// device memory saved for gpt-oss for ~12 MB read per 2,048 tokens).
pub(crate) enum HostEmbed {
    /// Page-locked and mapped for the device: the embedding kernel reads the batch's rows over the
    /// bus, and the host does nothing per batch but upload the ids.
    Mapped(PinnedBuf<bf16>),
    /// Pageable, where the driver could not lock the table (or the engine was asked to:
    /// `EngineOptions::pageable_embeddings`): each batch's rows are gathered on the host and
    /// uploaded.
    Pageable(Vec<bf16>),
}

impl HostEmbed {
    /// The table in mapped page-locked memory unless `pageable`, else (with the reason) pageable.
    fn new(gpu: &Gpu, table: &[f32], pageable: bool) -> (Self, Option<String>) {
        if pageable {
            return (HostEmbed::Pageable(to_bf16(table)), Some("asked for".into()));
        }
        match PinnedBuf::<bf16>::new_mapped(gpu, table.len()) {
            Ok(mut buf) => {
                for (d, &x) in buf.as_mut_slice().iter_mut().zip(table) {
                    *d = bf16::from_f32(x);
                }
                (HostEmbed::Mapped(buf), None)
            }
            Err(e) => (HostEmbed::Pageable(to_bf16(table)), Some(format!("page-locking it failed: {e}"))),
        }
    }
}

pub(crate) struct GpuWeights {
    pub embed: HostEmbed,
    /// Why the embedding table is pageable (the slower way), if it is.
    pub embed_pageable: Option<String>,
    /// `[V, H]`
    pub lm_head: CudaSlice<bf16>,
    pub norm: CudaSlice<f32>,
    pub layers: Vec<GpuLayer>,
    pub inv_freq: CudaSlice<f32>,
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

fn linear(a: &mut Alloc, name: &str, lin: &Linear) -> Result<GpuLinear> {
    let w = match &lin.w {
        DenseWeight::F32(w) => to_bf16(w),
        // QLoRA's NF4 weights run as their dequantized values (the frozen weight the CPU uses).
        DenseWeight::Nf4(w) => to_bf16(&w.tensor().dequantize()),
    };
    Ok(GpuLinear { w: a.upload(name, &w)?, b: a.upload(name, &lin.b)?, n_in: lin.n_in, n_out: lin.n_out })
}

impl GpuWeights {
    /// Bytes [`GpuWeights::upload`] allocates for `m`.
    pub fn bytes_for(m: &Model) -> usize {
        let w = &m.w;
        let mut n = 2 * w.lm_head.len() + 4 * (w.norm.len() + m.rope.inv_freq.len());
        for l in &w.layers {
            n += 4 * (l.input_norm.len() + l.post_norm.len() + l.sinks.len() + l.router.w.len() + l.router.b.len());
            for lin in [&l.q, &l.k, &l.v, &l.o] {
                n += 2 * lin.n_in * lin.n_out + 4 * lin.b.len();
            }
            let ex = &l.experts;
            n += 4 * (ex.gate_up_bias.len() + ex.down_bias.len());
            n += match &ex.store {
                ExpertStore::Mxfp4 { gate_up, down } => gate_up.nbytes() + down.nbytes(),
                ExpertStore::Dense { gate_up, down } => 4 * (gate_up.len() + down.len()),
            };
        }
        n
    }

    /// The model's weights on the device (the embedding table in host memory: pageable with
    /// `pageable_embeddings`, else mapped page-locked memory where the driver allows it).
    pub fn upload(a: &mut Alloc, m: &Model, pageable_embeddings: bool) -> Result<Self> {
        let w = &m.w;
        let mut layers = Vec::with_capacity(w.layers.len());
        for (l, layer) in w.layers.iter().enumerate() {
            let name = |s: &str| format!("layer {l} {s}");
            let ex = &layer.experts;
            let (gate_up, down) = match &ex.store {
                ExpertStore::Mxfp4 { gate_up, down } => (
                    ExpertW::Mxfp4 {
                        blocks: a.upload(&name("gate_up blocks"), gate_up.blocks())?,
                        scales: a.upload(&name("gate_up scales"), gate_up.scales())?,
                    },
                    ExpertW::Mxfp4 {
                        blocks: a.upload(&name("down blocks"), down.blocks())?,
                        scales: a.upload(&name("down scales"), down.scales())?,
                    },
                ),
                ExpertStore::Dense { gate_up, down } => (
                    ExpertW::Dense(a.upload(&name("gate_up"), gate_up)?),
                    ExpertW::Dense(a.upload(&name("down"), down)?),
                ),
            };
            layers.push(GpuLayer {
                window: (layer.kind == LayerType::Sliding).then_some(m.cfg.sliding_window),
                input_norm: a.upload(&name("input norm"), &layer.input_norm)?,
                post_norm: a.upload(&name("post norm"), &layer.post_norm)?,
                q: linear(a, &name("q_proj"), &layer.q)?,
                k: linear(a, &name("k_proj"), &layer.k)?,
                v: linear(a, &name("v_proj"), &layer.v)?,
                o: linear(a, &name("o_proj"), &layer.o)?,
                sinks: a.upload(&name("sinks"), &layer.sinks)?,
                router_w: a.upload(&name("router"), &layer.router.w)?,
                router_b: a.upload(&name("router bias"), &layer.router.b)?,
                gate_up,
                gate_up_bias: a.upload(&name("gate_up bias"), &ex.gate_up_bias)?,
                down,
                down_bias: a.upload(&name("down bias"), &ex.down_bias)?,
            });
        }
        let (embed, embed_pageable) = HostEmbed::new(a.gpu, &w.embed, pageable_embeddings);
        Ok(Self {
            embed,
            embed_pageable,
            lm_head: a.upload("lm_head", &to_bf16(&w.lm_head))?,
            norm: a.upload("final norm", &w.norm)?,
            layers,
            inv_freq: a.upload("rope frequencies", &m.rope.inv_freq)?,
        })
    }
}
