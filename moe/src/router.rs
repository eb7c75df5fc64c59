//! Top-k router: `logits = x · Wᵀ + b`, keep the k largest, softmax over those k only.

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
#[cfg(feature = "cuda")]
use oxtune_kernels::Gpu;

#[cfg(feature = "cuda")]
use crate::gpu_util::{check_len, shape_err, to_u32};

use crate::{gemm, Error, Result};

/// CUDA source of [`topk_softmax_gpu`] and [`route_backward_gpu`].
#[cfg(feature = "cuda")]
pub const SRC: &str = include_str!("router.cu");

/// Most experts [`topk_softmax_gpu`] handles (gpt-oss-120b has 128): four logits per lane of a warp.
#[cfg(feature = "cuda")]
pub const GPU_MAX_EXPERTS: usize = 128;
/// Most choices per token [`topk_softmax_gpu`] handles (gpt-oss uses 4).
#[cfg(feature = "cuda")]
pub const GPU_MAX_K: usize = 8;

/// Routing decision for `[tokens]`: `experts[t * k + j]` and `weights[t * k + j]`, j-th largest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub num_experts: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.k
    }
}

/// Router logits `[tokens, E] = x [tokens, H] · w [E, H]ᵀ + b [E]`.
pub fn router_logits(x: &[f32], w: &[f32], b: &[f32], hidden: usize) -> Vec<f32> {
    let e = b.len();
    let t = x.len() / hidden;
    let mut out: Vec<f32> = (0..t).flat_map(|_| b.iter().copied()).collect();
    gemm::matmul(x, w, &mut out, t, hidden, e, true, 1.0);
    out
}

/// Top-k over `logits [tokens, E]` (descending; equal logits go to the lower expert index, which is
/// what torch.topk returns on CPU), then softmax over the k selected logits.
pub fn route(logits: &[f32], num_experts: usize, k: usize) -> Result<Routing> {
    if k == 0 || k > num_experts {
        return Err(Error::TopK { k, experts: num_experts });
    }
    if !logits.len().is_multiple_of(num_experts) {
        return Err(Error::Shape(format!("{} logits is not a multiple of {num_experts} experts", logits.len())));
    }
    let t = logits.len() / num_experts;
    let mut experts = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    let mut order: Vec<u32> = Vec::with_capacity(num_experts);
    for row in logits.chunks_exact(num_experts) {
        order.clear();
        order.extend(0..num_experts as u32);
        // total_cmp puts NaN above everything, so a NaN logit is selected and poisons the weights
        // visibly instead of being silently skipped.
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let sel = &order[..k];
        let m = row[sel[0] as usize];
        let exps: Vec<f32> = sel.iter().map(|&e| (row[e as usize] - m).exp()).collect();
        let z: f32 = exps.iter().sum();
        experts.extend_from_slice(sel);
        weights.extend(exps.iter().map(|v| v / z));
    }
    Ok(Routing { k, num_experts, experts, weights })
}

/// Backward of the softmax over the selected logits: given `dweights [tokens, k]`, returns
/// `dlogits [tokens, E]` (zero for unselected experts): `dl_j = w_j (dw_j - Σ_i w_i dw_i)`.
pub fn route_backward(routing: &Routing, dweights: &[f32]) -> Vec<f32> {
    let (k, e) = (routing.k, routing.num_experts);
    let mut dlogits = vec![0.0f32; routing.tokens() * e];
    for (t, ((w, dw), sel)) in
        routing.weights.chunks_exact(k).zip(dweights.chunks_exact(k)).zip(routing.experts.chunks_exact(k)).enumerate()
    {
        let dot: f32 = w.iter().zip(dw).map(|(a, b)| a * b).sum();
        for j in 0..k {
            dlogits[t * e + sel[j] as usize] = w[j] * (dw[j] - dot);
        }
    }
    dlogits
}

