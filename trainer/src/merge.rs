//! Export: merge a LoRA adapter into its base model and write a Hugging Face gpt-oss directory, and
//! pack an adapter into one self-describing safetensors file.
//!
//! Two output formats:
//! - [`MergeFormat::Bf16`]: attention `W += s·B·A` in f32, then bf16; experts dequantized, merged per
//!   expert (PEFT's slicing, `oxtune_lora::LoraExperts`) and written in transformers' unquantized layout
//!   `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]` bf16; `quantization_config` removed from config.json;
//!   shards cut at `max_shard_bytes` with `model.safetensors.index.json`.
//! - [`MergeFormat::Mxfp4`]: the base's own layout (names, shapes, dtypes, files) with merged experts
//!   re-quantized by `oxtune_mxfp4::quantize_f32` (triton's `downcast_to_mxfp` rounding). An expert whose
//!   ΔW is exactly zero keeps its original bytes (re-quantizing dequantized MXFP4 can change the bytes
//!   while keeping the values).
//!
//! Memory stays bounded: shards are streamed tensor by tensor, each tensor is produced on demand from the
//! memory-mapped base, and experts are dequantized one expert at a time. The largest buffer is one merged
//! expert tensor of one layer in bf16 (1.06 GB for gpt-oss-20b's `gate_up_proj`).
//!
//! Every file goes to a temporary name, is fsynced and renamed; the index (or the single
//! `model.safetensors`) and config.json are written last, so an interrupted merge leaves no directory
//! that loads as a model.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::Path;

use half::bf16;
use oxtune_lora::{LoraConfig, LoraExperts, LoraLinear, LoraSite, GPT_OSS_EXPERT_PARAMS};
use oxtune_moe::Proj;
use oxtune_mxfp4::{Mxfp4Tensor, BLOCK};
use safetensors::Dtype;

use crate::adapter::Dense;
use crate::checkpoint::Checkpoint;
use crate::config::GptOssConfig;
use crate::error::{io_err, Error, Result};
use crate::io::{fnv1a64, FNV_OFFSET};
use crate::lora_adapter::LoraAdapter;

/// Files besides the weights that a model directory carries and a merge copies when present.
pub const SIDE_FILES: [&str; 6] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// The Hugging Face converter's shard size for gpt-oss.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 4_800_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeFormat {
    Bf16,
    Mxfp4,
}

/// How the mxfp4 format picks each re-quantized block's scale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleMode {
    /// triton's `downcast_to_mxfp` (ROUND_UP): the smallest power of two that fits the block's largest
    /// value. A merged value slightly above the base's largest grid value bumps the scale and doubles
    /// the step of the whole block, so even a tiny ΔW can cost several percent of the weight.
    #[default]
    RoundUp,
    /// Per block, the better (smaller squared error) of the ROUND_UP scale and the one below it, which
    /// saturates the largest values at ±6 but keeps the finer step. Never worse than `RoundUp`.
    MinError,
}

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub format: MergeFormat,
    pub scale_mode: ScaleMode,
    /// Bf16 only: a shard is closed before a tensor would take it past this size (a tensor larger than
    /// this gets a shard of its own). The mxfp4 format keeps the base's files.
    pub max_shard_bytes: u64,
    pub dry_run: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            format: MergeFormat::Bf16,
            scale_mode: ScaleMode::RoundUp,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            dry_run: false,
        }
    }
}

/// What one output tensor is made from.
#[derive(Clone, Debug, PartialEq)]
enum Src {
    /// The base tensor's bytes, unchanged.
    Copy(String),
    /// A base attention weight `[out, in]` plus its LoRA, in the output dtype.
    Attn {
        base: String,
        layer: usize,
        m: Dense,
    },
    /// One expert weight of a layer, merged, bf16 `[E, in, out]`.
    ExpertBf16 {
        layer: usize,
        proj: Proj,
    },
    /// One expert weight of a layer, merged and re-quantized: its `_blocks` or its `_scales`.
    ExpertBlocks {
        layer: usize,
        proj: Proj,
    },
    ExpertScales {
        layer: usize,
        proj: Proj,
    },
}

