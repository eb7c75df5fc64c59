//! The routing plan: the `tokens × k` slots grouped by expert, so each expert runs one GEMM.

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
#[cfg(feature = "cuda")]
use oxtune_kernels::Gpu;

#[cfg(feature = "cuda")]
use crate::gpu_util::{check_len, shape_err, to_u32};
use crate::Routing;

/// CUDA source of [`routing_plan_gpu`].
#[cfg(feature = "cuda")]
pub const SRC: &str = include_str!("plan.cu");

/// The most experts [`routing_plan_gpu`] takes (its per-warp counts live in shared memory).
pub const GPU_PLAN_MAX_EXPERTS: usize = 256;

/// Slots sorted by expert (stable: ascending token within an expert).
/// Expert `e` owns slots `offsets[e]..offsets[e + 1]`; slot `s` is token `token[s]`, choice
/// `choice[s]` (its position in the token's top-k), with combine weight `weight[s]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingPlan {
    pub offsets: Vec<usize>,
    pub token: Vec<u32>,
    pub choice: Vec<u32>,
    pub weight: Vec<f32>,
}

impl RoutingPlan {
    pub fn new(r: &Routing) -> Self {
        let mut counts = vec![0usize; r.num_experts + 1];
        for &e in &r.experts {
            counts[e as usize + 1] += 1;
        }
        for e in 0..r.num_experts {
            counts[e + 1] += counts[e];
        }
        let offsets = counts.clone();
        let n = r.experts.len();
        let (mut token, mut choice, mut weight) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
        let mut next = counts;
        for (i, &e) in r.experts.iter().enumerate() {
            let s = next[e as usize];
            next[e as usize] += 1;
            token[s] = (i / r.k) as u32;
            choice[s] = (i % r.k) as u32;
            weight[s] = r.weights[i];
        }
        Self { offsets, token, choice, weight }
    }

    pub fn num_experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Slots of expert `e`.
    pub fn range(&self, e: usize) -> std::ops::Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }

    /// Slot index for (token, choice), the inverse of the sort.
    pub fn slot_of(&self, k: usize) -> Vec<usize> {
        let mut inv = vec![0usize; self.token.len()];
        for s in 0..self.token.len() {
            inv[self.token[s] as usize * k + self.choice[s] as usize] = s;
        }
        inv
    }
}

/// The device buffers [`routing_plan_gpu`] fills, for `n = T·k` routed entries and `E` experts:
/// `offsets [E + 1]`; `token`, `choice`, `weight`, `slot_expert [n]` per slot; `slot_of [n]` per
/// entry (`token · k + choice`).
#[cfg(feature = "cuda")]
pub struct PlanGpu<'a> {
    pub offsets: CudaViewMut<'a, u32>,
    pub token: CudaViewMut<'a, u32>,
    pub choice: CudaViewMut<'a, u32>,
    pub weight: CudaViewMut<'a, f32>,
    pub slot_of: CudaViewMut<'a, u32>,
    pub slot_expert: CudaViewMut<'a, u32>,
}

