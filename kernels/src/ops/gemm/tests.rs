use rand::{Rng, SeedableRng};

use super::*;
use crate::testing::{assert_close, randn};

fn offsets_of(sizes: &[usize]) -> Vec<u32> {
    let mut o = vec![0u32];
    for &s in sizes {
        o.push(o[o.len() - 1] + s as u32);
    }
    o
}

fn max_len(offsets: &[u32]) -> usize {
    offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
}

/// LoRA on MoE experts: E experts, rank r, x [S, in], A [r·E, in] (expert e: rows e·r..e·r+r),
/// B [out, r·E] (expert e: columns j·E + e), tokens sorted by expert (`offsets`), LoRA scale s.
#[derive(Clone, Copy)]
struct Lora {
    e: usize,
    r: usize,
    inp: usize,
    out: usize,
    s: f32,
}

const USES: [&str; 6] = [
    "(1) u = x A_eᵀ",
    "(2) y += s u B_eᵀ",
    "(3) du = s dy B_e",
    "(4) dx += du A_e",
    "(5) dA_e += du_eᵀ x_e",
    "(6) dB_e += s dy_eᵀ u_e",
];

impl Lora {
    /// The GroupedGemm of use `u` (0..6, as numbered in USES) and the lengths of its a, b, c.
    fn use_cfg(&self, u: usize, offsets: &[u32]) -> (GroupedGemm, [usize; 3]) {
        let Lora { e, r, inp, out, s } = *self;
        let (tokens, re) = (offsets[e] as usize, r * e);
        let rm = Strides::row_major;
        let base = GroupedGemm {
            groups: e,
            grouped: Grouped::M,
            m: max_len(offsets),
            n: 0,
            k: 0,
            alpha: 1.0,
            beta: 0.0,
            a: rm(0),
            b: rm(0),
            c: rm(0),
        };
        let a_e = Strides { row: 1, col: inp, group: r * inp }; // A_eᵀ as B (k = in, n = r)
        match u {
            0 => (
                GroupedGemm { n: r, k: inp, a: rm(inp), b: a_e, c: rm(r), ..base },
                [tokens * inp, re * inp, tokens * r],
            ),
            1 => (
                GroupedGemm {
                    n: out,
                    k: r,
                    alpha: s,
                    beta: 1.0,
                    a: rm(r),
                    b: Strides { row: e, col: re, group: 1 },
                    c: rm(out),
                    ..base
                },
                [tokens * r, out * re, tokens * out],
            ),
            2 => (
                GroupedGemm {
                    n: r,
                    k: out,
                    alpha: s,
                    a: rm(out),
                    b: Strides { row: re, col: e, group: 1 },
                    c: rm(r),
                    ..base
                },
                [tokens * out, out * re, tokens * r],
            ),
            3 => (
                GroupedGemm {
                    n: inp,
                    k: r,
                    beta: 1.0,
                    a: rm(r),
                    b: Strides { row: inp, col: 1, group: r * inp },
                    c: rm(inp),
                    ..base
                },
                [tokens * r, re * inp, tokens * inp],
            ),
            4 => (
                GroupedGemm {
                    grouped: Grouped::K,
                    m: r,
                    n: inp,
                    beta: 1.0,
                    a: Strides { row: 1, col: r, group: 0 },
                    b: rm(inp),
                    c: Strides { row: inp, col: 1, group: r * inp },
                    ..base
                },
                [tokens * r, tokens * inp, re * inp],
            ),
            _ => (
                GroupedGemm {
                    grouped: Grouped::K,
                    m: out,
                    n: r,
                    alpha: s,
                    beta: 1.0,
                    a: Strides { row: 1, col: out, group: 0 },
                    b: rm(r),
                    c: Strides { row: re, col: e, group: 1 },
                    ..base
                },
                [tokens * out, tokens * r, out * re],
            ),
        }
    }

    /// Use `u` written straight from the LoRA formulas, token by token, in f64.
    fn direct(&self, u: usize, offsets: &[u32], a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f32> {
        let Lora { e, r, inp, out, s } = *self;
        let (tokens, re, s) = (offsets[e] as usize, r * e, s as f64);
        let overwrite = matches!(u, 0 | 2);
        let mut acc: Vec<f64> = c0.iter().map(|&v| if overwrite { 0.0 } else { v as f64 }).collect();
        let (a, b): (Vec<f64>, Vec<f64>) =
            (a.iter().map(|&v| v as f64).collect(), b.iter().map(|&v| v as f64).collect());
        for t in 0..tokens {
            let g = offsets.partition_point(|&o| o as usize <= t) - 1;
            match u {
                0 => (0..r)
                    .for_each(|j| acc[t * r + j] = (0..inp).map(|i| a[t * inp + i] * b[(g * r + j) * inp + i]).sum()),
                1 => (0..out).for_each(|o| {
                    acc[t * out + o] += s * (0..r).map(|j| a[t * r + j] * b[o * re + j * e + g]).sum::<f64>()
                }),
                2 => (0..r).for_each(|j| {
                    acc[t * r + j] = s * (0..out).map(|o| a[t * out + o] * b[o * re + j * e + g]).sum::<f64>()
                }),
                3 => (0..inp).for_each(|i| {
                    acc[t * inp + i] += (0..r).map(|j| a[t * r + j] * b[(g * r + j) * inp + i]).sum::<f64>()
                }),
                4 => {
                    for j in 0..r {
                        for i in 0..inp {
                            acc[(g * r + j) * inp + i] += a[t * r + j] * b[t * inp + i];
                        }
                    }
                }
                _ => {
                    for o in 0..out {
                        for j in 0..r {
                            acc[o * re + j * e + g] += s * a[t * out + o] * b[t * r + j];
                        }
                    }
                }
            }
        }
        acc.into_iter().map(|v| v as f32).collect()
    }
}

fn random_mxfp4(
    seed: u64,
    experts: usize,
    rows: usize,
    cols: usize,
    scales: std::ops::RangeInclusive<u8>,
) -> (Vec<u8>, Vec<u8>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let nblk = experts * rows * cols / 32;
    let blocks = (0..nblk * 16).map(|_| rng.gen::<u8>()).collect();
    let sc = (0..nblk).map(|_| rng.gen_range(scales.clone())).collect();
    (blocks, sc)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Absolute tolerance of an f32 GEMM against the f64 reference: the kernel accumulates K
/// products (|A| ≤ amax, |B| ≤ bmax) one FMA at a time; the rounding errors (≤ 2^-24 of a partial
/// sum of size ~√K·amax·bmax/3) add up like a random walk to ~K·2^-24·amax·bmax/4 ≈ 1.5e-8·K·amax·bmax,
/// below 1e-5·√K·amax·bmax for every K up to ~4e5 (the rtol term covers the β·C part).
fn atol(k: usize, amax: f32, bmax: f32) -> f32 {
    1e-5 * (k.max(1) as f32).sqrt() * amax * bmax + 1e-6
}

#[test]
fn reference_matches_the_lora_definitions() {
    for (seed, lora, sizes) in [
        (1u64, Lora { e: 4, r: 3, inp: 7, out: 5, s: 0.5 }, vec![3usize, 0, 6, 1]),
        (2, Lora { e: 3, r: 1, inp: 4, out: 6, s: 2.0 }, vec![0, 2, 5]),
        (3, Lora { e: 1, r: 2, inp: 5, out: 3, s: 1.5 }, vec![4]),
    ] {
        let offsets = offsets_of(&sizes);
        for u in 0..6 {
            let (cfg, [la, lb, lc]) = lora.use_cfg(u, &offsets);
            let s = seed * 100 + u as u64 * 10;
            let (a, b, c0) = (randn(s + 1, la, 1.0), randn(s + 2, lb, 1.0), randn(s + 3, lc, 1.0));
            let mut c = c0.clone();
            grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut c);
            let want = lora.direct(u, &offsets, &a, &b, &c0);
            assert_close(&format!("{} sizes {sizes:?}", USES[u]), &c, &want, 1e-6, 1e-6);
        }
    }
}

#[test]
fn reference_grouped_k_expert_with_zero_tokens_scales_c_by_beta() {
    let offsets = offsets_of(&[2, 0, 3]);
    let cfg = GroupedGemm {
        groups: 3,
        grouped: Grouped::K,
        m: 2,
        n: 3,
        k: 0,
        alpha: 1.0,
        beta: 0.5,
        a: Strides { row: 1, col: 2, group: 0 },
        b: Strides::row_major(3),
        c: Strides { row: 3, col: 1, group: 6 },
    };
    let (a, b, c0) = (randn(1, 10, 1.0), randn(2, 15, 1.0), randn(3, 18, 1.0));
    let mut c = c0.clone();
    grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut c);
    for i in 6..12 {
        assert_eq!(c[i], 0.5 * c0[i], "the empty group's C is scaled by beta");
    }
    for i in (0..6).chain(12..18) {
        assert_ne!(c[i], 0.5 * c0[i], "the other groups add their product");
    }
}