/// One tensor of the output.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    src: Src,
}

impl PlannedTensor {
    pub fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8) as u64
    }

    /// `copy`, `merged` or `requantized`.
    pub fn action(&self) -> &'static str {
        match self.src {
            Src::Copy(_) => "copy",
            Src::Attn { .. } | Src::ExpertBf16 { .. } => "merged",
            Src::ExpertBlocks { .. } | Src::ExpertScales { .. } => "requantized",
        }
    }
}

/// One safetensors file of the output.
#[derive(Clone, Debug)]
pub struct PlannedFile {
    pub name: String,
    pub tensors: Vec<PlannedTensor>,
}

impl PlannedFile {
    pub fn nbytes(&self) -> u64 {
        self.tensors.iter().map(PlannedTensor::nbytes).sum()
    }
}

/// `||q - m|| / ||m||` of one layer's re-quantized expert weight against the bf16 merge.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantError {
    pub layer: usize,
    pub proj: &'static str,
    pub rel: f64,
    /// `||q - m|| / ||ΔW||` over the re-quantized experts: how much of the adapter's change the MXFP4
    /// grid loses (near 1 when ΔW is smaller than the grid spacing and rounds back to the base).
    pub delta_rel: f64,
    /// Experts whose ΔW is zero, copied byte for byte.
    pub copied_experts: usize,
}

#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    pub files: Vec<PlannedFile>,
    /// Other files written (config.json, the index, tokenizer and chat template files).
    pub side_files: Vec<String>,
    /// Mxfp4 only, one per layer and expert weight with LoRA, in layer order.
    pub quant_errors: Vec<QuantError>,
}

fn proj_name(p: Proj) -> &'static str {
    match p {
        Proj::GateUp => "gate_up_proj",
        Proj::Down => "down_proj",
    }
}

/// The adapter's LoRA, per site, in the forms the merge needs.
struct Lora {
    dense: HashMap<(usize, Dense), LoraLinear>,
    experts: HashMap<(usize, Proj), LoraExperts>,
}

impl Lora {
    fn new(adapter: &LoraAdapter, cfg: &GptOssConfig) -> Result<Self> {
        let spec = &adapter.spec;
        let scaling =
            LoraConfig { r: spec.r, alpha: spec.alpha as f64, use_rslora: spec.rslora, dropout: 0.0 }.scaling();
        let tensors: HashMap<String, &[f32]> = adapter.tensors().into_iter().map(|(k, _, v)| (k, v)).collect();
        let get = |key: String| {
            tensors.get(&key).map(|v| v.to_vec()).ok_or_else(|| Error::Input(format!("adapter has no tensor {key}")))
        };
        let lora_err = |e: oxtune_lora::Error| Error::Input(e.to_string());
        let (h, i, e) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts);
        let mut dense = HashMap::new();
        let mut experts = HashMap::new();
        for l in 0..cfg.num_hidden_layers {
            let prefix = format!("base_model.model.model.layers.{l}");
            for m in Dense::ALL.into_iter().filter(|_| spec.attention) {
                let (n_in, n_out) = match m {
                    Dense::Q => (h, cfg.q_width()),
                    Dense::K | Dense::V => (h, cfg.kv_width()),
                    Dense::O => (cfg.q_width(), h),
                };
                let site = LoraSite::linear(format!("{prefix}.self_attn.{}", m.name()), n_in, n_out, spec.r);
                let w = LoraLinear::from_weights(n_in, n_out, get(site.a_key())?, get(site.b_key())?, scaling)
                    .map_err(lora_err)?;
                dense.insert((l, m), w);
            }
            for p in [Proj::GateUp, Proj::Down].into_iter().filter(|_| spec.experts) {
                let (n_in, n_out) = if p == Proj::GateUp { (h, 2 * i) } else { (i, h) };
                let site = LoraSite::expert_param(
                    &format!("{prefix}.mlp.experts"),
                    proj_name(p),
                    &GPT_OSS_EXPERT_PARAMS,
                    e,
                    n_in,
                    n_out,
                    spec.r,
                )
                .map_err(lora_err)?;
                let w = LoraExperts::from_weights(e, n_in, n_out, get(site.a_key())?, get(site.b_key())?, scaling)
                    .map_err(lora_err)?;
                experts.insert((l, p), w);
            }
        }
        Ok(Self { dense, experts })
    }
}

