//! Frozen base weights: the provided tile-by-tile matmuls against a plain f32 product, a `FrozenWeight`
//! implemented outside the crate (the way `trainer` plugs in MXFP4 experts), and NF4's memory per parameter.

mod common;

use std::ops::Range;

use common::assert_close;
use half::bf16;
use oxtune_lora::nf4::NF4_CODE;
use oxtune_lora::{check_tile, Bf16Weight, Error, FrozenWeight, Nf4Tensor, Nf4Weight};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    // Irwin-Hall approximation of a normal: enough for test inputs, no extra dependency.
    (0..n).map(|_| (0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0).collect()
}

/// `y = x W^T` and `dx = dy W` in f64 from the decoded weight.
fn dense_ref(w: &[f32], out: usize, n_in: usize, x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let t = x.len() / n_in;
    let mut y = vec![0f32; t * out];
    let mut dx = vec![0f32; t * n_in];
    for i in 0..t {
        for o in 0..out {
            y[i * out + o] =
                (0..n_in).map(|k| f64::from(x[i * n_in + k]) * f64::from(w[o * n_in + k])).sum::<f64>() as f32;
        }
        for k in 0..n_in {
            dx[i * n_in + k] =
                (0..out).map(|o| f64::from(dy[i * out + o]) * f64::from(w[o * n_in + k])).sum::<f64>() as f32;
        }
    }
    (y, dx)
}

fn check_matmuls(name: &str, weight: &dyn FrozenWeight, decoded: &[f32], tokens: usize, rng: &mut ChaCha8Rng) {
    let (out, n_in) = weight.shape();
    let x = randn(rng, tokens * n_in);
    let dy = randn(rng, tokens * out);
    let (y_ref, dx_ref) = dense_ref(decoded, out, n_in, &x, &dy);
    // Accumulation: start from non-zero buffers and subtract them afterwards.
    let y0 = randn(rng, tokens * out);
    let dx0 = randn(rng, tokens * n_in);
    let (mut y, mut dx) = (y0.clone(), dx0.clone());
    weight.matmul_acc(&x, &mut y).unwrap();
    weight.matmul_t_acc(&dy, &mut dx).unwrap();
    let y: Vec<f32> = y.iter().zip(&y0).map(|(a, b)| a - b).collect();
    let dx: Vec<f32> = dx.iter().zip(&dx0).map(|(a, b)| a - b).collect();
    assert_close(&format!("{name}: y = x W^T"), &y, &y_ref, 1e-4, 1e-4);
    assert_close(&format!("{name}: dx = dy W"), &dx, &dx_ref, 1e-4, 1e-4);
}

/// Shapes that are not multiples of the row (64) or column (256) tiles, nor of NF4's 64-element blocks.
const OUT: usize = 150;
const IN: usize = 301;

#[test]
fn bf16_weight_matmuls_match_the_dense_product_with_partial_tiles() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let w: Vec<bf16> = randn(&mut rng, OUT * IN).into_iter().map(bf16::from_f32).collect();
    let decoded: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let weight = Bf16Weight::new(w.clone(), OUT, IN).unwrap();
    check_matmuls("bf16", &weight, &decoded, 7, &mut rng);
    assert_eq!(weight.nbytes(), 2 * OUT * IN);
    // The [in, out] constructor transposes.
    let mut t = vec![bf16::ZERO; w.len()];
    for o in 0..OUT {
        for i in 0..IN {
            t[i * OUT + o] = w[o * IN + i];
        }
    }
    assert_eq!(Bf16Weight::from_in_out(&t, IN, OUT).unwrap().data(), w.as_slice());
}

#[test]
fn nf4_weight_matmuls_match_the_dense_product_of_its_dequantization() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for double in [false, true] {
        let w = randn(&mut rng, OUT * IN);
        let weight = Nf4Weight::quantize(&w, OUT, IN, double).unwrap();
        let decoded = weight.tensor().dequantize();
        check_matmuls(&format!("nf4 double={double}"), &weight, &decoded, 5, &mut rng);
        let mut row = vec![0f32; 3 * IN];
        weight.dequantize_rows(10..13, &mut row).unwrap();
        assert_eq!(row, &decoded[10 * IN..13 * IN]);
        let mut tile = vec![0f32; 2 * 37];
        weight.dequantize_tile(140..142, 250..287, &mut tile).unwrap();
        assert_eq!(&tile[..37], &decoded[140 * IN + 250..140 * IN + 287]);
        assert_eq!(&tile[37..], &decoded[141 * IN + 250..141 * IN + 287]);
    }
    let weight = Nf4Weight::quantize(&randn(&mut rng, OUT * IN), OUT, IN, false).unwrap();
    assert!(matches!(weight.dequantize_rows(149..151, &mut vec![0.0; 2 * IN]), Err(Error::OutOfRange(_))));
    assert!(matches!(weight.matmul_acc(&[0.5; IN + 1], &mut [0.0; OUT]), Err(Error::Shape { .. })));
}

