// Attention with per-head sinks over per-query visible key ranges, forward and backward, f32
// (see mod.rs for the math and the layouts). Flash style: O(T) memory, online softmax, the
// log-sum-exp kept for the backward.
//
// Every kernel but attention_dsinks_f32 runs one warp per (row, head) item, ATT_WARPS warps per
// block (the launcher uses blockDim.x = 32 * ATT_WARPS), and keeps per-warp copies of the row's
// vectors in shared memory so that lanes working on different keys can broadcast-read them.
// d <= ATT_MAX_D and lanes hold dims lane, lane + 32, ... (ATT_MAX_D / 32 registers).
// Visible ranges are clamped to the buffers, so bad ranges give wrong numbers, never bad reads.

#define ATT_WARPS 8
#define ATT_MAX_D 128
#define ATT_DPL (ATT_MAX_D / 32)
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no <cmath> INFINITY

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// a_shared . b over d floats. With vec4 (b 16-byte aligned, d % 4 == 0) b is read as float4:
// lanes read different rows here, so every load instruction touches 32 rows and 4x fewer of
// them is most of the kernels' time. The summation order is the same either way.
__device__ __forceinline__ float dot_sh(const float* __restrict__ a_shared, const float* __restrict__ b,
                                        unsigned int d, bool vec4) {
    float s = 0.0f;
    if (vec4) {
        const float4* a4 = reinterpret_cast<const float4*>(a_shared);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        for (unsigned int t = 0; t < d / 4; ++t) {
            const float4 x = a4[t], y = b4[t];
            s += x.x * y.x;
            s += x.y * y.y;
            s += x.z * y.z;
            s += x.w * y.w;
        }
    } else {
        for (unsigned int t = 0; t < d; ++t) s += a_shared[t] * b[t];
    }
    return s;
}

// Whether rows of width d at base and base2 (+ multiples of d floats) can be read as float4.
__device__ __forceinline__ bool rows_vec4(const float* base, const float* base2, unsigned int d) {
    return d % 4 == 0 && ((reinterpret_cast<size_t>(base) | reinterpret_cast<size_t>(base2)) & 15) == 0;
}

// q [T, nq*d], k and v [Tk, nkv*d], sinks [nq], klo/khi [T] -> o [T, nq*d], lse [T, nq].
// Lanes score 32 keys at a time; the running max m starts at the sink, so a query with no
// visible key ends with o = 0 and lse = sink.
extern "C" __global__ void attention_fwd_f32(float* __restrict__ o, float* __restrict__ lse,
                                             const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ sinks,
                                             const unsigned int* __restrict__ klo,
                                             const unsigned int* __restrict__ khi, unsigned int T,
                                             unsigned int Tk, unsigned int nq, unsigned int nkv,
                                             unsigned int d, float scale) {
    __shared__ __align__(16) float q_sh[ATT_WARPS][ATT_MAX_D];
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t item = (size_t)blockIdx.x * ATT_WARPS + warp;
    if (item >= (size_t)T * nq) return;  // whole warps only; no block-wide barrier below
    const unsigned int i = (unsigned int)(item / nq), h = (unsigned int)(item % nq);
    const unsigned int g = h / (nq / nkv);
    const size_t qrow = (size_t)nq * d, krow = (size_t)nkv * d;
    float* qs = q_sh[warp];
    for (unsigned int t = lane; t < d; t += 32) qs[t] = q[i * qrow + (size_t)h * d + t];
    __syncwarp();

    const unsigned int hi = min(khi[i], Tk), lo = min(klo[i], hi);
    float m = sinks[h], z = 1.0f;
    float acc[ATT_DPL];
#pragma unroll
    for (int c = 0; c < ATT_DPL; ++c) acc[c] = 0.0f;
    const float* kg = k + (size_t)g * d;
    const float* vg = v + (size_t)g * d;
    const bool vec4 = rows_vec4(k, k, d);
    for (unsigned int j0 = lo; j0 < hi; j0 += 32) {
        const unsigned int j = j0 + lane;
        const float s = j < hi ? dot_sh(qs, kg + j * krow, d, vec4) * scale : NEG_INF;
        const float m_new = fmaxf(m, warp_max(s));
        const float corr = expf(m - m_new);
        const float p = j < hi ? expf(s - m_new) : 0.0f;
        z = z * corr + warp_sum(p);
#pragma unroll
        for (int c = 0; c < ATT_DPL; ++c) acc[c] *= corr;
        const unsigned int n = min(32u, hi - j0);
        for (unsigned int jj = 0; jj < n; ++jj) {
            const float pj = __shfl_sync(FULL_MASK, p, jj);
            const float* vj = vg + (j0 + jj) * krow;
#pragma unroll
            for (int c = 0; c < ATT_DPL; ++c) {
                const unsigned int t = lane + 32 * c;
                if (t < d) acc[c] += pj * vj[t];
            }
        }
        m = m_new;
    }
    const float inv = 1.0f / z;
#pragma unroll
    for (int c = 0; c < ATT_DPL; ++c) {
        const unsigned int t = lane + 32 * c;
        if (t < d) o[i * qrow + (size_t)h * d + t] = acc[c] * inv;
    }
    if (lane == 0) lse[item] = m + logf(z);
}