#[test]
fn reference_beta_zero_overwrites_nan() {
    let offsets = offsets_of(&[2, 3]);
    let cfg = GroupedGemm {
        groups: 2,
        grouped: Grouped::M,
        m: 3,
        n: 4,
        k: 5,
        alpha: 1.0,
        beta: 0.0,
        a: Strides::row_major(5),
        b: Strides { row: 4, col: 1, group: 20 },
        c: Strides::row_major(4),
    };
    let (a, b) = (randn(1, 25, 1.0), randn(2, 40, 1.0));
    let mut c = vec![f32::NAN; 20];
    grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut c);
    assert!(c.iter().all(|v| v.is_finite()), "{c:?}");
}

#[test]
fn fp4_and_e8m0_decoding_match_oxtune_mxfp4() {
    for code in 0..16u8 {
        let (got, want) = (e2m1(code), oxtune_mxfp4::FP4_VALUES[code as usize]);
        assert_eq!(got.to_bits(), want.to_bits(), "code {code}: {got} vs {want}");
    }
    for s in 0..=255u8 {
        assert_eq!(e8m0(s).to_bits(), oxtune_mxfp4::e8m0_to_f32(s).to_bits(), "scale {s}");
    }
}

#[test]
fn mxfp4_dequantization_matches_oxtune_mxfp4() {
    let (e, rows, cols) = (3, 5, 64);
    let (blocks, scales) = random_mxfp4(7, e, rows, cols, 0..=255);
    let got = dequantize(&Mxfp4HostWeight { blocks: &blocks, scales: &scales, experts: e, rows, cols });
    let want =
        oxtune_mxfp4::Mxfp4Tensor::new(blocks.clone(), scales.clone(), &[e, rows, cols]).unwrap().dequantize_f32();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "element {i}: {g} vs {w}");
    }
}

#[test]
fn mxfp4_reference_matches_a_direct_product_with_oxtune_mxfp4_weights() {
    let (e, rows, cols) = (3, 6, 64);
    let (blocks, scales) = random_mxfp4(8, e, rows, cols, 120..=130);
    let w = Mxfp4HostWeight { blocks: &blocks, scales: &scales, experts: e, rows, cols };
    let dense =
        oxtune_mxfp4::Mxfp4Tensor::new(blocks.clone(), scales.clone(), &[e, rows, cols]).unwrap().dequantize_f32();
    let offsets = offsets_of(&[2, 0, 3]);
    let tokens = 5;
    for transposed in [false, true] {
        let (k, n) = if transposed { (rows, cols) } else { (cols, rows) };
        let cfg = GroupedGemm {
            groups: e,
            grouped: Grouped::M,
            m: 3,
            n,
            k,
            alpha: 0.5,
            beta: 1.0,
            a: Strides::row_major(k),
            b: Strides::row_major(0),
            c: Strides::row_major(n),
        };
        let (x, c0) = (randn(9, tokens * k, 1.0), randn(10, tokens * n, 1.0));
        let mut c = c0.clone();
        grouped_gemm_mxfp4w_ref(&cfg, &offsets, &x, &w, transposed, &mut c);
        let mut want = c0.clone();
        for t in 0..tokens {
            let g = offsets.partition_point(|&o| o as usize <= t) - 1;
            for j in 0..n {
                let wv = |kk: usize| {
                    let (r, col) = if transposed { (kk, j) } else { (j, kk) };
                    dense[(g * rows + r) * cols + col] as f64
                };
                let dot: f64 = (0..k).map(|kk| x[t * k + kk] as f64 * wv(kk)).sum();
                want[t * n + j] = (0.5 * dot + c0[t * n + j] as f64) as f32;
            }
        }
        assert_close(&format!("transposed {transposed}"), &c, &want, 1e-5, 1e-6);
    }
}

#[test]
fn short_buffers_and_bad_configs_are_shape_errors() {
    let cfg = GroupedGemm {
        groups: 2,
        grouped: Grouped::M,
        m: 4,
        n: 3,
        k: 5,
        alpha: 1.0,
        beta: 0.0,
        a: Strides::row_major(5),
        b: Strides { row: 3, col: 1, group: 15 },
        c: Strides::row_major(3),
    };
    let op = "t";
    assert!(check_shapes(op, &cfg, 3, 6, 30, Some(30), 18).is_ok());
    let err = |r: Result<()>| r.expect_err("an error").to_string();
    assert_eq!(err(check_shapes(op, &cfg, 3, 6, 29, Some(30), 18)), "t: a has 29 elements, expected at least 30");
    assert_eq!(err(check_shapes(op, &cfg, 3, 6, 30, Some(29), 18)), "t: b has 29 elements, expected at least 30");
    assert_eq!(err(check_shapes(op, &cfg, 3, 6, 30, Some(30), 17)), "t: c has 17 elements, expected at least 18");
    assert_eq!(err(check_shapes(op, &cfg, 2, 6, 30, Some(30), 18)), "t: offsets has 2 elements, expected 3");
    // Grouped::K: C is written even with no rows (beta · C), A and B then are not read.
    let k =
        GroupedGemm { grouped: Grouped::K, a: Strides { row: 1, col: 4, group: 0 }, c: Strides::row_major(3), ..cfg };
    assert!(check_shapes(op, &k, 3, 0, 0, Some(0), 12).is_ok());
    assert!(check_shapes(op, &k, 3, 0, 0, Some(0), 11).is_err());
    // The row tiles of all groups are numbered in 32 bits: groups · m must fit (C's group stride 0
    // lets every group write the same rows, so the buffers alone would not catch it).
    let many = GroupedGemm { groups: 1 << 16, m: 1 << 16, c: Strides { row: 3, col: 1, group: 0 }, ..k };
    assert_eq!(
        err(check_shapes(op, &many, (1 << 16) + 1, 0, 0, Some(0), 3 << 16)),
        format!("t: groups · m = {} exceeds {}", 1u64 << 32, i32::MAX)
    );

    let mx = GroupedGemm { n: 6, k: 64, ..cfg };
    assert!(check_mxfp4(op, &mx, 2, 6, 64, 2 * 6 * 2 * 16, 2 * 6 * 2, false).is_ok());
    assert!(
        check_mxfp4(op, &mx, 2, 6, 64, 2 * 6 * 2 * 16, 2 * 6 * 2, true).is_err(),
        "(k, n) must follow the orientation"
    );
    assert!(check_mxfp4(op, &mx, 1, 6, 64, 6 * 2 * 16, 6 * 2, false).is_err(), "more groups than experts");
    assert!(check_mxfp4(op, &mx, 2, 6, 64, 2 * 6 * 2 * 16 - 1, 2 * 6 * 2, false).is_err());
    assert!(check_mxfp4(op, &GroupedGemm { k: 48, ..mx }, 2, 6, 48, 2 * 6 * 16 + 16, 2 * 6 + 1, false).is_err());
    assert!(check_mxfp4(op, &GroupedGemm { grouped: Grouped::K, ..mx }, 2, 6, 64, 384, 24, false).is_err());
}

