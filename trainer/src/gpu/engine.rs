//! [`GpuEngine`]: forward, loss and backward of the whole model on the device, in the order and
//! with the rule of `grad.rs` (parameter gradients `+=`, activation gradients `=`, the residual
//! stream's gradient carried and added to).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys as cu, CudaGraph, CudaSlice, CudaView, CudaViewMut, DeviceRepr};
use half::bf16;
use oxtune_kernels::blas::Blas;
use oxtune_kernels::ops::attention::{
    self, attention_bwd_split_gpu, attention_fwd_split_gpu, split_qkv_gpu, visible_ranges, Heads,
};
use oxtune_kernels::ops::cross_entropy::cross_entropy_gpu;
use oxtune_kernels::ops::elementwise::{
    cast_f32_to_bf16_gpu, gather_rows_gpu, scatter_rows_gpu, split_f32_to_bf16x2_gpu,
};
use oxtune_kernels::ops::embedding::{embedding_gpu_bf16w, embedding_gpu_bf16w_host};
use oxtune_kernels::ops::gemm::{
    grouped_gemm_f32, grouped_gemm_f32_mxfp4w, grouped_gemm_f32_mxfp4w_lora, grouped_lora_down_f32,
    mxfp4_scratch_elems, Grouped, GroupedGemm, LoraDown, LoraUp, Mxfp4Epilogue, Mxfp4Lora, Mxfp4Weight, Strides,
};
use oxtune_kernels::ops::lowrank::{
    self, lowrank_down_cast_gpu, lowrank_down_gpu, lowrank_grad_gpu, lowrank_up_gpu, DownPart, GradPart, Layout, UpPart,
};
use oxtune_kernels::ops::rmsnorm::{rmsnorm_backward_add_gpu, rmsnorm_backward_gpu, rmsnorm_gpu};
use oxtune_kernels::ops::rope::rope_table_gpu;
use oxtune_kernels::ops::Mma;
use oxtune_kernels::pinned::PinnedBuf;
use oxtune_kernels::Gpu;
use oxtune_moe::permute::{
    add_expert_bias_gpu, combine_add_gpu, unpermute_sum_gpu, weight_grad_from_input_gpu, weighted_gather_rows_gpu,
};
use oxtune_moe::plan::{routing_plan_gpu, PlanGpu};
use oxtune_moe::router::{route_backward_gpu, topk_softmax_gpu};
use oxtune_moe::swiglu::{swiglu_backward_gpu, swiglu_gpu};
use oxtune_moe::{Proj, SwigluParams};

use super::graphs::{GraphCache, Lookup};
use super::weights::{Alloc, ExpertW, GpuLinear, GpuWeights, HostEmbed};
use super::{EngineOptions, Precision};
use crate::adapter::Dense;
use crate::config::GptOssConfig;
use crate::error::{Error, Result};
use crate::grad::TrainBatch;
use crate::lora_adapter::{LoraAdapter, SiteLayout, Target};
use crate::model::Model;
use crate::ops::loss::IGNORE_INDEX;

/// LM-head rows per chunk: bounds the logits buffer to `HEAD_CHUNK · V` floats (206 MB for gpt-oss).
const HEAD_CHUNK: usize = 256;

/// Tokens per MoE chunk with activation checkpointing: the experts' activations (about 460 KB a
/// token for gpt-oss) exist for one chunk at a time, so that long sequences fit (3.8 GB at 8192).
/// The backward pass recomputes each chunk's experts just before their backward, so chunking adds
/// no compute.
pub const MOE_CHUNK: usize = 8192;

fn v<T>(s: &CudaSlice<T>, n: usize) -> CudaView<'_, T> {
    s.slice(0..n)
}

fn vm<T>(s: &mut CudaSlice<T>, n: usize) -> CudaViewMut<'_, T> {
    s.slice_mut(0..n)
}

/// Copies `host` to the start of `dev`.
fn htod<T: DeviceRepr>(gpu: &Gpu, host: &[T], dev: &mut CudaSlice<T>) -> Result<()> {
    if host.is_empty() {
        return Ok(());
    }
    Ok(gpu.stream.memcpy_htod(host, &mut dev.slice_mut(0..host.len()))?)
}

/// Ends `stream`'s capture if one is still open, dropping what it recorded. cudarc's
/// `end_capture` can return an error stored by an earlier drop before it ends the capture; the
/// driver is called directly here.
fn abandon_capture(stream: &cudarc::driver::CudaStream) -> Result<()> {
    use cudarc::driver::result;
    // SAFETY: a live stream of the current context; a graph returned by the end of its capture is
    // destroyed at once and used by nothing else.
    unsafe {
        if result::stream::is_capturing(stream.cu_stream())? != cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        {
            let mut graph = std::ptr::null_mut();
            let _ = cu::cuStreamEndCapture(stream.cu_stream(), &mut graph);
            if !graph.is_null() {
                let _ = result::graph::destroy(graph);
            }
        }
    }
    Ok(())
}

/// The pairs at `idx` (distinct indices; `None` for a site without LoRA), borrowed together.
fn lora_pairs_mut<const N: usize>(lora: &mut [GpuLoraPair], idx: [Option<usize>; N]) -> [Option<&mut GpuLoraPair>; N] {
    let mut out = [(); N].map(|_| None);
    for (i, p) in lora.iter_mut().enumerate() {
        if let Some(k) = idx.iter().position(|&x| x == Some(i)) {
            out[k] = Some(p);
        }
    }
    out
}

/// One LoRA pair on the device, mirroring [`LoraAdapter`]'s entry of the same index.
struct GpuLoraPair {
    site: SiteLayout,
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    ga: CudaSlice<f32>,
    gb: CudaSlice<f32>,
}

/// What the backward pass needs from one layer's forward pass, sized for the token budget.
struct LayerActs {
    x_in: CudaSlice<f32>,
    a: CudaSlice<f32>,
    rstd1: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    o: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    x_mid: CudaSlice<f32>,
    bn: CudaSlice<f32>,
    rstd2: CudaSlice<f32>,
    /// The layer's routing (each chunk's expert-sorted plan is built from it on the device).
    route: Route,
    /// The experts' activations of one chunk of tokens.
    moe: MoeActs,
}

/// Every token's top-k experts and routing weights `[t, k]`, on the device.
struct Route {
    experts: CudaSlice<u32>,
    weights: CudaSlice<f32>,
}

impl Route {
    /// Room for `n` routed slots.
    fn new(al: &mut Alloc, n: usize) -> Result<Self> {
        Ok(Route { experts: al.zeros("routing", n)?, weights: al.zeros("routing", n)? })
    }

    /// Copies the first `n` slots of `src` (in stream order).
    fn copy_from(&mut self, gpu: &Gpu, src: &Route, n: usize) -> Result<()> {
        gpu.stream.memcpy_dtod(&v(&src.experts, n), &mut vm(&mut self.experts, n))?;
        gpu.stream.memcpy_dtod(&v(&src.weights, n), &mut vm(&mut self.weights, n))?;
        Ok(())
    }
}

/// The routing plan and expert activations of one chunk of a MoE layer's tokens (the whole
/// micro-batch when it fits in [`MOE_CHUNK`] tokens).
struct MoeActs {
    token: CudaSlice<u32>,
    choice: CudaSlice<u32>,
    pweight: CudaSlice<f32>,
    slot_of: CudaSlice<u32>,
    slot_expert: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    /// Slots of the current chunk (its tokens · k).
    slots: usize,
    xs: CudaSlice<f32>,
    hh: CudaSlice<f32>,
    z: CudaSlice<f32>,
    y: CudaSlice<f32>,
}

/// The expert groups of a chunk's routing plan: the offsets (on the device only) and the slot count.
struct Groups<'a> {
    offsets: CudaView<'a, u32>,
    total: usize,
}

impl Groups<'_> {
    fn of(a: &MoeActs) -> Groups<'_> {
        Groups { offsets: a.offsets.as_view(), total: a.slots }
    }
}

/// Working buffers shared by all layers.
struct Scratch {
    /// The batch's token ids (with a mapped embedding table), or `0..t`: the indices of the rows
    /// gathered on the host.
    ids: CudaSlice<u32>,
    pos: CudaSlice<u32>,
    ones: CudaSlice<f32>,
    /// Visible key / query ranges per token for full and sliding layers: klo, khi, qlo, qhi.
    ranges: [[CudaSlice<u32>; 4]; 2],
    x: CudaSlice<f32>,
    bf: CudaSlice<bf16>,
    /// The batch's rotary table `[t, head_dim / 2, 2]` (cos and sin), made by each forward pass.
    rope_cs: CudaSlice<f32>,
    /// One layer's q, k and v split into bf16 for attention, q and k rotated ([`Self::qkv_of`]).
    qkv: CudaSlice<u16>,
    router_logits: CudaSlice<f32>,
    hf: CudaSlice<f32>,
    rstd_f: CudaSlice<f32>,
    dhf: CudaSlice<f32>,
    idx: CudaSlice<u32>,
    targets: CudaSlice<i32>,
    losses: CudaSlice<f32>,
    hc: CudaSlice<f32>,
    dhc: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    dx: CudaSlice<f32>,
    db: CudaSlice<f32>,
    da: CudaSlice<f32>,
    dout: CudaSlice<f32>,
    dq: CudaSlice<f32>,
    dk: CudaSlice<f32>,
    dv: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    dys: CudaSlice<f32>,
    dweights: CudaSlice<f32>,
    dz: CudaSlice<f32>,
    dh: CudaSlice<f32>,
    dxs: CudaSlice<f32>,
    dlogits: CudaSlice<f32>,
    u: CudaSlice<f32>,
    du: CudaSlice<f32>,
    /// The experts' gate_up LoRA `u = x A_eᵀ` of the chunk last run forward: the recomputation
    /// just before a chunk's backward leaves it there for the backward.
    u_gu: CudaSlice<f32>,
    /// The attention LoRA's `u = x Aᵀ` of q, k, v and o (`[t, r]` each) from the layer last run
    /// forward: with checkpointing, the recomputation just before a layer's backward leaves them
    /// there for the backward.
    u_attn: [CudaSlice<f32>; 4],
    /// The attention LoRA's `du = s · dy B` of q, k and v (`[t, r]` each) in a layer's backward.
    du_attn: [CudaSlice<f32>; 3],
}

/// Device time per phase of the passes, when the `OXTUNE_PROFILE` environment variable is set:
/// the stream is synchronised at each phase boundary (which costs some speed) and the wall time
/// since the previous boundary is charged to the phase that just ended.
struct Profile {
    on: bool,
    last: std::time::Instant,
    totals: Vec<(&'static str, f64)>,
    routing: RoutingStats,
}

/// How the MoE layers' routing plans fill the expert kernels' row tiles, summed over every plan
/// built since the profile was reset (with `OXTUNE_PROFILE` only): the expert GEMMs decode each
/// weight tile once per tile of rows, however few rows it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoutingStats {
    /// Routing plans built (one per MoE layer and chunk, forward and recomputation).
    pub plans: usize,
    /// Expert slots (tokens times experts per token).
    pub slots: usize,
    /// Row tiles of 128 the experts' rows take (the shared-memory kernels' tile).
    pub tiles_128: usize,
    /// Row tiles of 256 the experts' rows take (the forward register-operand kernel's tile).
    pub tiles_256: usize,
    /// The most rows one expert had in one plan.
    pub max_rows: usize,
}

impl RoutingStats {
    fn add(&mut self, offsets: &[usize]) {
        self.plans += 1;
        for w in offsets.windows(2) {
            let n = w[1] - w[0];
            self.slots += n;
            self.tiles_128 += n.div_ceil(128);
            self.tiles_256 += n.div_ceil(256);
            self.max_rows = self.max_rows.max(n);
        }
    }
}

impl Profile {
    fn mark(&mut self, gpu: &Gpu, phase: &'static str) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        gpu.stream.synchronize()?;
        let dt = self.last.elapsed().as_secs_f64();
        self.last = std::time::Instant::now();
        match self.totals.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, t)) => *t += dt,
            None => self.totals.push((phase, dt)),
        }
        Ok(())
    }
}

