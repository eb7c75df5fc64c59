// Moving MoE rows between token order [T, H] and slot order [S, H] (slots sorted by expert, see
// permute.rs for the CPU references). Blocks stride over rows, threads over the hidden dimension.
// Sums are assigned (no atomics) and rounded like the references (in order, no FMA contraction),
// so every kernel here except the dot in combine_backward_f32 matches its reference bit for bit.
// An index out of range never reads or writes out of bounds: the row it feeds becomes NaN (the
// host builds the indices; this only keeps a bad one visible).

#define NAN_F __int_as_float(0x7fc00000)

__device__ __forceinline__ void fill_nan(float* row, unsigned int n) {
    for (unsigned int c = threadIdx.x; c < n; c += blockDim.x) row[c] = NAN_F;
}

// xs[s, :] = (weight[s] *) x[token[s], :]. xs: [slots, hidden]; x: [tokens, hidden]; weight, token: [slots].
template <bool WEIGHTED>
__device__ __forceinline__ void gather(float* xs, const float* x, const float* weight, const unsigned int* token,
                                       unsigned long long slots, unsigned int tokens, unsigned int hidden) {
    for (size_t s = blockIdx.x; s < slots; s += gridDim.x) {
        const unsigned int t = token[s];
        float* o = xs + s * hidden;
        if (t >= tokens) {
            fill_nan(o, hidden);
            continue;
        }
        const float* r = x + (size_t)t * hidden;
        const float w = WEIGHTED ? weight[s] : 1.0f;
        for (unsigned int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = WEIGHTED ? __fmul_rn(w, r[c]) : r[c];
    }
}

extern "C" __global__ void gather_rows_f32(float* xs, const float* x, const unsigned int* token,
                                           unsigned long long slots, unsigned int tokens, unsigned int hidden) {
    gather<false>(xs, x, nullptr, token, slots, tokens, hidden);
}

extern "C" __global__ void weighted_gather_rows_f32(float* xs, const float* x, const float* weight,
                                                    const unsigned int* token, unsigned long long slots,
                                                    unsigned int tokens, unsigned int hidden) {
    gather<true>(xs, x, weight, token, slots, tokens, hidden);
}

// out[t, :] = sum over j in 0..k of (weight[s] *) y[s, :], s = slot_of[t * k + j], summed in j order
// (ACCUMULATE: out[t, :] + that sum, the sum rounded first).
// out: [tokens, hidden]; y: [slots, hidden]; weight: [slots]; slot_of: [tokens, k].
template <bool WEIGHTED, bool ACCUMULATE>
__device__ __forceinline__ void sum_slots(float* out, const float* y, const float* weight, const unsigned int* slot_of,
                                          unsigned long long tokens, unsigned int slots, unsigned int k,
                                          unsigned int hidden) {
    for (size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const unsigned int* so = slot_of + t * k;
        float* o = out + t * hidden;
        for (unsigned int c = threadIdx.x; c < hidden; c += blockDim.x) {
            float acc = 0.0f;
            for (unsigned int j = 0; j < k; ++j) {
                const unsigned int s = so[j];
                if (s >= slots) {
                    acc = NAN_F;
                    break;
                }
                const float v = y[(size_t)s * hidden + c];
                acc = __fadd_rn(acc, WEIGHTED ? __fmul_rn(weight[s], v) : v);
            }
            o[c] = ACCUMULATE ? __fadd_rn(o[c], acc) : acc;
        }
    }
}

extern "C" __global__ void combine_f32(float* out, const float* y, const float* weight, const unsigned int* slot_of,
                                       unsigned long long tokens, unsigned int slots, unsigned int k,
                                       unsigned int hidden) {
    sum_slots<true, false>(out, y, weight, slot_of, tokens, slots, k, hidden);
}

// out[t, :] += the combine of token t (a residual stream).
extern "C" __global__ void combine_add_f32(float* out, const float* y, const float* weight, const unsigned int* slot_of,
                                           unsigned long long tokens, unsigned int slots, unsigned int k,
                                           unsigned int hidden) {
    sum_slots<true, true>(out, y, weight, slot_of, tokens, slots, k, hidden);
}

// dx[t, :] = sum over j of dxs[slot_of[t * k + j], :] (weight is unused).
extern "C" __global__ void unpermute_sum_f32(float* dx, const float* dxs, const unsigned int* slot_of,
                                             unsigned long long tokens, unsigned int slots, unsigned int k,
                                             unsigned int hidden) {
    sum_slots<false, false>(dx, dxs, nullptr, slot_of, tokens, slots, k, hidden);
}

// Sum over the block (a power of two of at least 32 threads); every thread gets the total.
__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

// Backward of combine, one block per slot s with t = token[s]:
// dys[s, :] = weight[s] * dout[t, :] and dweights[t * k + choice[s]] = dout[t, :] . y[s, :].
// dys, y: [slots, hidden]; dout: [tokens, hidden]; weight, token, choice: [slots]; dweights: [tokens, k].
// The dot is a block reduction: deterministic, but not in the reference's order.
extern "C" __global__ void combine_backward_f32(float* dys, float* dweights, const float* dout, const float* y,
                                                const float* weight, const unsigned int* token,
                                                const unsigned int* choice, unsigned long long slots,
                                                unsigned int tokens, unsigned int k, unsigned int hidden) {
    __shared__ float shared[32];
    for (size_t s = blockIdx.x; s < slots; s += gridDim.x) {
        const unsigned int t = token[s];  // the same for the whole block, so the branch is uniform
        float* o = dys + s * hidden;
        if (t >= tokens) {
            fill_nan(o, hidden);
            continue;
        }
        const float* d = dout + (size_t)t * hidden;
        const float* yr = y + s * hidden;
        const float w = weight[s];
        float part = 0.0f;
        for (unsigned int c = threadIdx.x; c < hidden; c += blockDim.x) {
            const float dv = d[c];
            o[c] = w * dv;
            part += dv * yr[c];
        }
        const float dot = block_sum(part, shared);
        const unsigned int j = choice[s];
        if (threadIdx.x == 0 && j < k) dweights[(size_t)t * k + j] = dot;
    }
}

// y[s, :] += bias[slot_expert[s], :]. y: [slots, n]; bias: [experts, n]; slot_expert: [slots].
extern "C" __global__ void add_expert_bias_f32(float* y, const float* bias, const unsigned int* slot_expert,
                                               unsigned long long slots, unsigned int experts, unsigned int n) {
    for (size_t s = blockIdx.x; s < slots; s += gridDim.x) {
        const unsigned int e = slot_expert[s];
        float* o = y + s * n;
        if (e >= experts) {
            fill_nan(o, n);
            continue;
        }
        const float* b = bias + (size_t)e * n;
        for (unsigned int c = threadIdx.x; c < n; c += blockDim.x) o[c] += b[c];
    }
}

// The routing weights' gradient from the experts' input side (permute.rs: weight_grad_from_input),
// one block per slot s with t = token[s], e = slot_expert[s]:
// dweights[t * k + choice[s]] = dz[s, :] . z[s, :] / weight[s] + dout[t, :] . bias[e, :]
// (the first term 0 where weight[s] is 0). dz, z: [slots, inner]; dout: [tokens, hidden];
// bias: [experts, hidden]. Both dots are block reductions.
extern "C" __global__ void weight_grad_from_input_f32(float* dweights, const float* dz, const float* z,
                                                      const float* dout, const float* bias, const float* weight,
                                                      const unsigned int* token, const unsigned int* choice,
                                                      const unsigned int* slot_expert, unsigned long long slots,
                                                      unsigned int tokens, unsigned int experts, unsigned int k,
                                                      unsigned int inner, unsigned int hidden) {
    __shared__ float shared[32];
    for (size_t s = blockIdx.x; s < slots; s += gridDim.x) {
        const unsigned int t = token[s], e = slot_expert[s], j = choice[s];  // uniform in the block
        if (t >= tokens || j >= k) continue;
        if (e >= experts) {
            if (threadIdx.x == 0) dweights[(size_t)t * k + j] = NAN_F;
            continue;
        }
        const float* a = dz + s * inner;
        const float* b = z + s * inner;
        float part = 0.0f;
        for (unsigned int c = threadIdx.x; c < inner; c += blockDim.x) part += a[c] * b[c];
        const float through = block_sum(part, shared);
        const float* d = dout + (size_t)t * hidden;
        const float* bb = bias + (size_t)e * hidden;
        part = 0.0f;
        for (unsigned int c = threadIdx.x; c < hidden; c += blockDim.x) part += d[c] * bb[c];
        const float via_bias = block_sum(part, shared);
        const float w = weight[s];
        if (threadIdx.x == 0) dweights[(size_t)t * k + j] = (w != 0.0f ? through / w : 0.0f) + via_bias;
    }
}