// ---- GPU ----

fn gpu() -> Gpu {
    Gpu::new(0).expect("a GPU")
}

/// Runs the f32 kernel on fresh copies of the host buffers and returns C.
fn run_f32(gpu: &Gpu, cfg: &GroupedGemm, offsets: &[u32], a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f32> {
    let s = &gpu.stream;
    let (od, ad, bd) = (s.clone_htod(offsets).unwrap(), s.clone_htod(a).unwrap(), s.clone_htod(b).unwrap());
    let mut cd = s.clone_htod(c0).unwrap();
    let total = offsets[cfg.groups] as usize;
    grouped_gemm_f32(gpu, cfg, &od.as_view(), total, &ad.as_view(), &bd.as_view(), &mut cd.as_view_mut()).unwrap();
    s.clone_dtoh(&cd).unwrap()
}

/// Every LoRA use on fresh random operands, GPU vs CPU reference; returns nothing, panics on a
/// mismatch. `time` also prints the kernel's wall time (median of 5 after a warm-up).
fn check_lora(gpu: &Gpu, seed: u64, lora: Lora, sizes: &[usize], time: bool) {
    let offsets = offsets_of(sizes);
    for u in 0..6 {
        let (cfg, [la, lb, lc]) = lora.use_cfg(u, &offsets);
        let s = seed * 100 + u as u64 * 10;
        let (a, b, c0) = (randn(s + 1, la, 1.0), randn(s + 2, lb, 1.0), randn(s + 3, lc, 1.0));
        let got = run_f32(gpu, &cfg, &offsets, &a, &b, &c0);
        let mut want = c0.clone();
        grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut want);
        let depth = if cfg.grouped == Grouped::K { max_len(&offsets) } else { cfg.k };
        let what = format!("{} E {} r {} in {} out {} sizes {sizes:?}", USES[u], lora.e, lora.r, lora.inp, lora.out);
        assert_close(&what, &got, &want, atol(depth, 1.0, 1.0) * cfg.alpha.abs(), 1e-4);
        if time {
            let st = &gpu.stream;
            let (od, ad, bd) =
                (st.clone_htod(&offsets).unwrap(), st.clone_htod(&a).unwrap(), st.clone_htod(&b).unwrap());
            let mut cd = st.clone_htod(&c0).unwrap();
            let total = offsets[cfg.groups] as usize;
            let ms = median_ms(gpu, || {
                grouped_gemm_f32(gpu, &cfg, &od.as_view(), total, &ad.as_view(), &bd.as_view(), &mut cd.as_view_mut())
                    .unwrap()
            });
            let flops =
                2.0 * (if cfg.grouped == Grouped::K { cfg.m * total } else { total * cfg.k }) as f64 * cfg.n as f64;
            println!("{what}: {ms:.3} ms, {:.1} TFLOP/s", flops / ms / 1e9);
        }
    }
}

