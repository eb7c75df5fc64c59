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

// xs[s, :] = x[token[s], :]. xs: [slots, hidden]; x: [tokens, hidden]; token: [slots].
extern "C" __global__ void gather_rows_f32(float* xs, const float* x, const unsigned int* token,
                                           unsigned long long slots, unsigned int tokens, unsigned int hidden) {
    for (size_t s = blockIdx.x; s < slots; s += gridDim.x) {
        const unsigned int t = token[s];
        float* o = xs + s * hidden;
        if (t >= tokens) {
            fill_nan(o, hidden);
            continue;
        }
        const float* r = x + (size_t)t * hidden;
        for (unsigned int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = r[c];
    }
}

// out[t, :] = sum over j in 0..k of (weight[s] *) y[s, :], s = slot_of[t * k + j], summed in j order.
// out: [tokens, hidden]; y: [slots, hidden]; weight: [slots]; slot_of: [tokens, k].
template <bool WEIGHTED>
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
            o[c] = acc;
        }
    }
}

extern "C" __global__ void combine_f32(float* out, const float* y, const float* weight, const unsigned int* slot_of,
                                       unsigned long long tokens, unsigned int slots, unsigned int k,
                                       unsigned int hidden) {
    sum_slots<true>(out, y, weight, slot_of, tokens, slots, k, hidden);
}

// dx[t, :] = sum over j of dxs[slot_of[t * k + j], :] (weight is unused).
extern "C" __global__ void unpermute_sum_f32(float* dx, const float* dxs, const unsigned int* slot_of,
                                             unsigned long long tokens, unsigned int slots, unsigned int k,
                                             unsigned int hidden) {
    sum_slots<false>(dx, dxs, nullptr, slot_of, tokens, slots, k, hidden);
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
