// Attention with per-head sinks over per-query visible key ranges, forward and backward, f32 in
// and out (see mod.rs for the math and the layouts). Flash style: O(T) memory, online softmax,
// the log-sum-exp kept for the backward, no [T, T] buffer.
//
// The tiled kernels (attention_{fwd,bwd_dq,bwd_dkdv}_f32_d<DP>) run FA_WARPS warps per block on
// a tile of FA_TILE rows (queries of one head, or keys of one KV head); each warp owns 16 rows.
// The other side (keys, or the queries of the group's heads) streams through shared memory in
// tiles of FA_TILE, loaded once per block for all its rows, and only tiles that some row of the
// block can see are visited (a sliding layer touches ~3 key tiles per query tile).
//
// Products run on the bf16 tensor cores (mma.sync m16n8k16, f32 accumulation) with every f32
// operand split as hi = bf16(x), lo = bf16(x - hi) and a·b ≈ hi·hi + hi·lo + lo·hi: the dropped
// lo·lo and the rounding of lo are ~2^-17 of |a|·|b|, close to f32 rounding. Compiled with
// MMA_ONE_PASS defined (mod.rs: SRC_ONE_PASS, Mma::Bf16) only hi·hi is taken: operands rounded to
// bf16 once, as a bf16 PyTorch model computes, for a third of the tensor-core work. Head dims are padded
// with zeros to DP (16, 32, 64 or 128) and rows past the valid range are zeros, so the padding
// never meets uninitialised data. Fragment layouts are the PTX ISA's for m16n8k16 (g = lane / 4,
// t = lane % 4): a lane holds rows g and g + 8 of its warp's 16 rows and, of each 8 columns, the
// pair 2t, 2t + 1; a score tile's accumulators are therefore also the A operand of the next
// product (P·V, dS·K, ...) without a trip through shared memory.
// Visible ranges are clamped to the buffers, so bad ranges give wrong numbers, never bad reads.
// No atomics to global memory: every output element has one owner (deterministic).
//
// attention_delta_f32 and attention_dsinks_f32 are one warp per item / one block per head.

#include <cuda_bf16.h>

#define ATT_WARPS 8
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no <cmath> INFINITY

#define FA_WARPS 4
#define FA_TILE (16 * FA_WARPS)  // rows per block = rows per streamed tile
#define FA_LDT (FA_TILE + 8)     // bf16 row stride of a transposed tile [DP][FA_LDT]
#define FA_NB (FA_TILE / 8)      // 8-column blocks of a score tile

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    return v + __shfl_xor_sync(FULL_MASK, v, 2);
}

// c += a · b for one m16n8k16 bf16 product.
__device__ __forceinline__ void mma(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int ld32(const bf16* p) { return *reinterpret_cast<const unsigned int*>(p); }

// A fragment (16 x 16) of a row-major bf16 tile at `base` (its top-left), row stride ld.
__device__ __forceinline__ void load_a(unsigned int* a, const bf16* base, int ld) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    a[0] = ld32(base + g * ld + 2 * t);
    a[1] = ld32(base + (g + 8) * ld + 2 * t);
    a[2] = ld32(base + g * ld + 2 * t + 8);
    a[3] = ld32(base + (g + 8) * ld + 2 * t + 8);
}

// acc (16 x 8) += a · b, with a's hi/lo fragments and b (16 x 8) stored n-major at `bh` / `bl`
// (element (k, n) at b[n * ld + k]): hi·hi + hi·lo + lo·hi.
__device__ __forceinline__ void mma3(float* acc, const unsigned int* ah, const unsigned int* al, const bf16* bh,
                                     const bf16* bl, int ld) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int at = g * ld + 2 * t;
    const unsigned int h0 = ld32(bh + at), h1 = ld32(bh + at + 8);
    mma(acc, ah, h0, h1);
