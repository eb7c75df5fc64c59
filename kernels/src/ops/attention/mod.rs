//! Attention with per-head sinks, causal masking, an optional sliding window and packed-sequence
//! segments, for one row of tokens:
//!
//! `s_ij = (q_i · k_j) · scale` for visible keys; `M_i = max(max_j s_ij, S_h)`;
//! `Z_i = Σ_j exp(s_ij − M_i) + exp(S_h − M_i)`; `o_i = Σ_j exp(s_ij − M_i) / Z_i · v_j`;
//! `lse_i = M_i + ln Z_i` is kept for the backward pass. Key `j` is visible to query `i` when both
//! are in the same segment, `pos_j <= pos_i`, and, with a window `W`, `pos_i − pos_j < W`.
//!
//! Backward: `D_i = dO_i · O_i`, `p_ij = exp(s_ij − lse_i)`, `dv_j += p_ij dO_i`,
//! `ds_ij = p_ij (dO_i · v_j − D_i)`, `dq_i += ds_ij k_j scale`, `dk_j += ds_ij q_i scale` (summed
//! over the query heads that share the KV head), `dS_h −= Σ_i exp(S_h − lse_i) D_i`.
//!
//! The CPU reference ([`attention`], [`attention_backward`]) works on one row and tests
//! visibility pair by pair through [`Coords`]. The CUDA kernels ([`attention_fwd_gpu`],
//! [`attention_bwd_gpu`]) work on a whole batch of `T` tokens in flash style (O(T) memory,
//! online softmax) and take visibility as per-token index ranges built on the host by
//! [`visible_ranges`]. Their `lse` is token-major `[T, nq]`, the reference's is `[nq, T_row]` per
//! row: [`lse_token_major`] converts.

use std::collections::HashSet;
use std::ops::Range;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::Mma;
use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("attention.cu");
/// [`SRC`] compiled for [`Mma::Bf16`]: every product takes the operands' bf16 rounding once.
pub const SRC_ONE_PASS: &str = concat!("#define MMA_ONE_PASS 1\n", include_str!("attention.cu"));

/// Head layout: `nq` query heads share `nkv` key/value heads of width `d` (query head `h` uses
/// KV head `h / (nq / nkv)`).
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub nq: usize,
    pub nkv: usize,
    pub d: usize,
}

/// Token coordinates: positions and segment ids of the queries and the keys.
#[derive(Clone, Copy, Debug)]
pub struct Coords<'a> {
    pub q_pos: &'a [u32],
    pub k_pos: &'a [u32],
    pub q_seg: &'a [u32],
    pub k_seg: &'a [u32],
    pub window: Option<usize>,
}

impl Coords<'_> {
    #[inline]
    fn visible(&self, i: usize, j: usize) -> bool {
        let (qp, kp) = (self.q_pos[i], self.k_pos[j]);
        self.q_seg[i] == self.k_seg[j] && kp <= qp && self.window.is_none_or(|w| ((qp - kp) as usize) < w)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `q [Tq, nq·d]`, `k`, `v [Tk, nkv·d]`, `sinks [nq]` → `(o [Tq, nq·d], lse [nq, Tq])`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: &[f32],
    heads: Heads,
    c: Coords,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Heads { nq, nkv, d } = heads;
    let (tq, tk) = (c.q_pos.len(), c.k_pos.len());
    let group = nq / nkv;
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..nq)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let mut o = vec![0.0f32; tq * d];
            let mut lse = vec![0.0f32; tq];
            let mut s = vec![0.0f32; tk];
            for i in 0..tq {
                let qi = &q[i * nq * d + h * d..][..d];
                let mut m = sinks[h];
                for j in 0..tk {
                    if c.visible(i, j) {
                        s[j] = dot(qi, &k[j * nkv * d + g * d..][..d]) * scale;
                        m = m.max(s[j]);
                    }
                }
                let mut z = (sinks[h] - m).exp();
                let oi = &mut o[i * d..(i + 1) * d];
                for j in 0..tk {
                    if c.visible(i, j) {
                        let p = (s[j] - m).exp();
                        z += p;
                        for (a, b) in oi.iter_mut().zip(&v[j * nkv * d + g * d..][..d]) {
                            *a += p * b;
                        }
                    }
                }
                oi.iter_mut().for_each(|a| *a /= z);
                lse[i] = m + z.ln();
            }
            (o, lse)
        })
        .collect();
    let mut o = vec![0.0f32; tq * nq * d];
    let mut lse = Vec::with_capacity(nq * tq);
    for (h, (oh, lh)) in per_head.into_iter().enumerate() {
        for i in 0..tq {
            o[i * nq * d + h * d..][..d].copy_from_slice(&oh[i * d..(i + 1) * d]);
        }
        lse.extend(lh);
    }
    (o, lse)
}

/// Gradients of [`attention`]: `(dq, dk, dv, dsinks)` given `dout [Tq, nq·d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    heads: Heads,
    c: Coords,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let Heads { nq, nkv, d } = heads;
    let (tq, tk) = (c.q_pos.len(), c.k_pos.len());
    let group = nq / nkv;
    type HeadGrads = (Vec<f32>, Vec<f32>, Vec<f32>, f32);
    let per_head: Vec<HeadGrads> = (0..nq)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; tq * d], vec![0.0f32; tk * d], vec![0.0f32; tk * d]);
            let mut dsink = 0.0f32;
            for i in 0..tq {
                let qi = &q[i * nq * d + h * d..][..d];
                let doi = &dout[i * nq * d + h * d..][..d];
                let di = dot(doi, &o[i * nq * d + h * d..][..d]);
                let l = lse[h * tq + i];
                dsink -= (sinks[h] - l).exp() * di;
                for j in 0..tk {
                    if !c.visible(i, j) {
                        continue;
                    }
                    let kj = &k[j * nkv * d + g * d..][..d];
                    let vj = &v[j * nkv * d + g * d..][..d];
                    let p = (dot(qi, kj) * scale - l).exp();
                    let ds = p * (dot(doi, vj) - di) * scale;
                    for t in 0..d {
                        dq[i * d + t] += ds * kj[t];
                        dk[j * d + t] += ds * qi[t];
                        dv[j * d + t] += p * doi[t];
                    }
                }
            }
            (dq, dk, dv, dsink)
        })
        .collect();
    let mut dq = vec![0.0f32; tq * nq * d];
    let mut dk = vec![0.0f32; tk * nkv * d];
    let mut dv = vec![0.0f32; tk * nkv * d];
    let mut dsinks = vec![0.0f32; nq];
    for (h, (dqh, dkh, dvh, ds)) in per_head.into_iter().enumerate() {
        let g = h / group;
        for i in 0..tq {
            dq[i * nq * d + h * d..][..d].copy_from_slice(&dqh[i * d..(i + 1) * d]);
        }
        for j in 0..tk {
            for t in 0..d {
                dk[j * nkv * d + g * d + t] += dkh[j * d + t];
                dv[j * nkv * d + g * d + t] += dvh[j * d + t];
            }
        }
        dsinks[h] = ds;
    }
    (dq, dk, dv, dsinks)
}

/// `lse [nq, t]` (the reference's layout, one row) as `[t, nq]` (the GPU kernels' layout).
pub fn lse_token_major(lse: &[f32], nq: usize) -> Vec<f32> {
    let t = lse.len() / nq.max(1);
    (0..t * nq).map(|x| lse[(x % nq) * t + x / nq]).collect()
}

/// Visibility as index ranges over the `T` tokens of a batch whose keys are its queries: keys
/// visible to query `i` are exactly `klo[i]..khi[i]`, queries that see key `j` exactly
/// `qlo[j]..qhi[j]` (all `[T]`). A token in no row sees nothing and is seen by nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges {
    pub klo: Vec<u32>,
    pub khi: Vec<u32>,
    pub qlo: Vec<u32>,
    pub qhi: Vec<u32>,
}

/// The [`Ranges`] of a training batch: `pos`, `seg [T]` are the tokens' positions and segment ids,
/// `rows` the attention rows (disjoint, in order, inside `0..T`), `window` the sliding window.
/// Within a row every segment must be one contiguous run whose positions increase by 1; then
/// the visible keys of a query form one range, and this agrees with [`Coords`] on every row.
pub fn visible_ranges(pos: &[u32], seg: &[u32], rows: &[Range<usize>], window: Option<usize>) -> Result<Ranges> {
    let t = pos.len();
    let shape = |m: String| Err(Error::Shape(format!("visible_ranges: {m}")));
    if seg.len() != t {
        return shape(format!("seg has {} elements, expected {t} (one per position)", seg.len()));
    }
    if u32::try_from(t).is_err() {
        return shape(format!("{t} tokens do not fit the kernels' u32 indices"));
    }
    let own: Vec<u32> = (0..t as u32).collect();
    let mut r = Ranges { klo: own.clone(), khi: own.clone(), qlo: own.clone(), qhi: own };
    let mut prev_end = 0;
    let mut seen = HashSet::new();
    for row in rows {
        if row.start < prev_end || row.end < row.start || row.end > t {
            return shape(format!(
                "row {row:?} overlaps the previous row (which ends at {prev_end}) or lies outside the {t} tokens"
            ));
        }
        prev_end = row.end;
        seen.clear();
        let mut start = row.start;
        while start < row.end {
            let s = seg[start];
            if !seen.insert(s) {
                return shape(format!(
                    "token {start} starts a second run of segment {s} in row {row:?}; a segment must be contiguous"
                ));
            }
            let mut end = start + 1;
            while end < row.end && seg[end] == s {
                if pos[end - 1].checked_add(1) != Some(pos[end]) {
                    return shape(format!(
                        "token {end} has position {} after position {} in segment {s}; positions must increase by 1 within a segment",
                        pos[end], pos[end - 1]
                    ));
                }
                end += 1;
            }
            for i in start..end {
                let back = window.map_or(i + 1 - start, |w| w.min(i + 1 - start));
                let ahead = window.map_or(end - i, |w| w.min(end - i));
                r.klo[i] = (i + 1 - back) as u32;
                r.khi[i] = (i + 1) as u32;
                r.qhi[i] = (i + ahead) as u32;
            }
            start = end;
        }
    }
    Ok(r)
}

