//! Products with a low-rank factor in f32: LoRA on dense projections without cuBLAS's small-matrix
//! launches. Three kernels, each taking several factors (parts) in one pass over the large operand:
//!
//! - [`lowrank_down_gpu`]: `R_p = α_p · X · M_pᵀ` (LoRA's `u = x Aᵀ` for q, k and v in one read of
//!   x; `du = s · dy B`),
//! - [`lowrank_up_gpu`]: `Y (= or +=) bias + Σ_p α_p · R_p · M_p` (`y += s · u Bᵀ` with the
//!   projection's bias in the same pass; `dx += Σ du A`),
//! - [`lowrank_grad_gpu`]: `M_p += α_p · R_pᵀ · Q` (`dB += s · dyᵀ u`, `dA += duᵀ x`).
//!
//! A part's factor is `M(j, c) = factor[j·sj + c·sc]` for `j < rank` (so `A [r, in]` and PEFT's
//! `B [out, r]` are both factors without a copy) and its row-wise matrix `R(t, j) = rows[t·ld + j]`.
//! Each launch takes up to three parts whose ranks sum to at most [`MAX_LAUNCH_RANK`]; larger sets
//! (and ranks) are split over launches by the launchers. Sums run in a fixed order: every run gives
//! the same bits. The CPU references ([`down_ref`], [`up_ref`], [`grad_ref`]) sum in f64.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("lowrank.cu");

/// The largest sum of ranks one launch takes (the kernels' largest register bucket).
pub const MAX_LAUNCH_RANK: usize = 32;
const MAX_PARTS: usize = 3;
const THREADS: u32 = 256;
/// lowrank.cu's DOWN_THREADS (lowrank_down's block: a row a thread), UP_COLS and UP_ROWS
/// (lowrank_up's block), GRAD_COLS (lowrank_grad's columns per block); lowrank_down's k ranges are
/// multiples of DOWN_KC (of its DOWN_KX-wide chunks).
const DOWN_THREADS: u32 = 128;
const DOWN_KC: usize = 64;
const UP_COLS: usize = 64;
const UP_ROWS: usize = 64;
/// Row chunks a `lowrank_up` block walks (its grid is ⌈t / (UP_ROWS · UP_CHUNKS)⌉ high).
const UP_CHUNKS: usize = 4;
const GRAD_COLS: usize = 32;
/// Blocks a launch aims for: when the rows (lowrank_down) or columns (lowrank_grad) give fewer,
/// the reduction is split into ranges whose sums lowrank_reduce_* add in order. Constants, not
/// the GPU's SM count, so that the ranges (and so the bits) are the same on every card.
/// lowrank_down's blocks hold 4 warps: 528 of them are 4 a streaming multiprocessor of an H100 or
/// H200 (16 warps), to keep more of X in flight than 264 did; lowrank_grad's hold 8.
const DOWN_TARGET_BLOCKS: usize = 528;
const TARGET_BLOCKS: usize = 264;
/// Floats of scratch a split reduction writes per range and row (lowrank_down) or column
/// (lowrank_grad): one per launch column.
const WS_COLS: usize = 32;
/// The fewest rows a range of lowrank_grad takes.
const GRAD_MIN_RANGE: usize = 128;

/// Where one part's factor and row-wise matrix live, and its scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    /// Columns `j` of the row-wise matrix (rows of the factor).
    pub rank: usize,
    /// Factor strides: `M(j, c) = factor[j·sj + c·sc]`.
    pub sj: usize,
    pub sc: usize,
    /// Row stride of the row-wise matrix: `R(t, j) = rows[t·ld + j]` (`ld ≥ rank`).
    pub ld: usize,
    pub alpha: f32,
}

impl Layout {
    /// `M [rank, cols]` row-major (LoRA's A) with a `[t, rank]` row-wise matrix.
    pub fn rows_major(rank: usize, cols: usize, alpha: f32) -> Self {
        Self { rank, sj: cols, sc: 1, ld: rank, alpha }
    }

