//! Tests of the narrow-shape f32 kernels (LoRA ranks up to 16, see [`F32Kernel`]): which kernel
//! runs for which shape and layout, and the transposed Grouped::K product (CPU); then each kernel
//! against [`grouped_gemm_ref`] on the GPU with strided layouts, alpha and beta, NaN-filled C,
//! empty groups, any grid and any group order, and at gpt-oss-20b's LoRA shapes (timed).

use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};

// A child of tests.rs: its helpers (offsets_of, max_len, atol, gpu, median_ms, the LoRA uses) and,
// through it, the gemm module's items.
use super::*;

/// A small dimension padded as the narrow kernels pad it.
fn pad(x: usize) -> usize {
    if x <= 8 {
        8
    } else {
        16
    }
}

/// The kernel that LoRA use `u` at rank `r` must run (in and out both above 16).
fn expected(u: usize, r: usize) -> F32Kernel {
    let p = pad(r);
    match u {
        _ if r > NARROW => F32Kernel::General,
        0 | 2 => F32Kernel::NarrowN { np: p },
        1 | 3 => F32Kernel::TinyK { kp: p },
        4 => F32Kernel::SmallOut { np: p, transposed: true },
        _ => F32Kernel::SmallOut { np: p, transposed: false },
    }
}

/// The lengths of A, B and C that `cfg` reaches with `total` rows.
fn lens(cfg: &GroupedGemm, total: usize) -> [usize; 3] {
    let (dims, st) = (operand_dims(cfg, total), [cfg.a, cfg.b, cfg.c]);
    std::array::from_fn(|i| extent("lens", "operand", cfg.groups, st[i], dims[i].0, dims[i].1).unwrap())
}

/// How an operand `[rows, cols]` sits in memory. Operands indexed by the rows of every group
/// together (Grouped::M's A and C, Grouped::K's A and B) are shared (group stride 0); the others
/// hold one matrix per group.
#[derive(Clone, Copy, Debug)]
enum Lay {
    Rm,
    /// Row-major, 3 unused elements after each row.
    Padded,
    Cm,
    /// Column-major, 3 unused elements after each column.
    PaddedCm,
    /// Per-group operands only: the groups interleaved (group stride 1), row-major: PEFT's
    /// `[out, r·E]` read as `[out, r]` (`{row: r·E, col: E, group: 1}`).
    Peft,
    /// The same, column-major: PEFT's `[out, r·E]` read as `[r, out]` (`{row: E, col: r·E}`).
    PeftT,
}

fn strides(lay: Lay, rows: usize, cols: usize, groups: usize, per_group: bool) -> Strides {
    let g = per_group as usize;
    assert!(per_group || !matches!(lay, Lay::Peft | Lay::PeftT), "{lay:?} is a per-group layout");
    match lay {
        Lay::Rm => Strides { row: cols, col: 1, group: g * rows * cols },
        Lay::Padded => Strides { row: cols + 3, col: 1, group: g * rows * (cols + 3) },
        Lay::Cm => Strides { row: 1, col: rows, group: g * rows * cols },
        Lay::PaddedCm => Strides { row: 1, col: rows + 3, group: g * (rows + 3) * cols },
        Lay::Peft => Strides { row: cols * groups, col: groups, group: 1 },
        Lay::PeftT => Strides { row: groups, col: rows * groups, group: 1 },
    }
}

/// Layouts of A, B and C, alpha, beta.
type Variant = (Lay, Lay, Lay, f32, f32);

/// A configuration over `offsets` (Grouped::M: `m` is the largest group, `m_k` is ignored;
/// Grouped::K: `m_k` is M and `k` is ignored).
fn cfg_of(grouped: Grouped, m_k: usize, n: usize, k: usize, v: Variant, offsets: &[u32]) -> GroupedGemm {
    let (groups, (la, lb, lc, alpha, beta)) = (offsets.len() - 1, v);
    let m = if grouped == Grouped::M { max_len(offsets) } else { m_k };
    let rm = Strides::row_major(0);
    let mut cfg = GroupedGemm { groups, grouped, m, n, k, alpha, beta, a: rm, b: rm, c: rm };
    let [(ar, ac), (br, bc), (cr, cc)] = operand_dims(&cfg, offsets[groups] as usize);
    let by_m = grouped == Grouped::M;
    cfg.a = strides(la, ar, ac, groups, false);
    cfg.b = strides(lb, br, bc, groups, by_m);
    cfg.c = strides(lc, cr, cc, groups, !by_m);
    cfg
}