/// The model, its LoRA adapter and its buffers on one GPU.
pub struct GpuEngine {
    pub gpu: Arc<Gpu>,
    blas: Blas,
    cfg: GptOssConfig,
    w: GpuWeights,
    lora: Vec<GpuLoraPair>,
    lora_at: HashMap<(usize, Target), usize>,
    /// Per-layer sink gradients `[L][nq]` (accumulated).
    dsinks: Vec<CudaSlice<f32>>,
    /// Saved activations: one set per layer, or with checkpointing one set that each layer's
    /// recomputation fills just before its backward pass.
    acts: Vec<LayerActs>,
    /// With checkpointing: each layer's input `[t, H]`, the only activation kept per layer, on
    /// the device or (offloaded) in page-locked host memory.
    layer_inputs: Vec<CudaSlice<f32>>,
    /// With checkpointing, each layer's routing from the forward pass: the recomputation before
    /// the layer's backward reuses it (the router would give the same bits: every kernel is
    /// deterministic) instead of running the router again.
    routes: Vec<Route>,
    host_inputs: Vec<PinnedBuf<f32>>,
    checkpointing: bool,
    /// Tensor-core products split their f32 activations into bf16 halves ([`Precision::Exact`]).
    split: bool,
    /// The loaded batch's embedding rows `[t, H]`, gathered from a pageable host table (a buffer
    /// reused from batch to batch; unused with a mapped table).
    host_rows: Vec<bf16>,
    /// Tokens per MoE chunk ([`MOE_CHUNK`] at most with checkpointing).
    moe_chunk: usize,
    s: Scratch,
    /// Tokens of the largest micro-batch the buffers hold.
    pub max_tokens: usize,
    /// Bytes allocated on the device.
    pub bytes: usize,
    rope_scaling: f32,
    /// Whose q, k and v `s.qkv` holds split: (layer, tokens) of the loaded batch. The layer's
    /// backward reuses the split its forward (or recomputation) just made.
    qkv_of: Option<(usize, usize)>,
    swiglu: SwigluParams,
    /// Testing hook (`OXTUNE_FAULT_AT_STEP=N`): the N-th forward-backward (1-based) provokes a
    /// sticky CUDA error, to test that a run survives a GPU fault.
    fault_at: Option<u64>,
    passes: u64,
    /// The gradient norm and clipping; its device buffers (a table row per tensor and a partial
    /// sum per 32,768 gradients: ~30 KB for gpt-oss-20b) come with the first step, outside the
    /// engine's allocation count.
    grad_clip: oxtune_optim::cuda::GradClip,
    /// Zeroes the gradients (every LoRA tensor and every layer's sinks) in one launch: a table of
    /// its own, so that neither it nor the clipping's (without the sinks unless they train) is
    /// uploaded again each step.
    grad_zero: oxtune_optim::cuda::GradClip,
    prof: Profile,
    /// The training passes' CUDA graphs by micro-batch size ([`EngineOptions::cuda_graphs`]).
    graphs: GraphCache<PassGraphs>,
    /// Why the passes run without CUDA graphs: not asked for, a mode that synchronises with the
    /// host inside a pass, or a capture that failed (after which every pass runs eagerly).
    graphs_off: Option<String>,
}

/// The CUDA graphs of one micro-batch size's training pass: the layers forward (embedding
/// included) and the layers backward (each layer's recomputation included); the LM head and
/// loss run between them as usual, since the positions they score change from batch to batch.
struct PassGraphs {
    forward: CudaGraph,
    backward: CudaGraph,
    /// [`Gpu::scratch_generation`] when they were captured: they name the scratch's address.
    scratch_gen: u64,
}

/// Micro-batch sizes whose graphs the engine keeps (a benchmark or fixed-size data has one).
const GRAPHED_SIZES: usize = 4;

/// Which copies of the residual stream a layer's forward makes for its backward
/// ([`GpuEngine::layer_forward`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inputs {
    /// Its input and middle, in the layer's activation set (training without checkpointing, and
    /// the last layer with it, whose backward follows without a recomputation).
    Keep,
    /// Neither: nothing reads them (evaluation, and checkpointed layers, which are recomputed).
    Drop,
    /// The recomputation before a checkpointed layer's backward (no experts): the input only when
    /// offloaded (else the backward reads the checkpoint), never the middle (left in `s.x`).
    Recompute,
}

/// Bytes of the activations and scratch for `t` tokens (what [`GpuEngine::new`] allocates besides
/// weights and LoRA), to check against free memory first.
/// `moe_chunk`: tokens per MoE chunk ([`MOE_CHUNK`] by default; only with checkpointing);
/// `offload`: the layer inputs live in host memory.
pub fn activation_bytes(
    cfg: &GptOssConfig,
    t: usize,
    max_rank: usize,
    checkpointing: bool,
    moe_chunk: usize,
    offload: bool,
    precision: Precision,
) -> usize {
    let qkv = attention::qkv_split_elems(heads_of(cfg), t, t, mma_of(precision == Precision::Exact));
    2 * (staging_elems(cfg, t, checkpointing, moe_chunk, precision) + qkv)
        + activation_f32s(cfg, t, max_rank, checkpointing, moe_chunk, offload)
}

/// u16 elements of the GPU's shared scratch ([`Gpu::reserve_scratch`]: the bf16 splits of the
/// operands, and the expert LoRA's partial sums beside them) that the largest op of a step takes:
/// attention's backward over `t` tokens or fewer (its dK/dV partials can take more below `t`), an
/// expert product over one MoE chunk (reduction length up to 2 · intermediate, in the backward),
/// or the dense LoRA's split low-rank reductions over `t` tokens or fewer.
fn staging_elems(cfg: &GptOssConfig, t: usize, checkpointing: bool, moe_chunk: usize, precision: Precision) -> usize {
    let (mma, heads) = (mma_of(precision == Precision::Exact), heads_of(cfg));
    let slots = chunk_tokens(t, checkpointing, moe_chunk) * cfg.num_experts_per_tok;
    let k = cfg.hidden_size.max(2 * cfg.intermediate_size);
    // The dense LoRA's low-rank products read inputs and gradients of these widths.
    let lowrank = [cfg.hidden_size, cfg.q_width(), cfg.kv_width()].map(|w| lowrank::scratch_elems_up_to(t, w, w));
    let lowrank = lowrank.into_iter().max().unwrap_or(0);
    attention::split_backward_scratch_elems_up_to(heads, t, mma).max(mxfp4_scratch_elems(slots, k, mma)).max(lowrank)
}

/// Splits the q, k and v of activation set `a` into `qkv` (`s.qkv`) for attention, q and k rotated
/// with the batch's table `rope_cs` (the caller records whose they are in `qkv_of`).
fn split_layer_qkv(
    gpu: &Gpu,
    cfg: &GptOssConfig,
    rope_cs: &CudaSlice<f32>,
    qkv: &mut CudaSlice<u16>,
    a: &LayerActs,
    t: usize,
    mma: Mma,
) -> Result<()> {
    let (heads, qw, kw) = (heads_of(cfg), cfg.q_width(), cfg.kv_width());
    let (cs, qkv) = (v(rope_cs, t * cfg.head_dim), &mut vm(qkv, attention::qkv_split_elems(heads, t, t, mma)));
    Ok(split_qkv_gpu(gpu, &v(&a.q, t * qw), &v(&a.k, t * kw), &v(&a.v, t * kw), Some(&cs), heads, mma, qkv)?)
}

fn heads_of(cfg: &GptOssConfig) -> Heads {
    Heads { nq: cfg.num_attention_heads, nkv: cfg.num_key_value_heads, d: cfg.head_dim }
}

/// The tensor-core products' mode: operands split into bf16 halves ([`Precision::Exact`]) or not.
fn mma_of(split: bool) -> Mma {
    if split {
        Mma::Split
    } else {
        Mma::Bf16
    }
}

/// Bytes of the f32 (and u32) buffers of [`activation_bytes`]: all but the shared scratch and the
/// split q, k and v.
fn activation_f32s(
    cfg: &GptOssConfig,
    t: usize,
    max_rank: usize,
    checkpointing: bool,
    moe_chunk: usize,
    offload: bool,
) -> usize {
    let (h, qw, kw, nq) = (cfg.hidden_size, cfg.q_width(), cfg.kv_width(), cfg.num_attention_heads);
    let (e, k, i) = (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size);
    let sc = chunk_tokens(t, checkpointing, moe_chunk) * k; // expert slots of one MoE chunk
    let moe = sc * (5 + h + 2 * i + i + h) + e + 1;
    let per_layer = t * (4 * h + 2 * qw + 2 * kw + nq + 2) + t * k * 2 + moe;
    let chunk = HEAD_CHUNK.min(t.max(1));
    let scratch = t * (10 + 2 + 8) // ids, pos, ones, ranges, idx, targets, losses
        + t * h * 6 // x, hf, dhf, dx, db, da
        + t * cfg.head_dim // the rotary table
        + t * (2 * qw + 2 * kw + nq + k + 2 * e)
        + chunk * (2 * h + cfg.vocab_size)
        + sc * (2 * h + 3 * i)
        + 2 * sc.max(t) * max_rank // u, du
        + sc * max_rank // u_gu
        + 4 * t * max_rank // u_attn
        + 3 * t * max_rank; // du_attn
    let bf = (t * h.max(qw)).max(chunk * cfg.vocab_size); // two bf16 halves = one f32
    let layers = cfg.num_hidden_layers;
    // With checkpointing, the inputs and routing of every layer but the last (never recomputed).
    let inputs = if offload { 0 } else { layers.saturating_sub(1) * t * cfg.hidden_size };
    let routes = if checkpointing { layers.saturating_sub(1) * t * k * 2 } else { 0 };
    let saved = if checkpointing { per_layer + inputs + routes } else { per_layer * layers };
    4 * (saved + scratch + bf)
}

/// Tokens per MoE chunk for micro-batches of `t` tokens (without checkpointing every layer keeps
/// its experts' activations for the backward pass: one chunk).
fn chunk_tokens(t: usize, checkpointing: bool, moe_chunk: usize) -> usize {
    if checkpointing {
        t.clamp(1, moe_chunk.max(1))
    } else {
        t.max(1)
    }
}

impl GpuEngine {
    /// Uploads `model` and `adapter` to `gpu` and allocates buffers for micro-batches of up to
    /// `max_tokens` tokens, with activation checkpointing.
    pub fn new(gpu: Arc<Gpu>, model: &Model, adapter: &LoraAdapter, max_tokens: usize) -> Result<Self> {
        Self::with_checkpointing(gpu, model, adapter, max_tokens, true)
    }

    /// As [`GpuEngine::new`]; with `checkpointing` the forward pass keeps only each layer's input
    /// and the backward pass recomputes the layer first (one more forward pass of compute for the
    /// activations of one layer instead of all; the last layer's are still there from the forward
    /// pass), without it every layer's activations are kept.
    pub fn with_checkpointing(
        gpu: Arc<Gpu>,
        model: &Model,
        adapter: &LoraAdapter,
        max_tokens: usize,
        checkpointing: bool,
    ) -> Result<Self> {
        Self::with_options(gpu, model, adapter, max_tokens, EngineOptions { checkpointing, ..Default::default() })
    }