/// One warp per token, 8 warps a block, blocks striding over the tokens.
#[cfg(feature = "cuda")]
fn warp_per_token(tokens: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (tokens.div_ceil(8).min(65535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// GPU [`route`]: `logits [T, E]` → `experts [T, k]`, `weights [T, k]`, with `E <= 128` and
/// `1 <= k <= min(E, 8)`. Same selection bit for bit (total_cmp order, ties to the lower expert);
/// the weights differ from the reference only by `expf`'s rounding.
#[cfg(feature = "cuda")]
pub fn topk_softmax_gpu(
    gpu: &Gpu,
    logits: &CudaView<'_, f32>,
    num_experts: usize,
    k: usize,
    experts: &mut CudaViewMut<'_, u32>,
    weights: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    const OP: &str = "topk_softmax";
    if num_experts == 0 || num_experts > GPU_MAX_EXPERTS || k == 0 || k > num_experts.min(GPU_MAX_K) {
        return Err(shape_err(format!(
            "{OP}: k = {k} of {num_experts} experts; the kernel needs 1 <= experts <= {GPU_MAX_EXPERTS} and 1 <= k <= min(experts, {GPU_MAX_K})"
        )));
    }
    if logits.len() % num_experts != 0 {
        return Err(shape_err(format!(
            "{OP}: logits has {} elements, expected a multiple of {num_experts} experts",
            logits.len()
        )));
    }
    let tokens = logits.len() / num_experts;
    check_len(OP, "experts", experts.len(), tokens * k)?;
    check_len(OP, "weights", weights.len(), tokens * k)?;
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function("moe_router", SRC, "topk_softmax_f32")?;
    let (tokens64, e32, k32) = (tokens as u64, num_experts as u32, k as u32);
    // SAFETY: topk_softmax_f32(unsigned* experts, float* weights, const float* logits, unsigned long
    // long tokens, unsigned num_experts, unsigned k): experts and weights hold tokens·k elements,
    // logits tokens·num_experts (checked above), 1 <= k <= min(num_experts, 8), num_experts <= 128;
    // blocks are whole warps that stride over the tokens, so any grid stays in bounds.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(experts)
            .arg(weights)
            .arg(logits)
            .arg(&tokens64)
            .arg(&e32)
            .arg(&k32)
            .launch(warp_per_token(tokens))
    }?;
    Ok(())
}

/// GPU [`route_backward`]: `experts`, `weights`, `dweights [T, k]` → `dlogits [T, E]` (whole rows
/// assigned, zero for unselected experts). Bit-identical to the reference (same rounding order).
#[cfg(feature = "cuda")]
pub fn route_backward_gpu(
    gpu: &Gpu,
    experts: &CudaView<'_, u32>,
    weights: &CudaView<'_, f32>,
    dweights: &CudaView<'_, f32>,
    num_experts: usize,
    k: usize,
    dlogits: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    const OP: &str = "route_backward";
    if k == 0 || k > num_experts {
        return Err(shape_err(format!("{OP}: k = {k} of {num_experts} experts; needs 1 <= k <= experts")));
    }
    if experts.len() % k != 0 {
        return Err(shape_err(format!("{OP}: experts has {} elements, expected a multiple of k = {k}", experts.len())));
    }
    let tokens = experts.len() / k;
    check_len(OP, "weights", weights.len(), tokens * k)?;
    check_len(OP, "dweights", dweights.len(), tokens * k)?;
    check_len(OP, "dlogits", dlogits.len(), tokens * num_experts)?;
    if tokens == 0 {
        return Ok(());
    }
    let num_experts32 = to_u32(OP, "num_experts", num_experts)?;
    let f = gpu.function("moe_router", SRC, "route_backward_f32")?;
    let (tokens64, k32) = (tokens as u64, k as u32);
    // SAFETY: route_backward_f32(float* dlogits, const unsigned* experts, const float* weights,
    // const float* dweights, unsigned long long tokens, unsigned num_experts, unsigned k): dlogits
    // holds tokens·num_experts floats, the other three tokens·k elements (checked above); each
    // warp writes only its token's row, indices e < num_experts, and strides over the tokens.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dlogits)
            .arg(experts)
            .arg(weights)
            .arg(dweights)
            .arg(&tokens64)
            .arg(&num_experts32)
            .arg(&k32)
            .launch(warp_per_token(tokens))
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top2_softmax_over_selected_only() {
        let logits = [0.1, 2.0, -1.0, 1.0, /* token 1 */ 5.0, 5.0, 0.0, 4.0];
        let r = route(&logits, 4, 2).unwrap();
        assert_eq!(r.experts, vec![1, 3, 0, 1]);
        let e = (-1.0f32).exp();
        assert!((r.weights[0] - 1.0 / (1.0 + e)).abs() < 1e-7);
        assert!((r.weights[1] - e / (1.0 + e)).abs() < 1e-7);
        assert_eq!(&r.weights[2..], &[0.5, 0.5]);
    }

    #[test]
    fn top4_of_eight() {
        let logits = [3.0, -2.0, 7.0, 0.5, 1.5, 9.0, -0.5, 2.0];
        let r = route(&logits, 8, 4).unwrap();
        assert_eq!(r.experts, vec![5, 2, 0, 7]);
        let sel = [9.0f32, 7.0, 3.0, 2.0];
        let z: f32 = sel.iter().map(|v| (v - 9.0).exp()).sum();
        for (w, s) in r.weights.iter().zip(sel) {
            assert!((w - (s - 9.0).exp() / z).abs() < 1e-7);
        }
    }

    #[test]
    fn k_equal_to_experts_and_invalid_k() {
        assert_eq!(route(&[1.0, 2.0], 2, 2).unwrap().experts, vec![1, 0]);
        assert_eq!(route(&[1.0, 2.0], 2, 3), Err(Error::TopK { k: 3, experts: 2 }));
        assert_eq!(route(&[1.0, 2.0], 2, 0), Err(Error::TopK { k: 0, experts: 2 }));
        assert!(route(&[1.0, 2.0, 3.0], 2, 1).is_err());
    }

    #[test]
    fn router_logits_is_linear_with_bias() {
        // x [2, 3], w [2, 3], b [2].
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        let w = [0.5, -1.0, 2.0, 1.0, 1.0, 1.0];
        let b = [0.25, -0.5];
        let l = router_logits(&x, &w, &b, 3);
        assert_eq!(l, vec![0.5 - 2.0 + 6.0 + 0.25, 6.0 - 0.5, -0.5 - 0.5 + 4.0 + 0.25, 1.5 - 0.5]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let logits = [0.3f64, -1.2, 0.8, 2.1, 0.0, -0.4];
        let dw = [0.7f64, -1.1, 0.4];
        // f(l) = Σ_j dw_j · softmax_topk(l)_j with the selection fixed.
        let f = |l: &[f64]| {
            let r = route(&l.iter().map(|&v| v as f32).collect::<Vec<_>>(), 6, 3).unwrap();
            let sel: Vec<f64> = r.experts.iter().map(|&e| l[e as usize]).collect();
            let m = sel.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sel.iter().map(|v| (v - m).exp()).sum();
            sel.iter().zip(dw).map(|(v, d)| d * (v - m).exp() / z).sum::<f64>()
        };
        let r = route(&logits.map(|v| v as f32), 6, 3).unwrap();
        let g = route_backward(&r, &dw.map(|v| v as f32));
        for i in 0..6 {
            let (mut p, mut n) = (logits, logits);
            p[i] += 1e-5;
            n[i] -= 1e-5;
            let fd = (f(&p) - f(&n)) / 2e-5;
            assert!((g[i] as f64 - fd).abs() < 1e-4, "logit {i}: {} vs {fd}", g[i]);
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use oxtune_kernels::testing::{assert_close, randn};

    /// Routes `logits [T, e]` on the GPU and checks it against [`route`], then the backward with
    /// random `dweights` against [`route_backward`] (fed the same routing).
    fn check(gpu: &Gpu, logits: &[f32], e: usize, k: usize) {
        let want = route(logits, e, k).unwrap();
        let t = want.tokens();
        let s = &gpu.stream;
        let logits_d = s.clone_htod(logits).unwrap();
        let (mut experts_d, mut weights_d) =
            (s.alloc_zeros::<u32>(t * k).unwrap(), s.alloc_zeros::<f32>(t * k).unwrap());
        topk_softmax_gpu(gpu, &logits_d.as_view(), e, k, &mut experts_d.as_view_mut(), &mut weights_d.as_view_mut())
            .unwrap();
        let what = format!("T {t}, E {e}, k {k}");
        assert_eq!(s.clone_dtoh(&experts_d).unwrap(), want.experts, "selected experts, {what}");
        // Softmax over at most 8 values in the same order; only expf's rounding (2 ulp on the GPU)
        // differs, and the weights are in [0, 1]: rtol 1e-5.
        assert_close(&format!("weights {what}"), &s.clone_dtoh(&weights_d).unwrap(), &want.weights, 1e-7, 1e-5);

        let dw = randn(e as u64 * 1000 + k as u64, t * k, 1.0);
        let (experts_in, weights_in, dw_d) =
            (s.clone_htod(&want.experts).unwrap(), s.clone_htod(&want.weights).unwrap(), s.clone_htod(&dw).unwrap());
        let mut dlogits_d = s.clone_htod(&randn(7, t * e, 1.0)).unwrap(); // whole rows must be overwritten
        route_backward_gpu(
            gpu,
            &experts_in.as_view(),
            &weights_in.as_view(),
            &dw_d.as_view(),
            e,
            k,
            &mut dlogits_d.as_view_mut(),
        )
        .unwrap();
        // Same operations in the same order without FMA contraction: bit-identical is expected.
        let dl = route_backward(&want, &dw);
        assert_close(&format!("dlogits {what}"), &s.clone_dtoh(&dlogits_d).unwrap(), &dl, 1e-7, 1e-6);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gpt_oss_20b_top4_of_32() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, &randn(1, 1000 * 32, 3.0), 32, 4);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn top4_and_top8_of_128_experts() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, &randn(2, 500 * 128, 3.0), 128, 4);
        check(&gpu, &randn(3, 500 * 128, 3.0), 128, 8);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn top1() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, &randn(4, 300 * 4, 3.0), 4, 1);
        check(&gpu, &randn(5, 300 * 32, 3.0), 32, 1);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn single_token() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, &randn(6, 32, 3.0), 32, 4);
        check(&gpu, &randn(7, 4, 3.0), 4, 4);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_expert_counts() {
        let gpu = Gpu::new(0).expect("a GPU");
        for (seed, e, k) in [(8u64, 5usize, 2usize), (9, 33, 3), (10, 100, 7), (11, 1, 1), (12, 127, 8)] {
            check(&gpu, &randn(seed, 37 * e, 3.0), e, k);
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn ties_go_to_the_lower_expert() {
        let gpu = Gpu::new(0).expect("a GPU");
        // Logits rounded to {-2, -1, 0, 1, 2}: most rows have ties across the top-k boundary.
        let mut logits: Vec<f32> = randn(13, 400 * 32, 2.5).iter().map(|v| v.round()).collect();
        logits.extend([1.0f32; 32]); // one row all equal: experts 0..4
        let mut zeros = [0.0f32; 32]; // -0.0 ranks below +0.0 under total_cmp
        for e in (0..32).step_by(2) {
            zeros[e] = -0.0;
        }
        logits.extend(zeros);
        check(&gpu, &logits, 32, 4);
        check(&gpu, &logits[..400 * 32], 128, 8);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn nan_and_infinite_logits_rank_like_total_cmp() {
        let gpu = Gpu::new(0).expect("a GPU");
        let neg_nan = f32::from_bits(0xffc0_0000);
        let rows: [[f32; 8]; 4] = [
            [0.5, f32::NAN, 1.0, -1.0, 2.0, 0.0, 3.0, -2.0], // NaN is selected first: NaN weights
            [neg_nan, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, f32::NEG_INFINITY], // -NaN ranks last
            [f32::INFINITY, 1.0, f32::INFINITY, 0.0, 0.0, 0.0, 0.0, 0.0],
            [f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0, 0.0, -3.0, 2.0, f32::NEG_INFINITY, 4.0],
        ];
        let logits: Vec<f32> = rows.iter().flatten().copied().collect();
        check(&gpu, &logits, 8, 4);
        check(&gpu, &logits, 8, 8);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn more_tokens_than_warps_in_the_grid() {
        let gpu = Gpu::new(0).expect("a GPU");
        // 65535 blocks of 8 warps cover 524280 tokens; the rest take a second pass.
        check(&gpu, &randn(14, 600_000 * 4, 3.0), 4, 2);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn invalid_k_or_expert_count_is_a_shape_error() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let logits = s.alloc_zeros::<f32>(129 * 2).unwrap();
        let (mut ex, mut w) = (s.alloc_zeros::<u32>(2 * 9).unwrap(), s.alloc_zeros::<f32>(2 * 9).unwrap());
        for (e, k) in [(32usize, 9usize), (32, 0), (129, 1), (4, 5)] {
            let l = logits.slice(..2 * e);
            let (mut exv, mut wv) = (ex.slice_mut(..2 * k), w.slice_mut(..2 * k));
            let err = topk_softmax_gpu(&gpu, &l, e, k, &mut exv, &mut wv).unwrap_err().to_string();
            assert!(err.starts_with(&format!("topk_softmax: k = {k} of {e} experts")), "{err}");
        }
        let err = topk_softmax_gpu(&gpu, &logits.slice(..64), 32, 4, &mut ex.slice_mut(..7), &mut w.slice_mut(..8));
        assert_eq!(err.unwrap_err().to_string(), "topk_softmax: experts has 7 elements, expected 8");
    }
}