/// `model.layers.{L}.{rest}` → `(L, rest)`.
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

fn attn_of(rest: &str) -> Option<Dense> {
    Dense::ALL.into_iter().find(|m| rest == format!("self_attn.{}.weight", m.name()))
}

/// `mlp.experts.{gate_up,down}_proj{suffix}` → the projection.
fn expert_of(rest: &str, suffix: &str) -> Option<Proj> {
    [Proj::GateUp, Proj::Down].into_iter().find(|&p| rest == format!("mlp.experts.{}{suffix}", proj_name(p)))
}

/// The merge of one adapter into one base: the plan, then the bytes of each planned tensor.
struct Merger<'a> {
    ckpt: &'a Checkpoint,
    cfg: &'a GptOssConfig,
    lora: Lora,
    format: MergeFormat,
    scale_mode: ScaleMode,
    /// Whether the base stores experts in MXFP4 (`_blocks`/`_scales`) rather than transformers' bf16 layout.
    mxfp4_base: bool,
    /// Scales of a re-quantized expert weight, kept from its `_blocks` until its `_scales` is written.
    pending_scales: HashMap<(usize, Proj), Vec<u8>>,
    quant_errors: Vec<QuantError>,
}

impl<'a> Merger<'a> {
    /// `(out, in)` of one expert of `p`.
    fn dims(&self, p: Proj) -> (usize, usize) {
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        if p == Proj::GateUp {
            (2 * i, h)
        } else {
            (h, i)
        }
    }

    /// Checks the base's expert tensors of layer `l` against the config.
    fn check_experts(&self, l: usize) -> Result<()> {
        let e = self.cfg.num_local_experts;
        for p in [Proj::GateUp, Proj::Down] {
            let (out, inp) = self.dims(p);
            let name = format!("model.layers.{l}.mlp.experts.{}", proj_name(p));
            if self.mxfp4_base {
                self.ckpt.expect(&format!("{name}_blocks"), &[Dtype::U8], &[e, out, inp / BLOCK, 16])?;
                self.ckpt.expect(&format!("{name}_scales"), &[Dtype::U8], &[e, out, inp / BLOCK])?;
            } else {
                self.ckpt.expect(&name, &[Dtype::BF16, Dtype::F16, Dtype::F32], &[e, inp, out])?;
            }
        }
        Ok(())
    }

    fn plan_tensor(&self, name: &str) -> Result<Option<PlannedTensor>> {
        let info = self.ckpt.info(name).expect("planned from the checkpoint's names");
        let copy = PlannedTensor {
            name: name.into(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            src: Src::Copy(name.into()),
        };
        let Some((layer, rest)) = layer_of(name) else { return Ok(Some(copy)) };
        if let Some(m) = attn_of(rest) {
            if !self.lora.dense.contains_key(&(layer, m)) {
                return Ok(Some(copy));
            }
            let dtype = if self.format == MergeFormat::Bf16 { Dtype::BF16 } else { info.dtype };
            if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
                return Err(Error::Tensor {
                    name: name.into(),
                    file: self.ckpt.file_of(info).to_path_buf(),
                    msg: format!("dtype is {:?}; merging LoRA needs a BF16, F16 or F32 weight", info.dtype),
                });
            }
            let src = Src::Attn { base: name.into(), layer, m };
            return Ok(Some(PlannedTensor { name: name.into(), dtype, shape: info.shape.clone(), src }));
        }
        let e = self.cfg.num_local_experts;
        let has_lora = |p| self.lora.experts.contains_key(&(layer, p));
        match self.format {
            MergeFormat::Bf16 => {
                let suffix = if self.mxfp4_base { "_blocks" } else { "" };
                if let Some(p) = expert_of(rest, suffix) {
                    if !self.mxfp4_base && !has_lora(p) && info.dtype == Dtype::BF16 {
                        return Ok(Some(copy));
                    }
                    let (out, inp) = self.dims(p);
                    let name = format!("model.layers.{layer}.mlp.experts.{}", proj_name(p));
                    let src = Src::ExpertBf16 { layer, proj: p };
                    return Ok(Some(PlannedTensor { name, dtype: Dtype::BF16, shape: vec![e, inp, out], src }));
                }
                if self.mxfp4_base && expert_of(rest, "_scales").is_some() {
                    return Ok(None);
                }
            }
            MergeFormat::Mxfp4 => {
                if let Some(p) = expert_of(rest, "_blocks").filter(|&p| has_lora(p)) {
                    let src = Src::ExpertBlocks { layer, proj: p };
                    return Ok(Some(PlannedTensor { src, ..copy }));
                }
                if let Some(p) = expert_of(rest, "_scales").filter(|&p| has_lora(p)) {
                    let src = Src::ExpertScales { layer, proj: p };
                    return Ok(Some(PlannedTensor { src, ..copy }));
                }
            }
        }
        Ok(Some(copy))
    }

