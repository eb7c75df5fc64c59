//! Grouped, arbitrarily strided f32 GEMM for the MoE experts (tokens sorted by expert, ragged
//! groups) and every LoRA product, with B either an f32 operand or an MXFP4 expert weight that the
//! kernel decodes into shared memory tile by tile: the CPU references and the CUDA kernels.
//!
//! For group `g < groups`, with `o = offsets[g]` and `len = offsets[g + 1] − offsets[g]`, and the
//! operands addressed as
//! `A(i, k) = a[g·a.group + i·a.row + k·a.col]`, `B(k, n) = b[g·b.group + k·b.row + n·b.col]`,
//! `C(i, n) = c[g·c.group + i·c.row + n·c.col]`:
//!
//! - [`Grouped::M`] (rows ragged): `C(o+m, n) = α Σ_{k<K} A(o+m, k) B(k, n) + β C(o+m, n)`, `m < len`;
//! - [`Grouped::K`] (inner dimension ragged): `C(m, n) = α Σ_{t<len} A(m, o+t) B(o+t, n) + β C(m, n)`,
//!   `m < cfg.m`; a group with `len = 0` still writes `β C`.
//!
//! `β = 0` overwrites C without reading it (old NaNs do not survive). Groups must not write the
//! same C element (the kernels run them in parallel).
//!
//! [`grouped_gemm_f32`] runs one of several kernels, chosen by shape ([`grouped_gemm_f32_kernel`]):
//! LoRA on experts multiplies by a rank r ≤ 16 against dimensions in the thousands, where a 64x64
//! tile would do mostly padding. All compute the same product as [`grouped_gemm_ref`], each output
//! summed in an order fixed by the shape (bitwise reproducible, whatever the grid).
//!
//! [`grouped_gemm_f32_mxfp4w`] writes A once in bf16 (hi and lo halves for f32-level accuracy, or
//! one rounding) and multiplies on tensor cores: Hopper's warpgroup `wgmma` on sm_90a (both the
//! forward and the input-gradient product with the decoded weight as the register operand,
//! warp-specialized: a producer warpgroup copies the operands by TMA), warp-level `mma.sync`
//! elsewhere ([`Mxfp4Path`]); gemm.cu describes the kernels.
//!
//! [`grouped_gemm_f32_mxfp4w_lora`] is that product with an expert LoRA: the LoRA's first product
//! (`u = x A_eᵀ`, or `du = s · dy B_e` for the input gradient) is computed in the same pass that
//! splits A into bf16, and its second in the product's store. [`grouped_lora_down_f32`] is the
//! first product alone, with the same bits.

use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::Mma;
use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("gemm.cu");
/// [`SRC`] compiled for [`Mma::Bf16`]: the MXFP4 kernel rounds A to bf16 once (one product).
pub const SRC_ONE_PASS: &str = concat!("#define MMA_ONE_PASS 1\n", include_str!("gemm.cu"));
/// [`SRC`] with two A stages in the mma.sync MXFP4 kernels ([`Mxfp4Path::MmaSyncTwoStage`]).
pub const SRC_TWO_STAGE: &str = concat!("#define TC_STAGES 2\n", include_str!("gemm.cu"));
/// [`SRC_ONE_PASS`] with two A stages in the mma.sync MXFP4 kernels.
pub const SRC_TWO_STAGE_ONE_PASS: &str =
    concat!("#define TC_STAGES 2\n#define MMA_ONE_PASS 1\n", include_str!("gemm.cu"));

/// Element strides of one operand: along its rows, its columns, and from one group to the next.
#[derive(Clone, Copy, Debug)]
pub struct Strides {
    pub row: usize,
    pub col: usize,
    pub group: usize,
}

impl Strides {
    /// A row-major `[rows, cols]` matrix shared by every group.
    pub fn row_major(cols: usize) -> Self {
        Self { row: cols, col: 1, group: 0 }
    }
}

/// Which dimension the offsets split into groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouped {
    /// Rows of A and C (forward and input-gradient products of tokens sorted by expert).
    M,
    /// The inner dimension: A's columns and B's rows (weight gradients summed over tokens).
    K,
}

#[derive(Clone, Copy, Debug)]
pub struct GroupedGemm {
    pub groups: usize,
    pub grouped: Grouped,
    /// Grouped::K: the row count of every group. Grouped::M: unused (each group's rows come from
    /// the offsets; the kernels size their grid from the total row count alone, so a plan built on
    /// the device needs no copy to the host).
    pub m: usize,
    pub n: usize,
    /// Grouped::M: the inner dimension of every group. Grouped::K: ignored (inner dim of group g is
    /// `offsets[g + 1] - offsets[g]`).
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub a: Strides,
    pub b: Strides,
    pub c: Strides,
}

/// An MXFP4 expert weight on the device: `E` matrices `W_e [rows, cols]` quantized along `cols`
/// (`cols % 32 == 0`): `blocks [E, rows, cols/32, 16]` (low nibble = even element),
/// `scales [E, rows, cols/32]` (E8M0).
pub struct Mxfp4Weight<'a> {
    pub blocks: CudaView<'a, u8>,
    pub scales: CudaView<'a, u8>,
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
}

/// The same weight as host bytes, for the CPU reference.
#[derive(Clone, Copy, Debug)]
pub struct Mxfp4HostWeight<'a> {
    pub blocks: &'a [u8],
    pub scales: &'a [u8],
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
}

/// Terms that the MXFP4 products add to every output as they store it, so that an expert's bias
/// and its LoRA up-projection take no pass over C of their own:
/// `C(s, n) = α·acc + β·C + bias[g·N + n] + scaling · Σ_{j<rank} u[s, j] · B_g(j, n)`, with `s`
/// the absolute row of A and C (the slot) and `g` its group. The default adds nothing.
#[derive(Default)]
pub struct Mxfp4Epilogue<'a> {
    /// `[groups, N]` row-major (at least `groups · N` elements).
    pub bias: Option<CudaView<'a, f32>>,
    pub lora: Option<LoraUp<'a>>,
}

/// The LoRA term of an [`Mxfp4Epilogue`]: `u [total_rows, rank]` row-major (the down-projection
/// already applied to A's rows) and `B_g(j, n) = b[g·b_strides.group + j·b_strides.row +
/// n·b_strides.col]`. Ranks up to [`EPILOGUE_RANK`] are added in the product's store; a larger
/// rank runs one [`grouped_gemm_f32`] after it (the same sum, rounded differently).
pub struct LoraUp<'a> {
    pub u: CudaView<'a, f32>,
    pub b: CudaView<'a, f32>,
    pub b_strides: Strides,
    pub rank: usize,
    pub scaling: f32,
}

impl LoraUp<'_> {
    /// Adds the term as a product of its own, `C += scaling · u B_g` over the rows and columns of
    /// the grouped product `cfg` (its groups, row bound, N and C strides): the MXFP4 launcher's path
    /// past [`EPILOGUE_RANK`], and the dense experts' path.
    pub fn add_to(
        &self,
        gpu: &Gpu,
        cfg: &GroupedGemm,
        offsets: &CudaView<'_, u32>,
        total_rows: usize,
        c: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let up = GroupedGemm {
            groups: cfg.groups,
            grouped: Grouped::M,
            m: cfg.m,
            n: cfg.n,
            k: self.rank,
            alpha: self.scaling,
            beta: 1.0,
            a: Strides::row_major(self.rank),
            b: self.b_strides,
            c: cfg.c,
        };
        grouped_gemm_f32(gpu, &up, offsets, total_rows, &self.u, &self.b, c)
    }
}

/// The largest LoRA rank the MXFP4 kernels add in their store (`EPI_RANK` in gemm.cu).
pub const EPILOGUE_RANK: usize = 16;

/// Host copy of an [`Mxfp4Epilogue`], for [`mxfp4_epilogue_ref`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HostEpilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub lora: Option<HostLoraUp<'a>>,
}

/// Host copy of a [`LoraUp`].
#[derive(Clone, Copy, Debug)]
pub struct HostLoraUp<'a> {
    pub u: &'a [f32],
    pub b: &'a [f32],
    pub b_strides: Strides,
    pub rank: usize,
    pub scaling: f32,
}

/// CPU reference of the epilogue terms: adds them (in f64, rounded once) to every row of `c` that
/// a group owns, as [`grouped_gemm_f32_mxfp4w`] does after the product.
pub fn mxfp4_epilogue_ref(cfg: &GroupedGemm, offsets: &[u32], epi: &HostEpilogue, c: &mut [f32]) {
    for g in 0..cfg.groups {
        for s in offsets[g] as usize..offsets[g + 1] as usize {
            for n in 0..cfg.n {
                let mut add = epi.bias.map_or(0.0, |b| b[g * cfg.n + n] as f64);
                if let Some(HostLoraUp { u, b, b_strides: st, rank, scaling }) = epi.lora {
                    let dot: f64 = (0..rank)
                        .map(|j| u[s * rank + j] as f64 * b[g * st.group + j * st.row + n * st.col] as f64)
                        .sum();
                    add += scaling as f64 * dot;
                }
                let i = g * cfg.c.group + s * cfg.c.row + n * cfg.c.col;
                c[i] = (c[i] as f64 + add) as f32;
            }
        }
    }
}

/// The epilogue as gemm.cu's `struct Epi` takes it (device addresses, 0 for none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Epi {
    bias: u64,
    u: u64,
    lb: u64,
    lb_j: u64,
    lb_n: u64,
    lb_group: u64,
    rank: u32,
    scaling: f32,
}

