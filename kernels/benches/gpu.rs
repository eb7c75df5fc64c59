//! GPU benchmarks of the hot kernels at gpt-oss-20b shapes: the grouped expert GEMM with MXFP4
//! weights (forward and input gradient) against cuBLAS bf16 on the same FLOPs, the six LoRA products
//! on the experts against the H100's HBM bandwidth, the dense LoRA's low-rank products (one layer's
//! attention LoRA, t = 2048) against the cuBLAS f32 products they replace, and attention forward and
//! backward against the H100's dense bf16 ceiling. Each kernel is first checked against its CPU reference (on a slice of
//! the problem where the whole is slow on the CPU), then timed with CUDA events after warm-up
//! (median of 20).
//!
//! Run on the GPU machine: `cargo xtask gpu-bundle`, then `gpu-bundle/bench/gpu-*`. Without a GPU
//! it says so and exits with an error.

use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaSlice};
use half::bf16;
use oxtune_kernels::blas::Blas;
use oxtune_kernels::ops::attention::{attention_bwd_gpu, attention_fwd_gpu, visible_ranges, Heads};
use oxtune_kernels::ops::gemm::{
    grouped_gemm_f32, grouped_gemm_f32_kernel, grouped_gemm_f32_mxfp4w, grouped_gemm_f32_mxfp4w_lora,
    grouped_gemm_f32_mxfp4w_on, grouped_gemm_mxfp4w_ref, grouped_gemm_ref, Grouped, GroupedGemm, LoraDown, LoraUp,
    Mxfp4Epilogue, Mxfp4HostWeight, Mxfp4Lora, Mxfp4Path, Mxfp4Weight, Strides,
};
use oxtune_kernels::ops::lowrank::{
    down_ref, grad_ref, lowrank_down_gpu, lowrank_grad_gpu, lowrank_up_gpu, up_ref, DownPart, GradPart, Layout, UpPart,
};
use oxtune_kernels::ops::Mma;
use oxtune_kernels::testing::{assert_close, randn};
use oxtune_kernels::Gpu;

/// Dense bf16 tensor-core peak of an H100 SXM.
const PEAK: f64 = 989e12;
/// HBM3 bandwidth of an H100 SXM.
const HBM: f64 = 3.35e12;

