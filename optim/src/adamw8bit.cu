// bitsandbytes' AdamW8bit in f32, operation for operation the CPU `step_block` / `step_fp32` in adamw8bit.rs
// (see that file for the update and its bitsandbytes edge cases). Every arithmetic operation is an explicitly
// rounded intrinsic so that NVRTC does not contract a * b + c into an FMA the CPU code does not do; the
// scalars are computed on the host exactly as the CPU step computes them.

// A 256-entry dynamic map, passed by value (2 KiB of kernel parameters) so the Rust constants in quant8.rs
// stay the only copy of the tables.
struct Code256 {
    float v[256];
};

// The bitsandbytes kernel's search (`quantize_2D` in csrc/cuda/optimizers.cu), as the test `kernel_search` in
// quant8.rs writes it out and checks it against the CPU `DynamicMap::quantize`: nearest code, ties to the even
// index, NaN to index 0. `lower` starts at -1 for the signed map and 0 for the unsigned one.
__device__ __forceinline__ unsigned char quantize_search(const float* code, float x, float lower) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float upper = 1.0f, val = code[127];
    for (int step = 64; step > 0; step >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
    }
    int index;
    if (x > val)
        index = x > __fmul_rn(__fadd_rn(upper, val), 0.5f) ? upper_pivot : pivot;
    else
        index = x < __fmul_rn(__fadd_rn(lower, val), 0.5f) ? lower_pivot : pivot;
    return (unsigned char)index;
}

// Block-wide max of non-negative values (fmaxf drops NaN as Rust's f32::max does); blockDim.x == 256.
__device__ __forceinline__ float block_max(float a, float* shared) {
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, o));
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = a;
    __syncthreads();
    a = shared[0];
    for (int w = 1; w < 8; w++) a = fmaxf(a, shared[w]);
    return a;
}

// One tensor of the multi-tensor step: its buffers (state1/state2 a code per element, absmax1/absmax2
// one f32 per 256-element block), its length, the index of its first block in the launch (blocks are
// numbered tensor after tensor; the table is ordered by it) and its step's scalars (the step count,
// so the bias correction, is per tensor). adamw8bit.rs writes it as 10 u64 words.
struct Ada8Tensor {
    unsigned long long p, state1, state2, absmax1, absmax2, g, n, first_block;
    float step_size, decay, c2_eps, unused;
};

// Every 8-bit tensor of a step in one launch: blocks of 256 threads stride over the tensors'
// 256-element quantization blocks (`blocks` in all), one element per thread, loading the two maps
// into shared memory once; a quantization block's tensor is found by binary search over the
// table's first blocks.
extern "C" __global__ void adamw8bit_blockwise_multi_f32(const Ada8Tensor* tensors, unsigned int count,
                                                         unsigned long long blocks, float beta1, float beta2,
                                                         float one_minus_beta1, float one_minus_beta2,
                                                         Code256 signed_map, Code256 unsigned_map) {
    __shared__ float smap[256], umap[256], max1[8], max2[8];
    const unsigned t = threadIdx.x;
    smap[t] = signed_map.v[t];
    umap[t] = unsigned_map.v[t];
    __syncthreads();
    for (unsigned long long b = blockIdx.x; b < blocks; b += gridDim.x) {
        unsigned int lo = 0, hi = count;  // the last tensor whose first block is <= b
        while (hi - lo > 1) {
            const unsigned int mid = (lo + hi) / 2;
            if (tensors[mid].first_block <= b) lo = mid; else hi = mid;
        }
        const Ada8Tensor& ts = tensors[lo];
        float* const p = reinterpret_cast<float*>(ts.p);
        unsigned char* const state1 = reinterpret_cast<unsigned char*>(ts.state1);
        unsigned char* const state2 = reinterpret_cast<unsigned char*>(ts.state2);
        float* const absmax1 = reinterpret_cast<float*>(ts.absmax1);
        float* const absmax2 = reinterpret_cast<float*>(ts.absmax2);
        const float* const g = reinterpret_cast<const float*>(ts.g);
        const unsigned long long n = ts.n, blk = b - ts.first_block;
        const float step_size = ts.step_size, decay = ts.decay, c2_eps = ts.c2_eps;
        const size_t base = (size_t)blk * 256, i = base + t;
        const bool in = i < n;
        const float am1 = absmax1[blk], am2 = absmax2[blk];
        const float gi = in ? g[i] : 0.0f;
        // A non-finite gradient leaves both moments 0 and the parameter untouched.
        const bool live = in && isfinite(gi);
        float m = 0.0f, v = 0.0f;
        if (live) {
            v = __fmul_rn(umap[state2[i]], am2);
            v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
            m = __fmul_rn(smap[state1[i]], am1);
            m = __fadd_rn(__fmul_rn(m, beta1), __fmul_rn(one_minus_beta1, gi));
        }
        float new1 = block_max(fmaxf(0.0f, fabsf(m)), max1);
        const float new2 = block_max(fmaxf(0.0f, fabsf(v)), max2);
        // bitsandbytes lets the lanes past the end of the tensor (g = 0, code 128) into the absmax reduction.
        if (n - base < 256) new1 = fmaxf(new1, fabsf(__fmul_rn(__fmul_rn(smap[128], am1), beta1)));
        // Every thread read the old absmax before block_max's barrier.
        if (t == 0) {
            absmax1[blk] = new1;
            absmax2[blk] = new2;
        }
        if (in) {
            if (live) {
                float pi = __fadd_rn(p[i], __fmul_rn(step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), c2_eps))));
                p[i] = __fmul_rn(pi, decay);
            }
            unsigned char q1;
            if (new1 == 0.0f) {
                // The CPU reproduces bitsandbytes' 0/0 here: code 0, then the sign fix wraps it to 255.
                q1 = 255;
            } else {
                q1 = quantize_search(smap, __fdiv_rn(m, new1), -1.0f);
                // Keep a tiny momentum's sign: move one code toward m's sign if the nearest code has the other sign.
                if ((signbit(smap[q1]) != 0) != (signbit(m) != 0)) q1 = m > 0.0f ? (unsigned char)(q1 + 1) : (unsigned char)(q1 - 1);
            }
            state1[i] = q1;
            state2[i] = new2 == 0.0f ? 0 : quantize_search(umap, __fdiv_rn(v, new2), 0.0f);
        }
        __syncthreads();  // block_max's shared maxima are rewritten for the next block
    }
}

// bitsandbytes' 32-bit kernel (kOptimizer32bit2State, ADAM) for tensors below min_8bit_size: no non-finite
// check, decay after the Adam step. `decay` is 1 when the parameter takes no decay (x * 1 is exact).
extern "C" __global__ void adamw8bit_fp32_f32(float* p, float* m, float* v, const float* g, unsigned long long n,
                                              float beta1, float beta2, float one_minus_beta1,
                                              float one_minus_beta2, float c2_eps, float step_size, float decay) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(one_minus_beta1, gi));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(one_minus_beta2, __fmul_rn(gi, gi)));
        const float pi = __fadd_rn(p[i], __fmul_rn(step_size, __fdiv_rn(mi, __fadd_rn(__fsqrt_rn(vi), c2_eps))));
        p[i] = __fmul_rn(pi, decay);
        m[i] = mi;
        v[i] = vi;
    }
}
