//! MXFP4: the block-scaled 4-bit float format of the gpt-oss expert weights.
//!
//! A block is 32 consecutive elements along the contraction (input) dimension of one output row,
//! stored as 16 bytes of FP4 E2M1 codes plus one E8M0 scale byte (4.25 bits per weight):
//!
//! - byte `b` of a block holds element `2b` in its low nibble and element `2b + 1` in its high nibble;
//! - a nibble indexes [`FP4_VALUES`] (bit 3 sign, bits 2..1 exponent with bias 1, bit 0 mantissa);
//! - the scale byte `s` is worth `2^(s - 127)`, with no special case for 255 (as the reference
//!   dequantizers in transformers and gpt-oss compute `ldexp(lut, s - 127)`).
//!
//! A checkpoint stores `X_blocks [.., R, G, 16]` and `X_scales [.., R, G]`; the logical tensor is
//! `[.., R, G * 32]`. [`Mxfp4Tensor`] holds the two byte buffers (owned or borrowed, e.g. from a
//! memory map) and decodes any row range or tile without touching the rest.
//!
//! Quantization ([`quantize_f32`]) follows current triton `downcast_to_mxfp` (what transformers calls):
//! the scale is `amax / 6` rounded *up* to a power of two (so no element clips), and each scaled
//! element is rounded to the nearest E2M1 value with ties to even, saturating at ±6. Older
//! triton_kernels rounded ties away from zero; we follow the current kernel, and non-finite input is
//! rejected rather than encoded as garbage.

use half::bf16;
use rayon::prelude::*;

/// Elements per block.
pub const BLOCK: usize = 32;
/// Bytes of packed codes per block.
pub const BLOCK_BYTES: usize = BLOCK / 2;
/// Largest E2M1 magnitude.
pub const FP4_MAX: f32 = 6.0;

/// FP4 E2M1 value of each 4-bit code.
pub const FP4_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("MXFP4 shape mismatch: {0}")]
    Shape(String),
    #[error("cannot quantize to MXFP4: element {index} is {value} (only finite values can be encoded)")]
    NonFinite { index: usize, value: f32 },
    #[error("MXFP4 range out of bounds: {0}")]
    OutOfBounds(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `2^(s - 127)` as f32 (exact; `s = 0` is the subnormal 2^-127).
#[inline]
pub fn e8m0_to_f32(s: u8) -> f32 {
    if s == 0 {
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits((s as u32) << 23)
    }
}

/// Decodes one block of 16 packed bytes and its scale into 32 floats.
#[inline]
pub fn decode_block(codes: &[u8], scale: u8, out: &mut [f32]) {
    debug_assert_eq!(codes.len(), BLOCK_BYTES);
    debug_assert_eq!(out.len(), BLOCK);
    let s = e8m0_to_f32(scale);
    for (pair, &byte) in out.chunks_exact_mut(2).zip(codes) {
        pair[0] = FP4_VALUES[(byte & 0x0F) as usize] * s;
        pair[1] = FP4_VALUES[(byte >> 4) as usize] * s;
    }
}

/// Rounds an already-scaled finite value to the nearest E2M1 code, ties to even, saturating at ±6.
#[inline]
pub fn encode_e2m1(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 8u8 } else { 0 };
    let a = x.abs();
    // Midpoints between consecutive magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; at a midpoint the even
    // code wins, so the comparison is `<=` where the lower code is even and `<` where it is odd.
    let code = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | code
}

/// The E8M0 scale byte for a block whose largest magnitude is `amax` (triton ROUND_UP mode):
/// the biased exponent of `amax / 6` rounded up to a power of two; 0 for an all-zero block.
#[inline]
pub fn scale_for_amax(amax: f32) -> u8 {
    let d = amax / FP4_MAX;
    let bits = (d.to_bits().wrapping_add(0x007F_FFFF)) & 0x7F80_0000;
    (bits >> 23) as u8
}

/// Quantizes one block of up to 32 finite values (a short block is zero-padded).
pub fn encode_block(x: &[f32], codes: &mut [u8]) -> u8 {
    debug_assert!(x.len() <= BLOCK);
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = scale_for_amax(amax);
    let inv = if scale == 0 { 0.0 } else { 1.0 / e8m0_to_f32(scale) };
    codes.fill(0);
    for (i, &v) in x.iter().enumerate() {
        let c = encode_e2m1(v * inv);
        codes[i / 2] |= if i % 2 == 0 { c } else { c << 4 };
    }
    scale
}

