// Global gradient norm and gradient scaling in f32 (torch.nn.utils.clip_grad_norm_).

// acc[0] += sum(x^2). Each block sums in f64 (the CPU reference sums in f64) and adds its total to acc with one
// f32 atomic; blockDim.x is a multiple of 32, at most 1024.
extern "C" __global__ void sum_squares_f32(float* acc, const float* x, unsigned long long n) {
    __shared__ double partial[32];
    double s = 0.0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double v = (double)x[i];
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (blockDim.x >> 5) ? partial[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (lane == 0) atomicAdd(acc, (float)s);
    }
}

// x *= s (rounded like the CPU multiply; a NaN s poisons x as torch's does).
extern "C" __global__ void scale_f32(float* x, unsigned long long n, float s) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = __fmul_rn(x[i], s);
}
