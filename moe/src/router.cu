// Top-k router in f32, one warp per token (see router.rs for the CPU reference, route()).
//
// Selection ranks logits by Rust's f32::total_cmp (NaN above +inf, -NaN below -inf, -0 below +0)
// and breaks ties toward the lower expert index. Each candidate becomes one 64-bit key, the
// total_cmp order in the high word and the inverted expert index in the low word, so that k warp
// max-reductions pick the k winners in route()'s order. A lane holds at most MAX_PER_LANE logits
// (E <= 128) and the winners stay in registers (k <= MAX_K).

#define MAX_PER_LANE 4
#define MAX_K 8

__device__ __forceinline__ unsigned long long rank_key(float v, unsigned int e) {
    int bits = __float_as_int(v);
    // Rust's total_cmp: flip the magnitude bits of negative values, then compare as signed ints.
    bits ^= (int)(((unsigned int)(bits >> 31)) >> 1);
    const unsigned int ordered = (unsigned int)bits ^ 0x80000000u;  // signed order as unsigned
    return ((unsigned long long)ordered << 32) | (unsigned long long)(0xffffffffu - e);
}

// experts, weights: [tokens, k]; logits: [tokens, num_experts]; num_experts <= 32 * MAX_PER_LANE,
// 1 <= k <= min(num_experts, MAX_K). Blocks are whole warps; warps stride over the tokens.
extern "C" __global__ void topk_softmax_f32(unsigned int* experts, float* weights, const float* logits,
                                            unsigned long long tokens, unsigned int num_experts,
                                            unsigned int k) {
    const unsigned int lane = threadIdx.x & 31;
    const unsigned int warps = blockDim.x >> 5;
    for (size_t t = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); t < tokens; t += (size_t)gridDim.x * warps) {
        const float* row = logits + t * num_experts;
        // 0 is below every real key (whose low word is 0xffffffff - e > 0): "taken" or "absent".
        unsigned long long key[MAX_PER_LANE];
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i) {
            const unsigned int e = lane + 32u * i;
            key[i] = e < num_experts ? rank_key(row[e], e) : 0ull;
        }
        unsigned int sel[MAX_K];
#pragma unroll
        for (int j = 0; j < MAX_K; ++j) {
            sel[j] = 0;
            if (j < k) {  // uniform across the warp
                unsigned long long best = key[0];
#pragma unroll
                for (int i = 1; i < MAX_PER_LANE; ++i) best = key[i] > best ? key[i] : best;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
                    best = other > best ? other : best;
                }
                sel[j] = 0xffffffffu - (unsigned int)(best & 0xffffffffull);
                // Keys are unique (the expert index is in them), so only the owner clears one.
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; ++i)
                    if (key[i] == best) key[i] = 0ull;
            }
        }
        if (lane < k) {
            // Softmax over the selected logits, shifted by the first (largest) one and summed in
            // selection order, as route() does; lane j writes choice j.
            const float m = row[sel[0]];
            float z = 0.0f, mine = 0.0f;
            unsigned int mine_e = 0;
#pragma unroll
            for (int j = 0; j < MAX_K; ++j) {
                if (j < k) {
                    const float ex = expf(row[sel[j]] - m);
                    z += ex;
                    if (j == lane) {
                        mine = ex;
                        mine_e = sel[j];
                    }
                }
            }
            experts[t * k + lane] = mine_e;
            weights[t * k + lane] = mine / z;
        }
    }
}

// Backward of the softmax over the selected logits: dlogits[t, e] = w_j (dw_j - sum_i w_i dw_i)
// where experts[t, j] = e, else 0; whole rows are written. The dot is rounded like the CPU
// reference (in order, no FMA contraction), so the result is the reference's bit for bit. An
// expert index >= num_experts is never written (only the host can create one).
extern "C" __global__ void route_backward_f32(float* dlogits, const unsigned int* experts, const float* weights,
                                              const float* dweights, unsigned long long tokens,
                                              unsigned int num_experts, unsigned int k) {
    const unsigned int lane = threadIdx.x & 31;
    const unsigned int warps = blockDim.x >> 5;
    for (size_t t = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); t < tokens; t += (size_t)gridDim.x * warps) {
        const unsigned int* sel = experts + t * k;
        const float* w = weights + t * k;
        const float* dw = dweights + t * k;
        float dot = 0.0f;
        for (unsigned int j = 0; j < k; ++j) dot = __fadd_rn(dot, __fmul_rn(w[j], dw[j]));
        float* out = dlogits + t * num_experts;
        for (unsigned int e = lane; e < num_experts; e += 32) {
            float v = 0.0f;
            // The last match wins, like the reference's loop of stores.
            for (unsigned int j = 0; j < k; ++j)
                if (sel[j] == e) v = w[j] * (dw[j] - dot);
            out[e] = v;
        }
    }
}
