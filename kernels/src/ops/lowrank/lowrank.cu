// Products with a low-rank factor in f32, for LoRA on dense projections (mod.rs has the CPU
// references). A launch takes up to three parts whose ranks sum to at most RB (a bucket of 8, 16,
// 24 or 32: the launcher splits larger ranks); part p has rank r_p, a factor M_p(j, c) at
// factor[j sj + c sc] and a row-wise buffer R_p(t, j) at rows[t ld + j]. Column j of a launch is
// column j - off_p of the part it falls in (off_p: the ranks before it). Every sum runs in one fixed
// order: the results are the same bits on every run.
#include <cuda_bf16.h>
//
// lowrank_down: R_p(t, j) = alpha_p Σ_k X(t, k) M_p(j, k)             (u = x Aᵀ, du = s dy B)
//               and optionally X in bf16 (hi = bf16(X), lo = bf16(X - hi)) for the tensor-core
//               product that reads the same X
// lowrank_up:   Y(t, c) = [Y(t, c)] + bias(c) + Σ_p alpha_p Σ_j R_p(t, j) M_p(j, c)
//                                                                    (y += s u Bᵀ + b, dx += du A)
// lowrank_grad: M_p(j, c) += alpha_p Σ_t R_p(t, j) Q(t, c)            (dB += s dyᵀ u, dA += duᵀ x)

struct LrPart {
    unsigned long long factor;  // const float* M_p (written by lowrank_grad)
    unsigned long long rows;    // float* R_p (written by lowrank_down)
    unsigned long long sj, sc, ld;
    unsigned int rank;
    float alpha;
};

struct LrParts {
    LrPart p[3];
    unsigned int n;  // parts in use
};

constexpr int LR_THREADS = 256;

// The part of launch column j (< the ranks' sum) and its column within the part.
__device__ __forceinline__ int lr_part(const LrParts& ps, int j, int& jp) {
    int p = 0;
    jp = j;
    while (p + 1 < (int)ps.n && jp >= (int)ps.p[p].rank) {
        jp -= (int)ps.p[p].rank;
        ++p;
    }
    return p;
}

__device__ __forceinline__ int lr_total(const LrParts& ps) {
    int r = 0;
    for (unsigned int p = 0; p < ps.n; ++p) r += (int)ps.p[p].rank;
    return r;
}

// Per launch column j: where its factor row and its row-wise column start, their strides and
// alpha (null bases past the ranks' sum), so that no loop indexes the parts at run time.
template <int RB>
struct LrCols {
    float* factor[RB];
    float* rows[RB];
    unsigned long long sc[RB], ld[RB];
    float alpha[RB];
};

// Threads j < RB fill column j's entry; the caller synchronises before reading it.
template <int RB>
__device__ __forceinline__ void lr_cols(const LrParts& ps, LrCols<RB>& cols) {
    const int j = threadIdx.x;
    if (j >= RB) return;
    const int total = lr_total(ps);
    if (j < total) {
        int jp;
        const int p = lr_part(ps, j, jp);
        cols.factor[j] = reinterpret_cast<float*>(ps.p[p].factor) + (size_t)jp * ps.p[p].sj;
        cols.rows[j] = reinterpret_cast<float*>(ps.p[p].rows) + jp;
        cols.sc[j] = ps.p[p].sc;
        cols.ld[j] = ps.p[p].ld;
        cols.alpha[j] = ps.p[p].alpha;
    } else {
        cols.factor[j] = nullptr;
        cols.rows[j] = nullptr;
        cols.sc[j] = 0;
        cols.ld[j] = 0;
        cols.alpha[j] = 0.0f;
    }
}