// delta [T, nq] = dO_i . O_i per (query, head).
extern "C" __global__ void attention_delta_f32(float* __restrict__ delta, const float* __restrict__ o,
                                               const float* __restrict__ dout, unsigned int T,
                                               unsigned int nq, unsigned int d) {
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t item = (size_t)blockIdx.x * ATT_WARPS + warp;
    if (item >= (size_t)T * nq) return;
    const size_t off = item * d;  // [T, nq, d] is [T*nq, d]
    float s = 0.0f;
    for (unsigned int t = lane; t < d; t += 32) s += o[off + t] * dout[off + t];
    s = warp_sum(s);
    if (lane == 0) delta[item] = s;
}

// dsinks[h] -= sum_i exp(S_h - lse[i, h]) * delta[i, h]: one block per head, a fixed summation
// order (deterministic). blockDim.x is 32 * ATT_WARPS.
extern "C" __global__ void attention_dsinks_f32(float* __restrict__ dsinks, const float* __restrict__ sinks,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                unsigned int T, unsigned int nq) {
    __shared__ float part[ATT_WARPS];
    const unsigned int h = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float sink = sinks[h];
    float s = 0.0f;
    for (unsigned int i = threadIdx.x; i < T; i += blockDim.x) {
        const size_t at = (size_t)i * nq + h;
        s += expf(sink - lse[at]) * delta[at];
    }
    s = warp_sum(s);
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < ATT_WARPS ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) dsinks[h] -= s;
    }
}

// dq [T, nq*d] (assigned) per (query, head): over visible keys j, 32 at a time,
// ds_ij = exp(s_ij - lse_i) (dO_i . v_j - D_i), dq_i = scale * sum_j ds_ij k_j.
extern "C" __global__ void attention_bwd_dq_f32(float* __restrict__ dq, const float* __restrict__ q,
                                                const float* __restrict__ k, const float* __restrict__ v,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                const float* __restrict__ dout,
                                                const unsigned int* __restrict__ klo,
                                                const unsigned int* __restrict__ khi, unsigned int T,
                                                unsigned int Tk, unsigned int nq, unsigned int nkv,
                                                unsigned int d, float scale) {
    __shared__ __align__(16) float q_sh[ATT_WARPS][ATT_MAX_D];
    __shared__ __align__(16) float do_sh[ATT_WARPS][ATT_MAX_D];
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t item = (size_t)blockIdx.x * ATT_WARPS + warp;
    if (item >= (size_t)T * nq) return;
    const unsigned int i = (unsigned int)(item / nq), h = (unsigned int)(item % nq);
    const unsigned int g = h / (nq / nkv);
    const size_t krow = (size_t)nkv * d, off = item * d;
    float *qs = q_sh[warp], *dos = do_sh[warp];
    for (unsigned int t = lane; t < d; t += 32) {
        qs[t] = q[off + t];
        dos[t] = dout[off + t];
    }
    __syncwarp();

    const float l = lse[item], di = delta[item];
    const unsigned int hi = min(khi[i], Tk), lo = min(klo[i], hi);
    float acc[ATT_DPL];
#pragma unroll
    for (int c = 0; c < ATT_DPL; ++c) acc[c] = 0.0f;
    const float* kg = k + (size_t)g * d;
    const float* vg = v + (size_t)g * d;
    const bool vec4 = rows_vec4(k, v, d);
    for (unsigned int j0 = lo; j0 < hi; j0 += 32) {
        const unsigned int j = j0 + lane;
        float ds = 0.0f;
        if (j < hi) {
            const float p = expf(dot_sh(qs, kg + j * krow, d, vec4) * scale - l);
            ds = p * (dot_sh(dos, vg + j * krow, d, vec4) - di);
        }
        const unsigned int n = min(32u, hi - j0);
        for (unsigned int jj = 0; jj < n; ++jj) {
            const float dsj = __shfl_sync(FULL_MASK, ds, jj);
            const float* kj = kg + (j0 + jj) * krow;
#pragma unroll
            for (int c = 0; c < ATT_DPL; ++c) {
                const unsigned int t = lane + 32 * c;
                if (t < d) acc[c] += dsj * kj[t];
            }
        }
    }
#pragma unroll
    for (int c = 0; c < ATT_DPL; ++c) {
        const unsigned int t = lane + 32 * c;
        if (t < d) dq[off + t] = acc[c] * scale;
    }
}

