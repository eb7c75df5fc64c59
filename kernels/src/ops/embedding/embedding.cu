// Embedding gather: out[t, :] = table[ids[t], :] as f32, for f32 and bf16 tables. Blocks stride
// over the tokens, threads over the hidden dimension. An id >= vocab never reads the table: its row
// becomes NaN (the host validates ids; this only keeps a bad id from reading out of bounds).
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

#define EMBEDDING(T, NAME)                                                                              \
    extern "C" __global__ void NAME(float* out, const T* table, const unsigned int* ids,               \
                                    unsigned long long tokens, unsigned int vocab, unsigned int hidden) { \
        for (size_t t = blockIdx.x; t < tokens; t += gridDim.x) {                                      \
            const unsigned int id = ids[t];                                                            \
            float* o = out + t * hidden;                                                               \
            if (id >= vocab) {                                                                         \
                for (unsigned int j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = __int_as_float(0x7fc00000); \
                continue;                                                                              \
            }                                                                                          \
            const T* row = table + (size_t)id * hidden;                                                \
            for (unsigned int j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = to_f32(row[j]);     \
        }                                                                                              \
    }

EMBEDDING(float, embedding_f32_f32w)
EMBEDDING(__nv_bfloat16, embedding_f32_bf16w)

// The bf16 table 8 values (16 bytes) a load: for rows of a multiple of 8 values in a 16-byte
// aligned table and output (the launcher checks), so that a warp reads 512 contiguous bytes, which
// is what keeps a table in mapped host memory (read over the bus) at the bus's speed. Same results
// as embedding_f32_bf16w (bf16 -> f32 is exact).
extern "C" __global__ void embedding_f32_bf16w_x8(float* out, const uint4* table, const unsigned int* ids,
                                                  unsigned long long tokens, unsigned int vocab, unsigned int hidden8) {
    for (size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const unsigned int id = ids[t];
        float4* o = reinterpret_cast<float4*>(out + t * hidden8 * 8);
        if (id >= vocab) {
            const float nan = __int_as_float(0x7fc00000);
            for (unsigned int j = threadIdx.x; j < 2 * hidden8; j += blockDim.x) o[j] = make_float4(nan, nan, nan, nan);
            continue;
        }
        const uint4* row = table + (size_t)id * hidden8;
        for (unsigned int j = threadIdx.x; j < hidden8; j += blockDim.x) {
            const uint4 w = row[j];
            // A bf16 is the high half of the f32 with the same bits.
            o[2 * j] = make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                                   __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u));
            o[2 * j + 1] = make_float4(__uint_as_float(w.z << 16), __uint_as_float(w.z & 0xffff0000u),
                                       __uint_as_float(w.w << 16), __uint_as_float(w.w & 0xffff0000u));
        }
    }
}
