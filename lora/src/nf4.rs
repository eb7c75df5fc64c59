//! NF4 (4-bit NormalFloat) storage exactly as bitsandbytes' `quantize_4bit(quant_type="nf4")`, the QLoRA
//! base-weight format.
//!
//! - The weight is flattened row-major and cut into blocks of [`NF4_BLOCK`] = 64 elements; each block keeps
//!   `absmax = max |w|` (f32).
//! - Each element becomes the index of the nearest of the 16 [`NF4_CODE`] values to `w * (1 / absmax)`
//!   (ties to the lower code, as bitsandbytes' midpoint thresholds `x > t` do). The absmax is clamped to
//!   1e-38 before the reciprocal, so an all-zero block stores the code of 0.0 (`0b0111`).
//! - Two codes per byte: element `2j` in the high nibble, `2j + 1` in the low nibble; an odd element count is
//!   padded with the code of 0.0.
//! - Double quantization (`compress_statistics=True`, QLoRA's recipe): `offset = mean(absmax)` and
//!   `absmax - offset` is stored as 8-bit codes of the signed dynamic map with one f32 absmax per 256 blocks.
//!   Decoding: `absmax = DYNAMIC[q] * nested_absmax[b / 256] + offset`.
//!
//! Dequantization is `NF4_CODE[nibble] * absmax[i / 64]` in f32. Memory: 4.5 bits per weight with f32 absmax,
//! 4 + 8/64 + 32/(64·256) ≈ 4.127 bits with double quantization.

use std::ops::Range;

use rayon::prelude::*;

use crate::frozen::{check_tile, FrozenWeight};
use crate::{shape_err, Error, Result};

/// Elements per NF4 absmax block (bitsandbytes' default `blocksize=64`).
pub const NF4_BLOCK: usize = 64;
/// First-level blocks per block of the double quantization (`quantize_blockwise(..., blocksize=256)`).
pub const NESTED_BLOCK: usize = 256;

/// The NF4 value of each 4-bit code (bitsandbytes `get_4bit_type("nf4")`).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The code of 0.0, stored for all-zero blocks and the padding element.
const ZERO_CODE: u8 = 7;

/// How the per-block absmax values are kept.
#[derive(Clone, Debug, PartialEq)]
pub enum Nf4Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double quantization: one byte per block, one f32 per 256 blocks, and the mean that was subtracted.
    Double { codes: Vec<u8>, nested_absmax: Vec<f32>, offset: f32 },
}

/// An NF4-quantized tensor of `numel` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    numel: usize,
    packed: Vec<u8>,
    absmax: Nf4Absmax,
}

fn nearest_below_ties(mid: &[f32], x: f32) -> usize {
    mid.partition_point(|&m| m < x)
}

fn nf4_midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