    /// `M(j, c) = factor[c·rank + j]`: a `[cols, rank]` row-major matrix read transposed (PEFT's
    /// lora_B), with a `[t, rank]` row-wise matrix.
    pub fn cols_major(rank: usize, alpha: f32) -> Self {
        Self { rank, sj: 1, sc: rank, ld: rank, alpha }
    }
}

/// A part of [`lowrank_down_gpu`]: the factor read, the row-wise matrix written.
pub struct DownPart<'a> {
    pub factor: CudaView<'a, f32>,
    pub rows: CudaViewMut<'a, f32>,
    pub layout: Layout,
}

/// A part of [`lowrank_up_gpu`]: both read.
pub struct UpPart<'a> {
    pub factor: CudaView<'a, f32>,
    pub rows: CudaView<'a, f32>,
    pub layout: Layout,
}

/// A part of [`lowrank_grad_gpu`]: the factor (a gradient) accumulated, the row-wise matrix read.
pub struct GradPart<'a> {
    pub factor: CudaViewMut<'a, f32>,
    pub rows: CudaView<'a, f32>,
    pub layout: Layout,
}

// ---- CPU references ---------------------------------------------------------------------------

/// `R(t, j) = α · Σ_k X(t, k) M(j, k)` for `X [t, k]`.
pub fn down_ref(x: &[f32], t: usize, k: usize, factor: &[f32], l: &Layout, rows: &mut [f32]) {
    for i in 0..t {
        for j in 0..l.rank {
            let s: f64 = (0..k).map(|c| x[i * k + c] as f64 * factor[j * l.sj + c * l.sc] as f64).sum();
            rows[i * l.ld + j] = (l.alpha as f64 * s) as f32;
        }
    }
}

/// `Y(t, c) = [Y(t, c)] + bias(c) + Σ_p α_p Σ_j R_p(t, j) M_p(j, c)` for `Y [t, n]`; parts are
/// `(factor, rows, layout)`.
pub fn up_ref(
    y: &mut [f32],
    t: usize,
    n: usize,
    accumulate: bool,
    bias: Option<&[f32]>,
    parts: &[(&[f32], &[f32], Layout)],
) {
    for i in 0..t {
        for c in 0..n {
            let mut s = bias.map_or(0.0, |b| b[c] as f64);
            for (factor, rows, l) in parts {
                let d: f64 = (0..l.rank).map(|j| rows[i * l.ld + j] as f64 * factor[j * l.sj + c * l.sc] as f64).sum();
                s += l.alpha as f64 * d;
            }
            let o = &mut y[i * n + c];
            *o = if accumulate { (*o as f64 + s) as f32 } else { s as f32 };
        }
    }
}

/// `M(j, c) += α · Σ_t R(t, j) Q(t, c)` for `Q [t, n]`.
pub fn grad_ref(q: &[f32], t: usize, n: usize, rows: &[f32], l: &Layout, factor: &mut [f32]) {
    for j in 0..l.rank {
        for c in 0..n {
            let s: f64 = (0..t).map(|i| rows[i * l.ld + j] as f64 * q[i * n + c] as f64).sum();
            let o = &mut factor[j * l.sj + c * l.sc];
            *o = (*o as f64 + l.alpha as f64 * s) as f32;
        }
    }
}

// ---- launchers --------------------------------------------------------------------------------

/// One part as lowrank.cu's `struct LrPart` takes it (device addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LrPart {
    factor: u64,
    rows: u64,
    sj: u64,
    sc: u64,
    ld: u64,
    rank: u32,
    alpha: f32,
}

/// lowrank.cu's `struct LrParts`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LrParts {
    p: [LrPart; MAX_PARTS],
    n: u32,
}

// SAFETY: #[repr(C)] plain data matching the CUDA structs field for field (LrPart: five u64, u32,
// f32 = 48 bytes; LrParts: three of them and a u32, padded to 152 bytes on both sides).
unsafe impl DeviceRepr for LrParts {}
const _: () = assert!(std::mem::size_of::<LrPart>() == 48 && std::mem::size_of::<LrParts>() == 152);