/// Warps per block of the one-warp-per-item kernels: `ATT_WARPS` in attention.cu.
const WARPS: usize = 8;
/// Largest head width: the widest padded width the tiled kernels are stamped for.
const MAX_D: usize = 128;
/// Warps per block of the tiled kernels (`FA_WARPS` in attention.cu) and rows per block, which is
/// also the length of each streamed tile (`FA_TILE`).
const TILE_WARPS: usize = 4;
const TILE: usize = 16 * TILE_WARPS;

/// The head width a tiled kernel is compiled for (`d` padded with zeros): its `_d<DP>` suffix.
fn padded_width(d: usize) -> usize {
    [16, 32, 64].into_iter().find(|&p| d <= p).unwrap_or(MAX_D)
}

/// Kernel `function` of the source compiled for `mma`.
fn function(gpu: &Gpu, mma: Mma, function: &str) -> Result<CudaFunction> {
    match mma {
        Mma::Split => gpu.function("attention", SRC, function),
        Mma::Bf16 => gpu.function("attention_bf16", SRC_ONE_PASS, function),
    }
}

/// Dynamic shared memory of a tiled kernel for padded width `dp`, mirroring the carve-up at the top
/// of `fwd`, `bwd_dq` and `bwd_dkdv` in attention.cu: `tiles` bf16 tile pairs
/// `[parts][TILE][dp + 8]` ([`Mma::parts`], `FA_PARTS` in attention.cu), the rows' ranges (`2·TILE + 2` u32) and `extra` floats.
fn tile_smem_bytes(dp: usize, mma: Mma, tiles: usize, extra: usize) -> usize {
    tiles * mma.parts() * TILE * (dp + 8) * 2 + (2 * TILE + 2) * 4 + extra * 4
}

/// Rows of each head in a split operand: `rows` and `TILE` zero rows after them, so a tile that
/// starts at any valid row stays inside its head.
fn split_rows(rows: usize) -> usize {
    rows + TILE
}

/// u16 elements of one split operand: `[parts][heads][rows + TILE][dp]`.
fn split_len(mma: Mma, rows: usize, heads: usize, d: usize) -> usize {
    mma.parts() * heads * split_rows(rows) * padded_width(d)
}

/// Blocks the dk/dv kernel should have at least, for an even load: its blocks own key tiles whose
/// causal lengths run from all query tiles down to one.
const DKDV_BLOCKS: usize = 2048;

/// Runs `hs` that the dk/dv kernel splits each KV head's query heads into (a divisor of the group):
/// the fewest that give [`DKDV_BLOCKS`] blocks over `tk` keys, else one per query head. A function
/// of the shapes alone, so the partial sums, and the bits, are the same on every card.
fn head_splits(heads: Heads, tk: usize) -> usize {
    let group = heads.nq / heads.nkv.max(1);
    let blocks = tk.div_ceil(TILE) * heads.nkv;
    (1..=group).find(|&hs| group.is_multiple_of(hs) && blocks * hs >= DKDV_BLOCKS).unwrap_or(group.max(1))
}

/// f32 elements of the dk/dv kernel's partial sums (`hs` each of dk and dv, none when `hs` is 1).
fn dkdv_parts_len(heads: Heads, tk: usize) -> usize {
    match head_splits(heads, tk) {
        1 => 0,
        hs => 2 * hs * tk * heads.nkv * heads.d,
    }
}

/// u16 elements of [`split_qkv_gpu`]'s output for `t` queries and `tk` keys: q, k and v split into
/// bf16 for the tiled kernels.
pub fn qkv_split_elems(heads: Heads, t: usize, tk: usize, mma: Mma) -> usize {
    split_len(mma, t, heads.nq, heads.d) + 2 * split_len(mma, tk, heads.nkv, heads.d)
}

/// Elements (u16) of [`Gpu`] scratch [`attention_bwd_split_gpu`] takes for `t` queries and `tk`
/// keys: the bf16 split of dout and the dk/dv kernel's f32 partial sums.
pub fn split_backward_scratch_elems(heads: Heads, t: usize, tk: usize, mma: Mma) -> usize {
    split_len(mma, t, heads.nq, heads.d) + 2 * dkdv_parts_len(heads, tk)
}

/// Elements (u16) of [`Gpu`] scratch the attention forward (`backward = false`) or backward
/// takes for `t` queries and `tk` keys: the bf16 splits of q, k and v (and dout), and in the
/// backward the dk/dv kernel's f32 partial sums.
pub fn scratch_elems(heads: Heads, t: usize, tk: usize, mma: Mma, backward: bool) -> usize {
    let bwd = if backward { split_backward_scratch_elems(heads, t, tk, mma) } else { 0 };
    qkv_split_elems(heads, t, tk, mma) + bwd
}

/// The largest of `need(n)` over batches of `n <= t` tokens (queries = keys), which a caller that
/// sizes its scratch once for its longest batch needs: the dK/dV partials do not grow with the
/// length (a length just below a block threshold takes more runs than one at it: 16,320 tokens of
/// gpt-oss-20b need 128 MiB of them, 16,384 none). Within one count of key tiles the need grows
/// with the length, so the longest of each count suffices.
fn up_to(t: usize, need: impl Fn(usize) -> usize) -> usize {
    (1..=t.div_ceil(TILE)).map(|k| need((k * TILE).min(t))).fold(need(t), usize::max)
}

/// [`scratch_elems`] of the backward that serves a batch of `t` tokens and every shorter one.
pub fn backward_scratch_elems_up_to(heads: Heads, t: usize, mma: Mma) -> usize {
    up_to(t, |n| scratch_elems(heads, n, n, mma, true))
}

/// [`split_backward_scratch_elems`] that serves a batch of `t` tokens and every shorter one.
pub fn split_backward_scratch_elems_up_to(heads: Heads, t: usize, mma: Mma) -> usize {
    up_to(t, |n| split_backward_scratch_elems(heads, n, n, mma))
}

/// `x [rows, heads·d]` split for the tiled kernels by `attention_split_f32` into `out`
/// ([`split_len`] long): bf16 bit patterns `[parts][heads][rows + TILE][dp]` (`dp` =
/// [`padded_width`]`(d)`), `hi = bf16(x)` and, for [`Mma::Split`], `lo = bf16(x − hi)`, zeros
/// past `d` and past `rows`.
/// With `rope` (`[rows, d/2, 2]` cos and sin, [`crate::ops::rope::rope_table_gpu`]) each head is
/// first rotated by the rotary embedding.
#[allow(clippy::too_many_arguments)]
fn split_heads_gpu(
    gpu: &Gpu,
    mma: Mma,
    x: &CudaView<'_, f32>,
    rows: usize,
    heads: usize,
    d: usize,
    rope: Option<&CudaView<'_, f32>>,
    out: &mut CudaViewMut<'_, u16>,
) -> Result<()> {
    let dp = padded_width(d);
    let n = heads * split_rows(rows) * dp;
    let pairs = n / 2;
    let shape = || Error::Shape(format!("attention: {rows} rows of {heads} heads exceed the split kernel's grid"));
    let blocks = u32::try_from(pairs.div_ceil(256)).map_err(|_| shape())?;
    let (rows32, heads32, d32, dp32) =
        (u32::try_from(rows).map_err(|_| shape())?, u32::try_from(heads).map_err(|_| shape())?, d as u32, dp as u32);
    expect("attention_split", "x", x.len(), rows * heads * d)?;
    expect("attention_split", "out", out.len(), split_len(mma, rows, heads, d))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    if let Some(cs) = rope {
        expect("attention_split", "rope table", cs.len(), rows * d)?;
    }
    let cs = rope.map(|cs| cs.device_ptr(&gpu.stream));
    let cs_ptr = cs.as_ref().map_or(0, |(p, _)| *p);
    let f = function(gpu, mma, "attention_split_f32")?;
    // SAFETY: attention_split_f32(unsigned* dst, const float* x, const float* cs, unsigned rows,
    // unsigned heads, unsigned d, unsigned dp): x holds rows·heads·d floats (checked above), cs is
    // null or rows·d floats (checked above, read for rows < rows and columns < d only), dst
    // parts·n bf16 = parts·n/2 u32 with n = heads·(rows + FA_TILE)·dp (FA_TILE = TILE), as many
    // parts as this module's FA_PARTS writes; d and dp are even (sizes() checks d), d <= dp; n > 0
    // (heads, dp > 0), one thread per u32 of a part, blocks·256 >= n/2.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(out)
            .arg(x)
            .arg(&cs_ptr)
            .arg(&rows32)
            .arg(&heads32)
            .arg(&d32)
            .arg(&dp32)
            .launch(cfg)
    }?;
    Ok(())
}

/// Kernel `name` + `_d<dp>` with its launch configuration: one block of `TILE_WARPS` warps per tile
/// of `TILE` rows, `blocks` blocks, and the shared memory of [`tile_smem_bytes`] for `smem`
/// (`[tiles, extra]`), allowed above the default 48 KiB.
fn tiled(
    gpu: &Gpu,
    mma: Mma,
    name: &str,
    dp: usize,
    blocks: usize,
    smem: [usize; 2],
) -> Result<(CudaFunction, LaunchConfig)> {
    let f = function(gpu, mma, &format!("{name}_d{dp}"))?;
    let bytes = tile_smem_bytes(dp, mma, smem[0], smem[1]);
    f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (32 * TILE_WARPS as u32, 1, 1),
        shared_mem_bytes: bytes as u32,
    };
    Ok((f, cfg))
}

fn expect(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!("{op}: {what} has {got} elements, expected {want}")))
    }
}

/// The batch's sizes, checked: `(T, Tk)` from `klo` and `k`, with heads the kernels support.
fn sizes(op: &str, heads: Heads, t: usize, k_len: usize) -> Result<(u32, u32)> {
    let Heads { nq, nkv, d } = heads;
    if nkv == 0 || nq == 0 || nq % nkv != 0 {
        return Err(Error::Shape(format!("{op}: {nq} query heads cannot share {nkv} KV heads evenly")));
    }
    if d == 0 || d % 2 != 0 || d > MAX_D {
        return Err(Error::Shape(format!("{op}: head width {d} is not supported (even, at most {MAX_D})")));
    }
    let tk = k_len / (nkv * d);
    expect(op, "k", k_len, tk * nkv * d)?;
    let blocks = (t.max(tk) * nq).div_ceil(WARPS);
    match (u32::try_from(t), u32::try_from(tk), i32::try_from(blocks), u32::try_from(nq * d)) {
        (Ok(t), Ok(tk), Ok(_), Ok(_)) => Ok((t, tk)),
        _ => Err(Error::Shape(format!("{op}: {t} queries and {tk} keys of {nq} heads exceed the kernels' grid"))),
    }
}

