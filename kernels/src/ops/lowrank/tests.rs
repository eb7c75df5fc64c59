use super::*;
use crate::testing::{assert_close, randn};
use half::bf16;

#[test]
fn references_match_hand_computed_products() {
    // X = [[1, 2, 3], [4, 5, 6]], A = [[1, 0, -1], [2, 1, 0]] (rank 2): X Aᵀ = [[-2, 4], [-2, 13]],
    // times alpha 0.5.
    let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let a = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
    let mut u = [0.0f32; 4];
    down_ref(&x, 2, 3, &a, &Layout::rows_major(2, 3, 0.5), &mut u);
    assert_eq!(u, [-1.0, 2.0, -1.0, 6.5]);
    // B [3, 2] read transposed (PEFT's lora_B): y = bias + 2 · u Bᵀ, B = [[1, 0], [0, 1], [1, 1]],
    // u = [[1, 2], [3, 4]], bias [10, 20, 30]: u Bᵀ = [[1, 2, 3], [3, 4, 7]].
    let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let uu = [1.0, 2.0, 3.0, 4.0];
    let mut y = [100.0f32; 6];
    up_ref(&mut y, 2, 3, false, Some(&[10.0, 20.0, 30.0]), &[(&b, &uu, Layout::cols_major(2, 2.0))]);
    assert_eq!(y, [12.0, 24.0, 36.0, 16.0, 28.0, 44.0]);
    up_ref(&mut y, 2, 3, true, None, &[(&b, &uu, Layout::cols_major(2, 1.0))]);
    assert_eq!(y, [13.0, 26.0, 39.0, 19.0, 32.0, 51.0]);
    // dB [3, 2] += 0.5 · dyᵀ u with dy = [[1, 0, 2], [0, 1, 1]]: dyᵀ u = [[1, 2], [3, 4], [5, 8]].
    let dy = [1.0, 0.0, 2.0, 0.0, 1.0, 1.0];
    let mut gb = [1.0f32; 6];
    grad_ref(&dy, 2, 3, &uu, &Layout::cols_major(2, 0.5), &mut gb);
    assert_eq!(gb, [1.5, 2.0, 2.5, 3.0, 3.5, 5.0]);
}

#[test]
fn launches_cut_ranks_and_pack_parts_in_order() {
    let l8 = Layout::rows_major(8, 100, 1.0);
    // q, k, v of rank 8: one launch of 24 columns.
    let plan = launches(&[(1000, 2000, l8), (3000, 4000, l8), (5000, 6000, l8)]);
    assert_eq!(plan.len(), 1);
    assert_eq!((plan[0].0.n, plan[0].1), (3, 24));
    assert_eq!((plan[0].0.p[2].factor, plan[0].0.p[2].rows), (5000, 6000));
    // Four parts: three, then one (at most three parts a launch).
    let plan = launches(&[(0, 0, l8), (0, 0, l8), (0, 0, l8), (0, 0, l8)]);
    assert_eq!(plan.iter().map(|(p, b)| (p.n, *b)).collect::<Vec<_>>(), [(3, 24), (1, 8)]);
    // Rank 40: columns 0..32, then 32..40 with both addresses moved by 32 columns.
    let l40 = Layout { rank: 40, sj: 100, sc: 1, ld: 40, alpha: 2.0 };
    let plan = launches(&[(1 << 20, 1 << 24, l40)]);
    assert_eq!(plan.iter().map(|(p, b)| (p.n, p.p[0].rank, *b)).collect::<Vec<_>>(), [(1, 32, 32), (1, 8, 8)]);
    assert_eq!(plan[1].0.p[0].factor, (1 << 20) + 4 * 32 * 100);
    assert_eq!(plan[1].0.p[0].rows, (1 << 24) + 4 * 32);
    assert_eq!((plan[1].0.p[0].ld, plan[1].0.p[0].alpha), (40, 2.0));
    // 16 + 20 > 32: two launches, buckets 16 and 24.
    let plan = launches(&[(0, 0, Layout::rows_major(16, 9, 1.0)), (0, 0, Layout::rows_major(20, 9, 1.0))]);
    assert_eq!(plan.iter().map(|(p, b)| (p.n, *b)).collect::<Vec<_>>(), [(1, 16), (1, 24)]);
    assert!(launches(&[]).is_empty());
}

