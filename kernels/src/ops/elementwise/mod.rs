//! Small f32 kernels the engine composes: the bf16 cast of activations for the GEMMs, `y += x`
//! (residual stream, gradient accumulation), `y *= s`, row gather and scatter (MoE token routing),
//! and the sum of squares (gradient norm). Each with its CPU reference.
//!
//! Row indices are validated by the host; an index out of range never touches memory out of
//! bounds: a gathered row comes out NaN, a scattered row is dropped.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("elementwise.cu");

const THREADS: u32 = 256;

fn check(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!("{op}: {what} has {got} elements, expected {want}")))
    }
}

/// One thread per element, grid-stride beyond 65535 blocks.
fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).min(65535) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (threads over `hidden`), grid-stride beyond 65535 rows.
fn rows_config(rows: usize, hidden: usize) -> LaunchConfig {
    let threads = hidden.next_power_of_two().clamp(32, THREADS as usize) as u32;
    LaunchConfig { grid_dim: (rows.min(65535) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// CPU reference: `x [n]` → `[n]` rounded to the nearest bf16, ties to even.
pub fn cast_f32_to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// GPU [`cast_f32_to_bf16`]: `y [n] = bf16(x [n])`.
pub fn cast_f32_to_bf16_gpu(gpu: &Gpu, x: &CudaView<'_, f32>, y: &mut CudaViewMut<'_, bf16>) -> Result<()> {
    let n = x.len();
    check("cast_f32_to_bf16", "y", y.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", SRC, "cast_f32_to_bf16")?;
    let n64 = n as u64;
    // SAFETY: cast_f32_to_bf16(__nv_bfloat16* y, const float* x, unsigned long long n): x and y
    // hold n elements (checked above); the grid-stride loop stays below n.
    unsafe { gpu.stream.launch_builder(&f).arg(y).arg(x).arg(&n64).launch(elementwise_config(n)) }?;
    Ok(())
}

/// CPU reference: `x [n]` as two bf16 halves `(hi, lo)` with `hi = bf16(x)`, `lo = bf16(x − hi)`
/// (0 where `hi` is not finite): `hi + lo` equals `x` to about 2^-17 relative, so two bf16 GEMMs
/// over the halves are about as exact as an f32 GEMM when the other operand is bf16.
pub fn split_f32_to_bf16x2(x: &[f32]) -> (Vec<bf16>, Vec<bf16>) {
    x.iter()
        .map(|&v| {
            let h = bf16::from_f32(v);
            let l = if h.to_f32().is_finite() { bf16::from_f32(v - h.to_f32()) } else { bf16::ZERO };
            (h, l)
        })
        .unzip()
}

/// GPU [`split_f32_to_bf16x2`]: `hi [n]`, `lo [n]` from `x [n]`.
pub fn split_f32_to_bf16x2_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    hi: &mut CudaViewMut<'_, bf16>,
    lo: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    let n = x.len();
    check("split_f32_to_bf16x2", "hi", hi.len(), n)?;
    check("split_f32_to_bf16x2", "lo", lo.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", SRC, "split_f32_to_bf16x2")?;
    let n64 = n as u64;
    // SAFETY: split_f32_to_bf16x2(__nv_bfloat16* hi, __nv_bfloat16* lo, const float* x, unsigned
    // long long n): x, hi and lo hold n elements (checked above); the grid-stride loop stays below n.
    unsafe { gpu.stream.launch_builder(&f).arg(hi).arg(lo).arg(x).arg(&n64).launch(elementwise_config(n)) }?;
    Ok(())
}

/// CPU reference: `y [n] += x [n]`.
pub fn add(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len(), "add: y and x differ in length");
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// GPU [`add`]: `y [n] += x [n]`.
pub fn add_gpu(gpu: &Gpu, y: &mut CudaViewMut<'_, f32>, x: &CudaView<'_, f32>) -> Result<()> {
    let n = y.len();
    check("add", "x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", SRC, "add_f32")?;
    let n64 = n as u64;
    // SAFETY: add_f32(float* y, const float* x, unsigned long long n): y and x hold n floats
    // (checked above); the grid-stride loop stays below n.
    unsafe { gpu.stream.launch_builder(&f).arg(y).arg(x).arg(&n64).launch(elementwise_config(n)) }?;
    Ok(())
}

/// CPU reference: `y [n] *= s`.
pub fn scale(y: &mut [f32], s: f32) {
    for a in y.iter_mut() {
        *a *= s;
    }
}

/// GPU [`scale`]: `y [n] *= s`.
pub fn scale_gpu(gpu: &Gpu, y: &mut CudaViewMut<'_, f32>, s: f32) -> Result<()> {
    let n = y.len();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", SRC, "scale_f32")?;
    let n64 = n as u64;
    // SAFETY: scale_f32(float* y, float s, unsigned long long n): y holds n floats; the
    // grid-stride loop stays below n.
    unsafe { gpu.stream.launch_builder(&f).arg(y).arg(&s).arg(&n64).launch(elementwise_config(n)) }?;
    Ok(())
}

/// CPU reference: `x [N, hidden]`, `idx [n]` → `[n, hidden]` with row `r` = `x[idx[r]]`; NaN rows
/// for indices `>= N`.
pub fn gather_rows(x: &[f32], idx: &[u32], hidden: usize) -> Vec<f32> {
    assert!(hidden > 0 && x.len().is_multiple_of(hidden), "gather_rows: x is not [N, {hidden}]");
    let mut out = Vec::with_capacity(idx.len() * hidden);
    for &k in idx {
        match x.get(k as usize * hidden..(k as usize + 1) * hidden) {
            Some(row) => out.extend_from_slice(row),
            None => out.extend(std::iter::repeat_n(f32::NAN, hidden)),
        }
    }
    out
}

fn rows_of(op: &str, what: &str, len: usize, hidden: usize) -> Result<usize> {
    if hidden == 0 || hidden > u32::MAX as usize || !len.is_multiple_of(hidden) || len / hidden > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "{op}: {what} has {len} elements, expected a multiple of hidden {hidden} with fewer than 2^32 rows"
        )));
    }
    Ok(len / hidden)
}