/// NF4 keeps 4 bits per weight plus the absmax: 4.5 bits with f32 absmax per 64, 4 + 8/64 + 32/(64 * 256)
/// = 4.127 bits with double quantization (plus one f32 offset per tensor).
#[test]
fn nf4_memory_per_parameter_is_4_5_bits_or_4_127_with_double_quantization() {
    let n = 64 * 256 * 16;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let w = randn(&mut rng, n);
    let plain = Nf4Tensor::quantize(&w, false).unwrap();
    assert_eq!(plain.nbytes() as f64 * 8.0 / n as f64, 4.5);
    let double = Nf4Tensor::quantize(&w, true).unwrap();
    let bits = double.nbytes() as f64 * 8.0 / n as f64;
    let want = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0);
    assert!((bits - want).abs() * n as f64 <= 32.0, "{bits} bits per parameter, expected {want} + one f32 offset");
    assert!(bits < 4.128);
}

/// A block-scaled 4-bit format defined outside the crate, standing in for the MXFP4 experts that `trainer`
/// wraps: 32 codes per block along `in`, one power-of-two scale per block, stored `[out, in]`.
struct ToyMx {
    codes: Vec<u8>,
    scales: Vec<i8>,
    out: usize,
    n_in: usize,
}

const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

impl ToyMx {
    fn value(&self, r: usize, c: usize) -> f32 {
        let i = r * self.n_in + c;
        E2M1[self.codes[i] as usize] * 2f32.powi(self.scales[i / 32] as i32)
    }
}

#[derive(Debug)]
struct ToyError(String);
impl std::fmt::Display for ToyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ToyError {}

impl FrozenWeight for ToyMx {
    fn shape(&self) -> (usize, usize) {
        (self.out, self.n_in)
    }

    fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) -> oxtune_lora::Result<()> {
        if rows.end > self.out {
            // How an implementation forwards its own error type.
            return Err(Error::Base(Box::new(ToyError(format!("rows {rows:?} of {}", self.out)))));
        }
        check_tile(rows.clone(), 0..self.n_in, self.out, self.n_in, dst.len())?;
        for (r, d) in rows.zip(dst.chunks_exact_mut(self.n_in)) {
            for (c, v) in d.iter_mut().enumerate() {
                *v = self.value(r, c);
            }
        }
        Ok(())
    }

    fn nbytes(&self) -> usize {
        self.codes.len() / 2 + self.scales.len()
    }
}

#[test]
fn a_frozen_weight_implemented_outside_the_crate_plugs_in() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (out, n_in) = (130, 288);
    let toy = ToyMx {
        codes: (0..out * n_in).map(|_| rng.gen_range(0..16)).collect(),
        scales: (0..out * n_in / 32).map(|_| rng.gen_range(-3..3)).collect(),
        out,
        n_in,
    };
    let decoded: Vec<f32> =
        (0..out).flat_map(|r| (0..n_in).map(move |c| (r, c))).map(|(r, c)| toy.value(r, c)).collect();
    // matmul_t_acc goes through the default dequantize_tile, which decodes whole rows.
    check_matmuls("external format", &toy, &decoded, 9, &mut rng);
    let err = toy.dequantize_rows(129..131, &mut vec![0.0; 2 * n_in]).unwrap_err();
    assert!(err.to_string().contains("rows 129..131 of 130"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every NF4 element decodes within half the widest code gap (between -1 and -0.696) times its block
    /// absmax, plus whatever the stored absmax is off by.
    #[test]
    fn nf4_round_trip_error_is_bounded(x in proptest::collection::vec(-100f32..100.0, 1..300), double in any::<bool>()) {
        let half_gap = NF4_CODE.windows(2).map(|w| (w[1] - w[0]) / 2.0).fold(0f32, f32::max);
        let t = Nf4Tensor::quantize(&x, double).unwrap();
        let d = t.dequantize();
        for (b, block) in x.chunks(64).enumerate() {
            let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let am_used = t.block_absmax(b);
            for (j, &v) in block.iter().enumerate() {
                let got = d[b * 64 + j];
                prop_assert!((got - v).abs() <= half_gap * am + (am_used - am).abs() + 1e-6 * am,
                    "element {}: {v} -> {got} (absmax {am}, stored {am_used})", b * 64 + j);
            }
        }
    }

    /// Arbitrary parts never make decoding panic: sizes are checked on construction.
    #[test]
    fn nf4_from_parts_checks_sizes(numel in 0usize..500, packed in 0usize..300, blocks in 0usize..10) {
        let r = Nf4Tensor::from_parts(numel, vec![0x77; packed], oxtune_lora::Nf4Absmax::F32(vec![1.0; blocks]));
        prop_assert_eq!(r.is_ok(), packed == numel.div_ceil(2) && blocks == numel.div_ceil(64));
        if let Ok(t) = r {
            prop_assert!(t.dequantize().iter().all(|v| *v == 0.0));
        }
    }
}