    /// The output files: bf16 sorted by name and cut at `max_shard_bytes`; mxfp4 as the base's files.
    fn plan(&self, opts: &MergeOptions) -> Result<Vec<PlannedFile>> {
        for l in 0..self.cfg.num_hidden_layers {
            self.check_experts(l)?;
        }
        let names: Vec<&str> = self.ckpt.names().collect();
        match opts.format {
            MergeFormat::Bf16 => {
                let mut tensors = Vec::new();
                for n in names {
                    tensors.extend(self.plan_tensor(n)?);
                }
                tensors.sort_by(|a, b| a.name.cmp(&b.name));
                let mut groups: Vec<Vec<PlannedTensor>> = vec![];
                let mut size = 0u64;
                for t in tensors {
                    match groups.last_mut() {
                        Some(g) if size + t.nbytes() <= opts.max_shard_bytes.max(1) => {
                            size += t.nbytes();
                            g.push(t);
                        }
                        _ => {
                            size = t.nbytes();
                            groups.push(vec![t]);
                        }
                    }
                }
                let n = groups.len();
                Ok(groups
                    .into_iter()
                    .enumerate()
                    .map(|(k, tensors)| PlannedFile {
                        name: format!("model-{:05}-of-{n:05}.safetensors", k + 1),
                        tensors,
                    })
                    .collect())
            }
            MergeFormat::Mxfp4 => {
                let mut files: BTreeMap<String, Vec<PlannedTensor>> = BTreeMap::new();
                for n in names {
                    let info = self.ckpt.info(n).expect("listed by the checkpoint");
                    let file = self.ckpt.file_of(info).file_name().expect("a file").to_string_lossy().into_owned();
                    let t = self.plan_tensor(n)?.expect("the mxfp4 format keeps every tensor");
                    files.entry(file).or_default().push(t);
                }
                Ok(files.into_iter().map(|(name, tensors)| PlannedFile { name, tensors }).collect())
            }
        }
    }

    /// The base's expert `e` of `p` in `[out, in]` (`out_in`) or `[in, out]` layout, f32.
    fn base_expert(&self, layer: usize, p: Proj, e: usize, out_in: bool) -> Result<Vec<f32>> {
        let (out, inp) = self.dims(p);
        let name = format!("model.layers.{layer}.mlp.experts.{}", proj_name(p));
        if self.mxfp4_base {
            let t = self.mxfp4(&name)?;
            let w = t.index(e)?.dequantize_f32();
            return Ok(if out_in { w } else { transpose(&w, out, inp) });
        }
        let info = self.ckpt.info(&name).expect("checked in plan");
        let per = inp * out * info.dtype.bitsize() / 8;
        let bytes = &self.ckpt.bytes(info)[e * per..(e + 1) * per];
        let w = crate::checkpoint::decode_floats(info.dtype, bytes);
        Ok(if out_in { transpose(&w, inp, out) } else { w })
    }