/// GPU [`gather_rows`]: `x [N, hidden]`, `idx [n]`, `out [n, hidden]`.
pub fn gather_rows_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    idx: &CudaView<'_, u32>,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let src_rows = rows_of("gather_rows", "x", x.len(), hidden)?;
    let rows = idx.len();
    check("gather_rows", "out", out.len(), rows * hidden)?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", SRC, "gather_rows_f32")?;
    let (rows64, src32, h32) = (rows as u64, src_rows as u32, hidden as u32);
    // SAFETY: gather_rows_f32(float* out, const float* x, const unsigned* idx, unsigned long long rows,
    // unsigned src_rows, unsigned hidden): out holds rows·hidden floats, x src_rows·hidden, idx rows
    // (checked above); x is read only at rows idx[r] < src_rows; rows are grid-strided.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(out)
            .arg(x)
            .arg(idx)
            .arg(&rows64)
            .arg(&src32)
            .arg(&h32)
            .launch(rows_config(rows, hidden))
    }?;
    Ok(())
}

/// CPU reference: `out [N, hidden]` row `idx[r]` = `src [n, hidden]` row `r` (assignment; rows not
/// named keep their values; indices `>= N` are skipped). With repeated indices the last row wins
/// here, and an unspecified one on the GPU.
pub fn scatter_rows(src: &[f32], idx: &[u32], hidden: usize, out: &mut [f32]) {
    assert!(hidden > 0 && out.len().is_multiple_of(hidden), "scatter_rows: out is not [N, {hidden}]");
    assert_eq!(src.len(), idx.len() * hidden, "scatter_rows: src is not [idx.len(), hidden]");
    for (row, &k) in src.chunks_exact(hidden).zip(idx) {
        if let Some(o) = out.get_mut(k as usize * hidden..(k as usize + 1) * hidden) {
            o.copy_from_slice(row);
        }
    }
}