/// One warp per item, `WARPS` warps per block.
fn warp_grid(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `q [T, nq·d]`, `k`, `v [Tk, nkv·d]` split into `out` ([`qkv_split_elems`] u16) for
/// [`attention_fwd_split_gpu`] and [`attention_bwd_split_gpu`]: bf16 (hi, and lo for
/// [`Mma::Split`]), head-major, padded. With `rope` (`[T, d/2, 2]`, the cos and sin of
/// [`crate::ops::rope::rope_table_gpu`]; queries and keys are then the same tokens) q and k are
/// rotated by the rotary embedding first, each product and sum rounded on its own
/// ([`crate::ops::rope::rope_apply_table`]'s arithmetic), so `q` and `k` are the projections'
/// outputs and a caller needs no rotated copy. A split kept from the forward to the backward
/// spares the backward its splits.
#[allow(clippy::too_many_arguments)]
pub fn split_qkv_gpu(
    gpu: &Gpu,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    rope: Option<&CudaView<'_, f32>>,
    heads: Heads,
    mma: Mma,
    out: &mut CudaViewMut<'_, u16>,
) -> Result<()> {
    const OP: &str = "attention_split";
    let Heads { nq, nkv, d } = heads;
    let t = q.len() / (nq * d).max(1);
    let (_, tk32) = sizes(OP, heads, t, k.len())?;
    let tk = tk32 as usize;
    expect(OP, "q", q.len(), t * nq * d)?;
    expect(OP, "v", v.len(), k.len())?;
    expect(OP, "out", out.len(), qkv_split_elems(heads, t, tk, mma))?;
    if rope.is_some() && t != tk {
        return Err(Error::Shape(format!(
            "{OP}: the rotary table is for queries and keys of the same tokens, got {t} queries and {tk} keys"
        )));
    }
    let (mut qs, mut rest) = out.split_at_mut(split_len(mma, t, nq, d));
    let (mut ks, mut vs) = rest.split_at_mut(split_len(mma, tk, nkv, d));
    split_heads_gpu(gpu, mma, q, t, nq, d, rope, &mut qs)?;
    split_heads_gpu(gpu, mma, k, tk, nkv, d, rope, &mut ks)?;
    split_heads_gpu(gpu, mma, v, tk, nkv, d, None, &mut vs)
}

/// The q, k and v parts of a [`split_qkv_gpu`] output.
fn qkv_parts<'a>(
    qkv: &'a CudaView<'a, u16>,
    heads: Heads,
    t: usize,
    tk: usize,
    mma: Mma,
) -> (CudaView<'a, u16>, CudaView<'a, u16>, CudaView<'a, u16>) {
    let (lq, lk) = (split_len(mma, t, heads.nq, heads.d), split_len(mma, tk, heads.nkv, heads.d));
    (qkv.slice(0..lq), qkv.slice(lq..lq + lk), qkv.slice(lq + lk..lq + 2 * lk))
}

/// GPU forward over a batch of `T` queries: `q [T, nq·d]`, `k`, `v [Tk, nkv·d]`, `sinks [nq]`,
/// visible keys `klo..khi [T]` (u32, see [`Ranges`]) → `o [T, nq·d]`, `lse [T, nq]` (assigned).
/// A query with no visible key gets `o = 0`, `lse = S_h`. `d` must be even and at most 128.
/// q, k and v are first split into bf16 in the [`Gpu`]'s scratch ([`scratch_elems`] u16: 2 bytes
/// × hi/lo × heads × (rows + 64) × padded width each), which grows if it is smaller.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_gpu(
    gpu: &Gpu,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    sinks: &CudaView<'_, f32>,
    klo: &CudaView<'_, u32>,
    khi: &CudaView<'_, u32>,
    heads: Heads,
    scale: f32,
    mma: Mma,
    o: &mut CudaViewMut<'_, f32>,
    lse: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "attention_fwd";
    let Heads { nq, d, .. } = heads;
    let t = klo.len();
    let (_, tk32) = sizes(OP, heads, t, k.len())?;
    expect(OP, "q", q.len(), t * nq * d)?;
    expect(OP, "v", v.len(), k.len())?;
    fwd_checks(heads, t, sinks, khi, o, lse)?;
    if t == 0 {
        return Ok(());
    }
    gpu.with_scratch(scratch_elems(heads, t, tk32 as usize, mma, false), |mut buf| {
        split_qkv_gpu(gpu, q, k, v, None, heads, mma, &mut buf)?;
        attention_fwd_split_gpu(gpu, &buf.as_view(), tk32 as usize, sinks, klo, khi, heads, scale, mma, o, lse)
    })
}

/// The forward's checks of its other inputs and outputs for `t` queries.
fn fwd_checks(
    heads: Heads,
    t: usize,
    sinks: &CudaView<'_, f32>,
    khi: &CudaView<'_, u32>,
    o: &CudaViewMut<'_, f32>,
    lse: &CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "attention_fwd";
    expect(OP, "sinks", sinks.len(), heads.nq)?;
    expect(OP, "khi", khi.len(), t)?;
    expect(OP, "o", o.len(), t * heads.nq * heads.d)?;
    expect(OP, "lse", lse.len(), t * heads.nq)
}

/// [`attention_fwd_gpu`] on q, k and v already split by [`split_qkv_gpu`] (`qkv`, for `T =
/// klo.len()` queries and `tk` keys).
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_split_gpu(
    gpu: &Gpu,
    qkv: &CudaView<'_, u16>,
    tk: usize,
    sinks: &CudaView<'_, f32>,
    klo: &CudaView<'_, u32>,
    khi: &CudaView<'_, u32>,
    heads: Heads,
    scale: f32,
    mma: Mma,
    o: &mut CudaViewMut<'_, f32>,
    lse: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "attention_fwd";
    let Heads { nq, nkv, d } = heads;
    let t = klo.len();
    let (t32, tk32) = sizes(OP, heads, t, tk * nkv * d)?;
    fwd_checks(heads, t, sinks, khi, o, lse)?;
    if t == 0 {
        return Ok(());
    }
    expect(OP, "the split q, k and v", qkv.len(), qkv_split_elems(heads, t, tk, mma))?;
    let (f, cfg) = tiled(gpu, mma, "attention_fwd_f32", padded_width(d), t.div_ceil(TILE) * nq, [3, 0])?;
    let (qs, ks, vs) = qkv_parts(qkv, heads, t, tk, mma);
    let (nq32, nkv32, d32) = (nq as u32, nkv as u32, d as u32);
    // SAFETY: attention_fwd_f32_d<DP>(float* o, float* lse, const bf16* qs, const bf16* ks,
    // const bf16* vs, const float* sinks, const unsigned* klo, const unsigned* khi, unsigned T,
    // unsigned Tk, unsigned nq, unsigned nkv, unsigned d, float scale): o holds T·nq·d floats,
    // lse T·nq, sinks nq, klo and khi T (checked above); qs, ks and vs are split_heads_gpu's
    // [FA_PARTS][heads][rows + FA_TILE][DP] of q (T rows, nq heads), k and v (Tk rows, nkv
    // heads) for this module's FA_PARTS and DP = padded_width(d) (qkv's length checked above);
    // nkv divides nq and d <= DP. The kernel clamps the ranges to Tk and reads tiles that start
    // below T or Tk, so no read leaves the buffers. One block of 32·FA_WARPS threads per (query
    // tile, head), ceil(T / FA_TILE)·nq blocks, with the dynamic shared memory the kernel carves up
    // (tile_smem_bytes).
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(o)
            .arg(lse)
            .arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(sinks)
            .arg(klo)
            .arg(khi)
            .arg(&t32)
            .arg(&tk32)
            .arg(&nq32)
            .arg(&nkv32)
            .arg(&d32)
            .arg(&scale)
            .launch(cfg)
    }?;
    Ok(())
}

/// GPU backward of [`attention_fwd_gpu`] given its `o`, `lse` and `dout [T, nq·d]`: `dq [T, nq·d]`,
/// `dk`, `dv [Tk, nkv·d]` are assigned, `dsinks [nq]` is accumulated (`+=`, a parameter
/// gradient). `qlo..qhi [Tk]` are the queries that see each key (the transpose of `klo..khi`,
/// see [`Ranges`]); `delta_scratch [T·nq]` receives `D_i = dO_i · O_i`. Like the forward, splits
/// q, k, v and dout into bf16 in the [`Gpu`]'s scratch ([`scratch_elems`] with `backward`).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_gpu(
    gpu: &Gpu,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    sinks: &CudaView<'_, f32>,
    o: &CudaView<'_, f32>,
    lse: &CudaView<'_, f32>,
    dout: &CudaView<'_, f32>,
    klo: &CudaView<'_, u32>,
    khi: &CudaView<'_, u32>,
    qlo: &CudaView<'_, u32>,
    qhi: &CudaView<'_, u32>,
    heads: Heads,
    scale: f32,
    mma: Mma,
    delta_scratch: &mut CudaViewMut<'_, f32>,
    dq: &mut CudaViewMut<'_, f32>,
    dk: &mut CudaViewMut<'_, f32>,
    dv: &mut CudaViewMut<'_, f32>,
    dsinks: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    let Heads { nq, d, .. } = heads;
    let t = klo.len();
    let (_, tk32) = sizes(OP, heads, t, k.len())?;
    let tk = tk32 as usize;
    expect(OP, "q", q.len(), t * nq * d)?;
    expect(OP, "v", v.len(), k.len())?;
    expect(OP, "qlo", qlo.len(), tk)?;
    let lqkv = qkv_split_elems(heads, t, tk, mma);
    gpu.with_scratch(lqkv + split_backward_scratch_elems(heads, t, tk, mma), |mut buf| {
        let (mut qkv, rest) = buf.split_at_mut(lqkv);
        split_qkv_gpu(gpu, q, k, v, None, heads, mma, &mut qkv)?;
        let io = BwdIo { sinks, o, lse, dout, klo, khi, qlo, qhi, rope: None };
        backward(gpu, &qkv.as_view(), rest, io, heads, scale, mma, delta_scratch, dq, dk, dv, dsinks)
    })
}