#ifndef MMA_ONE_PASS
    const unsigned int l0 = ld32(bl + at), l1 = ld32(bl + at + 8);
    mma(acc, ah, l0, l1);
    mma(acc, al, h0, h1);
#endif
}

// (x, y) as packed bf16 hi and lo pairs (x in the low half).
__device__ __forceinline__ void split2(float x, float y, unsigned int& hi, unsigned int& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x - __low2float(h), y - __high2float(h));
    hi = *reinterpret_cast<const unsigned int*>(&h);
    lo = *reinterpret_cast<const unsigned int*>(&l);
}

// The A fragments (hi, lo) of columns 16kk .. 16kk + 16 of a 16-row accumulator tile s[FA_NB][4].
__device__ __forceinline__ void acc_to_a(const float (*s)[4], int kk, unsigned int* ah, unsigned int* al) {
    split2(s[2 * kk][0], s[2 * kk][1], ah[0], al[0]);
    split2(s[2 * kk][2], s[2 * kk][3], ah[1], al[1]);
    split2(s[2 * kk + 1][0], s[2 * kk + 1][1], ah[2], al[2]);
    split2(s[2 * kk + 1][2], s[2 * kk + 1][3], ah[3], al[3]);
}

// Rows r0 .. r0 + FA_TILE of a row-major f32 matrix (row stride `stride`, first d columns from
// base) as bf16 hi and lo tiles: row-major [FA_TILE][DP + 8] into nh/nl and transposed
// [DP][FA_LDT] into th/tl (either pair may be null). Rows >= rend and columns >= d are zeros.
// Each thread issues all its loads before the first store, so the tile costs about one memory
// latency rather than one per element (blockDim.x must be 32 * FA_WARPS).
template <int DP>
__device__ __forceinline__ void load_tile(bf16* nh, bf16* nl, bf16* th, bf16* tl, const float* __restrict__ base,
                                          size_t stride, unsigned int r0, unsigned int rend, unsigned int d) {
    constexpr int LD = DP + 8, PER = FA_TILE / 2 * DP / (32 * FA_WARPS);
    float x[PER], y[PER];
#pragma unroll
    for (int it = 0; it < PER; ++it) {
        const int e = threadIdx.x + it * 32 * FA_WARPS;
        const int r = 2 * (e / DP), c = e % DP;  // rows r and r + 1 of column c
        x[it] = y[it] = 0.0f;
        if ((unsigned int)c < d) {
            if (r0 + r < rend) x[it] = base[(size_t)(r0 + r) * stride + c];
            if (r0 + r + 1 < rend) y[it] = base[(size_t)(r0 + r + 1) * stride + c];
        }
    }
#pragma unroll
    for (int it = 0; it < PER; ++it) {
        const int e = threadIdx.x + it * 32 * FA_WARPS;
        const int r = 2 * (e / DP), c = e % DP;
        unsigned int hi, lo;
        split2(x[it], y[it], hi, lo);
        if (nh) {
            const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&hi);
            nh[r * LD + c] = h.x;
            nh[(r + 1) * LD + c] = h.y;
#ifndef MMA_ONE_PASS  // the one-pass build never reads the lo tiles
            const __nv_bfloat162 l = *reinterpret_cast<const __nv_bfloat162*>(&lo);
            nl[r * LD + c] = l.x;
            nl[(r + 1) * LD + c] = l.y;
#endif
        }
        if (th) {
            *reinterpret_cast<unsigned int*>(th + c * FA_LDT + r) = hi;
#ifndef MMA_ONE_PASS
            *reinterpret_cast<unsigned int*>(tl + c * FA_LDT + r) = lo;
#endif
        }
    }
}

