// Rotary position embedding in place, half-split (NeoX) layout: in each head of x [T, heads * d],
// element i pairs with i + d/2. One thread per (token, i) computes cos and sin once and rotates that
// pair in every head. The angle is pos * inv_freq[i] rounded to f32 as on the CPU, and cos/sin are
// the precise sincosf: positions reach 131072, where a fast intrinsic's error grows with the angle.

extern "C" __global__ void rope_f32(float* x, const unsigned int* positions, const float* inv_freq,
                                    unsigned long long tokens, unsigned int heads, unsigned int head_dim,
                                    float attention_scaling, int inverse) {
    const unsigned int half = head_dim / 2;
    const size_t width = (size_t)heads * head_dim;
    const size_t pairs = (size_t)tokens * half;
    for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        const size_t t = p / half;
        const unsigned int i = (unsigned int)(p % half);
        const float angle = (float)positions[t] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        c *= attention_scaling;
        s *= attention_scaling;
        if (inverse) s = -s;
        float* row = x + t * width;
        for (unsigned int h = 0; h < heads; ++h) {
            float* head = row + (size_t)h * head_dim;
            const float a = head[i], b = head[i + half];
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

// cos and sin of every (token, i < head_dim / 2), times attention_scaling, computed as rope_f32
// computes them: cs[(t * half + i) * 2] = c and cs[(t * half + i) * 2 + 1] = s. The attention split
// kernel rotates q and k with this table as it splits them (attention.cu).
extern "C" __global__ void rope_table_f32(float* cs, const unsigned int* positions, const float* inv_freq,
                                          unsigned long long tokens, unsigned int half, float attention_scaling) {
    const size_t pairs = (size_t)tokens * half;
    for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        const float angle = (float)positions[p / half] * inv_freq[p % half];
        float s, c;
        sincosf(angle, &s, &c);
        cs[2 * p] = c * attention_scaling;
        cs[2 * p + 1] = s * attention_scaling;
    }
}