    fn mxfp4(&self, name: &str) -> Result<Mxfp4Tensor<&'a [u8]>> {
        let (bn, sn) = (format!("{name}_blocks"), format!("{name}_scales"));
        let bi = self.ckpt.info(&bn).expect("checked in plan");
        let si = self.ckpt.info(&sn).expect("checked in plan");
        Ok(Mxfp4Tensor::from_checkpoint(self.ckpt.bytes(bi), &bi.shape, self.ckpt.bytes(si), &si.shape)?)
    }

    /// Merged and re-quantized `(blocks, scales)` of one layer's expert weight, recording its error.
    fn requantize(&mut self, layer: usize, p: Proj) -> Result<(Vec<u8>, Vec<u8>)> {
        let name = format!("model.layers.{layer}.mlp.experts.{}", proj_name(p));
        let base = self.mxfp4(&name)?;
        let lora = &self.lora.experts[&(layer, p)];
        let (out, inp) = self.dims(p);
        let (mut blocks, mut scales) = (base.blocks().to_vec(), base.scales().to_vec());
        let (nb, ns) = (out * inp / 2, out * inp / BLOCK);
        let (mut diff2, mut norm2, mut delta2, mut copied) = (0f64, 0f64, 0f64, 0);
        for e in 0..self.cfg.num_local_experts {
            let d = lora.delta_weight(e, oxtune_lora::ExpertLayout::OutIn).map_err(|e| Error::Input(e.to_string()))?;
            let w = base.index(e)?.dequantize_f32();
            if d.iter().all(|&x| x == 0.0) {
                copied += 1;
                norm2 += w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
                continue;
            }
            // The reference is the bf16 merge; quantizing it is what transformers does to bf16 weights.
            let m: Vec<f32> = w.iter().zip(&d).map(|(w, d)| bf16::from_f32(w + d).to_f32()).collect();
            let q = quantize(&m, [out, inp], self.scale_mode).map_err(|err| Error::Tensor {
                name: format!("{name}_blocks"),
                file: self.ckpt.dir.clone(),
                msg: format!("expert {e}: re-quantizing the merged weight failed: {err}"),
            })?;
            delta2 += d.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
            let back = q.dequantize_f32();
            for (a, b) in back.iter().zip(&m) {
                diff2 += ((a - b) as f64).powi(2);
                norm2 += (*b as f64).powi(2);
            }
            let (qb, qs, _) = q.into_parts();
            blocks[e * nb..(e + 1) * nb].copy_from_slice(&qb);
            scales[e * ns..(e + 1) * ns].copy_from_slice(&qs);
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { (a / b).sqrt() } else { 0.0 };
        self.quant_errors.push(QuantError {
            layer,
            proj: proj_name(p),
            rel: ratio(diff2, norm2),
            delta_rel: ratio(diff2, delta2),
            copied_experts: copied,
        });
        Ok((blocks, scales))
    }

    /// The bytes of one planned tensor.
    fn produce(&mut self, t: &PlannedTensor) -> Result<Cow<'a, [u8]>> {
        let ckpt = self.ckpt;
        Ok(match &t.src {
            Src::Copy(name) => Cow::Borrowed(ckpt.bytes(ckpt.info(name).expect("planned from the checkpoint"))),
            Src::Attn { base, layer, m } => {
                let mut w = ckpt.f32(base, &t.shape)?;
                self.lora.dense[&(*layer, *m)].merge_into(&mut w).map_err(|e| Error::Tensor {
                    name: base.clone(),
                    file: ckpt.dir.clone(),
                    msg: format!("merging LoRA: {e}"),
                })?;
                Cow::Owned(encode(&w, t.dtype, &t.name)?)
            }
            Src::ExpertBf16 { layer, proj } => {
                let (out, inp) = self.dims(*proj);
                let mut bytes = Vec::with_capacity(t.nbytes() as usize);
                for e in 0..self.cfg.num_local_experts {
                    let mut w = self.base_expert(*layer, *proj, e, false)?;
                    if let Some(lora) = self.lora.experts.get(&(*layer, *proj)) {
                        let d = lora
                            .delta_weight(e, oxtune_lora::ExpertLayout::InOut)
                            .map_err(|e| Error::Input(e.to_string()))?;
                        w.iter_mut().zip(d).for_each(|(w, d)| *w += d);
                    }
                    debug_assert_eq!(w.len(), inp * out);
                    bytes.extend(encode(&w, Dtype::BF16, &t.name)?);
                }
                Cow::Owned(bytes)
            }
            Src::ExpertBlocks { layer, proj } => {
                let (blocks, scales) = self.requantize(*layer, *proj)?;
                self.pending_scales.insert((*layer, *proj), scales);
                Cow::Owned(blocks)
            }
            Src::ExpertScales { layer, proj } => match self.pending_scales.remove(&(*layer, *proj)) {
                Some(s) => Cow::Owned(s),
                None => {
                    // Only when a base shards `_scales` before its `_blocks`; the error is recorded twice.
                    let (_, s) = self.requantize(*layer, *proj)?;
                    Cow::Owned(s)
                }
            },
        })
    }
}