/// Median milliseconds of `f` over 20 runs after 3 warm-ups, timed with CUDA events.
fn time_ms(gpu: &Gpu, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut v = vec![];
    for _ in 0..20 {
        let a = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let b = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        a.record(&gpu.stream).unwrap();
        f();
        b.record(&gpu.stream).unwrap();
        gpu.stream.synchronize().unwrap();
        v.push(a.elapsed_ms(&b).unwrap() as f64);
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(name: &str, ms: f64, flops: f64) {
    let tf = flops / (ms * 1e-3) / 1e12;
    println!("{name:<58} {ms:>9.3} ms {tf:>8.1} TFLOP/s {:>6.1}% of peak", 100.0 * tf * 1e12 / PEAK);
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    randn(seed, n, 1.0).iter().map(|x| ((x + 1.0) * 127.9) as u8).collect()
}

/// The expert GEMMs of one gpt-oss-20b layer at 2048 tokens (8192 routed slots, 32 experts).
fn experts(gpu: &Arc<Gpu>, blas: &Blas) {
    let s = &gpu.stream;
    let (e, h, i2, slots) = (32usize, 2880usize, 5760usize, 8192usize);
    let offsets: Vec<u32> = (0..=e).map(|g| (g * slots / e) as u32).collect();
    let off = s.clone_htod(&offsets).unwrap();
    // Block scales around 2^-8 keep values in a realistic range.
    let (blocks, scales) = (random_bytes(e * i2 * h / 2, 1), vec![119u8; e * i2 * h / 32]);
    let (bd, sd) = (s.clone_htod(&blocks).unwrap(), s.clone_htod(&scales).unwrap());
    let x = randn(2, slots * h, 1.0);
    let xd = s.clone_htod(&x).unwrap();
    let mut y: CudaSlice<f32> = s.alloc_zeros(slots * i2).unwrap();
    let st = |row, col| Strides { row, col, group: 0 };
    let fwd = GroupedGemm {
        groups: e,
        grouped: Grouped::M,
        m: slots / e,
        n: i2,
        k: h,
        alpha: 1.0,
        beta: 0.0,
        a: st(h, 1),
        b: st(0, 0),
        c: st(i2, 1),
    };
    let w = Mxfp4Weight { blocks: bd.as_view(), scales: sd.as_view(), experts: e, rows: i2, cols: h };
    // Correctness first, on the first two experts' rows.
    let check_slots = 2 * slots / e;
    grouped_gemm_f32_mxfp4w(
        gpu,
        &fwd,
        &off.as_view(),
        slots,
        &xd.as_view(),
        &w,
        false,
        Mma::Split,
        &Mxfp4Epilogue::default(),
        &mut y.as_view_mut(),
    )
    .unwrap();
    let got = s.clone_dtoh(&y.slice(0..check_slots * i2)).unwrap();
    let mut want = vec![0f32; check_slots * i2];
    let hw = Mxfp4HostWeight { blocks: &blocks, scales: &scales, experts: e, rows: i2, cols: h };
    let small = GroupedGemm { groups: 2, ..fwd };
    grouped_gemm_mxfp4w_ref(&small, &offsets[..3], &x[..check_slots * h], &hw, false, &mut want);
    assert_close("expert gate_up forward (2 experts)", &got, &want, 1e-3, 1e-4);
    let flops = 2.0 * (slots * h * i2) as f64;
    // Input gradient: dy [slots, 2I] · W_e → [slots, H].
    let dy = s.clone_htod(&randn(3, slots * i2, 1.0)).unwrap();
    let mut dx: CudaSlice<f32> = s.alloc_zeros(slots * h).unwrap();
    let bwd = GroupedGemm { n: h, k: i2, a: st(i2, 1), c: st(h, 1), ..fwd };
    grouped_gemm_f32_mxfp4w(
        gpu,
        &bwd,
        &off.as_view(),
        slots,
        &dy.as_view(),
        &w,
        true,
        Mma::Split,
        &Mxfp4Epilogue::default(),
        &mut dx.as_view_mut(),
    )
    .unwrap();
    let got = s.clone_dtoh(&dx.slice(0..check_slots * h)).unwrap();
    let mut want = vec![0f32; check_slots * h];
    let dy_host = s.clone_dtoh(&dy.slice(0..check_slots * i2)).unwrap();
    grouped_gemm_mxfp4w_ref(&GroupedGemm { groups: 2, ..bwd }, &offsets[..3], &dy_host, &hw, true, &mut want);
    assert_close("expert gate_up dX (2 experts)", &got, &want, 1e-3, 1e-4);
    // Both products, both ways of meeting the tensor cores (Mma::Bf16 rounds A to bf16 once; the
    // kernel tests check it against the product of the rounded A).
    let mut paths = vec![Mxfp4Path::MmaSync];
    if gpu.arch == "sm_90a" {
        paths.extend([Mxfp4Path::Wgmma, Mxfp4Path::WgmmaRs, Mxfp4Path::WgmmaWs]);
    }
    for path in paths {
        for mma in [Mma::Split, Mma::Bf16] {
            for (what, cfg, a, out, transposed) in [
                ("fwd (8192 x 2880 -> 5760)", &fwd, &xd, &mut y, false),
                ("dX (8192 x 5760 -> 2880)", &bwd, &dy, &mut dx, true),
            ] {
                let ms = time_ms(gpu, || {
                    grouped_gemm_f32_mxfp4w_on(
                        gpu,
                        cfg,
                        &off.as_view(),
                        slots,
                        &a.as_view(),
                        &w,
                        transposed,
                        mma,
                        path,
                        &Mxfp4Epilogue::default(),
                        &mut out.as_view_mut(),
                    )
                    .unwrap()
                });
                report(&format!("experts gate_up {what}, {path:?} {mma:?}"), ms, flops);
            }
        }
    }
    // cuBLAS bf16 on the same FLOPs (one dense GEMM, bf16 weights: 4x the bytes of MXFP4).
    let xb: CudaSlice<bf16> = s.clone_htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap();
    let wb: CudaSlice<bf16> =
        s.clone_htod(&randn(4, i2 * h, 0.05).iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap();
    let ms = time_ms(gpu, || {
        blas.matmul_bf16(slots, i2, h, &xb.as_view(), false, &wb.as_view(), true, &mut y.as_view_mut(), 1.0, 0.0)
            .unwrap()
    });
    report("cuBLAS bf16 dense, same shape (reference)", ms, flops);
    // With LoRA r 8 (the trainer's expert products): u (forward x A_eᵀ, input gradient s dy B_e)
    // by its own f32 product, then the product adding s u B_eᵀ (du A_e) in its store, against the
    // split of A computing u on the way (grouped_gemm_f32_mxfp4w_lora).
    let r = 8;
    let (la, lb) =
        (s.clone_htod(&randn(5, e * r * h, 0.02)).unwrap(), s.clone_htod(&randn(6, i2 * r * e, 0.02)).unwrap());
    let bias = s.clone_htod(&randn(7, e * i2, 0.1)).unwrap();
    let mut u: CudaSlice<f32> = s.alloc_zeros(slots * r).unwrap();
    let (a_st, b_st) = (Strides { row: h, col: 1, group: r * h }, Strides { row: e, col: r * e, group: 1 });
    for mma in [Mma::Split, Mma::Bf16] {
        for (what, cfg, a, out, transposed) in [("fwd", &fwd, &xd, &mut y, false), ("dX", &bwd, &dy, &mut dx, true)] {
            let (down, down_st, up, up_st) = if transposed { (&lb, b_st, &la, a_st) } else { (&la, a_st, &lb, b_st) };
            let bias = (!transposed).then(|| bias.as_view());
            let lora = Mxfp4Lora {
                down: LoraDown { factor: down.as_view(), strides: down_st, alpha: 2.0, rank: r },
                up: up.as_view(),
                up_strides: up_st,
                scaling: 2.0,
            };
            let down_cfg = GroupedGemm {
                n: r,
                alpha: 2.0,
                b: Strides { row: down_st.col, col: down_st.row, group: down_st.group },
                c: Strides { row: r, col: 1, group: 0 },
                ..*cfg
            };
            let ms_apart = time_ms(gpu, || {
                grouped_gemm_f32(
                    gpu,
                    &down_cfg,
                    &off.as_view(),
                    slots,
                    &a.as_view(),
                    &down.as_view(),
                    &mut u.as_view_mut(),
                )
                .unwrap();
                let epi = Mxfp4Epilogue {
                    bias: bias.as_ref().map(|b| b.slice(..)),
                    lora: Some(LoraUp { u: u.as_view(), b: up.as_view(), b_strides: up_st, rank: r, scaling: 2.0 }),
                };
                grouped_gemm_f32_mxfp4w(
                    gpu,
                    cfg,
                    &off.as_view(),
                    slots,
                    &a.as_view(),
                    &w,
                    transposed,
                    mma,
                    &epi,
                    &mut out.as_view_mut(),
                )
                .unwrap()
            });
            report(&format!("experts gate_up {what} + LoRA r 8, u apart, {mma:?}"), ms_apart, flops);
            let ms_fused = time_ms(gpu, || {
                grouped_gemm_f32_mxfp4w_lora(
                    gpu,
                    cfg,
                    &off.as_view(),
                    slots,
                    &a.as_view(),
                    &w,
                    transposed,
                    mma,
                    bias.as_ref().map(|b| b.slice(..)),
                    &lora,
                    &mut u.as_view_mut(),
                    &mut out.as_view_mut(),
                )
                .unwrap()
            });
            report(&format!("experts gate_up {what} + LoRA r 8, u in the split, {mma:?}"), ms_fused, flops);
        }
    }
}

/// LoRA use `u` on E experts (PEFT's layout: x [S, in], A [r·E, in] with expert e in rows e·r..,
/// B [out, r·E] with expert e in columns j·E + e), as the gemm tests' `Lora::use_cfg` spells them:
/// its name, configuration (`m`: the largest group) and the lengths of a, b and c.
fn lora_use(
    u: usize,
    e: usize,
    r: usize,
    inp: usize,
    out: usize,
    s: f32,
    m: usize,
    slots: usize,
) -> (&'static str, GroupedGemm, [usize; 3]) {
    let re = r * e;
    let rm = Strides::row_major;
    let st = |row, col, group| Strides { row, col, group };
    let g = |grouped, m, n, k, alpha, beta, a, b, c| GroupedGemm { groups: e, grouped, m, n, k, alpha, beta, a, b, c };
    let (gm, gk) = (Grouped::M, Grouped::K);
    match u {
        0 => (
            "(1) u = x A_eᵀ",
            g(gm, m, r, inp, 1.0, 0.0, rm(inp), st(1, inp, r * inp), rm(r)),
            [slots * inp, re * inp, slots * r],
        ),
        1 => (
            "(2) y += s u B_eᵀ",
            g(gm, m, out, r, s, 1.0, rm(r), st(e, re, 1), rm(out)),
            [slots * r, out * re, slots * out],
        ),
        2 => (
            "(3) du = s dy B_e",
            g(gm, m, r, out, s, 0.0, rm(out), st(re, e, 1), rm(r)),
            [slots * out, out * re, slots * r],
        ),
        3 => (
            "(4) dx += du A_e",
            g(gm, m, inp, r, 1.0, 1.0, rm(r), st(inp, 1, r * inp), rm(inp)),
            [slots * r, re * inp, slots * inp],
        ),
        4 => (
            "(5) dA_e += du_eᵀ x_e",
            g(gk, r, inp, 0, 1.0, 1.0, st(1, r, 0), rm(inp), st(inp, 1, r * inp)),
            [slots * r, slots * inp, re * inp],
        ),
        _ => (
            "(6) dB_e += s dy_eᵀ u_e",
            g(gk, out, r, 0, s, 1.0, st(1, out, 0), rm(r), st(re, e, 1)),
            [slots * out, slots * r, out * re],
        ),
    }
}

/// The six LoRA products on the experts of one gpt-oss-20b layer at 2048 tokens (8192 routed slots
/// over 32 experts, spread evenly, then unevenly as in a training step; r 8, in 2880), for gate_up
/// (out 5760) and down (out 2880): all bound by memory, so reported against HBM bandwidth (each
/// operand read once, C read too when beta ≠ 0).
fn lora_experts(gpu: &Arc<Gpu>) {
    let s = &gpu.stream;
    let (e, r, inp, slots, scale) = (32usize, 8usize, 2880usize, 8192usize, 2.0f32);
    let even: Vec<u32> = (0..=e).map(|g| (g * slots / e) as u32).collect();
    // Uneven routing, as random router weights give (bench-train's plans hold up to ~680 rows for
    // one expert where the mean is 256): group sizes ∝ exp(0.6 z), z standard normal.
    let w: Vec<f64> = randn(77, e, 1.0).iter().map(|&z| (0.6 * z as f64).exp()).collect();
    let sum: f64 = w.iter().sum();
    let mut sizes: Vec<usize> = w.iter().map(|x| (x / sum * slots as f64) as usize).collect();
    sizes[0] += slots - sizes.iter().sum::<usize>();
    let uneven: Vec<u32> = std::iter::once(0)
        .chain(sizes.iter().scan(0u32, |acc, &n| {
            *acc += n as u32;
            Some(*acc)
        }))
        .collect();
    for (routing, offsets) in [("even", even), ("uneven", uneven)] {
        let largest = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let off = s.clone_htod(&offsets).unwrap();
        for out in [5760usize, 2880] {
            let mut all_ms = 0.0;
            for u in 0..6 {
                let (name, cfg, [la, lb, lc]) = lora_use(u, e, r, inp, out, scale, largest, slots);
                let seed = 20 + 3 * u as u64;
                let (a, b, c0) = (randn(seed, la, 1.0), randn(seed + 1, lb, 1.0), randn(seed + 2, lc, 1.0));
                let (ad, bd) = (s.clone_htod(&a).unwrap(), s.clone_htod(&b).unwrap());
                let mut cd = s.clone_htod(&c0).unwrap();
                let run = |cd: &mut CudaSlice<f32>| {
                    grouped_gemm_f32(
                        gpu,
                        &cfg,
                        &off.as_view(),
                        slots,
                        &ad.as_view(),
                        &bd.as_view(),
                        &mut cd.as_view_mut(),
                    )
                    .unwrap()
                };
                run(&mut cd);
                let got = s.clone_dtoh(&cd).unwrap();
                let mut want = c0;
                grouped_gemm_ref(&cfg, &offsets, &a, &b, &mut want);
                // The gemm tests' tolerance: f32 FMA sums of `depth` products of values in [-1, 1).
                let depth = if cfg.grouped == Grouped::K { largest } else { cfg.k };
                let atol = (1e-5 * (depth as f32).sqrt() + 1e-6) * cfg.alpha.abs();
                assert_close(&format!("LoRA {name}, out {out}"), &got, &want, atol, 1e-4);
                let ms = time_ms(gpu, || run(&mut cd));
                all_ms += ms;
                let bytes = 4.0 * (la + lb + lc * (1 + (cfg.beta != 0.0) as usize)) as f64;
                let flops =
                    2.0 * (if cfg.grouped == Grouped::K { cfg.m * slots } else { slots * cfg.k } * cfg.n) as f64;
                let gbs = bytes / (ms * 1e-3) / 1e9;
                println!(
                "LoRA experts {routing:<6} out {out} {name:<24} {:<30} {ms:>7.3} ms {gbs:>6.0} GB/s {:>5.1}% of HBM \
                 {:>6.2} TFLOP/s",
                grouped_gemm_f32_kernel(&cfg).to_string(),
                100.0 * gbs * 1e9 / HBM,
                flops / (ms * 1e-3) / 1e12
            );
            }
            println!("LoRA experts {routing} (largest group {largest}) out {out}: the six uses take {all_ms:.3} ms");
        }
    }
}

/// One layer's attention LoRA at rank 8 over t = 2048 tokens (hidden 2880, q 4096, k and v 512):
/// each low-rank product against the cuBLAS f32 products it replaces (the engine's earlier path),
/// after a check of each against its CPU reference.
fn lowrank(gpu: &Arc<Gpu>, blas: &Blas) {
    let s = &gpu.stream;
    let (t, h, q, kv, r, sc) = (2048usize, 2880usize, 4096usize, 512usize, 8usize, 2.0f32);
    let up = |v: &[f32]| s.clone_htod(v).unwrap();
    let x = randn(1, t * h, 1.0);
    let a: Vec<Vec<f32>> = (0..3).map(|i| randn(2 + i, r * h, 0.05)).collect();
    let (xd, ad) = (up(&x), a.iter().map(|v| up(v)).collect::<Vec<_>>());
    let mut u: Vec<CudaSlice<f32>> = (0..3).map(|_| s.alloc_zeros(t * r).unwrap()).collect();
    let report_pair = |what: &str, ours: f64, theirs: f64, bytes: f64| {
        println!(
            "lowrank {what:<44} {ours:>7.4} ms ({:>5.0} GB/s) vs cuBLAS f32 {theirs:>7.4} ms: {:.2}x",
            bytes / (ours * 1e-3) / 1e9,
            theirs / ours
        );
    };
    // u = x Aᵀ for q, k and v: one pass over x against three products.
    let run_down = |u: &mut [CudaSlice<f32>]| {
        let mut parts: Vec<DownPart> = ad
            .iter()
            .zip(u.iter_mut())
            .map(|(a, u)| DownPart {
                factor: a.as_view(),
                rows: u.as_view_mut(),
                layout: Layout::rows_major(r, h, 1.0),
            })
            .collect();
        lowrank_down_gpu(gpu, &xd.as_view(), t, h, &mut parts).unwrap();
    };
    run_down(&mut u);
    let mut want = vec![0f32; t * r];
    down_ref(&x, t, h, &a[2], &Layout::rows_major(r, h, 1.0), &mut want);
    assert_close("lowrank u_v = x A_vᵀ", &s.clone_dtoh(&u[2]).unwrap(), &want, 1e-4, 1e-4);
    let ours = time_ms(gpu, || run_down(&mut u));
    let theirs = time_ms(gpu, || {
        for (a, u) in ad.iter().zip(u.iter_mut()) {
            blas.matmul_f32(t, r, h, &xd.as_view(), false, &a.as_view(), true, &mut u.as_view_mut(), 1.0, 0.0).unwrap();
        }
    });
    report_pair("u = x Aᵀ, q k v [2048, 2880] x 3 x 8", ours, theirs, 4.0 * (t * h) as f64);
    // y_q = b + s u Bᵀ (assigned; the projection adds x Wᵀ after): against the bias as a rank-1
    // product and the LoRA product.
    let (b, bias) = (randn(10, q * r, 0.05), randn(11, q, 1.0));
    let (bd, biasd, ones) = (up(&b), up(&bias), up(&vec![1.0f32; t]));
    let mut y: CudaSlice<f32> = s.alloc_zeros(t * q).unwrap();
    let run_up = |y: &mut CudaSlice<f32>| {
        let parts = [UpPart { factor: bd.as_view(), rows: u[0].as_view(), layout: Layout::cols_major(r, sc) }];
        lowrank_up_gpu(gpu, &mut y.as_view_mut(), t, q, false, Some(&biasd.as_view()), &parts).unwrap();
    };
    run_up(&mut y);
    let u0 = s.clone_dtoh(&u[0]).unwrap();
    let mut want = vec![0f32; t * q];
    up_ref(&mut want, t, q, false, Some(&bias), &[(&b, &u0, Layout::cols_major(r, sc))]);
    assert_close("lowrank y_q = b + s u Bᵀ", &s.clone_dtoh(&y).unwrap(), &want, 1e-4, 1e-4);
    let ours = time_ms(gpu, || run_up(&mut y));
    let theirs = time_ms(gpu, || {
        let mut yv = y.as_view_mut();
        blas.matmul_f32(t, q, 1, &ones.as_view(), false, &biasd.as_view(), false, &mut yv, 1.0, 0.0).unwrap();
        blas.matmul_f32(t, q, r, &u[0].as_view(), false, &bd.as_view(), true, &mut yv, sc, 1.0).unwrap();
    });
    report_pair("y_q = b + s u Bᵀ [2048, 4096]", ours, theirs, 4.0 * (t * q) as f64);
    // The output side, dB += s dyᵀ u and du = s dy B for dy [t, n], ours and cuBLAS's.
    let out_ours = |dy: &CudaSlice<f32>,
                    n,
                    b: &CudaSlice<f32>,
                    u: &CudaSlice<f32>,
                    gb: &mut CudaSlice<f32>,
                    du: &mut CudaSlice<f32>| {
        let l = Layout::cols_major(r, sc);
        let mut grad = [GradPart { factor: gb.as_view_mut(), rows: u.as_view(), layout: l }];
        lowrank_grad_gpu(gpu, &dy.as_view(), t, n, &mut grad).unwrap();
        let mut down = [DownPart { factor: b.as_view(), rows: du.as_view_mut(), layout: l }];
        lowrank_down_gpu(gpu, &dy.as_view(), t, n, &mut down).unwrap();
    };
    let out_cublas = |dy: &CudaSlice<f32>,
                      n,
                      b: &CudaSlice<f32>,
                      u: &CudaSlice<f32>,
                      gb: &mut CudaSlice<f32>,
                      du: &mut CudaSlice<f32>| {
        blas.matmul_f32(n, r, t, &dy.as_view(), true, &u.as_view(), false, &mut gb.as_view_mut(), sc, 1.0).unwrap();
        blas.matmul_f32(t, r, n, &dy.as_view(), false, &b.as_view(), false, &mut du.as_view_mut(), sc, 0.0).unwrap();
    };
    // q: dy_q [2048, 4096], checked against the reference first.
    let dy = randn(12, t * q, 1.0);
    let dyd = up(&dy);
    let mut gb: CudaSlice<f32> = s.alloc_zeros(q * r).unwrap();
    let mut du: CudaSlice<f32> = s.alloc_zeros(t * r).unwrap();
    out_ours(&dyd, q, &bd, &u[0], &mut gb, &mut du);
    let mut want_gb = vec![0f32; q * r];
    grad_ref(&dy, t, q, &u0, &Layout::cols_major(r, sc), &mut want_gb);
    assert_close("lowrank dB_q", &s.clone_dtoh(&gb).unwrap(), &want_gb, 1e-3, 1e-4);
    let ours = time_ms(gpu, || out_ours(&dyd, q, &bd, &u[0], &mut gb, &mut du));
    let theirs = time_ms(gpu, || out_cublas(&dyd, q, &bd, &u[0], &mut gb, &mut du));
    report_pair("dB_q and du_q from dy_q [2048, 4096]", ours, theirs, 8.0 * (t * q) as f64);
    // k: dy_k [2048, 512], few columns: the reduction split over row ranges.
    let dyk = up(&randn(13, t * kv, 1.0));
    let bk = up(&randn(14, kv * r, 0.05));
    let mut gbk: CudaSlice<f32> = s.alloc_zeros(kv * r).unwrap();
    let ours = time_ms(gpu, || out_ours(&dyk, kv, &bk, &u[1], &mut gbk, &mut du));
    let theirs = time_ms(gpu, || out_cublas(&dyk, kv, &bk, &u[1], &mut gbk, &mut du));
    report_pair("dB_k and du_k from dy_k [2048, 512]", ours, theirs, 8.0 * (t * kv) as f64);
    // The input side of q, k and v: dA += duᵀ x (one pass over x) and dx += Σ du A (one over dx).
    let dus: Vec<CudaSlice<f32>> = (0..3).map(|i| up(&randn(20 + i, t * r, 1.0))).collect();
    let mut ga: Vec<CudaSlice<f32>> = (0..3).map(|_| s.alloc_zeros(r * h).unwrap()).collect();
    let mut dx: CudaSlice<f32> = s.alloc_zeros(t * h).unwrap();
    let run_in = |ga: &mut [CudaSlice<f32>], dx: &mut CudaSlice<f32>| {
        let l = Layout::rows_major(r, h, 1.0);
        let mut grads: Vec<GradPart> = ga
            .iter_mut()
            .zip(&dus)
            .map(|(g, du)| GradPart { factor: g.as_view_mut(), rows: du.as_view(), layout: l })
            .collect();
        lowrank_grad_gpu(gpu, &xd.as_view(), t, h, &mut grads).unwrap();
        let ups: Vec<UpPart> =
            ad.iter().zip(&dus).map(|(a, du)| UpPart { factor: a.as_view(), rows: du.as_view(), layout: l }).collect();
        lowrank_up_gpu(gpu, &mut dx.as_view_mut(), t, h, true, None, &ups).unwrap();
    };
    run_in(&mut ga, &mut dx);
    let du2 = s.clone_dtoh(&dus[2]).unwrap();
    let mut want_ga = vec![0f32; r * h];
    grad_ref(&x, t, h, &du2, &Layout::rows_major(r, h, 1.0), &mut want_ga);
    assert_close("lowrank dA_v", &s.clone_dtoh(&ga[2]).unwrap(), &want_ga, 1e-3, 1e-4);
    let ours = time_ms(gpu, || run_in(&mut ga, &mut dx));
    let theirs = time_ms(gpu, || {
        for ((a, g), du) in ad.iter().zip(ga.iter_mut()).zip(&dus) {
            blas.matmul_f32(r, h, t, &du.as_view(), true, &xd.as_view(), false, &mut g.as_view_mut(), 1.0, 1.0)
                .unwrap();
            blas.matmul_f32(t, h, r, &du.as_view(), false, &a.as_view(), false, &mut dx.as_view_mut(), 1.0, 1.0)
                .unwrap();
        }
    });
    report_pair("dA and dx of q, k, v over x [2048, 2880]", ours, theirs, 12.0 * (t * h) as f64);
}

/// Attention of gpt-oss-20b (64 query heads, 8 KV heads, d 64) over one sequence.
fn attention(gpu: &Arc<Gpu>, t: usize, window: Option<usize>, mma: Mma) {
    let s = &gpu.stream;
    let heads = Heads { nq: 64, nkv: 8, d: 64 };
    let (qw, kw) = (heads.nq * heads.d, heads.nkv * heads.d);
    let pos: Vec<u32> = (0..t as u32).collect();
    let r = visible_ranges(&pos, &vec![0; t], &[0..t], window).unwrap();
    let up = |v: &[u32]| s.clone_htod(v).unwrap();
    let (klo, khi, qlo, qhi) = (up(&r.klo), up(&r.khi), up(&r.qlo), up(&r.qhi));
    let q = s.clone_htod(&randn(5, t * qw, 1.0)).unwrap();
    let k = s.clone_htod(&randn(6, t * kw, 1.0)).unwrap();
    let v = s.clone_htod(&randn(7, t * kw, 1.0)).unwrap();
    let sinks = s.clone_htod(&randn(8, heads.nq, 1.0)).unwrap();
    let dout = s.clone_htod(&randn(9, t * qw, 1.0)).unwrap();
    let z = |n: usize| -> CudaSlice<f32> { s.alloc_zeros(n).unwrap() };
    let (mut o, mut lse, mut delta) = (z(t * qw), z(t * heads.nq), z(t * heads.nq));
    let (mut dq, mut dk, mut dv, mut ds) = (z(t * qw), z(t * kw), z(t * kw), z(heads.nq));
    let scale = 0.125;
    let fwd = |o: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>| {
        let (q, k, v, sk) = (q.as_view(), k.as_view(), v.as_view(), sinks.as_view());
        attention_fwd_gpu(
            gpu,
            &q,
            &k,
            &v,
            &sk,
            &klo.as_view(),
            &khi.as_view(),
            heads,
            scale,
            mma,
            &mut o.as_view_mut(),
            &mut lse.as_view_mut(),
        )
        .unwrap()
    };
    fwd(&mut o, &mut lse);
    assert!(s.clone_dtoh(&o).unwrap().iter().all(|x| x.is_finite()), "attention output is finite");
    let keys: f64 = r.khi.iter().zip(&r.klo).map(|(h, l)| (h - l) as f64).sum();
    let flops = 4.0 * (heads.nq * heads.d) as f64 * keys;
    let name = |what: &str| {
        format!("attention {what}, T {t}, {}, {mma:?}", window.map_or("full".into(), |w| format!("window {w}")))
    };
    let ms = time_ms(gpu, || fwd(&mut o, &mut lse));
    report(&name("fwd"), ms, flops);
    let ms = time_ms(gpu, || {
        attention_bwd_gpu(
            gpu,
            &q.as_view(),
            &k.as_view(),
            &v.as_view(),
            &sinks.as_view(),
            &o.as_view(),
            &lse.as_view(),
            &dout.as_view(),
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
        .unwrap()
    });
    report(&name("bwd"), ms, 2.0 * flops);
}

fn main() {
    // `cargo bench` passes `--bench`; a word (experts, lora, lowrank, attention) runs only those
    // sections.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let run = |section: &str| only.is_empty() || only.iter().any(|w| section.contains(w.as_str()));
    let gpu = match Gpu::new(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("GPU benchmarks need an NVIDIA GPU (run them on the GPU machine: cargo xtask gpu-bundle): {e}");
            std::process::exit(1);
        }
    };
    println!("{} ({}); ceiling {:.0} TFLOP/s dense bf16", gpu.ctx.name().unwrap_or_default(), gpu.arch, PEAK / 1e12);
    let blas = Blas::new(&gpu).unwrap();
    if run("experts") {
        experts(&gpu, &blas);
    }
    if run("lora") {
        lora_experts(&gpu);
    }
    if run("lowrank") {
        lowrank(&gpu, &blas);
    }
    if run("attention") {
        for mma in [Mma::Split, Mma::Bf16] {
            for (t, w) in [(2048, Some(128)), (2048, None), (8192, None)] {
                attention(&gpu, t, w, mma);
            }
        }
    }
}