/// A tensor `[.., rows, cols]` in MXFP4, quantized along `cols` (`cols % 32 == 0`).
///
/// `B` is the byte storage: `Vec<u8>` when owned, `&[u8]` when borrowed from a memory map.
#[derive(Clone, Debug)]
pub struct Mxfp4Tensor<B = Vec<u8>> {
    blocks: B,
    scales: B,
    shape: Vec<usize>,
}

impl<B: AsRef<[u8]>> Mxfp4Tensor<B> {
    /// Wraps packed codes (`numel / 2` bytes) and scales (`numel / 32` bytes) of a logical `shape`.
    pub fn new(blocks: B, scales: B, shape: &[usize]) -> Result<Self> {
        let Some(&cols) = shape.last() else {
            return Err(Error::Shape("an MXFP4 tensor needs at least one dimension".into()));
        };
        if cols == 0 || cols % BLOCK != 0 {
            return Err(Error::Shape(format!(
                "the last (contraction) dimension must be a positive multiple of {BLOCK}, got shape {shape:?}"
            )));
        }
        let numel: usize = shape.iter().product();
        let (nb, ns) = (blocks.as_ref().len(), scales.as_ref().len());
        if nb != numel / 2 || ns != numel / BLOCK {
            return Err(Error::Shape(format!(
                "shape {shape:?} needs {} block bytes and {} scale bytes, got {nb} and {ns}",
                numel / 2,
                numel / BLOCK
            )));
        }
        Ok(Self { blocks, scales, shape: shape.to_vec() })
    }

    /// Wraps checkpoint tensors `X_blocks [.., R, G, 16]` and `X_scales [.., R, G]`.
    pub fn from_checkpoint(blocks: B, blocks_shape: &[usize], scales: B, scales_shape: &[usize]) -> Result<Self> {
        let n = blocks_shape.len();
        if n < 2 || blocks_shape[n - 1] != BLOCK_BYTES || scales_shape != &blocks_shape[..n - 1] {
            return Err(Error::Shape(format!(
                "expected blocks [.., R, G, 16] and scales [.., R, G], got blocks {blocks_shape:?} and scales {scales_shape:?}"
            )));
        }
        let mut shape = scales_shape.to_vec();
        *shape.last_mut().expect("n >= 2") *= BLOCK;
        Self::new(blocks, scales, &shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The contraction dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().expect("validated in new")
    }

    /// Rows across all leading dimensions.
    pub fn rows(&self) -> usize {
        self.numel() / self.cols()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn blocks(&self) -> &[u8] {
        self.blocks.as_ref()
    }

    pub fn scales(&self) -> &[u8] {
        self.scales.as_ref()
    }

    /// Bytes held (codes + scales).
    pub fn nbytes(&self) -> usize {
        self.blocks().len() + self.scales().len()
    }

    /// Borrowed view of the sub-tensor at `index` along the first dimension (e.g. one expert).
    pub fn index(&self, index: usize) -> Result<Mxfp4Tensor<&[u8]>> {
        if self.shape.len() < 2 || index >= self.shape[0] {
            return Err(Error::OutOfBounds(format!("index {index} into shape {:?}", self.shape)));
        }
        let sub: usize = self.shape[1..].iter().product();
        let (b, s) = (sub / 2, sub / BLOCK);
        Mxfp4Tensor::new(
            &self.blocks()[index * b..(index + 1) * b],
            &self.scales()[index * s..(index + 1) * s],
            &self.shape[1..],
        )
    }

    /// Decodes rows `[row0, row0 + n)` (flattened over leading dims) into `out [n, cols]`.
    pub fn dequantize_rows_f32(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols();
        if !out.len().is_multiple_of(cols) || row0 + out.len() / cols > self.rows() {
            return Err(Error::OutOfBounds(format!(
                "rows {row0}..{} of {} (cols {cols})",
                row0 + out.len() / cols,
                self.rows()
            )));
        }
        let g0 = row0 * cols / BLOCK;
        for (i, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let g = g0 + i;
            decode_block(&self.blocks()[g * BLOCK_BYTES..(g + 1) * BLOCK_BYTES], self.scales()[g], chunk);
        }
        Ok(())
    }

    /// Decodes the tile `rows × [col0, col0 + width)` into `out [rows.len(), width]`.
    /// Only the blocks that overlap the tile are read.
    pub fn dequantize_tile_f32(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        let n = self.cols();
        if rows.end > self.rows() || cols.end > n || rows.start > rows.end || cols.start > cols.end {
            return Err(Error::OutOfBounds(format!("tile {rows:?} x {cols:?} of [{}, {n}]", self.rows())));
        }
        let width = cols.len();
        if out.len() != rows.len() * width {
            return Err(Error::Shape(format!("tile needs {} outputs, got {}", rows.len() * width, out.len())));
        }
        let mut buf = [0.0f32; BLOCK];
        let (gb, ge) = (cols.start / BLOCK, cols.end.div_ceil(BLOCK));
        for (r, dst) in rows.clone().zip(out.chunks_exact_mut(width.max(1))) {
            for g in gb..ge {
                let gi = r * (n / BLOCK) + g;
                decode_block(&self.blocks()[gi * BLOCK_BYTES..(gi + 1) * BLOCK_BYTES], self.scales()[gi], &mut buf);
                let lo = (g * BLOCK).max(cols.start);
                let hi = ((g + 1) * BLOCK).min(cols.end);
                dst[lo - cols.start..hi - cols.start].copy_from_slice(&buf[lo - g * BLOCK..hi - g * BLOCK]);
            }
        }
        Ok(())
    }

    /// Decodes the whole tensor to f32 (row-major, logical shape), in parallel.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel()];
        let (blocks, scales) = (self.blocks(), self.scales());
        out.par_chunks_mut(BLOCK * 1024).enumerate().for_each(|(c, chunk)| {
            for (i, dst) in chunk.chunks_exact_mut(BLOCK).enumerate() {
                let g = c * 1024 + i;
                decode_block(&blocks[g * BLOCK_BYTES..(g + 1) * BLOCK_BYTES], scales[g], dst);
            }
        });
        out
    }

    /// Decodes the whole tensor to bf16. Exact unless a scale pushes a value out of bf16 range,
    /// because every E2M1 value has at most two significant bits.
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize_f32().into_par_iter().map(bf16::from_f32).collect()
    }