/// `m [out, in]` in MXFP4 with `mode`'s scales.
fn quantize(m: &[f32], shape: [usize; 2], mode: ScaleMode) -> std::result::Result<Mxfp4Tensor, oxtune_mxfp4::Error> {
    let q = oxtune_mxfp4::quantize_f32(m, &shape)?;
    if mode == ScaleMode::RoundUp {
        return Ok(q);
    }
    let (mut blocks, mut scales, _) = q.into_parts();
    let mut codes = [0u8; 16];
    let mut back = [0f32; BLOCK];
    let err = |codes: &[u8], scale: u8, x: &[f32], back: &mut [f32; BLOCK]| {
        oxtune_mxfp4::decode_block(codes, scale, back);
        x.iter().zip(back.iter()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>()
    };
    for (g, x) in m.chunks_exact(BLOCK).enumerate() {
        let s = scales[g];
        if s <= 1 {
            continue;
        }
        let inv = 1.0 / oxtune_mxfp4::e8m0_to_f32(s - 1);
        codes.fill(0);
        for (i, &v) in x.iter().enumerate() {
            codes[i / 2] |= oxtune_mxfp4::encode_e2m1(v * inv) << (4 * (i % 2));
        }
        let cur = &mut blocks[g * 16..(g + 1) * 16];
        if err(&codes, s - 1, x, &mut back) < err(cur, s, x, &mut back) {
            cur.copy_from_slice(&codes);
            scales[g] = s - 1;
        }
    }
    Mxfp4Tensor::new(blocks, scales, &shape)
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// f32 values → little-endian bytes of `dtype`, rejecting non-finite results.
fn encode(v: &[f32], dtype: Dtype, name: &str) -> Result<Vec<u8>> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Input(format!(
            "merged tensor {name}: element {i} is {} (the adapter overflows the weight)",
            v[i]
        )));
    }
    Ok(match dtype {
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        other => return Err(Error::Input(format!("merged tensor {name}: cannot write dtype {other:?}"))),
    })
}

/// The safetensors header for `tensors` in order, padded to 8 bytes as the format asks.
fn header(tensors: &[PlannedTensor]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut off = 0u64;
    for t in tensors {
        let end = off + t.nbytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": format!("{:?}", t.dtype), "shape": t.shape, "data_offsets": [off, end] }),
        );
        off = end;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(map)).map_err(|e| Error::Input(e.to_string()))?;
    h.resize(h.len().div_ceil(8) * 8, b' ');
    Ok(h)
}

