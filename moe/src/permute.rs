//! Moving rows between token order `[T, H]` and slot order `[S, H]` (the `S = T·k` slots sorted by
//! expert, as a [`RoutingPlan`] orders them), and the expert bias: the CPU references and, with the
//! `cuda` feature, the kernels.
//!
//! Index arrays are `u32`, as on the device. An index out of range never reads out of bounds: the
//! row it feeds comes out NaN, in the references and on the GPU alike, so that the loss shows it.
//! The sums over a token's k slots are assigned (no atomics) in top-k order `j = 0..k`.

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
#[cfg(feature = "cuda")]
use oxtune_kernels::Gpu;

#[cfg(feature = "cuda")]
use crate::gpu_util::{check_len, shape_err, to_u32};
use crate::RoutingPlan;

/// CUDA source of the launchers of this module.
#[cfg(feature = "cuda")]
pub const SRC: &str = include_str!("permute.cu");

/// The expert of every slot `[S]`, from the plan's offsets.
pub fn slot_expert(plan: &RoutingPlan) -> Vec<u32> {
    (0..plan.num_experts()).flat_map(|e| std::iter::repeat_n(e as u32, plan.range(e).len())).collect()
}

/// `xs [S, H]` with `xs[s] = x[token[s]]`, for `x [T, H]` and `token [S]`.
pub fn gather_rows(x: &[f32], token: &[u32], hidden: usize) -> Vec<f32> {
    assert!(hidden > 0 && x.len().is_multiple_of(hidden), "gather_rows: x is not [T, {hidden}]");
    let mut xs = Vec::with_capacity(token.len() * hidden);
    for &t in token {
        match x.get(t as usize * hidden..(t as usize + 1) * hidden) {
            Some(row) => xs.extend_from_slice(row),
            None => xs.extend(std::iter::repeat_n(f32::NAN, hidden)),
        }
    }
    xs
}

/// `xs [S, H]` with `xs[s] = weight[s]·x[token[s]]`: the `dys` of [`combine_backward`] alone, which
/// needs no expert output.
pub fn weighted_gather_rows(x: &[f32], weight: &[f32], token: &[u32], hidden: usize) -> Vec<f32> {
    assert_eq!(weight.len(), token.len(), "weighted_gather_rows: weight and token lengths");
    let mut xs = gather_rows(x, token, hidden);
    for (row, &w) in xs.chunks_exact_mut(hidden).zip(weight) {
        row.iter_mut().for_each(|v| *v *= w);
    }
    xs
}

/// The `dweights` of [`combine_backward`] from the experts' input side, for experts whose output
/// is affine in their input `z [S, I]`: `y[s] = M_e z[s] + bias[e]` (`M_e` may be a sum, such as
/// a weight plus a LoRA product). Given `dz [S, I]`, the gradient of `z` the backward computes
/// anyway, `dz[s] = weight[s]·M_eᵀ dout[token[s]]`:
/// `dweights[token[s]·k + choice[s]] = dz[s]·z[s] / weight[s] + dout[token[s]]·bias[e]`
/// (`dout·y = (M_eᵀ dout)·z + dout·bias`), so a backward that recomputes the experts need not
/// recompute their output projection. `e = slot_expert[s]`, `bias [E, H]`, `dout [T, H]`. A slot of
/// weight 0 has `dz = 0` and gets the bias term alone (its routing gradient, `weight · (…)`, is 0
/// whatever it is). Entries without a slot stay 0 here (the GPU version leaves them unwritten);
/// an index out of range gives NaN.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_from_input(
    dz: &[f32],
    z: &[f32],
    dout: &[f32],
    bias: &[f32],
    weight: &[f32],
    token: &[u32],
    choice: &[u32],
    slot_expert: &[u32],
    k: usize,
    hidden: usize,
) -> Vec<f32> {
    let slots = weight.len();
    assert!(hidden > 0 && dout.len().is_multiple_of(hidden), "weight_grad_from_input: dout is not [T, {hidden}]");
    assert!(slots == 0 || (dz.len().is_multiple_of(slots) && z.len() == dz.len()), "weight_grad_from_input: dz, z");
    assert!(token.len() == slots && choice.len() == slots && slot_expert.len() == slots, "weight_grad_from_input");
    let inner = dz.len().checked_div(slots).unwrap_or(0);
    let tokens = dout.len() / hidden;
    let mut dweights = vec![0.0f32; tokens * k];
    for s in 0..slots {
        let (t, j, e) = (token[s] as usize, choice[s] as usize, slot_expert[s] as usize);
        if t >= tokens || j >= k {
            continue;
        }
        let Some(b) = bias.get(e * hidden..(e + 1) * hidden) else {
            dweights[t * k + j] = f32::NAN;
            continue;
        };
        let zs = &z[s * inner..(s + 1) * inner];
        let through: f32 = dz[s * inner..(s + 1) * inner].iter().zip(zs).map(|(a, b)| a * b).sum();
        let via_bias: f32 = dout[t * hidden..(t + 1) * hidden].iter().zip(b).map(|(a, b)| a * b).sum();
        dweights[t * k + j] = if weight[s] != 0.0 { through / weight[s] } else { 0.0 } + via_bias;
    }
    dweights
}

/// `out [T, H]`, `out[t] = Σ_j w(s)·y[s]` over `s = slot_of[t·k + j]` in `j` order, from `y [S, H]`;
/// `w(s) = weight[s]`, or 1 without weights.
fn sum_slots(y: &[f32], weight: Option<&[f32]>, slot_of: &[u32], k: usize, hidden: usize) -> Vec<f32> {
    assert!(k > 0 && slot_of.len().is_multiple_of(k), "slot_of is not [T, {k}]");
    assert!(hidden > 0 && y.len().is_multiple_of(hidden), "y is not [S, {hidden}]");
    let slots = y.len() / hidden;
    assert!(weight.is_none_or(|w| w.len() == slots), "weight is not [{slots}]");
    let mut out = vec![0.0f32; slot_of.len() / k * hidden];
    for (o, sel) in out.chunks_exact_mut(hidden).zip(slot_of.chunks_exact(k)) {
        for &s in sel {
            let s = s as usize;
            if s >= slots {
                o.fill(f32::NAN);
                break;
            }
            let row = &y[s * hidden..(s + 1) * hidden];
            match weight {
                Some(w) => o.iter_mut().zip(row).for_each(|(a, v)| *a += w[s] * v),
                None => o.iter_mut().zip(row).for_each(|(a, v)| *a += v),
            }
        }
    }
    out
}