// ---- CPU ----

#[test]
fn lora_uses_up_to_rank_16_take_the_narrow_kernels() {
    for (inp, out) in [(129, 65), (2880, 5760), (2880, 2880)] {
        for r in [1, 3, 8, 9, 16, 17, 64] {
            let lora = Lora { e: 5, r, inp, out, s: 2.0 };
            let offsets = offsets_of(&[0, 1, 200, 64, 0]);
            for u in 0..6 {
                let cfg = lora.use_cfg(u, &offsets).0;
                let kernel = grouped_gemm_f32_kernel(&cfg);
                assert_eq!(kernel, expected(u, r), "{} r {r} in {inp} out {out}", USES[u]);
                assert_eq!(r <= 16, kernel != F32Kernel::General, "{} r {r}", USES[u]);
            }
        }
    }
    // Every symbol is an entry point of gemm.cu; Display names the transposed product.
    for k in [
        F32Kernel::NarrowN { np: 8 },
        F32Kernel::NarrowN { np: 16 },
        F32Kernel::TinyK { kp: 8 },
        F32Kernel::TinyK { kp: 16 },
        F32Kernel::SmallOut { np: 8, transposed: false },
        F32Kernel::SmallOut { np: 16, transposed: true },
    ] {
        assert!(SRC.contains(&format!("GEMM_F32_KERNEL({},", k.symbol())), "{k:?}: {} not in gemm.cu", k.symbol());
    }
    assert!(SRC.contains("grouped_gemm_f32(float* c, const float* a, const float* b"));
    assert_eq!(F32Kernel::General.to_string(), "grouped_gemm_f32");
    assert_eq!(F32Kernel::SmallOut { np: 8, transposed: false }.to_string(), "grouped_gemm_f32_small_out8");
    assert_eq!(
        F32Kernel::SmallOut { np: 16, transposed: true }.to_string(),
        "grouped_gemm_f32_small_out16 (as Cᵀ = Bᵀ Aᵀ)"
    );
}

#[test]
fn narrow_kernels_need_the_large_operand_read_along_its_contiguous_dimension() {
    use Lay::*;
    let offsets = offsets_of(&[0, 1, 200, 64, 0]);
    let kind = |grouped, m_k, n, k, v| grouped_gemm_f32_kernel(&cfg_of(grouped, m_k, n, k, v, &offsets));
    let (narrow8, gen) = (F32Kernel::NarrowN { np: 8 }, F32Kernel::General);
    // Narrow N reads A along k: a column-major A with a large K goes to the general kernel, with a
    // small K to tiny K (which stages A through shared memory walking its smaller stride).
    assert_eq!(kind(Grouped::M, 0, 8, 2880, (Rm, Rm, Rm, 1.0, 0.0)), narrow8);
    assert_eq!(kind(Grouped::M, 0, 8, 2880, (Padded, Cm, Cm, 1.0, 0.0)), narrow8);
    assert_eq!(kind(Grouped::M, 0, 8, 2880, (Cm, Rm, Rm, 1.0, 0.0)), gen);
    assert_eq!(kind(Grouped::M, 0, 16, 17, (Cm, Rm, Rm, 1.0, 0.0)), gen);
    assert_eq!(kind(Grouped::M, 0, 8, 8, (Cm, Rm, Rm, 1.0, 0.0)), F32Kernel::TinyK { kp: 8 });
    // Tiny K takes any layout.
    assert_eq!(kind(Grouped::M, 0, 2880, 16, (Cm, Peft, Cm, 1.0, 0.0)), F32Kernel::TinyK { kp: 16 });
    // Small out reads A along m (n small) or, transposed, B along n (m small).
    let (out8, out8t) =
        (F32Kernel::SmallOut { np: 8, transposed: false }, F32Kernel::SmallOut { np: 8, transposed: true });
    assert_eq!(kind(Grouped::K, 2880, 8, 0, (Cm, Rm, Rm, 1.0, 1.0)), out8);
    assert_eq!(kind(Grouped::K, 2880, 8, 0, (PaddedCm, Cm, Peft, 1.0, 1.0)), out8);
    assert_eq!(kind(Grouped::K, 2880, 8, 0, (Rm, Rm, Rm, 1.0, 1.0)), gen);
    assert_eq!(kind(Grouped::K, 2880, 8, 0, (Padded, Rm, Rm, 1.0, 1.0)), gen);
    assert_eq!(kind(Grouped::K, 8, 2880, 0, (Rm, Rm, Rm, 1.0, 1.0)), out8t);
    assert_eq!(kind(Grouped::K, 8, 2880, 0, (Cm, Padded, Cm, 1.0, 1.0)), out8t);
    assert_eq!(kind(Grouped::K, 8, 2880, 0, (Cm, Cm, Rm, 1.0, 1.0)), gen);
    assert_eq!(kind(Grouped::K, 16, 17, 0, (Rm, Cm, Rm, 1.0, 1.0)), gen);
    // Both small: whichever orientation reads its large operand along its contiguous dimension.
    assert_eq!(kind(Grouped::K, 8, 8, 0, (Cm, Cm, Rm, 1.0, 1.0)), out8);
    assert_eq!(kind(Grouped::K, 8, 8, 0, (Rm, Rm, Rm, 1.0, 1.0)), out8t);
    assert_eq!(kind(Grouped::K, 8, 8, 0, (Rm, Cm, Rm, 1.0, 1.0)), gen);
    // Narrow N walks the groups one at a time to find a tile's: up to 256 groups.
    for (groups, want) in [(256, narrow8), (257, gen)] {
        let offsets = offsets_of(&vec![3; groups]);
        let cfg = cfg_of(Grouped::M, 0, 8, 2880, (Rm, Rm, Rm, 1.0, 0.0), &offsets);
        assert_eq!(grouped_gemm_f32_kernel(&cfg), want, "{groups} groups");
    }
}