/// A part's columns `j0 .. j0 + len` (len ≤ MAX_LAUNCH_RANK) as one launch entry: the factor and
/// row-wise addresses moved to column j0.
fn piece(factor: u64, rows: u64, l: &Layout, j0: usize, len: usize) -> LrPart {
    LrPart {
        factor: factor + 4 * (j0 * l.sj) as u64,
        rows: rows + 4 * j0 as u64,
        sj: l.sj as u64,
        sc: l.sc as u64,
        ld: l.ld as u64,
        rank: len as u32,
        alpha: l.alpha,
    }
}

/// The launches for parts given as `(factor address, rows address, layout)`: each part cut into
/// pieces of at most MAX_LAUNCH_RANK columns, packed in order into launches of at most three
/// pieces and MAX_LAUNCH_RANK columns. Returns each launch's entries and its rank bucket.
fn launches(parts: &[(u64, u64, Layout)]) -> Vec<(LrParts, u32)> {
    let mut out: Vec<(LrParts, u32)> = vec![];
    let mut cur = LrParts::default();
    let mut total = 0usize;
    let flush = |cur: &mut LrParts, total: &mut usize, out: &mut Vec<(LrParts, u32)>| {
        if cur.n > 0 {
            let bucket = [8usize, 16, 24, 32].into_iter().find(|&b| b >= *total).expect("at most MAX_LAUNCH_RANK");
            out.push((*cur, bucket as u32));
        }
        *cur = LrParts::default();
        *total = 0;
    };
    for (f, r, l) in parts {
        let mut j0 = 0;
        while j0 < l.rank {
            let len = (l.rank - j0).min(MAX_LAUNCH_RANK);
            if cur.n as usize == MAX_PARTS || total + len > MAX_LAUNCH_RANK {
                flush(&mut cur, &mut total, &mut out);
            }
            cur.p[cur.n as usize] = piece(*f, *r, l, j0, len);
            cur.n += 1;
            total += len;
            j0 += len;
        }
    }
    flush(&mut cur, &mut total, &mut out);
    out
}

/// Runs `launch(entries, bucket, ws)` for each launch of `addrs` ([`launches`]), `ws` the address of
/// `ws_floats` floats of the GPU's scratch (valid for every launch, in stream order), or 0 (null)
/// when `ws_floats` is 0.
fn each_launch(
    gpu: &Gpu,
    addrs: &[(u64, u64, Layout)],
    ws_floats: usize,
    mut launch: impl FnMut(&LrParts, u32, u64) -> Result<()>,
) -> Result<()> {
    gpu.with_scratch(2 * ws_floats, |mut ws| {
        let (ws_ptr, guard) = ws.device_ptr_mut(&gpu.stream);
        let ws_ptr = if ws_floats > 0 { ws_ptr } else { 0 };
        for (ps, bucket) in launches(addrs) {
            launch(&ps, bucket, ws_ptr)?;
        }
        drop(guard);
        Ok(())
    })
}

/// lowrank_down's k ranges over `X [t, k]` (`k > 0`), their length and the floats of scratch
/// their partial sums take (0 with one range): a block per DOWN_THREADS rows, and k ranges of
/// DOWN_KC multiples, enough for the GPU when the rows alone are too few.
fn down_ranges(t: usize, k: usize) -> (usize, usize, usize) {
    let row_blocks = t.div_ceil(DOWN_THREADS as usize).max(1);
    let ranges = DOWN_TARGET_BLOCKS.div_ceil(row_blocks).clamp(1, k.div_ceil(DOWN_KC).max(1));
    let ks = k.div_ceil(ranges).next_multiple_of(DOWN_KC);
    let ranges = k.div_ceil(ks);
    (ranges, ks, if ranges > 1 { ranges * t * WS_COLS } else { 0 })
}