// ---- lowrank_down ----------------------------------------------------------------------------
// Block (x, y): DOWN_THREADS rows (thread = row) over k range y of `ks` (a multiple of DOWN_KX), in
// chunks of DOWN_KX: the chunk's x tile is read coalesced into shared memory transposed
// ([DOWN_KX][rows]) and the factor's chunk as [DOWN_KX][RB]; each thread then takes its row's x value
// and four factor values at a time (broadcasts) per k and keeps its RB sums in registers, while the
// next chunk's loads are in flight in registers. With one k range the block writes alpha times its
// sums; with several it writes them to ws[y][row][j] (32 columns a row) and lowrank_reduce_rows adds
// the ranges in order. With `hi` (not null) the blocks also write X rounded to bf16 as they read it
// (each element once: the blocks' rows and k ranges tile X), and with `lo` the rounding's remainder
// in bf16 (0 where hi is not finite), the same values as elementwise.cu's cast_f32_to_bf16 and
// split_f32_to_bf16x2.
constexpr int DOWN_THREADS = 128, DOWN_KX = 16;
constexpr int DOWN_XPT = DOWN_KX;  // x values a thread loads per chunk (DOWN_THREADS rows x DOWN_KX)

template <int RB>
__device__ void lowrank_down(const float* __restrict__ x, LrParts ps, unsigned int t, unsigned int k, unsigned int ks,
                             float* __restrict__ ws, __nv_bfloat16* __restrict__ hi, __nv_bfloat16* __restrict__ lo) {
    static_assert(RB % 4 == 0 && RB * DOWN_KX % DOWN_THREADS == 0, "float4 factor reads; whole factor chunks");
    __shared__ float xs[DOWN_KX][DOWN_THREADS + 1];
    __shared__ __align__(16) float ms[DOWN_KX][RB];
    __shared__ LrCols<RB> cols;
    const int tid = threadIdx.x;
    lr_cols<RB>(ps, cols);
    __syncthreads();
    const unsigned int row_base = blockIdx.x * DOWN_THREADS;
    const unsigned int kb = blockIdx.y * ks, ke = min(k, kb + ks);
    // Element i of a chunk for this thread: row row_base + e / DOWN_KX, k k0 + e % DOWN_KX with
    // e = i DOWN_THREADS + tid (16 consecutive k of a row per 16 threads: coalesced).
    float xr[DOWN_XPT], mr[RB * DOWN_KX / DOWN_THREADS];
    auto load = [&](unsigned int k0) {
#pragma unroll
        for (int i = 0; i < DOWN_XPT; ++i) {
            const int e = i * DOWN_THREADS + tid;
            const unsigned int row = row_base + e / DOWN_KX, kk = k0 + e % DOWN_KX;
            xr[i] = (row < t && kk < ke) ? __ldg(x + (size_t)row * k + kk) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < RB * DOWN_KX / DOWN_THREADS; ++i) {
            const int e = i * DOWN_THREADS + tid, j = e % RB, kk = e / RB;
            const float* const f = cols.factor[j];
            mr[i] = (f != nullptr && k0 + kk < ke) ? __ldg(f + (size_t)(k0 + kk) * cols.sc[j]) : 0.0f;
        }
    };
    float acc[RB];
#pragma unroll
    for (int j = 0; j < RB; ++j) acc[j] = 0.0f;
    if (kb < ke) load(kb);
    for (unsigned int k0 = kb; k0 < ke; k0 += DOWN_KX) {
        __syncthreads();  // every thread is done with the previous chunk's tiles
#pragma unroll
        for (int i = 0; i < DOWN_XPT; ++i) {
            const int e = i * DOWN_THREADS + tid;
            xs[e % DOWN_KX][e / DOWN_KX] = xr[i];
        }
        if (hi != nullptr) {
#pragma unroll
            for (int i = 0; i < DOWN_XPT; ++i) {
                const int e = i * DOWN_THREADS + tid;
                const unsigned int row = row_base + e / DOWN_KX, kk = k0 + e % DOWN_KX;
                if (row < t && kk < ke) {
                    const size_t o = (size_t)row * k + kk;
                    const __nv_bfloat16 h = __float2bfloat16_rn(xr[i]);
                    hi[o] = h;
                    if (lo != nullptr) {
                        const float hf = __bfloat162float(h);
                        lo[o] = __float2bfloat16_rn(isfinite(hf) ? __fsub_rn(xr[i], hf) : 0.0f);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < RB * DOWN_KX / DOWN_THREADS; ++i) {
            const int e = i * DOWN_THREADS + tid;
            ms[e / RB][e % RB] = mr[i];
        }
        __syncthreads();
        if (k0 + DOWN_KX < ke) load(k0 + DOWN_KX);  // the next chunk, in flight during the sums
#pragma unroll
        for (int kk = 0; kk < DOWN_KX; ++kk) {
            const float xv = xs[kk][tid];
#pragma unroll
            for (int j = 0; j < RB; j += 4) {
                const float4 m = *reinterpret_cast<const float4*>(&ms[kk][j]);
                acc[j] = fmaf(xv, m.x, acc[j]);
                acc[j + 1] = fmaf(xv, m.y, acc[j + 1]);
                acc[j + 2] = fmaf(xv, m.z, acc[j + 2]);
                acc[j + 3] = fmaf(xv, m.w, acc[j + 3]);
            }
        }
    }
    const unsigned int row = row_base + tid;
    if (row >= t) return;
#pragma unroll
    for (int j = 0; j < RB; ++j) {
        float* const out = cols.rows[j];
        if (out == nullptr) continue;
        if (gridDim.y == 1)
            out[(size_t)row * cols.ld[j]] = cols.alpha[j] * acc[j];
        else
            ws[((size_t)blockIdx.y * t + row) * 32 + j] = acc[j];
    }
}

// R_p(t, j) = alpha_p Σ_y ws[y][t][j] over the `ranges` k ranges of lowrank_down, in order.
__device__ void lowrank_reduce_rows(const float* __restrict__ ws, LrParts ps, unsigned int t, unsigned int ranges) {
    __shared__ LrCols<32> cols;
    lr_cols<32>(ps, cols);
    __syncthreads();
    const unsigned int i = blockIdx.x * LR_THREADS + threadIdx.x, row = i / 32, j = i % 32;
    float* const out = cols.rows[j];
    if (row >= t || out == nullptr) return;
    float s = 0.0f;
    for (unsigned int y = 0; y < ranges; ++y) s += ws[((size_t)y * t + row) * 32 + j];
    out[(size_t)row * cols.ld[j]] = cols.alpha[j] * s;
}

// ---- lowrank_up ------------------------------------------------------------------------------
// A block covers UP_COLS columns (lane l: columns c0 + l + 32 i, i < UP_CPT) and chunks of UP_ROWS
// rows (warp w: UP_RPW rows from w UP_RPW of each; the chunks blockIdx.y, + gridDim.y, ...); each
// thread holds alpha_p M_p(j, c) of its columns in registers for all its chunks and reads the rows'
// R values, staged in shared memory, as broadcasts; a warp loads every Y value of its rows before
// it adds to them.
constexpr int UP_CPT = 2, UP_COLS = 32 * UP_CPT, UP_RPW = 8, UP_ROWS = LR_THREADS / 32 * UP_RPW;

template <int RB>
__device__ void lowrank_up(float* __restrict__ y, const float* __restrict__ bias, LrParts ps, unsigned int t,
                           unsigned int n, unsigned int accumulate) {
    __shared__ float rs[UP_ROWS][RB];
    __shared__ LrCols<RB> cols;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const unsigned int c0 = blockIdx.x * UP_COLS;
    lr_cols<RB>(ps, cols);
    __syncthreads();
    float m[RB][UP_CPT], b[UP_CPT];
#pragma unroll
    for (int i = 0; i < UP_CPT; ++i) {
        const unsigned int c = c0 + lane + 32 * i;
        b[i] = (bias != nullptr && c < n) ? bias[c] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < RB; ++j) {
        const float* const f = cols.factor[j];
#pragma unroll
        for (int i = 0; i < UP_CPT; ++i) {
            const unsigned int c = c0 + lane + 32 * i;
            m[j][i] = (f != nullptr && c < n) ? cols.alpha[j] * f[(size_t)c * cols.sc[j]] : 0.0f;
        }
    }
    // Row chunks t0 = blockIdx.y UP_ROWS, + gridDim.y UP_ROWS, ...: the factor's registers serve
    // every chunk of the block.
    const int r0 = warp * UP_RPW;
    for (unsigned int t0 = blockIdx.y * UP_ROWS; t0 < t; t0 += gridDim.y * UP_ROWS) {
        __syncthreads();  // every warp is past its reads of the previous chunk's rs
        for (int e = tid; e < UP_ROWS * RB; e += LR_THREADS) {
            const int r = e / RB, j = e % RB;
            const float* const base = cols.rows[j];
            rs[r][j] = (base != nullptr && t0 + r < t) ? base[(size_t)(t0 + r) * cols.ld[j]] : 0.0f;
        }
        float yv[UP_RPW][UP_CPT];
#pragma unroll
        for (int r = 0; r < UP_RPW; ++r)
#pragma unroll
            for (int i = 0; i < UP_CPT; ++i) {
                const unsigned int row = t0 + r0 + r, c = c0 + lane + 32 * i;
                yv[r][i] = (accumulate && row < t && c < n) ? y[(size_t)row * n + c] : 0.0f;
            }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < UP_RPW; ++r) {
            const unsigned int row = t0 + r0 + r;
            float s[UP_CPT];
#pragma unroll
            for (int i = 0; i < UP_CPT; ++i) s[i] = 0.0f;
#pragma unroll
            for (int j = 0; j < RB; ++j) {
                const float u = rs[r0 + r][j];
#pragma unroll
                for (int i = 0; i < UP_CPT; ++i) s[i] = fmaf(u, m[j][i], s[i]);
            }
#pragma unroll
            for (int i = 0; i < UP_CPT; ++i) {
                const unsigned int c = c0 + lane + 32 * i;
                if (row < t && c < n) y[(size_t)row * n + c] = yv[r][i] + (s[i] + b[i]);
            }
        }
    }
}

// ---- lowrank_grad ----------------------------------------------------------------------------
// Block (x, y) owns GRAD_COLS = 32 columns (lane = column) and rows y of `rs_len` each: warp w
// takes rows w, w + 8, ... GRAD_U at a time (their Q values and, lane j, R(row, j) loaded first,
// then R staged in the warp's shared memory and read back four values at a time by every lane: a
// quarter of the instructions of a shuffle per value) and keeps RB partial sums; the eight warps'
// partials are added in warp order. With one row range the block updates the factor; with several it writes its sums to
// ws[y][j][c] and lowrank_reduce_cols adds the ranges in order and updates the factor.
constexpr int GRAD_COLS = 32, GRAD_U = 4;

template <int RB>
__device__ void lowrank_grad(const float* __restrict__ qm, LrParts ps, unsigned int t, unsigned int n,
                             unsigned int rs_len, float* __restrict__ ws) {
    __shared__ float red[LR_THREADS / 32][RB][GRAD_COLS];
    __shared__ __align__(16) float rsh[LR_THREADS / 32][GRAD_U][RB];
    __shared__ LrCols<RB> cols;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const unsigned int c = blockIdx.x * GRAD_COLS + lane;
    lr_cols<RB>(ps, cols);
    __syncthreads();
    // Lane j's column of R: its base and row stride.
    const float* const rbase = lane < RB ? cols.rows[lane] : nullptr;
    const unsigned long long rld = lane < RB ? cols.ld[lane] : 0;
    const unsigned int tb = blockIdx.y * rs_len, te = min(t, tb + rs_len);
    float acc[RB];
#pragma unroll
    for (int j = 0; j < RB; ++j) acc[j] = 0.0f;
    for (unsigned int base = tb + warp; base < te; base += LR_THREADS / 32 * GRAD_U) {
        float qv[GRAD_U], pv[GRAD_U];
#pragma unroll
        for (int u = 0; u < GRAD_U; ++u) {
            const unsigned int row = base + LR_THREADS / 32 * u;
            const bool ok = row < te;
            qv[u] = (ok && c < n) ? qm[(size_t)row * n + c] : 0.0f;
            pv[u] = (ok && rbase != nullptr) ? rbase[(size_t)row * rld] : 0.0f;
        }
        __syncwarp();  // the warp's reads of the last rows' R are done
        if (lane < RB) {
#pragma unroll
            for (int u = 0; u < GRAD_U; ++u) rsh[warp][u][lane] = pv[u];
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < GRAD_U; ++u)
#pragma unroll
            for (int j = 0; j < RB; j += 4) {
                const float4 r = *reinterpret_cast<const float4*>(&rsh[warp][u][j]);
                acc[j] = fmaf(r.x, qv[u], acc[j]);
                acc[j + 1] = fmaf(r.y, qv[u], acc[j + 1]);
                acc[j + 2] = fmaf(r.z, qv[u], acc[j + 2]);
                acc[j + 3] = fmaf(r.w, qv[u], acc[j + 3]);
            }
    }
#pragma unroll
    for (int j = 0; j < RB; ++j) red[warp][j][lane] = acc[j];
    __syncthreads();
    for (int e = tid; e < RB * GRAD_COLS; e += LR_THREADS) {
        const int j = e / GRAD_COLS, l = e % GRAD_COLS;
        const unsigned int col = blockIdx.x * GRAD_COLS + l;
        float* const f = cols.factor[j];
        if (f != nullptr && col < n) {
            float s = 0.0f;
#pragma unroll
            for (int w = 0; w < LR_THREADS / 32; ++w) s += red[w][j][l];
            if (gridDim.y == 1)
                f[(size_t)col * cols.sc[j]] += cols.alpha[j] * s;
            else
                ws[((size_t)blockIdx.y * 32 + j) * n + col] = s;
        }
    }
}

// M_p(j, c) += alpha_p Σ_y ws[y][j][c] over the `ranges` row ranges of lowrank_grad, in order.
__device__ void lowrank_reduce_cols(const float* __restrict__ ws, LrParts ps, unsigned int n, unsigned int ranges) {
    __shared__ LrCols<32> cols;
    lr_cols<32>(ps, cols);
    __syncthreads();
    const unsigned int col = blockIdx.x * LR_THREADS + threadIdx.x, j = blockIdx.y;
    float* const f = cols.factor[j];
    if (col >= n || f == nullptr) return;
    float s = 0.0f;
    for (unsigned int y = 0; y < ranges; ++y) s += ws[((size_t)y * 32 + j) * n + col];
    f[(size_t)col * cols.sc[j]] += cols.alpha[j] * s;
}

extern "C" __global__ void __launch_bounds__(LR_THREADS)
    lowrank_reduce_rows_f32(const float* ws, LrParts ps, unsigned int t, unsigned int ranges) {
    lowrank_reduce_rows(ws, ps, t, ranges);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS)
    lowrank_reduce_cols_f32(const float* ws, LrParts ps, unsigned int n, unsigned int ranges) {
    lowrank_reduce_cols(ws, ps, n, ranges);
}

#define LR_KERNELS(RB)                                                                                    \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS) lowrank_down_##RB(                       \
        const float* x, LrParts ps, unsigned int t, unsigned int k, unsigned int ks, float* ws,           \
        __nv_bfloat16* hi, __nv_bfloat16* lo) {                                                         \
        lowrank_down<RB>(x, ps, t, k, ks, ws, hi, lo);                                                  \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_up_##RB(                           \
        float* y, const float* bias, LrParts ps, unsigned int t, unsigned int n, unsigned int accumulate) { \
        lowrank_up<RB>(y, bias, ps, t, n, accumulate);                                                  \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_grad_##RB(                         \
        const float* q, LrParts ps, unsigned int t, unsigned int n, unsigned int rs_len, float* ws) {     \
        lowrank_grad<RB>(q, ps, t, n, rs_len, ws);                                                      \
    }

LR_KERNELS(8)
LR_KERNELS(16)
LR_KERNELS(24)
LR_KERNELS(32)