#[test]
fn transposed_grouped_k_product_is_the_same_product() {
    use Lay::*;
    let offsets = offsets_of(&[0, 1, 200, 64, 0, 7]);
    let mut cfgs = vec![];
    for r in [1, 3, 16] {
        let lora = Lora { e: 6, r, inp: 129, out: 65, s: -0.5 };
        cfgs.extend([lora.use_cfg(4, &offsets).0, lora.use_cfg(5, &offsets).0]);
    }
    for v in [(Rm, Padded, PeftT, 0.75, 0.0), (PaddedCm, Cm, Padded, 1.5, -0.25), (Padded, Rm, Peft, -2.0, 1.0)] {
        cfgs.extend([cfg_of(Grouped::K, 5, 70, 0, v, &offsets), cfg_of(Grouped::K, 70, 9, 0, v, &offsets)]);
    }
    let total = offsets[offsets.len() - 1] as usize;
    for (i, cfg) in cfgs.iter().enumerate() {
        let t = transposed(cfg);
        assert_eq!((t.grouped, t.m, t.n), (Grouped::K, cfg.n, cfg.m), "{cfg:?}");
        assert_eq!(format!("{:?}", transposed(&t)), format!("{cfg:?}"), "transposing twice is the identity");
        // The launcher passes (b, a) to the transposed product: each operand reaches as far as it did.
        let [la, lb, lc] = lens(cfg, total);
        assert_eq!(lens(&t, total), [lb, la, lc], "{cfg:?}");
        // The launcher runs the untransposed small-out kernel on t: t must meet its conditions.
        if let F32Kernel::SmallOut { np, transposed: true } = grouped_gemm_f32_kernel(cfg) {
            assert_eq!(grouped_gemm_f32_kernel(&t), F32Kernel::SmallOut { np, transposed: false }, "{cfg:?}");
        }
        let s = 7000 + 10 * i as u64;
        let (a, b) = (randn(s, la, 1.0), randn(s + 1, lb, 1.0));
        let c0 = if cfg.beta == 0.0 { vec![f32::NAN; lc] } else { randn(s + 2, lc, 1.0) };
        let (mut c, mut ct) = (c0.clone(), c0.clone());
        grouped_gemm_ref(cfg, &offsets, &a, &b, &mut c);
        grouped_gemm_ref(&t, &offsets, &b, &a, &mut ct);
        assert!(c.iter().any(|v| !v.is_nan()) && c.iter().zip(&c0).any(|(x, y)| x.to_bits() != y.to_bits()));
        for (j, (x, y)) in c.iter().zip(&ct).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{cfg:?}: C[{j}] = {x} but {y} as Cᵀ = Bᵀ Aᵀ");
        }
    }
}

// ---- GPU ----

/// Elements past the end of every operand that `cfg` reaches (C's must come back untouched).
const SLACK: usize = 5;