/// Combine: `out [T, H]`, `out[t] = Σ_j weight[s]·y[s]` with `s = slot_of[t·k + j]`, summed in `j`
/// order, for `y [S, H]`, `weight [S]`, `slot_of [T·k]`.
pub fn combine(y: &[f32], weight: &[f32], slot_of: &[u32], k: usize, hidden: usize) -> Vec<f32> {
    sum_slots(y, Some(weight), slot_of, k, hidden)
}

/// Backward of [`combine`] for `dout [T, H]`: `(dys [S, H], dweights [T·k])` with
/// `dys[s] = weight[s]·dout[token[s]]` and `dweights[token[s]·k + choice[s]] = dout[token[s]] · y[s]`.
/// Every `(t, j)` should have a slot (a plan's do); entries without one stay 0 here and are not
/// written by the kernel.
pub fn combine_backward(
    dout: &[f32],
    y: &[f32],
    weight: &[f32],
    token: &[u32],
    choice: &[u32],
    k: usize,
    hidden: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert!(hidden > 0 && dout.len().is_multiple_of(hidden), "combine_backward: dout is not [T, {hidden}]");
    let slots = weight.len();
    assert!(y.len() == slots * hidden && token.len() == slots && choice.len() == slots, "combine_backward: shapes");
    let tokens = dout.len() / hidden;
    let mut dweights = vec![0.0f32; tokens * k];
    let mut dys = vec![0.0f32; slots * hidden];
    for (s, row) in dys.chunks_exact_mut(hidden).enumerate() {
        let t = token[s] as usize;
        let Some(d) = dout.get(t * hidden..(t + 1) * hidden) else {
            row.fill(f32::NAN);
            continue;
        };
        if (choice[s] as usize) < k {
            dweights[t * k + choice[s] as usize] =
                d.iter().zip(&y[s * hidden..(s + 1) * hidden]).map(|(a, b)| a * b).sum();
        }
        for (o, v) in row.iter_mut().zip(d) {
            *o = weight[s] * v;
        }
    }
    (dys, dweights)
}

/// Backward of [`gather_rows`]: `dx [T, H]`, `dx[t] = Σ_j dxs[slot_of[t·k + j]]` in `j` order, for
/// `dxs [S, H]`.
pub fn unpermute_sum(dxs: &[f32], slot_of: &[u32], k: usize, hidden: usize) -> Vec<f32> {
    sum_slots(dxs, None, slot_of, k, hidden)
}

/// `y[s] += bias[slot_expert[s]]` for `y [S, n]`, `bias [E, n]`, `slot_expert [S]`.
pub fn add_expert_bias(y: &mut [f32], bias: &[f32], slot_expert: &[u32], n: usize) {
    assert!(n > 0 && bias.len().is_multiple_of(n) && y.len() == slot_expert.len() * n, "add_expert_bias: shapes");
    for (row, &e) in y.chunks_exact_mut(n).zip(slot_expert) {
        match bias.get(e as usize * n..(e as usize + 1) * n) {
            Some(b) => row.iter_mut().zip(b).for_each(|(o, v)| *o += v),
            None => row.fill(f32::NAN),
        }
    }
}

