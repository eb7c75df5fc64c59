//! The frozen base weight of a (Q)LoRA layer, in whatever storage it has.
//!
//! [`FrozenWeight`] is a logical matrix `W [out, in]` applied as `y = x W^T` (PyTorch `nn.Linear`
//! convention; the MXFP4 checkpoint layout of gpt-oss experts). An implementation only has to decode a range
//! of rows to f32 and report its size; the matmuls against it are provided on top, decoding one tile of rows
//! or columns at a time so the full f32 matrix is never materialised. `bf16` and NF4 implementations live in
//! this crate. MXFP4 experts plug in from `trainer` (this crate must not depend on `mxfp4`): the checkpoint's
//! `[E, out, in]` blocks are already `[out, in]` per expert, so a newtype over one expert's view forwards to
//! the codec and wraps its errors in [`Error::Base`]:
//!
//! ```text
//! struct Mxfp4Expert<'a>(oxtune_mxfp4::Mxfp4Tensor<&'a [u8]>); // experts.index(e)
//! impl oxtune_lora::FrozenWeight for Mxfp4Expert<'_> {
//!     fn shape(&self) -> (usize, usize) { (self.0.rows(), self.0.cols()) }
//!     fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) -> oxtune_lora::Result<()> {
//!         check_tile(rows.clone(), 0..self.0.cols(), self.0.rows(), self.0.cols(), dst.len())?;
//!         self.0.dequantize_rows_f32(rows.start, dst).map_err(|e| Error::Base(Box::new(e)))
//!     }
//!     fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, dst: &mut [f32]) -> oxtune_lora::Result<()> {
//!         self.0.dequantize_tile_f32(rows, cols, dst).map_err(|e| Error::Base(Box::new(e)))
//!     }
//!     fn nbytes(&self) -> usize { self.0.nbytes() }
//! }
//! ```

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use crate::gemm::{sgemm_ptr, View};
use crate::{shape_err, Error, Result};

/// Rows (output features) decoded per tile of [`FrozenWeight::matmul_acc`].
const ROW_TILE: usize = 64;
/// Columns (input features) decoded per tile of [`FrozenWeight::matmul_t_acc`].
const COL_TILE: usize = 256;

/// A frozen matrix `W [out, in]` that can decode rows on demand.
pub trait FrozenWeight: Send + Sync {
    /// `(out, in)`.
    fn shape(&self) -> (usize, usize);

    /// Decodes rows `rows` of `W` into `dst [rows.len(), in]`.
    fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) -> Result<()>;

    /// Bytes held in memory by the weight.
    fn nbytes(&self) -> usize;

    /// Decodes the tile `rows x cols` into `dst [rows.len(), cols.len()]`. The default decodes whole rows;
    /// formats that can decode a column range directly should override it.
    fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, dst: &mut [f32]) -> Result<()> {
        let (out, n_in) = self.shape();
        check_tile(rows.clone(), cols.clone(), out, n_in, dst.len())?;
        let mut row = vec![0.0; n_in];
        for (r, d) in rows.zip(dst.chunks_exact_mut(cols.len().max(1))) {
            self.dequantize_rows(r..r + 1, &mut row)?;
            d.copy_from_slice(&row[cols.clone()]);
        }
        Ok(())
    }

    /// `y [tokens, out] += x [tokens, in] W^T`.
    fn matmul_acc(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (out, n_in) = self.shape();
        let tokens = token_rows("input x", x.len(), n_in)?;
        if y.len() != tokens * out {
            return Err(shape_err("output y", format!("[{tokens}, {out}]"), format!("{} elements", y.len())));
        }
        // Each tile writes its own columns of y; tiles run in parallel, each writing through its own view.
        let y_ptr = SendPtr(y.as_mut_ptr());
        let y_len = y.len();
        (0..out.div_ceil(ROW_TILE)).into_par_iter().try_for_each(|t| {
            let rows = t * ROW_TILE..((t + 1) * ROW_TILE).min(out);
            let mut w = vec![0.0; rows.len() * n_in];
            self.dequantize_rows(rows.clone(), &mut w)?;
            // SAFETY: y is borrowed mutably for the whole parallel loop and each tile's C view covers only its
            // own columns `rows` of y, so no element is touched by two tiles.
            unsafe {
                sgemm_ptr(
                    1.0,
                    View::rm(x, tokens, n_in),
                    View::rm(&w, rows.len(), n_in).t(),
                    1.0,
                    y_ptr.get(),
                    y_len,
                    rows.start,
                    out,
                    1,
                )
            };
            Ok(())
        })
    }

    /// `dx [tokens, in] += dy [tokens, out] W`.
    fn matmul_t_acc(&self, dy: &[f32], dx: &mut [f32]) -> Result<()> {
        let (out, n_in) = self.shape();
        let tokens = token_rows("upstream gradient dy", dy.len(), out)?;
        if dx.len() != tokens * n_in {
            return Err(shape_err(
                "input gradient dx",
                format!("[{tokens}, {n_in}]"),
                format!("{} elements", dx.len()),
            ));
        }
        let dx_ptr = SendPtr(dx.as_mut_ptr());
        let dx_len = dx.len();
        (0..n_in.div_ceil(COL_TILE)).into_par_iter().try_for_each(|t| {
            let cols = t * COL_TILE..((t + 1) * COL_TILE).min(n_in);
            let mut w = vec![0.0; out * cols.len()];
            self.dequantize_tile(0..out, cols.clone(), &mut w)?;
            // SAFETY: as in matmul_acc, each tile's C view covers only its own columns `cols` of dx.
            unsafe {
                sgemm_ptr(
                    1.0,
                    View::rm(dy, tokens, out),
                    View::rm(&w, out, cols.len()),
                    1.0,
                    dx_ptr.get(),
                    dx_len,
                    cols.start,
                    n_in,
                    1,
                )
            };
            Ok(())
        })
    }
}

