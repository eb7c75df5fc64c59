//! Rotary position embedding in the half-split (NeoX) layout that gpt-oss uses: in each head of
//! width `d`, element `i` is rotated with element `i + d/2` by the angle `pos · inv_freq[i]`, with
//! cos and sin multiplied by `attention_scaling` (YaRN's mscale, 1 for plain RoPE). The inverse is
//! the transposed rotation, which is also the backward pass. The frequencies come from the trainer
//! (`Rope::new`); this module holds the CPU reference and the CUDA kernel of the rotation.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::{Error, Gpu, Result};

pub const SRC: &str = include_str!("rope.cu");

/// CPU reference: rotates every head of `x [T, heads · head_dim]` in place; `positions [T]`,
/// `inv_freq [head_dim / 2]`. With `inverse`, applies the transposed rotation (the backward).
pub fn rope_apply(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    attention_scaling: f32,
    head_dim: usize,
    inverse: bool,
) {
    let half = head_dim / 2;
    assert!(head_dim.is_multiple_of(2) && inv_freq.len() == half, "rope: inv_freq must hold head_dim / 2 values");
    if positions.is_empty() {
        assert!(x.is_empty(), "rope: x has {} elements but there are no positions", x.len());
        return;
    }
    let width = x.len() / positions.len();
    assert!(
        x.len() == positions.len() * width && width.is_multiple_of(head_dim),
        "rope: x is not [T, heads * head_dim]"
    );
    for (row, &p) in x.chunks_exact_mut(width).zip(positions) {
        let (c, s): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| {
                let a = p as f32 * f;
                (a.cos() * attention_scaling, a.sin() * attention_scaling)
            })
            .unzip();
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                if inverse {
                    head[i] = a * c[i] + b * s[i];
                    head[i + half] = b * c[i] - a * s[i];
                } else {
                    head[i] = a * c[i] - b * s[i];
                    head[i + half] = b * c[i] + a * s[i];
                }
            }
        }
    }
}

/// GPU [`rope_apply`] in place: `x [T, heads · head_dim]`, `positions [T]`, `inv_freq [head_dim / 2]`.
pub fn rope_gpu(
    gpu: &Gpu,
    x: &mut CudaViewMut<'_, f32>,
    positions: &CudaView<'_, u32>,
    inv_freq: &CudaView<'_, f32>,
    attention_scaling: f32,
    head_dim: usize,
    inverse: bool,
) -> Result<()> {
    let tokens = positions.len();
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::Shape(format!("rope: head_dim is {head_dim}, expected a positive even number")));
    }
    if inv_freq.len() != head_dim / 2 {
        return Err(Error::Shape(format!("rope: inv_freq has {} elements, expected {}", inv_freq.len(), head_dim / 2)));
    }
    let heads = if tokens == 0 { 0 } else { x.len() / (tokens * head_dim) };
    if x.len() != tokens * heads * head_dim || (tokens > 0 && heads == 0) {
        return Err(Error::Shape(format!(
            "rope: x has {} elements, expected a multiple of {tokens} positions × head_dim {head_dim}",
            x.len()
        )));
    }
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function("rope", SRC, "rope_f32")?;
    let pairs = tokens * head_dim / 2;
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(256).min(65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (tokens64, heads32, d32, inv) = (tokens as u64, heads as u32, head_dim as u32, inverse as i32);
    // SAFETY: rope_f32(float* x, const unsigned* positions, const float* inv_freq,
    // unsigned long long tokens, unsigned heads, unsigned head_dim, float attention_scaling, int inverse):
    // x holds tokens·heads·head_dim floats, positions tokens, inv_freq head_dim/2 (all checked above);
    // the grid-stride loop covers the tokens·head_dim/2 pairs with any grid.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(x)
            .arg(positions)
            .arg(inv_freq)
            .arg(&tokens64)
            .arg(&heads32)
            .arg(&d32)
            .arg(&attention_scaling)
            .arg(&inv)
            .launch(cfg)
    }?;
    Ok(())
}

