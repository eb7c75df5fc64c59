// Elementwise f32 kernels: bf16 cast, y += x, y *= s, row gather / scatter, and a sum of squares.
// Every kernel strides over its elements (or rows), so any grid covers any length.
#include <cuda_bf16.h>

#define GRID_STRIDE(i, n) for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// Round to nearest even, as half::bf16::from_f32 (NaN stays NaN).
extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* y, const float* x, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] = __float2bfloat16_rn(x[i]);
}

// x = hi + lo to about 2^-17 relative: hi = bf16(x), lo = bf16(x - hi) (0 where hi is not finite).
extern "C" __global__ void split_f32_to_bf16x2(__nv_bfloat16* hi, __nv_bfloat16* lo, const float* x,
                                               unsigned long long n) {
    GRID_STRIDE(i, n) {
        const __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
        const float hf = __bfloat162float(h);
        hi[i] = h;
        lo[i] = __float2bfloat16_rn(isfinite(hf) ? __fsub_rn(x[i], hf) : 0.0f);
    }
}

extern "C" __global__ void add_f32(float* y, const float* x, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] += x[i];
}

extern "C" __global__ void scale_f32(float* y, float s, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] *= s;
}

// out[r, :] = x[idx[r], :] for r < rows; an index >= src_rows gives a NaN row (never read).
extern "C" __global__ void gather_rows_f32(float* out, const float* x, const unsigned int* idx, unsigned long long rows,
                                           unsigned int src_rows, unsigned int hidden) {
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned int k = idx[r];
        float* o = out + r * hidden;
        if (k >= src_rows) {
            for (unsigned int j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = __int_as_float(0x7fc00000);
            continue;
        }
        const float* src = x + (size_t)k * hidden;
        for (unsigned int j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = src[j];
    }
}

// out[idx[r], :] = src[r, :] for r < rows; an index >= dst_rows is skipped (never written).
extern "C" __global__ void scatter_rows_f32(float* out, const float* src, const unsigned int* idx,
                                            unsigned long long rows, unsigned int dst_rows, unsigned int hidden) {
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned int k = idx[r];
        if (k >= dst_rows) continue;
        float* o = out + (size_t)k * hidden;
        const float* s = src + r * hidden;
        for (unsigned int j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = s[j];
    }
}

// *out += sum(x^2): per-thread partial sums, a block reduction, one atomicAdd per block.
// Needs a block of a multiple of 32 threads.
extern "C" __global__ void sum_squares_f32(float* out, const float* x, unsigned long long n) {
    __shared__ float shared[32];
    float v = 0.0f;
    GRID_STRIDE(i, n) v += x[i] * x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)((blockDim.x + 31) >> 5) ? shared[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) atomicAdd(out, v);
    }
}