// The block's rows' visible ranges [lo, hi) of the other side (clamped to `limit`) into
// rlo/rhi [FA_TILE], and their union's bounds into span[0..2] (span[0] >= span[1]: nothing).
// Both barriers also publish whatever the block wrote to shared memory before the call.
__device__ __forceinline__ void row_ranges(unsigned int* rlo, unsigned int* rhi, unsigned int* span,
                                           const unsigned int* __restrict__ lo_g,
                                           const unsigned int* __restrict__ hi_g, unsigned int r0,
                                           unsigned int rows, unsigned int limit) {
    if (threadIdx.x == 0) {
        span[0] = 0xffffffffu;
        span[1] = 0;
    }
    __syncthreads();
    if (threadIdx.x < FA_TILE) {
        const unsigned int i = r0 + threadIdx.x;
        unsigned int lo = 0, hi = 0;
        if (i < rows) {
            hi = min(hi_g[i], limit);
            lo = min(lo_g[i], hi);
        }
        rlo[threadIdx.x] = lo;
        rhi[threadIdx.x] = hi;
        if (lo < hi) {
            atomicMin(&span[0], lo);
            atomicMax(&span[1], hi);
        }
    }
    __syncthreads();
}

// Writes a warp's 16 x DP accumulator tile acc[DP / 8][4] times mul to dst rows r0 .. r0 + 16
// (row stride `stride`; rows >= rows and columns >= d are skipped).
template <int DP>
__device__ __forceinline__ void store_rows(float* __restrict__ dst, size_t stride, const float (*acc)[4],
                                           unsigned int r0, unsigned int rows, unsigned int d, float mul) {
    const unsigned int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const unsigned int r = r0 + g + 8 * (e >> 1), c = n * 8 + 2 * t + (e & 1);
            if (r < rows && c < d) dst[(size_t)r * stride + c] = acc[n][e] * mul;
        }
    }
}

// s[FA_NB][4] (16 rows x FA_TILE columns) = A · B^T: A's hi/lo fragments a*[DP / 16][4] (16 x DP),
// B row-major [FA_TILE][DP + 8] hi/lo in shared memory.
template <int DP>
__device__ __forceinline__ void scores(float (*s)[4], const unsigned int (*ah)[4], const unsigned int (*al)[4],
                                       const bf16* bh, const bf16* bl) {
    constexpr int LD = DP + 8;
#pragma unroll
    for (int nb = 0; nb < FA_NB; ++nb) {
        s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) mma3(s[nb], ah[kk], al[kk], bh + nb * 8 * LD + kk * 16, bl + nb * 8 * LD + kk * 16, LD);
    }
}

// acc[DP / 8][4] (16 x DP) += P · B: P the 16 x FA_TILE accumulator tile p[FA_NB][4], B
// [FA_TILE x DP] stored transposed [DP][FA_LDT] hi/lo in shared memory.
template <int DP>
__device__ __forceinline__ void accumulate(float (*acc)[4], const float (*p)[4], const bf16* bth, const bf16* btl) {
#pragma unroll
    for (int kk = 0; kk < FA_TILE / 16; ++kk) {
        unsigned int ah[4], al[4];
        acc_to_a(p, kk, ah, al);
#pragma unroll
        for (int n = 0; n < DP / 8; ++n)
            mma3(acc[n], ah, al, bth + n * 8 * FA_LDT + kk * 16, btl + n * 8 * FA_LDT + kk * 16, FA_LDT);
    }
}