/// Streams one safetensors file to a temporary name, fsyncs and renames it: `io::write_atomic` would
/// need the whole shard (up to 4.8 GB) in memory.
fn write_shard(path: &Path, file: &PlannedFile, merger: &mut Merger) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().expect("shard names are file names").to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = BufWriter::with_capacity(1 << 22, f);
        let h = header(&file.tensors)?;
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io_err(&tmp))?;
        w.write_all(&h).map_err(io_err(&tmp))?;
        for t in &file.tensors {
            let bytes = merger.produce(t)?;
            if bytes.len() as u64 != t.nbytes() {
                return Err(Error::Input(format!(
                    "tensor {} came out with {} bytes, expected {}",
                    t.name,
                    bytes.len(),
                    t.nbytes()
                )));
            }
            w.write_all(&bytes).map_err(io_err(&tmp))?;
        }
        let f = w.into_inner().map_err(|e| Error::Io { path: tmp.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn json_bytes(v: &serde_json::Value) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v).map_err(|e| Error::Input(e.to_string()))?;
    b.push(b'\n');
    Ok(b)
}

fn load_adapter_for(adapter: &Path, model: &Path, cfg: &GptOssConfig) -> Result<LoraAdapter> {
    LoraAdapter::load(adapter, cfg).map_err(|e| {
        let msg = match e {
            Error::Input(m) => m,
            other => other.to_string(),
        };
        Error::Input(format!("adapter {} does not fit the model {}: {msg}", adapter.display(), model.display()))
    })
}

/// Merges the PEFT adapter at `adapter` into the model at `model` and writes the result to `out`
/// (which must not exist or be empty). With `dry_run` only the plan is returned.
pub fn merge(model: &Path, adapter: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    if !model.is_dir() {
        return Err(Error::Input(format!("--model {}: no such directory", model.display())));
    }
    if !adapter.is_dir() {
        return Err(Error::Input(format!("--adapter {}: no such directory", adapter.display())));
    }
    if out.exists() && std::fs::read_dir(out).map_err(io_err(out))?.next().is_some() {
        return Err(Error::Input(format!(
            "--out {}: directory exists and is not empty; give a new directory so no stale shard is mixed in",
            out.display()
        )));
    }
    let cfg = GptOssConfig::from_dir(model)?;
    let ckpt = Checkpoint::open(model)?;
    let lora = load_adapter_for(adapter, model, &cfg)?;
    let mxfp4_base = ckpt.info("model.layers.0.mlp.experts.gate_up_proj_blocks").is_some();
    if opts.format == MergeFormat::Mxfp4 && !mxfp4_base {
        return Err(Error::Input(format!(
            "--format mxfp4 keeps the base's MXFP4 layout, but {} stores experts unquantized; use --format bf16",
            model.display()
        )));
    }
    let mut merger = Merger {
        ckpt: &ckpt,
        cfg: &cfg,
        lora: Lora::new(&lora, &cfg)?,
        format: opts.format,
        scale_mode: opts.scale_mode,
        mxfp4_base,
        pending_scales: HashMap::new(),
        quant_errors: vec![],
    };
    drop(lora);
    let files = merger.plan(opts)?;

    // config.json: bf16 drops quantization_config (transformers would otherwise expect MXFP4 tensors).
    let cfg_path = model.join("config.json");
    let cfg_text = std::fs::read(&cfg_path).map_err(io_err(&cfg_path))?;
    let config_bytes = match opts.format {
        MergeFormat::Mxfp4 => cfg_text,
        MergeFormat::Bf16 => {
            let mut v: serde_json::Value =
                serde_json::from_slice(&cfg_text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?;
            if let Some(o) = v.as_object_mut() {
                o.remove("quantization_config");
            }
            json_bytes(&v)?
        }
    };
    let sharded = opts.format == MergeFormat::Bf16 || model.join("model.safetensors.index.json").exists();
    let index = sharded.then(|| {
        let total: u64 = files.iter().map(PlannedFile::nbytes).sum();
        let map: serde_json::Map<String, serde_json::Value> = files
            .iter()
            .flat_map(|f| f.tensors.iter().map(|t| (t.name.clone(), serde_json::Value::String(f.name.clone()))))
            .collect();
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map })
    });
    let side: Vec<&str> = SIDE_FILES.iter().copied().filter(|f| model.join(f).is_file()).collect();
    let mut report = MergeReport { files, side_files: vec!["config.json".into()], quant_errors: vec![] };
    if index.is_some() {
        report.side_files.push("model.safetensors.index.json".into());
    }
    report.side_files.extend(side.iter().map(|s| s.to_string()));
    if opts.dry_run {
        return Ok(report);
    }

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    for f in &side {
        let bytes = std::fs::read(model.join(f)).map_err(io_err(model.join(f)))?;
        crate::io::write_atomic(&out.join(f), &bytes)?;
    }
    for f in &report.files {
        write_shard(&out.join(&f.name), f, &mut merger)?;
    }
    if let Some(index) = &index {
        crate::io::write_atomic(&out.join("model.safetensors.index.json"), &json_bytes(index)?)?;
    }
    crate::io::write_atomic(&out.join("config.json"), &config_bytes)?;
    report.quant_errors = merger.quant_errors;
    Ok(report)
}

