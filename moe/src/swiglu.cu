// gpt-oss clamped SwiGLU on interleaved gate/up in f32 (see swiglu.rs for the CPU reference):
// g = min(gate, limit), u = clamp(up, -limit, limit), z = (u + 1) * g * sigmoid(alpha * g).
// One thread per output element, grid-stride; h[2i] is the gate and h[2i + 1] the up of z[i].
// The operations follow the reference's order; results differ from it by expf's rounding.

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Rust's f32::clamp: NaN stays NaN.
__device__ __forceinline__ float clamp_up(float v, float limit) {
    if (v < -limit) v = -limit;
    if (v > limit) v = limit;
    return v;
}

// z: [n, I]; h: [n, 2I]; elems = n * I. fminf, like Rust's f32::min, returns limit for a NaN gate.
extern "C" __global__ void swiglu_f32(float* z, const float* h, unsigned long long elems, float alpha, float limit) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < elems; i += (size_t)gridDim.x * blockDim.x) {
        const float g = fminf(h[2 * i], limit);
        const float u = clamp_up(h[2 * i + 1], limit);
        z[i] = (u + 1.0f) * g * sigmoid(alpha * g);
    }
}

// dh: [n, 2I]; h: [n, 2I]; dz: [n, I]. The clamps pass gradient on their boundary (torch's clamp
// and min do) and none beyond it; a NaN gate or up gets none either, as in the reference.
extern "C" __global__ void swiglu_bwd_f32(float* dh, const float* h, const float* dz, unsigned long long elems,
                                          float alpha, float limit) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < elems; i += (size_t)gridDim.x * blockDim.x) {
        const float gate = h[2 * i], up = h[2 * i + 1], d = dz[i];
        const float g = fminf(gate, limit);
        const float u = clamp_up(up, limit);
        const float s = sigmoid(alpha * g);
        const float glu = g * s;
        dh[2 * i] = gate <= limit ? d * (u + 1.0f) * (s + alpha * g * s * (1.0f - s)) : 0.0f;
        dh[2 * i + 1] = fabsf(up) <= limit ? d * glu : 0.0f;
    }
}