    /// An owned copy.
    pub fn to_owned(&self) -> Mxfp4Tensor<Vec<u8>> {
        Mxfp4Tensor { blocks: self.blocks().to_vec(), scales: self.scales().to_vec(), shape: self.shape.clone() }
    }

    /// The checkpoint shapes `(blocks [.., R, G, 16], scales [.., R, G])`.
    pub fn checkpoint_shapes(&self) -> (Vec<usize>, Vec<usize>) {
        let mut scales = self.shape.clone();
        *scales.last_mut().expect("validated") /= BLOCK;
        let mut blocks = scales.clone();
        blocks.push(BLOCK_BYTES);
        (blocks, scales)
    }
}

impl Mxfp4Tensor<Vec<u8>> {
    /// Splits into `(blocks, scales)` byte buffers.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>, Vec<usize>) {
        (self.blocks, self.scales, self.shape)
    }
}

/// Quantizes `x` of logical `shape` (`[.., rows, cols]`, `cols % 32 == 0`) along its last dimension.
pub fn quantize_f32(x: &[f32], shape: &[usize]) -> Result<Mxfp4Tensor> {
    let numel: usize = shape.iter().product();
    if x.len() != numel {
        return Err(Error::Shape(format!("{} values for shape {shape:?}", x.len())));
    }
    if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite { index, value });
    }
    let mut blocks = vec![0u8; numel / 2];
    let mut scales = vec![0u8; numel / BLOCK];
    // Validate the shape before doing work.
    Mxfp4Tensor::new(&blocks[..], &scales[..], shape)?;
    blocks
        .par_chunks_mut(BLOCK_BYTES)
        .zip(scales.par_iter_mut())
        .zip(x.par_chunks(BLOCK))
        .for_each(|((codes, scale), src)| *scale = encode_block(src, codes));
    Mxfp4Tensor::new(blocks, scales, shape)
}

