// Global gradient norm and gradient scaling in f32 (torch.nn.utils.clip_grad_norm_).

// Deterministic sum of squares in f64: each chunk's sum goes to partials[chunk] (blockDim.x a
// multiple of 32, at most 1024), then sum_partials_f64 (one block) adds them in a fixed order to
// acc[0]. No atomics, so the norm is the same bits on every run.
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

// Many tensors in one launch: a table of (address, length, first chunk) rows, the tensors cut into
// chunks of CHUNK elements numbered tensor after tensor (mod.rs builds it: no empty tensors, first
// chunks increasing). Blocks stride over the chunks; a chunk's tensor is found by binary search.
#define CHUNK 32768u

struct TensorRef {
    unsigned long long ptr, n, first;
};

// The tensor of chunk c, and the chunk's element range [begin, end) in it.
__device__ __forceinline__ float* chunk_of(const TensorRef* t, unsigned int count, unsigned int c,
                                           size_t& begin, size_t& end) {
    unsigned int lo = 0, hi = count;  // the last tensor whose first chunk is <= c
    while (hi - lo > 1) {
        const unsigned int mid = (lo + hi) / 2;
        if (t[mid].first <= c) lo = mid; else hi = mid;
    }
    begin = (size_t)(c - t[lo].first) * CHUNK;
    end = min(begin + CHUNK, (size_t)t[lo].n);
    return reinterpret_cast<float*>(t[lo].ptr);
}

// partials[c] = the sum of squares of chunk c (in f64), for every chunk.
extern "C" __global__ void sum_squares_multi_f32(double* partials, const TensorRef* t, unsigned int count,
                                                 unsigned int chunks) {
    for (unsigned int c = blockIdx.x; c < chunks; c += gridDim.x) {
        size_t begin, end;
        const float* x = chunk_of(t, count, c, begin, end);
        double s = 0.0;
        for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
            const double v = (double)x[i];
            s += v * v;
        }
        s = block_sum_f64(s);
        if (threadIdx.x == 0) partials[c] = s;
        __syncthreads();  // block_sum_f64's shared partials are reused by the next chunk
    }
}

// acc[0] += sum(partials[0..count]), one block.
extern "C" __global__ void sum_partials_f64(double* acc, const double* partials, unsigned int count) {
    double s = 0.0;
    for (unsigned int i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
    s = block_sum_f64(s);
    if (threadIdx.x == 0) acc[0] += s;
}

// x *= s for every element of every tensor of the table (rounded like the CPU multiply; a NaN s
// poisons x as torch's does).
extern "C" __global__ void scale_multi_f32(const TensorRef* t, unsigned int count, unsigned int chunks, float s) {
    for (unsigned int c = blockIdx.x; c < chunks; c += gridDim.x) {
        size_t begin, end;
        float* x = chunk_of(t, count, c, begin, end);
        for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) x[i] = __fmul_rn(x[i], s);
    }
}

// x = 0 for every element of every tensor of the table (zeroing many gradients in one launch).
extern "C" __global__ void zero_multi_f32(const TensorRef* t, unsigned int count, unsigned int chunks) {
    for (unsigned int c = blockIdx.x; c < chunks; c += gridDim.x) {
        size_t begin, end;
        float* x = chunk_of(t, count, c, begin, end);
        for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) x[i] = 0.0f;
    }
}