// Forward: block (query tile, head h), blockIdx.x = tile_rev * nq + h (heads of a KV group are
// neighbours, reading the same K/V; the longest causal tiles go first).
// q [T, nq*d], k and v [Tk, nkv*d], sinks [nq], klo/khi [T] -> o [T, nq*d], lse [T, nq]. The
// running max starts at the sink, so a query with no visible key ends with o = 0, lse = sink.
// Shared memory: K [FA_TILE][DP + 8] hi, lo; V^T [DP][FA_LDT] hi, lo; ranges.
template <int DP>
__device__ __forceinline__ void fwd(float* __restrict__ o, float* __restrict__ lse, const float* __restrict__ q,
                                    const float* __restrict__ k, const float* __restrict__ v,
                                    const float* __restrict__ sinks, const unsigned int* __restrict__ klo,
                                    const unsigned int* __restrict__ khi, unsigned int T, unsigned int Tk,
                                    unsigned int nq, unsigned int nkv, unsigned int d, float scale) {
    constexpr int LD = DP + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* kh = reinterpret_cast<bf16*>(smem);
    bf16* kl = kh + FA_TILE * LD;
    bf16* vth = kl + FA_TILE * LD;
    bf16* vtl = vth + DP * FA_LDT;
    unsigned int* rlo = reinterpret_cast<unsigned int*>(vtl + DP * FA_LDT);
    unsigned int* rhi = rlo + FA_TILE;
    unsigned int* span = rhi + FA_TILE;

    const unsigned int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned int tiles = (T + FA_TILE - 1) / FA_TILE;
    const unsigned int h = blockIdx.x % nq, q0 = (tiles - 1 - blockIdx.x / nq) * FA_TILE;
    const unsigned int kvh = h / (nq / nkv);
    const size_t qrow = (size_t)nq * d, krow = (size_t)nkv * d;

    // Q's fragments stay in registers; the K tile's space stages them.
    load_tile<DP>(kh, kl, nullptr, nullptr, q + (size_t)h * d, qrow, q0, T, d);
    row_ranges(rlo, rhi, span, klo, khi, q0, T, Tk);
    unsigned int qa_h[DP / 16][4], qa_l[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
        load_a(qa_h[kk], kh + warp * 16 * LD + kk * 16, LD);
        load_a(qa_l[kk], kl + warp * 16 * LD + kk * 16, LD);
    }
    unsigned int lo[2], hi[2];
    float m[2], z[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        lo[x] = rlo[warp * 16 + g + 8 * x];
        hi[x] = rhi[warp * 16 + g + 8 * x];
        m[x] = sinks[h];
        z[x] = 1.0f;
    }
    const unsigned int kbeg = span[0], kend = span[1];

    float acc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (unsigned int k0 = kbeg; k0 < kend; k0 += FA_TILE) {
        __syncthreads();  // the previous tile (or Q's staging) is no longer read
        load_tile<DP>(kh, kl, nullptr, nullptr, k + (size_t)kvh * d, krow, k0, kend, d);
        load_tile<DP>(nullptr, nullptr, vth, vtl, v + (size_t)kvh * d, krow, k0, kend, d);
        __syncthreads();
        float s[FA_NB][4];
        scores<DP>(s, qa_h, qa_l, kh, kl);
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nb = 0; nb < FA_NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned int j = k0 + nb * 8 + 2 * t + (e & 1), x = e >> 1;
                s[nb][e] = (j >= lo[x] && j < hi[x]) ? s[nb][e] * scale : NEG_INF;
                mx[x] = fmaxf(mx[x], s[nb][e]);
            }
        }
        float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            const float m_new = fmaxf(m[x], quad_max(mx[x]));
            corr[x] = expf(m[x] - m_new);
            m[x] = m_new;
        }
#pragma unroll
        for (int nb = 0; nb < FA_NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int x = e >> 1;
                s[nb][e] = s[nb][e] == NEG_INF ? 0.0f : expf(s[nb][e] - m[x]);
                sum[x] += s[nb][e];
            }
        }
#pragma unroll
        for (int x = 0; x < 2; ++x) z[x] = z[x] * corr[x] + quad_sum(sum[x]);
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
            acc[n][0] *= corr[0];
            acc[n][1] *= corr[0];
            acc[n][2] *= corr[1];
            acc[n][3] *= corr[1];
        }
        accumulate<DP>(acc, s, vth, vtl);
    }
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] /= z[e >> 1];
    }
    store_rows<DP>(o + (size_t)h * d, qrow, acc, q0 + warp * 16, T, d, 1.0f);
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const unsigned int i = q0 + warp * 16 + g + 8 * x;
        if (t == 0 && i < T) lse[(size_t)i * nq + h] = m[x] + logf(z[x]);
    }
}