/// [`attention_bwd_gpu`] on q, k and v already split by [`split_qkv_gpu`] (`qkv`, for `T =
/// klo.len()` queries and `Tk = qlo.len()` keys); takes [`split_backward_scratch_elems`] of the
/// [`Gpu`]'s scratch for the split of dout and the dk/dv partial sums. With `rope` (the table the
/// split rotated q and k with) `dq` and `dk` are the gradients of q and k before their rotation:
/// the rotation's transpose applied in the dq kernel's store (head widths of 16, 32, 64 or 128,
/// which the kernels hold unpadded) or after it, and after dk's sums; each product and sum rounded on its own,
/// as [`crate::ops::rope::rope_apply_table`] computes it with `inverse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_split_gpu(
    gpu: &Gpu,
    qkv: &CudaView<'_, u16>,
    rope: Option<&CudaView<'_, f32>>,
    sinks: &CudaView<'_, f32>,
    o: &CudaView<'_, f32>,
    lse: &CudaView<'_, f32>,
    dout: &CudaView<'_, f32>,
    klo: &CudaView<'_, u32>,
    khi: &CudaView<'_, u32>,
    qlo: &CudaView<'_, u32>,
    qhi: &CudaView<'_, u32>,
    heads: Heads,
    scale: f32,
    mma: Mma,
    delta_scratch: &mut CudaViewMut<'_, f32>,
    dq: &mut CudaViewMut<'_, f32>,
    dk: &mut CudaViewMut<'_, f32>,
    dv: &mut CudaViewMut<'_, f32>,
    dsinks: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (t, tk) = (klo.len(), qlo.len());
    expect("attention_bwd", "the split q, k and v", qkv.len(), qkv_split_elems(heads, t, tk, mma))?;
    if let Some(cs) = rope {
        if t != tk {
            return Err(Error::Shape(format!(
                "attention_bwd: the rotary table is for queries and keys of the same tokens, got {t} queries and {tk} keys"
            )));
        }
        expect("attention_bwd", "rope table", cs.len(), t * heads.d)?;
    }
    gpu.with_scratch(split_backward_scratch_elems(heads, t, tk, mma), |rest| {
        let io = BwdIo { sinks, o, lse, dout, klo, khi, qlo, qhi, rope };
        backward(gpu, qkv, rest, io, heads, scale, mma, delta_scratch, dq, dk, dv, dsinks)
    })
}

/// The backward's inputs besides the split q, k and v.
struct BwdIo<'a, 'b> {
    sinks: &'a CudaView<'b, f32>,
    o: &'a CudaView<'b, f32>,
    lse: &'a CudaView<'b, f32>,
    dout: &'a CudaView<'b, f32>,
    klo: &'a CudaView<'b, u32>,
    khi: &'a CudaView<'b, u32>,
    qlo: &'a CudaView<'b, u32>,
    qhi: &'a CudaView<'b, u32>,
    /// The rotary table `[T, d/2, 2]` when dq and dk are wanted before the rotation (checked).
    rope: Option<&'a CudaView<'b, f32>>,
}

/// The backward on split q, k and v, with `scratch` ([`split_backward_scratch_elems`] u16) for the
/// split of dout and the dk/dv partial sums.
#[allow(clippy::too_many_arguments)]
fn backward(
    gpu: &Gpu,
    qkv: &CudaView<'_, u16>,
    mut scratch: CudaViewMut<'_, u16>,
    io: BwdIo<'_, '_>,
    heads: Heads,
    scale: f32,
    mma: Mma,
    delta_scratch: &mut CudaViewMut<'_, f32>,
    dq: &mut CudaViewMut<'_, f32>,
    dk: &mut CudaViewMut<'_, f32>,
    dv: &mut CudaViewMut<'_, f32>,
    dsinks: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    let BwdIo { sinks, o, lse, dout, klo, khi, qlo, qhi, rope } = io;
    let Heads { nq, nkv, d } = heads;
    let (t, tk) = (klo.len(), qlo.len());
    let (t32, tk32) = sizes(OP, heads, t, tk * nkv * d)?;
    for (what, got, want) in [
        ("sinks", sinks.len(), nq),
        ("o", o.len(), t * nq * d),
        ("lse", lse.len(), t * nq),
        ("dout", dout.len(), t * nq * d),
        ("khi", khi.len(), t),
        ("qhi", qhi.len(), tk),
        ("delta_scratch", delta_scratch.len(), t * nq),
        ("dq", dq.len(), t * nq * d),
        ("dk", dk.len(), tk * nkv * d),
        ("dv", dv.len(), tk * nkv * d),
        ("dsinks", dsinks.len(), nq),
        ("scratch", scratch.len(), split_backward_scratch_elems(heads, t, tk, mma)),
    ] {
        expect(OP, what, got, want)?;
    }
    let (nq32, nkv32, d32) = (nq as u32, nkv as u32, d as u32);
    if tk > 0 && t == 0 {
        gpu.stream.memset_zeros(dk)?;
        gpu.stream.memset_zeros(dv)?;
    }
    if t == 0 {
        return Ok(());
    }
    let f = gpu.function("attention", SRC, "attention_delta_f32")?;
    // SAFETY: attention_delta_f32(float* delta, const float* o, const float* dout, unsigned T,
    // unsigned nq, unsigned d): o and dout hold T·nq·d floats, delta T·nq (checked above).
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&mut *delta_scratch)
            .arg(o)
            .arg(dout)
            .arg(&t32)
            .arg(&nq32)
            .arg(&d32)
            .launch(warp_grid(t * nq))
    }?;
    let delta = delta_scratch.as_view();
    let f = gpu.function("attention", SRC, "attention_dsinks_f32")?;
    let cfg = LaunchConfig { grid_dim: (nq32, 1, 1), block_dim: (32 * WARPS as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: attention_dsinks_f32(float* dsinks, const float* sinks, const float* lse,
    // const float* delta, unsigned T, unsigned nq): dsinks and sinks hold nq floats, lse and
    // delta T·nq (checked above); one block of 32·ATT_WARPS threads per head.
    unsafe {
        gpu.stream.launch_builder(&f).arg(dsinks).arg(sinks).arg(lse).arg(&delta).arg(&t32).arg(&nq32).launch(cfg)
    }?;
    let (qs, ks, vs) = qkv_parts(qkv, heads, t, tk, mma);
    let (mut dos, mut parts) = scratch.split_at_mut(split_len(mma, t, nq, d));
    split_heads_gpu(gpu, mma, dout, t, nq, d, None, &mut dos)?;
    let (f, cfg) = tiled(gpu, mma, "attention_bwd_dq_f32", padded_width(d), t.div_ceil(TILE) * nq, [4, 0])?;
    // The rotation's transpose in the dq kernel's store where a lane holds both columns of a pair.
    let fused = rope.filter(|_| d == padded_width(d));
    let cs = fused.map(|cs| cs.device_ptr(&gpu.stream));
    let cs_ptr = cs.as_ref().map_or(0, |(p, _)| *p);
    // SAFETY: attention_bwd_dq_f32_d<DP>(float* dq, const bf16* qs, const bf16* ks,
    // const bf16* vs, const bf16* dos, const float* lse, const float* delta,
    // const unsigned* klo, const unsigned* khi, unsigned T, unsigned Tk, unsigned nq,
    // unsigned nkv, unsigned d, float scale, const float* cs): dq holds T·nq·d floats, lse and
    // delta T·nq, klo and khi T (checked above); qs, dos (T rows, nq heads), ks and vs (Tk rows,
    // nkv heads) are split_heads_gpu's [FA_PARTS][heads][rows + FA_TILE][DP] for this module,
    // d <= DP (qkv's length checked by the callers); cs is null or T·d floats (checked by
    // attention_bwd_split_gpu) with d = DP; ranges are clamped to Tk in the kernel and tiles
    // start below T or Tk; one block of 32·FA_WARPS threads per (query tile, head) with its
    // dynamic shared memory.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&mut *dq)
            .arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&dos.as_view())
            .arg(lse)
            .arg(&delta)
            .arg(klo)
            .arg(khi)
            .arg(&t32)
            .arg(&tk32)
            .arg(&nq32)
            .arg(&nkv32)
            .arg(&d32)
            .arg(&scale)
            .arg(&cs_ptr)
            .launch(cfg)
    }?;
    drop(cs);
    if let (Some(cs), None) = (rope, fused) {
        unrope_gpu(gpu, dq, cs, t, nq, d)?;
    }
    if tk == 0 {
        return Ok(());
    }
    let hs = head_splits(heads, tk);
    let n = tk * nkv * d;
    let blocks = tk.div_ceil(TILE) * nkv * hs;
    let (f, cfg) = tiled(gpu, mma, "attention_bwd_dkdv_f32", padded_width(d), blocks, [4, 2 * TILE])?;
    let hs32 = hs as u32;
    // SAFETY: attention_bwd_dkdv_f32_d<DP>(float* dk, float* dv, const bf16* qs,
    // const bf16* ks, const bf16* vs, const bf16* dos, const float* lse, const float* delta,
    // const unsigned* qlo, const unsigned* qhi, unsigned T, unsigned Tk, unsigned nq,
    // unsigned nkv, unsigned d, float scale, unsigned hs): dk_out and dv_out hold hs·Tk·nkv·d
    // floats (dk, dv when hs = 1, else the partial sums), lse and delta T·nq, qlo and qhi
    // Tk (checked above); hs divides nq / nkv; qs, ks, vs and dos as for the dq kernel;
    // ranges are clamped to T in the kernel and tiles start below T or Tk, d <= DP; one
    // block of 32·FA_WARPS threads per (key tile, KV head, head split) with its dynamic
    // shared memory.
    let launch = |dk_out: &mut CudaViewMut<'_, f32>, dv_out: &mut CudaViewMut<'_, f32>| unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dk_out)
            .arg(dv_out)
            .arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&dos.as_view())
            .arg(lse)
            .arg(&delta)
            .arg(qlo)
            .arg(qhi)
            .arg(&t32)
            .arg(&tk32)
            .arg(&nq32)
            .arg(&nkv32)
            .arg(&d32)
            .arg(&scale)
            .arg(&hs32)
            .launch(cfg)
    };
    if hs == 1 {
        launch(dk, dv)?;
        return match rope {
            Some(cs) => unrope_gpu(gpu, dk, cs, tk, nkv, d),
            None => Ok(()),
        };
    }
    // The partial sums, 2·hs·n f32 after the split of dout (its u16 length, a split length, is a
    // multiple of 32: 64-byte aligned).
    // SAFETY: f32 has no invalid bit patterns; the view holds 2·dkdv_parts_len u16.
    let mut p =
        unsafe { parts.transmute_mut::<f32>(2 * hs * n) }.expect("split_backward_scratch_elems counts the parts");
    let (mut pk, mut pv) = p.split_at_mut(hs * n);
    launch(&mut pk, &mut pv)?;
    let f = function(gpu, mma, "attention_sum_parts_f32")?;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let n64 = n as u64;
    let (pk, pv) = (pk.as_view(), pv.as_view());
    // SAFETY: attention_sum_parts_f32(float* out, const float* parts, unsigned long long
    // n, unsigned hs): dk and dv hold n = Tk·nkv·d floats (checked above), pk and
    // pv hs·n each; one thread per element.
    unsafe { gpu.stream.launch_builder(&f).arg(&mut *dk).arg(&pk).arg(&n64).arg(&hs32).launch(cfg) }?;
    // SAFETY: as above.
    unsafe { gpu.stream.launch_builder(&f).arg(&mut *dv).arg(&pv).arg(&n64).arg(&hs32).launch(cfg) }?;
    match rope {
        Some(cs) => unrope_gpu(gpu, dk, cs, tk, nkv, d),
        None => Ok(()),
    }
}