#[test]
fn split_reductions_tile_their_dimension_and_fit_the_reported_scratch() {
    for t in [1usize, 77, 2048, 9000, 65536] {
        for k in [1usize, 64, 90, 512, 2880, 4096] {
            let (ranges, ks, down_floats) = down_ranges(t, k);
            // Ranges of whole DOWN_KC multiples that cover k, none empty.
            assert!(ks % DOWN_KC == 0 && ranges * ks >= k && (ranges - 1) * ks < k, "down t {t} k {k}");
            let (gr, rs, grad_floats) = grad_ranges(t, k);
            assert!(gr * rs >= t && (gr - 1) * rs < t, "grad t {t} n {k}");
            // What the launchers take from the scratch (u16) is within the reported bound.
            let down_ws = if ranges > 1 { 2 * ranges * t * WS_COLS } else { 0 };
            let grad_ws = if gr > 1 { 2 * gr * WS_COLS * k } else { 0 };
            assert_eq!((2 * down_floats, 2 * grad_floats), (down_ws, grad_ws), "launch scratch t {t} k {k}");
            assert!(scratch_elems(t, k, k) >= down_ws.max(grad_ws), "scratch t {t} k {k}");
        }
    }
    // gpt-oss at 2048 tokens (16 row blocks): q, k, v's u over the hidden size in about the blocks
    // aimed for; k and v's du over 512 in 8 ranges of 64.
    let (ranges, _, _) = down_ranges(2048, 2880);
    assert!(16 * ranges >= DOWN_TARGET_BLOCKS / 2 && 16 * ranges <= DOWN_TARGET_BLOCKS + 16, "{ranges}");
    assert_eq!(down_ranges(2048, 512), (8, 64, 8 * 2048 * WS_COLS));
    assert_eq!(scratch_elems(0, 2880, 2880), 0);
    // The bound an engine reserves covers every shorter batch, which can need more than the
    // longest: 2,944 rows take more than 3,072 over k = 2,880.
    assert!(scratch_elems(2944, 2880, 0) > scratch_elems(3072, 2880, 0));
    for (t, w) in [(3072usize, 2880usize), (4096, 512), (9000, 4096)] {
        let bound = scratch_elems_up_to(t, w, w);
        assert!((1..=t).all(|r| scratch_elems(r, w, w) <= bound), "t {t} w {w}");
        assert!(bound >= scratch_elems(t, w, w));
    }
}

#[test]
fn layouts_that_reach_past_their_buffers_are_errors_naming_the_part() {
    let l = Layout::rows_major(8, 64, 1.0);
    check_part("op", 0, &l, 8 * 64, 10 * 8, 10, 64).unwrap();
    let e = check_part("op", 2, &l, 8 * 64 - 1, 10 * 8, 10, 64).unwrap_err().to_string();
    assert!(e.contains("part 2") && e.contains("factor") && e.contains("511"), "{e}");
    let e = check_part("op", 1, &l, 8 * 64, 10 * 8 - 1, 10, 64).unwrap_err().to_string();
    assert!(e.contains("part 1") && e.contains("10 rows"), "{e}");
    let e = check_part("op", 0, &Layout { ld: 4, ..l }, 1 << 20, 1 << 20, 10, 64).unwrap_err().to_string();
    assert!(e.contains("row stride"), "{e}");
    let e = check_part("op", 0, &Layout { rank: 0, ..l }, 1 << 20, 1 << 20, 10, 64).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");
    // A written factor needs distinct elements: A [r, in] and B [out, r] have them; overlapping
    // strides (a zero stride, or rows that interleave) do not.
    assert!(distinct(&Layout::rows_major(8, 2880, 1.0), 2880));
    assert!(distinct(&Layout::cols_major(8, 1.0), 4096));
    assert!(distinct(&Layout { rank: 1, sj: 0, sc: 1, ld: 1, alpha: 1.0 }, 10));
    assert!(!distinct(&Layout { rank: 2, sj: 1, sc: 1, ld: 2, alpha: 1.0 }, 10));
    assert!(!distinct(&Layout { rank: 2, sj: 0, sc: 1, ld: 2, alpha: 1.0 }, 10));
    assert!(!distinct(&Layout { rank: 1, sj: 5, sc: 0, ld: 1, alpha: 1.0 }, 10));
    assert!(!distinct(&Layout { rank: 8, sj: 4, sc: 1, ld: 8, alpha: 1.0 }, 10));
    // B [n, r] read transposed: its last element is (r - 1) + (n - 1) r.
    check_part("op", 0, &Layout::cols_major(8, 1.0), 4096 * 8, 10 * 8, 10, 4096).unwrap();
    assert!(check_part("op", 0, &Layout::cols_major(8, 1.0), 4096 * 8 - 1, 10 * 8, 10, 4096).is_err());
}