/// Blocks stride over `rows`, threads over a row of `width`: a power of two from 32 to 256.
#[cfg(feature = "cuda")]
fn rows_config(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.next_power_of_two().clamp(32, 256) as u32;
    LaunchConfig { grid_dim: (rows.min(65535) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// `len = rows · width` with `width > 0`: returns `rows`.
#[cfg(feature = "cuda")]
fn rows_of(op: &str, what: &str, len: usize, width: usize, width_name: &str) -> oxtune_kernels::Result<usize> {
    if width > 0 && len.is_multiple_of(width) {
        Ok(len / width)
    } else {
        Err(shape_err(format!("{op}: {what} has {len} elements, expected a multiple of {width_name} = {width}")))
    }
}

/// GPU [`gather_rows`]: `x [T, H]`, `token [S]` → `xs [S, H]` (assigned). Exact.
#[cfg(feature = "cuda")]
pub fn gather_rows_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    token: &CudaView<'_, u32>,
    hidden: usize,
    xs: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    gather_gpu(gpu, "gather_rows", x, None, token, hidden, xs)
}

/// GPU [`weighted_gather_rows`]: `x [T, H]`, `weight`, `token [S]` → `xs [S, H]` (assigned). Exact
/// (one product).
#[cfg(feature = "cuda")]
pub fn weighted_gather_rows_gpu(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    token: &CudaView<'_, u32>,
    hidden: usize,
    xs: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    gather_gpu(gpu, "weighted_gather_rows", x, Some(weight), token, hidden, xs)
}

/// Shared launcher of `gather_rows_f32` (without `weight`) and `weighted_gather_rows_f32`.
#[cfg(feature = "cuda")]
fn gather_gpu(
    gpu: &Gpu,
    op: &str,
    x: &CudaView<'_, f32>,
    weight: Option<&CudaView<'_, f32>>,
    token: &CudaView<'_, u32>,
    hidden: usize,
    xs: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    let tokens = to_u32(op, "tokens", rows_of(op, "x", x.len(), hidden, "hidden")?)?;
    let slots = token.len();
    check_len(op, "xs", xs.len(), slots * hidden)?;
    if let Some(w) = weight {
        check_len(op, "weight", w.len(), slots)?;
    }
    if slots == 0 {
        return Ok(());
    }
    let (slots64, hidden32) = (slots as u64, to_u32(op, "hidden", hidden)?);
    let cfg = rows_config(slots, hidden);
    match weight {
        // SAFETY: gather_rows_f32(float* xs, const float* x, const unsigned* token, unsigned long
        // long slots, unsigned tokens, unsigned hidden): xs holds slots·hidden floats, x
        // tokens·hidden, token slots (checked above); rows of tokens >= tokens are never read;
        // blocks stride over the slots.
        None => unsafe {
            let f = gpu.function("moe_permute", SRC, "gather_rows_f32")?;
            gpu.stream
                .launch_builder(&f)
                .arg(xs)
                .arg(x)
                .arg(token)
                .arg(&slots64)
                .arg(&tokens)
                .arg(&hidden32)
                .launch(cfg)
        }?,
        // SAFETY: weighted_gather_rows_f32(float* xs, const float* x, const float* weight, const
        // unsigned* token, unsigned long long slots, unsigned tokens, unsigned hidden): as above,
        // and weight holds slots floats (checked above).
        Some(w) => unsafe {
            let f = gpu.function("moe_permute", SRC, "weighted_gather_rows_f32")?;
            gpu.stream
                .launch_builder(&f)
                .arg(xs)
                .arg(x)
                .arg(w)
                .arg(token)
                .arg(&slots64)
                .arg(&tokens)
                .arg(&hidden32)
                .launch(cfg)
        }?,
    };
    Ok(())
}

/// GPU [`weight_grad_from_input`]: `dz`, `z [S, I]`, `dout [T, H]`, `bias [E, H]`, `weight`,
/// `token`, `choice`, `slot_expert [S]` → `dweights [T·k]` (assigned for every `(token[s],
/// choice[s])`; the two dots are block reductions, so they differ from the reference by rounding).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_from_input_gpu(
    gpu: &Gpu,
    dz: &CudaView<'_, f32>,
    z: &CudaView<'_, f32>,
    dout: &CudaView<'_, f32>,
    bias: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    token: &CudaView<'_, u32>,
    choice: &CudaView<'_, u32>,
    slot_expert: &CudaView<'_, u32>,
    k: usize,
    hidden: usize,
    dweights: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    const OP: &str = "weight_grad_from_input";
    let tokens = to_u32(OP, "tokens", rows_of(OP, "dout", dout.len(), hidden, "hidden")?)?;
    let experts = to_u32(OP, "experts", rows_of(OP, "bias", bias.len(), hidden, "hidden")?)?;
    let slots = weight.len();
    check_len(OP, "token", token.len(), slots)?;
    check_len(OP, "choice", choice.len(), slots)?;
    check_len(OP, "slot_expert", slot_expert.len(), slots)?;
    check_len(OP, "dweights", dweights.len(), tokens as usize * k)?;
    if slots == 0 {
        return Ok(());
    }
    let inner = rows_of(OP, "dz", dz.len(), slots, "slots")?;
    check_len(OP, "z", z.len(), slots * inner)?;
    let f = gpu.function("moe_permute", SRC, "weight_grad_from_input_f32")?;
    let (slots64, k32, inner32, hidden32) =
        (slots as u64, to_u32(OP, "k", k)?, to_u32(OP, "inner", inner)?, to_u32(OP, "hidden", hidden)?);
    // SAFETY: weight_grad_from_input_f32(float* dweights, const float* dz, const float* z, const
    // float* dout, const float* bias, const float* weight, const unsigned* token, const unsigned*
    // choice, const unsigned* slot_expert, unsigned long long slots, unsigned tokens, unsigned
    // experts, unsigned k, unsigned inner, unsigned hidden): dz and z hold slots·inner floats, dout
    // tokens·hidden, bias experts·hidden, dweights tokens·k, weight, token, choice and slot_expert
    // slots (checked above); rows of tokens >= tokens or experts >= experts are never read and
    // dweights is written only for token < tokens and choice < k; the block is a power of two
    // >= 32 (block_sum) and strides over the slots.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dweights)
            .arg(dz)
            .arg(z)
            .arg(dout)
            .arg(bias)
            .arg(weight)
            .arg(token)
            .arg(choice)
            .arg(slot_expert)
            .arg(&slots64)
            .arg(&tokens)
            .arg(&experts)
            .arg(&k32)
            .arg(&inner32)
            .arg(&hidden32)
            .launch(rows_config(slots, inner.max(hidden)))
    }?;
    Ok(())
}