    /// As [`GpuEngine::new`] with every option (tests use small MoE chunks to cover the chunked
    /// path on tiny models).
    pub fn with_options(
        gpu: Arc<Gpu>,
        model: &Model,
        adapter: &LoraAdapter,
        max_tokens: usize,
        opts: EngineOptions,
    ) -> Result<Self> {
        let EngineOptions {
            checkpointing,
            moe_chunk,
            precision,
            offload_checkpoints,
            pageable_embeddings,
            cuda_graphs,
        } = opts;
        if offload_checkpoints && !checkpointing {
            return Err(Error::Input(
                "offloading the activation checkpoints to host memory needs activation checkpointing (drop \
                 --no-activation-checkpointing or --offload-checkpoints)"
                    .into(),
            ));
        }
        let offload = checkpointing && offload_checkpoints;
        let cfg = model.cfg.clone();
        let t = max_tokens.max(1);
        let layout = adapter.layout();
        let max_rank = layout.iter().map(|s| s.rank).max().unwrap_or(1);
        let weight_bytes = GpuWeights::bytes_for(model);
        let lora_bytes = 4 * 2 * adapter.num_params(); // values and gradients
        let staged = staging_elems(&cfg, t, checkpointing, moe_chunk, precision);
        // The GPU's shared scratch may already hold memory (an earlier engine's): that much of the
        // reservation needs no free memory.
        let activations = activation_bytes(&cfg, t, max_rank, checkpointing, moe_chunk, offload, precision)
            - 2 * staged.min(gpu.scratch_elems());
        let need = weight_bytes + lora_bytes + oxtune_kernels::blas::WORKSPACE_BYTES + activations;
        let (free, total) = gpu.ctx.mem_get_info().map_err(|e| Error::Gpu(format!("cuMemGetInfo: {e:?}")))?;
        if need > free {
            return Err(super::oom_advice(
                &format!(
                    "training with micro-batches of {t} tokens ({:.2} GiB weights, {:.2} GiB LoRA and gradients, {:.2} GiB activations)",
                    weight_bytes as f64 / super::GIB,
                    lora_bytes as f64 / super::GIB,
                    activations as f64 / super::GIB
                ),
                need,
                free,
                total,
            ));
        }
        let blas = Blas::new(&gpu)?;
        // The cuBLAS handle's workspace counts as the engine's.
        let mut al = Alloc { gpu: &gpu, bytes: oxtune_kernels::blas::WORKSPACE_BYTES };
        // The attention and expert kernels stage their operands in the GPU's shared scratch: sized
        // here for the largest op of a step, so that a step allocates nothing.
        al.scratch(staged)?;
        let w = GpuWeights::upload(&mut al, model, pageable_embeddings)?;
        let mut lora = Vec::with_capacity(layout.len());
        let mut lora_at = HashMap::new();
        let tensors = adapter.tensors();
        for (i, site) in layout.iter().enumerate() {
            let (a, b) = (tensors[2 * i].2, tensors[2 * i + 1].2);
            lora_at.insert((site.layer, site.target), i);
            lora.push(GpuLoraPair {
                site: *site,
                a: al.upload("LoRA A", a)?,
                b: al.upload("LoRA B", b)?,
                ga: al.zeros("LoRA A gradient", a.len())?,
                gb: al.zeros("LoRA B gradient", b.len())?,
            });
        }
        let nq = cfg.num_attention_heads;
        let dsinks = (0..cfg.num_hidden_layers).map(|_| al.zeros("sink gradients", nq)).collect::<Result<_>>()?;
        let (h, qw, kw) = (cfg.hidden_size, cfg.q_width(), cfg.kv_width());
        let (e, k, i2) = (cfg.num_local_experts, cfg.num_experts_per_tok, 2 * cfg.intermediate_size);
        let tc = chunk_tokens(t, checkpointing, moe_chunk);
        let sc = tc * k;
        let mut acts = Vec::with_capacity(cfg.num_hidden_layers);
        let sets = if checkpointing { 1 } else { cfg.num_hidden_layers };
        // Checkpoints of every layer but the last, which the backward pass does not recompute.
        let recomputed = cfg.num_hidden_layers.saturating_sub(1);
        let layer_inputs = (0..if checkpointing && !offload { recomputed } else { 0 })
            .map(|_| al.zeros("layer inputs (checkpoints)", t * cfg.hidden_size))
            .collect::<Result<Vec<_>>>()?;
        let routes = (0..if checkpointing { recomputed } else { 0 })
            .map(|_| Route::new(&mut al, t * k))
            .collect::<Result<Vec<_>>>()?;
        let host_inputs = (0..if offload { recomputed } else { 0 })
            .map(|_| PinnedBuf::new(&gpu, t * cfg.hidden_size).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?;
        for _ in 0..sets {
            let route = Route::new(&mut al, t * k)?;
            let mut z = |n: usize| al.zeros::<f32>("saved activations", n);
            let (x_in, a, rstd1, q, kk, vv, o, lse) =
                (z(t * h)?, z(t * h)?, z(t)?, z(t * qw)?, z(t * kw)?, z(t * kw)?, z(t * qw)?, z(t * nq)?);
            let (x_mid, bn, rstd2, pweight) = (z(t * h)?, z(t * h)?, z(t)?, z(sc)?);
            let (xs, hh, zz, y) = (z(sc * h)?, z(sc * i2)?, z(sc * i2 / 2)?, z(sc * h)?);
            let mut zu = |n: usize| al.zeros::<u32>("routing plan", n);
            acts.push(LayerActs {
                x_in,
                a,
                rstd1,
                q,
                k: kk,
                v: vv,
                o,
                lse,
                x_mid,
                bn,
                rstd2,
                route,
                moe: MoeActs {
                    token: zu(sc)?,
                    choice: zu(sc)?,
                    pweight,
                    slot_of: zu(sc)?,
                    slot_expert: zu(sc)?,
                    offsets: zu(e + 1)?,
                    slots: 0,
                    xs,
                    hh,
                    z: zz,
                    y,
                },
            });
        }
        let chunk = HEAD_CHUNK.min(t);
        let mut zr = || -> Result<[CudaSlice<u32>; 4]> {
            Ok([al.zeros("ranges", t)?, al.zeros("ranges", t)?, al.zeros("ranges", t)?, al.zeros("ranges", t)?])
        };
        let ranges = [zr()?, zr()?];
        let bf_len = 2 * (t * h.max(qw)).max(chunk * cfg.vocab_size);
        let (heads, mma) = (heads_of(&cfg), mma_of(precision == Precision::Exact));
        let s_ = Scratch {
            ids: al.upload("token ids", &(0..t as u32).collect::<Vec<_>>())?,
            pos: al.zeros("positions", t)?,
            ones: al.upload("ones", &vec![1.0f32; t])?,
            ranges,
            x: al.zeros("residual", t * h)?,
            bf: al.zeros("bf16 scratch", bf_len)?,
            rope_cs: al.zeros("rotary table", t * cfg.head_dim)?,
            qkv: al.zeros("attention operands", attention::qkv_split_elems(heads, t, t, mma))?,
            router_logits: al.zeros("router logits", t * e)?,
            hf: al.zeros("final hidden", t * h)?,
            rstd_f: al.zeros("final norm", t)?,
            dhf: al.zeros("scratch", t * h)?,
            idx: al.zeros("loss positions", t)?,
            targets: al.zeros("targets", t)?,
            losses: al.zeros("losses", t)?,
            hc: al.zeros("head chunk", chunk * h)?,
            dhc: al.zeros("head chunk gradient", chunk * h)?,
            logits: al.zeros("logits chunk", chunk * cfg.vocab_size)?,
            dx: al.zeros("scratch", t * h)?,
            db: al.zeros("scratch", t * h)?,
            da: al.zeros("scratch", t * h)?,
            dout: al.zeros("scratch", t * qw)?,
            dq: al.zeros("scratch", t * qw)?,
            dk: al.zeros("scratch", t * kw)?,
            dv: al.zeros("scratch", t * kw)?,
            delta: al.zeros("scratch", t * nq)?,
            dys: al.zeros("scratch", sc * h)?,
            dweights: al.zeros("scratch", t * k)?,
            dz: al.zeros("scratch", sc * i2 / 2)?,
            dh: al.zeros("scratch", sc * i2)?,
            dxs: al.zeros("scratch", sc * h)?,
            dlogits: al.zeros("scratch", t * e)?,
            u: al.zeros("LoRA scratch", sc.max(t) * max_rank)?,
            du: al.zeros("LoRA scratch", sc.max(t) * max_rank)?,
            u_gu: al.zeros("LoRA scratch", sc * max_rank)?,
            u_attn: [
                al.zeros("LoRA scratch", t * max_rank)?,
                al.zeros("LoRA scratch", t * max_rank)?,
                al.zeros("LoRA scratch", t * max_rank)?,
                al.zeros("LoRA scratch", t * max_rank)?,
            ],
            du_attn: [
                al.zeros("LoRA scratch", t * max_rank)?,
                al.zeros("LoRA scratch", t * max_rank)?,
                al.zeros("LoRA scratch", t * max_rank)?,
            ],
        };
        let bytes = al.bytes;
        let prof_on = std::env::var_os("OXTUNE_PROFILE").is_some();
        let fault_at = std::env::var("OXTUNE_FAULT_AT_STEP").ok().and_then(|v| v.parse().ok());
        let graphs_off = if !cuda_graphs {
            Some("turned off (--no-cuda-graphs)".to_string())
        } else if offload {
            Some("the offloaded checkpoints wait for their copies inside a pass".to_string())
        } else if prof_on {
            Some("OXTUNE_PROFILE synchronises inside a pass".to_string())
        } else if fault_at.is_some() {
            Some("OXTUNE_FAULT_AT_STEP injects a fault between launches".to_string())
        } else {
            None
        };
        Ok(Self {
            blas,
            rope_scaling: model.rope.attention_scaling,
            qkv_of: None,
            swiglu: model.swiglu(),
            cfg,
            w,
            lora,
            lora_at,
            dsinks,
            acts,
            layer_inputs,
            routes,
            host_inputs,
            checkpointing,
            moe_chunk: tc,
            split: precision == Precision::Exact,
            host_rows: vec![],
            s: s_,
            max_tokens: t,
            bytes,
            gpu,
            fault_at,
            passes: 0,
            grad_clip: oxtune_optim::cuda::GradClip::new(),
            grad_zero: oxtune_optim::cuda::GradClip::new(),
            graphs: GraphCache::new(GRAPHED_SIZES),
            graphs_off,
            prof: Profile {
                on: prof_on,
                last: std::time::Instant::now(),
                totals: vec![],
                routing: RoutingStats::default(),
            },
        })
    }

    fn sync(&self) -> Result<()> {
        Ok(self.gpu.stream.synchronize()?)
    }

    fn dtoh<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        if n > 0 {
            self.gpu.stream.memcpy_dtoh(&dev.slice(0..n), &mut out)?;
        }
        Ok(out)
    }

    // ---- parameters ------------------------------------------------------------------------

    /// Zeroes the LoRA and sink gradients.
    pub fn zero_grads(&mut self) -> Result<()> {
        // One launch for all of them (a gpt-oss adapter has ~300 tensors: a memset each cost more
        // in launches than in writing).
        let gpu = self.gpu.clone();
        let mut grads: Vec<CudaViewMut<f32>> = vec![];
        for p in &mut self.lora {
            grads.push(p.ga.as_view_mut());
            grads.push(p.gb.as_view_mut());
        }
        grads.extend(self.dsinks.iter_mut().map(|d| d.as_view_mut()));
        self.grad_zero.zero(&gpu, &mut grads)?;
        Ok(())
    }

    /// Copies the accumulated gradients into the adapter's gradient buffers (and `sinks`).
    pub fn download_grads(&self, adapter: &mut LoraAdapter, sinks: Option<&mut [Vec<f32>]>) -> Result<()> {
        let stream = &self.gpu.stream;
        let mut grads = adapter.grads();
        for (i, p) in self.lora.iter().enumerate() {
            stream.memcpy_dtoh(&p.ga, &mut *grads[2 * i].2)?;
            stream.memcpy_dtoh(&p.gb, &mut *grads[2 * i + 1].2)?;
        }
        if let Some(s) = sinks {
            for (d, h) in self.dsinks.iter().zip(s.iter_mut()) {
                stream.memcpy_dtoh(d, h.as_mut_slice())?;
            }
        }
        self.sync()
    }

    /// The trainable tensors on the device with their gradients, in the order of
    /// [`LoraAdapter::tensors`] (A then B of each pair), then every layer's sinks when `sinks`.
    pub fn trainables(&mut self, sinks: bool) -> Vec<(&mut CudaSlice<f32>, &CudaSlice<f32>)> {
        let mut v: Vec<(&mut CudaSlice<f32>, &CudaSlice<f32>)> = vec![];
        for p in &mut self.lora {
            v.push((&mut p.a, &p.ga));
            v.push((&mut p.b, &p.gb));
        }
        if sinks {
            v.extend(self.w.layers.iter_mut().map(|l| &mut l.sinks).zip(&self.dsinks));
        }
        v
    }

    /// Clips the gradients of [`GpuEngine::trainables`] to `max_norm` (as `clip_grad_norm_`) and
    /// returns their global norm before clipping (non-finite when any gradient is). The norm is
    /// summed in a fixed order: the same bits on every run.
    pub fn clip_grads(&mut self, sinks: bool, max_norm: f32) -> Result<f32> {
        let gpu = self.gpu.clone();
        let mut grads: Vec<CudaViewMut<f32>> = vec![];
        for p in &mut self.lora {
            grads.push(p.ga.as_view_mut());
            grads.push(p.gb.as_view_mut());
        }
        if sinks {
            grads.extend(self.dsinks.iter_mut().map(|d| d.as_view_mut()));
        }
        let views: Vec<CudaView<f32>> = grads.iter().map(|g| g.as_view()).collect();
        let norm = self.grad_clip.norm(&gpu, &views)?;
        drop(views);
        if norm.is_finite() {
            let coef = oxtune_optim::clip_coef(norm, max_norm);
            if coef != 1.0 {
                self.grad_clip.scale(&gpu, &mut grads, coef)?;
            }
        }
        Ok(norm)
    }

    /// Why the embedding table is in pageable host memory (each batch's rows then gathered by the
    /// host and uploaded) instead of mapped page-locked memory read by the embedding kernel; `None`
    /// when it is mapped.
    pub fn embeddings_pageable(&self) -> Option<&str> {
        self.w.embed_pageable.as_deref()
    }

    /// Decoder layers of the model.
    pub fn layers(&self) -> usize {
        self.w.layers.len()
    }