// dq [T, nq*d] (assigned): block (query tile, head h) as in the forward. Over the visible key
// tiles: p_ij = exp(s_ij - lse_i), ds_ij = p_ij (dO_i . v_j - D_i), dq_i = scale sum_j ds_ij k_j.
// Shared memory: K [FA_TILE][DP + 8] hi, lo; K^T [DP][FA_LDT] hi, lo; V [FA_TILE][DP + 8] hi, lo;
// ranges.
template <int DP>
__device__ __forceinline__ void bwd_dq(float* __restrict__ dq, const float* __restrict__ q,
                                       const float* __restrict__ k, const float* __restrict__ v,
                                       const float* __restrict__ lse, const float* __restrict__ delta,
                                       const float* __restrict__ dout, const unsigned int* __restrict__ klo,
                                       const unsigned int* __restrict__ khi, unsigned int T, unsigned int Tk,
                                       unsigned int nq, unsigned int nkv, unsigned int d, float scale) {
    constexpr int LD = DP + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* kh = reinterpret_cast<bf16*>(smem);
    bf16* kl = kh + FA_TILE * LD;
    bf16* kth = kl + FA_TILE * LD;
    bf16* ktl = kth + DP * FA_LDT;
    bf16* vh = ktl + DP * FA_LDT;
    bf16* vl = vh + FA_TILE * LD;
    unsigned int* rlo = reinterpret_cast<unsigned int*>(vl + FA_TILE * LD);
    unsigned int* rhi = rlo + FA_TILE;
    unsigned int* span = rhi + FA_TILE;

    const unsigned int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned int tiles = (T + FA_TILE - 1) / FA_TILE;
    const unsigned int h = blockIdx.x % nq, q0 = (tiles - 1 - blockIdx.x / nq) * FA_TILE;
    const unsigned int kvh = h / (nq / nkv);
    const size_t qrow = (size_t)nq * d, krow = (size_t)nkv * d;

    load_tile<DP>(kh, kl, nullptr, nullptr, q + (size_t)h * d, qrow, q0, T, d);
    load_tile<DP>(vh, vl, nullptr, nullptr, dout + (size_t)h * d, qrow, q0, T, d);
    row_ranges(rlo, rhi, span, klo, khi, q0, T, Tk);
    unsigned int qa_h[DP / 16][4], qa_l[DP / 16][4], da_h[DP / 16][4], da_l[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
        load_a(qa_h[kk], kh + warp * 16 * LD + kk * 16, LD);
        load_a(qa_l[kk], kl + warp * 16 * LD + kk * 16, LD);
        load_a(da_h[kk], vh + warp * 16 * LD + kk * 16, LD);
        load_a(da_l[kk], vl + warp * 16 * LD + kk * 16, LD);
    }
    unsigned int lo[2], hi[2];
    float li[2], di[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const unsigned int r = warp * 16 + g + 8 * x, i = q0 + r;
        lo[x] = rlo[r];
        hi[x] = rhi[r];
        li[x] = i < T ? lse[(size_t)i * nq + h] : 0.0f;
        di[x] = i < T ? delta[(size_t)i * nq + h] : 0.0f;
    }
    const unsigned int kbeg = span[0], kend = span[1];

    float acc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (unsigned int k0 = kbeg; k0 < kend; k0 += FA_TILE) {
        __syncthreads();
        load_tile<DP>(kh, kl, kth, ktl, k + (size_t)kvh * d, krow, k0, kend, d);
        load_tile<DP>(vh, vl, nullptr, nullptr, v + (size_t)kvh * d, krow, k0, kend, d);
        __syncthreads();
        float s[FA_NB][4], dp[FA_NB][4];
        scores<DP>(s, qa_h, qa_l, kh, kl);
        scores<DP>(dp, da_h, da_l, vh, vl);
#pragma unroll
        for (int nb = 0; nb < FA_NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned int j = k0 + nb * 8 + 2 * t + (e & 1), x = e >> 1;
                const float p = (j >= lo[x] && j < hi[x]) ? expf(s[nb][e] * scale - li[x]) : 0.0f;
                s[nb][e] = p * (dp[nb][e] - di[x]);
            }
        }
        accumulate<DP>(acc, s, kth, ktl);
    }
    store_rows<DP>(dq + (size_t)h * d, qrow, acc, q0 + warp * 16, T, d, scale);
}