impl Nf4Tensor {
    /// Quantizes `x` (row-major) to NF4, with or without double quantization of the absmax.
    pub fn quantize(x: &[f32], double_quant: bool) -> Result<Self> {
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "NF4 quantization input".into(), index: i, value: x[i] });
        }
        let absmax: Vec<f32> = x.par_chunks(NF4_BLOCK).map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
        let mid = nf4_midpoints();
        let code_of = |v: f32, recip: f32| nearest_below_ties(&mid, (v * recip).clamp(-1.0, 1.0)) as u8;
        let mut packed = vec![0u8; x.len().div_ceil(2)];
        // One task per 64-element block = 32 bytes of output.
        packed.par_chunks_mut(NF4_BLOCK / 2).enumerate().for_each(|(b, out)| {
            // bitsandbytes clamps the absmax to 1e-38 before taking the reciprocal, so an all-zero block maps
            // to the code of 0.0.
            let recip = 1.0 / absmax[b].max(1e-38);
            let xb = &x[b * NF4_BLOCK..((b + 1) * NF4_BLOCK).min(x.len())];
            for (j, byte) in out.iter_mut().enumerate() {
                let hi = code_of(xb[2 * j], recip);
                let lo = xb.get(2 * j + 1).map_or(ZERO_CODE, |&v| code_of(v, recip));
                *byte = (hi << 4) | lo;
            }
        });
        let absmax = if double_quant { double_quantize(&absmax) } else { Nf4Absmax::F32(absmax) };
        Ok(Self { numel: x.len(), packed, absmax })
    }

    /// Wraps stored parts (e.g. read from a bitsandbytes checkpoint), checking their sizes.
    pub fn from_parts(numel: usize, packed: Vec<u8>, absmax: Nf4Absmax) -> Result<Self> {
        let blocks = numel.div_ceil(NF4_BLOCK);
        if packed.len() != numel.div_ceil(2) {
            return Err(shape_err(
                "NF4 packed codes",
                format!("{} bytes for {numel} elements", numel.div_ceil(2)),
                packed.len(),
            ));
        }
        match &absmax {
            Nf4Absmax::F32(a) if a.len() != blocks => {
                return Err(shape_err("NF4 absmax", format!("{blocks} values"), a.len()));
            }
            Nf4Absmax::Double { codes, nested_absmax, .. }
                if codes.len() != blocks || nested_absmax.len() != blocks.div_ceil(NESTED_BLOCK) =>
            {
                return Err(shape_err(
                    "NF4 double-quantized absmax",
                    format!("{blocks} codes and {} nested absmax values", blocks.div_ceil(NESTED_BLOCK)),
                    format!("{} and {}", codes.len(), nested_absmax.len()),
                ));
            }
            _ => {}
        }
        Ok(Self { numel, packed, absmax })
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    pub fn absmax(&self) -> &Nf4Absmax {
        &self.absmax
    }

    /// The absmax of block `b` as dequantization uses it.
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        match &self.absmax {
            Nf4Absmax::F32(a) => a[b],
            Nf4Absmax::Double { codes, nested_absmax, offset } => {
                DYNAMIC_SIGNED[codes[b] as usize] * nested_absmax[b / NESTED_BLOCK] + offset
            }
        }
    }

    /// Decodes elements `start .. start + out.len()`.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let end = start.checked_add(out.len()).filter(|&e| e <= self.numel).ok_or_else(|| {
            Error::OutOfRange(format!("elements {start}..{} of an NF4 tensor of {}", start + out.len(), self.numel))
        })?;
        let mut i = start;
        let mut o = 0;
        while i < end {
            let block_end = ((i / NF4_BLOCK + 1) * NF4_BLOCK).min(end);
            let am = self.block_absmax(i / NF4_BLOCK);
            if i % 2 == 1 {
                out[o] = NF4_CODE[(self.packed[i / 2] & 0x0f) as usize] * am;
                (i, o) = (i + 1, o + 1);
            }
            // Whole bytes: two elements each, high nibble first.
            let pairs = (block_end - i) / 2;
            for (dst, &byte) in out[o..o + 2 * pairs].chunks_exact_mut(2).zip(&self.packed[i / 2..i / 2 + pairs]) {
                dst[0] = NF4_CODE[(byte >> 4) as usize] * am;
                dst[1] = NF4_CODE[(byte & 0x0f) as usize] * am;
            }
            (i, o) = (i + 2 * pairs, o + 2 * pairs);
            if i < block_end {
                out[o] = NF4_CODE[(self.packed[i / 2] >> 4) as usize] * am;
                (i, o) = (i + 1, o + 1);
            }
        }
        Ok(())
    }

    /// Decodes the whole tensor (in parallel).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel];
        out.par_chunks_mut(NF4_BLOCK * 64).enumerate().for_each(|(c, chunk)| {
            self.dequantize_range(c * NF4_BLOCK * 64, chunk).expect("chunk lies inside the tensor");
        });
        out
    }

    /// Bytes held: packed codes plus the absmax state.
    pub fn nbytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Nf4Absmax::F32(a) => 4 * a.len(),
                Nf4Absmax::Double { codes, nested_absmax, .. } => codes.len() + 4 * nested_absmax.len() + 4,
            }
    }
}