/// One problem's device buffers.
struct Dev {
    od: CudaSlice<u32>,
    ad: CudaSlice<f32>,
    bd: CudaSlice<f32>,
    cd: CudaSlice<f32>,
    total: usize,
}

impl Dev {
    fn new(gpu: &Gpu, offsets: &[u32], a: &[f32], b: &[f32], c: &[f32]) -> Self {
        let s = &gpu.stream;
        Self {
            od: s.clone_htod(offsets).unwrap(),
            ad: s.clone_htod(a).unwrap(),
            bd: s.clone_htod(b).unwrap(),
            cd: s.clone_htod(c).unwrap(),
            total: offsets[offsets.len() - 1] as usize,
        }
    }

    fn set_c(&mut self, gpu: &Gpu, c: &[f32]) {
        gpu.stream.memcpy_htod(c, &mut self.cd).unwrap();
    }

    fn c(&self, gpu: &Gpu) -> Vec<f32> {
        gpu.stream.clone_dtoh(&self.cd).unwrap()
    }

    /// `cfg` through the public launcher.
    fn run(&mut self, gpu: &Gpu, cfg: &GroupedGemm) {
        let (a, b, o) = (self.ad.as_view(), self.bd.as_view(), self.od.as_view());
        grouped_gemm_f32(gpu, cfg, &o, self.total, &a, &b, &mut self.cd.as_view_mut()).unwrap();
    }

    /// `kernel` (the one grouped_gemm_f32 picks for `cfg`, or the general one, which takes every
    /// shape) launched as grouped_gemm_f32 launches it, but on `grid` when given.
    fn launch(&mut self, gpu: &Gpu, kernel: F32Kernel, cfg: &GroupedGemm, grid: Option<(u32, u32, u32)>) {
        assert!(kernel == F32Kernel::General || kernel == grouped_gemm_f32_kernel(cfg), "{kernel:?} for {cfg:?}");
        check_shapes("launch", cfg, self.od.len(), self.total, self.ad.len(), Some(self.bd.len()), self.cd.len())
            .unwrap();
        assert!(!is_empty(cfg));
        let f = gpu.function("gemm", SRC, kernel.symbol()).unwrap();
        let (cfg, a, b) = match kernel {
            F32Kernel::SmallOut { transposed: true, .. } => (transposed(cfg), &self.bd, &self.ad),
            _ => (*cfg, &self.ad, &self.bd),
        };
        let mut lc = kernel.launch_config(&cfg, self.total);
        if let Some((x, y, z)) = grid {
            // The narrow-N kernel has no x loop and small-out no y loop: extra blocks there would
            // compute the same outputs twice.
            let unused = match kernel {
                F32Kernel::NarrowN { .. } => x,
                F32Kernel::SmallOut { .. } => y,
                _ => 1,
            };
            assert!(unused == 1 && x >= 1 && y >= 1 && z >= 1, "grid {grid:?} for {kernel:?}");
            assert!(y as usize <= GRID_YZ_MAX && z as usize <= GRID_YZ_MAX);
            lc.grid_dim = (x, y, z);
        }
        let p = params(&cfg, self.total);
        // SAFETY: as in grouped_gemm_f32 (same kernel, operands, Params and block size): the
        // shapes were checked against these buffers, the kernel is one that grouped_gemm_f32 may
        // run for `cfg`, and every kernel loops grid-stride over each grid dimension it uses (the
        // row-tile kernels' blocks with z > 0 take no tile, and the dimensions the others do not
        // use were checked to be 1 above), so any grid reaches only the same elements.
        unsafe { gpu.stream.launch_builder(&f).arg(&mut self.cd).arg(a).arg(b).arg(&self.od).arg(&p).launch(lc) }
            .unwrap();
    }
}

/// Random operands for `cfg`, each SLACK elements longer than it reaches; C is NaN when beta is 0
/// (it must be overwritten, never read).
fn operands(seed: u64, cfg: &GroupedGemm, offsets: &[u32]) -> [Vec<f32>; 3] {
    let [la, lb, lc] = lens(cfg, offsets[cfg.groups] as usize).map(|l| l + SLACK);
    let c0 = if cfg.beta == 0.0 { vec![f32::NAN; lc] } else { randn(seed + 2, lc, 1.0) };
    [randn(seed, la, 1.0), randn(seed + 1, lb, 1.0), c0]
}

/// The inner dimension of the longest sum.
fn depth(cfg: &GroupedGemm, offsets: &[u32]) -> usize {
    if cfg.grouped == Grouped::K {
        max_len(offsets)
    } else {
        cfg.k
    }
}