// dk, dv [Tk, nkv*d] (assigned): block (key tile, KV head kvh), blockIdx.x = tile * nkv + kvh.
// Over the group's query heads and the query tiles that see some key of the tile (qlo/qhi [Tk]):
// dv_j = sum_i p_ij dO_i, dk_j = scale sum_i ds_ij q_i. Warp rows are keys (P^T, dS^T).
// Shared memory: Q and dO, each [FA_TILE][DP + 8] hi, lo and transposed [DP][FA_LDT] hi, lo
// (the first two stage K and V); ranges; lse and delta of the query tile.
template <int DP>
__device__ __forceinline__ void bwd_dkdv(float* __restrict__ dk, float* __restrict__ dv,
                                         const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, const float* __restrict__ lse,
                                         const float* __restrict__ delta, const float* __restrict__ dout,
                                         const unsigned int* __restrict__ qlo,
                                         const unsigned int* __restrict__ qhi, unsigned int T, unsigned int Tk,
                                         unsigned int nq, unsigned int nkv, unsigned int d, float scale) {
    constexpr int LD = DP + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* qh = reinterpret_cast<bf16*>(smem);
    bf16* ql = qh + FA_TILE * LD;
    bf16* qth = ql + FA_TILE * LD;
    bf16* qtl = qth + DP * FA_LDT;
    bf16* oh = qtl + DP * FA_LDT;
    bf16* ol = oh + FA_TILE * LD;
    bf16* oth = ol + FA_TILE * LD;
    bf16* otl = oth + DP * FA_LDT;
    unsigned int* rlo = reinterpret_cast<unsigned int*>(otl + DP * FA_LDT);
    unsigned int* rhi = rlo + FA_TILE;
    unsigned int* span = rhi + FA_TILE;
    float* lse_sh = reinterpret_cast<float*>(span + 2);
    float* delta_sh = lse_sh + FA_TILE;

    const unsigned int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned int kvh = blockIdx.x % nkv, j0 = (blockIdx.x / nkv) * FA_TILE;
    const unsigned int group = nq / nkv;
    const size_t qrow = (size_t)nq * d, krow = (size_t)nkv * d;

    load_tile<DP>(qh, ql, nullptr, nullptr, k + (size_t)kvh * d, krow, j0, Tk, d);
    load_tile<DP>(oh, ol, nullptr, nullptr, v + (size_t)kvh * d, krow, j0, Tk, d);
    row_ranges(rlo, rhi, span, qlo, qhi, j0, Tk, T);
    unsigned int ka_h[DP / 16][4], ka_l[DP / 16][4], va_h[DP / 16][4], va_l[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
        load_a(ka_h[kk], qh + warp * 16 * LD + kk * 16, LD);
        load_a(ka_l[kk], ql + warp * 16 * LD + kk * 16, LD);
        load_a(va_h[kk], oh + warp * 16 * LD + kk * 16, LD);
        load_a(va_l[kk], ol + warp * 16 * LD + kk * 16, LD);
    }
    unsigned int lo[2], hi[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        lo[x] = rlo[warp * 16 + g + 8 * x];
        hi[x] = rhi[warp * 16 + g + 8 * x];
    }
    const unsigned int ibeg = span[0], iend = span[1];

    float acc_k[DP / 8][4], acc_v[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_k[n][e] = acc_v[n][e] = 0.0f;
    }
    for (unsigned int h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (unsigned int i0 = ibeg; i0 < iend; i0 += FA_TILE) {
            __syncthreads();
            load_tile<DP>(qh, ql, qth, qtl, q + (size_t)h * d, qrow, i0, iend, d);
            load_tile<DP>(oh, ol, oth, otl, dout + (size_t)h * d, qrow, i0, iend, d);
            if (threadIdx.x < FA_TILE) {
                const unsigned int i = i0 + threadIdx.x;
                lse_sh[threadIdx.x] = i < iend ? lse[(size_t)i * nq + h] : 0.0f;
                delta_sh[threadIdx.x] = i < iend ? delta[(size_t)i * nq + h] : 0.0f;
            }
            __syncthreads();
            float s[FA_NB][4], dp[FA_NB][4];
            scores<DP>(s, ka_h, ka_l, qh, ql);
            scores<DP>(dp, va_h, va_l, oh, ol);
#pragma unroll
            for (int nb = 0; nb < FA_NB; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const unsigned int c = nb * 8 + 2 * t + (e & 1), i = i0 + c, x = e >> 1;
                    const float p = (i >= lo[x] && i < hi[x]) ? expf(s[nb][e] * scale - lse_sh[c]) : 0.0f;
                    s[nb][e] = p;
                    dp[nb][e] = p * (dp[nb][e] - delta_sh[c]);
                }
            }
            accumulate<DP>(acc_v, s, oth, otl);
            accumulate<DP>(acc_k, dp, qth, qtl);
        }
    }
    store_rows<DP>(dk + (size_t)kvh * d, krow, acc_k, j0 + warp * 16, Tk, d, scale);
    store_rows<DP>(dv + (size_t)kvh * d, krow, acc_v, j0 + warp * 16, Tk, d, 1.0f);
}