    /// The adapter's values (in [`LoraAdapter::tensors`] order) and, with `sinks`, every layer's
    /// sinks, as device views: what a host copy of a step holds.
    pub fn param_views(&self, sinks: bool) -> Vec<CudaView<'_, f32>> {
        let mut out = Vec::with_capacity(2 * self.lora.len() + self.w.layers.len());
        for p in &self.lora {
            out.push(p.a.as_view());
            out.push(p.b.as_view());
        }
        if sinks {
            out.extend(self.w.layers.iter().map(|l| l.sinks.as_view()));
        }
        out
    }

    // ---- building blocks ---------------------------------------------------------------------

    /// `c [m, n] = x [m, k] · op(W) + beta · c` for f32 activations and bf16 weights. `x` is split
    /// into two bf16 halves (`x = hi + lo` to about 2^-17) and each goes through a bf16 tensor-core
    /// GEMM with f32 accumulation: with bf16 weights (what checkpoints hold) this is about as exact
    /// as an f32 GEMM, for twice the bf16 work.
    #[allow(clippy::too_many_arguments)]
    fn gemm_xw(
        blas: &Blas,
        gpu: &Gpu,
        bf: &mut CudaSlice<bf16>,
        m: usize,
        n: usize,
        k: usize,
        x: &CudaView<f32>,
        w: &CudaView<bf16>,
        trans_w: bool,
        c: &mut CudaViewMut<f32>,
        beta: f32,
        split: bool,
    ) -> Result<()> {
        Self::split_x(gpu, bf, x, m * k, split)?;
        Self::gemm_split(blas, bf, m, n, k, w, trans_w, c, beta, split)
    }

    /// Writes `x` (`len` values) into `bf` as [`Self::gemm_split`] reads it: its bf16 halves hi then
    /// lo (`split`), or x rounded to bf16 once (Precision::Bf16).
    fn split_x(gpu: &Gpu, bf: &mut CudaSlice<bf16>, x: &CudaView<f32>, len: usize, split: bool) -> Result<()> {
        Self::bf16_halves(bf, len, split, |hi, lo| {
            match lo {
                Some(lo) => split_f32_to_bf16x2_gpu(gpu, x, hi, lo)?,
                None => cast_f32_to_bf16_gpu(gpu, x, hi)?,
            }
            Ok(())
        })
    }

    /// Runs `write(hi, lo)` on the parts of `bf` that [`Self::gemm_split`] reads for an operand of
    /// `len` values: `hi = bf[..len]`, and with `split` `lo = bf[len..2 len]`.
    fn bf16_halves(
        bf: &mut CudaSlice<bf16>,
        len: usize,
        split: bool,
        write: impl FnOnce(&mut CudaViewMut<bf16>, Option<&mut CudaViewMut<bf16>>) -> Result<()>,
    ) -> Result<()> {
        if !split {
            return write(&mut bf.slice_mut(0..len), None);
        }
        let mut buf = bf.slice_mut(0..2 * len);
        let (mut hi, mut lo) = buf.split_at_mut(len);
        write(&mut hi, Some(&mut lo))
    }

    /// [`Self::gemm_xw`] on an `x` already written into `bf` by [`Self::split_x`].
    #[allow(clippy::too_many_arguments)]
    fn gemm_split(
        blas: &Blas,
        bf: &CudaSlice<bf16>,
        m: usize,
        n: usize,
        k: usize,
        w: &CudaView<bf16>,
        trans_w: bool,
        c: &mut CudaViewMut<f32>,
        beta: f32,
        split: bool,
    ) -> Result<()> {
        let len = m * k;
        blas.matmul_bf16(m, n, k, &bf.slice(0..len), false, w, trans_w, c, 1.0, beta)?;
        if split {
            blas.matmul_bf16(m, n, k, &bf.slice(len..2 * len), false, w, trans_w, c, 1.0, 1.0)?;
        }
        Ok(())
    }

    /// `y [t, out] (= or +=) x [t, in] · Wᵀ + b + s · u Bᵀ` with `x` already written into `bf` by
    /// [`Self::split_x`] (one split serves the q, k and v projections of the same input) and, for a
    /// projection with LoRA, `u = x Aᵀ` already in `u` ([`Self::lora_dense_down`]): the bias and the
    /// LoRA term in one pass over `y`, then the product added to them.
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd_split(
        blas: &Blas,
        gpu: &Gpu,
        bf: &CudaSlice<bf16>,
        lin: &GpuLinear,
        lora: Option<(&GpuLoraPair, &CudaSlice<f32>)>,
        t: usize,
        y: &mut CudaViewMut<f32>,
        accumulate: bool,
        split: bool,
    ) -> Result<()> {
        let up: Vec<UpPart> = lora
            .map(|(p, u)| UpPart {
                factor: p.b.as_view(),
                rows: v(u, t * p.site.rank),
                layout: Layout::cols_major(p.site.rank, p.site.scaling),
            })
            .into_iter()
            .collect();
        lowrank_up_gpu(gpu, y, t, lin.n_out, accumulate, Some(&lin.b.as_view()), &up)?;
        Self::gemm_split(blas, bf, t, lin.n_out, lin.n_in, &lin.w.as_view(), true, y, 1.0, split)
    }

    /// `dx [t, in] (= or +=) dy [t, out] · W`, with `lora` (the projection's pair, its `u` and
    /// the `du` to write) first the output side of its LoRA's backward, whose pass over `dy`
    /// ([`Self::lora_dense_bwd_out`]) also writes `dy` into `bf` for the product.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        blas: &Blas,
        gpu: &Gpu,
        bf: &mut CudaSlice<bf16>,
        lin: &GpuLinear,
        lora: Option<(&mut GpuLoraPair, &CudaSlice<f32>, &mut CudaSlice<f32>)>,
        dy: &CudaView<f32>,
        t: usize,
        dx: &mut CudaViewMut<f32>,
        accumulate: bool,
        split: bool,
    ) -> Result<()> {
        match lora {
            Some((p, u, du)) => Self::lora_dense_bwd_out(gpu, p, u, dy, t, du, bf, split)?,
            None => Self::split_x(gpu, bf, dy, t * lin.n_out, split)?,
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        Self::gemm_split(blas, bf, t, lin.n_in, lin.n_out, &lin.w.as_view(), false, dx, beta, split)
    }

    /// `u = x Aᵀ` (`[t, r]`) of dense LoRA pairs sharing the input `x [t, in]`, in one pass over it
    /// when their ranks sum to at most 32.
    fn lora_dense_down(
        gpu: &Gpu,
        x: &CudaView<f32>,
        t: usize,
        pairs: Vec<(&GpuLoraPair, &mut CudaSlice<f32>)>,
    ) -> Result<()> {
        let Some(n_in) = pairs.first().map(|(p, _)| p.site.n_in) else { return Ok(()) };
        lowrank_down_gpu(gpu, x, t, n_in, &mut Self::dense_down_parts(pairs, t, n_in))?;
        Ok(())
    }

    /// [`Self::lora_dense_down`] of `x [t, k]` with [`Self::split_x`] of it into `bf` in the same
    /// pass over `x` ([`lowrank_down_cast_gpu`]); without pairs, the split alone.
    #[allow(clippy::too_many_arguments)]
    fn lora_dense_down_split(
        gpu: &Gpu,
        bf: &mut CudaSlice<bf16>,
        x: &CudaView<f32>,
        t: usize,
        k: usize,
        pairs: Vec<(&GpuLoraPair, &mut CudaSlice<f32>)>,
        split: bool,
    ) -> Result<()> {
        Self::down_split(gpu, bf, x, t, k, &mut Self::dense_down_parts(pairs, t, k), split)
    }

    /// The down-projection parts `u = x Aᵀ` of dense LoRA pairs with inputs of `n_in` values.
    fn dense_down_parts<'a>(
        pairs: Vec<(&'a GpuLoraPair, &'a mut CudaSlice<f32>)>,
        t: usize,
        n_in: usize,
    ) -> Vec<DownPart<'a>> {
        pairs
            .into_iter()
            .map(|(p, u)| DownPart {
                factor: p.a.as_view(),
                rows: vm(u, t * p.site.rank),
                layout: Layout::rows_major(p.site.rank, n_in, 1.0),
            })
            .collect()
    }

    /// `parts`' down-projections of `x [t, k]` with `x` written into `bf` as [`Self::split_x`]
    /// writes it, in one pass over `x`; without parts, [`Self::split_x`] alone.
    fn down_split(
        gpu: &Gpu,
        bf: &mut CudaSlice<bf16>,
        x: &CudaView<f32>,
        t: usize,
        k: usize,
        parts: &mut [DownPart],
        split: bool,
    ) -> Result<()> {
        if parts.is_empty() {
            return Self::split_x(gpu, bf, x, t * k, split);
        }
        Self::bf16_halves(bf, t * k, split, |hi, lo| Ok(lowrank_down_cast_gpu(gpu, x, t, k, parts, hi, lo)?))
    }

    /// The output side of a dense LoRA pair's backward for the gradient `dy [t, out]` of its
    /// output: `∂B += s · dyᵀ u` and `du = s · dy B` (`[t, r]`), one pass over `dy` each; the
    /// second also writes `dy` into `bf` as [`Self::split_x`] does, for the projection's input
    /// gradient ([`Self::gemm_split`]).
    #[allow(clippy::too_many_arguments)]
    fn lora_dense_bwd_out(
        gpu: &Gpu,
        p: &mut GpuLoraPair,
        u: &CudaSlice<f32>,
        dy: &CudaView<f32>,
        t: usize,
        du: &mut CudaSlice<f32>,
        bf: &mut CudaSlice<bf16>,
        split: bool,
    ) -> Result<()> {
        let SiteLayout { n_out, rank: r, scaling, .. } = p.site;
        let layout = Layout::cols_major(r, scaling);
        lowrank_grad_gpu(gpu, dy, t, n_out, &mut [GradPart { factor: p.gb.as_view_mut(), rows: v(u, t * r), layout }])?;
        let mut down = [DownPart { factor: p.b.as_view(), rows: vm(du, t * r), layout }];
        Self::down_split(gpu, bf, dy, t, n_out, &mut down, split)
    }

    /// The input side of the backward of dense LoRA pairs sharing the input `x [t, in]`, from each
    /// one's `du` ([`Self::lora_dense_bwd_out`]): `∂A += duᵀ x` and `dx += Σ du A`, one pass over
    /// `x` and one over `dx` when the ranks sum to at most 32 (else a launch per 32 columns).
    fn lora_dense_bwd_in(
        gpu: &Gpu,
        pairs: Vec<(&mut GpuLoraPair, &CudaSlice<f32>)>,
        x: &CudaView<f32>,
        t: usize,
        dx: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let Some(n_in) = pairs.first().map(|(p, _)| p.site.n_in) else { return Ok(()) };
        let mut up = Vec::with_capacity(pairs.len());
        let mut grads = Vec::with_capacity(pairs.len());
        for (p, du) in pairs {
            let GpuLoraPair { site, a, ga, .. } = p;
            let layout = Layout::rows_major(site.rank, n_in, 1.0);
            up.push(UpPart { factor: a.as_view(), rows: v(du, t * site.rank), layout });
            grads.push(GradPart { factor: ga.as_view_mut(), rows: v(du, t * site.rank), layout });
        }
        lowrank_grad_gpu(gpu, x, t, n_in, &mut grads)?;
        lowrank_up_gpu(gpu, dx, t, n_in, true, None, &up)?;
        Ok(())
    }

    /// Grouped GEMM over expert-sorted slots: `cfg` with the groups' offsets.
    fn grouped(
        gpu: &Gpu,
        cfg: GroupedGemm,
        g: &Groups,
        a: &CudaView<f32>,
        b: &CudaView<f32>,
        c: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        grouped_gemm_f32(gpu, &cfg, &g.offsets, g.total, a, b, c)?;
        Ok(())
    }

    /// The second product of the expert LoRA forward, `y += s · u B_eᵀ` (PEFT's expert LoRA layout:
    /// `B_e(j, n) = lora_B[n, j·E + e]`), as an expert product's epilogue term.
    fn lora_up<'a>(p: &'a GpuLoraPair, u: &'a CudaSlice<f32>, slots: usize) -> LoraUp<'a> {
        let SiteLayout { rank: r, scaling, .. } = p.site;
        LoraUp { u: v(u, slots * r), b: p.b.as_view(), b_strides: Self::lora_b_strides(&p.site), rank: r, scaling }
    }

    /// The input-gradient term of the expert LoRA backward, `dx += du A_e` (`A_e(j, n) =
    /// lora_A[e·r + j, n]`), as an expert product's epilogue term.
    fn lora_dx<'a>(p: &'a GpuLoraPair, du: &'a CudaSlice<f32>, slots: usize) -> LoraUp<'a> {
        let r = p.site.rank;
        LoraUp {
            u: v(du, slots * r),
            b: p.a.as_view(),
            b_strides: Self::lora_a_strides(&p.site),
            rank: r,
            scaling: 1.0,
        }
    }

    /// `A_e(j, n) = lora_A[e·r + j, n]` (PEFT's expert layout `[r·E, in]`) as (row j, column n,
    /// group e) strides.
    fn lora_a_strides(site: &SiteLayout) -> Strides {
        Strides { row: site.n_in, col: 1, group: site.rank * site.n_in }
    }

    /// `B_e(j, n) = lora_B[n, j·E + e]` (PEFT's expert layout `[out, r·E]`) as (row j, column n,
    /// group e) strides.
    fn lora_b_strides(site: &SiteLayout) -> Strides {
        Strides { row: site.experts, col: site.rank * site.experts, group: 1 }
    }

    /// The expert LoRA's down factor `A_e` for `u = x A_eᵀ`.
    fn lora_u_factor(p: &GpuLoraPair) -> LoraDown<'_> {
        LoraDown { factor: p.a.as_view(), strides: Self::lora_a_strides(&p.site), alpha: 1.0, rank: p.site.rank }
    }

    /// The factor of the input gradient's `du = s · dy B_e`.
    fn lora_du_factor(p: &GpuLoraPair) -> LoraDown<'_> {
        let site = &p.site;
        LoraDown { factor: p.b.as_view(), strides: Self::lora_b_strides(site), alpha: site.scaling, rank: site.rank }
    }

    /// `u [S, r] = x_e A_eᵀ` per expert: the first product of the expert LoRA (the same kernel, and
    /// bits, as the MXFP4 products' split computes it in, [`Self::expert_product`]).
    fn lora_experts_down(
        gpu: &Gpu,
        p: &GpuLoraPair,
        acts: &Groups,
        x: &CudaView<f32>,
        u: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let SiteLayout { n_in, rank: r, experts: e, .. } = p.site;
        let cfg = Self::expert_cfg(e, n_in, 0, acts.total, false, Strides { row: 0, col: 0, group: 0 });
        let down = Self::lora_u_factor(p);
        grouped_lora_down_f32(gpu, &cfg, &acts.offsets, acts.total, x, &down, &mut vm(u, acts.total * r))?;
        Ok(())
    }

    /// `du = s · dy B_e` per expert, before the expert product's input gradient of dense experts
    /// (the MXFP4 products compute it in their split); that product then adds `du A_e`
    /// ([`Self::lora_dx`]) and [`Self::lora_experts_grads`] takes the parameter gradients.
    fn lora_experts_du(
        gpu: &Gpu,
        p: &GpuLoraPair,
        acts: &Groups,
        du: &mut CudaSlice<f32>,
        dy: &CudaView<f32>,
    ) -> Result<()> {
        let SiteLayout { n_out, rank: r, experts: e, .. } = p.site;
        let cfg = Self::expert_cfg(e, 0, n_out, acts.total, true, Strides { row: 0, col: 0, group: 0 });
        let down = Self::lora_du_factor(p);
        grouped_lora_down_f32(gpu, &cfg, &acts.offsets, acts.total, dy, &down, &mut vm(du, acts.total * r))?;
        Ok(())
    }

    /// The expert LoRA's parameter gradients from u ([`Self::lora_experts_down`]) and du
    /// ([`Self::lora_experts_du`]): `dB_e += s · dy_eᵀ u_e`, `dA_e += du_eᵀ x_e`.
    fn lora_experts_grads(
        gpu: &Gpu,
        p: &mut GpuLoraPair,
        acts: &Groups,
        u: &CudaSlice<f32>,
        du: &CudaSlice<f32>,
        x: &CudaView<f32>,
        dy: &CudaView<f32>,
    ) -> Result<()> {
        let SiteLayout { n_in, n_out, rank: r, experts: e, scaling, .. } = p.site;
        let slots = acts.total;
        let st = |row, col, group| Strides { row, col, group };
        let gk = |m, n, alpha, a, b, c| GroupedGemm {
            groups: e,
            grouped: Grouped::K,
            m,
            n,
            k: 0,
            alpha,
            beta: 1.0,
            a,
            b,
            c,
        };
        Self::grouped(
            gpu,
            gk(n_out, r, scaling, st(1, n_out, 0), st(r, 1, 0), st(r * e, e, 1)),
            acts,
            dy,
            &v(u, slots * r),
            &mut p.gb.as_view_mut(),
        )?;
        Self::grouped(
            gpu,
            gk(r, n_in, 1.0, st(1, r, 0), st(n_in, 1, 0), st(n_in, 1, r * n_in)),
            acts,
            &v(du, slots * r),
            x,
            &mut p.ga.as_view_mut(),
        )
    }

    /// An expert product with its LoRA pair `p`, if any ([`Self::expert_gemm`]'s product and bias): the
    /// LoRA's first product into `u` (forward `u = x A_eᵀ`, backward `du = s · dy B_e`; the
    /// caller keeps it for the parameter gradients), then the product, which adds `s · u B_eᵀ`
    /// (forward) or `du A_e` (backward) as it stores `y`. MXFP4 experts compute `u` in the pass
    /// that splits x into bf16 ([`grouped_gemm_f32_mxfp4w_lora`]); dense experts in a product of
    /// its own.
    #[allow(clippy::too_many_arguments)]
    fn expert_product(
        gpu: &Gpu,
        w: &ExpertW,
        (experts, n_in, n_out): (usize, usize, usize),
        acts: &Groups,
        x: &CudaView<f32>,
        backward: bool,
        mma: Mma,
        bias: Option<CudaView<f32>>,
        lora: Option<(&GpuLoraPair, &mut CudaSlice<f32>)>,
        slot_expert: &CudaView<u32>,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let Some((p, u)) = lora else {
            let epi = Mxfp4Epilogue { bias, lora: None };
            return Self::expert_gemm(gpu, w, experts, n_in, n_out, acts, x, backward, mma, &epi, slot_expert, y);
        };
        let (slots, r) = (acts.total, p.site.rank);
        match w {
            ExpertW::Mxfp4 { blocks, scales } => {
                // The factor the product adds the term with is the other one.
                let (down, up) = if backward {
                    (Self::lora_du_factor(p), Self::lora_u_factor(p))
                } else {
                    (Self::lora_u_factor(p), Self::lora_du_factor(p))
                };
                let scaling = if backward { 1.0 } else { p.site.scaling };
                let lora = Mxfp4Lora { down, up: up.factor, up_strides: up.strides, scaling };
                let wt = Self::mxfp4_weight(blocks, scales, experts, n_in, n_out);
                let cfg = Self::expert_cfg(experts, n_in, n_out, slots, backward, Strides { row: 0, col: 0, group: 0 });
                grouped_gemm_f32_mxfp4w_lora(
                    gpu,
                    &cfg,
                    &acts.offsets,
                    slots,
                    x,
                    &wt,
                    backward,
                    mma,
                    bias,
                    &lora,
                    &mut vm(u, slots * r),
                    y,
                )?;
                Ok(())
            }
            ExpertW::Dense(_) => {
                let term = if backward {
                    Self::lora_experts_du(gpu, p, acts, u, x)?;
                    Self::lora_dx(p, u, slots)
                } else {
                    Self::lora_experts_down(gpu, p, acts, x, u)?;
                    Self::lora_up(p, u, slots)
                };
                let epi = Mxfp4Epilogue { bias, lora: Some(term) };
                Self::expert_gemm(gpu, w, experts, n_in, n_out, acts, x, backward, mma, &epi, slot_expert, y)
            }
        }
    }

    /// An MXFP4 expert weight `[experts, n_out, n_in]` as the kernels take it.
    fn mxfp4_weight<'a>(
        blocks: &'a CudaSlice<u8>,
        scales: &'a CudaSlice<u8>,
        experts: usize,
        n_in: usize,
        n_out: usize,
    ) -> Mxfp4Weight<'a> {
        Mxfp4Weight { blocks: blocks.as_view(), scales: scales.as_view(), experts, rows: n_out, cols: n_in }
    }

    /// The grouped product of an expert weight over `total` slots (B's strides `b`: unused by the
    /// MXFP4 products).
    fn expert_cfg(experts: usize, n_in: usize, n_out: usize, total: usize, backward: bool, b: Strides) -> GroupedGemm {
        let (n, k) = if backward { (n_in, n_out) } else { (n_out, n_in) };
        GroupedGemm {
            groups: experts,
            grouped: Grouped::M,
            m: total,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            a: Strides { row: k, col: 1, group: 0 },
            b,
            c: Strides { row: n, col: 1, group: 0 },
        }
    }

    /// Frozen expert weight: `y [S, out] = x [S, in] · W_eᵀ` (forward) or `dx [S, in] = dy [S, out] · W_e`,
    /// plus the epilogue's terms (the experts' bias, a LoRA term), which the MXFP4 kernels add as
    /// they store `y`; dense experts add them in passes of their own (the bias by `slot_expert`).
    #[allow(clippy::too_many_arguments)]
    fn expert_gemm(
        gpu: &Gpu,
        w: &ExpertW,
        experts: usize,
        n_in: usize,
        n_out: usize,
        acts: &Groups,
        x: &CudaView<f32>,
        backward: bool,
        mma: Mma,
        epi: &Mxfp4Epilogue,
        slot_expert: &CudaView<u32>,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let total = acts.total;
        let n = if backward { n_in } else { n_out };
        let st = |row, col, group| Strides { row, col, group };
        let cfg = |b| Self::expert_cfg(experts, n_in, n_out, total, backward, b);
        match w {
            ExpertW::Mxfp4 { blocks, scales } => {
                let wt = Self::mxfp4_weight(blocks, scales, experts, n_in, n_out);
                grouped_gemm_f32_mxfp4w(gpu, &cfg(st(0, 0, 0)), &acts.offsets, total, x, &wt, backward, mma, epi, y)?;
            }
            ExpertW::Dense(wd) => {
                // `[E, in, out]`: forward B(k = in, n = out), backward B(k = out, n = in).
                let b = if backward { st(1, n_out, n_in * n_out) } else { st(n_out, 1, n_in * n_out) };
                grouped_gemm_f32(gpu, &cfg(b), &acts.offsets, total, x, &wd.as_view(), y)?;
                if let Some(bias) = &epi.bias {
                    add_expert_bias_gpu(gpu, y, bias, &slot_expert.slice(..total), n)?;
                }
                if let Some(l) = &epi.lora {
                    l.add_to(gpu, &cfg(b), &acts.offsets, total, y)?;
                }
            }
        }
        Ok(())
    }

    // ---- forward ---------------------------------------------------------------------------

    /// Uploads a batch's ids, positions and attention ranges.
    fn load_batch(&mut self, ids: &[u32], pos: &[u32], seg: &[u32], rows: &[std::ops::Range<usize>]) -> Result<()> {
        let t = ids.len();
        if t > self.max_tokens {
            return Err(Error::Input(format!(
                "a micro-batch of {t} tokens exceeds the {} the GPU buffers were sized for",
                self.max_tokens
            )));
        }
        crate::model::check_token_ids(ids, self.cfg.vocab_size)?;
        let gpu = &*self.gpu;
        let h = self.cfg.hidden_size;
        match &self.w.embed {
            // The embedding kernel reads the rows of these ids from host memory.
            HostEmbed::Mapped(_) => htod(gpu, ids, &mut self.s.ids)?,
            // The rows gathered here and uploaded now, so that a pass (a CUDA graph's included)
            // copies nothing from pageable memory.
            HostEmbed::Pageable(table) => {
                self.host_rows.clear();
                for &id in ids {
                    self.host_rows.extend_from_slice(&table[id as usize * h..(id as usize + 1) * h]);
                }
                htod(gpu, &self.host_rows, &mut self.s.bf)?;
            }
        }
        htod(gpu, pos, &mut self.s.pos)?;
        self.qkv_of = None;
        for (wi, window) in [None, Some(self.cfg.sliding_window)].into_iter().enumerate() {
            let r = visible_ranges(pos, seg, rows, window)?;
            let [klo, khi, qlo, qhi] = &mut self.s.ranges[wi];
            htod(gpu, &r.klo, klo)?;
            htod(gpu, &r.khi, khi)?;
            htod(gpu, &r.qlo, qlo)?;
            htod(gpu, &r.qhi, qhi)?;
        }
        Ok(())
    }

    /// Embeds the loaded ids into the residual stream and runs every layer.
    fn forward_layers(&mut self, t: usize, save: bool) -> Result<()> {
        let h = self.cfg.hidden_size;
        let out = &mut vm(&mut self.s.x, t * h);
        match &self.w.embed {
            // The rows of the ids load_batch uploaded, read from host memory by the kernel.
            // SAFETY: the engine never writes the table after building it (HostEmbed::new fills it).
            HostEmbed::Mapped(table) => unsafe {
                embedding_gpu_bf16w_host(&self.gpu, table, &v(&self.s.ids, t), h, out)?
            },
            // The rows load_batch gathered and uploaded, widened to f32 (ids 0..t).
            HostEmbed::Pageable(_) => {
                embedding_gpu_bf16w(&self.gpu, &v(&self.s.bf, t * h), &v(&self.s.ids, t), h, out)?;
            }
        }
        let inv = self.w.inv_freq.as_view();
        let cs = &mut vm(&mut self.s.rope_cs, t * self.cfg.head_dim);
        rope_table_gpu(&self.gpu, &v(&self.s.pos, t), &inv, self.rope_scaling, cs)?;
        let last = self.cfg.num_hidden_layers.saturating_sub(1);
        for l in 0..self.cfg.num_hidden_layers {
            if save && self.checkpointing {
                // The input of every layer the backward pass recomputes: all but the last.
                if l < last {
                    if let Some(host) = self.host_inputs.get_mut(l) {
                        host.download(&self.gpu, &[v(&self.s.x, t * h)])?;
                    } else {
                        let (x, inputs) = (&self.s.x, &mut self.layer_inputs[l]);
                        self.gpu.stream.memcpy_dtod(&v(x, t * h), &mut vm(inputs, t * h))?;
                    }
                }
                // Only the last layer's backward reads its forward's copies of the residual stream
                // (the others recompute them).
                let inputs = if l == last { Inputs::Keep } else { Inputs::Drop };
                self.layer_forward(l, t, false, inputs)?;
            } else {
                self.layer_forward(l, t, save, if save { Inputs::Keep } else { Inputs::Drop })?;
            }
        }
        Ok(())
    }

    /// Layer `l` on the residual stream `s.x` (`t` tokens). With `save` (training without
    /// checkpointing) its activations go to set `l`, else to set 0. `inputs`: which copies
    /// of the residual stream (the layer's input and its middle, the norms' inputs) the layer's
    /// backward will read. In the recomputation before a checkpointed layer's backward
    /// ([`Inputs::Recompute`]) the experts are not run: the backward pass recomputes them chunk
    /// by chunk, and the layer's output is not needed.
    fn layer_forward(&mut self, l: usize, t: usize, save: bool, inputs: Inputs) -> Result<()> {
        let moe = inputs != Inputs::Recompute;
        let cfg = &self.cfg;
        let (h, qw, nq) = (cfg.hidden_size, cfg.q_width(), cfg.num_attention_heads);
        let (ne, k) = (cfg.num_local_experts, cfg.num_experts_per_tok);
        let heads = heads_of(cfg);
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let gpu_arc = self.gpu.clone();
        let gpu = &*gpu_arc;
        let split = self.split;
        let mma = mma_of(split);
        let layer = &self.w.layers[l];
        // Without `save` (evaluation, decoding, checkpointed training), every layer uses the first
        // set of buffers.
        let a = &mut self.acts[if save { l } else { 0 }];
        let s = &mut self.s;
        let blas = &self.blas;
        let lora = &self.lora;
        let at = |tg: Target| self.lora_at.get(&(l, tg)).map(|&i| &lora[i]);
        let prof = &mut self.prof;
        prof.mark(gpu, "other")?;

        // Attention block: x += o_proj(attn(rope(q), rope(k), v)) of norm1(x).
        // A recomputation's backward reads the layer's input from its checkpoint on the device.
        if inputs == Inputs::Keep || (inputs == Inputs::Recompute && self.layer_inputs.get(l).is_none()) {
            gpu.stream.memcpy_dtod(&v(&s.x, t * h), &mut vm(&mut a.x_in, t * h))?;
        }
        rmsnorm_gpu(
            gpu,
            &v(&s.x, t * h),
            &layer.input_norm.as_view(),
            eps,
            &mut vm(&mut a.a, t * h),
            &mut vm(&mut a.rstd1, t),
        )?;
        // q, k and v of one input: split into bf16 once, in the pass that computes their LoRA's u
        // (ranks summing to at most 32; more take a launch per 32 columns).
        let [uq, uk, uv, uo] = &mut s.u_attn;
        let (pq, pk, pv) = (at(Target::Dense(Dense::Q)), at(Target::Dense(Dense::K)), at(Target::Dense(Dense::V)));
        let downs = [(pq, &mut *uq), (pk, &mut *uk), (pv, &mut *uv)].into_iter().filter_map(|(p, u)| Some((p?, u)));
        Self::lora_dense_down_split(gpu, &mut s.bf, &v(&a.a, t * h), t, h, downs.collect(), split)?;
        for (p, lin, out, u) in
            [(pq, &layer.q, &mut a.q, &*uq), (pk, &layer.k, &mut a.k, &*uk), (pv, &layer.v, &mut a.v, &*uv)]
        {
            let n_out = lin.n_out;
            Self::linear_fwd_split(blas, gpu, &s.bf, lin, p.map(|p| (p, u)), t, &mut vm(out, t * n_out), false, split)?;
        }
        // q and k rotated as they are split (a.q and a.k keep the projections' outputs); the
        // split stays in s.qkv for this layer's backward.
        split_layer_qkv(gpu, cfg, &s.rope_cs, &mut s.qkv, a, t, mma)?;
        self.qkv_of = Some((l, t));
        let r = &s.ranges[layer.window.is_some() as usize];
        attention_fwd_split_gpu(
            gpu,
            &v(&s.qkv, attention::qkv_split_elems(heads, t, t, mma)),
            t,
            &layer.sinks.as_view(),
            &v(&r[0], t),
            &v(&r[1], t),
            heads,
            scale,
            mma,
            &mut vm(&mut a.o, t * qw),
            &mut vm(&mut a.lse, t * nq),
        )?;
        let po = at(Target::Dense(Dense::O));
        let down_o = po.map(|p| (p, &mut *uo)).into_iter().collect();
        Self::lora_dense_down_split(gpu, &mut s.bf, &v(&a.o, t * qw), t, qw, down_o, split)?;
        let o_lora = po.map(|p| (p, &*uo));
        Self::linear_fwd_split(blas, gpu, &s.bf, &layer.o, o_lora, t, &mut vm(&mut s.x, t * h), true, split)?;

        prof.mark(gpu, "attention block, forward (with recomputation)")?;
        // MoE block: x += Σ_j w_j · expert_j(norm2(x)).
        // A recomputation stops before the experts: its backward reads the middle from s.x.
        if inputs == Inputs::Keep {
            gpu.stream.memcpy_dtod(&v(&s.x, t * h), &mut vm(&mut a.x_mid, t * h))?;
        }
        rmsnorm_gpu(
            gpu,
            &v(&s.x, t * h),
            &layer.post_norm.as_view(),
            eps,
            &mut vm(&mut a.bn, t * h),
            &mut vm(&mut a.rstd2, t),
        )?;
        if !moe {
            if let Some(r) = self.routes.get(l) {
                // The recomputation: this layer's routing from the forward pass.
                a.route.copy_from(gpu, r, t * k)?;
                prof.mark(gpu, "router, forward")?;
                return Ok(());
            }
        }
        blas.matmul_f32(
            t,
            ne,
            1,
            &v(&s.ones, t),
            false,
            &layer.router_b.as_view(),
            false,
            &mut vm(&mut s.router_logits, t * ne),
            1.0,
            0.0,
        )?;
        blas.matmul_f32(
            t,
            ne,
            h,
            &v(&a.bn, t * h),
            false,
            &layer.router_w.as_view(),
            true,
            &mut vm(&mut s.router_logits, t * ne),
            1.0,
            1.0,
        )?;
        topk_softmax_gpu(
            gpu,
            &v(&s.router_logits, t * ne),
            ne,
            k,
            &mut vm(&mut a.route.experts, t * k),
            &mut vm(&mut a.route.weights, t * k),
        )?;
        // Each chunk's expert-sorted plan is built from it on the device (moe_forward).
        if let Some(r) = self.routes.get_mut(l) {
            r.copy_from(gpu, &a.route, t * k)?;
        }
        prof.mark(gpu, "router, forward")?;
        if !moe {
            return Ok(());
        }
        let set = if save { l } else { 0 };
        for (c0, c1) in self.moe_chunks(t) {
            self.moe_forward(l, set, c0, c1, true)?;
        }
        Ok(())
    }

    /// Token ranges of the MoE chunks of a micro-batch of `t` tokens.
    fn moe_chunks(&self, t: usize) -> Vec<(usize, usize)> {
        (0..t).step_by(self.moe_chunk).map(|c0| (c0, (c0 + self.moe_chunk).min(t))).collect()
    }

    /// The experts of layer `l` on tokens `c0..c1` (activation set `set`, whose router outputs
    /// are computed): builds the chunk's plan on the device, runs the experts and their LoRA, and
    /// with `combine` adds the weighted sum to rows `c0..c1` of the residual stream. Without
    /// `combine` (the recomputation before the backward) it stops after the SwiGLU: the backward
    /// needs the experts' inputs and `hh`, not their outputs (`weight_grad_from_input`).
    fn moe_forward(&mut self, l: usize, set: usize, c0: usize, c1: usize, combine: bool) -> Result<()> {
        let Self { gpu, cfg, w, lora, lora_at, acts, s, prof, swiglu, split, .. } = self;
        let mma = mma_of(*split);
        let gpu = &**gpu;
        let (h, ne, k, i2) =
            (cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, 2 * cfg.intermediate_size);
        let layer = &w.layers[l];
        let at = |tg: Target| lora_at.get(&(l, tg)).map(|&i| &lora[i]);
        let a = &mut acts[set];
        let tc = c1 - c0;
        let m = &mut a.moe;
        let slots = tc * k;
        routing_plan_gpu(
            gpu,
            &a.route.experts.slice(c0 * k..c1 * k),
            &a.route.weights.slice(c0 * k..c1 * k),
            ne,
            k,
            &mut PlanGpu {
                offsets: m.offsets.as_view_mut(),
                token: vm(&mut m.token, slots),
                choice: vm(&mut m.choice, slots),
                weight: vm(&mut m.pweight, slots),
                slot_of: vm(&mut m.slot_of, slots),
                slot_expert: vm(&mut m.slot_expert, slots),
            },
        )?;
        m.slots = slots;
        if prof.on {
            // Profiling synchronises anyway: the plan's offsets to the host for the tile statistics.
            let offsets: Vec<usize> = gpu.stream.clone_dtoh(&m.offsets)?.into_iter().map(|x| x as usize).collect();
            prof.routing.add(&offsets);
        }

        gather_rows_gpu(gpu, &a.bn.slice(c0 * h..c1 * h), &v(&m.token, slots), h, &mut vm(&mut m.xs, slots * h))?;
        prof.mark(gpu, "gather, SwiGLU, combine (MoE), forward")?;
        let grp = Groups { offsets: m.offsets.as_view(), total: slots };
        let slot_expert = v(&m.slot_expert, slots);
        // Each projection: the expert product, which computes its LoRA's u = x A_eᵀ as it splits x
        // and adds the bias and s · u B_eᵀ as it stores its output.
        Self::expert_product(
            gpu,
            &layer.gate_up,
            (ne, h, i2),
            &grp,
            &v(&m.xs, slots * h),
            false,
            mma,
            Some(layer.gate_up_bias.as_view()),
            at(Target::Experts(Proj::GateUp)).map(|p| (p, &mut s.u_gu)),
            &slot_expert,
            &mut vm(&mut m.hh, slots * i2),
        )?;
        prof.mark(gpu, "expert GEMMs (MXFP4) with bias and LoRA, forward")?;
        swiglu_gpu(gpu, &v(&m.hh, slots * i2), *swiglu, &mut vm(&mut m.z, slots * i2 / 2))?;
        prof.mark(gpu, "gather, SwiGLU, combine (MoE), forward")?;
        if !combine {
            return Ok(());
        }
        Self::expert_product(
            gpu,
            &layer.down,
            (ne, i2 / 2, h),
            &grp,
            &v(&m.z, slots * i2 / 2),
            false,
            mma,
            Some(layer.down_bias.as_view()),
            at(Target::Experts(Proj::Down)).map(|p| (p, &mut s.u)),
            &slot_expert,
            &mut vm(&mut m.y, slots * h),
        )?;
        prof.mark(gpu, "expert GEMMs (MXFP4) with bias and LoRA, forward")?;
        combine_add_gpu(
            gpu,
            &v(&m.y, slots * h),
            &v(&m.pweight, slots),
            &v(&m.slot_of, tc * k),
            k,
            h,
            &mut s.x.slice_mut(c0 * h..c1 * h),
        )?;
        prof.mark(gpu, "gather, SwiGLU, combine (MoE), forward")?;
        Ok(())
    }

    /// Final norm, then the LM head and cross-entropy over the positions with a target, in chunks
    /// of [`HEAD_CHUNK`] rows (full-vocabulary logits exist for one chunk at a time). With
    /// `grad_scale`, leaves `∂(grad_scale · Σ loss)/∂x` in `s.dx`. Returns the count of positions
    /// with a target, whose losses it leaves in `s.losses` ([`Self::loss_sum`] reads them).
    fn head(&mut self, t: usize, targets: &[i64], grad_scale: Option<f32>) -> Result<usize> {
        let (h, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let eps = self.cfg.rms_norm_eps as f32;
        let gpu = &*self.gpu;
        self.prof.mark(gpu, "other")?;
        let s = &mut self.s;
        rmsnorm_gpu(
            gpu,
            &v(&s.x, t * h),
            &self.w.norm.as_view(),
            eps,
            &mut vm(&mut s.hf, t * h),
            &mut vm(&mut s.rstd_f, t),
        )?;
        let idx: Vec<u32> = (0..t as u32).filter(|&i| targets[i as usize] != IGNORE_INDEX).collect();
        let tg: Vec<i32> = idx.iter().map(|&i| targets[i as usize] as i32).collect();
        let n = idx.len();
        if n > 0 {
            gpu.stream.memcpy_htod(&idx, &mut vm(&mut s.idx, n))?;
            gpu.stream.memcpy_htod(&tg, &mut vm(&mut s.targets, n))?;
        }
        if grad_scale.is_some() {
            gpu.stream.memset_zeros(&mut vm(&mut s.dhf, t * h))?;
        }
        let mut c0 = 0;
        while c0 < n {
            let c = HEAD_CHUNK.min(n - c0);
            gather_rows_gpu(gpu, &v(&s.hf, t * h), &s.idx.slice(c0..c0 + c), h, &mut vm(&mut s.hc, c * h))?;
            let lm = self.w.lm_head.as_view();
            Self::gemm_xw(
                &self.blas,
                gpu,
                &mut s.bf,
                c,
                vocab,
                h,
                &v(&s.hc, c * h),
                &lm,
                true,
                &mut vm(&mut s.logits, c * vocab),
                0.0,
                self.split,
            )?;
            cross_entropy_gpu(
                gpu,
                &mut vm(&mut s.logits, c * vocab),
                &s.targets.slice(c0..c0 + c),
                vocab,
                grad_scale.unwrap_or(1.0),
                grad_scale.is_some(),
                &mut s.losses.slice_mut(c0..c0 + c),
            )?;
            if grad_scale.is_some() {
                Self::gemm_xw(
                    &self.blas,
                    gpu,
                    &mut s.bf,
                    c,
                    h,
                    vocab,
                    &v(&s.logits, c * vocab),
                    &lm,
                    false,
                    &mut vm(&mut s.dhc, c * h),
                    0.0,
                    self.split,
                )?;
                scatter_rows_gpu(gpu, &v(&s.dhc, c * h), &s.idx.slice(c0..c0 + c), h, &mut vm(&mut s.dhf, t * h))?;
            }
            c0 += c;
        }
        self.prof.mark(gpu, "LM head and loss")?;
        if grad_scale.is_some() {
            let s = &mut self.s;
            rmsnorm_backward_gpu(
                gpu,
                &v(&s.x, t * h),
                &self.w.norm.as_view(),
                &v(&s.rstd_f, t),
                &v(&s.dhf, t * h),
                &mut vm(&mut s.dx, t * h),
            )?;
        }
        Ok(n)
    }

    /// The sum of the `n` per-position losses [`Self::head`] left on the device (waits for them).
    fn loss_sum(&self, n: usize) -> Result<f64> {
        Ok(self.dtoh(&self.s.losses, n)?.iter().map(|&x| x as f64).sum())
    }

    // ---- backward --------------------------------------------------------------------------

    /// Backward of the experts of layer `l` on tokens `c0..c1` (activation set `set`, whose
    /// chunk plan and activations are those of this chunk): `s.dys..` scratch, the routing
    /// weights' gradient into rows `c0..c1` of `s.dweights`, the input gradient into rows
    /// `c0..c1` of `s.db` (assigned), expert LoRA gradients `+=`.
    /// The backward of [`Self::moe_forward`] on tokens `c0..c1`; `recomputed`: that chunk's forward
    /// (the recomputation) ran just before, so its gate_up LoRA's u is still in `u_gu`.
    fn moe_backward(&mut self, l: usize, set: usize, c0: usize, c1: usize, recomputed: bool) -> Result<()> {
        let Self { gpu, cfg, w, lora, lora_at, acts, s, swiglu, split, prof, .. } = self;
        let mma = mma_of(*split);
        let gpu = &**gpu;
        let (h, ne, k, i2) =
            (cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, 2 * cfg.intermediate_size);
        let layer = &w.layers[l];
        let m = &acts[set].moe;
        let tc = c1 - c0;
        let slots = m.slots;
        let grp = Groups::of(m);
        let idx = |tg: Target| lora_at.get(&(l, tg)).copied();
        prof.mark(gpu, "MoE block, backward")?;
        // dys = weight · dy per slot; the routing weights' gradient comes after the down
        // projection's input gradient, from its input side (the recomputation skipped its output).
        weighted_gather_rows_gpu(
            gpu,
            &s.dx.slice(c0 * h..c1 * h),
            &v(&m.pweight, slots),
            &v(&m.token, slots),
            h,
            &mut vm(&mut s.dys, slots * h),
        )?;
        prof.mark(gpu, "gather, SwiGLU, combine (MoE), backward")?;
        let slot_expert = v(&m.slot_expert, slots);
        // Each projection: its LoRA's u where the recomputation did not leave it, then the expert
        // product's input gradient, which computes du = s dy B_e as it splits dy and adds du A_e as
        // it stores dx, then the LoRA's parameter gradients.
        let (z, dys) = (v(&m.z, slots * i2 / 2), v(&s.dys, slots * h));
        let lora_down = idx(Target::Experts(Proj::Down));
        if let Some(i) = lora_down {
            // The recomputation skipped the down projection: its u from z.
            Self::lora_experts_down(gpu, &lora[i], &grp, &z, &mut s.u)?;
        }
        prof.mark(gpu, "LoRA on experts, backward")?;
        Self::expert_product(
            gpu,
            &layer.down,
            (ne, i2 / 2, h),
            &grp,
            &dys,
            true,
            mma,
            None,
            lora_down.map(|i| (&lora[i], &mut s.du)),
            &slot_expert,
            &mut vm(&mut s.dz, slots * i2 / 2),
        )?;
        prof.mark(gpu, "expert GEMMs (MXFP4) with LoRA, backward")?;
        if let Some(i) = lora_down {
            Self::lora_experts_grads(gpu, &mut lora[i], &grp, &s.u, &s.du, &z, &dys)?;
        }
        prof.mark(gpu, "LoRA on experts, backward")?;
        // dz is now weight · (W_downᵀ + LoRA)ᵀ dy: the whole down projection's input gradient.
        weight_grad_from_input_gpu(
            gpu,
            &v(&s.dz, slots * i2 / 2),
            &v(&m.z, slots * i2 / 2),
            &s.dx.slice(c0 * h..c1 * h),
            &layer.down_bias.as_view(),
            &v(&m.pweight, slots),
            &v(&m.token, slots),
            &v(&m.choice, slots),
            &v(&m.slot_expert, slots),
            k,
            h,
            &mut s.dweights.slice_mut(c0 * k..c1 * k),
        )?;
        swiglu_backward_gpu(
            gpu,
            &v(&m.hh, slots * i2),
            &v(&s.dz, slots * i2 / 2),
            *swiglu,
            &mut vm(&mut s.dh, slots * i2),
        )?;
        prof.mark(gpu, "gather, SwiGLU, combine (MoE), backward")?;
        let (xs, dh) = (v(&m.xs, slots * h), v(&s.dh, slots * i2));
        let lora_gu = idx(Target::Experts(Proj::GateUp));
        if let (Some(i), false) = (lora_gu, recomputed) {
            Self::lora_experts_down(gpu, &lora[i], &grp, &xs, &mut s.u_gu)?;
        }
        prof.mark(gpu, "LoRA on experts, backward")?;
        Self::expert_product(
            gpu,
            &layer.gate_up,
            (ne, h, i2),
            &grp,
            &dh,
            true,
            mma,
            None,
            lora_gu.map(|i| (&lora[i], &mut s.du)),
            &slot_expert,
            &mut vm(&mut s.dxs, slots * h),
        )?;
        prof.mark(gpu, "expert GEMMs (MXFP4) with LoRA, backward")?;
        if let Some(i) = lora_gu {
            Self::lora_experts_grads(gpu, &mut lora[i], &grp, &s.u_gu, &s.du, &xs, &dh)?;
        }
        prof.mark(gpu, "LoRA on experts, backward")?;
        unpermute_sum_gpu(
            gpu,
            &v(&s.dxs, slots * h),
            &v(&m.slot_of, tc * k),
            k,
            h,
            &mut s.db.slice_mut(c0 * h..c1 * h),
        )?;
        prof.mark(gpu, "gather, SwiGLU, combine (MoE), backward")?;
        Ok(())
    }

    /// The backward of layer `l`; `recomputed`: its forward just ran again (layer_forward with
    /// Inputs::Recompute), leaving its middle in s.x and its input in its checkpoint (or,
    /// offloaded, in x_in); `kept_moe`: with checkpointing, its one MoE chunk's forward
    /// activations are still in set 0 (the last layer's), so they are not recomputed.
    fn layer_backward(&mut self, l: usize, t: usize, recomputed: bool, kept_moe: bool) -> Result<()> {
        let set = if self.checkpointing { 0 } else { l };
        let split = self.split;
        let mma = mma_of(split);
        self.prof.mark(&self.gpu, "other")?;
        // MoE block, chunk by chunk: with checkpointing each chunk's experts are recomputed first.
        for (c0, c1) in self.moe_chunks(t) {
            if self.checkpointing && !kept_moe {
                self.moe_forward(l, set, c0, c1, false)?;
            }
            // With kept_moe the forward pass left u_gu (and the rest) as the recomputation would.
            self.moe_backward(l, set, c0, c1, self.checkpointing)?;
        }
        let cfg = &self.cfg;
        let (h, qw, kw, nq) = (cfg.hidden_size, cfg.q_width(), cfg.kv_width(), cfg.num_attention_heads);
        let (ne, k) = (cfg.num_local_experts, cfg.num_experts_per_tok);
        let heads = heads_of(cfg);
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let gpu = &*self.gpu;
        let layer = &self.w.layers[l];
        let a = &self.acts[set];
        let s = &mut self.s;
        let blas = &self.blas;
        let idx = |tg: Target| self.lora_at.get(&(l, tg)).copied();
        let lora = &mut self.lora;
        let prof = &mut self.prof;
        route_backward_gpu(
            gpu,
            &v(&a.route.experts, t * k),
            &v(&a.route.weights, t * k),
            &v(&s.dweights, t * k),
            ne,
            k,
            &mut vm(&mut s.dlogits, t * ne),
        )?;
        blas.matmul_f32(
            t,
            h,
            ne,
            &v(&s.dlogits, t * ne),
            false,
            &layer.router_w.as_view(),
            false,
            &mut vm(&mut s.db, t * h),
            1.0,
            1.0,
        )?;
        let x_mid = if recomputed { &s.x } else { &a.x_mid };
        rmsnorm_backward_add_gpu(
            gpu,
            &v(x_mid, t * h),
            &layer.post_norm.as_view(),
            &v(&a.rstd2, t),
            &v(&s.db, t * h),
            &mut vm(&mut s.dx, t * h),
        )?;
        prof.mark(gpu, "MoE block, backward")?;

        // Attention block. With checkpointing the layer's recomputation (the last layer: its
        // forward pass) just left the attention LoRA's u in u_attn.
        let u_ready = self.checkpointing;
        let [uq, uk, uv, uo] = &mut s.u_attn;
        let dout = &mut vm(&mut s.dout, t * qw);
        let mut po = idx(Target::Dense(Dense::O)).map(|i| &mut lora[i]);
        if let (Some(p), false) = (&po, u_ready) {
            Self::lora_dense_down(gpu, &v(&a.o, t * qw), t, vec![(&**p, &mut *uo)])?;
        }
        let o_lora = po.as_deref_mut().map(|p| (p, &*uo, &mut s.du));
        Self::linear_bwd(blas, gpu, &mut s.bf, &layer.o, o_lora, &v(&s.dx, t * h), t, dout, false, split)?;
        if let Some(p) = po {
            Self::lora_dense_bwd_in(gpu, vec![(p, &s.du)], &v(&a.o, t * qw), t, dout)?;
        }
        // q, k and v as this layer's forward split them: still in s.qkv after the recomputation
        // (with checkpointing) or the last layer's forward; else split again, the same bits.
        let lqkv = attention::qkv_split_elems(heads, t, t, mma);
        if self.qkv_of != Some((l, t)) {
            split_layer_qkv(gpu, cfg, &s.rope_cs, &mut s.qkv, a, t, mma)?;
            self.qkv_of = Some((l, t));
        }
        let r = &s.ranges[layer.window.is_some() as usize];
        // dq and dk come back as the gradients of the projections' outputs (before the rotation).
        attention_bwd_split_gpu(
            gpu,
            &v(&s.qkv, lqkv),
            Some(&v(&s.rope_cs, t * cfg.head_dim)),
            &layer.sinks.as_view(),
            &v(&a.o, t * qw),
            &v(&a.lse, t * nq),
            &v(&s.dout, t * qw),
            &v(&r[0], t),
            &v(&r[1], t),
            &v(&r[2], t),
            &v(&r[3], t),
            heads,
            scale,
            mma,
            &mut vm(&mut s.delta, t * nq),
            &mut vm(&mut s.dq, t * qw),
            &mut vm(&mut s.dk, t * kw),
            &mut vm(&mut s.dv, t * kw),
            &mut self.dsinks[l].as_view_mut(),
        )?;
        // q, k and v: each pair's output side with its projection's input gradient, then the
        // three input sides (they share the input) in one pass over it and one over its gradient
        // (ranks summing to at most 32).
        let mut qkv = lora_pairs_mut(
            lora,
            [idx(Target::Dense(Dense::Q)), idx(Target::Dense(Dense::K)), idx(Target::Dense(Dense::V))],
        );
        if !u_ready {
            let downs = qkv.iter().zip([&mut *uq, &mut *uk, &mut *uv]).filter_map(|(p, u)| Some((&**p.as_ref()?, u)));
            Self::lora_dense_down(gpu, &v(&a.a, t * h), t, downs.collect())?;
        }
        let [duq, duk, duv] = &mut s.du_attn;
        let [pq, pk, pv] = &mut qkv;
        for (j, (lin, g, p, u, du)) in [
            (&layer.q, &s.dq, pq, &*uq, &mut *duq),
            (&layer.k, &s.dk, pk, &*uk, &mut *duk),
            (&layer.v, &s.dv, pv, &*uv, &mut *duv),
        ]
        .into_iter()
        .enumerate()
        {
            let (dy, da) = (&v(g, t * lin.n_out), &mut vm(&mut s.da, t * h));
            let lora = p.as_deref_mut().map(|p| (p, u, &mut *du));
            Self::linear_bwd(blas, gpu, &mut s.bf, lin, lora, dy, t, da, j > 0, split)?;
        }
        let ins = qkv.into_iter().zip([&*duq, &*duk, &*duv]).filter_map(|(p, du)| Some((p?, du)));
        Self::lora_dense_bwd_in(gpu, ins.collect(), &v(&a.a, t * h), t, &mut vm(&mut s.da, t * h))?;
        let x_in = match self.layer_inputs.get(l) {
            Some(checkpoint) if recomputed => checkpoint,
            _ => &a.x_in,
        };
        rmsnorm_backward_add_gpu(
            gpu,
            &v(x_in, t * h),
            &layer.input_norm.as_view(),
            &v(&a.rstd1, t),
            &v(&s.da, t * h),
            &mut vm(&mut s.dx, t * h),
        )?;
        prof.mark(gpu, "attention block, backward")?;
        Ok(())
    }

    /// Seconds per phase since the engine was built or [`GpuEngine::reset_profile`], when
    /// `OXTUNE_PROFILE` is set (else empty).
    pub fn profile(&self) -> &[(&'static str, f64)] {
        &self.prof.totals
    }

    /// How the routing plans filled the expert kernels' row tiles since the engine was built or
    /// [`GpuEngine::reset_profile`], when `OXTUNE_PROFILE` is set (else all zero).
    pub fn routing_stats(&self) -> RoutingStats {
        self.prof.routing
    }

    /// Starts the phase times afresh (after warm-up steps, which include compiling kernels).
    pub fn reset_profile(&mut self) {
        self.prof.totals.clear();
        self.prof.routing = RoutingStats::default();
        self.prof.last = std::time::Instant::now();
    }

    // ---- public passes -----------------------------------------------------------------------

    /// Loss of a batch without gradients: `(sum of losses, counted positions)`.
    pub fn eval_loss(&mut self, b: &TrainBatch) -> Result<(f64, usize)> {
        b.validate(self.cfg.vocab_size)?;
        self.load_batch(&b.ids, &b.pos, &b.seg, &b.rows)?;
        let t = b.ids.len();
        self.forward_layers(t, false)?;
        let n = self.head(t, &b.targets, None)?;
        Ok((self.loss_sum(n)?, n))
    }

    /// Forward and backward over one micro-batch; LoRA (and sink) gradients of
    /// `grad_scale · Σ loss` accumulate on the device. Returns `(sum of losses, counted positions)`.
    ///
    /// With [`EngineOptions::cuda_graphs`], a micro-batch size seen before runs its layers forward
    /// and backward as two CUDA graphs (the LM head and loss between them as usual): the same
    /// kernels with the same arguments, so the same bits as launching them one by one.
    pub fn forward_backward(&mut self, b: &TrainBatch, grad_scale: f32) -> Result<(f64, usize)> {
        b.validate(self.cfg.vocab_size)?;
        self.passes += 1;
        if self.fault_at == Some(self.passes) {
            // Every stream first (the host copy of the last step included), so that the fault
            // hits this step's work alone.
            self.gpu.ctx.synchronize()?;
            self.gpu.inject_fault()?;
        }
        self.load_batch(&b.ids, &b.pos, &b.seg, &b.rows)?;
        let t = b.ids.len();
        let lookup = if self.graphs_off.is_some() { Lookup::New } else { self.graphs.take(t) };
        let n = match lookup {
            Lookup::Ready(g) if g.scratch_gen == self.gpu.scratch_generation() => {
                g.forward.launch()?;
                // The losses stay on the device until the backward is queued: no wait between
                // the passes.
                let n = self.head(t, &b.targets, Some(grad_scale))?;
                g.backward.launch()?;
                self.graphs.put(t, g);
                n
            }
            // Graphs that name a scratch buffer since replaced (another op grew it) are dropped
            // and captured again.
            Lookup::Ready(_) | Lookup::Seen => {
                let gen = self.gpu.scratch_generation();
                let forward = self.captured(t, Self::forward_pass)?;
                let n = self.head(t, &b.targets, Some(grad_scale))?;
                let backward = match forward {
                    Some(_) => self.captured(t, Self::backward_pass)?,
                    None => {
                        self.backward_pass(t)?;
                        None
                    }
                };
                if let (Some(forward), Some(backward)) = (forward, backward) {
                    if gen == self.gpu.scratch_generation() {
                        self.graphs.put(t, PassGraphs { forward, backward, scratch_gen: gen });
                    }
                }
                n
            }
            Lookup::New => {
                self.forward_pass(t)?;
                let n = self.head(t, &b.targets, Some(grad_scale))?;
                self.backward_pass(t)?;
                n
            }
        };
        let sum = self.loss_sum(n)?;
        self.sync()?;
        Ok((sum, n))
    }

    /// Why the training passes run without CUDA graphs, if they do ([`EngineOptions::cuda_graphs`]).
    pub fn cuda_graphs_off(&self) -> Option<&str> {
        self.graphs_off.as_deref()
    }

    /// Micro-batch sizes whose training pass is held as CUDA graphs now.
    pub fn graphed_sizes(&self) -> usize {
        self.graphs.graphed()
    }

    /// Runs `pass` for `t` tokens captured into a CUDA graph, then launches the graph. If the
    /// capture fails (an operation a graph cannot hold, or any error of the pass), CUDA graphs are
    /// turned off for this engine, the reason kept for [`GpuEngine::cuda_graphs_off`], and `pass`
    /// runs eagerly instead: nothing ran while it was being captured (an error of the pass itself
    /// comes back from that run).
    fn captured(&mut self, t: usize, pass: fn(&mut Self, usize) -> Result<()>) -> Result<Option<CudaGraph>> {
        let stream = self.gpu.stream.clone();
        let captured = match stream.begin_capture(cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
            Err(e) => Err(format!("cuStreamBeginCapture: {e:?}")),
            Ok(()) => {
                let ran = pass(self, t);
                let ended = stream.end_capture(cu::CUgraphInstantiate_flags(0));
                match (ran, ended) {
                    (Ok(()), Ok(Some(graph))) => Ok(graph),
                    (Err(e), _) => Err(e.to_string()),
                    (Ok(()), Err(e)) => Err(format!("cuStreamEndCapture: {e:?}")),
                    (Ok(()), Ok(None)) => Err("an empty graph".to_string()),
                }
            }
        };
        match captured {
            Ok(graph) => {
                graph.launch()?;
                Ok(Some(graph))
            }
            Err(why) => {
                abandon_capture(&stream)?;
                self.graphs_off = Some(format!("a capture failed ({why}); every pass runs without them"));
                self.graphs.clear();
                pass(self, t)?;
                Ok(None)
            }
        }
    }

    /// The layers forward for the loaded batch of `t` tokens, keeping what the backward needs.
    fn forward_pass(&mut self, t: usize) -> Result<()> {
        self.forward_layers(t, true)
    }

    /// The layers backward for the loaded batch of `t` tokens, from the gradient of the last
    /// layer's output that [`Self::head`] left in `s.dx`; with checkpointing each layer is
    /// recomputed from its input first.
    fn backward_pass(&mut self, t: usize) -> Result<()> {
        let h = self.cfg.hidden_size;
        let last = self.cfg.num_hidden_layers - 1;
        let one_chunk = self.moe_chunks(t).len() == 1;
        for l in (0..self.cfg.num_hidden_layers).rev() {
            // The last layer's activations are still in set 0 from the forward pass (only the head
            // ran since, and it writes none of them), and so are its experts' when the micro-batch
            // is one MoE chunk: recomputing them would write the same bits again.
            let kept = self.checkpointing && l == last;
            let kept_moe = kept && one_chunk;
            if self.checkpointing && !kept {
                // Recompute layer l from its input (the residual stream is free after the head).
                if let Some(host) = self.host_inputs.get(l) {
                    host.upload(&self.gpu, &mut vm(&mut self.s.x, t * h))?;
                } else {
                    let (inputs, x) = (&self.layer_inputs[l], &mut self.s.x);
                    self.gpu.stream.memcpy_dtod(&v(inputs, t * h), &mut vm(x, t * h))?;
                }
                self.layer_forward(l, t, false, Inputs::Recompute)?;
            }
            self.layer_backward(l, t, self.checkpointing && !kept, kept_moe)?;
        }
        Ok(())
    }

    /// Logits `[t, V]` of every position of one sequence (positions `0..t`), for tests and tools.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = self.run_sequence(ids)?;
        self.head_logits(0..t)
    }

    /// The logits of the last token of `ids` (decoding without a KV cache: the whole sequence is
    /// recomputed for each new token).
    pub fn last_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        let t = self.run_sequence(ids)?;
        self.head_logits(t - 1..t)
    }

    /// Runs one sequence (positions `0..t`) through every layer, leaving the residual stream in
    /// `s.x`; returns `t`.
    fn run_sequence(&mut self, ids: &[u32]) -> Result<usize> {
        let t = ids.len();
        let pos: Vec<u32> = (0..t as u32).collect();
        self.load_batch(ids, &pos, &vec![0; t], &[0..t])?;
        self.forward_layers(t, false)?;
        Ok(t)
    }

    /// Final norm and LM head of the residual stream's `rows`, [`HEAD_CHUNK`] rows at a time:
    /// their logits `[rows, V]` on the host.
    fn head_logits(&mut self, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let (h, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let eps = self.cfg.rms_norm_eps as f32;
        let n = rows.len();
        let gpu = &*self.gpu;
        let s = &mut self.s;
        rmsnorm_gpu(
            gpu,
            &s.x.slice(rows.start * h..rows.end * h),
            &self.w.norm.as_view(),
            eps,
            &mut vm(&mut s.hf, n * h),
            &mut vm(&mut s.rstd_f, n),
        )?;
        let mut out = Vec::with_capacity(n * vocab);
        for c0 in (0..n).step_by(HEAD_CHUNK) {
            let c = HEAD_CHUNK.min(n - c0);
            Self::gemm_xw(
                &self.blas,
                gpu,
                &mut s.bf,
                c,
                vocab,
                h,
                &s.hf.slice(c0 * h..(c0 + c) * h),
                &self.w.lm_head.as_view(),
                true,
                &mut vm(&mut s.logits, c * vocab),
                0.0,
                self.split,
            )?;
            let mut chunk = vec![0f32; c * vocab];
            gpu.stream.memcpy_dtoh(&v(&s.logits, c * vocab), &mut chunk)?;
            out.extend(chunk);
        }
        Ok(out)
    }
}