/// The reference result of `cfg` on `[a, b, c0]`, and which elements it writes (those that beta 0
/// turns from NaN into numbers: every other one is NaN).
fn reference(cfg: &GroupedGemm, offsets: &[u32], [a, b, c0]: &[Vec<f32>; 3]) -> [Vec<f32>; 2] {
    let mut want = c0.clone();
    grouped_gemm_ref(cfg, offsets, a, b, &mut want);
    let mut written = vec![f32::NAN; c0.len()];
    grouped_gemm_ref(&GroupedGemm { alpha: 1.0, beta: 0.0, ..*cfg }, offsets, a, b, &mut written);
    [want, written]
}

/// Asserts that `got` is the reference `[want, written]`: within tolerance where the product
/// writes, `c0` bit for bit everywhere else.
fn assert_product(
    what: &str,
    cfg: &GroupedGemm,
    offsets: &[u32],
    c0: &[f32],
    [want, written]: &[Vec<f32>; 2],
    got: &[f32],
) {
    let (mut g, mut w) = (vec![], vec![]);
    for (i, x) in written.iter().enumerate() {
        if x.is_nan() {
            assert_eq!(got[i].to_bits(), c0[i].to_bits(), "{what}: C[{i}] is outside the product but changed");
        } else {
            g.push(got[i]);
            w.push(want[i]);
        }
    }
    assert_close(what, &g, &w, atol(depth(cfg, offsets), 1.0, 1.0) * cfg.alpha.abs(), 1e-4);
}