// SAFETY: #[repr(C)] plain data whose layout matches the CUDA struct (6 u64 (pointers are 8 bytes
// on every CUDA target), u32, f32: no padding on either side).
unsafe impl DeviceRepr for Epi {}

/// Kernel parameters; must match `struct Params` in gemm.cu field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Params {
    a_row: u64,
    a_col: u64,
    a_group: u64,
    b_row: u64,
    b_col: u64,
    b_group: u64,
    c_row: u64,
    c_col: u64,
    c_group: u64,
    groups: u32,
    grouped_k: u32,
    m: u32,
    n: u32,
    k: u32,
    total_rows: u32,
    alpha: f32,
    beta: f32,
}

// SAFETY: #[repr(C)] plain data whose layout matches the CUDA struct (9 u64, 6 u32, 2 f32: no
// padding on either side).
unsafe impl DeviceRepr for Params {}

const TILE_M: usize = 64;
const TILE_N: usize = 64;
/// C tile `[m, n]` and block size of the MXFP4 (tensor-core) kernels.
const TC_TILE: (usize, usize) = (128, 256);
const TC_THREADS: u32 = 512;
/// Their k slice; A is split into bf16 rows of K rounded up to it.
const TC_K: usize = 64;
/// Their dynamic shared memory: `stages` stages of A (hi and lo, or hi alone with [`Mma::Bf16`],
/// 128 x 72 bf16 each) and two decoded B tiles (256 x 72 bf16); gemm.cu asserts the same number.
const fn tc_smem_bytes(mma: Mma, stages: u32) -> u32 {
    (stages * mma.parts() as u32 * 128 * 72 + 2 * 256 * 72) * 2
}
/// A's k rounded up to [`TC_K`]: the row length of its bf16 copy.
const fn padded_k(k: usize) -> usize {
    k.div_ceil(TC_K) * TC_K
}
const SPLIT_THREADS: u32 = 256;
/// Block size of the wgmma MXFP4 kernels (two warpgroups, the same C tile as the mma.sync ones).
const WG_THREADS: u32 = 256;
/// Their dynamic shared memory: four stages of A (16 KiB per tile of 128 x 64 bf16, hi and lo or hi
/// alone) and three decoded B tiles of 33 KiB; gemm.cu asserts it.
const fn wg_smem_bytes(mma: Mma) -> u32 {
    4 * mma.parts() as u32 * 16384 + 3 * 33792
}
/// The register-operand kernels' C tile (activation rows, C columns: weight rows forward, weight
/// columns in the transposed warp-specialized kernel) and the forward one's dynamic
/// shared memory: three stages of A (32 KiB per tile of 256 x 64 bf16, hi and lo or hi alone),
/// then the tile's epilogue terms (256 rows of u and 128 columns of bias and B, up to rank 16).
const RS_TILE: (usize, usize) = (256, 128);
const fn rs_smem_bytes(mma: Mma) -> u32 {
    3 * mma.parts() as u32 * 32768 + (256 * 16 + 128 * 17) * 4
}
/// Block size of the warp-specialized kernels (a producer warpgroup and two consumers).
const WS_THREADS: u32 = 384;
/// The registers a thread of it starts with (65,536 / 384 rounded down to 8), for which its
/// setmaxnreg counts are balanced (gemm.cu asserts the balance).
const WS_ENTRY_REGS: i32 = 168;
/// Its dynamic shared memory (same tile as the register-operand kernel, both orientations): A stages
/// (three with [`Mma::Split`], five with [`Mma::Bf16`]), weight stages of 4,608 bytes (4 KiB of
/// codes and room for 256 bf16 scales; two or four), the epilogue terms and one full and one empty
/// mbarrier per stage.
const fn ws_smem_bytes(mma: Mma) -> u32 {
    let (stages, w_stages) = if mma.parts() == 2 { (3, 2) } else { (5, 4) };
    stages * mma.parts() as u32 * 32768 + w_stages * 4608 + (256 * 16 + 128 * 17) * 4 + 16 * (stages + w_stages)
}

/// A TMA descriptor (the driver's `CUtensorMap`), passed by value as a `__grid_constant__` kernel
/// parameter (`TmaMap` in gemm.cu).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TmaMap(sys::CUtensorMap);

// SAFETY: plain data, 16 u64, which the kernel reads as its 128-byte `struct TmaMap`.
unsafe impl DeviceRepr for TmaMap {}

/// The TMA descriptor of `outer` rows of `inner` elements, `row_bytes` apart, at device address
/// `addr` (16-byte aligned, row_bytes a multiple of 16: the caller checks), copied in boxes of
/// `boxes = (inner, outer)` elements; elements past either end read as zeros.
fn tma_map_2d(
    op: &str,
    what: &str,
    addr: u64,
    dtype: sys::CUtensorMapDataType,
    (inner, outer, row_bytes): (usize, usize, usize),
    boxes: (u32, u32),
    swizzle: sys::CUtensorMapSwizzle,
) -> Result<TmaMap> {
    let dims = [inner as u64, outer as u64];
    let strides = [row_bytes as u64];
    let box_dims = [boxes.0, boxes.1];
    let unit = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: a host-side call that writes the 128-byte descriptor `map`; every array it reads has
    // the rank (2) elements it reads (the strides rank − 1).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            2,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            box_dims.as_ptr(),
            unit.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Driver(format!(
            "{op}: the TMA descriptor of {what} ({outer} rows of {inner}, {row_bytes} bytes apart, boxes of {boxes:?}) \
             was refused: {r:?}"
        )));
    }
    // SAFETY: written by the successful call above.
    Ok(TmaMap(unsafe { map.assume_init() }))
}
const THREADS: u32 = 256;
const GRID_YZ_MAX: usize = 65535;
/// The largest N, K or Grouped::K output dimension that the narrow-shape kernels take (padded to 8
/// or 16 in registers: LoRA ranks 1 to 16).
const NARROW: usize = 16;
/// The most groups the narrow-N kernel takes: it finds each row tile's group one group at a time
/// (gemm.cu, `row_tile_serial`), cheap for a model's experts and slow for many thousands of groups,
/// which go to the general kernel.
const NARROW_N_MAX_GROUPS: usize = 256;
/// Rows of C per block of the narrow-N kernel: 64 sums per lane, 8 warps.
const fn narrow_n_rows(np: usize) -> usize {
    8 * 64 / np
}
/// Values of the large output dimension per block of the small-output kernel.
const SMALL_OUT_M: usize = 64;
/// C tile `[m, n]` of the tiny-K kernel (one column per thread).
const TINY_K_TILE: (usize, usize) = (128, THREADS as usize);
/// Dimensions stay below 2^31 so the kernels' u32 tile arithmetic cannot wrap.
const DIM_MAX: usize = i32::MAX as usize;

fn shape_err(msg: String) -> Error {
    Error::Shape(msg)
}

/// One past the largest element index of a `[rows, cols]` operand over `groups` groups; 0 when
/// nothing is touched.
fn extent(op: &str, what: &str, groups: usize, s: Strides, rows: usize, cols: usize) -> Result<usize> {
    if groups == 0 || rows == 0 || cols == 0 {
        return Ok(0);
    }
    let last = (groups - 1)
        .checked_mul(s.group)
        .and_then(|x| x.checked_add((rows - 1).checked_mul(s.row)?))
        .and_then(|x| x.checked_add((cols - 1).checked_mul(s.col)?))
        .and_then(|x| x.checked_add(1));
    last.ok_or_else(|| shape_err(format!("{op}: {what}'s strides {s:?} overflow usize")))
}

fn check_len(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got >= want {
        Ok(())
    } else {
        Err(shape_err(format!("{op}: {what} has {got} elements, expected at least {want}")))
    }
}

fn check_dim(op: &str, what: &str, v: usize) -> Result<()> {
    if v <= DIM_MAX {
        Ok(())
    } else {
        Err(shape_err(format!("{op}: {what} = {v} exceeds {DIM_MAX}")))
    }
}

/// The `[rows, cols]` extents of A, B and C (conservative: every group at its largest offset).
fn operand_dims(cfg: &GroupedGemm, total_rows: usize) -> [(usize, usize); 3] {
    match cfg.grouped {
        Grouped::M => [(total_rows, cfg.k), (cfg.k, cfg.n), (total_rows, cfg.n)],
        Grouped::K => [(cfg.m, total_rows), (total_rows, cfg.n), (cfg.m, cfg.n)],
    }
}

/// Checks the configuration against the buffer lengths (`b_len` is `None` for MXFP4 weights,
/// checked by the caller). Shared by the launchers and tested on the CPU.
fn check_shapes(
    op: &str,
    cfg: &GroupedGemm,
    offsets_len: usize,
    total_rows: usize,
    a_len: usize,
    b_len: Option<usize>,
    c_len: usize,
) -> Result<()> {
    if offsets_len != cfg.groups + 1 {
        return Err(shape_err(format!("{op}: offsets has {offsets_len} elements, expected {}", cfg.groups + 1)));
    }
    for (what, v) in [("groups", cfg.groups), ("m", cfg.m), ("n", cfg.n), ("k", cfg.k), ("total_rows", total_rows)] {
        check_dim(op, what, v)?;
    }
    if cfg.grouped == Grouped::K {
        // The kernels number the row tiles of all groups in 32 bits (under Grouped::M there are at
        // most total_rows of them).
        check_dim(op, "groups · m", cfg.groups.saturating_mul(cfg.m))?;
    }
    let [(ar, ac), (br, bc), (cr, cc)] = operand_dims(cfg, total_rows);
    check_len(op, "a", a_len, extent(op, "a", cfg.groups, cfg.a, ar, ac)?)?;
    if let Some(b_len) = b_len {
        check_len(op, "b", b_len, extent(op, "b", cfg.groups, cfg.b, br, bc)?)?;
    }
    check_len(op, "c", c_len, extent(op, "c", cfg.groups, cfg.c, cr, cc)?)
}