/// `x [rows, heads·d]` in place: the gradient with respect to rows rotated with `cs` (`[rows, d/2,
/// 2]`, checked by the caller) turned into the one before the rotation (`attention_unrope_f32`).
fn unrope_gpu(
    gpu: &Gpu,
    x: &mut CudaViewMut<'_, f32>,
    cs: &CudaView<'_, f32>,
    rows: usize,
    heads: usize,
    d: usize,
) -> Result<()> {
    let n = rows * heads * (d / 2);
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("attention", SRC, "attention_unrope_f32")?;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (rows32, heads32, d32) = (rows as u32, heads as u32, d as u32);
    // SAFETY: attention_unrope_f32(float* x, const float* cs, unsigned rows, unsigned heads,
    // unsigned d): x holds rows·heads·d floats and cs rows·d (checked by the callers; rows,
    // heads and d fit u32 by sizes()); one thread per (row, head, column < d/2).
    unsafe { gpu.stream.launch_builder(&f).arg(x).arg(cs).arg(&rows32).arg(&heads32).arg(&d32).launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fd_check_f64, randn};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const H: Heads = Heads { nq: 4, nkv: 2, d: 8 };

    /// Straight from the definition with an explicit mask matrix, in f64.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sinks: &[f32],
        mask: &dyn Fn(usize, usize) -> bool,
        t: usize,
    ) -> Vec<f64> {
        let w = |x: &[f32]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
        naive64(&w(q), &w(k), &w(v), &w(sinks), mask, t)
    }

    fn naive64(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        sinks: &[f64],
        mask: &dyn Fn(usize, usize) -> bool,
        t: usize,
    ) -> Vec<f64> {
        let Heads { nq, nkv, d } = H;
        let mut out = vec![0.0f64; t * nq * d];
        for h in 0..nq {
            let g = h / (nq / nkv);
            for i in 0..t {
                let s: Vec<Option<f64>> = (0..t)
                    .map(|j| {
                        mask(i, j).then(|| {
                            (0..d).map(|x| q[i * nq * d + h * d + x] * k[j * nkv * d + g * d + x]).sum::<f64>() * 0.25
                        })
                    })
                    .collect();
                let z: f64 = s.iter().flatten().map(|x| x.exp()).sum::<f64>() + sinks[h].exp();
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        for x in 0..d {
                            out[i * nq * d + h * d + x] += sj.exp() / z * v[j * nkv * d + g * d + x];
                        }
                    }
                }
            }
        }
        out
    }

    fn inputs(t: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        (randn(seed, t * 32, 1.5), randn(seed + 1, t * 16, 1.5), randn(seed + 2, t * 16, 1.0), randn(seed + 3, 4, 1.0))
    }

    fn check(t: usize, window: Option<usize>, seg: &[u32], pos: &[u32]) {
        let (q, k, v, s) = inputs(t, 10 + t as u64);
        let c = Coords { q_pos: pos, k_pos: pos, q_seg: seg, k_seg: seg, window };
        let (o, _) = attention(&q, &k, &v, &s, H, c, 0.25);
        let want = naive(
            &q,
            &k,
            &v,
            &s,
            &|i, j| seg[i] == seg[j] && pos[j] <= pos[i] && window.is_none_or(|w| ((pos[i] - pos[j]) as usize) < w),
            t,
        );
        for (a, b) in o.iter().zip(&want) {
            assert!((*a as f64 - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn window_shorter_than_sequence() {
        let pos: Vec<u32> = (0..9).collect();
        check(9, Some(3), &[0; 9], &pos);
    }

    #[test]
    fn window_longer_than_sequence_equals_full() {
        let pos: Vec<u32> = (0..5).collect();
        check(5, Some(64), &[0; 5], &pos);
        check(5, None, &[0; 5], &pos);
    }

    #[test]
    fn single_token() {
        check(1, Some(4), &[0], &[0]);
    }

    #[test]
    fn packed_segments_do_not_see_each_other() {
        check(7, Some(2), &[0, 0, 0, 1, 1, 1, 1], &[0, 1, 2, 0, 1, 2, 3]);
        check(7, None, &[0, 0, 0, 1, 1, 1, 1], &[0, 1, 2, 0, 1, 2, 3]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let t = 6;
        let pos: Vec<u32> = (0..t as u32).collect();
        let seg = vec![0u32; t];
        let c = Coords { q_pos: &pos, k_pos: &pos, q_seg: &seg, k_seg: &seg, window: Some(3) };
        let (q, k, v, s) = inputs(t, 77);
        let dout = randn(90, q.len(), 1.0);
        let (o, lse) = attention(&q, &k, &v, &s, H, c, 0.25);
        let (dq, dk, dv, ds) = attention_backward(&q, &k, &v, &s, &o, &lse, &dout, H, c, 0.25);
        // f64 reference: the definition with the window-3 causal mask, Σ dout · o.
        let mask = |i: usize, j: usize| j <= i && i - j < 3;
        let loss = |q: &[f64], k: &[f64], v: &[f64], s: &[f64]| -> f64 {
            naive64(q, k, v, s, &mask, t).iter().zip(&dout).map(|(a, b)| a * *b as f64).sum()
        };
        let w = |x: &[f32]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
        let (q6, k6, v6, s6) = (w(&q), w(&k), w(&v), w(&s));
        fd_check_f64(&q, &dq, |x| loss(x, &k6, &v6, &s6), 1e-4);
        fd_check_f64(&k, &dk, |x| loss(&q6, x, &v6, &s6), 1e-4);
        fd_check_f64(&v, &dv, |x| loss(&q6, &k6, x, &s6), 1e-4);
        fd_check_f64(&s, &ds, |x| loss(&q6, &k6, &v6, x), 1e-4);
    }

    /// Random training batches: rows of packed segments, each starting at some position.
    fn random_batch(rng: &mut ChaCha8Rng) -> (Vec<u32>, Vec<u32>, Vec<Range<usize>>) {
        let (mut pos, mut seg, mut rows) = (vec![], vec![], vec![]);
        for _ in 0..rng.gen_range(1..4) {
            let start = pos.len();
            for s in 0..rng.gen_range(1..4u32) {
                let first = rng.gen_range(0..5u32);
                for p in 0..rng.gen_range(1..9u32) {
                    pos.push(first + p);
                    seg.push(3 * s + 1);
                }
            }
            rows.push(start..pos.len());
        }
        (pos, seg, rows)
    }

    fn check_ranges_agree_with_coords(pos: &[u32], seg: &[u32], rows: &[Range<usize>], window: Option<usize>) {
        let r = visible_ranges(pos, seg, rows, window).unwrap();
        let t = pos.len();
        let row_of = |i: usize| rows.iter().find(|r| r.contains(&i));
        for i in 0..t {
            for j in 0..t {
                let want = match (row_of(i), row_of(j)) {
                    (Some(a), Some(b)) if a == b => {
                        let x = a.clone();
                        let c = Coords {
                            q_pos: &pos[x.clone()],
                            k_pos: &pos[x.clone()],
                            q_seg: &seg[x.clone()],
                            k_seg: &seg[x],
                            window,
                        };
                        c.visible(i - a.start, j - a.start)
                    }
                    _ => false,
                };
                let by_query = (r.klo[i] as usize..r.khi[i] as usize).contains(&j);
                let by_key = (r.qlo[j] as usize..r.qhi[j] as usize).contains(&i);
                assert_eq!(
                    by_query, want,
                    "key {j} for query {i}, window {window:?}, pos {pos:?}, seg {seg:?}, rows {rows:?}"
                );
                assert_eq!(
                    by_key, want,
                    "query {i} for key {j}, window {window:?}, pos {pos:?}, seg {seg:?}, rows {rows:?}"
                );
            }
        }
    }

    #[test]
    fn visible_ranges_agree_with_coords_on_random_packed_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..200 {
            let (pos, seg, rows) = random_batch(&mut rng);
            let t = pos.len();
            for window in [None, Some(0), Some(1), Some(2), Some(5), Some(t + 3)] {
                check_ranges_agree_with_coords(&pos, &seg, &rows, window);
            }
        }
        for window in [None, Some(1), Some(4)] {
            check_ranges_agree_with_coords(&[7], &[0], &[0..1], window);
        }
    }

    #[test]
    fn tokens_outside_rows_see_nothing() {
        let pos = [0, 1, 2, 0, 1];
        let r = visible_ranges(&pos, &[0; 5], &[0..2, 3..5], None).unwrap();
        assert_eq!((r.klo[2], r.khi[2], r.qlo[2], r.qhi[2]), (2, 2, 2, 2));
        check_ranges_agree_with_coords(&pos, &[0; 5], &[0..2, 3..5], None);
    }

    #[test]
    fn visible_ranges_reject_what_ranges_cannot_express() {
        let err = |pos: &[u32], seg: &[u32], rows: &[Range<usize>]| {
            visible_ranges(pos, seg, rows, None).unwrap_err().to_string()
        };
        let e = err(&[0, 1, 3], &[0, 0, 0], &[0..3]);
        assert!(e.contains("token 2") && e.contains("increase by 1"), "{e}");
        let e = err(&[0, 1, 0, 2], &[0, 0, 1, 0], &[0..4]);
        assert!(e.contains("token 3") && e.contains("contiguous"), "{e}");
        let e = err(&[0, 1, 2], &[0, 0, 0], &[0..2, 1..3]);
        assert!(e.contains("overlaps"), "{e}");
        let e = err(&[0, 1, 2], &[0, 0, 0], &[0..4]);
        assert!(e.contains("outside"), "{e}");
        let e = err(&[0, 1, 2], &[0, 0], &[0..2]);
        assert!(e.contains("seg has 2 elements, expected 3"), "{e}");
        // The same segment id in two rows is two sequences: allowed.
        assert!(visible_ranges(&[0, 1, 0, 1], &[0, 0, 0, 0], &[0..2, 2..4], None).is_ok());
    }

    #[test]
    fn unsupported_heads_are_shape_errors() {
        let e = |h: Heads, k_len: usize| sizes("attention_fwd", h, 4, k_len).unwrap_err().to_string();
        assert!(e(Heads { nq: 4, nkv: 2, d: 15 }, 4 * 2 * 15).contains("head width 15"));
        assert!(e(Heads { nq: 4, nkv: 2, d: 130 }, 4 * 2 * 130).contains("head width 130"));
        assert!(e(Heads { nq: 6, nkv: 4, d: 16 }, 4 * 4 * 16).contains("6 query heads"));
        assert!(e(Heads { nq: 4, nkv: 2, d: 16 }, 33).contains("k has 33 elements, expected 32"));
        assert_eq!(sizes("attention_fwd", Heads { nq: 64, nkv: 8, d: 64 }, 3, 5 * 8 * 64).unwrap(), (3, 5));
    }

    #[test]
    fn dkdv_head_splits_depend_on_the_shapes_alone() {
        let h20b = Heads { nq: 64, nkv: 8, d: 64 };
        // 32 key tiles x 8 KV heads: a block per query head; 128 x 8: two runs; then one.
        assert_eq!(head_splits(h20b, 2048), 8);
        assert_eq!(head_splits(h20b, 8192), 2);
        assert_eq!(head_splits(h20b, 16384), 1);
        assert_eq!(head_splits(h20b, 1), 8);
        assert_eq!(head_splits(Heads { nq: 4, nkv: 4, d: 64 }, 64), 1);
        assert_eq!(head_splits(Heads { nq: 12, nkv: 2, d: 64 }, 64 * 200), 6);
        assert_eq!(head_splits(Heads { nq: 12, nkv: 2, d: 64 }, 64 * 400), 3);
        // The partial sums take hs copies of dk and dv: 64 MiB at 2K and at 8K tokens.
        assert_eq!(4 * dkdv_parts_len(h20b, 2048), 64 << 20);
        assert_eq!(4 * dkdv_parts_len(h20b, 8192), 64 << 20);
        assert_eq!(dkdv_parts_len(h20b, 16384), 0);
        let splits = split_len(Mma::Bf16, 2048, 64, 64) * 2 + split_len(Mma::Bf16, 2048, 8, 64) * 2;
        assert_eq!(scratch_elems(h20b, 2048, 2048, Mma::Bf16, true), splits + 2 * dkdv_parts_len(h20b, 2048));
        // Not monotone in the length: just below 16K the partials come back, at 128 MiB.
        assert_eq!(4 * dkdv_parts_len(h20b, 16320), 2 * 2 * 16320 * 512 * 4);
        assert!(
            scratch_elems(h20b, 16320, 16320, Mma::Bf16, true) > scratch_elems(h20b, 16384, 16384, Mma::Bf16, true)
        );
    }

    #[test]
    fn backward_scratch_up_to_a_length_serves_every_shorter_one() {
        for (heads, mma) in [
            (Heads { nq: 64, nkv: 8, d: 64 }, Mma::Bf16),
            (Heads { nq: 64, nkv: 8, d: 64 }, Mma::Split),
            (Heads { nq: 12, nkv: 2, d: 16 }, Mma::Bf16),
        ] {
            let mut most = 0;
            for t in 0..=20_000 {
                most = most.max(scratch_elems(heads, t, t, mma, true));
                let up_to = backward_scratch_elems_up_to(heads, t, mma);
                assert_eq!(up_to, most, "{heads:?} {mma:?}: {t} tokens");
            }
        }
        let h20b = Heads { nq: 64, nkv: 8, d: 64 };
        assert!(
            backward_scratch_elems_up_to(h20b, 16384, Mma::Bf16) > scratch_elems(h20b, 16384, 16384, Mma::Bf16, true)
        );
        // At 64K the splits of the full length dominate.
        assert_eq!(
            backward_scratch_elems_up_to(h20b, 65536, Mma::Split),
            scratch_elems(h20b, 65536, 65536, Mma::Split, true)
        );
    }

    #[test]
    fn lse_token_major_transposes_heads_and_tokens() {
        // [nq = 2, t = 3] → [t = 3, nq = 2]
        assert_eq!(lse_token_major(&[1.0, 2.0, 3.0, 10.0, 20.0, 30.0], 2), vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
    }

    /// The GPU kernels against the CPU reference on whole batches.
    mod gpu {
        use super::super::*;
        use crate::testing::{assert_close, randn};
        use cudarc::driver::CudaSlice;

        struct Case {
            heads: Heads,
            /// Segment lengths of each row.
            rows: Vec<Vec<usize>>,
            window: Option<usize>,
            /// Sinks are `offset + uniform(−spread, spread)`.
            sink_offset: f32,
            sink_spread: f32,
            /// Every buffer sits this many elements into its allocation (odd: not 16-byte aligned).
            view_offset: usize,
            seed: u64,
            mma: Mma,
        }

        impl Case {
            fn new(heads: (usize, usize, usize), rows: &[&[usize]], window: Option<usize>) -> Self {
                let (nq, nkv, d) = heads;
                Case {
                    heads: Heads { nq, nkv, d },
                    rows: rows.iter().map(|r| r.to_vec()).collect(),
                    window,
                    sink_offset: 0.0,
                    sink_spread: 1.0,
                    view_offset: 0,
                    mma: Mma::Split,
                    seed: 1 + rows.iter().flat_map(|r| r.iter()).sum::<usize>() as u64 * 31 + d as u64,
                }
            }
        }

        fn max_abs(x: &[f32]) -> f32 {
            x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
        }

        fn run(c: Case) {
            let Heads { nq, nkv, d } = c.heads;
            let (qw, kw) = (nq * d, nkv * d);
            let (mut pos, mut seg, mut rows) = (vec![], vec![], vec![]);
            for (r, lens) in c.rows.iter().enumerate() {
                let start = pos.len();
                for (s, &n) in lens.iter().enumerate() {
                    let first = ((r * 7 + s * 3) % 5) as u32;
                    pos.extend(first..first + n as u32);
                    seg.extend(std::iter::repeat_n(s as u32, n));
                }
                rows.push(start..pos.len());
            }
            let t = pos.len();
            let seed = c.seed;
            let q = randn(seed, t * qw, 1.5);
            let k = randn(seed + 1, t * kw, 1.5);
            let v = randn(seed + 2, t * kw, 1.0);
            let sinks: Vec<f32> = randn(seed + 3, nq, c.sink_spread).iter().map(|s| s + c.sink_offset).collect();
            let dout = randn(seed + 4, t * qw, 1.0);
            let dsinks_before = randn(seed + 5, nq, 1.0);
            let scale = 1.0 / (d as f32).sqrt();

            // CPU reference, row by row.
            let (mut o, mut lse) = (vec![0.0f32; t * qw], vec![0.0f32; t * nq]);
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; t * qw], vec![0.0f32; t * kw], vec![0.0f32; t * kw]);
            let mut dsinks = dsinks_before.clone();
            for r in &rows {
                let x = r.clone();
                let cs = Coords {
                    q_pos: &pos[x.clone()],
                    k_pos: &pos[x.clone()],
                    q_seg: &seg[x.clone()],
                    k_seg: &seg[x],
                    window: c.window,
                };
                let (qs, ks, vs) =
                    (&q[r.start * qw..r.end * qw], &k[r.start * kw..r.end * kw], &v[r.start * kw..r.end * kw]);
                let (or, lr) = attention(qs, ks, vs, &sinks, c.heads, cs, scale);
                let dor = &dout[r.start * qw..r.end * qw];
                let (gq, gk, gv, gs) = attention_backward(qs, ks, vs, &sinks, &or, &lr, dor, c.heads, cs, scale);
                o[r.start * qw..r.end * qw].copy_from_slice(&or);
                lse[r.start * nq..r.end * nq].copy_from_slice(&lse_token_major(&lr, nq));
                dq[r.start * qw..r.end * qw].copy_from_slice(&gq);
                dk[r.start * kw..r.end * kw].copy_from_slice(&gk);
                dv[r.start * kw..r.end * kw].copy_from_slice(&gv);
                dsinks.iter_mut().zip(&gs).for_each(|(a, b)| *a += b);
            }

            let gpu = Gpu::new(0).expect("a GPU");
            let s = &gpu.stream;
            let off = c.view_offset;
            let up =
                |x: &[f32]| -> CudaSlice<f32> { s.clone_htod(&[&randn(seed + 12, off, 9.0), x].concat()).unwrap() };
            let up32 = |x: &[u32]| -> CudaSlice<u32> { s.clone_htod(&[&vec![7; off], x].concat()).unwrap() };
            let ranges = visible_ranges(&pos, &seg, &rows, c.window).unwrap();
            let (qd, kd, vd, sd, dod) = (up(&q), up(&k), up(&v), up(&sinks), up(&dout));
            let (klo, khi, qlo, qhi) = (up32(&ranges.klo), up32(&ranges.khi), up32(&ranges.qlo), up32(&ranges.qhi));
            // Outputs start as garbage, not zeros: the kernels must assign every element.
            let (mut od, mut lsed) = (up(&randn(seed + 6, t * qw, 9.0)), up(&randn(seed + 7, t * nq, 9.0)));
            let mut delta = up(&randn(seed + 8, t * nq, 9.0));
            let mut dqd = up(&randn(seed + 9, t * qw, 9.0));
            let (mut dkd, mut dvd) = (up(&randn(seed + 10, t * kw, 9.0)), up(&randn(seed + 11, t * kw, 9.0)));
            let mut dsd = up(&dsinks_before);
            attention_fwd_gpu(
                &gpu,
                &qd.slice(off..),
                &kd.slice(off..),
                &vd.slice(off..),
                &sd.slice(off..),
                &klo.slice(off..),
                &khi.slice(off..),
                c.heads,
                scale,
                c.mma,
                &mut od.slice_mut(off..),
                &mut lsed.slice_mut(off..),
            )
            .unwrap();
            attention_bwd_gpu(
                &gpu,
                &qd.slice(off..),
                &kd.slice(off..),
                &vd.slice(off..),
                &sd.slice(off..),
                &od.slice(off..),
                &lsed.slice(off..),
                &dod.slice(off..),
                &klo.slice(off..),
                &khi.slice(off..),
                &qlo.slice(off..),
                &qhi.slice(off..),
                c.heads,
                scale,
                c.mma,
                &mut delta.slice_mut(off..),
                &mut dqd.slice_mut(off..),
                &mut dkd.slice_mut(off..),
                &mut dvd.slice_mut(off..),
                &mut dsd.slice_mut(off..),
            )
            .unwrap();
            let down = |x: &CudaSlice<f32>| s.clone_dtoh(&x.slice(off..)).unwrap();
            let what =
                |name: &str| format!("{name} (nq {nq}, nkv {nkv}, d {d}, rows {:?}, window {:?})", c.rows, c.window);
            // Forward: every output is a softmax-weighted mean of at most T values (or a log-sum-exp),
            // f32 on both sides in a different order (online vs two-pass): errors ~ sqrt(T)·6e-8
            // of the largest value, so 1e-5 of the tensor's largest |value| plus rtol 1e-4.
            if c.mma == Mma::Bf16 {
                // Operands rounded to bf16 (2^-9 relative) once per product: a sum of n such
                // terms errs by ~2^-9 of the terms' size, so 2e-2 of the tensor's largest |value|
                // (dk sums over the group's heads and the window: up to ~1000 rounded terms).
                for (name, got, want) in [
                    ("o", &od, &o),
                    ("lse", &lsed, &lse),
                    ("dq", &dqd, &dq),
                    ("dk", &dkd, &dk),
                    ("dv", &dvd, &dv),
                    ("dsinks", &dsd, &dsinks),
                ] {
                    let (g, w) = (down(got), want);
                    let err = g.iter().zip(w.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    println!("{} (Mma::Bf16): max error {err:.2e} of max |value| {:.2e}", what(name), max_abs(w));
                    assert_close(&format!("{} (Mma::Bf16)", what(name)), &g, w, 2e-2 * max_abs(w) + 1e-6, 2e-2);
                }
                return;
            }
            assert_close(&what("o"), &down(&od), &o, 1e-5 * max_abs(&o) + 1e-7, 1e-4);
            assert_close(&what("lse"), &down(&lsed), &lse, 1e-5 * max_abs(&lse), 1e-5);
            // Backward: each element sums up to (window or T) · (nq / nkv) signed terms that
            // cancel, so an element's error is bounded by the terms' size (≈ the tensor's largest
            // |value|) times n·6e-8 ≈ 6e-5 for n ≈ 1000, not by its own size: atol 1e-4 of the
            // tensor's largest |value|, rtol 1e-4. dsinks sums T terms the same way.
            for (name, got, want) in
                [("dq", &dqd, &dq), ("dk", &dkd, &dk), ("dv", &dvd, &dv), ("dsinks", &dsd, &dsinks)]
            {
                assert_close(&what(name), &down(got), want, 1e-4 * max_abs(want) + 1e-7, 1e-4);
            }
        }

        /// CPU reference of `attention_split_f32`: `x [rows, heads·d]` → bf16 bits
        /// `[parts][heads][rows + TILE][dp]`, zeros past `d` and past `rows`.
        fn split_reference(x: &[f32], rows: usize, heads: usize, d: usize, mma: Mma) -> Vec<u16> {
            let (dp, rp) = (padded_width(d), split_rows(rows));
            let n = heads * rp * dp;
            let mut out = vec![0u16; mma.parts() * n];
            for h in 0..heads {
                for r in 0..rows {
                    for c in 0..d {
                        let v = x[r * heads * d + h * d + c];
                        let hi = half::bf16::from_f32(v);
                        let at = (h * rp + r) * dp + c;
                        out[at] = hi.to_bits();
                        if mma == Mma::Split {
                            out[n + at] = half::bf16::from_f32(v - hi.to_f32()).to_bits();
                        }
                    }
                }
            }
            out
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn split_pads_heads_and_rows_with_zeros() {
            let gpu = Gpu::new(0).expect("a GPU");
            let s = &gpu.stream;
            for mma in [Mma::Split, Mma::Bf16] {
                // (rows, heads, d, view offset): padded widths, a partial last tile, an unaligned
                // view, no rows at all.
                for (rows, heads, d, off) in
                    [(5, 3, 10, 1), (70, 2, 64, 0), (3, 4, 128, 3), (130, 1, 32, 0), (0, 2, 16, 2)]
                {
                    let x = randn(rows as u64 * 7 + d as u64, rows * heads * d, 3.0);
                    let xd = s.clone_htod(&[&randn(5, off, 9.0), x.as_slice()].concat()).unwrap();
                    // Starts as garbage: the kernel must write every element.
                    let n = split_len(mma, rows, heads, d);
                    let mut split = s.clone_htod(&vec![0x7fc1u16; n]).unwrap();
                    split_heads_gpu(&gpu, mma, &xd.slice(off..), rows, heads, d, None, &mut split.as_view_mut())
                        .unwrap();
                    let got = s.clone_dtoh(&split).unwrap();
                    let want = split_reference(&x, rows, heads, d, mma);
                    assert_eq!(got.len(), want.len(), "{mma:?} rows {rows} heads {heads} d {d}");
                    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                        panic!(
                            "{mma:?} rows {rows} heads {heads} d {d}: element {i} is {:#06x}, expected {:#06x}",
                            got[i], want[i]
                        );
                    }
                }
            }
        }

        /// The split entry points with the rotary embedding in the split, against the unsplit
        /// ones on q and k rotated on the CPU with the same table: every output bit for bit (the
        /// split rotates with the CPU's arithmetic), and the split itself against the reference.
        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn split_entry_points_rotate_q_and_k_as_the_cpu_does() {
            use crate::ops::rope::{rope_apply_table, rope_table};
            let gpu = Gpu::new(0).expect("a GPU");
            let s = &gpu.stream;
            for mma in [Mma::Split, Mma::Bf16] {
                for (seed, (nq, nkv, d), rows, window) in [
                    (1u64, (4usize, 2usize, 64usize), vec![vec![5usize, 9, 3], vec![1, 12], vec![20]], None),
                    (2, (8, 2, 64), vec![vec![300]], Some(128)),
                    (3, (6, 3, 14), vec![vec![65, 1], vec![2, 97]], None),
                    (4, (4, 4, 32), vec![vec![40, 7]], None),
                ] {
                    let heads = Heads { nq, nkv, d };
                    let (mut pos, mut seg, mut rr) = (vec![], vec![], vec![]);
                    for lens in &rows {
                        let start = pos.len();
                        for (sg, &n) in lens.iter().enumerate() {
                            pos.extend(3..3 + n as u32);
                            seg.extend(std::iter::repeat_n(sg as u32, n));
                        }
                        rr.push(start..pos.len());
                    }
                    let t = pos.len();
                    let (qw, kw) = (nq * d, nkv * d);
                    let inv_freq: Vec<f32> = (0..d / 2).map(|i| 150000f32.powf(-2.0 * i as f32 / d as f32)).collect();
                    let table = rope_table(&pos, &inv_freq, 1.3);
                    let (q, k, v) =
                        (randn(seed, t * qw, 1.5), randn(seed + 1, t * kw, 1.5), randn(seed + 2, t * kw, 1.0));
                    let (mut qr, mut kr) = (q.clone(), k.clone());
                    rope_apply_table(&mut qr, &table, d, false);
                    rope_apply_table(&mut kr, &table, d, false);
                    let sinks = randn(seed + 3, nq, 1.0);
                    let dout = randn(seed + 4, t * qw, 1.0);
                    let ranges = visible_ranges(&pos, &seg, &rr, window).unwrap();
                    let up = |x: &[f32]| s.clone_htod(x).unwrap();
                    let up32 = |x: &[u32]| s.clone_htod(x).unwrap();
                    let (klo, khi, qlo, qhi) =
                        (up32(&ranges.klo), up32(&ranges.khi), up32(&ranges.qlo), up32(&ranges.qhi));
                    let (sd, dod, cs) = (up(&sinks), up(&dout), up(&table));
                    let scale = 1.0 / (d as f32).sqrt();
                    let what = format!("{mma:?} heads {nq}/{nkv} d {d} rows {rows:?}");

                    // The split of q, k and v (starting as garbage) against the reference.
                    let n = qkv_split_elems(heads, t, t, mma);
                    let mut qkv = s.clone_htod(&vec![0x7fc1u16; n]).unwrap();
                    let (qd, kd, vd) = (up(&q), up(&k), up(&v));
                    split_qkv_gpu(
                        &gpu,
                        &qd.as_view(),
                        &kd.as_view(),
                        &vd.as_view(),
                        Some(&cs.as_view()),
                        heads,
                        mma,
                        &mut qkv.as_view_mut(),
                    )
                    .unwrap();
                    let want = [
                        split_reference(&qr, t, nq, d, mma),
                        split_reference(&kr, t, nkv, d, mma),
                        split_reference(&v, t, nkv, d, mma),
                    ]
                    .concat();
                    assert!(
                        s.clone_dtoh(&qkv).unwrap() == want,
                        "{what}: the rotated split differs from the reference"
                    );

                    // Every output of the split entry points, then of the unsplit ones on rotated q, k.
                    // Every output of the split entry points (with the backward's gradients of q and
                    // k before the rotation, or not), then of the unsplit ones on rotated q, k.
                    let outputs = |split: bool, unrope: bool| -> Vec<Vec<f32>> {
                        let (mut o, mut lse, mut delta) =
                            (up(&vec![9.0; t * qw]), up(&vec![9.0; t * nq]), up(&vec![9.0; t * nq]));
                        let (mut dq, mut dk, mut dv) =
                            (up(&vec![9.0; t * qw]), up(&vec![9.0; t * kw]), up(&vec![9.0; t * kw]));
                        let mut ds = up(&sinks);
                        let (qrd, krd) = (up(&qr), up(&kr));
                        if split {
                            attention_fwd_split_gpu(
                                &gpu,
                                &qkv.as_view(),
                                t,
                                &sd.as_view(),
                                &klo.as_view(),
                                &khi.as_view(),
                                heads,
                                scale,
                                mma,
                                &mut o.as_view_mut(),
                                &mut lse.as_view_mut(),
                            )
                            .unwrap();
                            let rope = unrope.then(|| cs.as_view());
                            attention_bwd_split_gpu(
                                &gpu,
                                &qkv.as_view(),
                                rope.as_ref(),
                                &sd.as_view(),
                                &o.as_view(),
                                &lse.as_view(),
                                &dod.as_view(),
                                &klo.as_view(),
                                &khi.as_view(),
                                &qlo.as_view(),
                                &qhi.as_view(),
                                heads,
                                scale,
                                mma,
                                &mut delta.as_view_mut(),
                                &mut dq.as_view_mut(),
                                &mut dk.as_view_mut(),
                                &mut dv.as_view_mut(),
                                &mut ds.as_view_mut(),
                            )
                            .unwrap();
                        } else {
                            attention_fwd_gpu(
                                &gpu,
                                &qrd.as_view(),
                                &krd.as_view(),
                                &vd.as_view(),
                                &sd.as_view(),
                                &klo.as_view(),
                                &khi.as_view(),
                                heads,
                                scale,
                                mma,
                                &mut o.as_view_mut(),
                                &mut lse.as_view_mut(),
                            )
                            .unwrap();
                            attention_bwd_gpu(
                                &gpu,
                                &qrd.as_view(),
                                &krd.as_view(),
                                &vd.as_view(),
                                &sd.as_view(),
                                &o.as_view(),
                                &lse.as_view(),
                                &dod.as_view(),
                                &klo.as_view(),
                                &khi.as_view(),
                                &qlo.as_view(),
                                &qhi.as_view(),
                                heads,
                                scale,
                                mma,
                                &mut delta.as_view_mut(),
                                &mut dq.as_view_mut(),
                                &mut dk.as_view_mut(),
                                &mut dv.as_view_mut(),
                                &mut ds.as_view_mut(),
                            )
                            .unwrap();
                        }
                        [o, lse, dq, dk, dv, ds].iter().map(|x| s.clone_dtoh(x).unwrap()).collect()
                    };
                    let (got, mut want) = (outputs(true, false), outputs(false, false));
                    let names = ["o", "lse", "dq", "dk", "dv", "dsinks"];
                    for (name, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
                        assert!(g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {name} differs");
                        assert!(g.iter().any(|x| *x != 0.0), "{what}: {name} is all zeros");
                    }
                    // dq and dk before the rotation: the CPU's inverse rotation of the rotated
                    // rows' gradients, bit for bit (in the dq kernel's store for d = 64 and 32,
                    // after it for d = 14; after dk's partial sums, or its kernel with one run).
                    rope_apply_table(&mut want[2], &table, d, true);
                    rope_apply_table(&mut want[3], &table, d, true);
                    let got = outputs(true, true);
                    for (name, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
                        let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{what}: {name} with the inverse rotation differs");
                    }
                }
            }
            // A rotary table of the wrong length, and one for queries and keys of different tokens.
            let heads = Heads { nq: 2, nkv: 1, d: 8 };
            let (q, k) = (s.alloc_zeros::<f32>(3 * 16).unwrap(), s.alloc_zeros::<f32>(3 * 8).unwrap());
            let mut out = s.alloc_zeros::<u16>(qkv_split_elems(heads, 3, 3, Mma::Bf16)).unwrap();
            let cs = s.alloc_zeros::<f32>(3 * 8 - 2).unwrap();
            let e = split_qkv_gpu(
                &gpu,
                &q.as_view(),
                &k.as_view(),
                &k.as_view(),
                Some(&cs.as_view()),
                heads,
                Mma::Bf16,
                &mut out.as_view_mut(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("rope table has 22 elements, expected 24"), "{e}");
            let mut out = s.alloc_zeros::<u16>(qkv_split_elems(heads, 3, 2, Mma::Bf16)).unwrap();
            let e = split_qkv_gpu(
                &gpu,
                &q.as_view(),
                &k.slice(0..16),
                &k.slice(0..16),
                Some(&cs.as_view()),
                heads,
                Mma::Bf16,
                &mut out.as_view_mut(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("same tokens, got 3 queries and 2 keys"), "{e}");
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn one_pass_bf16_products() {
            for (heads, rows, window) in [
                ((4, 2, 64), vec![vec![5usize, 9, 3], vec![1, 12], vec![20]], None),
                ((8, 2, 64), vec![vec![300]], Some(128)),
                ((6, 3, 16), vec![vec![65, 1], vec![2, 97]], None),
            ] {
                let rows: Vec<&[usize]> = rows.iter().map(|r| r.as_slice()).collect();
                run(Case { mma: Mma::Bf16, ..Case::new(heads, &rows, window) });
            }
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn packed_rows_with_several_segments() {
            for window in [None, Some(3)] {
                run(Case::new((4, 2, 64), &[&[5, 9, 3], &[1, 12], &[20]], window));
            }
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn window_shorter_than_sequence() {
            run(Case::new((4, 2, 64), &[&[70]], Some(5)));
            // Chunks of 32 keys straddle the window's edge.
            run(Case::new((4, 2, 64), &[&[100, 45]], Some(40)));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn window_longer_than_sequence() {
            run(Case::new((4, 2, 64), &[&[40], &[9, 3]], Some(1000)));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn single_token() {
            run(Case::new((4, 2, 64), &[&[1]], Some(4)));
            run(Case::new((4, 2, 64), &[&[1]], None));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn odd_lengths() {
            run(Case::new((6, 3, 16), &[&[13, 1, 23], &[33], &[31, 1]], Some(7)));
            run(Case::new((6, 3, 16), &[&[65, 1], &[2, 97]], None));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn gqa_four_query_heads_two_kv_heads() {
            run(Case::new((4, 2, 64), &[&[37, 20]], Some(16)));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn gqa_eight_query_heads_one_kv_head() {
            run(Case::new((8, 1, 64), &[&[37, 20]], Some(16)));
            run(Case::new((8, 1, 64), &[&[50]], None));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn head_dim_16() {
            run(Case::new((4, 2, 16), &[&[30, 11]], Some(8)));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn head_dim_128_and_2() {
            run(Case::new((4, 2, 128), &[&[45]], None));
            run(Case::new((2, 1, 2), &[&[45]], Some(9)));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn unaligned_views() {
            // Views that start one element into their allocations take the scalar-load path.
            run(Case { view_offset: 1, ..Case::new((4, 2, 64), &[&[37, 20]], Some(16)) });
            run(Case { view_offset: 3, ..Case::new((8, 1, 16), &[&[50]], None) });
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn large_sinks() {
            // The sink outweighs most keys: M_i is often the sink and o shrinks.
            run(Case { sink_offset: 6.0, ..Case::new((4, 2, 64), &[&[40, 7]], Some(12)) });
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn small_sinks() {
            // exp(S − M) underflows: attention without a sink.
            run(Case { sink_offset: -100.0, ..Case::new((4, 2, 64), &[&[40, 7]], Some(12)) });
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn query_with_no_visible_key() {
            // Window 0 hides every key: o = 0, lse = S_h, and only dsinks gets a gradient (0 here).
            run(Case::new((4, 2, 64), &[&[5, 3]], Some(0)));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn partial_tiles_and_padded_head_widths() {
            // Head widths between the stamped ones (16, 32, 64, 128) are zero-padded; rows of 64
            // queries and tiles of 64 keys end inside segments and past T.
            run(Case::new((4, 2, 48), &[&[130, 70]], None));
            run(Case::new((4, 1, 96), &[&[100]], Some(70)));
            run(Case::new((2, 2, 10), &[&[63, 2, 64, 65, 1]], None));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn key_tiles_outside_the_window_are_skipped() {
            // A 20-token window touches one or two of the seven key tiles of each query tile.
            run(Case::new((4, 2, 64), &[&[400]], Some(20)));
            run(Case::new((4, 2, 64), &[&[129], &[1], &[190]], Some(65)));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn many_query_tiles_per_key_tile() {
            // dk/dv sum over 8 query heads x up to 8 query tiles of 64 per key tile.
            run(Case::new((16, 2, 64), &[&[520]], None));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn tiny_default_model_shapes() {
            // The embedded default model: head dim 16, 8 query heads on 2 KV heads, window 64 or
            // none; rows of 256 tokens and packed segments, several 64-row tiles per head.
            for window in [None, Some(64)] {
                run(Case::new((8, 2, 16), &[&[256]], window));
                run(Case::new((8, 2, 16), &[&[100, 90, 60], &[7, 190]], window));
                run(Case::new((8, 2, 16), &[&[250]], window));
                // One row per sequence, as the trainer packs them: many short rows in one batch.
                run(Case::new(
                    (8, 2, 16),
                    &[&[37], &[5], &[81], &[23], &[64], &[1], &[99], &[40], &[130], &[2]],
                    window,
                ));
            }
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn gpt_oss_20b_heads() {
            run(Case::new((64, 8, 64), &[&[300]], Some(128)));
            run(Case::new((64, 8, 64), &[&[180, 120]], None));
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
        fn dkdv_head_splits_between_one_and_the_group() {
            // Long batches of short rows (cheap for the reference): the dk/dv kernel splits each
            // group into 2 and 4 runs of query heads, whose partial sums are then added.
            let rows: Vec<Vec<usize>> = (0..128).map(|r| vec![200 + r % 7, 56 - r % 5]).collect();
            let rows: Vec<&[usize]> = rows.iter().map(|r| r.as_slice()).collect();
            let t: usize = rows.iter().flat_map(|r| r.iter()).sum();
            for (heads, window, hs) in [((16, 2, 16), None, 2), ((8, 1, 32), Some(40), 4)] {
                let (nq, nkv, d) = heads;
                assert_eq!(head_splits(Heads { nq, nkv, d }, t), hs, "{t} keys");
                run(Case::new(heads, &rows, window));
            }
        }
    }
}