/// Shared launcher of `combine_f32` and `combine_add_f32` (with `weight`; `accumulate` picks the
/// second) and `unpermute_sum_f32` (without).
#[cfg(feature = "cuda")]
fn sum_slots_gpu(
    gpu: &Gpu,
    op: &str,
    y: &CudaView<'_, f32>,
    weight: Option<&CudaView<'_, f32>>,
    slot_of: &CudaView<'_, u32>,
    k: usize,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
    accumulate: bool,
) -> oxtune_kernels::Result<()> {
    let slots = to_u32(op, "slots", rows_of(op, "y", y.len(), hidden, "hidden")?)?;
    if let Some(w) = weight {
        check_len(op, "weight", w.len(), slots as usize)?;
    }
    let tokens = rows_of(op, "slot_of", slot_of.len(), k, "k")?;
    check_len(op, "out", out.len(), tokens * hidden)?;
    if tokens == 0 {
        return Ok(());
    }
    let (tokens64, k32, hidden32) = (tokens as u64, to_u32(op, "k", k)?, to_u32(op, "hidden", hidden)?);
    let cfg = rows_config(tokens, hidden);
    match weight {
        Some(w) => {
            let name = if accumulate { "combine_add_f32" } else { "combine_f32" };
            let f = gpu.function("moe_permute", SRC, name)?;
            // SAFETY: combine_f32 and combine_add_f32(float* out, const float* y, const float* weight, const unsigned*
            // slot_of, unsigned long long tokens, unsigned slots, unsigned k, unsigned hidden): out
            // holds tokens·hidden floats, y slots·hidden, weight slots, slot_of tokens·k (checked
            // above); slot indices >= slots are never read; blocks stride over the tokens.
            unsafe {
                gpu.stream
                    .launch_builder(&f)
                    .arg(out)
                    .arg(y)
                    .arg(w)
                    .arg(slot_of)
                    .arg(&tokens64)
                    .arg(&slots)
                    .arg(&k32)
                    .arg(&hidden32)
                    .launch(cfg)
            }?;
        }
        None => {
            let f = gpu.function("moe_permute", SRC, "unpermute_sum_f32")?;
            // SAFETY: unpermute_sum_f32(float* dx, const float* dxs, const unsigned* slot_of,
            // unsigned long long tokens, unsigned slots, unsigned k, unsigned hidden): dx holds
            // tokens·hidden floats, dxs slots·hidden, slot_of tokens·k (checked above); slot
            // indices >= slots are never read; blocks stride over the tokens.
            unsafe {
                gpu.stream
                    .launch_builder(&f)
                    .arg(out)
                    .arg(y)
                    .arg(slot_of)
                    .arg(&tokens64)
                    .arg(&slots)
                    .arg(&k32)
                    .arg(&hidden32)
                    .launch(cfg)
            }?;
        }
    }
    Ok(())
}

/// GPU [`combine`]: `y [S, H]`, `weight [S]`, `slot_of [T·k]` → `out [T, H]` (assigned). Rounded
/// like the reference, so bit-identical to it.
#[cfg(feature = "cuda")]
pub fn combine_gpu(
    gpu: &Gpu,
    y: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    slot_of: &CudaView<'_, u32>,
    k: usize,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    sum_slots_gpu(gpu, "combine", y, Some(weight), slot_of, k, hidden, out, false)
}

/// [`combine_gpu`] added to `out [T, H]` (`out += combine`: a residual stream), the sum rounded
/// first, so bit-identical to the reference's combine followed by an f32 add.
#[cfg(feature = "cuda")]
pub fn combine_add_gpu(
    gpu: &Gpu,
    y: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    slot_of: &CudaView<'_, u32>,
    k: usize,
    hidden: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    sum_slots_gpu(gpu, "combine", y, Some(weight), slot_of, k, hidden, out, true)
}

/// GPU [`unpermute_sum`]: `dxs [S, H]`, `slot_of [T·k]` → `dx [T, H]` (assigned). Bit-identical to
/// the reference.
#[cfg(feature = "cuda")]
pub fn unpermute_sum_gpu(
    gpu: &Gpu,
    dxs: &CudaView<'_, f32>,
    slot_of: &CudaView<'_, u32>,
    k: usize,
    hidden: usize,
    dx: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    sum_slots_gpu(gpu, "unpermute_sum", dxs, None, slot_of, k, hidden, dx, false)
}

/// GPU [`combine_backward`]: `dout [T, H]`, `y [S, H]`, `weight`, `token`, `choice [S]` →
/// `dys [S, H]` (assigned, bit-identical to the reference) and `dweights [T·k]` (assigned for every
/// `(token[s], choice[s])`; the dot over H is a block reduction, so it differs from the reference
/// by rounding).
#[cfg(feature = "cuda")]
pub fn combine_backward_gpu(
    gpu: &Gpu,
    dout: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    token: &CudaView<'_, u32>,
    choice: &CudaView<'_, u32>,
    k: usize,
    hidden: usize,
    dys: &mut CudaViewMut<'_, f32>,
    dweights: &mut CudaViewMut<'_, f32>,
) -> oxtune_kernels::Result<()> {
    const OP: &str = "combine_backward";
    let tokens = to_u32(OP, "tokens", rows_of(OP, "dout", dout.len(), hidden, "hidden")?)?;
    let slots = weight.len();
    check_len(OP, "y", y.len(), slots * hidden)?;
    check_len(OP, "token", token.len(), slots)?;
    check_len(OP, "choice", choice.len(), slots)?;
    check_len(OP, "dys", dys.len(), slots * hidden)?;
    check_len(OP, "dweights", dweights.len(), tokens as usize * k)?;
    if slots == 0 {
        return Ok(());
    }
    let f = gpu.function("moe_permute", SRC, "combine_backward_f32")?;
    let (slots64, k32, hidden32) = (slots as u64, to_u32(OP, "k", k)?, to_u32(OP, "hidden", hidden)?);
    // SAFETY: combine_backward_f32(float* dys, float* dweights, const float* dout, const float* y,
    // const float* weight, const unsigned* token, const unsigned* choice, unsigned long long slots,
    // unsigned tokens, unsigned k, unsigned hidden): dys and y hold slots·hidden floats, dout
    // tokens·hidden, dweights tokens·k, weight, token and choice slots (checked above); rows of
    // tokens >= tokens are never read and dweights is written only for token < tokens and
    // choice < k; the block is a power of two >= 32 (block_sum) and strides over the slots.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dys)
            .arg(dweights)
            .arg(dout)
            .arg(y)
            .arg(weight)
            .arg(token)
            .arg(choice)
            .arg(&slots64)
            .arg(&tokens)
            .arg(&k32)
            .arg(&hidden32)
            .launch(rows_config(slots, hidden))
    }?;
    Ok(())
}