/// CPU reference of [`rope_table_gpu`]: `[T, head_dim / 2, 2]`, the cos and sin of each position
/// and frequency times `attention_scaling` (the f32 angle of [`rope_apply`], libm's cos and sin).
pub fn rope_table(positions: &[u32], inv_freq: &[f32], attention_scaling: f32) -> Vec<f32> {
    let mut cs = Vec::with_capacity(positions.len() * inv_freq.len() * 2);
    for &p in positions {
        for f in inv_freq {
            let a = p as f32 * f;
            cs.extend([a.cos() * attention_scaling, a.sin() * attention_scaling]);
        }
    }
    cs
}

/// Rotates `x [T, heads · head_dim]` in place with a [`rope_table`] (`[T, head_dim / 2, 2]`), each
/// output `a·c − b·s` or `b·c + a·s` rounded product by product (no fused multiply-add): the
/// arithmetic of the attention split kernel's rotation, so with the GPU's table the same bits.
/// With `inverse` the transposed rotation (`a·c + b·s`, `b·c − a·s`: a gradient's backward), the
/// arithmetic of the attention backward's.
pub fn rope_apply_table(x: &mut [f32], table: &[f32], head_dim: usize, inverse: bool) {
    let half = head_dim / 2;
    let tokens = if half == 0 { 0 } else { table.len() / (2 * half) };
    assert!(head_dim.is_multiple_of(2) && table.len() == tokens * 2 * half, "rope: table is not [T, head_dim / 2, 2]");
    if tokens == 0 {
        assert!(x.is_empty(), "rope: x has {} elements but the table has no rows", x.len());
        return;
    }
    let width = x.len() / tokens;
    assert!(x.len() == tokens * width && width.is_multiple_of(head_dim), "rope: x is not [T, heads * head_dim]");
    for (row, cs) in x.chunks_exact_mut(width).zip(table.chunks_exact(2 * half)) {
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b, c, s) = (head[i], head[i + half], cs[2 * i], cs[2 * i + 1]);
                if inverse {
                    head[i] = a * c + b * s;
                    head[i + half] = b * c - a * s;
                } else {
                    head[i] = a * c - b * s;
                    head[i + half] = b * c + a * s;
                }
            }
        }
    }
}