/// GPU [`RoutingPlan::new`], with [`RoutingPlan::slot_of`] and the expert of every slot
/// (`crate::permute::slot_expert`): from `experts`, `weights [T, k]` (a router's output, on the
/// device) into `out`, bit for bit the reference's, with no copy to the host; one block, so the
/// plan of a step's MoE layer costs a few microseconds instead of a synchronisation. An expert
/// `>= num_experts` (which the reference rejects) gets no slot: its entry's `slot_of` is `u32::MAX`
/// and the slots left over hold token `u32::MAX` and weight NaN, so the layer's output shows it.
#[cfg(feature = "cuda")]
pub fn routing_plan_gpu(
    gpu: &Gpu,
    experts: &CudaView<'_, u32>,
    weights: &CudaView<'_, f32>,
    num_experts: usize,
    k: usize,
    out: &mut PlanGpu<'_>,
) -> oxtune_kernels::Result<()> {
    const OP: &str = "routing_plan";
    if num_experts == 0 || num_experts > GPU_PLAN_MAX_EXPERTS || k == 0 {
        return Err(shape_err(format!(
            "{OP}: k = {k} of {num_experts} experts; the kernel needs 1 <= experts <= {GPU_PLAN_MAX_EXPERTS} and k >= 1"
        )));
    }
    let n = experts.len();
    if n % k != 0 {
        return Err(shape_err(format!("{OP}: experts has {n} elements, expected a multiple of k = {k}")));
    }
    check_len(OP, "weights", weights.len(), n)?;
    check_len(OP, "offsets", out.offsets.len(), num_experts + 1)?;
    for (what, len) in [
        ("token", out.token.len()),
        ("choice", out.choice.len()),
        ("weight", out.weight.len()),
        ("slot_of", out.slot_of.len()),
        ("slot_expert", out.slot_expert.len()),
    ] {
        check_len(OP, what, len, n)?;
    }
    let (n32, k32, e32) = (to_u32(OP, "entries", n)?, k as u32, num_experts as u32);
    let f = gpu.function("moe_plan", SRC, "routing_plan")?;
    // SAFETY: routing_plan(unsigned* offsets, unsigned* token, unsigned* choice, float* weight,
    // unsigned* slot_of, unsigned* slot_expert, const unsigned* experts, const float* weights,
    // unsigned n, unsigned k, unsigned num_experts): offsets holds num_experts + 1 elements and every
    // other buffer n (checked above); slots are written only below the number of entries with an
    // expert < num_experts (<= n) or in [that, n), num_experts <= 256 fits the kernel's shared
    // counts; one block of 1024 threads, as the kernel's warp segments assume.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&mut out.offsets)
            .arg(&mut out.token)
            .arg(&mut out.choice)
            .arg(&mut out.weight)
            .arg(&mut out.slot_of)
            .arg(&mut out.slot_expert)
            .arg(experts)
            .arg(weights)
            .arg(&n32)
            .arg(&k32)
            .arg(&e32)
            .launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 })
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_with_zero_tokens() {
        let r = Routing {
            k: 2,
            num_experts: 4,
            experts: vec![3, 0, 0, 3, 3, 1],
            weights: vec![0.6, 0.4, 0.7, 0.3, 0.9, 0.1],
        };
        let p = RoutingPlan::new(&r);
        assert_eq!(p.offsets, vec![0, 2, 3, 3, 6]);
        assert!(p.range(2).is_empty());
        assert_eq!(p.token, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(p.choice, vec![1, 0, 1, 0, 1, 0]);
        assert_eq!(p.weight, vec![0.4, 0.7, 0.1, 0.6, 0.3, 0.9]);
        let inv = p.slot_of(2);
        for (i, &s) in inv.iter().enumerate() {
            assert_eq!((p.token[s] as usize, p.choice[s] as usize), (i / 2, i % 2));
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use crate::permute::slot_expert;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A routing of `t` tokens: `k` distinct experts each, drawn with a skew (expert e about
    /// `1 + e % 5` times as likely) so the groups are uneven, some possibly empty.
    fn routing(seed: u64, t: usize, e: usize, k: usize) -> Routing {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut experts, mut weights) = (Vec::with_capacity(t * k), Vec::with_capacity(t * k));
        for _ in 0..t {
            let mut chosen: Vec<u32> = Vec::with_capacity(k);
            while chosen.len() < k {
                let x = rng.gen_range(0..e * 3) as u32 / 3;
                let keep = rng.gen_range(0..5) < 1 + x as usize % 5;
                if keep && !chosen.contains(&x) {
                    chosen.push(x);
                }
            }
            experts.extend(chosen);
            weights.extend((0..k).map(|_| rng.gen_range(0.0f32..1.0)));
        }
        Routing { k, num_experts: e, experts, weights }
    }

    struct Bufs {
        offsets: cudarc::driver::CudaSlice<u32>,
        token: cudarc::driver::CudaSlice<u32>,
        choice: cudarc::driver::CudaSlice<u32>,
        weight: cudarc::driver::CudaSlice<f32>,
        slot_of: cudarc::driver::CudaSlice<u32>,
        slot_expert: cudarc::driver::CudaSlice<u32>,
    }

    impl Bufs {
        fn views(&mut self) -> PlanGpu<'_> {
            PlanGpu {
                offsets: self.offsets.as_view_mut(),
                token: self.token.as_view_mut(),
                choice: self.choice.as_view_mut(),
                weight: self.weight.as_view_mut(),
                slot_of: self.slot_of.as_view_mut(),
                slot_expert: self.slot_expert.as_view_mut(),
            }
        }
    }

    /// Runs the kernel on `experts`, `weights` with every output buffer filled with junk first (the
    /// kernel must write all of it).
    fn run(gpu: &Gpu, experts: &[u32], weights: &[f32], e: usize, k: usize) -> Bufs {
        let s = &gpu.stream;
        let n = experts.len();
        let junk = |len: usize| s.clone_htod(&vec![0xdead_beef_u32; len]).unwrap();
        let mut b = Bufs {
            offsets: junk(e + 1),
            token: junk(n),
            choice: junk(n),
            weight: s.clone_htod(&vec![-7.0f32; n]).unwrap(),
            slot_of: junk(n),
            slot_expert: junk(n),
        };
        let (ed, wd) = (s.clone_htod(experts).unwrap(), s.clone_htod(weights).unwrap());
        routing_plan_gpu(gpu, &ed.as_view(), &wd.as_view(), e, k, &mut b.views()).unwrap();
        b
    }

    fn check(gpu: &Gpu, r: &Routing) {
        let (e, k) = (r.num_experts, r.k);
        let what = format!("T {}, E {e}, k {k}", r.experts.len() / k);
        let b = run(gpu, &r.experts, &r.weights, e, k);
        let want = RoutingPlan::new(r);
        let s = &gpu.stream;
        let offsets: Vec<usize> = s.clone_dtoh(&b.offsets).unwrap().into_iter().map(|x| x as usize).collect();
        assert_eq!(offsets, want.offsets, "offsets, {what}");
        assert_eq!(s.clone_dtoh(&b.token).unwrap(), want.token, "token, {what}");
        assert_eq!(s.clone_dtoh(&b.choice).unwrap(), want.choice, "choice, {what}");
        let got_w = s.clone_dtoh(&b.weight).unwrap();
        assert!(got_w.iter().zip(&want.weight).all(|(a, b)| a.to_bits() == b.to_bits()), "weight, {what}");
        let slot_of: Vec<u32> = want.slot_of(k).into_iter().map(|x| x as u32).collect();
        assert_eq!(s.clone_dtoh(&b.slot_of).unwrap(), slot_of, "slot_of, {what}");
        assert_eq!(s.clone_dtoh(&b.slot_expert).unwrap(), slot_expert(&want), "slot_expert, {what}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn matches_the_reference_bit_for_bit() {
        let gpu = Gpu::new(0).expect("a GPU");
        // gpt-oss-20b at 2048 tokens and a MoE chunk's worth, 120b, and odd sizes: fewer entries
        // than warps, entries not a multiple of 32 · 32, one expert, k = 1, E = 256.
        for (i, &(t, e, k)) in [
            (2048, 32, 4),
            (16384, 32, 4),
            (2048, 128, 4),
            (1, 32, 4),
            (7, 8, 2),
            (1000, 1, 1),
            (333, 5, 3),
            (4099, 256, 8),
            (0, 32, 4),
        ]
        .iter()
        .enumerate()
        {
            check(&gpu, &routing(100 + i as u64, t, e, k));
        }
        // Expert 3 of 16 with no tokens at all (the skewed draw may leave none empty).
        let others: Vec<u32> = (0..16).filter(|&x| x != 3).collect();
        let (t, k) = (500, 4);
        let experts = (0..t * k).map(|i| others[(i / k * 7 + i % k * 3) % 15]).collect();
        let mut r = routing(200, t, 16, k);
        r.experts = experts;
        check(&gpu, &r);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn an_expert_out_of_range_gets_no_slot() {
        let gpu = Gpu::new(0).expect("a GPU");
        let (e, k) = (4, 2);
        let experts = [0u32, 1, 9, 2, 3, 0];
        let weights = [0.5f32, 0.25, 0.125, 0.0625, 1.0, 2.0];
        let b = run(&gpu, &experts, &weights, e, k);
        let s = &gpu.stream;
        assert_eq!(s.clone_dtoh(&b.offsets).unwrap(), vec![0, 2, 3, 4, 5]);
        assert_eq!(s.clone_dtoh(&b.slot_of).unwrap(), vec![0, 2, u32::MAX, 3, 4, 1]);
        let token = s.clone_dtoh(&b.token).unwrap();
        assert_eq!(token, vec![0, 2, 0, 1, 2, u32::MAX]);
        assert!(s.clone_dtoh(&b.weight).unwrap()[5].is_nan());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn bad_shapes_are_errors() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let (ed, wd) = (s.clone_htod(&[0u32; 8]).unwrap(), s.clone_htod(&[0f32; 8]).unwrap());
        let mut b = run(&gpu, &[0; 8], &[0.0; 8], 4, 2);
        let mut call = |e: usize, k: usize, weights: usize| {
            let err = routing_plan_gpu(&gpu, &ed.as_view(), &wd.slice(..weights), e, k, &mut b.views()).unwrap_err();
            err.to_string()
        };
        assert!(call(0, 2, 8).contains("1 <= experts <= 256"));
        assert!(call(257, 2, 8).contains("1 <= experts <= 256"));
        assert!(call(4, 0, 8).contains("k >= 1"));
        assert!(call(4, 3, 8).contains("multiple of k = 3"));
        assert!(call(4, 2, 7).contains("weights has 7 elements, expected 8"));
        assert!(call(5, 2, 8).contains("offsets has 5 elements, expected 6"));
    }
}