fn params(cfg: &GroupedGemm, total_rows: usize) -> Params {
    // Every value was checked against DIM_MAX (dims) or usize extents (strides) by check_shapes.
    Params {
        a_row: cfg.a.row as u64,
        a_col: cfg.a.col as u64,
        a_group: cfg.a.group as u64,
        b_row: cfg.b.row as u64,
        b_col: cfg.b.col as u64,
        b_group: cfg.b.group as u64,
        c_row: cfg.c.row as u64,
        c_col: cfg.c.col as u64,
        c_group: cfg.c.group as u64,
        groups: cfg.groups as u32,
        grouped_k: (cfg.grouped == Grouped::K) as u32,
        m: cfg.m as u32,
        n: cfg.n as u32,
        k: cfg.k as u32,
        total_rows: total_rows as u32,
        alpha: cfg.alpha,
        beta: cfg.beta,
    }
}

/// Grid `(n tiles, row tiles ≤ 65535, 1)` of `tile_m x tile_n` C tiles; the kernel loops over
/// whatever is left.
fn launch_config(cfg: &GroupedGemm, total_rows: usize, tile_m: usize, tile_n: usize) -> LaunchConfig {
    grid(cfg.n.div_ceil(tile_n), row_tiles(cfg, total_rows, tile_m), 1)
}

/// How many row tiles of `tile_m` rows the kernels walk (`row_tile` in gemm.cu numbers them group
/// by group), at most: under Grouped::M, `Σ_g ⌈rows_g / tile_m⌉ ≤ ⌊(total_rows + groups · (tile_m −
/// 1)) / tile_m⌋` however nondecreasing offsets split the rows, so the host needs the total alone
/// (no copy of the plan); under Grouped::K, `groups · ⌈m / tile_m⌉`.
fn row_tiles(cfg: &GroupedGemm, total_rows: usize, tile_m: usize) -> usize {
    match cfg.grouped {
        Grouped::M => {
            let most = total_rows.saturating_add(cfg.groups.saturating_mul(tile_m - 1)) / tile_m;
            // No more tiles than rows (a tile holds at least one).
            most.min(total_rows)
        }
        Grouped::K => cfg.groups.saturating_mul(cfg.m.div_ceil(tile_m)),
    }
}

/// A grid of `(x, y ≤ 65535, z ≤ 65535)` blocks of [`THREADS`], every level at least 1 (x, at
/// most `DIM_MAX / 64` here, is far from its limit of 2^31 − 1).
fn grid(x: usize, y: usize, z: usize) -> LaunchConfig {
    let (x, y, z) = (x.max(1), y.clamp(1, GRID_YZ_MAX), z.clamp(1, GRID_YZ_MAX));
    LaunchConfig { grid_dim: (x as u32, y as u32, z as u32), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The kernel that [`grouped_gemm_f32`] runs for a configuration (see gemm.cu for each one's tiling).
/// `np`/`kp`: the small dimension padded to 8 or 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    /// 64x64 tiles of C, K in slices of 32: every other shape.
    General,
    /// Grouped::M, `n ≤ 16`, A read along k (`a.col ≤ a.row`), at most 256 groups: a block owns
    /// 512/np rows, its warps own rows and their lanes split K (LoRA `u = x A_eᵀ`, `du = s dy B_e`).
    NarrowN { np: usize },
    /// Grouped::M, `k ≤ 16`: a block owns 128 x 256 of C, one column per thread with its B column in
    /// registers (LoRA `y += s u B_eᵀ`, `dx += du A_e`).
    TinyK { kp: usize },
    /// Grouped::K with `n ≤ 16` and A read along m (`a.row ≤ a.col`), or, `transposed`, `m ≤ 16`
    /// and B read along n (`b.col ≤ b.row`), run as `Cᵀ = Bᵀ Aᵀ`: a block owns 64 indices of the
    /// large dimension, its warps split the group's rows (LoRA `dB_e += s dy_eᵀ u_e`,
    /// `dA_e += du_eᵀ x_e`).
    SmallOut { np: usize, transposed: bool },
}

impl std::fmt::Display for F32Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.symbol())?;
        if let Self::SmallOut { transposed: true, .. } = self {
            f.write_str(" (as Cᵀ = Bᵀ Aᵀ)")?;
        }
        Ok(())
    }
}

impl F32Kernel {
    /// Its symbol in gemm.cu.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::General => "grouped_gemm_f32",
            Self::NarrowN { np: 8 } => "grouped_gemm_f32_narrow_n8",
            Self::NarrowN { .. } => "grouped_gemm_f32_narrow_n16",
            Self::TinyK { kp: 8 } => "grouped_gemm_f32_tiny_k8",
            Self::TinyK { .. } => "grouped_gemm_f32_tiny_k16",
            Self::SmallOut { np: 8, .. } => "grouped_gemm_f32_small_out8",
            Self::SmallOut { .. } => "grouped_gemm_f32_small_out16",
        }
    }

    /// The grid for `cfg`, already transposed for a transposed [`F32Kernel::SmallOut`].
    fn launch_config(self, cfg: &GroupedGemm, total_rows: usize) -> LaunchConfig {
        match self {
            Self::General => launch_config(cfg, total_rows, TILE_M, TILE_N),
            Self::NarrowN { np } => grid(1, row_tiles(cfg, total_rows, narrow_n_rows(np)), 1),
            Self::TinyK { .. } => launch_config(cfg, total_rows, TINY_K_TILE.0, TINY_K_TILE.1),
            Self::SmallOut { .. } => grid(cfg.m.div_ceil(SMALL_OUT_M), 1, cfg.groups),
        }
    }
}

/// The kernel [`grouped_gemm_f32`] runs for `cfg`: one of the narrow-shape kernels when `n`, `k` or
/// a Grouped::K output dimension is at most 16 and the large operand can be read along its
/// contiguous dimension, the general one otherwise.
pub fn grouped_gemm_f32_kernel(cfg: &GroupedGemm) -> F32Kernel {
    let pad = |x: usize| if x <= 8 { 8 } else { 16 };
    match cfg.grouped {
        Grouped::M if cfg.n <= NARROW && cfg.a.col <= cfg.a.row && cfg.groups <= NARROW_N_MAX_GROUPS => {
            F32Kernel::NarrowN { np: pad(cfg.n) }
        }
        Grouped::M if cfg.k <= NARROW => F32Kernel::TinyK { kp: pad(cfg.k) },
        Grouped::K if cfg.n <= NARROW && cfg.a.row <= cfg.a.col => {
            F32Kernel::SmallOut { np: pad(cfg.n), transposed: false }
        }
        Grouped::K if cfg.m <= NARROW && cfg.b.col <= cfg.b.row => {
            F32Kernel::SmallOut { np: pad(cfg.m), transposed: true }
        }
        _ => F32Kernel::General,
    }
}

/// The same product transposed, `Cᵀ(n, m) = Σ Bᵀ(n, k) Aᵀ(k, m)`, with A and B swapped: the
/// configuration that computes `cfg` when called with operands `(b, a)`. Grouped::K only (under
/// Grouped::M the groups split the rows of C, which would become its columns).
fn transposed(cfg: &GroupedGemm) -> GroupedGemm {
    debug_assert_eq!(cfg.grouped, Grouped::K, "transposed: Grouped::K only");
    let t = |s: Strides| Strides { row: s.col, col: s.row, group: s.group };
    GroupedGemm { m: cfg.n, n: cfg.m, a: t(cfg.b), b: t(cfg.a), c: t(cfg.c), ..*cfg }
}

/// Nothing to compute or write.
fn is_empty(cfg: &GroupedGemm) -> bool {
    cfg.groups == 0 || cfg.n == 0 || (cfg.grouped == Grouped::K && cfg.m == 0)
}

/// CPU reference (f64 accumulation): applies `cfg` to host buffers; `offsets` has `groups + 1`
/// nondecreasing entries. Panics if a buffer is too short for `cfg`.
pub fn grouped_gemm_ref(cfg: &GroupedGemm, offsets: &[u32], a: &[f32], b: &[f32], c: &mut [f32]) {
    assert_eq!(offsets.len(), cfg.groups + 1, "grouped_gemm_ref: offsets");
    let total_rows = offsets[cfg.groups] as usize;
    if let Err(e) = check_shapes("grouped_gemm_ref", cfg, offsets.len(), total_rows, a.len(), Some(b.len()), c.len()) {
        panic!("{e}");
    }
    // One task per output row of one group: (group, row index into A and C, first k, depth).
    let mut tasks = vec![];
    for g in 0..cfg.groups {
        let (o, end) = (offsets[g] as usize, offsets[g + 1] as usize);
        assert!(o <= end, "grouped_gemm_ref: offsets decrease at group {g}");
        match cfg.grouped {
            Grouped::M => tasks.extend((o..end).map(|i| (g, i, 0, cfg.k))),
            Grouped::K => tasks.extend((0..cfg.m).map(|i| (g, i, o, end - o))),
        }
    }
    let (s, old_c) = (cfg, &*c);
    let rows: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(g, i, k0, depth)| {
            (0..s.n)
                .map(|n| {
                    let dot: f64 = (k0..k0 + depth)
                        .map(|k| {
                            let av = a[g * s.a.group + i * s.a.row + k * s.a.col] as f64;
                            av * b[g * s.b.group + k * s.b.row + n * s.b.col] as f64
                        })
                        .sum();
                    let v = s.alpha as f64 * dot;
                    let ci = g * s.c.group + i * s.c.row + n * s.c.col;
                    (if s.beta == 0.0 { v } else { v + s.beta as f64 * old_c[ci] as f64 }) as f32
                })
                .collect()
        })
        .collect();
    for (&(g, i, _, _), row) in tasks.iter().zip(rows) {
        for (n, v) in row.into_iter().enumerate() {
            c[g * cfg.c.group + i * cfg.c.row + n * cfg.c.col] = v;
        }
    }
}