/// bitsandbytes' double quantization of the first-level absmax values.
fn double_quantize(absmax: &[f32]) -> Nf4Absmax {
    // torch's float32 mean; summing in f64 and rounding once is what its cascade summation approximates.
    let offset = (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mid: Vec<f32> = DYNAMIC_SIGNED.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let mut codes = vec![0u8; centered.len()];
    let mut nested_absmax = vec![0f32; centered.len().div_ceil(NESTED_BLOCK)];
    for ((c, cb), na) in centered.chunks(NESTED_BLOCK).zip(codes.chunks_mut(NESTED_BLOCK)).zip(&mut nested_absmax) {
        *na = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let recip = 1.0 / na.max(1e-38);
        for (q, &v) in cb.iter_mut().zip(c) {
            *q = nearest_below_ties(&mid, (v * recip).clamp(-1.0, 1.0)) as u8;
        }
    }
    Nf4Absmax::Double { codes, nested_absmax, offset }
}

/// A frozen NF4 weight `[out, in]` (QLoRA base).
#[derive(Clone, Debug)]
pub struct Nf4Weight {
    tensor: Nf4Tensor,
    out: usize,
    n_in: usize,
}

impl Nf4Weight {
    /// Quantizes a row-major `[out, in]` weight.
    pub fn quantize(w: &[f32], out: usize, n_in: usize, double_quant: bool) -> Result<Self> {
        if w.len() != out * n_in {
            return Err(shape_err("weight to quantize", format!("[{out}, {n_in}]"), w.len()));
        }
        Ok(Self { tensor: Nf4Tensor::quantize(w, double_quant)?, out, n_in })
    }

    /// Wraps an existing NF4 tensor holding a row-major `[out, in]` weight.
    pub fn from_tensor(tensor: Nf4Tensor, out: usize, n_in: usize) -> Result<Self> {
        if tensor.numel() != out * n_in {
            return Err(shape_err("NF4 weight", format!("[{out}, {n_in}]"), tensor.numel()));
        }
        Ok(Self { tensor, out, n_in })
    }

    pub fn tensor(&self) -> &Nf4Tensor {
        &self.tensor
    }
}

impl FrozenWeight for Nf4Weight {
    fn shape(&self) -> (usize, usize) {
        (self.out, self.n_in)
    }

    fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) -> Result<()> {
        check_tile(rows.clone(), 0..self.n_in, self.out, self.n_in, dst.len())?;
        self.tensor.dequantize_range(rows.start * self.n_in, dst)
    }

    fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, dst: &mut [f32]) -> Result<()> {
        check_tile(rows.clone(), cols.clone(), self.out, self.n_in, dst.len())?;
        for (r, d) in rows.zip(dst.chunks_exact_mut(cols.len().max(1))) {
            self.tensor.dequantize_range(r * self.n_in + cols.start, d)?;
        }
        Ok(())
    }

    fn nbytes(&self) -> usize {
        self.tensor.nbytes()
    }
}