/// lowrank_grad's row ranges over `Q [t, n]` (`t > 0`), their length and the floats of scratch
/// their partial sums take (0 with one range): enough blocks for the GPU when the columns alone
/// are too few.
fn grad_ranges(t: usize, n: usize) -> (usize, usize, usize) {
    let col_blocks = n.div_ceil(GRAD_COLS).max(1);
    let ranges = TARGET_BLOCKS.div_ceil(col_blocks).clamp(1, t.div_ceil(GRAD_MIN_RANGE).max(1));
    let rs_len = t.div_ceil(ranges);
    let ranges = t.div_ceil(rs_len);
    (ranges, rs_len, if ranges > 1 { ranges * WS_COLS * n } else { 0 })
}

/// u16 elements of the GPU's shared scratch that [`lowrank_down_gpu`] (and
/// [`lowrank_down_cast_gpu`]) over `X [t, k]` and [`lowrank_grad_gpu`] over `Q [t, n]` use at most
/// (their split reductions' partial sums).
pub fn scratch_elems(t: usize, k: usize, n: usize) -> usize {
    let down = match (t, k) {
        (0, _) | (_, 0) => 0,
        _ => down_ranges(t, k).2,
    };
    let grad = match (t, n) {
        (0, _) | (_, 0) => 0,
        _ => grad_ranges(t, n).2,
    };
    2 * down.max(grad)
}

/// The most [`scratch_elems`] over every row count up to `t`, for an engine that reserves the
/// scratch up front so that no step allocates: the split into ranges changes in steps, so a
/// shorter batch can need more than the longest (e.g. at k = 2,880, 2,944 rows more than 3,072).
pub fn scratch_elems_up_to(t: usize, k: usize, n: usize) -> usize {
    (1..=t).map(|r| scratch_elems(r, k, n)).max().unwrap_or(0)
}

/// A grid of `x` by `y` blocks of `threads`.
fn grid(x: usize, y: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (x as u32, y as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn shape(msg: String) -> Error {
    Error::Shape(format!("lowrank: {msg}"))
}

fn dim(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| shape(format!("{what} = {v} exceeds 2^32 - 1")))
}

/// `what` holds `want` elements exactly.
fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(shape(format!("{what} has {got} elements, expected {want}")))
    }
}

/// Part `i`'s layout fits its buffers: the factor over `cols` columns, the row-wise matrix over
/// `t` rows.
fn check_part(op: &str, i: usize, l: &Layout, factor_len: usize, rows_len: usize, t: usize, cols: usize) -> Result<()> {
    let part = format!("{op}: part {i} (rank {}, sj {}, sc {}, ld {})", l.rank, l.sj, l.sc, l.ld);
    if l.rank == 0 || l.ld < l.rank {
        return Err(shape(format!("{part}: the rank must be at least 1 and the row stride at least the rank")));
    }
    let last = |n: usize, s: usize| (n.max(1) - 1).checked_mul(s);
    let f_end = last(l.rank, l.sj).zip(last(cols, l.sc)).and_then(|(a, b)| a.checked_add(b));
    if cols > 0 && f_end.is_none_or(|e| e >= factor_len) {
        return Err(shape(format!("{part}: its factor over {cols} columns reaches past its {factor_len} elements")));
    }
    let r_end = last(t, l.ld).and_then(|a| a.checked_add(l.rank - 1));
    if t > 0 && r_end.is_none_or(|e| e >= rows_len) {
        return Err(shape(format!("{part}: its {t} rows reach past the row-wise matrix's {rows_len} elements")));
    }
    Ok(())
}

/// The factor's elements `(j, c)`, `j < rank`, `c < cols`, are distinct (a written factor: no two
/// threads may add to one element): one stride nests the other's whole range.
fn distinct(l: &Layout, cols: usize) -> bool {
    match (l.rank > 1, cols > 1) {
        (false, false) => true,
        (false, true) => l.sc >= 1,
        (true, false) => l.sj >= 1,
        (true, true) => {
            (l.sj >= 1 && l.sc >= l.rank.saturating_mul(l.sj)) || (l.sc >= 1 && l.sj >= cols.saturating_mul(l.sc))
        }
    }
}

