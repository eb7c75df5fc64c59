// torch AdamW (single-tensor path) in f32, element for element the CPU `adamw_element` in adamw.rs:
//   p *= decay; m = lerp(m, g, 1 - beta1); v = v * beta2 + (1 - beta2) * g * g;
//   p += neg_step_size * m / (sqrt(v) / bc2_sqrt + eps)
// Every operation is an explicitly rounded intrinsic: NVRTC contracts a * b + c into an FMA by default, which
// the CPU code does not do (except in torch's lerp, which fuses on purpose), so the intrinsics keep the two
// bit for bit equal. The scalars are computed on the host exactly as the CPU step computes them.

extern "C" __global__ void adamw_step_f32(float* p, float* m, float* v, const float* g, unsigned long long n,
                                          float decay, float w1, float beta2, float one_minus_beta2,
                                          float bc2_sqrt, float eps, float neg_step_size) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i], mi = m[i];
        const float pi = __fmul_rn(p[i], decay);
        // torch's lerp switches formula at w = 0.5 to stay exact at w = 1, and fuses the multiply-add.
        const float diff = __fsub_rn(gi, mi);
        const float mn = fabsf(w1) < 0.5f ? __fmaf_rn(w1, diff, mi) : __fmaf_rn(__fsub_rn(w1, 1.0f), diff, gi);
        const float vn = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vn), bc2_sqrt), eps);
        p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step_size, mn), denom));
        m[i] = mn;
        v[i] = vn;
    }
}
