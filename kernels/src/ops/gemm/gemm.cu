// Grouped, arbitrarily strided f32 GEMMs (see mod.rs for the definition): with an f32 strided B
// operand on CUDA cores (a general kernel and three for narrow LoRA shapes), and with B an MXFP4
// expert weight, on bf16 tensor cores.
//
// f32 B (grouped_gemm_f32), SIMT f32 FMA: a block of 256 threads owns a 64x64 tile of C_g and
// walks K in slices of 32; each thread accumulates 4x4 outputs at rows ty + 16 i and columns
// tx + 16 j, so its shared-memory reads are broadcasts (A) or 16 consecutive words (B), both free
// of bank conflicts. Tiles are stored k-major with one word of padding, so the loaders may walk
// either dimension fastest (whichever has the smaller global stride, to coalesce) without bank
// conflicts.
//
// f32 B, narrow shapes (grouped_gemm_f32_narrow_n*, _tiny_k*, _small_out*): see their section
// after the general kernel. MXFP4 B (grouped_gemm_f32_mxfp4w): see the section above that kernel.
//
// Grid: x = n tiles, y = m tiles (at most 65535), z = groups (at most 65535) (the narrow kernels
// state theirs); every level loops grid-stride, and a Grouped::M block loops over the row tiles of
// its own group's length, so the result never depends on the grid size. Offsets are clamped to total_rows, so a bad offsets
// array cannot make the kernel read or write outside the bounds the launcher checked.

#include <cuda_bf16.h>

#define BM 64
#define BN 64
#define BK 32
#define THREADS 256
#define LDS (BM + 1)

static_assert(BM == BN, "one padded row length serves both tiles");
static_assert(THREADS == 256 && BM == 64 && BN == 64 && BK == 32,
              "the 16x16 thread grid and the 4x4 micro-tiles assume these sizes");

// Must match `Params` in mod.rs field for field (#[repr(C)]).
struct Params {
    unsigned long long a_row, a_col, a_group;
    unsigned long long b_row, b_col, b_group;
    unsigned long long c_row, c_col, c_group;
    unsigned int groups;
    unsigned int grouped_k;  // 0: Grouped::M, 1: Grouped::K
    unsigned int m, n, k;
    unsigned int total_rows;
    float alpha, beta;
};

struct StridedB {
    const float* b;
    unsigned long long row, col, group;
    unsigned int n;

    // Bs[kk][nn] = B(kbase + k0 + kk, n0 + nn) of group g, zero outside [depth, n).
    __device__ void operator()(float (*Bs)[LDS], unsigned int g, unsigned int k0, unsigned int n0,
                               unsigned int depth, unsigned int kbase) const {
        const float* bg = b + (size_t)g * group;
        const bool n_fast = col <= row;
        for (int i = threadIdx.x; i < BK * BN; i += THREADS) {
            const int kk = n_fast ? i / BN : i % BK;
            const int nn = n_fast ? i % BN : i / BK;
            const unsigned int gk = k0 + kk, gn = n0 + nn;
            Bs[kk][nn] = (gk < depth && gn < n) ? bg[(size_t)(kbase + gk) * row + (size_t)gn * col] : 0.0f;
        }
    }
};