/// GPU [`add_expert_bias`]: `y [S, n] += bias [E, n]` rows picked by `slot_expert [S]`. Exact.
#[cfg(feature = "cuda")]
pub fn add_expert_bias_gpu(
    gpu: &Gpu,
    y: &mut CudaViewMut<'_, f32>,
    bias: &CudaView<'_, f32>,
    slot_expert: &CudaView<'_, u32>,
    n: usize,
) -> oxtune_kernels::Result<()> {
    const OP: &str = "add_expert_bias";
    let experts = to_u32(OP, "experts", rows_of(OP, "bias", bias.len(), n, "n")?)?;
    let slots = slot_expert.len();
    check_len(OP, "y", y.len(), slots * n)?;
    if slots == 0 {
        return Ok(());
    }
    let f = gpu.function("moe_permute", SRC, "add_expert_bias_f32")?;
    let (slots64, n32) = (slots as u64, to_u32(OP, "n", n)?);
    // SAFETY: add_expert_bias_f32(float* y, const float* bias, const unsigned* slot_expert,
    // unsigned long long slots, unsigned experts, unsigned n): y holds slots·n floats, bias
    // experts·n, slot_expert slots (checked above); bias rows of experts >= experts are never
    // read; blocks stride over the slots.
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(y)
            .arg(bias)
            .arg(slot_expert)
            .arg(&slots64)
            .arg(&experts)
            .arg(&n32)
            .launch(rows_config(slots, n))
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{route, Routing};
    use rand::{Rng, SeedableRng};

    fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
    }

    /// A top-k routing of random logits `[t, e]` and its plan, slot_of as u32.
    fn routed(seed: u64, t: usize, e: usize, k: usize) -> (Routing, RoutingPlan, Vec<u32>) {
        let r = route(&randn(seed, t * e, 2.0), e, k).unwrap();
        let p = RoutingPlan::new(&r);
        let slot_of = p.slot_of(k).into_iter().map(|s| s as u32).collect();
        (r, p, slot_of)
    }

    #[test]
    fn slot_expert_follows_the_offsets() {
        let (r, p, _) = routed(1, 9, 5, 2);
        let se = slot_expert(&p);
        assert_eq!(se.len(), r.experts.len());
        for s in 0..se.len() {
            assert!(p.range(se[s] as usize).contains(&s));
            assert_eq!(r.experts[p.token[s] as usize * 2 + p.choice[s] as usize], se[s]);
        }
    }

    #[test]
    fn gather_then_combine_matches_f64_definition() {
        let (k, e, t, h) = (3, 5, 7, 4);
        let (r, p, slot_of) = routed(2, t, e, k);
        let x = randn(3, t * h, 1.5);
        let xs = gather_rows(&x, &p.token, h);
        for s in 0..p.token.len() {
            assert_eq!(&xs[s * h..(s + 1) * h], &x[p.token[s] as usize * h..][..h]);
        }
        let y = randn(4, xs.len(), 1.0);
        let out = combine(&y, &p.weight, &slot_of, k, h);
        // Definition: out[t] = Σ_j weights[t, j] · y[slot of (t, j)], in f64.
        let inv = p.slot_of(k);
        for tt in 0..t {
            for c in 0..h {
                let want: f64 = (0..k).map(|j| r.weights[tt * k + j] as f64 * y[inv[tt * k + j] * h + c] as f64).sum();
                assert!((out[tt * h + c] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()));
            }
        }
    }

    #[test]
    fn combine_backward_matches_f64_finite_differences() {
        let (k, e, t, h) = (2, 4, 5, 3);
        let (_, p, slot_of) = routed(5, t, e, k);
        let y = randn(6, t * k * h, 1.0);
        let dout = randn(7, t * h, 1.0);
        let (dys, dweights) = combine_backward(&dout, &y, &p.weight, &p.token, &p.choice, k, h);
        // loss(y, w) = Σ dout · combine(y, w), linear in each argument.
        let loss = |y: &[f64], w: &[f64]| -> f64 {
            let out = combine(
                &y.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &w.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &slot_of,
                k,
                h,
            );
            out.iter().zip(&dout).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        let w64: Vec<f64> = p.weight.iter().map(|&v| v as f64).collect();
        let step = 1e-2;
        for i in 0..y.len() {
            let (mut a, mut b) = (y64.clone(), y64.clone());
            a[i] += step;
            b[i] -= step;
            let fd = (loss(&a, &w64) - loss(&b, &w64)) / (2.0 * step);
            assert!((dys[i] as f64 - fd).abs() <= 1e-4 * (1.0 + fd.abs()), "dys[{i}] {} vs {fd}", dys[i]);
        }
        for s in 0..w64.len() {
            let (mut a, mut b) = (w64.clone(), w64.clone());
            a[s] += step;
            b[s] -= step;
            let fd = (loss(&y64, &a) - loss(&y64, &b)) / (2.0 * step);
            let got = dweights[p.token[s] as usize * k + p.choice[s] as usize];
            assert!((got as f64 - fd).abs() <= 1e-4 * (1.0 + fd.abs()), "dweight of slot {s}: {got} vs {fd}");
        }
    }

    #[test]
    fn weight_grads_from_the_input_side_equal_those_from_the_output() {
        // Experts y = M_e z + b_e: the dweights of combine_backward (from y) and of
        // weight_grad_from_input (from dz = w·M_eᵀ dout and z) are the same numbers.
        let (k, e, t, h, i) = (3, 5, 6, 7, 4);
        let (_, p, _) = routed(11, t, e, k);
        let se = slot_expert(&p);
        let slots = p.token.len();
        let m = randn(12, e * h * i, 1.0); // M_e [h, i]
        let bias = randn(13, e * h, 1.0);
        let z = randn(14, slots * i, 1.0);
        let dout = randn(15, t * h, 1.0);
        let (mut y, mut dz) = (vec![0.0f32; slots * h], vec![0.0f32; slots * i]);
        for s in 0..slots {
            let (ex, tt) = (se[s] as usize, p.token[s] as usize);
            for r in 0..h {
                let mr = &m[(ex * h + r) * i..][..i];
                y[s * h + r] = bias[ex * h + r] + mr.iter().zip(&z[s * i..][..i]).map(|(a, b)| a * b).sum::<f32>();
                for c in 0..i {
                    dz[s * i + c] += p.weight[s] * mr[c] * dout[tt * h + r];
                }
            }
        }
        let (dys, want) = combine_backward(&dout, &y, &p.weight, &p.token, &p.choice, k, h);
        let got = weight_grad_from_input(&dz, &z, &dout, &bias, &p.weight, &p.token, &p.choice, &se, k, h);
        for (n, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "dweights[{n}]: {g} from the input side, {w} from y");
        }
        assert_eq!(weighted_gather_rows(&dout, &p.weight, &p.token, h), dys);
        // A slot of weight 0: the bias term alone. A bad expert index: NaN.
        let mut w0 = p.weight.clone();
        w0[2] = 0.0;
        let got = weight_grad_from_input(&dz, &z, &dout, &bias, &w0, &p.token, &p.choice, &se, k, h);
        let (tt, ex) = (p.token[2] as usize, se[2] as usize);
        let via_bias: f32 = (0..h).map(|r| dout[tt * h + r] * bias[ex * h + r]).sum();
        assert_eq!(got[tt * k + p.choice[2] as usize], via_bias);
        let mut bad = se.clone();
        bad[1] = e as u32;
        let got = weight_grad_from_input(&dz, &z, &dout, &bias, &p.weight, &p.token, &p.choice, &bad, k, h);
        assert!(got[p.token[1] as usize * k + p.choice[1] as usize].is_nan());
    }

    #[test]
    fn unpermute_sum_is_the_adjoint_of_gather_rows() {
        let (k, e, t, h) = (4, 6, 5, 3);
        let (_, p, slot_of) = routed(8, t, e, k);
        let x = randn(9, t * h, 1.0);
        let dxs = randn(10, t * k * h, 1.0);
        // <gather(x), dxs> = <x, unpermute_sum(dxs)>.
        let lhs: f64 = gather_rows(&x, &p.token, h).iter().zip(&dxs).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = x.iter().zip(&unpermute_sum(&dxs, &slot_of, k, h)).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() <= 1e-5 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
    }

    #[test]
    fn expert_with_zero_tokens() {
        // Expert 2 of 4 is never chosen; its bias row must not be used, the others' must.
        let mut logits = randn(11, 6 * 4, 1.0);
        logits.chunks_exact_mut(4).for_each(|row| row[2] = -1e30);
        let r = route(&logits, 4, 2).unwrap();
        let p = RoutingPlan::new(&r);
        assert!(p.range(2).is_empty());
        let se = slot_expert(&p);
        assert!(!se.contains(&2));
        let bias = randn(12, 4 * 3, 1.0);
        let y0 = randn(13, se.len() * 3, 1.0);
        let mut y = y0.clone();
        add_expert_bias(&mut y, &bias, &se, 3);
        for s in 0..se.len() {
            for c in 0..3 {
                assert_eq!(y[s * 3 + c], y0[s * 3 + c] + bias[se[s] as usize * 3 + c]);
            }
        }
    }

    #[test]
    fn out_of_range_indices_give_nan_rows() {
        let x = randn(14, 2 * 3, 1.0);
        let xs = gather_rows(&x, &[1, 2, 0], 3);
        assert!(xs[3..6].iter().all(|v| v.is_nan()) && xs[..3] == x[3..] && xs[6..] == x[..3]);
        let y = randn(15, 2 * 3, 1.0);
        let out = combine(&y, &[0.5, 0.5], &[0, 1, 1, 2], 2, 3);
        assert!(out[..3].iter().all(|v| v.is_finite()) && out[3..].iter().all(|v| v.is_nan()));
        let (dys, dw) = combine_backward(&x, &y, &[0.5, 0.5], &[0, 2], &[0, 0], 1, 3);
        assert!(dys[..3].iter().all(|v| v.is_finite()) && dys[3..].iter().all(|v| v.is_nan()));
        assert!(dw[0] != 0.0 && dw[1] == 0.0);
        let mut yb = y.clone();
        add_expert_bias(&mut yb, &[1.0; 3], &[0, 1], 3);
        assert!(yb[..3].iter().all(|v| v.is_finite()) && yb[3..].iter().all(|v| v.is_nan()));
    }
}