/// 64-bit FNV-1a: a stable identity check for files oxtune writes, not a cryptographic hash.
/// A fingerprint of a base model: FNV-1a over config.json (parsed and re-serialized, so formatting does
/// not matter) and every tensor's name, dtype and shape, in name order. `fnv1a64:` + 16 hex digits.
pub fn base_fingerprint(model: &Path) -> Result<String> {
    let cfg_path = model.join("config.json");
    let text = std::fs::read(&cfg_path).map_err(io_err(&cfg_path))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?;
    let ckpt = Checkpoint::open(model)?;
    let mut h = fnv1a64(v.to_string().as_bytes(), FNV_OFFSET);
    for n in ckpt.names() {
        let t = ckpt.info(n).expect("listed by the checkpoint");
        h = fnv1a64(format!("\n{n} {:?} {:?}", t.dtype, t.shape).as_bytes(), h);
    }
    Ok(format!("fnv1a64:{h:016x}"))
}

/// Writes the adapter at `adapter` (checked against the model at `model`) as one safetensors file
/// with PEFT's tensor keys (F32) and `__metadata__` holding `format`, `r`, `lora_alpha`, `use_rslora`,
/// `target_modules`, `target_parameters` (JSON lists), `base_model_name_or_path` and
/// `base_model_fingerprint` ([`base_fingerprint`]). Returns the metadata.
pub fn export_adapter(model: &Path, adapter: &Path, out: &Path) -> Result<BTreeMap<String, String>> {
    if !model.is_dir() {
        return Err(Error::Input(format!("--model {}: no such directory", model.display())));
    }
    if !adapter.is_dir() {
        return Err(Error::Input(format!("--adapter {}: no such directory", adapter.display())));
    }
    let cfg = GptOssConfig::from_dir(model)?;
    let lora = load_adapter_for(adapter, model, &cfg)?;
    let config = oxtune_lora::read_adapter_config(adapter).map_err(|e| Error::Input(e.to_string()))?;
    let pc = lora.spec.adapter_config(config.base_model_name_or_path.as_deref());
    let list = |v: Vec<String>| serde_json::Value::from(v).to_string();
    let modules = match pc.target_modules {
        Some(oxtune_lora::TargetModules::List(l)) => l,
        _ => vec![],
    };
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("peft_type".into(), "LORA".into());
    meta.insert("r".into(), lora.spec.r.to_string());
    meta.insert("lora_alpha".into(), lora.spec.alpha.to_string());
    meta.insert("use_rslora".into(), lora.spec.rslora.to_string());
    meta.insert("target_modules".into(), list(modules));
    meta.insert("target_parameters".into(), list(pc.target_parameters.unwrap_or_default()));
    meta.insert("base_model_name_or_path".into(), config.base_model_name_or_path.unwrap_or_default());
    meta.insert("base_model_fingerprint".into(), base_fingerprint(model)?);
    let tensors: Vec<(String, crate::io::OwnedTensor)> =
        lora.tensors().into_iter().map(|(k, shape, v)| (k, crate::io::OwnedTensor::f32(&shape, v))).collect();
    let views = tensors
        .iter()
        .map(|(n, t)| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Input(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(meta.clone().into_iter().collect()))
        .map_err(|e| Error::Input(format!("serializing {}: {e}", out.display())))?;
    crate::io::write_atomic(out, &bytes)?;
    Ok(meta)
}
