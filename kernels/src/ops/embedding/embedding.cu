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