impl crate::chat::Generate for GpuEngine {
    /// Decoding without a KV cache: each new token reruns the whole sequence (prompt and the
    /// tokens so far), capped at the token budget the engine was built for.
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        choose: &mut dyn FnMut(&[f32]) -> u32,
    ) -> Result<Vec<u32>> {
        let mut seq = prompt.to_vec();
        let mut out = Vec::with_capacity(max_new);
        while out.len() < max_new && seq.len() < self.max_tokens {
            let next = choose(&self.last_logits(&seq)?);
            out.push(next);
            seq.push(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moe_chunks_bound_the_experts_activations_and_offload_drops_the_checkpoints() {
        let cfg = GptOssConfig::gpt_oss_20b();
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let at = |t, ckpt, chunk, off| activation_bytes(&cfg, t, 8, ckpt, chunk, off, Precision::Exact);
        // Up to one chunk, chunking changes nothing.
        assert_eq!(at(2048, true, MOE_CHUNK, false), at(2048, true, usize::MAX, false));
        // At 64K the experts' activations of one layer are bounded by the chunk: 24.6 GiB less.
        let (whole, chunked) = (at(65536, true, usize::MAX, false), at(65536, true, MOE_CHUNK, false));
        assert!(gib(whole - chunked) > 20.0, "{:.1} GiB saved", gib(whole - chunked));
        // Offloading removes exactly the layer inputs: (layers − 1) · t · hidden floats (the last
        // layer is not recomputed, so its input is not kept).
        let off = at(65536, true, MOE_CHUNK, true);
        assert_eq!(chunked - off, 4 * (cfg.num_hidden_layers - 1) * 65536 * cfg.hidden_size);
        // On the H100 the f32 part of this estimate said 35.29 GiB for the 64K run, whose engine
        // allocated 47.03 GiB with 11.75 of weights and 0.69 of LoRA: 34.59 of activations
        // (PERFORMANCE.md v2, before the shared scratch; the estimate counted one [t, hidden]
        // buffer, 0.70 GiB, that was never allocated). Without the last layer's input, which is
        // no longer kept, that is 34.59 − 0.70 = 33.89; without the two [t, hidden] buffers that
        // the fused residual adds (the combine's, the norms' backward) made unneeded, 1.41 less:
        // 32.48, plus the rotary table (0.02): 32.50.
        let heads = Heads { nq: 64, nkv: 8, d: 64 };
        let staging = 2 * staging_elems(&cfg, 65536, true, MOE_CHUNK, Precision::Exact);
        let qkv = 2 * attention::qkv_split_elems(heads, 65536, 65536, Mma::Split);
        let f32s = gib(chunked - staging - qkv);
        assert!((32.45..=32.9).contains(&f32s), "{f32s:.2}");
        // At 64K the largest staged op is attention's backward: its split of dout (64 heads) in
        // bf16 hi and lo, 64 padding rows per head, 1.0 GiB, more than an expert product's. The
        // split q, k and v (1.25 GiB) are kept beside the scratch from a layer's forward to its
        // backward: together what the backward staged when it split them itself.
        assert_eq!(staging, 2 * attention::split_backward_scratch_elems(heads, 65536, 65536, Mma::Split));
        assert_eq!(staging, 2 * 2 * 64 * (65536 + 64) * 64);
        assert_eq!(qkv, 2 * 2 * (64 + 2 * 8) * (65536 + 64) * 64);
        assert!(staging > 2 * mxfp4_scratch_elems(MOE_CHUNK * 4, 2 * cfg.intermediate_size, Mma::Split));
        // Without checkpointing the MoE runs as one chunk whatever moe_chunk says.
        assert_eq!(at(4096, false, 7, false), at(4096, false, usize::MAX, false));
        assert_eq!(chunk_tokens(10, true, 4), 4);
        assert_eq!(chunk_tokens(3, true, 4), 3);
        assert_eq!(chunk_tokens(10, false, 4), 10);
        assert_eq!(chunk_tokens(0, true, 4), 1);
    }

    #[test]
    fn routing_stats_count_the_row_tiles_of_each_expert() {
        let mut r = RoutingStats::default();
        // Experts of 300, 0, 129 and 1 rows.
        r.add(&[0, 300, 300, 429, 430]);
        assert_eq!(r, RoutingStats { plans: 1, slots: 430, tiles_128: 3 + 2 + 1, tiles_256: 2 + 1 + 1, max_rows: 300 });
        r.add(&[0, 256, 512]);
        assert_eq!(r, RoutingStats { plans: 2, slots: 942, tiles_128: 10, tiles_256: 6, max_rows: 300 });
    }
}
