// Global gradient norm and gradient scaling in f32 (torch.nn.utils.clip_grad_norm_).

// Deterministic sum of squares in f64: each block writes its partial sum to partials[blockIdx.x]
// (blockDim.x a multiple of 32, at most 1024), then sum_partials_f64 (one block) adds them in a fixed
// order to acc[0]. No atomics, so the norm is the same bits on every run.
__device__ double block_sum_f64(double s) {
    __shared__ double partial[32];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    s = 0.0;
    if (warp == 0) {
        s = lane < (blockDim.x >> 5) ? partial[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    }
    return s;
}

extern "C" __global__ void sum_squares_f32(double* partials, const float* x, unsigned long long n) {
    double s = 0.0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double v = (double)x[i];
        s += v * v;
    }
    s = block_sum_f64(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// acc[0] += sum(partials[0..count]), one block.
extern "C" __global__ void sum_partials_f64(double* acc, const double* partials, unsigned int count) {
    double s = 0.0;
    for (unsigned int i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
    s = block_sum_f64(s);
    if (threadIdx.x == 0) acc[0] += s;
}

// x *= s (rounded like the CPU multiply; a NaN s poisons x as torch's does).
extern "C" __global__ void scale_f32(float* x, unsigned long long n, float s) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = __fmul_rn(x[i], s);
}
