// RMSNorm forward and backward in f32, one block per row (gpt-oss: y = w * x / sqrt(mean(x^2) + eps)).
// Block size is a power of two up to 1024; each thread strides over the row.

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

extern "C" __global__ void rmsnorm_fwd_f32(float* y, float* rstd, const float* x, const float* w,
                                           unsigned int h, float eps) {
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * h;
    float* yr = y + (size_t)blockIdx.x * h;
    float ss = 0.0f;
    for (unsigned int i = threadIdx.x; i < h; i += blockDim.x) ss += xr[i] * xr[i];
    const float r = rsqrtf(block_sum(ss, shared) / (float)h + eps);
    for (unsigned int i = threadIdx.x; i < h; i += blockDim.x) yr[i] = w[i] * (xr[i] * r);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// dx = r * (w * dy) - x * r^3 * mean(x * w * dy), assigned; with `accumulate`, added to dx instead
// (dx + that, rounded once more: the bits of the assignment followed by an f32 add).
extern "C" __global__ void rmsnorm_bwd_f32(float* dx, const float* x, const float* w, const float* rstd,
                                           const float* dy, unsigned int h, int accumulate) {
    __shared__ float shared[32];
    const size_t off = (size_t)blockIdx.x * h;
    const float r = rstd[blockIdx.x];
    float s = 0.0f;
    for (unsigned int i = threadIdx.x; i < h; i += blockDim.x) s += x[off + i] * w[i] * dy[off + i];
    const float m = block_sum(s, shared) / (float)h;
    for (unsigned int i = threadIdx.x; i < h; i += blockDim.x) {
        const float g = r * w[i] * dy[off + i] - x[off + i] * r * r * r * m;
        dx[off + i] = accumulate ? __fadd_rn(dx[off + i], g) : g;
    }
}