/// FP4 E2M1 code → value from its bits (sign, 2-bit exponent with bias 1, 1-bit mantissa), as the
/// kernel decodes it; tests check it against `oxtune_mxfp4::FP4_VALUES`.
fn e2m1(code: u8) -> f32 {
    let (e, m) = (((code >> 1) & 3) as u32, (code & 1) as u32);
    let bits = if e > 0 {
        ((e + 126) << 23) | (m << 22)
    } else if m == 1 {
        0x3F00_0000
    } else {
        0
    };
    f32::from_bits(bits | (((code & 8) as u32) << 28))
}

/// E8M0 → `2^(s − 127)` exactly (`s = 0` is the subnormal 2^-127).
fn e8m0(s: u8) -> f32 {
    f32::from_bits(if s == 0 { 0x0040_0000 } else { (s as u32) << 23 })
}

/// `[experts, rows, cols]` f32 from MXFP4 bytes (CPU only: the kernel never materialises this).
fn dequantize(w: &Mxfp4HostWeight) -> Vec<f32> {
    let nblk = w.cols / 32;
    assert_eq!(w.cols % 32, 0, "mxfp4: cols {} is not a multiple of 32", w.cols);
    assert_eq!(w.scales.len(), w.experts * w.rows * nblk, "mxfp4: scales");
    assert_eq!(w.blocks.len(), w.scales.len() * 16, "mxfp4: blocks");
    let mut out = vec![0.0f32; w.experts * w.rows * w.cols];
    for (blk, (vals, &s)) in out.chunks_exact_mut(32).zip(w.scales).enumerate() {
        let scale = e8m0(s);
        for (pair, &byte) in vals.chunks_exact_mut(2).zip(&w.blocks[blk * 16..blk * 16 + 16]) {
            pair[0] = e2m1(byte & 15) * scale;
            pair[1] = e2m1(byte >> 4) * scale;
        }
    }
    out
}

/// The B strides that read expert `g`'s dequantized `W_g [rows, cols]` as `W_g[n, k]` (forward,
/// `!transposed`) or `W_g[k, n]` (`transposed`).
fn mxfp4_b_strides(rows: usize, cols: usize, transposed: bool) -> Strides {
    if transposed {
        Strides { row: cols, col: 1, group: rows * cols }
    } else {
        Strides { row: 1, col: cols, group: rows * cols }
    }
}

/// CPU reference of [`grouped_gemm_f32_mxfp4w`]: dequantizes `w` on the host, then
/// [`grouped_gemm_ref`] with `B(k, n) = W_g[n, k]` (`!transposed`) or `W_g[k, n]` (`transposed`).
pub fn grouped_gemm_mxfp4w_ref(
    cfg: &GroupedGemm,
    offsets: &[u32],
    a: &[f32],
    w: &Mxfp4HostWeight,
    transposed: bool,
    c: &mut [f32],
) {
    assert_eq!(cfg.grouped, Grouped::M, "grouped_gemm_mxfp4w_ref: Grouped::M only");
    assert!(cfg.groups <= w.experts, "grouped_gemm_mxfp4w_ref: {} groups, {} experts", cfg.groups, w.experts);
    let (k, n) = if transposed { (w.rows, w.cols) } else { (w.cols, w.rows) };
    assert_eq!((cfg.k, cfg.n), (k, n), "grouped_gemm_mxfp4w_ref: (k, n) vs the weight");
    let dense = dequantize(w);
    let cfg = GroupedGemm { b: mxfp4_b_strides(w.rows, w.cols, transposed), ..*cfg };
    grouped_gemm_ref(&cfg, offsets, a, &dense, c);
}

/// GPU grouped GEMM, f32 operands. `offsets` (device, `groups + 1` nondecreasing u32) must end
/// with `total_rows`, the host copy of `offsets[groups]`: the buffer lengths are checked against
/// it, and the kernel clamps every offset to it so that a wrong device value cannot reach memory
/// outside the checked bounds. Never allocates.
pub fn grouped_gemm_f32(
    gpu: &Gpu,
    cfg: &GroupedGemm,
    offsets: &CudaView<'_, u32>,
    total_rows: usize,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let op = "grouped_gemm_f32";
    check_shapes(op, cfg, offsets.len(), total_rows, a.len(), Some(b.len()), c.len())?;
    if is_empty(cfg) {
        return Ok(());
    }
    let kernel = grouped_gemm_f32_kernel(cfg);
    let f = gpu.function("gemm", SRC, kernel.symbol())?;
    let (cfg, a, b) = match kernel {
        F32Kernel::SmallOut { transposed: true, .. } => (transposed(cfg), b, a),
        _ => (*cfg, a, b),
    };
    let p = params(&cfg, total_rows);
    // SAFETY: every kernel in F32Kernel is grouped_gemm_f32*(float* c, const float* a, const
    // float* b, const unsigned* offsets, Params p): offsets holds groups + 1 u32 (checked); the
    // kernel clamps offsets to p.total_rows, so A, B and C are read/written only at indices below
    // the extents that check_shapes verified against each buffer's length (a transposed product
    // swaps A and B and the roles of every stride pair, which leaves each operand's extent as it
    // was); Params matches the CUDA struct.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(c)
            .arg(a)
            .arg(b)
            .arg(offsets)
            .arg(&p)
            .launch(kernel.launch_config(&cfg, total_rows))
    }?;
    Ok(())
}

/// GPU grouped GEMM whose B is expert `g`'s MXFP4 weight, decoded to bf16 in shared memory tile by
/// tile and multiplied on tensor cores (with [`Mma::Split`] A is split into bf16 hi + lo: f32-level
/// accuracy; with [`Mma::Bf16`] it is rounded to bf16 once, half the tensor-core work):
/// `B(k, n) = W_g[n, k]` when `!transposed` (forward `y = x W_gᵀ`: `K = cols`, `N = rows`) and
/// `W_g[k, n]` when `transposed` (input gradient `dx = dy W_g`: `K = rows`, `N = cols`).
/// Grouped::M only; `cfg.b` is ignored; group `g` uses expert `g` (`groups ≤ experts`).
/// `offsets` and `total_rows` as in [`grouped_gemm_f32`]. A is first written once in bf16 (hi and
/// lo, or hi alone) as `total_rows` rows of K rounded up to 64 into the [`Gpu`]'s scratch
/// ([`mxfp4_scratch_elems`]: with [`Mma::Split`] the size of A in f32, half that with
/// [`Mma::Bf16`], and room for a LoRA's partial sums), which grows if it is smaller. The terms of
/// `epi` (an expert's bias, its LoRA up-projection; [`Mxfp4Epilogue::default`] for none) are added
/// to every output as it is stored.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_f32_mxfp4w(
    gpu: &Gpu,
    cfg: &GroupedGemm,
    offsets: &CudaView<'_, u32>,
    total_rows: usize,
    a: &CudaView<'_, f32>,
    w: &Mxfp4Weight<'_>,
    transposed: bool,
    mma: Mma,
    epi: &Mxfp4Epilogue<'_>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let path = Mxfp4Path::for_gpu(gpu, mma);
    grouped_gemm_f32_mxfp4w_on(gpu, cfg, offsets, total_rows, a, w, transposed, mma, path, epi, c)
}

/// Elements (u16) of [`Gpu`] scratch an MXFP4 product over `total_rows` rows of A with reduction
/// length `k` (`cfg.k`) takes, with or without a LoRA ([`grouped_gemm_f32_mxfp4w_lora`]): A in
/// bf16, hi and lo with [`Mma::Split`], rows padded to a multiple of 64, then the LoRA
/// down-projection's partial sums.
pub fn mxfp4_scratch_elems(total_rows: usize, k: usize, mma: Mma) -> usize {
    mma.parts() * total_rows * padded_k(k) + split_down_elems(total_rows, k)
}

/// A LoRA down-projection of a grouped product's A: `u [total_rows, rank] = alpha · A_g F_gᵀ`
/// with `F_g(j, k) = factor[g·strides.group + j·strides.row + k·strides.col]` (`j < rank`, `k <
/// K`): the forward `u = x A_eᵀ` (PEFT's `lora_A [r·E, in]`: strides `(in, 1, r·in)`) or the
/// input gradient's `du = s · dy B_e` (`lora_B [out, r·E]`: `(E, r·E, 1)`).
pub struct LoraDown<'a> {
    pub factor: CudaView<'a, f32>,
    pub strides: Strides,
    pub alpha: f32,
    pub rank: usize,
}