/// GPU [`scatter_rows`]: `src [n, hidden]`, `idx [n]` (distinct, for a deterministic result),
/// `out [N, hidden]`.
pub fn scatter_rows_gpu(
    gpu: &Gpu,
    src: &CudaView<'_, f32>,
    idx: &CudaView<'_, u32>,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let dst_rows = rows_of("scatter_rows", "out", out.len(), hidden)?;
    let rows = idx.len();
    check("scatter_rows", "src", src.len(), rows * hidden)?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", SRC, "scatter_rows_f32")?;
    let (rows64, dst32, h32) = (rows as u64, dst_rows as u32, hidden as u32);
    // SAFETY: scatter_rows_f32(float* out, const float* src, const unsigned* idx, unsigned long long
    // rows, unsigned dst_rows, unsigned hidden): out holds dst_rows·hidden floats, src rows·hidden,
    // idx rows (checked above); out is written only at rows idx[r] < dst_rows; rows are grid-strided.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(out)
            .arg(src)
            .arg(idx)
            .arg(&rows64)
            .arg(&dst32)
            .arg(&h32)
            .launch(rows_config(rows, hidden))
    }?;
    Ok(())
}

/// CPU reference: `Σ x²` over `x [n]`, accumulated in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum()
}

/// GPU [`sum_squares`], ACCUMULATED: `out [1] += Σ x²` (in f32; one atomicAdd per block, so the
/// last bits vary from run to run).
pub fn sum_squares_gpu(gpu: &Gpu, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
    check("sum_squares", "out", out.len(), 1)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", SRC, "sum_squares_f32")?;
    // Few blocks keep the atomics (and their rounding) few; 512 × 256 threads still fill an H100.
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).min(512) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let n64 = n as u64;
    // SAFETY: sum_squares_f32(float* out, const float* x, unsigned long long n): out holds 1 float,
    // x n (checked above); the block has a multiple of 32 threads, as the warp reduction needs.
    unsafe { gpu.stream.launch_builder(&f).arg(out).arg(x).arg(&n64).launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn};

    #[test]
    fn cast_rounds_to_nearest_even() {
        let x = [1.0f32, f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), f32::from_bits(0x3f80_8001)];
        let y: Vec<u16> = cast_f32_to_bf16(&x).iter().map(|v| v.to_bits()).collect();
        // Ties go to the even mantissa (down from 0x3f80, up from 0x3f81); above a tie rounds up.
        assert_eq!(y, vec![0x3f80, 0x3f80, 0x3f82, 0x3f81]);
    }

    #[test]
    fn split_halves_sum_to_the_input() {
        let x = randn(9, 4096, 50.0);
        let (hi, lo) = split_f32_to_bf16x2(&x);
        for ((v, h), l) in x.iter().zip(&hi).zip(&lo) {
            let err = (v - (h.to_f32() + l.to_f32())).abs();
            assert!(err <= v.abs() * 2f32.powi(-16), "{v}: {h} + {l}");
            assert!(l.to_f32().abs() <= h.to_f32().abs() * 2f32.powi(-8));
        }
        let (h, l) = split_f32_to_bf16x2(&[f32::INFINITY]);
        assert_eq!((h[0].to_f32(), l[0].to_f32()), (f32::INFINITY, 0.0));
    }

    #[test]
    fn add_and_scale() {
        let (x, mut y) = (randn(1, 9, 1.0), randn(2, 9, 1.0));
        let y0 = y.clone();
        add(&mut y, &x);
        scale(&mut y, -0.5);
        for i in 0..9 {
            assert_eq!(y[i], (y0[i] + x[i]) * -0.5);
        }
    }

    #[test]
    fn gather_then_scatter_round_trips() {
        let x = randn(3, 5 * 3, 1.0);
        let idx = [4u32, 0, 2];
        let g = gather_rows(&x, &idx, 3);
        assert_eq!(&g[3..6], &x[0..3]);
        let mut back = vec![7.0f32; x.len()];
        scatter_rows(&g, &idx, 3, &mut back);
        for k in 0..5 {
            let want: &[f32] = if idx.contains(&(k as u32)) { &x[k * 3..k * 3 + 3] } else { &[7.0; 3] };
            assert_eq!(&back[k * 3..k * 3 + 3], want);
        }
        // Out of range: NaN row on gather, skipped on scatter.
        assert!(gather_rows(&x, &[5], 3).iter().all(|v| v.is_nan()));
        scatter_rows(&[1.0, 2.0, 3.0], &[5], 3, &mut back);
    }

    #[test]
    fn sum_squares_matches_definition() {
        assert_eq!(sum_squares(&[3.0, -4.0]), 25.0);
    }

    // ---- GPU: each op against its reference at odd lengths, length 1, and lengths > 2^20 (the
    // largest beyond the 65535 × 256 threads of one grid, so the grid-stride loop runs).

    const LENGTHS: [usize; 5] = [1, 31, 1000, (1 << 20) + 7, 65535 * 256 + 299];

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn cast_matches_half_bit_for_bit() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        // Special values: ties (even and odd), just above a tie, ±0, subnormals, the largest f32
        // (rounds to +inf), infinities, NaN.
        let special = [0x3f80_8000u32, 0x3f81_8000, 0x3f80_8001, 0x8000_0000, 0, 0x0000_0001, 0x0001_8000, 0x7f7f_ffff]
            .map(f32::from_bits)
            .into_iter()
            .chain([f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        for (seed, n) in LENGTHS.into_iter().enumerate() {
            let mut x = randn(seed as u64, n, 1e3);
            for (v, sp) in x.iter_mut().zip(special.clone()) {
                *v = sp;
            }
            let mut y = s.alloc_zeros::<bf16>(n).unwrap();
            cast_f32_to_bf16_gpu(&gpu, &s.clone_htod(&x).unwrap().as_view(), &mut y.as_view_mut()).unwrap();
            let got = s.clone_dtoh(&y).unwrap();
            for (i, (g, w)) in got.iter().zip(cast_f32_to_bf16(&x)).enumerate() {
                // NaN payloads may differ (CUDA returns its canonical NaN).
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "n {n}: x[{i}] = {:e}: {g} vs {w}",
                    x[i]
                );
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn split_matches_cpu_bit_for_bit() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        for (seed, n) in LENGTHS.into_iter().enumerate() {
            let mut x = randn(seed as u64 + 50, n, 1e3);
            for (v, sp) in x.iter_mut().zip([f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 3.0e38]) {
                *v = sp;
            }
            let (mut hi, mut lo) = (s.alloc_zeros::<bf16>(n).unwrap(), s.alloc_zeros::<bf16>(n).unwrap());
            let xd = s.clone_htod(&x).unwrap();
            split_f32_to_bf16x2_gpu(&gpu, &xd.as_view(), &mut hi.as_view_mut(), &mut lo.as_view_mut()).unwrap();
            let (wh, wl) = split_f32_to_bf16x2(&x);
            assert_eq!(
                s.clone_dtoh(&hi).unwrap().iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                wh.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                "hi, n {n}"
            );
            assert_eq!(
                s.clone_dtoh(&lo).unwrap().iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                wl.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                "lo, n {n}"
            );
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn add_and_scale_odd_lengths() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        for (seed, n) in LENGTHS.into_iter().enumerate() {
            let (x, y0) = (randn(10 + seed as u64, n, 2.0), randn(20 + seed as u64, n, 2.0));
            let mut want = y0.clone();
            add(&mut want, &x);
            let mut y = s.clone_htod(&y0).unwrap();
            add_gpu(&gpu, &mut y.as_view_mut(), &s.clone_htod(&x).unwrap().as_view()).unwrap();
            // One f32 operation per element on both sides: exact.
            assert_close(&format!("add n={n}"), &s.clone_dtoh(&y).unwrap(), &want, 0.0, 0.0);
            scale(&mut want, 0.37);
            scale_gpu(&gpu, &mut y.as_view_mut(), 0.37).unwrap();
            assert_close(&format!("scale n={n}"), &s.clone_dtoh(&y).unwrap(), &want, 0.0, 0.0);
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gather_and_scatter_rows() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        // (source rows N, gathered rows n, hidden): gpt-oss hidden, a single row, odd sizes, and
        // 70000 × 17 > 2^20 elements with more rows than the 65535 blocks of the grid.
        for (seed, big, n, h) in
            [(1u64, 300usize, 129usize, 2880usize), (2, 1, 1, 1), (3, 23, 11, 33), (4, 90_000, 70_000, 17)]
        {
            let x = randn(seed, big * h, 1.0);
            let idx: Vec<u32> = (0..n as u64).map(|r| ((r * 7919 + seed) % big as u64) as u32).collect();
            let mut out = s.alloc_zeros::<f32>(n * h).unwrap();
            let (xd, idxd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&idx).unwrap());
            gather_rows_gpu(&gpu, &xd.as_view(), &idxd.as_view(), h, &mut out.as_view_mut()).unwrap();
            assert_close(
                &format!("gather [{n}, {h}]"),
                &s.clone_dtoh(&out).unwrap(),
                &gather_rows(&x, &idx, h),
                0.0,
                0.0,
            );

            // Scatter back with the same indices, distinct (a prime stride coprime with N, n <= N),
            // into a random destination.
            let perm = idx;
            let mut dedup = perm.clone();
            dedup.sort_unstable();
            dedup.dedup();
            assert_eq!(dedup.len(), n, "test indices must be distinct");
            let src = randn(seed + 50, n * h, 1.0);
            let dst0 = randn(seed + 60, big * h, 1.0);
            let mut want = dst0.clone();
            scatter_rows(&src, &perm, h, &mut want);
            let mut dst = s.clone_htod(&dst0).unwrap();
            let (srcd, permd) = (s.clone_htod(&src).unwrap(), s.clone_htod(&perm).unwrap());
            scatter_rows_gpu(&gpu, &srcd.as_view(), &permd.as_view(), h, &mut dst.as_view_mut()).unwrap();
            assert_close(
                &format!("scatter [{n}, {h}] into [{big}, {h}]"),
                &s.clone_dtoh(&dst).unwrap(),
                &want,
                0.0,
                0.0,
            );
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn out_of_range_rows_stay_in_bounds() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let (h, x) = (64, randn(7, 4 * 64, 1.0));
        let idx = [3u32, 4, u32::MAX];
        let (xd, idxd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&idx).unwrap());
        let mut out = s.alloc_zeros::<f32>(3 * h).unwrap();
        gather_rows_gpu(&gpu, &xd.as_view(), &idxd.as_view(), h, &mut out.as_view_mut()).unwrap();
        assert_close("gather with bad indices", &s.clone_dtoh(&out).unwrap(), &gather_rows(&x, &idx, h), 0.0, 0.0);
        let mut dst = s.clone_htod(&x).unwrap();
        let src = s.clone_htod(&randn(8, 3 * h, 1.0)).unwrap();
        let idx2 = s.clone_htod(&[4u32, 9, u32::MAX]).unwrap();
        scatter_rows_gpu(&gpu, &src.as_view(), &idx2.as_view(), h, &mut dst.as_view_mut()).unwrap();
        assert_eq!(s.clone_dtoh(&dst).unwrap(), x, "no in-range index: nothing written");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn sum_squares_accumulates() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        for (seed, n) in LENGTHS.into_iter().enumerate() {
            let x = randn(30 + seed as u64, n, 1.5);
            let mut out = s.clone_htod(&[5.0f32]).unwrap();
            let xd = s.clone_htod(&x).unwrap();
            sum_squares_gpu(&gpu, &xd.as_view(), &mut out.as_view_mut()).unwrap();
            sum_squares_gpu(&gpu, &xd.as_view(), &mut out.as_view_mut()).unwrap();
            let want = (5.0 + 2.0 * sum_squares(&x)) as f32;
            // Positive terms, so no cancellation: each thread adds ≤ 128 terms, then an 8-level tree
            // and ≤ 512 atomics per call: relative error ≤ ~(128 + 8 + 512)·2^-24 ≈ 4e-5; rtol 1e-4.
            assert_close(&format!("sum_squares n={n}"), &s.clone_dtoh(&out).unwrap(), &[want], 0.0, 1e-4);
        }
    }
}