/// f32 sums of `len` products of values up to 1 against f64: STYLE's fp32 rtol and an atol that
/// grows with the sum's length.
fn tol(len: usize) -> (f32, f32) {
    (2e-6 * (len as f32).sqrt().max(1.0), 1e-5)
}

/// The down-projection parts of factors `fd` writing row-wise buffers `rd`, one per layout.
fn down_parts<'a>(
    fd: &'a [cudarc::driver::CudaSlice<f32>],
    rd: &'a mut [cudarc::driver::CudaSlice<f32>],
    layouts: &[Layout],
) -> Vec<DownPart<'a>> {
    fd.iter()
        .zip(rd.iter_mut())
        .zip(layouts)
        .map(|((f, r), l)| DownPart { factor: f.as_view(), rows: r.as_view_mut(), layout: *l })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn down_matches_reference() {
    let gpu = Gpu::new(0).expect("a GPU");
    let s = &gpu.stream;
    // (rows, k, layouts): q/k/v's u over gpt-oss's hidden size (k not a multiple of the 128-wide
    // chunk), du = s dy B over B [512, 8] read transposed, odd ranks, a rank split over launches
    // (40 = 32 + 8) with a row stride past its rank, one row.
    let cases: Vec<(usize, usize, Vec<Layout>)> = vec![
        (300, 2880, vec![Layout::rows_major(8, 2880, 1.0); 3]),
        (77, 512, vec![Layout::cols_major(8, 0.25)]),
        (33, 130, vec![Layout::rows_major(3, 130, -1.5), Layout::rows_major(5, 130, 2.0), Layout::cols_major(1, 1.0)]),
        (45, 96, vec![Layout { rank: 40, sj: 96, sc: 1, ld: 43, alpha: 0.5 }, Layout::rows_major(8, 96, 1.0)]),
        (1, 64, vec![Layout::rows_major(2, 64, 1.0)]),
        // Many row blocks and k within one range: no split reduction.
        (9000, 64, vec![Layout::rows_major(8, 64, 1.0)]),
        // Fewer row blocks over a narrow k (k and v's du): split into k ranges of 64.
        (2048, 512, vec![Layout::cols_major(8, 2.0)]),
    ];
    for (case, (t, k, layouts)) in cases.into_iter().enumerate() {
        let seed = 10 * case as u64;
        let x = randn(seed, t * k, 1.0);
        let factors: Vec<Vec<f32>> = layouts
            .iter()
            .enumerate()
            .map(|(i, l)| randn(seed + 1 + i as u64, (l.rank - 1) * l.sj + (k - 1) * l.sc + 1, 1.0))
            .collect();
        let xd = s.clone_htod(&x).unwrap();
        let fd: Vec<_> = factors.iter().map(|f| s.clone_htod(f).unwrap()).collect();
        // Row-wise outputs prefilled with a marker: columns past the rank (ld > rank) must keep it.
        let mut rd: Vec<_> = layouts.iter().map(|l| s.clone_htod(&vec![7.0f32; t * l.ld]).unwrap()).collect();
        {
            let mut parts = down_parts(&fd, &mut rd, &layouts);
            lowrank_down_gpu(&gpu, &xd.as_view(), t, k, &mut parts).unwrap();
        }
        for (i, l) in layouts.iter().enumerate() {
            let mut want = vec![7.0f32; t * l.ld];
            down_ref(&x, t, k, &factors[i], l, &mut want);
            let (atol, rtol) = tol(k);
            assert_close(
                &format!("down case {case} part {i} [{t}, {k}] rank {}", l.rank),
                &s.clone_dtoh(&rd[i]).unwrap(),
                &want,
                atol,
                rtol,
            );
        }
        // The same with X written in bf16 on the way (hi alone, then hi and lo): the same row-wise
        // bits, and X's bf16 split as the CPU rounds it (round to nearest even; lo the rounded
        // remainder). Both bf16 buffers start as a marker that every element must overwrite.
        let got: Vec<Vec<f32>> = rd.iter().map(|r| s.clone_dtoh(r).unwrap()).collect();
        let want_hi: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let want_lo: Vec<bf16> = x.iter().zip(&want_hi).map(|(&v, h)| bf16::from_f32(v - h.to_f32())).collect();
        for with_lo in [false, true] {
            let mut hi = s.clone_htod(&vec![bf16::from_f32(-3.0); t * k]).unwrap();
            let mut lo = s.clone_htod(&vec![bf16::from_f32(-3.0); t * k]).unwrap();
            let mut rd2: Vec<_> = layouts.iter().map(|l| s.clone_htod(&vec![7.0f32; t * l.ld]).unwrap()).collect();
            {
                let mut parts = down_parts(&fd, &mut rd2, &layouts);
                let mut lo_view = lo.as_view_mut();
                let lo_arg = if with_lo { Some(&mut lo_view) } else { None };
                lowrank_down_cast_gpu(&gpu, &xd.as_view(), t, k, &mut parts, &mut hi.as_view_mut(), lo_arg).unwrap();
            }
            let what = format!("down case {case} [{t}, {k}] with X in bf16 (lo: {with_lo})");
            for (i, r) in rd2.iter().enumerate() {
                assert!(s.clone_dtoh(r).unwrap() == got[i], "{what}: part {i} differs from lowrank_down_gpu's");
            }
            assert!(s.clone_dtoh(&hi).unwrap() == want_hi, "{what}: hi");
            let lo_got = s.clone_dtoh(&lo).unwrap();
            if with_lo {
                assert!(lo_got == want_lo, "{what}: lo");
            } else {
                assert!(lo_got.iter().all(|v| v.to_f32() == -3.0), "{what}: lo written without being asked for");
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn up_matches_reference() {
    let gpu = Gpu::new(0).expect("a GPU");
    let s = &gpu.stream;
    // (rows, n, accumulate, bias, layouts): q's y = b + s u Bᵀ (B [4096, 8]), dx += du_q A_q + du_k
    // A_k + du_v A_v over the hidden size, the bias alone, a split rank with odd columns.
    let cases: Vec<(usize, usize, bool, bool, Vec<Layout>)> = vec![
        (130, 4096, false, true, vec![Layout::cols_major(8, 2.0)]),
        (70, 2880, true, false, vec![Layout::rows_major(8, 2880, 1.0); 3]),
        (65, 300, true, true, vec![]),
        (
            3,
            131,
            false,
            false,
            vec![Layout { rank: 40, sj: 1, sc: 41, ld: 44, alpha: -0.5 }, Layout::cols_major(3, 1.0)],
        ),
    ];
    for (case, (t, n, accumulate, with_bias, layouts)) in cases.into_iter().enumerate() {
        let seed = 100 + 10 * case as u64;
        let y0 = randn(seed, t * n, 1.0);
        let bias = randn(seed + 1, n, 1.0);
        let factors: Vec<Vec<f32>> = layouts
            .iter()
            .enumerate()
            .map(|(i, l)| randn(seed + 2 + i as u64, (l.rank - 1) * l.sj + (n - 1) * l.sc + 1, 1.0))
            .collect();
        let rows: Vec<Vec<f32>> =
            layouts.iter().enumerate().map(|(i, l)| randn(seed + 5 + i as u64, t * l.ld, 1.0)).collect();
        let mut yd = s.clone_htod(&y0).unwrap();
        let bd = s.clone_htod(&bias).unwrap();
        let fd: Vec<_> = factors.iter().map(|f| s.clone_htod(f).unwrap()).collect();
        let rd: Vec<_> = rows.iter().map(|r| s.clone_htod(r).unwrap()).collect();
        let parts: Vec<UpPart> = fd
            .iter()
            .zip(&rd)
            .zip(&layouts)
            .map(|((f, r), l)| UpPart { factor: f.as_view(), rows: r.as_view(), layout: *l })
            .collect();
        let bv = bd.as_view();
        lowrank_up_gpu(&gpu, &mut yd.as_view_mut(), t, n, accumulate, with_bias.then_some(&bv), &parts).unwrap();
        let mut want = y0.clone();
        let refs: Vec<(&[f32], &[f32], Layout)> =
            factors.iter().zip(&rows).zip(&layouts).map(|((f, r), l)| (&f[..], &r[..], *l)).collect();
        up_ref(&mut want, t, n, accumulate, with_bias.then_some(&bias[..]), &refs);
        let (atol, rtol) = tol(layouts.iter().map(|l| l.rank).sum());
        assert_close(&format!("up case {case} [{t}, {n}]"), &s.clone_dtoh(&yd).unwrap(), &want, atol, rtol);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn grad_matches_reference_and_repeats_bit_for_bit() {
    let gpu = Gpu::new(0).expect("a GPU");
    let s = &gpu.stream;
    // (rows, n, layouts): dB_q += s dy_qᵀ u_q (B [4096, 8]), dA of q, k, v over the hidden size,
    // a split rank with a row stride past it and odd sizes, 2,500 rows (many row chunks).
    let cases: Vec<(usize, usize, Vec<Layout>)> = vec![
        (300, 4096, vec![Layout::cols_major(8, 0.25)]),
        (129, 2880, vec![Layout::rows_major(8, 2880, 1.0); 3]),
        (50, 70, vec![Layout { rank: 40, sj: 70, sc: 1, ld: 45, alpha: 1.5 }, Layout::cols_major(2, -1.0)]),
        (2500, 512, vec![Layout::cols_major(8, 1.0)]),
    ];
    for (case, (t, n, layouts)) in cases.into_iter().enumerate() {
        let seed = 200 + 10 * case as u64;
        let q = randn(seed, t * n, 1.0);
        let init: Vec<Vec<f32>> = layouts
            .iter()
            .enumerate()
            .map(|(i, l)| randn(seed + 1 + i as u64, (l.rank - 1) * l.sj + (n - 1) * l.sc + 1, 1.0))
            .collect();
        let rows: Vec<Vec<f32>> =
            layouts.iter().enumerate().map(|(i, l)| randn(seed + 5 + i as u64, t * l.ld, 1.0)).collect();
        let qd = s.clone_htod(&q).unwrap();
        let rd: Vec<_> = rows.iter().map(|r| s.clone_htod(r).unwrap()).collect();
        let run = || {
            let mut fd: Vec<_> = init.iter().map(|f| s.clone_htod(f).unwrap()).collect();
            {
                let mut parts: Vec<GradPart> = fd
                    .iter_mut()
                    .zip(&rd)
                    .zip(&layouts)
                    .map(|((f, r), l)| GradPart { factor: f.as_view_mut(), rows: r.as_view(), layout: *l })
                    .collect();
                lowrank_grad_gpu(&gpu, &qd.as_view(), t, n, &mut parts).unwrap();
            }
            fd.iter().map(|f| s.clone_dtoh(f).unwrap()).collect::<Vec<_>>()
        };
        let (first, second) = (run(), run());
        for (i, l) in layouts.iter().enumerate() {
            let mut want = init[i].clone();
            grad_ref(&q, t, n, &rows[i], l, &mut want);
            let (atol, rtol) = tol(t);
            assert_close(
                &format!("grad case {case} part {i} [{t}, {n}] rank {}", l.rank),
                &first[i],
                &want,
                atol,
                rtol,
            );
            assert!(
                first[i].iter().zip(&second[i]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "grad case {case}: two runs differ"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn bad_shapes_are_errors_not_launches() {
    let gpu = Gpu::new(0).expect("a GPU");
    let s = &gpu.stream;
    let x = s.alloc_zeros::<f32>(10 * 64).unwrap();
    let f = s.alloc_zeros::<f32>(8 * 64).unwrap();
    let mut r = s.alloc_zeros::<f32>(10 * 8).unwrap();
    let e = lowrank_down_gpu(&gpu, &x.as_view(), 11, 64, &mut []).unwrap_err().to_string();
    assert!(e.contains("X has 640 elements, expected 704"), "{e}");
    let mut parts = [DownPart { factor: f.as_view(), rows: r.as_view_mut(), layout: Layout::rows_major(8, 65, 1.0) }];
    let e = lowrank_down_gpu(&gpu, &x.as_view(), 10, 64, &mut parts).unwrap_err().to_string();
    assert!(e.contains("part 0") && e.contains("factor"), "{e}");
    // X in bf16: buffers of t·k values, and a part to read X for.
    let (mut hi, mut lo) = (s.alloc_zeros::<bf16>(640).unwrap(), s.alloc_zeros::<bf16>(639).unwrap());
    let mut parts = [DownPart { factor: f.as_view(), rows: r.as_view_mut(), layout: Layout::rows_major(8, 64, 1.0) }];
    let (hv, lv) = (&mut hi.as_view_mut(), &mut lo.as_view_mut());
    let e = lowrank_down_cast_gpu(&gpu, &x.as_view(), 10, 64, &mut parts, hv, Some(lv)).unwrap_err().to_string();
    assert!(e.contains("bf16 remainder of X has 639 elements, expected 640"), "{e}");
    let e = lowrank_down_cast_gpu(&gpu, &x.as_view(), 10, 64, &mut [], hv, None).unwrap_err().to_string();
    assert!(e.contains("needs at least one part"), "{e}");
    let mut y = s.alloc_zeros::<f32>(10 * 64).unwrap();
    let b = s.alloc_zeros::<f32>(63).unwrap();
    let e = lowrank_up_gpu(&gpu, &mut y.as_view_mut(), 10, 64, false, Some(&b.as_view()), &[]).unwrap_err().to_string();
    assert!(e.contains("bias has 63 elements, expected 64"), "{e}");
}