/// `R_p = α_p · X · M_pᵀ` for `X [t, k]`: every part's row-wise matrix (columns `j < rank`)
/// written, `X` read once per launch (one launch when the ranks sum to at most
/// [`MAX_LAUNCH_RANK`] over at most three parts).
pub fn lowrank_down_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    t: usize,
    k: usize,
    parts: &mut [DownPart<'_>],
) -> Result<()> {
    down(gpu, x, t, k, parts, None)
}

/// [`lowrank_down_gpu`] that also writes `X` in bf16 as it reads it, for a tensor-core product of
/// the same input: `hi = bf16(X)` (round to nearest even), and with `lo` the remainder
/// `bf16(X − hi)` (0 where `hi` is not finite), the values of
/// [`crate::ops::elementwise::cast_f32_to_bf16_gpu`] and
/// [`crate::ops::elementwise::split_f32_to_bf16x2_gpu`], without their pass over `X`. `hi` and
/// `lo` hold `t · k` values; `parts` must not be empty (nothing would read `X`).
pub fn lowrank_down_cast_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    t: usize,
    k: usize,
    parts: &mut [DownPart<'_>],
    hi: &mut CudaViewMut<'_, bf16>,
    lo: Option<&mut CudaViewMut<'_, bf16>>,
) -> Result<()> {
    check_len("lowrank_down: bf16 X", hi.len(), t * k)?;
    if let Some(lo) = &lo {
        check_len("lowrank_down: bf16 remainder of X", lo.len(), t * k)?;
    }
    if parts.is_empty() && t * k > 0 {
        return Err(shape("lowrank_down: a cast into bf16 needs at least one part".into()));
    }
    let s = &gpu.stream;
    let (hi_ptr, hi_guard) = hi.device_ptr_mut(s);
    let (lo_ptr, lo_guard) = match lo {
        Some(lo) => {
            let (p, g) = lo.device_ptr_mut(s);
            (p, Some(g))
        }
        None => (0, None),
    };
    down(gpu, x, t, k, parts, Some((hi_ptr, lo_ptr)))?;
    drop((hi_guard, lo_guard));
    Ok(())
}