/// The output buffer's pointer, shared by parallel tiles that each write a disjoint set of its elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint column ranges of one buffer to parallel tiles (see the call sites).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn token_rows(what: &str, len: usize, features: usize) -> Result<usize> {
    if features == 0 || !len.is_multiple_of(features) {
        return Err(shape_err(what, format!("[tokens, {features}]"), format!("{len} elements")));
    }
    Ok(len / features)
}

/// Validates a tile request against a weight `[out, in]` and a destination length.
pub fn check_tile(rows: Range<usize>, cols: Range<usize>, out: usize, n_in: usize, dst: usize) -> Result<()> {
    if rows.start > rows.end || rows.end > out || cols.start > cols.end || cols.end > n_in {
        return Err(Error::OutOfRange(format!("tile rows {rows:?} x cols {cols:?} of a [{out}, {n_in}] weight")));
    }
    if dst != rows.len() * cols.len() {
        return Err(shape_err(
            "tile destination",
            format!("[{}, {}]", rows.len(), cols.len()),
            format!("{dst} elements"),
        ));
    }
    Ok(())
}

/// A bf16 weight `[out, in]`.
#[derive(Clone, Debug)]
pub struct Bf16Weight {
    data: Vec<bf16>,
    out: usize,
    n_in: usize,
}

impl Bf16Weight {
    /// From a row-major `[out, in]` buffer (an `nn.Linear` weight).
    pub fn new(data: Vec<bf16>, out: usize, n_in: usize) -> Result<Self> {
        if data.len() != out * n_in {
            return Err(shape_err("bf16 weight", format!("[{out}, {n_in}]"), format!("{} elements", data.len())));
        }
        Ok(Self { data, out, n_in })
    }

    /// From a row-major `[in, out]` buffer (one expert of transformers' gpt-oss `gate_up_proj` / `down_proj`),
    /// transposed once here so that rows decode contiguously.
    pub fn from_in_out(data: &[bf16], n_in: usize, out: usize) -> Result<Self> {
        if data.len() != out * n_in {
            return Err(shape_err(
                "bf16 weight in [in, out] layout",
                format!("[{n_in}, {out}]"),
                format!("{} elements", data.len()),
            ));
        }
        let mut t = vec![bf16::ZERO; data.len()];
        for (i, row) in data.chunks_exact(out).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                t[o * n_in + i] = v;
            }
        }
        Ok(Self { data: t, out, n_in })
    }

    pub fn data(&self) -> &[bf16] {
        &self.data
    }
}

impl FrozenWeight for Bf16Weight {
    fn shape(&self) -> (usize, usize) {
        (self.out, self.n_in)
    }

    fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) -> Result<()> {
        check_tile(rows.clone(), 0..self.n_in, self.out, self.n_in, dst.len())?;
        let src = &self.data[rows.start * self.n_in..rows.end * self.n_in];
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
        Ok(())
    }

    fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, dst: &mut [f32]) -> Result<()> {
        check_tile(rows.clone(), cols.clone(), self.out, self.n_in, dst.len())?;
        for (r, d) in rows.zip(dst.chunks_exact_mut(cols.len().max(1))) {
            let src = &self.data[r * self.n_in + cols.start..r * self.n_in + cols.end];
            d.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
        }
        Ok(())
    }

    fn nbytes(&self) -> usize {
        2 * self.data.len()
    }
}