template <class LoadB>
__device__ void grouped_gemm(const float* a, float* c, const unsigned int* offsets, const Params& p,
                             const LoadB& load_b) {
    __shared__ float As[BK][LDS];
    __shared__ float Bs[BK][LDS];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const bool a_k_fast = p.a_col <= p.a_row;
    for (unsigned int g = blockIdx.z; g < p.groups; g += gridDim.z) {
        const unsigned int end = min(offsets[g + 1], p.total_rows);
        const unsigned int start = min(offsets[g], end);
        const unsigned int len = end - start;
        const unsigned int rows = p.grouped_k ? p.m : len;   // rows of C_g
        const unsigned int depth = p.grouped_k ? len : p.k;  // inner dimension of group g
        const unsigned int row0 = p.grouped_k ? 0u : start;  // first row of A and C
        const unsigned int kbase = p.grouped_k ? start : 0u; // first k of A's columns and B's rows
        const float* ag = a + (size_t)g * p.a_group;
        float* cg = c + (size_t)g * p.c_group;
        for (unsigned int mt = blockIdx.y; (size_t)mt * BM < rows; mt += gridDim.y) {
            for (unsigned int nt = blockIdx.x; (size_t)nt * BN < p.n; nt += gridDim.x) {
                const unsigned int m0 = mt * BM, n0 = nt * BN;
                float acc[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
                for (unsigned int k0 = 0; k0 < depth; k0 += BK) {
                    for (int i = tid; i < BM * BK; i += THREADS) {
                        const int kk = a_k_fast ? i % BK : i / BM;
                        const int mm = a_k_fast ? i / BK : i % BM;
                        const unsigned int gm = m0 + mm, gk = k0 + kk;
                        As[kk][mm] = (gm < rows && gk < depth)
                                         ? ag[(size_t)(row0 + gm) * p.a_row + (size_t)(kbase + gk) * p.a_col]
                                         : 0.0f;
                    }
                    load_b(Bs, g, k0, n0, depth, kbase);
                    __syncthreads();
#pragma unroll 8
                    for (int kk = 0; kk < BK; ++kk) {
                        float av[4], bv[4];
#pragma unroll
                        for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
                        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                        for (int i = 0; i < 4; ++i)
#pragma unroll
                            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
                    }
                    __syncthreads();
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const unsigned int gm = m0 + ty + 16 * i;
                    if (gm >= rows) continue;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const unsigned int gn = n0 + tx + 16 * j;
                        if (gn >= p.n) continue;
                        float* cp = cg + (size_t)(row0 + gm) * p.c_row + (size_t)gn * p.c_col;
                        // beta = 0 overwrites: old C may hold NaN and is never read.
                        const float v = p.alpha * acc[i][j];
                        *cp = p.beta == 0.0f ? v : fmaf(p.beta, *cp, v);
                    }
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    grouped_gemm_f32(float* c, const float* a, const float* b, const unsigned int* offsets, Params p) {
    const StridedB load_b{b, p.b_row, p.b_col, p.b_group, p.n};
    grouped_gemm(a, c, offsets, p, load_b);
}

// ---- f32 B, narrow shapes (LoRA on MoE experts: one of M, N, K is a rank r ≤ 16) ----
//
// The 64x64 tile above wastes most of its work when N, K or a Grouped::K output dimension is a
// LoRA rank. mod.rs (grouped_gemm_f32_kernel) picks one of the three kernels below by shape and
// strides, and the general one otherwise. They take the same Params, clamp offsets the same way,
// loop grid-stride the same way, and sum every output in an order fixed by the shape alone (never
// by the grid), without atomics: results are bitwise reproducible.

// C = α acc + β C; β = 0 overwrites (old C may hold NaN and is never read).
__device__ __forceinline__ void store_c(float* cp, float acc, const Params& p) {
    const float v = p.alpha * acc;
    *cp = p.beta == 0.0f ? v : fmaf(p.beta, *cp, v);
}

// Rows [start, start + len) of group g, offsets clamped to total_rows.
__device__ __forceinline__ void group_rows(const unsigned int* offsets, const Params& p, unsigned int g,
                                           unsigned int& start, unsigned int& len) {
    const unsigned int end = min(offsets[g + 1], p.total_rows);
    start = min(offsets[g], end);
    len = end - start;
}

// One step of a warp-wide reduce-scatter, 2H values per lane down to H: lanes with bit H/2 set keep
// the upper half, the others the lower half, each adding its partner (lane ^ H/2)'s copy of it.
template <int H>
__device__ __forceinline__ void halve(float (&v)[64], int lane) {
    const bool up = lane & (H / 2);
#pragma unroll
    for (int i = 0; i < H; ++i) {
        const float send = up ? v[i] : v[i + H];
        const float keep = up ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, H / 2);
    }
}

// Narrow N (Grouped::M, n ≤ NP ∈ {8, 16}, A's k stride ≤ its row stride): C_g [len, n] =
// A_g [len, K] B_g [K, n] with K large, bound by the reads of A. A block owns NR = 512 / NP rows of
// one group; warp w owns rows w·RPW..+RPW and its 32 lanes split K (lane l: k ≡ l mod 32), so each
// warp-wide load reads 32 consecutive k of one A row (one 128-byte line when A is row-major). Each
// lane keeps RPW x NP = 64 partial sums, reusing every B value for its RPW rows. B comes through
// shared memory KC = 64 k at a time (loaded walking its smaller stride), read as float4 rows of NP
// floats padded by 4, so the 8 lanes of a float4 phase hit distinct banks. The A and B values of
// chunk c + 1 are loaded into registers while chunk c is multiplied (two B stages, one barrier per
// chunk). At the end a warp-wide reduce-scatter (62 shuffles) leaves lane l the sums of the warp's
// outputs 2l and 2l + 1 (row-major in its RPW x NP block): every output is summed in a fixed order.
// Grid: (1, row tiles, groups).
namespace nn {
constexpr int KC = 64;
constexpr int KQ = KC / 32;  // k per lane per chunk
constexpr int WARPS = THREADS / 32;
}  // namespace nn

template <int NP>
__device__ void narrow_n(float* c, const float* a, const float* b, const unsigned int* offsets, const Params& p) {
    using namespace nn;
    constexpr int RPW = 64 / NP, NR = WARPS * RPW, LDB = NP + 4, BPT = KC * NP / THREADS;
    static_assert(RPW * NP == 64 && BPT * THREADS == KC * NP && NP % 4 == 0, "64 sums per lane, even B loads");
    static_assert(2 * KC * LDB * 4 <= 48 * 1024, "static shared memory");
    __shared__ __align__(16) float Bs[2][KC][LDB];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const bool b_n_fast = p.b_col <= p.b_row;
    const unsigned int depth = p.k;
    for (unsigned int g = blockIdx.z; g < p.groups; g += gridDim.z) {
        unsigned int start, len;
        group_rows(offsets, p, g, start, len);
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_row;
        const float* bg = b + (size_t)g * p.b_group;
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
        for (unsigned int mt = blockIdx.y; (size_t)mt * NR < len; mt += gridDim.y) {
            const unsigned int m0 = mt * NR + warp * RPW;  // the warp's first row
            const int rows = m0 < len ? (int)min(len - m0, (unsigned int)RPW) : 0;  // of the warp's RPW
            float av[KQ][RPW], an[KQ][RPW], bn[BPT];
            // A(m0 + r, k0 + lane + 32 q) into dst, this thread's share of B's chunk into bn; zeros
            // past the group's rows, past K and past n.
            auto load = [&](unsigned int k0, float (&dst)[KQ][RPW]) {
#pragma unroll
                for (int q = 0; q < KQ; ++q) {
                    const unsigned int gk = k0 + lane + 32 * q;
                    // One pointer stepped down the rows: fewer live 64-bit addresses than r · a_row.
                    const float* ap = ag + (size_t)m0 * p.a_row + (size_t)gk * p.a_col;
#pragma unroll
                    for (int r = 0; r < RPW; ++r, ap += p.a_row)
                        dst[q][r] = (r < rows && gk < depth) ? *ap : 0.0f;
                }
#pragma unroll
                for (int e = 0; e < BPT; ++e) {
                    const int i = tid + THREADS * e;
                    const int kk = b_n_fast ? i / NP : i % KC, jn = b_n_fast ? i % NP : i / KC;
                    const unsigned int gk = k0 + kk;
                    bn[e] = (gk < depth && jn < p.n) ? bg[(size_t)gk * p.b_row + (size_t)jn * p.b_col] : 0.0f;
                }
            };
            auto stash = [&](float (*bs)[LDB]) {
#pragma unroll
                for (int e = 0; e < BPT; ++e) {
                    const int i = tid + THREADS * e;
                    bs[b_n_fast ? i / NP : i % KC][b_n_fast ? i % NP : i / KC] = bn[e];
                }
            };
            float acc[RPW][NP];
#pragma unroll
            for (int r = 0; r < RPW; ++r)
#pragma unroll
                for (int j = 0; j < NP; ++j) acc[r][j] = 0.0f;
            // Bs[0] is free: every thread passed the barrier after its last read of the previous tile.
            load(0, av);
            stash(Bs[0]);
            __syncthreads();
            int st = 0;
            for (unsigned int k0 = 0; k0 < depth; k0 += KC, st ^= 1) {
                const bool more = k0 + KC < depth;
                if (more) load(k0 + KC, an);
#pragma unroll
                for (int q = 0; q < KQ; ++q) {
                    float bv[NP];
                    const float4* brow = reinterpret_cast<const float4*>(&Bs[st][lane + 32 * q][0]);
#pragma unroll
                    for (int j4 = 0; j4 < NP / 4; ++j4) {
                        const float4 t = brow[j4];
                        bv[4 * j4] = t.x, bv[4 * j4 + 1] = t.y, bv[4 * j4 + 2] = t.z, bv[4 * j4 + 3] = t.w;
                    }
#pragma unroll
                    for (int r = 0; r < RPW; ++r)
#pragma unroll
                        for (int j = 0; j < NP; ++j) acc[r][j] = fmaf(av[q][r], bv[j], acc[r][j]);
                }
                // The other stage was last read before the previous barrier: fill it now, and one
                // barrier per chunk both publishes it and frees this one.
                if (more) stash(Bs[st ^ 1]);
                __syncthreads();
                if (more) {
#pragma unroll
                    for (int q = 0; q < KQ; ++q)
#pragma unroll
                        for (int r = 0; r < RPW; ++r) av[q][r] = an[q][r];
                }
            }
            float v[64];
#pragma unroll
            for (int r = 0; r < RPW; ++r)
#pragma unroll
                for (int j = 0; j < NP; ++j) v[r * NP + j] = acc[r][j];
            halve<32>(v, lane);
            halve<16>(v, lane);
            halve<8>(v, lane);
            halve<4>(v, lane);
            halve<2>(v, lane);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int o = 2 * lane + h, r = o / NP, j = o % NP;
                const unsigned int gm = m0 + r;
                if (gm < len && j < p.n) store_c(cg + (size_t)gm * p.c_row + (size_t)j * p.c_col, v[h], p);
            }
        }
    }
}

// Tiny K (Grouped::M, K ≤ KP ∈ {8, 16}): C_g [len, N] = A_g [len, K] B_g [K, N] with N large, bound
// by the traffic of C. A block owns a TM x 256 tile of C: thread t owns column n0 + t and keeps its
// K values of B in registers (read once per tile); the tile's rows of A, zero-padded to KP, are
// staged in shared memory (loaded walking A's smaller stride) and read as broadcasts. Each thread
// walks the rows RU at a time, so that RU reads of old C are in flight; a warp reads and writes 32
// consecutive words of a row when C is row-major. Grid: (n tiles, row tiles, groups).
namespace tk {
constexpr int TM = 128, TN = THREADS, RU = 4;
static_assert(TM % RU == 0, "row groups never cross the tile");
}  // namespace tk

template <int KP>
__device__ void tiny_k(float* c, const float* a, const float* b, const unsigned int* offsets, const Params& p) {
    using namespace tk;
    static_assert(KP % 4 == 0 && TM * KP * 4 <= 48 * 1024, "float4 rows, static shared memory");
    __shared__ __align__(16) float As[TM][KP];
    const int tid = threadIdx.x;
    const bool a_k_fast = p.a_col <= p.a_row;
    const unsigned int depth = p.k;
    for (unsigned int g = blockIdx.z; g < p.groups; g += gridDim.z) {
        unsigned int start, len;
        group_rows(offsets, p, g, start, len);
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_row;
        const float* bg = b + (size_t)g * p.b_group;
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
        for (unsigned int mt = blockIdx.y; (size_t)mt * TM < len; mt += gridDim.y) {
            const unsigned int m0 = mt * TM, rows = min(len - m0, (unsigned int)TM);
            for (unsigned int nt = blockIdx.x; (size_t)nt * TN < p.n; nt += gridDim.x) {
                const unsigned int gn = nt * TN + tid;
                __syncthreads();  // every thread is past its reads of the previous tile's As
                for (int i = tid; i < TM * KP; i += THREADS) {
                    const int kk = a_k_fast ? i % KP : i / TM, mm = a_k_fast ? i / KP : i % TM;
                    As[mm][kk] = (mm < rows && kk < depth)
                                     ? ag[(size_t)(m0 + mm) * p.a_row + (size_t)kk * p.a_col]
                                     : 0.0f;
                }
                float bv[KP];
#pragma unroll
                for (int kk = 0; kk < KP; ++kk)
                    bv[kk] = (kk < depth && gn < p.n) ? bg[(size_t)kk * p.b_row + (size_t)gn * p.b_col] : 0.0f;
                __syncthreads();
                if (gn >= p.n) continue;  // no barrier before the next tile's first one
                float* cn = cg + (size_t)m0 * p.c_row + (size_t)gn * p.c_col;
#pragma unroll 2
                for (unsigned int r0 = 0; r0 < rows; r0 += RU) {
                    float v[RU], old[RU];
#pragma unroll
                    for (int u = 0; u < RU; ++u) {
                        const float4* ar = reinterpret_cast<const float4*>(&As[r0 + u][0]);
                        float s = 0.0f;
#pragma unroll
                        for (int k4 = 0; k4 < KP / 4; ++k4) {
                            const float4 x = ar[k4];
                            s = fmaf(x.x, bv[4 * k4], s);
                            s = fmaf(x.y, bv[4 * k4 + 1], s);
                            s = fmaf(x.z, bv[4 * k4 + 2], s);
                            s = fmaf(x.w, bv[4 * k4 + 3], s);
                        }
                        v[u] = p.alpha * s;
                    }
                    // All RU reads of old C before any write: they are independent.
                    if (p.beta != 0.0f) {
#pragma unroll
                        for (int u = 0; u < RU; ++u) old[u] = r0 + u < rows ? cn[(size_t)(r0 + u) * p.c_row] : 0.0f;
#pragma unroll
                        for (int u = 0; u < RU; ++u) v[u] = fmaf(p.beta, old[u], v[u]);
                    }
#pragma unroll
                    for (int u = 0; u < RU; ++u)
                        if (r0 + u < rows) cn[(size_t)(r0 + u) * p.c_row] = v[u];
                }
            }
        }
    }
}

// Grouped::K with a small output dimension (n ≤ NP ∈ {8, 16}; mod.rs passes a small m as n by
// transposing the product, and requires A's m stride ≤ its k stride): C_g [M, n] =
// Σ_{t<len} A(m, o+t) B(o+t, n) with M large, bound by the reads of A. A block owns 256 values of m,
// one per thread (a warp reads 32 consecutive m of one row t: one 128-byte line when A's m stride is
// 1), and each thread sums over the group's rows in order t = 0, 1, … for all n outputs of its m.
// B's rows come through shared memory TT at a time (loaded walking its smaller stride) and are read
// as broadcasts; U reads of A are issued together. Grid: (m tiles, 1, groups).
namespace sk {
constexpr int TT = 128, U = 8;
static_assert(TT % U == 0, "row groups never cross the chunk");
}  // namespace sk

template <int NP>
__device__ void small_out(float* c, const float* a, const float* b, const unsigned int* offsets, const Params& p) {
    using namespace sk;
    static_assert(NP % 4 == 0 && TT * NP * 4 <= 48 * 1024, "float4 rows, static shared memory");
    __shared__ __align__(16) float Bs[TT][NP];
    const int tid = threadIdx.x;
    const bool b_n_fast = p.b_col <= p.b_row;
    for (unsigned int g = blockIdx.z; g < p.groups; g += gridDim.z) {
        unsigned int start, len;
        group_rows(offsets, p, g, start, len);
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_col;
        const float* bg = b + (size_t)g * p.b_group + (size_t)start * p.b_row;
        float* cg = c + (size_t)g * p.c_group;
        for (unsigned int it = blockIdx.x; (size_t)it * THREADS < p.m; it += gridDim.x) {
            const unsigned int gm = it * THREADS + tid;
            const bool own = gm < p.m;
            const float* am = ag + (size_t)(own ? gm : 0u) * p.a_row;
            float acc[NP];
#pragma unroll
            for (int j = 0; j < NP; ++j) acc[j] = 0.0f;
            for (unsigned int t0 = 0; t0 < len; t0 += TT) {
                const unsigned int cnt = min(len - t0, (unsigned int)TT);
                __syncthreads();  // every thread is past its reads of the previous chunk
                for (int i = tid; i < TT * NP; i += THREADS) {
                    const int tt = b_n_fast ? i / NP : i % TT, jn = b_n_fast ? i % NP : i / TT;
                    Bs[tt][jn] = (tt < cnt && jn < p.n)
                                     ? bg[(size_t)(t0 + tt) * p.b_row + (size_t)jn * p.b_col]
                                     : 0.0f;
                }
                __syncthreads();
                if (!own) continue;  // the chunk loop's barriers are still reached
                for (unsigned int tt = 0; tt < cnt; tt += U) {
                    float av[U];
#pragma unroll
                    for (int u = 0; u < U; ++u) av[u] = tt + u < cnt ? am[(size_t)(t0 + tt + u) * p.a_col] : 0.0f;
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const float4* brow = reinterpret_cast<const float4*>(&Bs[tt + u][0]);
#pragma unroll
                        for (int j4 = 0; j4 < NP / 4; ++j4) {
                            const float4 x = brow[j4];
                            acc[4 * j4] = fmaf(av[u], x.x, acc[4 * j4]);
                            acc[4 * j4 + 1] = fmaf(av[u], x.y, acc[4 * j4 + 1]);
                            acc[4 * j4 + 2] = fmaf(av[u], x.z, acc[4 * j4 + 2]);
                            acc[4 * j4 + 3] = fmaf(av[u], x.w, acc[4 * j4 + 3]);
                        }
                    }
                }
            }
            if (!own) continue;
#pragma unroll
            for (int j = 0; j < NP; ++j)
                if (j < p.n) store_c(cg + (size_t)gm * p.c_row + (size_t)j * p.c_col, acc[j], p);
        }
    }
}

// One entry point per shape class and padded width, with the general kernel's arguments. narrow_n
// keeps 64 sums and two chunks of A per lane within 128 registers so that two blocks share an SM
// (its launches have few more blocks than SMs); the others need fewer than 80 unconstrained (three
// or four blocks per SM; a cap of 64 makes ptxas spill, and a stated minimum of 1 lets it take 160).
#define GEMM_F32_KERNEL(name, impl, ...)                                                                 \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__)                                            \
        name(float* c, const float* a, const float* b, const unsigned int* offsets, Params p) {          \
        impl(c, a, b, offsets, p);                                                                       \
    }

GEMM_F32_KERNEL(grouped_gemm_f32_narrow_n8, narrow_n<8>, THREADS, 2)
GEMM_F32_KERNEL(grouped_gemm_f32_narrow_n16, narrow_n<16>, THREADS, 2)
GEMM_F32_KERNEL(grouped_gemm_f32_tiny_k8, tiny_k<8>, THREADS)
GEMM_F32_KERNEL(grouped_gemm_f32_tiny_k16, tiny_k<16>, THREADS)
GEMM_F32_KERNEL(grouped_gemm_f32_small_out8, small_out<8>, THREADS)
GEMM_F32_KERNEL(grouped_gemm_f32_small_out16, small_out<16>, THREADS)


// ---- MXFP4 B on tensor cores ----
//
// C_g tile 128x256 per block of 512 threads (16 warps as 2 x 8, each 64x32 of C: 4 x 4 tensor-core
// mma.m16n8k16 accumulators in f32; 256 wide so that each f32 A value, the larger operand by far,
// is fetched from L2 and split half as often), K walked in slices of 32 through two stages:
// the loaders read slice s + 1 into registers, the warps multiply slice s (ldmatrix + mma.sync),
// then the loaders convert and store slice s + 1 into the other stage; one barrier per slice.
// - A (f32, any strides): each value x is split into bf16 hi = bf16(x) and lo = bf16(x - hi), two
//   tiles in shared memory, and every fragment pair runs twice (lo·B, then hi·B) into the same f32
//   (compiled with MMA_ONE_PASS, the Mma::Bf16 variant, only hi is stored and multiplied)
//   accumulator, so x is carried to ~2^-17 of itself: f32-level accuracy from bf16 MMAs.
// - B (MXFP4): each thread decodes 8 bytes (16 values) of one block straight to bf16, exactly
//   (an E2M1 value times a power of two has 2 significant bits; bf16 keeps f32's exponent range),
//   by two byte-permute table look-ups and one bf16x2 multiply by the block scale per pair.
//   Forward (B(k, n) = W[n, k]): the tile is 256 W rows x one 32-value block, stored [n][k] and read
//   as a column-major B. Transposed (B(k, n) = W[k, n]): 32 W rows x 8 blocks, stored [k][n], read
//   row-major. A dequantized copy of W never exists in device memory.
// Rows are padded by 8 bf16 (16 bytes), so the 8 rows an ldmatrix phase reads fall in distinct
// banks. Partial tiles: rows of A and C past the group, n past N and k past K load as zeros and are
// never stored. The epilogue goes through a per-warp [16][32] f32 scratch in shared memory so that C
// is written with any strides, alpha and beta, one 128-byte row per store when C is row-major.

namespace tc {
constexpr int TM = 128, TN = 256, TK = 32, TTHREADS = 512;
constexpr int WARPS_N = TN / 32;           // warps as (TM / 64) x (TN / 32), each 64 x 32 of C
constexpr int A_ROWS = TTHREADS / 8;       // A loader: rows per pass of 8 threads x 4 k
constexpr int A_PASSES = TM / A_ROWS;
constexpr int BLKS = TN / 32;              // transposed B tile: MXFP4 blocks per W row
constexpr int LDA = TK + 8;     // A tiles [m][k]
constexpr int LDB_NK = TK + 8;  // forward B tile [n][k]
constexpr int LDB_KN = TN + 8;  // transposed B tile [k][n]
constexpr int A_ELEMS = TM * LDA;
constexpr int B_ELEMS = TN * LDB_NK > TK * LDB_KN ? TN * LDB_NK : TK * LDB_KN;
static_assert(TM / 64 * WARPS_N * 32 == TTHREADS && TK == 32 && TM % A_ROWS == 0,
              "one 64x32 C tile per warp, one MXFP4 block per k slice");
static_assert(TTHREADS == 2 * TN && TTHREADS == 2 * TK * BLKS,
              "B loaders: two threads per block (forward: per W row; transposed: per W row and block)");
constexpr int STAGE = 2 * A_ELEMS + B_ELEMS;  // bf16 per pipeline stage; two stages
static_assert(2 * STAGE * 2 == 81920, "TC_SMEM_BYTES in mod.rs: the dynamic shared memory of a block");
constexpr int SC_LD = 40;  // epilogue scratch row (f32): float2 stores of a half-warp hit distinct banks
static_assert(TTHREADS / 32 * 16 * SC_LD * 4 <= STAGE * 2, "the epilogue scratch fits in the first stage");
}  // namespace tc

__device__ __forceinline__ unsigned int mul_bf16x2(unsigned int x, unsigned int y) {
    unsigned int d;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(x), "r"(y));
    return d;
}

// 8 E2M1 codes (nibble i = element i, low nibble first) times the bf16x2 scale s2 -> 4 bf16x2.
// The high and low bytes of the bf16 magnitudes 0 0.5 1 1.5 2 3 4 6 are two 8-entry byte tables
// that prmt indexes by the code's low 3 bits; the sign (bit 3) selects 0x80 from a third table.
__device__ __forceinline__ uint4 decode8_bf16(unsigned int q, unsigned int s2) {
    const unsigned int mag = q & 0x77777777u, neg = (q >> 1) & 0x44444444u;
    unsigned int out[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const unsigned int sel = mag >> (16 * h), ssel = neg >> (16 * h);
        const unsigned int hi = __byte_perm(0x3F3F3F00u, 0x40404040u, sel) | __byte_perm(0u, 0x80808080u, ssel);
        const unsigned int lo = __byte_perm(0xC0800000u, 0xC0804000u, sel);
        out[2 * h] = mul_bf16x2(__byte_perm(lo, hi, 0x5140), s2);
        out[2 * h + 1] = mul_bf16x2(__byte_perm(lo, hi, 0x7362), s2);
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(unsigned int* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned int* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// d += a · b: one m16n8k16 bf16 tensor-core product with f32 accumulation.
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned int bf16x2_bits(__nv_bfloat162 v) {
    return *reinterpret_cast<unsigned int*>(&v);
}

template <bool TRANSPOSED>
__device__ void mxfp4_tc_gemm(__nv_bfloat16* sm, float* c, const float* a, const unsigned char* blocks, const unsigned char* scales,
                              const unsigned int* offsets, const Params& p, unsigned int w_rows,
                              unsigned int w_cols) {
    using namespace tc;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const bool a_vec = p.a_col == 1 && (p.a_row & 3) == 0 && (p.a_group & 3) == 0 && ((size_t)a & 15) == 0;
    const bool b_vec = ((size_t)blocks & 7) == 0;
    const unsigned int nblk = w_cols / 32;
    // A loader: k 4·a_kq..+3 of tile rows a_r + A_ROWS j. B loader: 8 bytes (half b_half) of one
    // block: forward, W row n0 + b_x; transposed, W row k0 + b_x, block b_blk of the tile's BLKS.
    const int a_kq = tid % 8, a_r = tid / 8;
    const int b_half = tid % 2, b_x = TRANSPOSED ? tid / (2 * BLKS) : tid / 2;
    const int b_blk = TRANSPOSED ? (tid / 2) % BLKS : 0;
    // Offsets inside a stage: A hi at 0, A lo at A_ELEMS, B at 2 A_ELEMS.
    const int b_dst = 2 * A_ELEMS + (TRANSPOSED ? b_x * LDB_KN + 32 * b_blk + 16 * b_half : b_x * LDB_NK + 16 * b_half);

    for (unsigned int g = blockIdx.z; g < p.groups; g += gridDim.z) {
        const unsigned int end = min(offsets[g + 1], p.total_rows);
        const unsigned int start = min(offsets[g], end);
        const unsigned int rows = end - start, depth = p.k;
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_row;
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
        const size_t w_row0 = (size_t)g * w_rows;
        for (unsigned int mt = blockIdx.y; (size_t)mt * TM < rows; mt += gridDim.y) {
            for (unsigned int nt = blockIdx.x; (size_t)nt * TN < p.n; nt += gridDim.x) {
                const unsigned int m0 = mt * TM, n0 = nt * TN;
                float av[A_PASSES][4];
                uint2 bq;
                unsigned int bsc;
                auto load = [&](unsigned int k0) {
                    const unsigned int gk = k0 + 4 * a_kq;
#pragma unroll
                    for (int j = 0; j < A_PASSES; ++j) {
                        const unsigned int gm = m0 + a_r + A_ROWS * j;
                        const float* src = ag + (size_t)gm * p.a_row;
                        if (gm < rows && a_vec && gk + 3 < depth) {
                            const float4 v = *reinterpret_cast<const float4*>(src + gk);
                            av[j][0] = v.x, av[j][1] = v.y, av[j][2] = v.z, av[j][3] = v.w;
                        } else {
#pragma unroll
                            for (int e = 0; e < 4; ++e)
                                av[j][e] = (gm < rows && gk + e < depth) ? src[(size_t)(gk + e) * p.a_col] : 0.0f;
                        }
                    }
                    bool ok;
                    size_t blk;
                    if (TRANSPOSED) {
                        const unsigned int wr = k0 + b_x, wc = n0 + 32 * b_blk;
                        ok = wr < w_rows && wc < w_cols;
                        blk = (w_row0 + wr) * nblk + wc / 32;
                    } else {
                        const unsigned int wr = n0 + b_x;
                        ok = wr < w_rows && k0 < w_cols;
                        blk = (w_row0 + wr) * nblk + k0 / 32;
                    }
                    bq = make_uint2(0u, 0u);
                    bsc = 127u;
                    if (ok) {
                        bsc = scales[blk];
                        const unsigned char* q = blocks + blk * 16 + 8 * b_half;
                        if (b_vec) {
                            bq = *reinterpret_cast<const uint2*>(q);
                        } else {
                            bq.x = q[0] | (q[1] << 8) | (q[2] << 16) | ((unsigned int)q[3] << 24);
                            bq.y = q[4] | (q[5] << 8) | (q[6] << 16) | ((unsigned int)q[7] << 24);
                        }
                    }
                };
                auto store = [&](__nv_bfloat16* st) {
#pragma unroll
                    for (int j = 0; j < A_PASSES; ++j) {
                        const __nv_bfloat162 h01 = __floats2bfloat162_rn(av[j][0], av[j][1]);
                        const __nv_bfloat162 h23 = __floats2bfloat162_rn(av[j][2], av[j][3]);
                        const float2 f01 = __bfloat1622float2(h01), f23 = __bfloat1622float2(h23);
                        const __nv_bfloat162 l01 = __floats2bfloat162_rn(av[j][0] - f01.x, av[j][1] - f01.y);
                        const __nv_bfloat162 l23 = __floats2bfloat162_rn(av[j][2] - f23.x, av[j][3] - f23.y);
                        const int o = (a_r + A_ROWS * j) * LDA + 4 * a_kq;
                        *reinterpret_cast<uint2*>(st + o) = make_uint2(bf16x2_bits(h01), bf16x2_bits(h23));
#ifndef MMA_ONE_PASS
                        *reinterpret_cast<uint2*>(st + A_ELEMS + o) = make_uint2(bf16x2_bits(l01), bf16x2_bits(l23));
#endif
                    }
                    // E8M0 -> bf16 2^(s-127): the exponent field is s (s = 0: the subnormal 2^-127).
                    const unsigned int s = bsc ? bsc << 7 : 0x40u, s2 = s | (s << 16);
                    *reinterpret_cast<uint4*>(st + b_dst) = decode8_bf16(bq.x, s2);
                    *reinterpret_cast<uint4*>(st + b_dst + 8) = decode8_bf16(bq.y, s2);
                };

                float acc[4][4][4];  // [m16 fragment][n8 fragment][mma C register]
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
#pragma unroll
                        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
                load(0);
                store(sm);
                __syncthreads();
                int stage = 0;
                for (unsigned int k0 = 0; k0 < depth; k0 += TK, stage ^= 1) {
                    const bool more = k0 + TK < depth;
                    if (more) load(k0 + TK);
                    const __nv_bfloat16* const a_hi = sm + stage * STAGE;
                    const __nv_bfloat16* const a_lo = a_hi + A_ELEMS;
                    const __nv_bfloat16* const bs = a_hi + 2 * A_ELEMS;
#pragma unroll
                    for (int kk = 0; kk < TK; kk += 16) {
                        unsigned int bf[2][4];  // [n16 pair]: b0, b1 of n8 fragment 2p, then of 2p + 1
#pragma unroll
                        for (int q = 0; q < 2; ++q) {
                            const int mi = lane / 8, r = lane % 8, n = wn * 32 + 16 * q;
                            if (TRANSPOSED)
                                ldsm_x4_trans(bf[q], bs + (kk + (mi % 2) * 8 + r) * LDB_KN + n + (mi / 2) * 8);
                            else
                                ldsm_x4(bf[q], bs + (n + (mi / 2) * 8 + r) * LDB_NK + kk + (mi % 2) * 8);
                        }
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            unsigned int ah[4];
                            const int o = (wm * 64 + 16 * i + lane % 16) * LDA + kk + (lane / 16) * 8;
#ifndef MMA_ONE_PASS
                            unsigned int al[4];
                            ldsm_x4(al, a_lo + o);
#endif
                            ldsm_x4(ah, a_hi + o);
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
#ifndef MMA_ONE_PASS
                                mma_bf16_16816(acc[i][j], al, &bf[j / 2][2 * (j % 2)]);
#endif
                                mma_bf16_16816(acc[i][j], ah, &bf[j / 2][2 * (j % 2)]);
                            }
                        }
                    }
                    // The other stage was last read before the previous barrier: fill it now, and
                    // one barrier per slice both publishes it and frees this one.
                    if (more) store(sm + (stage ^ 1) * STAGE);
                    __syncthreads();
                }
                // Every warp is past its last read of the tiles: the first stage becomes each warp's
                // [16][SC_LD] f32 scratch, so that C is written one 32-column row per instruction.
                float* const scratch = reinterpret_cast<float*>(sm) + warp * 16 * SC_LD;
                const int gr = lane / 4, tq = lane % 4;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        *reinterpret_cast<float2*>(scratch + gr * SC_LD + 8 * j + 2 * tq) =
                            make_float2(acc[i][j][0], acc[i][j][1]);
                        *reinterpret_cast<float2*>(scratch + (gr + 8) * SC_LD + 8 * j + 2 * tq) =
                            make_float2(acc[i][j][2], acc[i][j][3]);
                    }
                    __syncwarp();
                    const unsigned int gn = n0 + wn * 32 + lane;
#pragma unroll 1  // unrolled, the 16 rows' addresses would take ~70 registers
                    for (int r = 0; r < 16; ++r) {
                        const unsigned int gm = m0 + wm * 64 + 16 * i + r;
                        if (gm < rows && gn < p.n) {
                            float* cp = cg + (size_t)gm * p.c_row + (size_t)gn * p.c_col;
                            // beta = 0 overwrites: old C may hold NaN and is never read.
                            const float v = p.alpha * scratch[r * SC_LD + lane];
                            *cp = p.beta == 0.0f ? v : fmaf(p.beta, *cp, v);
                        }
                    }
                    __syncwarp();
                }
                __syncthreads();  // the next tile's first store overwrites the scratch
            }
        }
    }
}

// Two entry points, one per orientation: inlined into one kernel, both would share its register
// allocation and spill.
#define MXFP4W_KERNEL(name, transposed)                                                                   \
    extern "C" __global__ void __launch_bounds__(tc::TTHREADS, 1)                                        \
        name(float* c, const float* a, const unsigned char* blocks, const unsigned char* scales,        \
             const unsigned int* offsets, Params p, unsigned int w_rows, unsigned int w_cols) {          \
        extern __shared__ __align__(128) unsigned char tc_smem[];                                        \
        mxfp4_tc_gemm<transposed>(reinterpret_cast<__nv_bfloat16*>(tc_smem), c, a, blocks, scales, offsets, p, w_rows, w_cols);                \
    }

MXFP4W_KERNEL(grouped_gemm_f32_mxfp4w, false)
MXFP4W_KERNEL(grouped_gemm_f32_mxfp4w_transposed, true)