/// [`lowrank_down_gpu`], with `cast` the device addresses of `X`'s bf16 `hi` and `lo` (0: none)
/// of `t · k` values each (checked by the caller), written by the first launch.
fn down(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    t: usize,
    k: usize,
    parts: &mut [DownPart<'_>],
    cast: Option<(u64, u64)>,
) -> Result<()> {
    check_len("lowrank_down: X", x.len(), t * k)?;
    for (i, p) in parts.iter().enumerate() {
        check_part("lowrank_down", i, &p.layout, p.factor.len(), p.rows.len(), t, k)?;
    }
    let (t32, k32) = (dim("t", t)?, dim("k", k)?);
    if t == 0 || parts.is_empty() {
        return Ok(());
    }
    if k == 0 {
        return Err(shape("lowrank_down: k = 0 (an empty product)".into()));
    }
    let row_blocks = t.div_ceil(DOWN_THREADS as usize);
    let (ranges, ks, ws_floats) = down_ranges(t, k);
    let (ks32, ranges32) = (ks as u32, ranges as u32);
    let s = &gpu.stream;
    let (addrs, guards): (Vec<_>, Vec<_>) = parts
        .iter_mut()
        .map(|p| {
            let ((f, fg), (r, rg)) = (p.factor.device_ptr(s), p.rows.device_ptr_mut(s));
            ((f, r, p.layout), (fg, rg))
        })
        .unzip();
    let mut cast = cast.unwrap_or((0, 0));
    each_launch(gpu, &addrs, ws_floats, |ps, bucket, ws_ptr| {
        let f = gpu.function("lowrank", SRC, &format!("lowrank_down_{bucket}"))?;
        // SAFETY: lowrank_down_RB(const float* x, LrParts ps, unsigned t, unsigned k, unsigned
        // ks, float* ws, bf16* hi, bf16* lo): x holds t·k floats; each entry is a piece of a part
        // whose factor (rank rows by k columns at its strides) and row-wise matrix (t rows of ld)
        // were checked to lie inside their buffers, ranks sum to at most the bucket; with ranges > 1
        // (gridDim.y) the blocks write ws[range][row][j < 32], ranges·t·32 floats of scratch (2 u16
        // each), else ws is null and unread; hi and lo are null or t·k bf16 each (the caller's
        // check); the guards keep every buffer's stream order until it is queued.
        unsafe {
            s.launch_builder(&f)
                .arg(x)
                .arg(ps)
                .arg(&t32)
                .arg(&k32)
                .arg(&ks32)
                .arg(&ws_ptr)
                .arg(&cast.0)
                .arg(&cast.1)
                .launch(grid(row_blocks, ranges, DOWN_THREADS))
        }?;
        // The first launch has written X in bf16.
        cast = (0, 0);
        if ranges > 1 {
            let r = gpu.function("lowrank", SRC, "lowrank_reduce_rows_f32")?;
            // SAFETY: lowrank_reduce_rows_f32(const float* ws, LrParts ps, unsigned t, unsigned
            // ranges): reads ws[range < ranges][row < t][j < 32] (written just above, same
            // stream) and writes the pieces' row-wise matrices as lowrank_down does.
            unsafe {
                s.launch_builder(&r).arg(&ws_ptr).arg(ps).arg(&t32).arg(&ranges32).launch(grid(
                    (t * WS_COLS).div_ceil(THREADS as usize),
                    1,
                    THREADS,
                ))
            }?;
        }
        Ok(())
    })?;
    drop(guards);
    Ok(())
}

/// `Y (= or, with accumulate, +=) bias + Σ_p α_p · R_p · M_p` for `Y [t, n]`. With no parts and
/// a bias, the bias alone (broadcast over the rows).
pub fn lowrank_up_gpu(
    gpu: &Gpu,
    y: &mut CudaViewMut<'_, f32>,
    t: usize,
    n: usize,
    accumulate: bool,
    bias: Option<&CudaView<'_, f32>>,
    parts: &[UpPart<'_>],
) -> Result<()> {
    check_len("lowrank_up: Y", y.len(), t * n)?;
    if let Some(b) = bias {
        check_len("lowrank_up: bias", b.len(), n)?;
    }
    for (i, p) in parts.iter().enumerate() {
        check_part("lowrank_up", i, &p.layout, p.factor.len(), p.rows.len(), t, n)?;
    }
    let (t32, n32) = (dim("t", t)?, dim("n", n)?);
    // Each block walks UP_CHUNKS chunks of UP_ROWS rows (more when the rows would need more than
    // 65535 blocks), so that its factor registers serve more rows.
    let grid_y = t.div_ceil(UP_ROWS * UP_CHUNKS).clamp(1, 65535);
    if t == 0 || n == 0 {
        return Ok(());
    }
    let s = &gpu.stream;
    let (addrs, guards): (Vec<_>, Vec<_>) = parts
        .iter()
        .map(|p| {
            let ((f, fg), (r, rg)) = (p.factor.device_ptr(s), p.rows.device_ptr(s));
            ((f, r, p.layout), (fg, rg))
        })
        .unzip();
    let mut plan = launches(&addrs);
    if plan.is_empty() {
        plan.push((LrParts::default(), 8)); // the bias (or zeros) alone
    }
    let bias = bias.map(|b| b.device_ptr(s));
    for (i, (ps, bucket)) in plan.into_iter().enumerate() {
        let f = gpu.function("lowrank", SRC, &format!("lowrank_up_{bucket}"))?;
        // The first launch assigns or accumulates as asked and adds the bias; later ones add to it.
        let (acc, b) = if i == 0 { (accumulate as u32, bias.as_ref().map_or(0, |(p, _)| *p)) } else { (1, 0) };
        // SAFETY: lowrank_up_RB(float* y, const float* bias, LrParts ps, unsigned t, unsigned n,
        // unsigned accumulate): y holds t·n floats, bias (0 for none) n; each entry is a piece of a
        // part whose factor (rank rows by n columns) and row-wise matrix (t rows of ld) were checked
        // to lie inside their buffers; the blocks walk the row chunks grid-stride (any grid.y ≥ 1).
        unsafe {
            s.launch_builder(&f).arg(&mut *y).arg(&b).arg(&ps).arg(&t32).arg(&n32).arg(&acc).launch(grid(
                n.div_ceil(UP_COLS),
                grid_y,
                THREADS,
            ))
        }?;
    }
    drop((guards, bias));
    Ok(())
}

/// `M_p += α_p · R_pᵀ · Q` for `Q [t, n]`: every part's factor (columns `c < n`) accumulated,
/// `Q` read once per launch.
pub fn lowrank_grad_gpu(
    gpu: &Gpu,
    q: &CudaView<'_, f32>,
    t: usize,
    n: usize,
    parts: &mut [GradPart<'_>],
) -> Result<()> {
    check_len("lowrank_grad: Q", q.len(), t * n)?;
    for (i, p) in parts.iter().enumerate() {
        check_part("lowrank_grad", i, &p.layout, p.factor.len(), p.rows.len(), t, n)?;
        if !distinct(&p.layout, n) {
            let l = &p.layout;
            return Err(shape(format!(
                "lowrank_grad: part {i} (rank {}, sj {}, sc {}) over {n} columns: its factor is written, so its \
                 elements must be distinct (one stride at least the other's whole range)",
                l.rank, l.sj, l.sc
            )));
        }
    }
    let (t32, n32) = (dim("t", t)?, dim("n", n)?);
    if t == 0 || n == 0 || parts.is_empty() {
        return Ok(());
    }
    let col_blocks = n.div_ceil(GRAD_COLS);
    let (ranges, rs_len, ws_floats) = grad_ranges(t, n);
    let (rs32, ranges32) = (rs_len as u32, ranges as u32);
    let s = &gpu.stream;
    let (addrs, guards): (Vec<_>, Vec<_>) = parts
        .iter_mut()
        .map(|p| {
            let ((f, fg), (r, rg)) = (p.factor.device_ptr_mut(s), p.rows.device_ptr(s));
            ((f, r, p.layout), (fg, rg))
        })
        .unzip();
    each_launch(gpu, &addrs, ws_floats, |ps, bucket, ws_ptr| {
        let f = gpu.function("lowrank", SRC, &format!("lowrank_grad_{bucket}"))?;
        // SAFETY: lowrank_grad_RB(const float* q, LrParts ps, unsigned t, unsigned n, unsigned
        // rs_len, float* ws): q holds t·n floats; each entry is a piece of a part whose factor
        // (rank rows by n columns) and row-wise matrix (t rows of ld) were checked to lie inside
        // their buffers, with distinct elements (checked); with one range a block owns its
        // columns of the factor (no two threads write one element), with ranges > 1 (gridDim.y)
        // the blocks write ws[range][j < 32][c < n], ranges·32·n floats of scratch, and leave the
        // factor to lowrank_reduce_cols.
        unsafe {
            s.launch_builder(&f)
                .arg(q)
                .arg(ps)
                .arg(&t32)
                .arg(&n32)
                .arg(&rs32)
                .arg(&ws_ptr)
                .launch(grid(col_blocks, ranges, THREADS))
        }?;
        if ranges > 1 {
            let r = gpu.function("lowrank", SRC, "lowrank_reduce_cols_f32")?;
            // SAFETY: lowrank_reduce_cols_f32(const float* ws, LrParts ps, unsigned n, unsigned
            // ranges): reads ws[range < ranges][j < 32][c < n] (written just above, same stream);
            // thread (c, j) alone updates factor element (j, c) of the pieces.
            unsafe {
                s.launch_builder(&r).arg(&ws_ptr).arg(ps).arg(&n32).arg(&ranges32).launch(grid(
                    n.div_ceil(THREADS as usize),
                    WS_COLS,
                    THREADS,
                ))
            }?;
        }
        Ok(())
    })?;
    drop(guards);
    Ok(())
}

#[cfg(test)]
mod tests;