// dk, dv [Tk, nkv*d] (assigned) per (key, KV head): over the group's query heads and the queries
// that see key j (qlo/qhi [Tk]), 32 at a time, dv_j = sum p_ij dO_i, dk_j = scale * sum ds_ij q_i.
extern "C" __global__ void attention_bwd_dkdv_f32(float* __restrict__ dk, float* __restrict__ dv,
                                                  const float* __restrict__ q, const float* __restrict__ k,
                                                  const float* __restrict__ v, const float* __restrict__ lse,
                                                  const float* __restrict__ delta, const float* __restrict__ dout,
                                                  const unsigned int* __restrict__ qlo,
                                                  const unsigned int* __restrict__ qhi, unsigned int T,
                                                  unsigned int Tk, unsigned int nq, unsigned int nkv,
                                                  unsigned int d, float scale) {
    __shared__ __align__(16) float k_sh[ATT_WARPS][ATT_MAX_D];
    __shared__ __align__(16) float v_sh[ATT_WARPS][ATT_MAX_D];
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t item = (size_t)blockIdx.x * ATT_WARPS + warp;
    if (item >= (size_t)Tk * nkv) return;
    const unsigned int j = (unsigned int)(item / nkv), g = (unsigned int)(item % nkv);
    const unsigned int group = nq / nkv;
    const size_t qrow = (size_t)nq * d, off = item * d;
    float *ks = k_sh[warp], *vs = v_sh[warp];
    for (unsigned int t = lane; t < d; t += 32) {
        ks[t] = k[off + t];
        vs[t] = v[off + t];
    }
    __syncwarp();

    const unsigned int hi = min(qhi[j], T), lo = min(qlo[j], hi);
    float acc_k[ATT_DPL], acc_v[ATT_DPL];
#pragma unroll
    for (int c = 0; c < ATT_DPL; ++c) acc_k[c] = acc_v[c] = 0.0f;
    const bool vec4 = rows_vec4(q, dout, d);
    for (unsigned int h = g * group; h < (g + 1) * group; ++h) {
        const float* qh = q + (size_t)h * d;
        const float* doh = dout + (size_t)h * d;
        for (unsigned int i0 = lo; i0 < hi; i0 += 32) {
            const unsigned int i = i0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (i < hi) {
                const size_t at = (size_t)i * nq + h;
                p = expf(dot_sh(ks, qh + i * qrow, d, vec4) * scale - lse[at]);
                ds = p * (dot_sh(vs, doh + i * qrow, d, vec4) - delta[at]);
            }
            const unsigned int n = min(32u, hi - i0);
            for (unsigned int ii = 0; ii < n; ++ii) {
                const float pi = __shfl_sync(FULL_MASK, p, ii);
                const float dsi = __shfl_sync(FULL_MASK, ds, ii);
                const float* qi = qh + (i0 + ii) * qrow;
                const float* doi = doh + (i0 + ii) * qrow;
#pragma unroll
                for (int c = 0; c < ATT_DPL; ++c) {
                    const unsigned int t = lane + 32 * c;
                    if (t < d) {
                        acc_v[c] += pi * doi[t];
                        acc_k[c] += dsi * qi[t];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < ATT_DPL; ++c) {
        const unsigned int t = lane + 32 * c;
        if (t < d) {
            dk[off + t] = acc_k[c] * scale;
            dv[off + t] = acc_v[c];
        }
    }
}
