// Cross-entropy per row of logits [n, V] with targets [n] (-100 = ignored), one block per row.
// One online pass keeps a running (max, sum of exp(x - max)) per thread, merged across the block;
// then loss = lse - logit[target] and, with want_grad, the row is overwritten by
// (softmax - onehot) * grad_scale. Ignored rows give loss 0 and a zero gradient; a target outside
// [0, V) that is not -100 gives NaN (the host validates targets; this keeps a bad one in bounds).

#define IGNORE_INDEX (-100)
// NVRTC has no <math.h>, hence no INFINITY.
#define NEG_INF __int_as_float(0xff800000)

// Merges the running pair (m2, s2) into (m, s). Two empty pairs (max -inf) stay empty.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Block-wide merge of every thread's (m, s); every thread gets the result.
__device__ void block_lse(float& m, float& s) {
    __shared__ float sm[32], ss[32];
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        m = lane < warps ? sm[lane] : NEG_INF;
        s = lane < warps ? ss[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            sm[0] = m;
            ss[0] = s;
        }
    }
    __syncthreads();
    m = sm[0];
    s = ss[0];
}

extern "C" __global__ void cross_entropy_f32(float* logits, const int* targets, float* losses, unsigned int vocab,
                                             float grad_scale, int want_grad) {
    const size_t r = blockIdx.x;
    float* row = logits + r * vocab;
    const int target = targets[r];
    if (target == IGNORE_INDEX || target < 0 || (unsigned int)target >= vocab) {
        // The branch is uniform across the block, so leaving before any barrier is safe.
        const float v = target == IGNORE_INDEX ? 0.0f : __int_as_float(0x7fc00000);
        if (threadIdx.x == 0) losses[r] = v;
        if (want_grad)
            for (unsigned int j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = v;
        return;
    }
    // Read before the barrier in block_lse: after it, other threads overwrite the row.
    const float x_target = threadIdx.x == 0 ? row[target] : 0.0f;
    float m = NEG_INF, s = 0.0f;
    for (unsigned int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float x = row[j];
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else if (x != NEG_INF) {  // a masked logit adds nothing; a NaN propagates
            s += expf(x - m);
        }
    }
    block_lse(m, s);
    const float lse = m + logf(s);
    if (threadIdx.x == 0) losses[r] = lse - x_target;
    if (want_grad) {
        for (unsigned int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float g = expf(row[j] - lse) * grad_scale;
            if (j == (unsigned int)target) g -= grad_scale;
            row[j] = g;
        }
    }
}