/// Both factors of an expert product's LoRA, for [`grouped_gemm_f32_mxfp4w_lora`]: the down
/// factor and the up factor `B_g(j, n)` as in [`LoraUp`] (`up_strides`, `scaling`).
pub struct Mxfp4Lora<'a> {
    pub down: LoraDown<'a>,
    pub up: CudaView<'a, f32>,
    pub up_strides: Strides,
    pub scaling: f32,
}

/// Checks a down-projection over the rows and K of `cfg` (Grouped::M) against its buffers.
fn check_down(
    op: &str,
    cfg: &GroupedGemm,
    (offsets_len, total_rows): (usize, usize),
    a_len: usize,
    d: &LoraDown,
    u_len: usize,
) -> Result<()> {
    if cfg.grouped != Grouped::M {
        return Err(shape_err(format!("{op}: a LoRA down-projection splits the rows (Grouped::M)")));
    }
    check_dim(op, "rank", d.rank)?;
    let down = GroupedGemm { n: d.rank, c: Strides::row_major(d.rank), ..*cfg };
    check_shapes(op, &down, offsets_len, total_rows, a_len, None, u_len)?;
    check_len(
        op,
        "the down factor",
        d.factor.len(),
        extent(op, "the down factor", cfg.groups, d.strides, d.rank, cfg.k)?,
    )
}

/// [`LoraDown`] over the rows of the grouped product `cfg` (Grouped::M: its groups, K and A
/// strides; `n`, `b` and `c` unused) into `u` (`[total_rows, rank]` row-major): up to rank
/// [`SPLIT_DOWN_RANK`], the kernel that [`grouped_gemm_f32_mxfp4w_lora`] runs in its split of A,
/// without the split (the same bits: a backward pass that did not keep `u` gets the forward's
/// values back); larger ranks by [`grouped_gemm_f32`]. `u` rows that no group owns are not
/// specified. Takes scratch for the partial sums (see [`mxfp4_scratch_elems`]).
pub fn grouped_lora_down_f32(
    gpu: &Gpu,
    cfg: &GroupedGemm,
    offsets: &CudaView<'_, u32>,
    total_rows: usize,
    a: &CudaView<'_, f32>,
    d: &LoraDown<'_>,
    u: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let op = "grouped_lora_down_f32";
    check_down(op, cfg, (offsets.len(), total_rows), a.len(), d, u.len())?;
    if d.rank == 0 || total_rows == 0 || cfg.groups == 0 {
        return Ok(());
    }
    if d.rank > SPLIT_DOWN_RANK || cfg.k == 0 {
        let st = d.strides;
        let down = GroupedGemm {
            n: d.rank,
            alpha: d.alpha,
            beta: 0.0,
            b: Strides { row: st.col, col: st.row, group: st.group },
            c: Strides::row_major(d.rank),
            ..*cfg
        };
        return grouped_gemm_f32(gpu, &down, offsets, total_rows, a, &d.factor, u);
    }
    let kp = padded_k(cfg.k);
    let f = gpu.function("gemm", SRC, "lora_down_partials")?;
    let reduce = gpu.function("gemm", SRC, "split_down_reduce")?;
    let (pf, f_guard) = d.factor.device_ptr(&gpu.stream);
    let (pu, u_guard) = u.device_ptr_mut(&gpu.stream);
    let fac = sd_factor(pf, d);
    let p = params(cfg, total_rows);
    gpu.with_scratch(split_down_elems(total_rows, cfg.k), |mut sums| {
        // SAFETY: lora_down_partials(const float* a, const unsigned* offsets, Params p, unsigned kp,
        // SdFactor fac, float* part): A read at (group, row < total_rows, k < K) by the strides
        // check_down verified (offsets clamped to total_rows), the factor inside its checked extent,
        // the partial sums written inside `sums` (split_down_elems: chunks · total_rows ·
        // SPLIT_DOWN_RANK f32, chunks = the grid's x); SdFactor matches the CUDA struct.
        unsafe {
            gpu.stream
                .launch_builder(&f)
                .arg(a)
                .arg(offsets)
                .arg(&p)
                .arg(&(kp as u32))
                .arg(&fac)
                .arg(&mut sums)
                .launch(split_down_grid(&p, kp))
        }?;
        split_down_sum(gpu, &reduce, &sums, &SplitDown { factor: fac, out: pu, ld: d.rank, alpha: d.alpha }, &p, kp)
    })?;
    drop((f_guard, u_guard));
    Ok(())
}

/// gemm.cu's view of a down-projection's factor at device address `f`.
fn sd_factor(f: u64, d: &LoraDown<'_>) -> SdFactor {
    let st = d.strides;
    SdFactor { f, fj: st.row as u64, fk: st.col as u64, fg: st.group as u64, rank: d.rank as u32 }
}

/// [`grouped_gemm_f32_mxfp4w`] with a LoRA whose down-projection comes from the product's own A:
/// `u = down.alpha · A_g F_gᵀ` ([`LoraDown`], written to `u`, which the caller keeps for the
/// gradients), then `C = A · W + bias + scaling · u B_g` as the product stores C (the forward `y
/// = x W_eᵀ + s · (x A_eᵀ) B_eᵀ`, and the input gradient `dx = dy W_e + (s · dy B_e) A_e`). Up to
/// rank [`SPLIT_DOWN_RANK`] the split of A into bf16 computes u in the same read of A (partial
/// sums of chunks of 1,024 k in the scratch, then added in order: the same bits on every run, and
/// as [`grouped_lora_down_f32`]'s); larger ranks take an f32 product of their own first. `u` rows
/// that no group owns are not specified.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_f32_mxfp4w_lora(
    gpu: &Gpu,
    cfg: &GroupedGemm,
    offsets: &CudaView<'_, u32>,
    total_rows: usize,
    a: &CudaView<'_, f32>,
    w: &Mxfp4Weight<'_>,
    transposed: bool,
    mma: Mma,
    bias: Option<CudaView<'_, f32>>,
    lora: &Mxfp4Lora<'_>,
    u: &mut CudaViewMut<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let op = "grouped_gemm_f32_mxfp4w_lora";
    let d = &lora.down;
    let rank = d.rank;
    check_down(op, cfg, (offsets.len(), total_rows), a.len(), d, u.len())?;
    if rank > SPLIT_DOWN_RANK || cfg.k == 0 {
        // u by the f32 kernels (which also take K = 0); then the product with the term in its store.
        grouped_lora_down_f32(gpu, cfg, offsets, total_rows, a, d, u)?;
        let epi = Mxfp4Epilogue {
            bias,
            lora: Some(LoraUp {
                u: u.as_view(),
                b: lora.up.slice(..),
                b_strides: lora.up_strides,
                rank,
                scaling: lora.scaling,
            }),
        };
        return grouped_gemm_f32_mxfp4w(gpu, cfg, offsets, total_rows, a, w, transposed, mma, &epi, c);
    }
    let path = Mxfp4Path::for_gpu(gpu, mma);
    let lens =
        EpiLens { bias: bias.as_ref().map(|b| b.len()), lora: Some((u.len(), lora.up.len(), lora.up_strides, rank)) };
    if !check_mxfp4_product(op, cfg, (offsets.len(), total_rows), (a.len(), c.len()), w, transposed, &lens)? {
        // No product to run (N = 0): u still is.
        return grouped_lora_down_f32(gpu, cfg, offsets, total_rows, a, d, u);
    }
    let bias = bias.as_ref().map(|b| b.device_ptr(&gpu.stream));
    let (pb, b_guard) = lora.up.device_ptr(&gpu.stream);
    let (pf, f_guard) = d.factor.device_ptr(&gpu.stream);
    let (pu, u_guard) = u.device_ptr_mut(&gpu.stream);
    let down = SplitDown { factor: sd_factor(pf, d), out: pu, ld: rank, alpha: d.alpha };
    let e = Epi { bias: bias.as_ref().map_or(0, |(p, _)| *p), ..Epi::default() };
    let e = epi_lora(e, pu, pb, lora.up_strides, rank, lora.scaling);
    mxfp4w_launch(gpu, cfg, offsets, total_rows, a, w, (transposed, mma, path), &e, Some(&down), c)?;
    drop((bias, u_guard, b_guard, f_guard));
    Ok(())
}

/// Which tensor-core kernel runs an MXFP4 product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mxfp4Path {
    /// Warp-level `mma.sync` (sm_80 and later) with three A stages: 180 KiB of shared memory per
    /// block for [`Mma::Split`], 126 KiB for [`Mma::Bf16`].
    MmaSync,
    /// The same kernel with two A stages: 144 KiB for [`Mma::Split`] (which an A100's 163 KiB
    /// holds), 108 KiB for [`Mma::Bf16`]. GPUs with less (the sm_86/89 cards: 99 KiB) cannot run
    /// the MXFP4 products: the product is an error that says so.
    MmaSyncTwoStage,
    /// Hopper's warpgroup `wgmma` (sm_90a only): two warpgroups, each 64 x 256 of the 128 x 256
    /// tile.
    Wgmma,
    /// The forward product with the weight as wgmma's register operand (its fragments decoded
    /// straight into registers, 128 weight rows x 256 activation rows per block); the transposed
    /// product as [`Mxfp4Path::Wgmma`] (sm_90a only).
    WgmmaRs,
    /// Both products warp-specialized, with the weight as the register operand: a producer
    /// warpgroup copies the activations and the MXFP4 codes by TMA several slices ahead, one block
    /// per SM walks the tiles, and the consumers keep one slice's products in flight while they
    /// decode the next (sm_90a only). Codes that are not 16-byte aligned, K = 0, tile counts,
    /// weight rows or one expert's scale bytes past 32 bits, or a kernel build with other than 168
    /// registers a thread at entry run `WgmmaRs`'s kernels.
    WgmmaWs,
}