/// Quantizes bf16 values (see [`quantize_f32`]; bf16 widens to f32 exactly).
pub fn quantize_bf16(x: &[bf16], shape: &[usize]) -> Result<Mxfp4Tensor> {
    let wide: Vec<f32> = x.par_iter().map(|v| v.to_f32()).collect();
    quantize_f32(&wide, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn table_matches_e2m1_bit_layout() {
        // Independent decode from the bit fields: sign, 2-bit exponent (bias 1), 1-bit mantissa.
        for code in 0u8..16 {
            let (s, e, m) = ((code >> 3) & 1, (code >> 1) & 3, code & 1);
            let mag = if e == 0 { 0.5 * m as f32 } else { (1.0 + 0.5 * m as f32) * 2f32.powi(e as i32 - 1) };
            let v = if s == 1 { -mag } else { mag };
            assert_eq!(FP4_VALUES[code as usize].to_bits(), v.to_bits(), "code {code}");
        }
    }

    #[test]
    fn scale_byte_is_power_of_two() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(1), 2f32.powi(-126));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
    }

    #[test]
    fn nibble_order_low_is_even_element() {
        // 0x71: low nibble 1 (+0.5) is element 0, high nibble 7 (+6) is element 1.
        let mut codes = [0u8; 16];
        codes[0] = 0x71;
        codes[15] = 0xF2;
        let mut out = [0.0; 32];
        decode_block(&codes, 128, &mut out);
        assert_eq!(&out[..2], &[1.0, 12.0]);
        assert_eq!(&out[30..], &[2.0, -12.0]);
    }

    #[test]
    fn rounding_ties_to_even_and_saturates() {
        let cases = [
            (0.25, 0.0),
            (0.2500001, 0.5),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.0001, 6.0),
            (6.5, 6.0),
            (1e30, 6.0),
            (-0.75, -1.0),
            (-5.0, -4.0),
            (-1e30, -6.0),
            (0.7, 0.5),
            (2.9, 3.0),
        ];
        for (x, want) in cases {
            assert_eq!(FP4_VALUES[encode_e2m1(x) as usize], want, "x = {x}");
        }
    }

    /// triton's `downcast_to_mxfp_torch` conversion, re-expressed on the f32 bit pattern (sign,
    /// exponent, mantissa; guard and sticky bits; round to nearest even; saturate at code 7).
    fn triton_bits_e2m1(x: f32) -> u8 {
        let q = x.to_bits();
        let sign = ((q >> 28) & 0x8) as u8;
        let exp = (q >> 23) & 0xFF;
        let man = q & 0x7F_FFFF;
        let (mut mant, mut sticky) = (man, false);
        if exp < 127 {
            let shift = 127 - exp - 1;
            let pre = 0x40_0000 | (man >> 1);
            let mask = if shift >= 31 { u32::MAX >> 1 } else { (1u32 << shift) - 1 };
            sticky = (man & 1) != 0 || (pre & mask) != 0;
            mant = if shift >= 32 { 0 } else { pre >> shift };
        }
        let e = exp.max(126) - 126;
        let m2 = (mant >> 21) & 3;
        let (lsb, guard) = ((m2 >> 1) & 1, m2 & 1);
        sticky |= (mant & ((1 << 21) - 1)) != 0;
        let inc = guard & (sticky as u32 | lsb);
        let v = ((((e << 2) | m2) + inc) >> 1).min(7);
        sign | v as u8
    }

    #[test]
    fn rounding_equals_tritons_bit_algorithm() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut xs: Vec<f32> = (0..200_000).map(|_| rng.gen_range(-7.0f32..7.0)).collect();
        // Every tie and neighbour of a tie, both signs, and tiny values.
        for m in [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] {
            for v in [m, f32::from_bits(m.to_bits() + 1), f32::from_bits(m.to_bits() - 1)] {
                xs.extend([v, -v]);
            }
        }
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 1e-45, 100.0, -100.0]);
        for x in xs {
            assert_eq!(encode_e2m1(x), triton_bits_e2m1(x), "x = {x:e}");
        }
    }

    #[test]
    fn scale_rounds_up_so_nothing_clips() {
        // amax 6 -> d = 1 exactly -> scale 2^0; amax 6.01 -> d > 1 -> 2^1.
        assert_eq!(scale_for_amax(6.0), 127);
        assert_eq!(scale_for_amax(6.01), 128);
        assert_eq!(scale_for_amax(3.0), 126);
        assert_eq!(scale_for_amax(0.0), 0);
    }

    #[test]
    fn partial_block_is_zero_padded() {
        let x = [1.0f32, -2.0, 3.0];
        let mut codes = [0xAAu8; 16];
        let s = encode_block(&x, &mut codes);
        let mut out = [9.0; 32];
        decode_block(&codes, s, &mut out);
        assert_eq!(&out[..3], &x);
        assert!(out[3..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn rejects_bad_shapes_and_non_finite() {
        assert!(matches!(Mxfp4Tensor::new(vec![0u8; 8], vec![0u8; 1], &[16]), Err(Error::Shape(_))));
        assert!(matches!(Mxfp4Tensor::new(vec![0u8; 15], vec![0u8; 1], &[32]), Err(Error::Shape(_))));
        assert!(matches!(
            Mxfp4Tensor::from_checkpoint(vec![0u8; 32], &[2, 16], vec![0u8; 1], &[1]),
            Err(Error::Shape(_))
        ));
        let mut x = vec![1.0f32; 64];
        x[40] = f32::NAN;
        assert!(matches!(quantize_f32(&x, &[2, 32]), Err(Error::NonFinite { index: 40, .. })));
    }

    fn random_tensor(rng: &mut impl Rng, shape: &[usize]) -> Mxfp4Tensor {
        let numel: usize = shape.iter().product();
        let blocks = (0..numel / 2).map(|_| rng.gen()).collect();
        let scales = (0..numel / BLOCK).map(|_| rng.gen_range(110..140)).collect();
        Mxfp4Tensor::new(blocks, scales, shape).unwrap()
    }

    #[test]
    fn rows_tiles_and_experts_agree_with_full_dequantization() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let t = random_tensor(&mut rng, &[3, 10, 96]);
        let full = t.dequantize_f32();
        let mut rows = vec![0.0; 4 * 96];
        t.dequantize_rows_f32(13, &mut rows).unwrap();
        assert_eq!(rows, full[13 * 96..17 * 96]);
        let mut tile = vec![0.0; 5 * 41];
        t.dequantize_tile_f32(7..12, 20..61, &mut tile).unwrap();
        for r in 0..5 {
            assert_eq!(tile[r * 41..(r + 1) * 41], full[(7 + r) * 96 + 20..(7 + r) * 96 + 61]);
        }
        let e2 = t.index(2).unwrap();
        assert_eq!(e2.shape(), &[10, 96]);
        assert_eq!(e2.dequantize_f32(), full[2 * 960..]);
        let bf = t.dequantize_bf16();
        assert!(bf.iter().zip(&full).all(|(b, f)| b.to_f32() == *f));
        assert!(t.dequantize_rows_f32(28, &mut rows).is_err());
        assert!(t.dequantize_tile_f32(0..31, 0..8, &mut tile).is_err());
        assert!(t.index(3).is_err());
    }

    #[test]
    fn checkpoint_shapes_round_trip() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let t = random_tensor(&mut rng, &[2, 6, 64]);
        let (bs, ss) = t.checkpoint_shapes();
        assert_eq!((bs.as_slice(), ss.as_slice()), (&[2, 6, 2, 16][..], &[2, 6, 2][..]));
        let u = Mxfp4Tensor::from_checkpoint(t.blocks(), &bs, t.scales(), &ss).unwrap();
        assert_eq!(u.shape(), t.shape());
    }

    proptest! {
        #[test]
        fn every_code_round_trips(codes in proptest::collection::vec(any::<u8>(), 16), scale in 1u8..=250) {
            // Decoding then re-encoding any block gives back the same values (codes may differ only
            // for -0 vs +0, which decode to equal values) whenever the block's scale is the one the
            // quantizer would choose, i.e. when some element has magnitude 6 (code 7 or 15).
            let mut codes = codes;
            codes[0] = (codes[0] & 0xF0) | 0x07;
            let mut vals = [0.0f32; 32];
            decode_block(&codes, scale, &mut vals);
            let mut back = [0u8; 16];
            let s = encode_block(&vals, &mut back);
            prop_assert_eq!(s, scale);
            let mut again = [0.0f32; 32];
            decode_block(&back, s, &mut again);
            prop_assert_eq!(vals, again);
        }

        #[test]
        fn quantization_error_within_block_bound(x in proptest::collection::vec(-1e4f32..1e4, 64)) {
            let t = quantize_f32(&x, &[2, 32]).unwrap();
            let y = t.dequantize_f32();
            for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let scale = e8m0_to_f32(t.scales()[b]);
                let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Scale never clips: amax / scale <= 6.
                prop_assert!(amax <= 6.0 * scale * (1.0 + 1e-6));
                for (a, q) in xs.iter().zip(ys) {
                    // Half of the widest E2M1 gap (2, between 4 and 6) times the scale.
                    prop_assert!((a - q).abs() <= scale, "{} -> {} (scale {})", a, q, scale);
                    let rel_step = if a.abs() / scale >= 4.0 { 1.0 } else if a.abs() / scale >= 2.0 { 0.5 } else { 0.25 };
                    prop_assert!((a - q).abs() <= rel_step * scale * (1.0 + 1e-6));
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(blocks in proptest::collection::vec(any::<u8>(), 0..200),
                                       scales in proptest::collection::vec(any::<u8>(), 0..10),
                                       shape in proptest::collection::vec(0usize..70, 0..4),
                                       row0 in 0usize..10, n in 0usize..5) {
            if let Ok(t) = Mxfp4Tensor::new(&blocks[..], &scales[..], &shape) {
                let v = t.dequantize_f32();
                prop_assert_eq!(v.len(), t.numel());
                let mut out = vec![0.0; n * t.cols()];
                let _ = t.dequantize_rows_f32(row0, &mut out);
                let _ = t.index(row0);
            }
        }
    }
}