/// bitsandbytes `create_dynamic_map(signed=True)`, the code of the double-quantized absmax. The same table as
/// `oxtune_optim::quant8::SIGNED_MAP`; repeated because `lora` and `optim` must not depend on each other.
#[rustfmt::skip]
pub const DYNAMIC_SIGNED: [f32; 256] = [
    -9.9296874e-1, -9.789063e-1, -9.6484375e-1, -9.507812e-1, -9.3671876e-1, -9.2265624e-1, -9.085938e-1, -8.9453125e-1,
    -8.804687e-1, -8.6640626e-1, -8.5234374e-1, -8.382813e-1, -8.2421875e-1, -8.101562e-1, -7.9609376e-1, -7.8203124e-1,
    -7.679688e-1, -7.5390625e-1, -7.398437e-1, -7.2578126e-1, -7.117188e-1, -6.976563e-1, -6.8359375e-1, -6.695312e-1,
    -6.5546876e-1, -6.414063e-1, -6.273438e-1, -6.1328125e-1, -5.992187e-1, -5.8515626e-1, -5.710938e-1, -5.570313e-1,
    -5.4296875e-1, -5.289062e-1, -5.148437e-1, -5.0078124e-1, -4.867187e-1, -4.7265625e-1, -4.5859373e-1, -4.4453126e-1,
    -4.3046874e-1, -4.1640624e-1, -4.0234375e-1, -3.8828123e-1, -3.7421876e-1, -3.6015624e-1, -3.4609374e-1, -3.3203125e-1,
    -3.1796873e-1, -3.0390626e-1, -2.8984374e-1, -2.7578127e-1, -2.6171875e-1, -2.4765624e-1, -2.3359375e-1, -2.1953125e-1,
    -2.0546874e-1, -1.9140625e-1, -1.7734376e-1, -1.6328125e-1, -1.4921875e-1, -1.3515624e-1, -1.2109375e-1, -1.07031256e-1,
    -9.859375e-2, -9.578126e-2, -9.2968754e-2, -9.015625e-2, -8.734375e-2, -8.453125e-2, -8.171876e-2, -7.890625e-2,
    -7.609375e-2, -7.328125e-2, -7.0468746e-2, -6.7656256e-2, -6.484375e-2, -6.203125e-2, -5.9218753e-2, -5.640625e-2,
    -5.359375e-2, -5.078125e-2, -4.796875e-2, -4.515625e-2, -4.2343747e-2, -3.953125e-2, -3.6718752e-2, -3.390625e-2,
    -3.109375e-2, -2.8281251e-2, -2.546875e-2, -2.265625e-2, -1.9843752e-2, -1.703125e-2, -1.421875e-2, -1.140625e-2,
    -9.71875e-3, -9.156249e-3, -8.59375e-3, -8.03125e-3, -7.46875e-3, -6.90625e-3, -6.34375e-3, -5.78125e-3,
    -5.2187503e-3, -4.6562497e-3, -4.09375e-3, -3.5312497e-3, -2.96875e-3, -2.40625e-3, -1.84375e-3, -1.2812499e-3,
    -9.437501e-4, -8.3125e-4, -7.1875006e-4, -6.062501e-4, -4.9375003e-4, -3.8125002e-4, -2.6875004e-4, -1.5625001e-4,
    -8.875e-5, -6.625e-5, -4.375e-5, -2.1249998e-5, -7.75e-6, -3.2500002e-6, -5.5000004e-7, 0.0,
    5.5000004e-7, 3.2500002e-6, 7.75e-6, 2.1249998e-5, 4.375e-5, 6.625e-5, 8.875e-5, 1.5625001e-4,
    2.6875004e-4, 3.8125002e-4, 4.9375003e-4, 6.062501e-4, 7.1875006e-4, 8.3125e-4, 9.437501e-4, 1.2812499e-3,
    1.84375e-3, 2.40625e-3, 2.96875e-3, 3.5312497e-3, 4.09375e-3, 4.6562497e-3, 5.2187503e-3, 5.78125e-3,
    6.34375e-3, 6.90625e-3, 7.46875e-3, 8.03125e-3, 8.59375e-3, 9.156249e-3, 9.71875e-3, 1.140625e-2,
    1.421875e-2, 1.703125e-2, 1.9843752e-2, 2.265625e-2, 2.546875e-2, 2.8281251e-2, 3.109375e-2, 3.390625e-2,
    3.6718752e-2, 3.953125e-2, 4.2343747e-2, 4.515625e-2, 4.796875e-2, 5.078125e-2, 5.359375e-2, 5.640625e-2,
    5.9218753e-2, 6.203125e-2, 6.484375e-2, 6.7656256e-2, 7.0468746e-2, 7.328125e-2, 7.609375e-2, 7.890625e-2,
    8.171876e-2, 8.453125e-2, 8.734375e-2, 9.015625e-2, 9.2968754e-2, 9.578126e-2, 9.859375e-2, 1.07031256e-1,
    1.2109375e-1, 1.3515624e-1, 1.4921875e-1, 1.6328125e-1, 1.7734376e-1, 1.9140625e-1, 2.0546874e-1, 2.1953125e-1,
    2.3359375e-1, 2.4765624e-1, 2.6171875e-1, 2.7578127e-1, 2.8984374e-1, 3.0390626e-1, 3.1796873e-1, 3.3203125e-1,
    3.4609374e-1, 3.6015624e-1, 3.7421876e-1, 3.8828123e-1, 4.0234375e-1, 4.1640624e-1, 4.3046874e-1, 4.4453126e-1,
    4.5859373e-1, 4.7265625e-1, 4.867187e-1, 5.0078124e-1, 5.148437e-1, 5.289062e-1, 5.4296875e-1, 5.570313e-1,
    5.710938e-1, 5.8515626e-1, 5.992187e-1, 6.1328125e-1, 6.273438e-1, 6.414063e-1, 6.5546876e-1, 6.695312e-1,
    6.8359375e-1, 6.976563e-1, 7.117188e-1, 7.2578126e-1, 7.398437e-1, 7.5390625e-1, 7.679688e-1, 7.8203124e-1,
    7.9609376e-1, 8.101562e-1, 8.2421875e-1, 8.382813e-1, 8.5234374e-1, 8.6640626e-1, 8.804687e-1, 8.9453125e-1,
    9.085938e-1, 9.2265624e-1, 9.3671876e-1, 9.507812e-1, 9.6484375e-1, 9.789063e-1, 9.9296874e-1, 1.0,
];