/// `cfg` through grouped_gemm_f32 on fresh random operands, checked against the reference;
/// returns the starting C and the result.
fn check(gpu: &Gpu, seed: u64, what: &str, cfg: &GroupedGemm, offsets: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let ops = operands(seed, cfg, offsets);
    let mut d = Dev::new(gpu, offsets, &ops[0], &ops[1], &ops[2]);
    d.run(gpu, cfg);
    let got = d.c(gpu);
    assert_product(what, cfg, offsets, &ops[2], &reference(cfg, offsets, &ops), &got);
    let [_, _, c0] = ops;
    (c0, got)
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn lora_uses_at_ranks_1_to_64_with_ragged_groups() {
    let gpu = gpu();
    let offsets = offsets_of(&[0, 1, 200, 64, 0]);
    let mut seed = 1000;
    for (inp, out, s) in [(129, 65, 0.5), (2880, 5760, 2.0)] {
        for r in [1, 3, 8, 16, 17, 64] {
            let lora = Lora { e: 5, r, inp, out, s };
            for u in 0..6 {
                let cfg = lora.use_cfg(u, &offsets).0;
                let kernel = grouped_gemm_f32_kernel(&cfg);
                assert_eq!(kernel, expected(u, r), "{} r {r}", USES[u]);
                check(&gpu, seed, &format!("{} r {r} in {inp} out {out}: {kernel}", USES[u]), &cfg, &offsets);
                seed += 10;
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn narrow_n_strides_alpha_beta_and_nan() {
    use Lay::*;
    let gpu = gpu();
    // Groups of 0 to 200 rows: a block owns 64 (n ≤ 8) or 32 rows; K in chunks of 64.
    let offsets = offsets_of(&[0, 1, 200, 64, 0, 33]);
    // A is read along k (row-major, padded or not); B and C in any layout, PEFT's B included.
    let variants = [
        (Rm, Rm, Rm, 1.0, 0.0),
        (Padded, Cm, Cm, -0.5, 1.0),
        (Rm, Peft, Padded, 2.0, 0.0),
        (Padded, PeftT, Rm, 1.5, -0.25),
    ];
    let mut seed = 2000;
    for n in [1, 5, 8, 9, 16] {
        for k in [1, 63, 64, 65, 2880] {
            for v in variants {
                let cfg = cfg_of(Grouped::M, 0, n, k, v, &offsets);
                let kernel = grouped_gemm_f32_kernel(&cfg);
                assert_eq!(kernel, F32Kernel::NarrowN { np: pad(n) }, "n {n} k {k} {v:?}");
                check(&gpu, seed, &format!("{kernel} n {n} k {k} {v:?}"), &cfg, &offsets);
                seed += 10;
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn tiny_k_strides_alpha_beta_and_nan() {
    use Lay::*;
    let gpu = gpu();
    // Groups of 0 to 257 rows: 128-row tiles, rows 4 at a time (130, 257 and 3 leave partial ones).
    let offsets = offsets_of(&[0, 1, 130, 257, 0, 3]);
    let variants = [
        (Rm, Rm, Rm, 1.0, 0.0),
        (Cm, Cm, Cm, -0.5, 1.0),
        (Padded, PeftT, Padded, 2.0, 0.0),
        (Rm, Peft, Cm, 1.5, -0.25),
    ];
    let mut seed = 3000;
    let mut one = |n: usize, k: usize, v: Variant| {
        let cfg = cfg_of(Grouped::M, 0, n, k, v, &offsets);
        let kernel = grouped_gemm_f32_kernel(&cfg);
        assert_eq!(kernel, F32Kernel::TinyK { kp: pad(k) }, "n {n} k {k} {v:?}");
        check(&gpu, seed, &format!("{kernel} n {n} k {k} {v:?}"), &cfg, &offsets);
        seed += 10;
    };
    for k in [1, 3, 8, 9, 16] {
        for n in [17, 255, 256, 257, 600] {
            variants.into_iter().for_each(|v| one(n, k, v));
        }
    }
    // A small N too when A is column-major (narrow N needs A read along k).
    for (n, k) in [(1, 3), (5, 9), (16, 16)] {
        for v in [(Cm, Rm, Rm, 1.0, 0.0), (Cm, PeftT, Padded, -2.0, 1.0)] {
            one(n, k, v);
        }
    }
}

/// Asserts that the C of every empty group of a Grouped::K product is exactly beta · C (0 when
/// beta is 0, whatever C held).
fn assert_empty_groups_scaled_by_beta(what: &str, cfg: &GroupedGemm, offsets: &[u32], c0: &[f32], got: &[f32]) {
    for g in (0..cfg.groups).filter(|&g| offsets[g] == offsets[g + 1]) {
        for (i, j) in (0..cfg.m).flat_map(|i| (0..cfg.n).map(move |j| (i, j))) {
            let x = g * cfg.c.group + i * cfg.c.row + j * cfg.c.col;
            let want = if cfg.beta == 0.0 { 0.0 } else { cfg.beta * c0[x] };
            assert!(got[x] == want, "{what}: empty group {g}: C({i}, {j}) = {} instead of {want}", got[x]);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn small_out_strides_alpha_beta_nan_and_empty_groups() {
    use Lay::*;
    let gpu = gpu();
    // Groups of 0 to 300 rows (B in chunks of 128 rows, A 8 rows at a time), three empty.
    let offsets = offsets_of(&[0, 1, 300, 0, 129, 128, 0]);
    let none = offsets_of(&[0, 0, 0]);
    let mut seed = 4000;
    let mut one = |m: usize, n: usize, v: Variant, offsets: &[u32], want: F32Kernel| {
        let cfg = cfg_of(Grouped::K, m, n, 0, v, offsets);
        let kernel = grouped_gemm_f32_kernel(&cfg);
        assert_eq!(kernel, want, "m {m} n {n} {v:?}");
        let what = format!("{kernel} m {m} n {n} {v:?} offsets {offsets:?}");
        let (c0, got) = check(&gpu, seed, &what, &cfg, offsets);
        assert_empty_groups_scaled_by_beta(&what, &cfg, offsets, &c0, &got);
        seed += 10;
    };
    // Small n: A read along m (column-major, padded or not); C in any layout, PEFT's dB included.
    let variants = [
        (Cm, Rm, Rm, 1.0, 0.0),
        (PaddedCm, Cm, Peft, -0.5, 1.0),
        (Cm, Padded, Cm, 2.0, 0.0),
        (PaddedCm, Rm, PeftT, 1.5, -0.25),
    ];
    for n in [1, 5, 8, 9, 16] {
        for m in [1, 255, 256, 257, 2880] {
            let want = F32Kernel::SmallOut { np: pad(n), transposed: false };
            variants.into_iter().for_each(|v| one(m, n, v, &offsets, want));
        }
    }
    // Small m, as Cᵀ = Bᵀ Aᵀ: B read along n (row-major, padded or not); A and C in any layout.
    let variants = [
        (Cm, Rm, Rm, 1.0, 0.0),
        (Rm, Padded, Cm, -0.5, 1.0),
        (PaddedCm, Rm, PeftT, 2.0, 0.0),
        (Padded, Padded, Peft, 1.5, -0.25),
    ];
    for m in [1, 8, 9, 16] {
        for n in [17, 255, 256, 257, 2880] {
            let want = F32Kernel::SmallOut { np: pad(m), transposed: true };
            variants.into_iter().for_each(|v| one(m, n, v, &offsets, want));
        }
    }
    // No rows at all: C = beta · C (0 over NaN when beta is 0).
    one(300, 8, (Cm, Rm, Rm, 1.0, 0.5), &none, F32Kernel::SmallOut { np: 8, transposed: false });
    one(300, 13, (Cm, Rm, Peft, -1.0, 0.0), &none, F32Kernel::SmallOut { np: 16, transposed: false });
    one(8, 300, (Cm, Rm, Rm, 2.0, -0.5), &none, F32Kernel::SmallOut { np: 8, transposed: true });
    one(16, 300, (Rm, Padded, Cm, 1.0, 0.0), &none, F32Kernel::SmallOut { np: 16, transposed: true });
}

/// Blocks of `width`-element records, block g holding `sizes[g]` records, concatenated in `order`;
/// what follows the last block stays last.
fn reorder(v: &[f32], width: usize, sizes: &[usize], order: &[usize]) -> Vec<f32> {
    let o = offsets_of(sizes);
    let block = |g: usize| &v[o[g] as usize * width..o[g + 1] as usize * width];
    let mut out: Vec<f32> = order.iter().flat_map(|&g| block(g)).copied().collect();
    out.extend_from_slice(&v[o[sizes.len()] as usize * width..]);
    out
}

fn same_bits(x: &[f32], y: &[f32]) -> bool {
    x.len() == y.len() && x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits())
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn narrow_kernels_repeat_bit_for_bit_whatever_the_grid() {
    use Lay::*;
    let gpu = gpu();
    let sizes = [0, 1, 200, 64, 0, 33, 300];
    let offsets = offsets_of(&sizes);
    let groups = sizes.len();
    // (grouped, m (Grouped::K), n, k (Grouped::M)): every narrow kernel, both paddings.
    let shapes = [
        (Grouped::M, 0, 5, 700),
        (Grouped::M, 0, 13, 2880),
        (Grouped::M, 0, 600, 3),
        (Grouped::M, 0, 257, 16),
        (Grouped::K, 700, 8, 0),
        (Grouped::K, 300, 16, 0),
        (Grouped::K, 5, 600, 0),
        (Grouped::K, 12, 257, 0),
    ];
    let mut kernels = vec![];
    for (i, &(grouped, m, n, k)) in shapes.iter().enumerate() {
        // Layouts whose operands are arrays of per-row or per-group records, for the reordering.
        let by_m = grouped == Grouped::M;
        let lay = if by_m { (Rm, Rm, Rm, 0.75, 1.0) } else { (Cm, Rm, Rm, 0.75, 1.0) };
        let cfg = cfg_of(grouped, m, n, k, lay, &offsets);
        let kernel = grouped_gemm_f32_kernel(&cfg);
        assert_ne!(kernel, F32Kernel::General, "{cfg:?}");
        kernels.push(kernel);
        let what = format!("{kernel} {grouped:?} m {m} n {n} k {k}");
        let ops = operands(9000 + 10 * i as u64, &cfg, &offsets);
        let mut d = Dev::new(&gpu, &offsets, &ops[0], &ops[1], &ops[2]);
        d.run(&gpu, &cfg);
        let first = d.c(&gpu);
        assert_product(&what, &cfg, &offsets, &ops[2], &reference(&cfg, &offsets, &ops), &first);

        // The same launch on other grids: fewer blocks than tiles (the kernel loops), more blocks
        // than tiles (some idle), and the launcher's own grid again.
        let t = if let F32Kernel::SmallOut { transposed: true, .. } = kernel { transposed(&cfg) } else { cfg };
        let (x, y, z) = kernel.launch_config(&t, d.total).grid_dim;
        let (ux, uy) = match kernel {
            F32Kernel::NarrowN { .. } => (0, 1),
            F32Kernel::SmallOut { .. } => (1, 0),
            _ => (1, 1),
        };
        for grid in [None, Some((1, 1, 1)), Some((1 + 2 * ux, 1 + uy, 2)), Some((x + 2 * ux, y + uy, z + 3))] {
            d.set_c(&gpu, &ops[2]);
            d.launch(&gpu, kernel, &cfg, grid);
            assert!(same_bits(&d.c(&gpu), &first), "{what}: grid {grid:?} (the launcher's: {:?})", (x, y, z));
        }

        // The groups in reverse order, each with the same rows and its own matrix: every output
        // comes back bit for bit, wherever its group now sits.
        let order: Vec<usize> = (0..groups).rev().collect();
        let sizes2: Vec<usize> = order.iter().map(|&g| sizes[g]).collect();
        let offsets2 = offsets_of(&sizes2);
        let cfg2 = cfg_of(grouped, m, n, k, lay, &offsets2);
        let ones = vec![1; groups];
        // Record widths: per row (A and C, or A and B) and per group (B, or C).
        let (wa, wb, wc) = if by_m { (k, k * n, n) } else { (m, n, m * n) };
        let (sa, sb, sc): (&[usize], &[usize], &[usize]) =
            if by_m { (&sizes, &ones, &sizes) } else { (&sizes, &sizes, &ones) };
        let (a2, b2, c2) =
            (reorder(&ops[0], wa, sa, &order), reorder(&ops[1], wb, sb, &order), reorder(&ops[2], wc, sc, &order));
        let mut d2 = Dev::new(&gpu, &offsets2, &a2, &b2, &c2);
        d2.run(&gpu, &cfg2);
        assert!(same_bits(&d2.c(&gpu), &reorder(&first, wc, sc, &order)), "{what}: groups reversed");
        println!("{what}: bit for bit on 5 grids and with the groups reversed");
    }
    let distinct: std::collections::BTreeSet<String> = kernels.iter().map(|k| k.to_string()).collect();
    assert_eq!(distinct.len(), 8, "every narrow kernel, small-out both ways: {distinct:?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
fn gpt_oss_20b_lora_shapes_time_each_kernel() {
    let gpu = gpu();
    // 8192 slots over 32 experts, ragged, experts 5 and 31 empty.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    let mut cuts: Vec<usize> = (0..29).map(|_| rng.gen_range(0..=8192)).chain([0, 8192]).collect();
    cuts.sort();
    let mut sizes: Vec<usize> = cuts.windows(2).map(|w| w[1] - w[0]).collect();
    sizes.insert(5, 0);
    sizes.push(0);
    assert_eq!((sizes.len(), sizes.iter().sum::<usize>()), (32, 8192));
    let offsets = offsets_of(&sizes);
    let total = 8192;
    for (i, out) in [5760, 2880].into_iter().enumerate() {
        let lora = Lora { e: 32, r: 8, inp: 2880, out, s: 2.0 };
        for u in 0..6 {
            let cfg = lora.use_cfg(u, &offsets).0;
            let kernel = grouped_gemm_f32_kernel(&cfg);
            assert_eq!(kernel, expected(u, 8), "{}", USES[u]);
            let ops = operands(5000 + 100 * i as u64 + 10 * u as u64, &cfg, &offsets);
            let mut d = Dev::new(&gpu, &offsets, &ops[0], &ops[1], &ops[2]);
            let (mnk, elems) = match cfg.grouped {
                Grouped::M => (total * cfg.n * cfg.k, [total * cfg.k, cfg.groups * cfg.k * cfg.n, total * cfg.n]),
                Grouped::K => (cfg.m * total * cfg.n, [cfg.m * total, total * cfg.n, cfg.groups * cfg.m * cfg.n]),
            };
            // Each operand read once, C also read when beta is not 0.
            let bytes = 4 * (elems[0] + elems[1] + elems[2] * (1 + (cfg.beta != 0.0) as usize));
            let refs = reference(&cfg, &offsets, &ops);
            let mut general_ms = 0.0;
            for k in [F32Kernel::General, kernel] {
                let what = format!("{} r 8 in 2880 out {out}: {k}", USES[u]);
                let go = |d: &mut Dev| if k == kernel { d.run(&gpu, &cfg) } else { d.launch(&gpu, k, &cfg, None) };
                d.set_c(&gpu, &ops[2]);
                go(&mut d);
                assert_product(&what, &cfg, &offsets, &ops[2], &refs, &d.c(&gpu));
                let ms = median_ms(&gpu, || go(&mut d));
                assert!(ms.is_finite() && ms > 0.0);
                let speedup =
                    if k == kernel { format!(", {:.2}x the general kernel", general_ms / ms) } else { String::new() };
                general_ms = ms;
                println!(
                    "{what}: {ms:.3} ms, {:.2} TFLOP/s, {:.0} GB/s{speedup}",
                    2.0 * mnk as f64 / ms / 1e9,
                    bytes as f64 / ms / 1e6
                );
            }
        }
    }
}