#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use crate::route;
    use oxtune_kernels::testing::{assert_close, randn};

    struct Case {
        seed: u64,
        tokens: usize,
        experts: usize,
        k: usize,
        hidden: usize,
        /// Experts that are never chosen (their logits are -1e30).
        dead: &'static [usize],
    }

    /// Every op of this module on a routing of random logits, against the references.
    fn check(gpu: &Gpu, c: Case) {
        let Case { seed, tokens: t, experts: e, k, hidden: h, dead } = c;
        let mut logits = randn(seed, t * e, 2.0);
        logits.chunks_exact_mut(e).for_each(|row| dead.iter().for_each(|&d| row[d] = -1e30));
        let p = RoutingPlan::new(&route(&logits, e, k).unwrap());
        assert!(dead.iter().all(|&d| p.range(d).is_empty()));
        let slots = t * k;
        let slot_of: Vec<u32> = p.slot_of(k).into_iter().map(|s| s as u32).collect();
        let se = slot_expert(&p);
        let x = randn(seed + 1, t * h, 1.0);
        let y = randn(seed + 2, slots * h, 1.0);
        let dout = randn(seed + 3, t * h, 1.0);
        let dxs = randn(seed + 4, slots * h, 1.0);
        let bias = randn(seed + 5, e * h, 1.0);
        let s = &gpu.stream;
        let up = |v: &[f32]| s.clone_htod(v).unwrap();
        let up32 = |v: &[u32]| s.clone_htod(v).unwrap();
        let (x_d, y_d, dout_d, dxs_d, bias_d, w_d) = (up(&x), up(&y), up(&dout), up(&dxs), up(&bias), up(&p.weight));
        let (token_d, choice_d, slot_of_d, se_d) = (up32(&p.token), up32(&p.choice), up32(&slot_of), up32(&se));
        let what = format!("T {t}, E {e}, k {k}, H {h}");

        let mut xs_d = s.alloc_zeros::<f32>(slots * h).unwrap();
        gather_rows_gpu(gpu, &x_d.as_view(), &token_d.as_view(), h, &mut xs_d.as_view_mut()).unwrap();
        // A copy: exact.
        assert_close(
            &format!("gather_rows {what}"),
            &s.clone_dtoh(&xs_d).unwrap(),
            &gather_rows(&x, &p.token, h),
            0.0,
            0.0,
        );

        let mut out_d = s.alloc_zeros::<f32>(t * h).unwrap();
        combine_gpu(gpu, &y_d.as_view(), &w_d.as_view(), &slot_of_d.as_view(), k, h, &mut out_d.as_view_mut()).unwrap();
        // Same operations in the same order without FMA contraction: bit-identical is expected; the
        // tolerance only covers compiler flags (say, flush-to-zero) that are not ours.
        let want = combine(&y, &p.weight, &slot_of, k, h);
        assert_close(&format!("combine {what}"), &s.clone_dtoh(&out_d).unwrap(), &want, 1e-7, 1e-6);
        // Added to a residual stream: the combine's bits plus one f32 add.
        let base = randn(seed ^ 0x5eed, t * h, 1.0);
        let mut acc_d = s.clone_htod(&base).unwrap();
        combine_add_gpu(gpu, &y_d.as_view(), &w_d.as_view(), &slot_of_d.as_view(), k, h, &mut acc_d.as_view_mut())
            .unwrap();
        let combined = s.clone_dtoh(&out_d).unwrap();
        let want_acc: Vec<f32> = base.iter().zip(&combined).map(|(b, c)| b + c).collect();
        assert_close(&format!("combine_add {what}"), &s.clone_dtoh(&acc_d).unwrap(), &want_acc, 0.0, 0.0);

        let mut dx_d = s.alloc_zeros::<f32>(t * h).unwrap();
        unpermute_sum_gpu(gpu, &dxs_d.as_view(), &slot_of_d.as_view(), k, h, &mut dx_d.as_view_mut()).unwrap();
        let want = unpermute_sum(&dxs, &slot_of, k, h);
        assert_close(&format!("unpermute_sum {what}"), &s.clone_dtoh(&dx_d).unwrap(), &want, 1e-7, 1e-6);

        let (mut dys_d, mut dw_d) = (s.alloc_zeros::<f32>(slots * h).unwrap(), s.alloc_zeros::<f32>(t * k).unwrap());
        combine_backward_gpu(
            gpu,
            &dout_d.as_view(),
            &y_d.as_view(),
            &w_d.as_view(),
            &token_d.as_view(),
            &choice_d.as_view(),
            k,
            h,
            &mut dys_d.as_view_mut(),
            &mut dw_d.as_view_mut(),
        )
        .unwrap();
        let (dys, dw) = combine_backward(&dout, &y, &p.weight, &p.token, &p.choice, k, h);
        // One product: exact.
        assert_close(&format!("combine_backward dys {what}"), &s.clone_dtoh(&dys_d).unwrap(), &dys, 0.0, 0.0);
        // A dot of h products of values in [-1, 1] (|dot| ~ sqrt(h)/3) summed as a tree instead of
        // in order: the rounding difference grows like sqrt(h)·eps·|partial sums|, far below
        // 2e-7·h, which still catches any wrong term (each is ~0.3 in size).
        assert_close(
            &format!("combine_backward dweights {what}"),
            &s.clone_dtoh(&dw_d).unwrap(),
            &dw,
            2e-7 * h as f32,
            1e-5,
        );

        let mut dys_d = s.alloc_zeros::<f32>(slots * h).unwrap();
        weighted_gather_rows_gpu(
            gpu,
            &dout_d.as_view(),
            &w_d.as_view(),
            &token_d.as_view(),
            h,
            &mut dys_d.as_view_mut(),
        )
        .unwrap();
        // One product: exact.
        let want = weighted_gather_rows(&dout, &p.weight, &p.token, h);
        assert_close(&format!("weighted_gather_rows {what}"), &s.clone_dtoh(&dys_d).unwrap(), &want, 0.0, 0.0);

        // An inner width unlike hidden; one slot of weight 0 (the bias term alone).
        let inner = h / 2 + 3;
        let (dz, z) = (randn(seed + 6, slots * inner, 1.0), randn(seed + 7, slots * inner, 1.0));
        let mut w = p.weight.clone();
        w[slots / 2] = 0.0;
        let (dz_d, z_d, w_d) = (up(&dz), up(&z), up(&w));
        let mut dw_d = up(&randn(seed + 8, t * k, 9.0)); // garbage: every entry must be assigned
        weight_grad_from_input_gpu(
            gpu,
            &dz_d.as_view(),
            &z_d.as_view(),
            &dout_d.as_view(),
            &bias_d.as_view(),
            &w_d.as_view(),
            &token_d.as_view(),
            &choice_d.as_view(),
            &se_d.as_view(),
            k,
            h,
            &mut dw_d.as_view_mut(),
        )
        .unwrap();
        let want = weight_grad_from_input(&dz, &z, &dout, &bias, &w, &p.token, &p.choice, &se, k, h);
        // Two dots as above (the first divided by a weight in (0, 1], which scales its rounding
        // with it): 2e-7 of the terms' count relative to the weight.
        let wmin = w.iter().copied().filter(|&x| x > 0.0).fold(1.0f32, f32::min);
        assert_close(
            &format!("weight_grad_from_input {what}"),
            &s.clone_dtoh(&dw_d).unwrap(),
            &want,
            2e-7 * (inner + h) as f32 / wmin,
            1e-5,
        );

        let mut yb_d = up(&y);
        add_expert_bias_gpu(gpu, &mut yb_d.as_view_mut(), &bias_d.as_view(), &se_d.as_view(), h).unwrap();
        let mut want = y.clone();
        add_expert_bias(&mut want, &bias, &se, h);
        // One addition: exact.
        assert_close(&format!("add_expert_bias {what}"), &s.clone_dtoh(&yb_d).unwrap(), &want, 0.0, 0.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn expert_with_zero_tokens() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, Case { seed: 1, tokens: 40, experts: 4, k: 2, hidden: 64, dead: &[0, 2] });
        check(&gpu, Case { seed: 2, tokens: 33, experts: 32, k: 4, hidden: 96, dead: &[5, 6, 31] });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn gpt_oss_20b_top4_of_32() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, Case { seed: 3, tokens: 257, experts: 32, k: 4, hidden: 2880, dead: &[] });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn top4_of_128_experts() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, Case { seed: 4, tokens: 100, experts: 128, k: 4, hidden: 2880, dead: &[] });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn top1() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, Case { seed: 5, tokens: 50, experts: 4, k: 1, hidden: 64, dead: &[] });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn single_token() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, Case { seed: 6, tokens: 1, experts: 32, k: 4, hidden: 2880, dead: &[] });
        check(&gpu, Case { seed: 7, tokens: 1, experts: 4, k: 4, hidden: 64, dead: &[] });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn odd_hidden_sizes() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, Case { seed: 8, tokens: 13, experts: 5, k: 3, hidden: 17, dead: &[] });
        check(&gpu, Case { seed: 9, tokens: 7, experts: 3, k: 2, hidden: 1, dead: &[] });
        check(&gpu, Case { seed: 10, tokens: 9, experts: 6, k: 2, hidden: 301, dead: &[] });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn more_rows_than_blocks_in_the_grid() {
        let gpu = Gpu::new(0).expect("a GPU");
        check(&gpu, Case { seed: 11, tokens: 40_000, experts: 8, k: 2, hidden: 8, dead: &[] });
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn out_of_range_indices_give_nan_rows_on_the_gpu() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let h = 5;
        let (x, y) = (randn(12, 2 * h, 1.0), randn(13, 2 * h, 1.0));
        let (x_d, y_d, w_d) =
            (s.clone_htod(&x).unwrap(), s.clone_htod(&y).unwrap(), s.clone_htod(&[0.5f32, 0.5]).unwrap());
        let bad = s.clone_htod(&[1u32, 7]).unwrap();
        let mut o = s.alloc_zeros::<f32>(2 * h).unwrap();
        gather_rows_gpu(&gpu, &x_d.as_view(), &bad.as_view(), h, &mut o.as_view_mut()).unwrap();
        assert_close("gather_rows", &s.clone_dtoh(&o).unwrap(), &gather_rows(&x, &[1, 7], h), 0.0, 0.0);
        combine_gpu(&gpu, &y_d.as_view(), &w_d.as_view(), &bad.as_view(), 1, h, &mut o.as_view_mut()).unwrap();
        assert_close("combine", &s.clone_dtoh(&o).unwrap(), &combine(&y, &[0.5, 0.5], &[1, 7], 1, h), 0.0, 0.0);
        unpermute_sum_gpu(&gpu, &y_d.as_view(), &bad.as_view(), 2, h, &mut o.slice_mut(..h)).unwrap();
        assert!(s.clone_dtoh(&o).unwrap()[..h].iter().all(|v| v.is_nan()));
        let (mut dys, mut dw) = (s.alloc_zeros::<f32>(2 * h).unwrap(), s.alloc_zeros::<f32>(2).unwrap());
        let choice = s.clone_htod(&[0u32, 0]).unwrap();
        combine_backward_gpu(
            &gpu,
            &x_d.as_view(),
            &y_d.as_view(),
            &w_d.as_view(),
            &bad.as_view(),
            &choice.as_view(),
            1,
            h,
            &mut dys.as_view_mut(),
            &mut dw.as_view_mut(),
        )
        .unwrap();
        let (want_dys, want_dw) = combine_backward(&x, &y, &[0.5, 0.5], &[1, 7], &[0, 0], 1, h);
        assert_close("combine_backward dys", &s.clone_dtoh(&dys).unwrap(), &want_dys, 0.0, 0.0);
        assert_close("combine_backward dweights", &s.clone_dtoh(&dw).unwrap(), &want_dw, 1e-6, 1e-5);
        let mut yb = y_d.clone();
        add_expert_bias_gpu(&gpu, &mut yb.as_view_mut(), &x_d.as_view(), &bad.as_view(), h).unwrap();
        let mut want = y.clone();
        add_expert_bias(&mut want, &x, &[1, 7], h);
        assert!(want[..h].iter().all(|v| v.is_finite()) && want[h..].iter().all(|v| v.is_nan()));
        assert_close("add_expert_bias", &s.clone_dtoh(&yb).unwrap(), &want, 0.0, 0.0);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run on the GPU machine (cargo xtask gpu-bundle, then gpu-bundle/run)"]
    fn wrong_lengths_are_shape_errors() {
        let gpu = Gpu::new(0).expect("a GPU");
        let s = &gpu.stream;
        let x = s.alloc_zeros::<f32>(12).unwrap();
        let idx = s.alloc_zeros::<u32>(4).unwrap();
        let mut out = s.alloc_zeros::<f32>(10).unwrap();
        let e = gather_rows_gpu(&gpu, &x.as_view(), &idx.as_view(), 3, &mut out.as_view_mut()).unwrap_err();
        assert_eq!(e.to_string(), "gather_rows: xs has 10 elements, expected 12");
        let e = combine_gpu(&gpu, &x.as_view(), &x.slice(..4), &idx.as_view(), 3, 3, &mut out.as_view_mut());
        assert!(e.unwrap_err().to_string().starts_with("combine: slot_of has 4 elements, expected a multiple of k"));
        let e = add_expert_bias_gpu(&gpu, &mut out.as_view_mut(), &x.as_view(), &idx.as_view(), 0).unwrap_err();
        assert!(e.to_string().starts_with("add_expert_bias: bias has 12 elements"), "{e}");
    }
}