fn median_ms(gpu: &Gpu, mut f: impl FnMut()) -> f64 {
    f();
    gpu.stream.synchronize().unwrap();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            gpu.stream.synchronize().unwrap();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn lora_uses_ragged_groups_with_an_empty_expert() {
    let gpu = gpu();
    check_lora(&gpu, 1, Lora { e: 4, r: 3, inp: 67, out: 93, s: 0.5 }, &[37, 0, 90, 23], false);
    // Groups longer than one 64-row tile and an expert with zero tokens at each end.
    check_lora(&gpu, 2, Lora { e: 5, r: 8, inp: 129, out: 65, s: 2.0 }, &[0, 200, 1, 64, 0], false);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn rank_one() {
    check_lora(&gpu(), 3, Lora { e: 3, r: 1, inp: 33, out: 17, s: 1.5 }, &[5, 11, 0], false);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn gpt_oss_20b_lora_shapes() {
    // S = 8192 tokens over 32 experts (ragged, two empty), hidden 2880, gate_up out 5760, r = 8.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut sizes: Vec<usize> = (0..32).map(|_| rng.gen_range(1..512)).collect();
    sizes[5] = 0;
    sizes[31] = 0;
    let total: usize = sizes.iter().sum();
    sizes[0] += 8192 - total.min(8192);
    check_lora(&gpu(), 4, Lora { e: 32, r: 8, inp: 2880, out: 5760, s: 2.0 }, &sizes, true);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn dense_single_group() {
    let gpu = gpu();
    let (m, n, k) = (131, 67, 259);
    for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0), (-2.0, 0.25)] {
        // Row-major C = A B with B stored transposed ([n, k]) to exercise a column-strided operand.
        let cfg = GroupedGemm {
            groups: 1,
            grouped: Grouped::M,
            m,
            n,
            k,
            alpha,
            beta,
            a: Strides::row_major(k),
            b: Strides { row: 1, col: k, group: 0 },
            c: Strides::row_major(n),
        };
        let offsets = [0, m as u32];
        let (a, b, c0) = (randn(5, m * k, 1.0), randn(6, n * k, 1.0), randn(7, m * n, 1.0));
        let got = run_f32(&gpu, &cfg, &offsets, &a, &b, &c0);
        let mut want = c0.clone();
        grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut want);
        assert_close(&format!("dense [{m}, {n}, {k}] alpha {alpha} beta {beta}"), &got, &want, atol(k, 2.0, 1.0), 1e-4);

        // The same product as one Grouped::K group: C [m, n] = Σ_t A(m, t) B(t, n) over k = 259 rows.
        let kcfg = GroupedGemm { grouped: Grouped::K, ..cfg };
        let offsets = [0, k as u32];
        let got = run_f32(&gpu, &kcfg, &offsets, &a, &b, &c0);
        let mut want = c0.clone();
        grouped_gemm_ref(&kcfg, &offsets, &a, &b, &mut want);
        assert_close(
            &format!("dense K [{m}, {n}, {k}] alpha {alpha} beta {beta}"),
            &got,
            &want,
            atol(k, 2.0, 1.0),
            1e-4,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn beta_zero_overwrites_nan() {
    let gpu = gpu();
    let offsets = offsets_of(&[70, 0, 9]);
    for grouped in [Grouped::M, Grouped::K] {
        let (m, n, k) = (if grouped == Grouped::M { 70 } else { 13 }, 45, 19);
        let cfg = GroupedGemm {
            groups: 3,
            grouped,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            a: if grouped == Grouped::M { Strides::row_major(k) } else { Strides { row: 1, col: m, group: 0 } },
            b: if grouped == Grouped::M { Strides { row: n, col: 1, group: k * n } } else { Strides::row_major(n) },
            c: if grouped == Grouped::M { Strides::row_major(n) } else { Strides { row: n, col: 1, group: m * n } },
        };
        let total = 79;
        let (la, lb, lc) =
            if grouped == Grouped::M { (total * k, 3 * k * n, total * n) } else { (m * total, total * n, 3 * m * n) };
        let (a, b) = (randn(8, la, 1.0), randn(9, lb, 1.0));
        let got = run_f32(&gpu, &cfg, &offsets, &a, &b, &vec![f32::NAN; lc]);
        let mut want = vec![f32::NAN; lc];
        grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut want);
        // Grouped::K's empty group writes beta · C = 0, never 0 · NaN.
        assert!(want.iter().all(|v| v.is_finite()) && got.iter().all(|v| v.is_finite()), "{grouped:?}: NaN survived");
        assert_close(&format!("{grouped:?} beta 0 over NaN"), &got, &want, atol(79, 1.0, 1.0), 1e-4);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn grouped_k_expert_with_zero_tokens_scales_c_by_beta() {
    let gpu = gpu();
    let offsets = offsets_of(&[0, 7, 0, 40]);
    let (m, n) = (5, 70);
    let cfg = GroupedGemm {
        groups: 4,
        grouped: Grouped::K,
        m,
        n,
        k: 0,
        alpha: 1.0,
        beta: 0.5,
        a: Strides { row: 1, col: m, group: 0 },
        b: Strides::row_major(n),
        c: Strides { row: n, col: 1, group: m * n },
    };
    let (a, b, c0) = (randn(10, m * 47, 1.0), randn(11, 47 * n, 1.0), randn(12, 4 * m * n, 1.0));
    let got = run_f32(&gpu, &cfg, &offsets, &a, &b, &c0);
    let mut want = c0.clone();
    grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut want);
    assert_close("grouped K with empty groups", &got, &want, atol(40, 1.0, 1.0), 1e-4);
    assert_eq!(&got[..m * n], &want[..m * n], "an empty group's C is exactly beta · C");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn more_row_tiles_of_small_groups_than_grid_y() {
    // 100,000 groups of 1 or 2 rows (and some empty): a row tile each, more than grid y's 65,535
    // blocks, so blocks walk on to a second tile, 65,535 tiles further (the walk finds a tile's
    // group 32 groups at a time from the first).
    let sizes: Vec<usize> = (0..110_000).map(|g| if g % 11 == 5 { 0 } else { 1 + g % 2 }).collect();
    let offsets = offsets_of(&sizes);
    let total = offsets[sizes.len()] as usize;
    let (n, k) = (5, 3);
    let cfg = GroupedGemm {
        groups: sizes.len(),
        grouped: Grouped::M,
        m: 2,
        n,
        k,
        alpha: 1.0,
        beta: 1.0,
        a: Strides::row_major(k),
        b: Strides { row: n, col: 1, group: k * n },
        c: Strides::row_major(n),
    };
    let (a, b, c0) = (randn(13, total * k, 1.0), randn(14, sizes.len() * k * n, 1.0), randn(15, total * n, 1.0));
    let got = run_f32(&gpu(), &cfg, &offsets, &a, &b, &c0);
    let mut want = c0.clone();
    grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut want);
    assert_close("110,000 groups", &got, &want, atol(k, 1.0, 1.0), 1e-4);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn more_row_tiles_than_grid_y() {
    // 65,535 · 64 + 77 rows in one group: grid y is capped at 65,535 and the kernel loops.
    let (m, n, k) = (65_535 * 64 + 77, 2, 3);
    let cfg = GroupedGemm {
        groups: 1,
        grouped: Grouped::M,
        m,
        n,
        k,
        alpha: 1.0,
        beta: 0.0,
        a: Strides::row_major(k),
        b: Strides::row_major(n),
        c: Strides::row_major(n),
    };
    let offsets = [0, m as u32];
    let (a, b) = (randn(16, m * k, 1.0), randn(17, k * n, 1.0));
    let got = run_f32(&gpu(), &cfg, &offsets, &a, &b, &vec![0.0; m * n]);
    let mut want = vec![0.0; m * n];
    grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut want);
    assert_close("4.2M rows", &got, &want, atol(k, 1.0, 1.0), 1e-4);
}

/// The epilogue reference's LoRA term is use (2) of the LoRA definitions (`y += s u B_eᵀ`) as the
/// general reference computes it, and its bias goes to each group's own rows.
#[test]
fn split_down_grid_and_scratch_cover_every_chunk_and_row_tile() {
    // split_a_bf16_down's grid: x, chunks of SPLIT_DOWN_KC k, must cover kp exactly (the kernel
    // writes chunk blockIdx.x's partial sums, and the reduce adds chunks 0..x); y bounds the row
    // tiles of SPLIT_DOWN_TM rows however the offsets split the rows (its loop is grid-stride, but
    // the bound is what the launcher claims). The scratch holds every chunk's sums.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..200 {
        let groups = rng.gen_range(1..40usize);
        let sizes: Vec<usize> =
            (0..groups).map(|_| if rng.gen_bool(0.2) { 0 } else { rng.gen_range(1..300) }).collect();
        let total: usize = sizes.iter().sum();
        let k = rng.gen_range(1..6000usize);
        let cfg = GroupedGemm {
            groups,
            grouped: Grouped::M,
            m: 0,
            n: 8,
            k,
            alpha: 1.0,
            beta: 0.0,
            a: Strides::row_major(k),
            b: Strides::row_major(0),
            c: Strides::row_major(8),
        };
        let (p, kp) = (params(&cfg, total), padded_k(k));
        let grid = split_down_grid(&p, kp).grid_dim;
        let chunks = grid.0 as usize;
        assert!(chunks * SPLIT_DOWN_KC >= kp && (chunks - 1) * SPLIT_DOWN_KC < kp, "k {k}: {chunks} chunks");
        let tiles: usize = sizes.iter().map(|s| s.div_ceil(SPLIT_DOWN_TM)).sum();
        assert!(grid.1 as usize >= tiles.min(GRID_YZ_MAX), "sizes {sizes:?}: {tiles} tiles, grid {grid:?}");
        assert_eq!(split_down_elems(total, k), 2 * chunks * total * SPLIT_DOWN_RANK);
        assert!(mxfp4_scratch_elems(total, k, Mma::Split) >= 2 * total * kp + split_down_elems(total, k));
    }
}

#[test]
fn epilogue_reference_is_the_lora_up_product_plus_the_bias() {
    let (e, r, n) = (3, 5, 7);
    let sizes = [4usize, 0, 6];
    let offsets = offsets_of(&sizes);
    let total = offsets[e] as usize;
    let lora = Lora { e, r, inp: 1, out: n, s: 1.5 };
    let (cfg, _) = lora.use_cfg(1, &offsets);
    let (u, b, c0) = (randn(60, total * r, 1.0), randn(61, n * r * e, 1.0), randn(62, total * n, 1.0));
    let mut want = c0.clone();
    grouped_gemm_ref(&cfg, &offsets, &u, &b, &mut want);
    let mut got = c0.clone();
    let lora_up = HostLoraUp { u: &u, b: &b, b_strides: cfg.b, rank: r, scaling: 1.5 };
    let host = HostEpilogue { bias: None, lora: Some(lora_up) };
    mxfp4_epilogue_ref(&cfg, &offsets, &host, &mut got);
    assert_close("epilogue LoRA term vs use (2)", &got, &want, 1e-5, 1e-5);
    let bias = randn(63, e * n, 1.0);
    let mut with_bias = c0.clone();
    mxfp4_epilogue_ref(&cfg, &offsets, &HostEpilogue { bias: Some(&bias), lora: None }, &mut with_bias);
    for (g, w) in offsets.windows(2).enumerate() {
        for s in w[0] as usize..w[1] as usize {
            for j in 0..n {
                assert_eq!(with_bias[s * n + j], c0[s * n + j] + bias[g * n + j], "row {s} column {j}");
            }
        }
    }
}

#[test]
fn epilogue_shapes_are_checked_with_clear_errors() {
    let cfg = GroupedGemm {
        groups: 2,
        grouped: Grouped::M,
        m: 4,
        n: 6,
        k: 32,
        alpha: 1.0,
        beta: 0.0,
        a: Strides::row_major(32),
        b: Strides::row_major(0),
        c: Strides::row_major(6),
    };
    let b_st = Strides { row: 2, col: 4 * 2, group: 1 };
    let ok = |bias, lora| check_epilogue("op", &cfg, 7, &EpiLens { bias, lora });
    assert!(ok(Some(12), Some((28, 48, b_st, 4))).is_ok());
    let err = |bias, lora| ok(bias, lora).unwrap_err().to_string();
    assert!(err(Some(11), None).contains("bias has 11 elements, expected at least 12"));
    assert!(err(None, Some((27, 48, b_st, 4))).contains("u has 27 elements, expected at least 28"));
    assert!(err(None, Some((28, 47, b_st, 4))).contains("LoRA B has 47 elements, expected at least 48"));
    assert!(err(None, Some((0, 48, b_st, 0))).contains("LoRA rank is 0"));
}

/// MXFP4 expert weights `[experts, rows, cols]`, forward (`y = x W_gᵀ`, beta 0) and transposed
/// (`dx += dy W_g`, beta 1), GPU vs CPU reference; `time` prints the kernel's wall time.
/// The MXFP4 kernels this GPU runs: mma.sync with three and with two A stages everywhere (where
/// three fit), wgmma on sm_90a (said when skipped).
fn mxfp4_paths(gpu: &Gpu) -> Vec<Mxfp4Path> {
    let mut paths = vec![Mxfp4Path::MmaSyncTwoStage];
    if Mxfp4Path::for_gpu(gpu, Mma::Split) != Mxfp4Path::MmaSyncTwoStage {
        paths.push(Mxfp4Path::MmaSync);
    }
    if gpu.arch == "sm_90a" {
        paths.extend([Mxfp4Path::Wgmma, Mxfp4Path::WgmmaRs, Mxfp4Path::WgmmaWs]);
    } else {
        eprintln!("NOTE: {} is not sm_90a: the wgmma MXFP4 kernels are NOT tested on it", gpu.arch);
    }
    paths
}

/// The epilogue a [`check_mxfp4_gpu`] case adds: an expert bias and a LoRA term of `rank`, its u
/// starting `u_shift` elements into its buffer (a u that does not start at its buffer's start; the
/// kernels copy it 4 bytes at a time, so no alignment is needed). Past
/// [`EPILOGUE_RANK`] the LoRA term runs as a product of its own. B is laid out as the trainer's:
/// PEFT's `lora_B [n, rank·experts]` (column `j·experts + g`) forward, `lora_A [rank·experts, n]`
/// (row `g·rank + j`) transposed.
#[derive(Clone, Copy, Debug)]
struct EpiCase {
    rank: usize,
    u_shift: usize,
}

/// Random MXFP4 experts `[experts, rows, cols]` (block scales 2^-7 to 2^1) and groups of `sizes`
/// rows, on the host and the device.
struct Mxfp4Case {
    blocks: Vec<u8>,
    scales: Vec<u8>,
    experts: usize,
    rows: usize,
    cols: usize,
    bmax: f32,
    offsets: Vec<u32>,
    total: usize,
    bd: cudarc::driver::CudaSlice<u8>,
    sd: cudarc::driver::CudaSlice<u8>,
    od: cudarc::driver::CudaSlice<u32>,
}

impl Mxfp4Case {
    fn new(gpu: &Gpu, seed: u64, experts: usize, rows: usize, cols: usize, sizes: &[usize]) -> Self {
        let (blocks, scales) = random_mxfp4(seed, experts, rows, cols, 120..=128);
        let bmax = max_abs(&dequantize(&Mxfp4HostWeight { blocks: &blocks, scales: &scales, experts, rows, cols }));
        let offsets = offsets_of(sizes);
        let total = offsets[sizes.len()] as usize;
        let st = &gpu.stream;
        let (bd, sd, od) =
            (st.clone_htod(&blocks).unwrap(), st.clone_htod(&scales).unwrap(), st.clone_htod(&offsets).unwrap());
        Self { blocks, scales, experts, rows, cols, bmax, offsets, total, bd, sd, od }
    }

    fn host(&self) -> Mxfp4HostWeight<'_> {
        let (experts, rows, cols) = (self.experts, self.rows, self.cols);
        Mxfp4HostWeight { blocks: &self.blocks, scales: &self.scales, experts, rows, cols }
    }

    fn weight(&self) -> Mxfp4Weight<'_> {
        let (experts, rows, cols) = (self.experts, self.rows, self.cols);
        Mxfp4Weight { blocks: self.bd.as_view(), scales: self.sd.as_view(), experts, rows, cols }
    }

    /// The product over the groups, forward (`K = cols`, `N = rows`) or transposed, row-major A
    /// and C, with `beta`.
    fn cfg(&self, transposed: bool, beta: f32) -> GroupedGemm {
        let (k, n) = if transposed { (self.rows, self.cols) } else { (self.cols, self.rows) };
        GroupedGemm {
            groups: self.offsets.len() - 1,
            grouped: Grouped::M,
            m: max_len(&self.offsets),
            n,
            k,
            alpha: 1.0,
            beta,
            a: Strides::row_major(k),
            b: Strides::row_major(0),
            c: Strides::row_major(n),
        }
    }
}

fn check_mxfp4_gpu(gpu: &Gpu, seed: u64, experts: usize, rows: usize, cols: usize, sizes: &[usize], time: bool) {
    check_mxfp4_gpu_epi(gpu, seed, experts, rows, cols, sizes, time, None)
}

#[allow(clippy::too_many_arguments)]
fn check_mxfp4_gpu_epi(
    gpu: &Gpu,
    seed: u64,
    experts: usize,
    rows: usize,
    cols: usize,
    sizes: &[usize],
    time: bool,
    epi: Option<EpiCase>,
) {
    let case = Mxfp4Case::new(gpu, seed, experts, rows, cols, sizes);
    let (hw, w, offsets, total, od, bmax) =
        (case.host(), case.weight(), &case.offsets, case.total, &case.od, case.bmax);
    let st = &gpu.stream;
    let cases = [(false, Mma::Split), (true, Mma::Split), (false, Mma::Bf16), (true, Mma::Bf16)];
    for (path, (transposed, mma)) in mxfp4_paths(gpu).into_iter().flat_map(|p| cases.map(|c| (p, c))) {
        let cfg = case.cfg(transposed, if transposed { 1.0 } else { 0.0 });
        let (k, n) = (cfg.k, cfg.n);
        let s = seed * 10 + transposed as u64;
        let (a, c0) = (randn(s + 1, total * k, 1.0), randn(s + 2, total * n, 1.0));
        let (ad, mut cd) = (st.clone_htod(&a).unwrap(), st.clone_htod(&c0).unwrap());
        // The epilogue's operands (fresh per case), on the host and the device.
        let (bias, u, lb, b_strides) = match epi {
            Some(EpiCase { rank, u_shift }) => {
                let b_strides = if transposed {
                    Strides { row: n, col: 1, group: rank * n }
                } else {
                    Strides { row: experts, col: rank * experts, group: 1 }
                };
                (
                    randn(s + 3, experts * n, 1.0),
                    randn(s + 4, u_shift + total * rank, 1.0),
                    randn(s + 5, experts * rank * n, 0.3),
                    b_strides,
                )
            }
            None => (vec![], vec![], vec![], Strides::row_major(0)),
        };
        // One spare element each: cudarc does not allocate empty buffers.
        let up = |v: &[f32]| st.clone_htod(&[v, &[0.0]].concat()).unwrap();
        let (biasd, ud, lbd) = (up(&bias), up(&u), up(&lb));
        let scaling = 2.0 - 0.25 * (seed % 3) as f32;
        let launch = |cd: &mut cudarc::driver::CudaSlice<f32>| {
            let e = match epi {
                Some(EpiCase { rank, u_shift }) => Mxfp4Epilogue {
                    bias: Some(biasd.slice(..bias.len())),
                    lora: Some(LoraUp {
                        u: ud.slice(u_shift..u_shift + total * rank),
                        b: lbd.slice(..lb.len()),
                        b_strides,
                        rank,
                        scaling,
                    }),
                },
                None => Mxfp4Epilogue::default(),
            };
            grouped_gemm_f32_mxfp4w_on(
                gpu,
                &cfg,
                &od.as_view(),
                total,
                &ad.as_view(),
                &w,
                transposed,
                mma,
                path,
                &e,
                &mut cd.as_view_mut(),
            )
            .unwrap()
        };
        launch(&mut cd);
        let got = st.clone_dtoh(&cd).unwrap();
        let mut want = c0.clone();
        // Mma::Bf16 rounds A to bf16 once: its reference is the product of the rounded A (the
        // MXFP4 values are exact in bf16), so the tolerance stays that of f32 accumulation.
        let a_ref: Vec<f32> = match mma {
            Mma::Split => a.clone(),
            Mma::Bf16 => a.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        };
        grouped_gemm_mxfp4w_ref(&cfg, offsets, &a_ref, &hw, transposed, &mut want);
        if let Some(EpiCase { rank, u_shift }) = epi {
            let lora = HostLoraUp { u: &u[u_shift..], b: &lb, b_strides, rank, scaling };
            let host = HostEpilogue { bias: Some(&bias), lora: Some(lora) };
            mxfp4_epilogue_ref(&cfg, offsets, &host, &mut want);
        }
        let what = format!(
            "mxfp4 {path:?} [{experts}, {rows}, {cols}] transposed {transposed} {mma:?} sizes {sizes:?} epilogue {epi:?}"
        );
        assert_close(&what, &got, &want, atol(k, 1.0, bmax), 1e-4);
        if time {
            let ms = median_ms(gpu, || launch(&mut cd));
            println!("{what}: {ms:.3} ms, {:.1} TFLOP/s", 2.0 * (total * k * n) as f64 / ms / 1e9);
        }
    }
}

/// [`grouped_gemm_f32_mxfp4w_lora`] on fresh random operands in both orientations and precisions,
/// the trainer's factor layouts (forward: the down factor PEFT's `lora_A [r·E, K]`, the up factor
/// `lora_B [N, r·E]`; input gradients: the reverse), against the CPU references: `u` against the
/// f64 down-projection (f32 accumulation tolerance over K), C against the product plus the
/// epilogue reference with the GPU's `u`. Ranks up to 8 take the split's down-projection, larger
/// ones the f32 product first.
#[allow(clippy::too_many_arguments)]
fn check_mxfp4_lora_gpu(
    gpu: &Gpu,
    seed: u64,
    experts: usize,
    rows: usize,
    cols: usize,
    sizes: &[usize],
    rank: usize,
    time: bool,
) {
    let case = Mxfp4Case::new(gpu, seed, experts, rows, cols, sizes);
    let (hw, w, offsets, total, od, bmax) =
        (case.host(), case.weight(), &case.offsets, case.total, &case.od, case.bmax);
    let st = &gpu.stream;
    for (transposed, mma) in [(false, Mma::Split), (true, Mma::Split), (false, Mma::Bf16), (true, Mma::Bf16)] {
        let cfg = case.cfg(transposed, 0.0);
        let (k, n) = (cfg.k, cfg.n);
        // PEFT's layouts: A [r·E, in] (expert e's rows e·r..), B [out, r·E] (column j·E + e).
        let a_layout = |inp: usize| Strides { row: inp, col: 1, group: rank * inp };
        let b_layout = Strides { row: experts, col: rank * experts, group: 1 };
        let (down_st, up_st) = if transposed { (b_layout, a_layout(n)) } else { (a_layout(k), b_layout) };
        let s = seed * 10 + transposed as u64 + 2 * (mma == Mma::Bf16) as u64;
        let x = randn(s + 1, total * k, 1.0);
        let (down, up, bias) = (
            randn(s + 2, experts * rank * k, 0.5),
            randn(s + 3, experts * rank * n, 0.3),
            randn(s + 4, experts * n, 1.0),
        );
        let (alpha, scaling) = (1.25, 2.0 - 0.25 * (seed % 3) as f32);
        let (xd, downd, upd, biasd) = (
            st.clone_htod(&x).unwrap(),
            st.clone_htod(&down).unwrap(),
            st.clone_htod(&up).unwrap(),
            st.clone_htod(&bias).unwrap(),
        );
        // NaN-filled outputs: every value the call owns must be written.
        let mut ud = st.clone_htod(&vec![f32::NAN; total * rank + 1]).unwrap();
        let mut cd = st.clone_htod(&vec![f32::NAN; total * n + 1]).unwrap();
        let lora = Mxfp4Lora {
            down: LoraDown { factor: downd.as_view(), strides: down_st, alpha, rank },
            up: upd.as_view(),
            up_strides: up_st,
            scaling,
        };
        let launch = |ud: &mut cudarc::driver::CudaSlice<f32>, cd: &mut cudarc::driver::CudaSlice<f32>| {
            grouped_gemm_f32_mxfp4w_lora(
                gpu,
                &cfg,
                &od.as_view(),
                total,
                &xd.as_view(),
                &w,
                transposed,
                mma,
                Some(biasd.as_view()),
                &lora,
                &mut ud.slice_mut(..total * rank),
                &mut cd.slice_mut(..total * n),
            )
            .unwrap()
        };
        launch(&mut ud, &mut cd);
        let (u_got, c_got) = (st.clone_dtoh(&ud).unwrap(), st.clone_dtoh(&cd).unwrap());
        let (u_got, c_got) = (&u_got[..total * rank], &c_got[..total * n]);
        let what =
            format!("mxfp4 LoRA r {rank} [{experts}, {rows}, {cols}] transposed {transposed} {mma:?} sizes {sizes:?}");
        // u = alpha · x F_gᵀ: B(k, j) = F_g(j, k), from the f32 x in both precisions.
        let down_cfg = GroupedGemm {
            n: rank,
            alpha,
            b: Strides { row: down_st.col, col: down_st.row, group: down_st.group },
            c: Strides::row_major(rank),
            ..cfg
        };
        let mut u_want = vec![0.0; total * rank];
        grouped_gemm_ref(&down_cfg, offsets, &x, &down, &mut u_want);
        assert_close(&format!("{what}: u"), u_got, &u_want, atol(k, 1.0, 0.5) * alpha, 1e-5);
        // The down-projection alone: the same bits (a backward pass that did not keep u).
        let mut u2 = st.clone_htod(&vec![f32::NAN; total * rank]).unwrap();
        grouped_lora_down_f32(gpu, &cfg, &od.as_view(), total, &xd.as_view(), &lora.down, &mut u2.as_view_mut())
            .unwrap();
        let u2 = st.clone_dtoh(&u2).unwrap();
        assert!(
            u2.iter().zip(u_got).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: grouped_lora_down_f32 differs from the split's u"
        );
        let x_ref: Vec<f32> = match mma {
            Mma::Split => x.clone(),
            Mma::Bf16 => x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
        };
        let mut want = vec![0.0; total * n];
        grouped_gemm_mxfp4w_ref(&cfg, offsets, &x_ref, &hw, transposed, &mut want);
        let host_lora = HostLoraUp { u: u_got, b: &up, b_strides: up_st, rank, scaling };
        mxfp4_epilogue_ref(&cfg, offsets, &HostEpilogue { bias: Some(&bias), lora: Some(host_lora) }, &mut want);
        assert_close(&format!("{what}: C"), c_got, &want, atol(k, 1.0, bmax), 1e-4);
        if time {
            let ms = median_ms(gpu, || launch(&mut ud, &mut cd));
            println!("{what}: {ms:.3} ms, {:.1} TFLOP/s", 2.0 * (total * k * n) as f64 / ms / 1e9);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_lora_down_projection_in_the_split() {
    let gpu = gpu();
    // Groups of 0 to 70 rows (row tiles of 32, batches of 4 rows cut short), K 90 (a float4 past K
    // read element by element) and 96 the other way.
    check_mxfp4_lora_gpu(&gpu, 50, 4, 90, 96, &[9, 0, 70, 3], 8, false);
    check_mxfp4_lora_gpu(&gpu, 51, 4, 90, 96, &[9, 0, 70, 3], 3, false);
    // Ranks past the split's 8: the f32 product first (rank 12 still in the store).
    check_mxfp4_lora_gpu(&gpu, 52, 4, 90, 96, &[9, 0, 70, 3], 12, false);
    // gpt-oss-20b's gate_up: K 2880 forward (three 1,024-wide chunks, the last partial), 5760 back.
    check_mxfp4_lora_gpu(&gpu, 53, 4, 5760, 2880, &[100, 0, 173, 41], 8, true);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_tiny_with_an_expert_with_zero_tokens() {
    let gpu = gpu();
    check_mxfp4_gpu(&gpu, 20, 4, 128, 64, &[9, 0, 70, 3], false);
    // With bias and LoRA in the store: an odd rank (the staged u's zero padding past the rank).
    check_mxfp4_gpu_epi(&gpu, 40, 4, 128, 64, &[9, 0, 70, 3], false, Some(EpiCase { rank: 3, u_shift: 0 }));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_partial_tiles() {
    // rows 100: a partial 64-row n tile (forward) and a partial 32-deep k slice (transposed);
    // cols 96: the transposed product's second n tile holds one block and one missing one.
    let gpu = gpu();
    check_mxfp4_gpu(&gpu, 21, 3, 100, 96, &[0, 65, 1], false);
    check_mxfp4_gpu_epi(&gpu, 41, 3, 100, 96, &[0, 65, 1], false, Some(EpiCase { rank: 8, u_shift: 0 }));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_gpt_oss_20b_shapes() {
    // gate_up [5760, 2880] and down [2880, 2880] experts, a few hundred tokens, one expert empty.
    let gpu = gpu();
    check_mxfp4_gpu(&gpu, 22, 4, 5760, 2880, &[100, 0, 173, 41], true);
    check_mxfp4_gpu(&gpu, 23, 4, 2880, 2880, &[100, 0, 173, 41], true);
    // The trainer's case: bias and LoRA r 8 in the store (timed beside the plain product above).
    let lora = Some(EpiCase { rank: 8, u_shift: 0 });
    check_mxfp4_gpu_epi(&gpu, 42, 4, 5760, 2880, &[100, 0, 173, 41], true, lora);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_groups_longer_than_one_tile_and_partial_n_tiles() {
    // Groups of 300 and 129 rows (three and two 128-row tiles, the last nearly empty); rows 200
    // (forward: one partial 256-wide n tile) and cols 160 (transposed: 5 of a tile's 8 blocks).
    let gpu = gpu();
    check_mxfp4_gpu(&gpu, 24, 4, 200, 160, &[300, 0, 129, 1], false);
    // Five and four row tiles beside a group of one row.
    check_mxfp4_gpu(&gpu, 27, 3, 200, 160, &[520, 1, 400], false);
    // Rank 16 and a misaligned u in the store; rank 20 as a product after it.
    check_mxfp4_gpu_epi(&gpu, 43, 4, 200, 160, &[300, 0, 129, 1], false, Some(EpiCase { rank: 16, u_shift: 0 }));
    check_mxfp4_gpu_epi(&gpu, 44, 3, 200, 160, &[520, 1, 400], false, Some(EpiCase { rank: 20, u_shift: 0 }));
    check_mxfp4_gpu_epi(&gpu, 45, 3, 200, 160, &[33, 0, 200], false, Some(EpiCase { rank: 4, u_shift: 1 }));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_odd_rows_give_a_partial_k_slice() {
    // Transposed K = rows = 99: the last 64-deep slice holds 35 rows, A's bf16 rows are padded to
    // 128 with zeros and its last 4-wide split chunk holds 3 values.
    check_mxfp4_gpu(&gpu(), 25, 2, 99, 64, &[17, 40], false);
    check_mxfp4_gpu(&gpu(), 26, 3, 1, 32, &[5, 0, 2], false);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_warp_specialized_walks_more_tiles_than_sms_bit_for_bit() {
    // 9 weight-row tiles x 27 row tiles (uneven groups; last tiles 64, 192 and 256 rows wide, and
    // 128 in the smaller tests): 243 tiles, more than an H100's or H200's 132 SMs, so most blocks
    // of the warp-specialized kernel walk two, their stages and mbarrier phases running on from one
    // tile to the next (with the default precision's three stages, 10 slices a tile start each
    // tile at another stage and phase). The transposed kernel (against the CPU reference only):
    // 5 column tiles x 27 row tiles, 135, and 18 slices a tile.
    let gpu = gpu();
    if gpu.arch == "sm_90a" {
        // Otherwise WgmmaWs would quietly run the other kernels and this test would check those.
        for (mma, transposed) in [(Mma::Split, false), (Mma::Split, true), (Mma::Bf16, false), (Mma::Bf16, true)] {
            assert!(
                ws_kernel_usable(&gpu, mma, transposed).unwrap(),
                "{mma:?} transposed {transposed}: this build of the warp-specialized kernel cannot run"
            );
        }
    }
    let sizes = [700, 0, 1, 1500, 257, 64, 2100, 190, 999];
    let (experts, rows, cols) = (sizes.len(), 1152, 640);
    check_mxfp4_gpu_epi(&gpu, 46, experts, rows, cols, &sizes, false, Some(EpiCase { rank: 8, u_shift: 0 }));
    if gpu.arch != "sm_90a" {
        eprintln!("NOTE: {} is not sm_90a: the warp-specialized kernel is NOT compared with WgmmaRs", gpu.arch);
        return;
    }
    // The same products as WgmmaRs's kernel, in the same order: the same bits.
    let (blocks, scales) = random_mxfp4(47, experts, rows, cols, 120..=128);
    let offsets = offsets_of(&sizes);
    let total = offsets[experts] as usize;
    let st = &gpu.stream;
    let (bd, sd, od) =
        (st.clone_htod(&blocks).unwrap(), st.clone_htod(&scales).unwrap(), st.clone_htod(&offsets).unwrap());
    let w = Mxfp4Weight { blocks: bd.as_view(), scales: sd.as_view(), experts, rows, cols };
    let cfg = GroupedGemm {
        groups: experts,
        grouped: Grouped::M,
        m: max_len(&offsets),
        n: rows,
        k: cols,
        alpha: 1.0,
        beta: 0.0,
        a: Strides::row_major(cols),
        b: Strides::row_major(0),
        c: Strides::row_major(rows),
    };
    let ad = st.clone_htod(&randn(48, total * cols, 1.0)).unwrap();
    for mma in [Mma::Split, Mma::Bf16] {
        let run = |path| {
            let mut cd = st.clone_htod(&vec![f32::NAN; total * rows]).unwrap();
            grouped_gemm_f32_mxfp4w_on(
                &gpu,
                &cfg,
                &od.as_view(),
                total,
                &ad.as_view(),
                &w,
                false,
                mma,
                path,
                &Mxfp4Epilogue::default(),
                &mut cd.as_view_mut(),
            )
            .unwrap();
            st.clone_dtoh(&cd).unwrap()
        };
        let (ws, rs) = (run(Mxfp4Path::WgmmaWs), run(Mxfp4Path::WgmmaRs));
        assert!(rs.iter().all(|v| v.is_finite()), "{mma:?}: WgmmaRs left NaN or inf");
        let differ = ws.iter().zip(&rs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{mma:?}: {differ} of {} outputs differ between WgmmaWs and WgmmaRs", ws.len());
    }
}

/// How the operands of [`check_mxfp4_views`] sit in memory.
#[derive(Clone, Copy, Debug)]
struct Mxfp4Layout {
    /// Elements before A, C and the weight's blocks (1: views that are not 16-byte aligned).
    shift: usize,
    /// A and C column-major (`[i, k]` at `i + k·total`): no vector loads, strided stores.
    col_major: bool,
    /// Each group reads its own copy of A (a nonzero group stride).
    a_per_group: bool,
    alpha: f32,
    beta: f32,
}

/// One MXFP4 product on views of larger buffers laid out as `lay` says, GPU vs CPU reference;
/// C starts as NaN when beta is 0 (it must be overwritten, never read).
fn check_mxfp4_views(
    gpu: &Gpu,
    seed: u64,
    rows: usize,
    cols: usize,
    sizes: &[usize],
    transposed: bool,
    lay: Mxfp4Layout,
) {
    let experts = sizes.len();
    let (blocks, scales) = random_mxfp4(seed, experts, rows, cols, 120..=128);
    let hw = Mxfp4HostWeight { blocks: &blocks, scales: &scales, experts, rows, cols };
    let bmax = max_abs(&dequantize(&hw));
    let offsets = offsets_of(sizes);
    let total = offsets[experts] as usize;
    let (k, n) = if transposed { (rows, cols) } else { (cols, rows) };
    let (mut a_st, c_st) = if lay.col_major {
        (Strides { row: 1, col: total, group: 0 }, Strides { row: 1, col: total, group: 0 })
    } else {
        (Strides::row_major(k), Strides::row_major(n))
    };
    let a_copies = if lay.a_per_group { experts } else { 1 };
    if lay.a_per_group {
        a_st.group = total * k;
    }
    let cfg = GroupedGemm {
        groups: experts,
        grouped: Grouped::M,
        m: max_len(&offsets),
        n,
        k,
        alpha: lay.alpha,
        beta: lay.beta,
        a: a_st,
        b: Strides::row_major(0),
        c: c_st,
    };
    let sh = lay.shift;
    let a = randn(seed + 1, a_copies * total * k, 1.0);
    let c0 = if lay.beta == 0.0 { vec![f32::NAN; total * n] } else { randn(seed + 2, total * n, 1.0) };
    let pad = |v: &[f32]| [vec![0.5f32; sh], v.to_vec()].concat();
    let st = &gpu.stream;
    let bd = st.clone_htod(&[vec![7u8; sh], blocks.clone()].concat()).unwrap();
    let (sd, od) = (st.clone_htod(&scales).unwrap(), st.clone_htod(&offsets).unwrap());
    let (ad, mut cd) = (st.clone_htod(&pad(&a)).unwrap(), st.clone_htod(&pad(&c0)).unwrap());
    let w = Mxfp4Weight { blocks: bd.slice(sh..sh + blocks.len()), scales: sd.as_view(), experts, rows, cols };
    let mut want = c0.clone();
    grouped_gemm_mxfp4w_ref(&cfg, &offsets, &a, &hw, transposed, &mut want);
    for path in mxfp4_paths(gpu) {
        st.memcpy_htod(&pad(&c0), &mut cd).unwrap();
        let mut c_view = cd.slice_mut(sh..sh + total * n);
        let a_view = ad.slice(sh..);
        grouped_gemm_f32_mxfp4w_on(
            gpu,
            &cfg,
            &od.as_view(),
            total,
            &a_view,
            &w,
            transposed,
            Mma::Split,
            path,
            &Mxfp4Epilogue::default(),
            &mut c_view,
        )
        .unwrap();
        let got_all = st.clone_dtoh(&cd).unwrap();
        assert!(got_all[..sh].iter().all(|&v| v == 0.5), "{path:?} {lay:?}: wrote before C");
        let what =
            format!("mxfp4 {path:?} [{experts}, {rows}, {cols}] transposed {transposed} sizes {sizes:?} {lay:?}");
        assert!(got_all[sh..].iter().all(|v| v.is_finite()), "{what}: NaN or inf in C");
        assert_close(&what, &got_all[sh..], &want, atol(k, 1.0, bmax) * lay.alpha.abs(), 1e-4);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn mxfp4_unaligned_and_strided_views_alpha_beta() {
    let gpu = gpu();
    for (i, lay) in [
        Mxfp4Layout { shift: 1, col_major: false, a_per_group: false, alpha: 1.0, beta: 0.0 },
        Mxfp4Layout { shift: 0, col_major: true, a_per_group: false, alpha: -0.5, beta: 1.0 },
        Mxfp4Layout { shift: 3, col_major: true, a_per_group: true, alpha: 2.0, beta: 0.0 },
        Mxfp4Layout { shift: 2, col_major: false, a_per_group: false, alpha: 1.5, beta: -0.25 },
        Mxfp4Layout { shift: 0, col_major: false, a_per_group: true, alpha: 1.0, beta: 0.0 },
    ]
    .into_iter()
    .enumerate()
    {
        for transposed in [false, true] {
            check_mxfp4_views(&gpu, 30 + i as u64, 70, 96, &[45, 0, 140], transposed, lay);
        }
    }
}

/// The narrow-shape kernels' tests, sharing this file's helpers.
#[path = "narrow_tests.rs"]
mod narrow;

proptest::proptest! {
    /// The grid the launcher sizes from the total row count covers every group's row tiles,
    /// however the rows split (the kernels stride over tiles past the grid, but a grid that
    /// covers them all runs each tile in a block of its own).
    #[test]
    fn the_row_tile_bound_covers_any_split(
        sizes in proptest::collection::vec(0usize..700, 1..200),
        tile_m in proptest::sample::select(vec![1usize, 32, 64, 128, 256]),
    ) {
        let total: usize = sizes.iter().sum();
        let cfg = GroupedGemm {
            groups: sizes.len(),
            grouped: Grouped::M,
            m: 0,
            n: 1,
            k: 1,
            alpha: 1.0,
            beta: 0.0,
            a: Strides::row_major(1),
            b: Strides::row_major(1),
            c: Strides::row_major(1),
        };
        let tiles: usize = sizes.iter().map(|s| s.div_ceil(tile_m)).sum();
        let bound = row_tiles(&cfg, total, tile_m);
        proptest::prop_assert!(tiles <= bound, "{tiles} tiles, bound {bound}");
        // And not much more: one partial tile per group at most.
        proptest::prop_assert!(bound <= total.div_ceil(tile_m) + sizes.len());
    }
}