impl Mxfp4Path {
    /// `WgmmaWs` on Hopper (the kernels are compiled for sm_90a there; `OXTUNE_MXFP4_KERNEL=wgmma`
    /// or `=rs` in the environment picks `Wgmma` or `WgmmaRs`, to compare them in a whole training
    /// step); elsewhere `MmaSync` where the GPU's shared memory per block holds its stages for
    /// `mma`, else `MmaSyncTwoStage`.
    pub fn for_gpu(gpu: &Gpu, mma: Mma) -> Self {
        if gpu.arch == "sm_90a" {
            // Read once per process: this runs before every expert product.
            static CHOSEN: std::sync::OnceLock<Mxfp4Path> = std::sync::OnceLock::new();
            return *CHOSEN.get_or_init(|| match std::env::var("OXTUNE_MXFP4_KERNEL").as_deref() {
                Ok("wgmma") => Self::Wgmma,
                Ok("rs") => Self::WgmmaRs,
                _ => Self::WgmmaWs,
            });
        }
        let optin = gpu.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
        match optin {
            Ok(bytes) if bytes >= 0 && (bytes as u32) < tc_smem_bytes(mma, 3) => Self::MmaSyncTwoStage,
            _ => Self::MmaSync,
        }
    }
}

/// [`grouped_gemm_f32_mxfp4w`] on a chosen kernel (tests and benchmarks compare them); `Wgmma`,
/// `WgmmaRs` or `WgmmaWs` on a GPU that is not sm_90a is an error.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_f32_mxfp4w_on(
    gpu: &Gpu,
    cfg: &GroupedGemm,
    offsets: &CudaView<'_, u32>,
    total_rows: usize,
    a: &CudaView<'_, f32>,
    w: &Mxfp4Weight<'_>,
    transposed: bool,
    mma: Mma,
    path: Mxfp4Path,
    epi: &Mxfp4Epilogue<'_>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let op = "grouped_gemm_f32_mxfp4w";
    if matches!(path, Mxfp4Path::Wgmma | Mxfp4Path::WgmmaRs | Mxfp4Path::WgmmaWs) && gpu.arch != "sm_90a" {
        return Err(shape_err(format!("{op}: the wgmma kernel needs sm_90a, this GPU is {}", gpu.arch)));
    }
    let lens = EpiLens {
        bias: epi.bias.as_ref().map(|b| b.len()),
        lora: epi.lora.as_ref().map(|l| (l.u.len(), l.b.len(), l.b_strides, l.rank)),
    };
    if !check_mxfp4_product(op, cfg, (offsets.len(), total_rows), (a.len(), c.len()), w, transposed, &lens)? {
        return Ok(());
    }
    // The epilogue's device addresses; the guards keep the buffers' streams in order until the
    // launch is enqueued.
    let bias = epi.bias.as_ref().map(|b| b.device_ptr(&gpu.stream));
    let lora = epi.lora.as_ref().map(|l| (l.u.device_ptr(&gpu.stream), l.b.device_ptr(&gpu.stream), l));
    // In the store: ranks up to EPILOGUE_RANK; otherwise one product after the kernel.
    let fused = lora.as_ref().is_some_and(|(_, _, l)| l.rank <= EPILOGUE_RANK);
    let mut e = Epi { bias: bias.as_ref().map_or(0, |(p, _)| *p), ..Epi::default() };
    if let (true, Some(((pu, _), (pb, _), l))) = (fused, lora.as_ref()) {
        e = epi_lora(e, *pu, *pb, l.b_strides, l.rank, l.scaling);
    }
    mxfp4w_launch(gpu, cfg, offsets, total_rows, a, w, (transposed, mma, path), &e, None, c)?;
    drop(bias);
    match (fused, lora) {
        (false, Some((gu, gb, l))) => {
            drop((gu, gb));
            l.add_to(gpu, cfg, offsets, total_rows, c)
        }
        _ => Ok(()),
    }
}

/// The epilogue `e` with a LoRA term: `u` and the up factor's address `b` with its strides.
fn epi_lora(e: Epi, u: u64, b: u64, st: Strides, rank: usize, scaling: f32) -> Epi {
    Epi {
        u,
        lb: b,
        lb_j: st.row as u64,
        lb_n: st.col as u64,
        lb_group: st.group as u64,
        rank: rank as u32,
        scaling,
        ..e
    }
}

/// A LoRA down-projection that the split of A computes (gemm.cu, `split_a_bf16_down`): the
/// factor as the kernel takes it and where the result goes (device addresses: the caller holds
/// their guards until the launches are enqueued).
struct SplitDown {
    factor: SdFactor,
    out: u64,
    ld: usize,
    alpha: f32,
}

/// gemm.cu's `struct SdFactor`: `F_g(j, k) = f[g·fg + j·fj + k·fk]`, `j < rank`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SdFactor {
    f: u64,
    fj: u64,
    fk: u64,
    fg: u64,
    rank: u32,
}

// SAFETY: #[repr(C)] plain data matching the CUDA struct (four 8-byte fields and a u32, padded to
// 40 bytes on both sides).
unsafe impl DeviceRepr for SdFactor {}
const _: () = assert!(std::mem::size_of::<SdFactor>() == 40);

/// The largest LoRA rank that the split of A projects (gemm.cu, `sd::RANK`).
pub const SPLIT_DOWN_RANK: usize = 8;
/// Values of k per chunk of the split's down-projection partial sums (gemm.cu, `sd::KC`).
const SPLIT_DOWN_KC: usize = 4 * SPLIT_THREADS as usize;
/// Row tile of `split_a_bf16_down` (gemm.cu, `sd::TM`).
const SPLIT_DOWN_TM: usize = 32;

/// u16 elements of the down-projection's partial sums over `total_rows` rows of K = `k`: one f32
/// per row, chunk and [`SPLIT_DOWN_RANK`] columns.
fn split_down_elems(total_rows: usize, k: usize) -> usize {
    2 * total_rows * padded_k(k).div_ceil(SPLIT_DOWN_KC) * SPLIT_DOWN_RANK
}