/// GPU [`rope_table`]: `positions [T]`, `inv_freq [head_dim / 2]` → `out [T, head_dim / 2, 2]`
/// (assigned), with `rope_f32`'s cos and sin (CUDA's precise `sincosf`).
pub fn rope_table_gpu(
    gpu: &Gpu,
    positions: &CudaView<'_, u32>,
    inv_freq: &CudaView<'_, f32>,
    attention_scaling: f32,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (tokens, half) = (positions.len(), inv_freq.len());
    if out.len() != tokens * half * 2 {
        return Err(Error::Shape(format!(
            "rope_table: out has {} elements, expected {tokens} positions × {half} frequencies × 2",
            out.len()
        )));
    }
    if tokens == 0 || half == 0 {
        return Ok(());
    }
    let f = gpu.function("rope", SRC, "rope_table_f32")?;
    let pairs = tokens * half;
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(256).min(65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (tokens64, half32) = (tokens as u64, half as u32);
    // SAFETY: rope_table_f32(float* cs, const unsigned* positions, const float* inv_freq,
    // unsigned long long tokens, unsigned half, float attention_scaling): cs holds tokens·half·2
    // floats, positions tokens, inv_freq half (checked above); the grid-stride loop covers the
    // tokens·half pairs with any grid.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(out)
            .arg(positions)
            .arg(inv_freq)
            .arg(&tokens64)
            .arg(&half32)
            .arg(&attention_scaling)
            .launch(cfg)
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn};

    /// gpt-oss-like frequencies: `1 / 150000^(2i/d)`.
    fn inv_freq(d: usize) -> Vec<f32> {
        (0..d / 2).map(|i| (1.0 / 150000f64.powf(2.0 * i as f64 / d as f64)) as f32).collect()
    }

    #[test]
    fn forward_matches_f64_rotation() {
        let (d, heads) = (8, 3);
        let pos = [0u32, 5, 131071];
        let f = inv_freq(d);
        let x = randn(1, pos.len() * heads * d, 2.0);
        let mut y = x.clone();
        rope_apply(&mut y, &pos, &f, 1.25, d, false);
        for (t, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                for i in 0..d / 2 {
                    // Same f32 angle, then f64 trigonometry and rotation.
                    let ang = (p as f32 * f[i]) as f64;
                    let (c, s) = (ang.cos() * 1.25, ang.sin() * 1.25);
                    let base = t * heads * d + h * d;
                    let (a, b) = (x[base + i] as f64, x[base + i + d / 2] as f64);
                    let (wa, wb) = (a * c - b * s, b * c + a * s);
                    assert!((y[base + i] as f64 - wa).abs() < 1e-5, "t {t} h {h} i {i}");
                    assert!((y[base + i + d / 2] as f64 - wb).abs() < 1e-5, "t {t} h {h} i {i}");
                }
            }
        }
    }

    #[test]
    fn inverse_undoes_forward_times_scaling_squared() {
        let d = 16;
        let pos = [3u32, 0, 77, 4096];
        let f = inv_freq(d);
        let x = randn(2, pos.len() * 2 * d, 1.0);
        let mut y = x.clone();
        rope_apply(&mut y, &pos, &f, 1.5, d, false);
        rope_apply(&mut y, &pos, &f, 1.5, d, true);
        assert_close("inverse(forward(x)) / 2.25", &y, &x.iter().map(|v| v * 2.25).collect::<Vec<_>>(), 1e-5, 1e-5);
    }

    #[test]
    fn inverse_is_the_gradient_of_forward() {
        // <dy, R x> = <Rᵀ dy, x> for the bilinear rotation, checked in f64.
        let d = 8;
        let pos = [1u32, 9];
        let f = inv_freq(d);
        let x = randn(3, pos.len() * d, 1.0);
        let dy = randn(4, x.len(), 1.0);
        let (mut y, mut dx) = (x.clone(), dy.clone());
        rope_apply(&mut y, &pos, &f, 1.1, d, false);
        rope_apply(&mut dx, &pos, &f, 1.1, d, true);
        let lhs: f64 = dy.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = dx.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-5 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
    }

    fn run_gpu(gpu: &Gpu, x: &[f32], pos: &[u32], f: &[f32], scaling: f32, d: usize, inverse: bool) -> Vec<f32> {
        let s = &gpu.stream;
        let mut xd = s.clone_htod(x).unwrap();
        let (pd, fd) = (s.clone_htod(pos).unwrap(), s.clone_htod(f).unwrap());
        rope_gpu(gpu, &mut xd.as_view_mut(), &pd.as_view(), &fd.as_view(), scaling, d, inverse).unwrap();
        s.clone_dtoh(&xd).unwrap()
    }

    fn check_gpu(gpu: &Gpu, seed: u64, pos: &[u32], heads: usize, d: usize, scaling: f32) {
        let f = inv_freq(d);
        let x = randn(seed, pos.len() * heads * d, 3.0);
        for inverse in [false, true] {
            let mut want = x.clone();
            rope_apply(&mut want, pos, &f, scaling, d, inverse);
            let got = run_gpu(gpu, &x, pos, &f, scaling, d, inverse);
            // Same f32 angle on both sides; CUDA's sincosf is within 2 ulp of libm's, and a·c − b·s
            // may be contracted to an FMA: errors of a few ulp of |x|max·scaling. The output can
            // cancel to ~0, so the tolerance is absolute on that scale: 1e-5·|x|max.
            let xmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) * scaling;
            assert_close(
                &format!("rope T={} heads={heads} d={d} inverse={inverse}", pos.len()),
                &got,
                &want,
                1e-5 * xmax,
                1e-5,
            );
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gpt_oss_shapes_with_large_positions() {
        let gpu = Gpu::new(0).expect("a GPU");
        // Positions up to 131071 (YaRN's extended context), 64 query heads and 8 KV heads of d 64.
        let pos: Vec<u32> = (0..300u32).map(|t| (t * 437) % 131072).chain([131071, 65535, 0]).collect();
        check_gpu(&gpu, 1, &pos, 64, 64, 1.346_573_6);
        check_gpu(&gpu, 2, &pos, 8, 64, 1.346_573_6);
    }

    #[test]
    fn rotating_with_the_table_is_rope_apply() {
        let d = 16;
        let pos = [0u32, 7, 4096, 131071];
        let f = inv_freq(d);
        let x = randn(7, pos.len() * 3 * d, 2.0);
        for inverse in [false, true] {
            let (mut want, mut got) = (x.clone(), x.clone());
            rope_apply(&mut want, &pos, &f, 1.25, d, inverse);
            rope_apply_table(&mut got, &rope_table(&pos, &f, 1.25), d, inverse);
            // The same cos and sin, products and sums: the same bits.
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "rope with the table differs (inverse {inverse})"
            );
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn table_matches_cpu_and_rotates_like_rope_f32() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let (d, scaling) = (64, 1.346_573_6f32);
        let pos: Vec<u32> = (0..300u32).map(|t| (t * 437) % 131072).chain([131071, 65535, 0]).collect();
        let f = inv_freq(d);
        let (pd, fd) = (s.clone_htod(&pos).unwrap(), s.clone_htod(&f).unwrap());
        let mut cs = s.alloc_zeros::<f32>(pos.len() * d).unwrap();
        rope_table_gpu(&gpu, &pd.as_view(), &fd.as_view(), scaling, &mut cs.as_view_mut()).unwrap();
        let table = s.clone_dtoh(&cs).unwrap();
        // CUDA's sincosf against libm: a few ulp of the scaling.
        assert_close("rope table", &table, &rope_table(&pos, &f, scaling), 1e-6 * scaling, 1e-6);
        // Rotating with the GPU's table is rope_f32 up to its FMA contraction (a few ulp of |x|).
        let x = randn(8, pos.len() * 8 * d, 3.0);
        let mut want = x.clone();
        rope_apply_table(&mut want, &table, d, false);
        let got = run_gpu(&gpu, &x, &pos, &f, scaling, d, false);
        let xmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) * scaling;
        assert_close("rope_f32 against the table", &got, &want, 1e-6 * xmax, 1e-6);
        // A table of the wrong length is refused.
        let mut short = s.alloc_zeros::<f32>(pos.len() * d - 2).unwrap();
        let e = rope_table_gpu(&gpu, &pd.as_view(), &fd.as_view(), 1.0, &mut short.as_view_mut()).unwrap_err();
        assert!(e.to_string().contains("rope_table: out has"), "{e}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn single_token() {
        let gpu = Gpu::new(0).expect("a GPU");
        check_gpu(&gpu, 3, &[42], 1, 64, 1.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_lengths() {
        let gpu = Gpu::new(0).expect("a GPU");
        // Odd token and head counts, a head_dim whose half is odd and smaller than a warp.
        let pos: Vec<u32> = (0..37u32).map(|t| t * 3 + 1).collect();
        check_gpu(&gpu, 4, &pos, 3, 14, 1.0);
        check_gpu(&gpu, 5, &pos, 5, 2, 0.5);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn more_pairs_than_threads_in_the_grid() {
        let gpu = Gpu::new(0).expect("a GPU");
        // 600000 tokens × 32 pairs > the 65535 × 256 threads of the largest grid: the grid-stride
        // loop must cover the rest.
        let pos: Vec<u32> = (0..600_000u32).map(|t| t % 131072).collect();
        check_gpu(&gpu, 6, &pos, 1, 64, 1.346_573_6);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn shape_errors_are_reported() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let mut x = s.alloc_zeros::<f32>(10).unwrap();
        let (p, f) = (s.clone_htod(&[1u32, 2]).unwrap(), s.clone_htod(&[1.0f32; 2]).unwrap());
        let e = rope_gpu(&gpu, &mut x.as_view_mut(), &p.as_view(), &f.as_view(), 1.0, 4, false).unwrap_err();
        assert!(e.to_string().contains("x has 10 elements"), "{e}");
    }
}