// One extern "C" symbol per padded head width DP; blockDim.x is 32 * FA_WARPS and the dynamic
// shared memory is what mod.rs (tile_smem_bytes) computes for the kernel and DP.
#define FA_STAMP(DP)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS) attention_fwd_f32_d##DP(                  \
        float* __restrict__ o, float* __restrict__ lse, const float* __restrict__ q,                      \
        const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ sinks,        \
        const unsigned int* __restrict__ klo, const unsigned int* __restrict__ khi, unsigned int T,       \
        unsigned int Tk, unsigned int nq, unsigned int nkv, unsigned int d, float scale) {                \
        fwd<DP>(o, lse, q, k, v, sinks, klo, khi, T, Tk, nq, nkv, d, scale);                              \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS) attention_bwd_dq_f32_d##DP(               \
        float* __restrict__ dq, const float* __restrict__ q, const float* __restrict__ k,                 \
        const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,      \
        const float* __restrict__ dout, const unsigned int* __restrict__ klo,                             \
        const unsigned int* __restrict__ khi, unsigned int T, unsigned int Tk, unsigned int nq,           \
        unsigned int nkv, unsigned int d, float scale) {                                                  \
        bwd_dq<DP>(dq, q, k, v, lse, delta, dout, klo, khi, T, Tk, nq, nkv, d, scale);                    \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS) attention_bwd_dkdv_f32_d##DP(             \
        float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ q,                      \
        const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,          \
        const float* __restrict__ delta, const float* __restrict__ dout,                                  \
        const unsigned int* __restrict__ qlo, const unsigned int* __restrict__ qhi, unsigned int T,       \
        unsigned int Tk, unsigned int nq, unsigned int nkv, unsigned int d, float scale) {                \
        bwd_dkdv<DP>(dk, dv, q, k, v, lse, delta, dout, qlo, qhi, T, Tk, nq, nkv, d, scale);              \
    }

FA_STAMP(16)
FA_STAMP(32)
FA_STAMP(64)
FA_STAMP(128)

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