/// The split of A, the product on `path` with the epilogue `e` (checked and built by the caller),
/// and, with `down`, the LoRA down-projection computed in the split, before the product.
#[allow(clippy::too_many_arguments)]
fn mxfp4w_launch(
    gpu: &Gpu,
    cfg: &GroupedGemm,
    offsets: &CudaView<'_, u32>,
    total_rows: usize,
    a: &CudaView<'_, f32>,
    w: &Mxfp4Weight<'_>,
    (transposed, mma, path): (bool, Mma, Mxfp4Path),
    e: &Epi,
    down: Option<&SplitDown>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let op = "grouped_gemm_f32_mxfp4w";
    // The two mma.sync paths are one kernel compiled with three or two A stages (TC_STAGES).
    let stages = if path == Mxfp4Path::MmaSyncTwoStage { 2 } else { 3 };
    // The warp-specialized kernel's operands as its tensor maps see them: the codes as rows of
    // cols / 2 bytes (a multiple of 16: cols is of whole blocks), 16-byte aligned; its tile
    // numbers (row tiles x column tiles), TMA row coordinates and one expert's scale offsets (the
    // transposed producer's, rows·cols/32 bytes) fit 32 bits.
    let (blocks_addr, blocks_guard) = w.blocks.device_ptr(&gpu.stream);
    let ws_tiles = row_tiles(cfg, total_rows, RS_TILE.0)
        .checked_mul(cfg.n.div_ceil(RS_TILE.1))
        .filter(|&t| t <= u32::MAX as usize);
    let ws_shape = path == Mxfp4Path::WgmmaWs
        && cfg.k > 0
        && blocks_addr % 16 == 0
        && ws_tiles.is_some()
        && w.experts.checked_mul(w.rows).is_some_and(|r| r <= DIM_MAX)
        && w.rows.checked_mul(w.cols / 32).is_some_and(|b| b <= u32::MAX as usize);
    let (module, src) = mxfp4_module(path, mma);
    let ws_name = ws_kernel_name(transposed);
    let ws = ws_shape && ws_kernel_usable(gpu, mma, transposed)?;
    let (name, threads, smem, tile) = match (path, transposed) {
        _ if ws => (ws_name, WS_THREADS, ws_smem_bytes(mma), RS_TILE),
        (Mxfp4Path::Wgmma, false) => ("grouped_gemm_bf16a_mxfp4w_wg", WG_THREADS, wg_smem_bytes(mma), TC_TILE),
        (Mxfp4Path::Wgmma | Mxfp4Path::WgmmaRs | Mxfp4Path::WgmmaWs, true) => {
            ("grouped_gemm_bf16a_mxfp4w_wg_transposed", WG_THREADS, wg_smem_bytes(mma), TC_TILE)
        }
        (Mxfp4Path::WgmmaRs | Mxfp4Path::WgmmaWs, false) => {
            ("grouped_gemm_bf16a_mxfp4w_rs", WG_THREADS, rs_smem_bytes(mma), RS_TILE)
        }
        (_, false) => ("grouped_gemm_bf16a_mxfp4w", TC_THREADS, tc_smem_bytes(mma, stages), TC_TILE),
        (_, true) => ("grouped_gemm_bf16a_mxfp4w_transposed", TC_THREADS, tc_smem_bytes(mma, stages), TC_TILE),
    };
    let split = gpu.function(module, src, if down.is_some() { "split_a_bf16_down" } else { "split_a_bf16" })?;
    let f = gpu.function(module, src, name)?;
    if let Err(e) = f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
    {
        // Most likely a GPU with less shared memory per block than the kernel's stages take.
        let optin = gpu.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
        let allows = optin.as_ref().map_or_else(|_| "an unknown amount".to_string(), |b| format!("{b} bytes"));
        let least = tc_smem_bytes(Mma::Bf16, 2);
        let advice = match optin {
            Ok(b) if mma == Mma::Split && b >= 0 && b as u32 >= least => "try --precision bf16".to_string(),
            _ => format!(
                "the MXFP4 expert kernels need at least {least} bytes (A100 and Hopper GPUs have enough): train on \
                 the CPU (--device cpu) on this one"
            ),
        };
        return Err(Error::Driver(format!(
            "{op}: the {path:?} MXFP4 kernel needs {smem} bytes of shared memory per block with {mma:?} and this \
             GPU allows {allows} ({e:?}); {advice}"
        )));
    }
    let p = params(cfg, total_rows);
    let (rows, cols) = (w.rows as u32, w.cols as u32);
    // A as bf16 rows of kp (hi, then lo with Mma::Split) in the GPU's scratch.
    let kp = padded_k(cfg.k);
    let parts = mma.parts();
    let part = total_rows
        .checked_mul(kp)
        .filter(|&n| n <= DIM_MAX)
        .ok_or_else(|| shape_err(format!("{op}: {total_rows} rows x {kp} exceeds {DIM_MAX} elements")))?;
    let kp32 = kp as u32;
    // split_a_bf16 writes every element of both parts before the GEMM (same stream) reads them
    // (split_a_bf16_down every row a group owns: the products store no other); the down-projection's
    // partial sums follow the parts (at a multiple of 128 bytes: kp is of 64).
    let partials = down.map_or(0, |_| split_down_elems(total_rows, cfg.k));
    let c_product = &mut *c;
    gpu.with_scratch(parts * part + partials, |mut a16| {
        let (mut a16, mut part_sums) = a16.split_at_mut(parts * part);
        if let Some(d) = down {
            let reduce = gpu.function(module, src, "split_down_reduce")?;
            split_down(gpu, (&split, &reduce), (&mut a16, part, &mut part_sums), a, offsets, (&p, kp), d)?;
        } else {
            let (mut hi, mut lo) = a16.split_at_mut(part);
            // SAFETY: split_a_bf16(unsigned* hi, unsigned* lo, const float* a, const unsigned* offsets,
            // Params p, unsigned kp): rows below p.total_rows, each kp bf16 (kp/2 words, kp a multiple of
            // 64) into hi and, unless MMA_ONE_PASS (Mma::Bf16, where lo is an empty view never
            // written), lo: both `part` long; A is read at (group, row < total_rows, k < K) by the
            // strides check_shapes verified (offsets clamped to total_rows).
            unsafe {
                gpu.stream
                    .launch_builder(&split)
                    .arg(&mut hi)
                    .arg(&mut lo)
                    .arg(a)
                    .arg(offsets)
                    .arg(&p)
                    .arg(&kp32)
                    .launch(LaunchConfig {
                        grid_dim: (
                            (kp / 4).div_ceil(SPLIT_THREADS as usize) as u32,
                            total_rows.clamp(1, GRID_YZ_MAX) as u32,
                            1,
                        ),
                        block_dim: (SPLIT_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    })
            }?;
        }
        let a16 = a16.as_view();
        let (hi, lo) = a16.split_at(part);
        if let (true, Some(tiles)) = (ws, ws_tiles) {
            return launch_ws(
                gpu,
                &f,
                (&p, total_rows, kp, mma, tiles, transposed),
                (&hi, &lo),
                (w, blocks_addr),
                offsets,
                e,
                c_product,
                smem,
            );
        }
        // SAFETY: every MXFP4 kernel (grouped_gemm_bf16a_mxfp4w{,_transposed}, _wg{,_transposed},
        // _rs) is (float* c, const bf16* a_hi, const bf16* a_lo, const unsigned char* blocks, const
        // unsigned char* scales, const unsigned* offsets, Params p, unsigned w_rows, unsigned w_cols,
        // unsigned kp, Epi epi): blocks/scales hold experts·rows·cols/2 and experts·rows·cols/32
        // bytes, groups ≤ experts, and (K, N) match the weight's orientation (check_mxfp4), so every
        // decoded block lies inside them; A hi/lo hold total_rows rows of kp (rows read only below
        // the clamped offsets, k below kp); C as in grouped_gemm_f32; the epilogue reads the bias at
        // g·N + n (< groups·N), u at (start + row)·rank + j (< total_rows·rank, offsets clamped) and B
        // inside extent(groups, b_strides, rank, N), all checked by check_epilogue, and only with a
        // nonzero address and rank ≤ EPILOGUE_RANK; the block gets the dynamic shared memory its
        // stages (and, for _rs, its epilogue region) use, and the wgmma kernels run only on sm_90a.
        unsafe {
            gpu.stream
                .launch_builder(&f)
                .arg(c_product)
                .arg(&hi)
                .arg(&lo)
                .arg(&w.blocks)
                .arg(&w.scales)
                .arg(offsets)
                .arg(&p)
                .arg(&rows)
                .arg(&cols)
                .arg(&kp32)
                .arg(e)
                .launch(LaunchConfig {
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: smem,
                    ..launch_config(cfg, total_rows, tile.0, tile.1)
                })
        }?;
        Ok(())
    })?;
    drop(blocks_guard);
    Ok(())
}

/// The grid of `split_a_bf16_down` / `lora_down_partials`: chunks of k x row tiles of one group
/// each (row_tile in gemm.cu numbers them as the GEMMs do).
fn split_down_grid(p: &Params, kp: usize) -> LaunchConfig {
    let tiles = (p.total_rows as usize + p.groups as usize * (SPLIT_DOWN_TM - 1)) / SPLIT_DOWN_TM;
    LaunchConfig {
        grid_dim: (kp.div_ceil(SPLIT_DOWN_KC) as u32, tiles.clamp(1, GRID_YZ_MAX) as u32, 1),
        block_dim: (SPLIT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `split_down_reduce`: the chunks' partial sums in `sums` added in order into `d.out`.
fn split_down_sum(
    gpu: &Gpu,
    reduce: &cudarc::driver::CudaFunction,
    sums: &CudaViewMut<'_, u16>,
    d: &SplitDown,
    p: &Params,
    kp: usize,
) -> Result<()> {
    let outputs = p.total_rows as usize * SPLIT_DOWN_RANK;
    // SAFETY: split_down_reduce(const float* part, float* out, unsigned long long ld, unsigned rows,
    // unsigned rank, unsigned chunks, float alpha): reads the chunks' sums (chunks · rows ·
    // SPLIT_DOWN_RANK f32 inside `sums`, split_down_elems), writes out[s·ld + j] for s < rows, j <
    // rank, which the caller checked against the output's length.
    unsafe {
        gpu.stream
            .launch_builder(reduce)
            .arg(&sums.as_view())
            .arg(&d.out)
            .arg(&(d.ld as u64))
            .arg(&p.total_rows)
            .arg(&d.factor.rank)
            .arg(&(kp.div_ceil(SPLIT_DOWN_KC) as u32))
            .arg(&d.alpha)
            .launch(LaunchConfig {
                grid_dim: (outputs.div_ceil(SPLIT_THREADS as usize) as u32, 1, 1),
                block_dim: (SPLIT_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
    }?;
    Ok(())
}

/// The split of A (`split_a_bf16_down` into `a16`'s hi and lo parts of `part` elements each, the
/// partial sums into `sums`) and the sum of its chunks into `d.out`.
fn split_down(
    gpu: &Gpu,
    (split, reduce): (&cudarc::driver::CudaFunction, &cudarc::driver::CudaFunction),
    (a16, part, sums): (&mut CudaViewMut<'_, u16>, usize, &mut CudaViewMut<'_, u16>),
    a: &CudaView<'_, f32>,
    offsets: &CudaView<'_, u32>,
    (p, kp): (&Params, usize),
    d: &SplitDown,
) -> Result<()> {
    let (mut hi, mut lo) = a16.split_at_mut(part);
    // SAFETY: split_a_bf16_down(unsigned* hi, unsigned* lo, const float* a, const unsigned* offsets,
    // Params p, unsigned kp, SdFactor fac, float* part): hi and lo as for split_a_bf16 (rows below
    // the clamped offsets only); the factor is read at g < groups, j < rank, k < K, inside the
    // extent the caller checked; `sums` holds split_down_elems(total_rows, K) u16, i.e. chunks ·
    // total_rows · SPLIT_DOWN_RANK f32 (chunks = the grid's x), written at chunk < chunks, row <
    // total_rows; SdFactor matches the CUDA struct.
    unsafe {
        gpu.stream
            .launch_builder(split)
            .arg(&mut hi)
            .arg(&mut lo)
            .arg(a)
            .arg(offsets)
            .arg(p)
            .arg(&(kp as u32))
            .arg(&d.factor)
            .arg(&mut *sums)
            .launch(split_down_grid(p, kp))
    }?;
    split_down_sum(gpu, reduce, sums, d, p, kp)
}

/// The NVRTC module (name, source) that holds a path's MXFP4 kernels for `mma`.
fn mxfp4_module(path: Mxfp4Path, mma: Mma) -> (&'static str, &'static str) {
    match (path, mma) {
        (Mxfp4Path::MmaSyncTwoStage, Mma::Split) => ("gemm_two_stage", SRC_TWO_STAGE),
        (Mxfp4Path::MmaSyncTwoStage, Mma::Bf16) => ("gemm_two_stage_bf16", SRC_TWO_STAGE_ONE_PASS),
        (_, Mma::Split) => ("gemm", SRC),
        (_, Mma::Bf16) => ("gemm_bf16", SRC_ONE_PASS),
    }
}

/// The warp-specialized kernel of an orientation.
fn ws_kernel_name(transposed: bool) -> &'static str {
    if transposed {
        "grouped_gemm_bf16a_mxfp4w_ws_transposed"
    } else {
        "grouped_gemm_bf16a_mxfp4w_ws"
    }
}

/// Whether this build's warp-specialized kernel of an orientation can run (on sm_90a): its
/// setmaxnreg moves registers within the block, balanced for the registers ptxas gives a thread at
/// entry (gemm.cu, namespace ws); a build that gave it another count would wait forever there, so
/// [`Mxfp4Path::WgmmaWs`] then runs `_rs` or `_wg_transposed` instead.
pub(crate) fn ws_kernel_usable(gpu: &Gpu, mma: Mma, transposed: bool) -> Result<bool> {
    let (module, src) = mxfp4_module(Mxfp4Path::WgmmaWs, mma);
    Ok(gpu.function(module, src, ws_kernel_name(transposed))?.num_regs().ok() == Some(WS_ENTRY_REGS))
}

/// Launches a warp-specialized kernel (gemm.cu, `grouped_gemm_bf16a_mxfp4w_ws`, or
/// `_ws_transposed` when `transposed`) on A's bf16 parts `hi` / `lo` (`lo` empty with
/// [`Mma::Bf16`]) and the weight whose codes start at `blocks_addr` (16-byte aligned; the caller
/// checked the kernel's conditions): one block per SM, no more than `tiles`, the caller's bound on
/// the tiles (blocks past the real tiles find none and return).
#[allow(clippy::too_many_arguments)]
fn launch_ws(
    gpu: &Gpu,
    f: &cudarc::driver::CudaFunction,
    (p, total_rows, kp, mma, tiles, transposed): (&Params, usize, usize, Mma, usize, bool),
    (hi, lo): (&CudaView<'_, u16>, &CudaView<'_, u16>),
    (w, blocks_addr): (&Mxfp4Weight<'_>, u64),
    offsets: &CudaView<'_, u32>,
    e: &Epi,
    c: &mut CudaViewMut<'_, f32>,
    smem: u32,
) -> Result<()> {
    let op = "grouped_gemm_f32_mxfp4w";
    let (hi_addr, hi_guard) = hi.device_ptr(&gpu.stream);
    let (lo_addr, lo_guard) = lo.device_ptr(&gpu.stream);
    let bf16 = sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    let a_map = |what, addr| {
        let swizzle = sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B;
        tma_map_2d(op, what, addr, bf16, (kp, total_rows, kp * 2), (TC_K as u32, RS_TILE.0 as u32), swizzle)
    };
    let tm_hi = a_map("A (hi)", hi_addr)?;
    // With Mma::Bf16 the kernel never reads lo's map.
    let tm_lo = if mma == Mma::Split { a_map("A (lo)", lo_addr)? } else { tm_hi };
    // Per slice, forward: 128 weight rows x the slice's 32 bytes; transposed: the slice's 64 weight
    // rows x the tile's 64 bytes (128 columns), 16-byte chunks swizzled so that the kernel's
    // ldmatrix of 8 rows meets no bank conflict.
    let (w_box, w_swizzle) = if transposed {
        ((RS_TILE.1 as u32 / 2, TC_K as u32), sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B)
    } else {
        ((TC_K as u32 / 2, RS_TILE.1 as u32), sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE)
    };
    let tm_w = tma_map_2d(
        op,
        "the MXFP4 codes",
        blocks_addr,
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        (w.cols / 2, w.experts * w.rows, w.cols / 2),
        w_box,
        w_swizzle,
    )?;
    let sms = gpu.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
    let (rows, cols) = (w.rows as u32, w.cols as u32);
    // SAFETY: grouped_gemm_bf16a_mxfp4w_ws{,_transposed}(float* c, const unsigned char* scales, const unsigned*
    // offsets, Params p, unsigned w_rows, unsigned w_cols, Epi epi, TmaMap tm_hi, tm_lo, tm_w): C,
    // the scales, the offsets and the epilogue as for the other MXFP4 kernels (see the caller); the
    // tensor maps describe A's hi and lo parts (total_rows rows of kp bf16) and the codes
    // (experts·rows rows of cols / 2 bytes) exactly, so the TMA reads nothing outside them (past
    // their ends it writes zeros); their guards keep the buffers' streams in order until the launch
    // is enqueued; the block gets the shared memory ws_smem_bytes computes (gemm.cu asserts the
    // same), and it runs only on sm_90a.
    unsafe {
        gpu.stream
            .launch_builder(f)
            .arg(c)
            .arg(&w.scales)
            .arg(offsets)
            .arg(p)
            .arg(&rows)
            .arg(&cols)
            .arg(e)
            .arg(&tm_hi)
            .arg(&tm_lo)
            .arg(&tm_w)
            .launch(LaunchConfig {
                grid_dim: (tiles.min(sms).max(1) as u32, 1, 1),
                block_dim: (WS_THREADS, 1, 1),
                shared_mem_bytes: smem,
            })
    }?;
    drop((hi_guard, lo_guard));
    Ok(())
}

/// An epilogue's buffer lengths: the bias's, and the LoRA term's `(u, b, b_strides, rank)`.
struct EpiLens {
    bias: Option<usize>,
    lora: Option<(usize, usize, Strides, usize)>,
}

/// What every MXFP4 product checks before it launches: the weight against the configuration, the
/// operands' and the epilogue's buffers. Ok(false): nothing to compute (no rows or an empty shape).
fn check_mxfp4_product(
    op: &str,
    cfg: &GroupedGemm,
    (offsets_len, total_rows): (usize, usize),
    (a_len, c_len): (usize, usize),
    w: &Mxfp4Weight<'_>,
    transposed: bool,
    lens: &EpiLens,
) -> Result<bool> {
    check_mxfp4(op, cfg, w.experts, w.rows, w.cols, w.blocks.len(), w.scales.len(), transposed)?;
    check_shapes(op, cfg, offsets_len, total_rows, a_len, None, c_len)?;
    check_epilogue(op, cfg, total_rows, lens)?;
    Ok(!is_empty(cfg) && total_rows > 0)
}

/// Checks an epilogue's buffers against the product: the bias holds `groups · N`, u `total_rows ·
/// rank` and B every `(g, j, n)` its strides address.
fn check_epilogue(op: &str, cfg: &GroupedGemm, total_rows: usize, epi: &EpiLens) -> Result<()> {
    if let Some(len) = epi.bias {
        let want = cfg.groups.checked_mul(cfg.n).ok_or_else(|| shape_err(format!("{op}: bias size overflows")))?;
        check_len(op, "the epilogue's bias", len, want)?;
    }
    if let Some((u_len, b_len, b_strides, rank)) = epi.lora {
        if rank == 0 {
            return Err(shape_err(format!("{op}: the epilogue's LoRA rank is 0")));
        }
        check_dim(op, "the epilogue's LoRA rank", rank)?;
        let want =
            total_rows.checked_mul(rank).ok_or_else(|| shape_err(format!("{op}: the epilogue's u overflows")))?;
        check_len(op, "the epilogue's u", u_len, want)?;
        check_len(op, "the epilogue's LoRA B", b_len, extent(op, "LoRA B", cfg.groups, b_strides, rank, cfg.n)?)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_mxfp4(
    op: &str,
    cfg: &GroupedGemm,
    experts: usize,
    rows: usize,
    cols: usize,
    blocks_len: usize,
    scales_len: usize,
    transposed: bool,
) -> Result<()> {
    if cfg.grouped != Grouped::M {
        return Err(shape_err(format!("{op}: only Grouped::M is supported (weight gradients of MXFP4 are not taken)")));
    }
    if !cols.is_multiple_of(32) {
        return Err(shape_err(format!("{op}: the weight's cols {cols} is not a multiple of 32")));
    }
    check_dim(op, "rows", rows)?;
    check_dim(op, "cols", cols)?;
    if cfg.groups > experts {
        return Err(shape_err(format!("{op}: {} groups but only {experts} experts", cfg.groups)));
    }
    let nblk = experts
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(cols / 32))
        .ok_or_else(|| shape_err(format!("{op}: weight size overflows")))?;
    if scales_len != nblk {
        return Err(shape_err(format!("{op}: scales has {scales_len} elements, expected {nblk}")));
    }
    if blocks_len != nblk * 16 {
        return Err(shape_err(format!("{op}: blocks has {blocks_len} elements, expected {}", nblk * 16)));
    }
    let (k, n) = if transposed { (rows, cols) } else { (cols, rows) };
    if (cfg.k, cfg.n) != (k, n) {
        return Err(shape_err(format!(
            "{op}: (k, n) = ({}, {}) but the weight [{rows}, {cols}] {} gives ({k}, {n})",
            cfg.k,
            cfg.n,
            if transposed { "transposed" } else { "not transposed" }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
