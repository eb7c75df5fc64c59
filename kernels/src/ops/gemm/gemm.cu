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
// Grid: x = n tiles, y = row tiles (at most 65535), z = 1 (small_out states its own; the
// warp-specialized MXFP4 kernels take one block per SM and number their tiles themselves). The row tiles
// of all groups are numbered in group order (row_tile: under Grouped::M each group has as many as
// its rows need, so no block is launched for a tile past a group's rows, and the host needs only the
// total row count, not the plan, to size the grid); every level loops grid-stride, so the result
// never depends on the grid size. Offsets are clamped to total_rows, so a bad offsets array cannot
// make the kernel read or write outside the bounds the launcher checked.

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

// Rows [start, start + len) of group g, offsets clamped to total_rows.
__device__ __forceinline__ void group_rows(const unsigned int* offsets, const Params& p, unsigned int g,
                                           unsigned int& start, unsigned int& len) {
    const unsigned int end = min(offsets[g + 1], p.total_rows);
    start = min(offsets[g], end);
    len = end - start;
}

// The row tiles of TM rows of every group are numbered group by group: group g has ceil(rows / TM)
// tiles, rows being its own row count (Grouped::M) or p.m (Grouped::K, whose groups split K). A
// block takes tiles blockIdx.y, blockIdx.y + gridDim.y, ... (first_tile; blocks with blockIdx.z > 0
// take none), keeping only the tile's index between tiles (the kernels' loops are short of
// registers). With nondecreasing offsets (the launchers' contract) there are fewer than 2^31 tiles
// (check_shapes), so the index never wraps.
//
// row_tile finds tile t: its group g, the group's rows [start, start + len) and the tile's index mt
// in them; false past the last tile. Every warp of the block looks, 32 groups at a time (a prefix
// sum of their tile counts over the lanes; one step for up to 32 experts); all 32 lanes of every
// warp must call it together.
// Row tiles of TM rows in a group of len rows (Grouped::M) or of p.m rows (Grouped::K).
template <unsigned int TM>
__device__ __forceinline__ unsigned int tiles_of(const Params& p, unsigned int len) {
    return ((p.grouped_k ? p.m : len) + TM - 1) / TM;
}

template <unsigned int TM>
__device__ __forceinline__ bool row_tile(const unsigned int* offsets, const Params& p, unsigned int t,
                                         unsigned int& g, unsigned int& start, unsigned int& len,
                                         unsigned int& mt) {
    const unsigned int lane = threadIdx.x % 32;
    unsigned int first = 0;  // tiles before group g
    for (g = 0; g < p.groups; g += 32) {
        unsigned int n = 0;
        if (g + lane < p.groups) {
            unsigned int s, l;
            group_rows(offsets, p, g + lane, s, l);
            n = tiles_of<TM>(p, l);
        }
        unsigned int incl = n;  // tiles of groups g..=g + lane
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const unsigned int up = __shfl_up_sync(0xffffffffu, incl, d);
            if ((int)lane >= d) incl += up;
        }
        const unsigned int hit = __ballot_sync(0xffffffffu, t - first < incl);
        if (hit != 0u) {
            const int j = __ffs(hit) - 1;
            first += __shfl_sync(0xffffffffu, incl - n, j);
            g += j;
            group_rows(offsets, p, g, start, len);
            mt = t - first;
            return true;
        }
        first += __shfl_sync(0xffffffffu, incl, 31);
    }
    return false;
}

// row_tile one group at a time: every value stays warp-uniform (which the shuffles above are not to
// the compiler), so a kernel at its register limit keeps them out of its vector registers, at the
// cost of a serial walk (a dependent load of the offsets per group, from L1 after the first block).
template <unsigned int TM>
__device__ __forceinline__ bool row_tile_serial(const unsigned int* offsets, const Params& p, unsigned int t,
                                                unsigned int& g, unsigned int& start, unsigned int& len,
                                                unsigned int& mt) {
    unsigned int first = 0;  // tiles before group g
    for (g = 0; g < p.groups; ++g) {
        group_rows(offsets, p, g, start, len);
        const unsigned int n = tiles_of<TM>(p, len);
        if (t - first < n) {
            mt = t - first;
            return true;
        }
        first += n;
    }
    return false;
}

// The first row tile of this block (blocks with blockIdx.z > 0 take none).
__device__ __forceinline__ unsigned int first_tile() { return blockIdx.z == 0 ? blockIdx.y : ~0u; }

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
    for (unsigned int t = first_tile(), g, start, len, mt; row_tile<BM>(offsets, p, t, g, start, len, mt);
         t += gridDim.y) {
        const unsigned int rows = p.grouped_k ? p.m : len;   // rows of C_g
        const unsigned int depth = p.grouped_k ? len : p.k;  // inner dimension of group g
        const unsigned int row0 = p.grouped_k ? 0u : start;  // first row of A and C
        const unsigned int kbase = p.grouped_k ? start : 0u; // first k of A's columns and B's rows
        const float* ag = a + (size_t)g * p.a_group;
        float* cg = c + (size_t)g * p.c_group;
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

// α acc + β C, reading C only where `readable` (a predicated load; the value is then not stored);
// β = 0 overwrites (old C may hold NaN and is never read).
__device__ __forceinline__ float c_value(const float* cp, float acc, const Params& p, bool readable = true) {
    const float v = p.alpha * acc;
    return p.beta == 0.0f ? v : fmaf(p.beta, readable ? *cp : 0.0f, v);
}

// C = α acc + β C.
__device__ __forceinline__ void store_c(float* cp, float acc, const Params& p) { *cp = c_value(cp, acc, p); }

// One step of a warp-wide reduce-scatter, 2H of the N values per lane down to H: lanes with bit
// `bit` set keep the upper half, the others the lower half, each adding its partner (lane ^ bit)'s
// copy of it.
template <int H, int N>
__device__ __forceinline__ void halve(float (&v)[N], int lane, int bit) {
    static_assert(2 * H <= N, "the values halved are held");
    const bool up = lane & bit;
#pragma unroll
    for (int i = 0; i < H; ++i) {
        const float send = up ? v[i] : v[i + H];
        const float keep = up ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
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
// Grid: (1, row tiles, 1); each tile's group is found one group at a time (row_tile_serial: at
// 126 registers, the warp-wide search's values would spill, and so would the pointer to a copy of
// the offsets in shared memory: both measured slower), so the launcher sends at most 256 groups here.
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
    for (unsigned int t = first_tile(), g, start, len, mt; row_tile_serial<NR>(offsets, p, t, g, start, len, mt);
         t += gridDim.y) {
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_row;
        const float* bg = b + (size_t)g * p.b_group;
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
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
        halve<32>(v, lane, 16);
        halve<16>(v, lane, 8);
        halve<8>(v, lane, 4);
        halve<4>(v, lane, 2);
        halve<2>(v, lane, 1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int o = 2 * lane + h, r = o / NP, j = o % NP;
            const unsigned int gm = m0 + r;
            if (gm < len && j < p.n) store_c(cg + (size_t)gm * p.c_row + (size_t)j * p.c_col, v[h], p);
        }
    }
}

// Tiny K (Grouped::M, K ≤ KP ∈ {8, 16}): C_g [len, N] = A_g [len, K] B_g [K, N] with N large, bound
// by the traffic of C. A block owns a TM x 256 tile of C: thread t owns column n0 + t and keeps its
// K values of B in registers (read once per tile); the tile's rows of A, zero-padded to KP, are
// staged in shared memory (loaded walking A's smaller stride) and read as broadcasts. Each thread
// walks the rows RU at a time, so that RU reads of old C are in flight; a warp reads and writes 32
// consecutive words of a row when C is row-major. Grid: (n tiles, row tiles, 1).
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
    for (unsigned int t = first_tile(), g, start, len, mt; row_tile<TM>(offsets, p, t, g, start, len, mt);
         t += gridDim.y) {
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_row;
        const float* bg = b + (size_t)g * p.b_group;
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
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

// Grouped::K with a small output dimension (n ≤ NP ∈ {8, 16}; mod.rs passes a small m as n by
// transposing the product, and requires A's m stride ≤ its k stride): C_g [M, n] =
// Σ_{t<len} A(m, o+t) B(o+t, n) with M large, bound by the reads of A. A block owns MW = 64 values
// of m (lane l of every warp: m0 + l and m0 + 32 + l, so a warp reads 32 consecutive m of one row
// t twice: one 128-byte line each when A's m stride is 1), and its 8 warps split the group's rows:
// B's rows come through shared memory TT at a time (loaded walking its smaller stride, read as
// broadcasts) and warp w sums rows w TT/8 .. (w + 1) TT/8 of each chunk in order, U reads of A in
// flight. The warps' partial sums then meet in shared memory and are added in the order w = 0, 1,
// …: every output is summed in an order fixed by the group's length alone. Many small blocks (not
// one thread per m walking all of a long group) keep the work even when the groups are not.
// Grid: (m tiles, 1, groups).
namespace sk {
constexpr int TT = 128, U = 8, MW = 64, WARPS = THREADS / 32, TW = TT / WARPS;
static_assert(TW % U == 0 && MW == 64, "row groups never cross a warp's rows; two m per lane");
}  // namespace sk

template <int NP>
__device__ void small_out(float* c, const float* a, const float* b, const unsigned int* offsets, const Params& p) {
    using namespace sk;
    static_assert(NP % 4 == 0 && (TT * NP + WARPS * NP * MW) * 4 <= 48 * 1024, "float4 rows, static shared memory");
    __shared__ __align__(16) float Bs[TT][NP];
    __shared__ float red[WARPS][NP][MW];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const bool b_n_fast = p.b_col <= p.b_row;
    for (unsigned int g = blockIdx.z; g < p.groups; g += gridDim.z) {
        unsigned int start, len;
        group_rows(offsets, p, g, start, len);
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_col;
        const float* bg = b + (size_t)g * p.b_group + (size_t)start * p.b_row;
        float* cg = c + (size_t)g * p.c_group;
        for (unsigned int it = blockIdx.x; (size_t)it * MW < p.m; it += gridDim.x) {
            const unsigned int gm[2] = {it * MW + lane, it * MW + 32 + lane};
            const bool own[2] = {gm[0] < p.m, gm[1] < p.m};
            const float* am[2] = {ag + (size_t)(own[0] ? gm[0] : 0u) * p.a_row,
                                  ag + (size_t)(own[1] ? gm[1] : 0u) * p.a_row};
            float acc[2][NP];
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < NP; ++j) acc[h][j] = 0.0f;
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
                const unsigned int t_end = min(cnt, (unsigned int)(warp + 1) * TW);
                for (unsigned int tt = warp * TW; tt < t_end; tt += U) {
                    float av[U][2];
#pragma unroll
                    for (int u = 0; u < U; ++u)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
                            av[u][h] = own[h] && tt + u < t_end ? am[h][(size_t)(t0 + tt + u) * p.a_col] : 0.0f;
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const float4* brow = reinterpret_cast<const float4*>(&Bs[tt + u][0]);
#pragma unroll
                        for (int j4 = 0; j4 < NP / 4; ++j4) {
                            const float4 x = brow[j4];
#pragma unroll
                            for (int h = 0; h < 2; ++h) {
                                acc[h][4 * j4] = fmaf(av[u][h], x.x, acc[h][4 * j4]);
                                acc[h][4 * j4 + 1] = fmaf(av[u][h], x.y, acc[h][4 * j4 + 1]);
                                acc[h][4 * j4 + 2] = fmaf(av[u][h], x.z, acc[h][4 * j4 + 2]);
                                acc[h][4 * j4 + 3] = fmaf(av[u][h], x.w, acc[h][4 * j4 + 3]);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < NP; ++j) red[warp][j][32 * h + lane] = acc[h][j];
            __syncthreads();
            // Thread t adds the warps' partials of outputs o = t + THREADS i: column o % MW, n = o / MW.
#pragma unroll
            for (int i = 0; i < NP * MW / THREADS; ++i) {
                const int o = tid + THREADS * i, mm = o % MW, j = o / MW;
                float sum = red[0][j][mm];
#pragma unroll
                for (int w = 1; w < WARPS; ++w) sum += red[w][j][mm];
                const unsigned int m = it * MW + mm;
                if (m < p.m && j < p.n) store_c(cg + (size_t)m * p.c_row + (size_t)j * p.c_col, sum, p);
            }
            __syncthreads();  // every thread is past its reads of `red` before the next tile writes it
        }
    }
}

// One entry point per shape class and padded width, with the general kernel's arguments. narrow_n
// keeps 64 sums and two chunks of A per lane within 128 registers so that two blocks share an SM
// (its launches have few more blocks than SMs); the others need fewer than 80 unconstrained (three
// or four blocks per SM; a cap of 64 makes ptxas spill), except small_out16 (two m and 16 sums per
// lane: ~124, two blocks per SM).
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
// Two kernels. split_a_bf16 writes A once into bf16 hi = bf16(x) and lo = bf16(x - hi), row-major
// [total_rows, kp] with kp = K rounded up to TK and zeros past K (compiled with MMA_ONE_PASS, the
// Mma::Bf16 variant, only hi: x rounded to bf16 once). grouped_gemm_bf16a_mxfp4w{,_transposed}
// then multiplies on bf16 tensor cores (mma.sync m16n8k16, f32 accumulation), every fragment pair
// twice (lo·B, then hi·B, into the same accumulator: x carried to ~2^-17 of itself, f32-level
// accuracy) or once (MMA_ONE_PASS).
// C_g tile 128x256 per block of 512 threads (16 warps as 2 x 8, each 64x32 of C: 4 x 4 accumulators;
// 256 wide so each A value, the larger operand by far, comes from L2 half as often), K walked in
// slices of TK = 64:
// - A: STAGES stages in shared memory filled by cp.async (16 bytes, no registers on the way, rows
//   past the group zero-filled), STAGES - 1 slices in flight while one is multiplied.
// - B (MXFP4): each thread loads one 32-value block (16 bytes and its scale) of slice s + 2 into
//   registers while slice s is multiplied, and decodes slice s + 1's straight to bf16 into one of
//   two decoded tiles, exactly (an E2M1 value times a power of two has 2 significant bits; bf16
//   keeps f32's exponent range), by two byte-permute table look-ups and one bf16x2 multiply by the
//   block scale per pair. Forward (B(k, n) = W[n, k]): the tile is 256 W rows x two blocks, stored
//   [n][k] and read as a column-major B. Transposed (B(k, n) = W[k, n]): 64 W rows x 8 blocks,
//   stored [k][n], read row-major. A dequantized copy of W never exists in device memory.
// One barrier per slice: it publishes slice s's A copies and decoded B, and frees the A stage and
// the decoded tile that slice s - 1 used, which the threads then refill.
// Rows are padded by 8 bf16 (16 bytes), so the 8 rows an ldmatrix phase reads fall in distinct
// banks. Partial tiles: rows of A and C past the group, n past N and k past K load as zeros and are
// never stored. The epilogue goes through a per-warp [16][32] f32 scratch in shared memory so that C
// is written with any strides, alpha and beta, one 128-byte row per store when C is row-major.

// A stages of the mma.sync kernels: 3, or 2 where a GPU's shared memory per block is too small for
// three (mod.rs: Mxfp4Path::MmaSyncTwoStage compiles this source with TC_STAGES 2).
#ifndef TC_STAGES
#define TC_STAGES 3
#endif

namespace tc {
constexpr int TM = 128, TN = 256, TK = 64, TTHREADS = 512, STAGES = TC_STAGES;
static_assert(STAGES >= 2, "one A slice in flight while one is multiplied");
constexpr int WARPS_N = TN / 32;  // warps as (TM / 64) x (TN / 32), each 64 x 32 of C
constexpr int BLKS = TN / 32;     // transposed B tile: MXFP4 blocks per W row
#ifdef MMA_ONE_PASS
constexpr int A_TILES = 1;  // hi
#else
constexpr int A_TILES = 2;  // hi, lo
#endif
constexpr int LDA = TK + 8;     // A tiles [m][k]
constexpr int LDB_NK = TK + 8;  // forward B tile [n][k]
constexpr int LDB_KN = TN + 8;  // transposed B tile [k][n]
constexpr int A_ELEMS = TM * LDA;
constexpr int A_STAGE = A_TILES * A_ELEMS;
constexpr int B_ELEMS = TN * LDB_NK > TK * LDB_KN ? TN * LDB_NK : TK * LDB_KN;
constexpr int A_CHUNKS = TK / 8;                 // 16-byte chunks per A row and slice
constexpr int A_ROWS = TTHREADS / A_CHUNKS;      // A rows copied per pass of the block
static_assert(TM / 64 * WARPS_N * 32 == TTHREADS && TK == 64 && TM % A_ROWS == 0,
              "one 64x32 C tile per warp, two MXFP4 blocks per k slice");
static_assert(TTHREADS == 2 * TN && TTHREADS == TK * BLKS,
              "B loaders: one block per thread (forward: two per W row; transposed: a W row's 8)");
// bf16 elements of dynamic shared memory: the A stages, then two decoded B tiles. mod.rs
// (tc_smem_bytes) computes the same bytes.
constexpr int SMEM_ELEMS = STAGES * A_STAGE + 2 * B_ELEMS;
static_assert(SMEM_ELEMS * 2 == (STAGES * A_TILES * 128 * 72 + 2 * 256 * 72) * 2, "tc_smem_bytes in mod.rs");
constexpr int SC_LD = 40;  // epilogue scratch row (f32): float2 stores of a half-warp hit distinct banks
static_assert(TTHREADS / 32 * 16 * SC_LD * 4 <= SMEM_ELEMS * 2, "the epilogue scratch fits in the tiles");
static_assert((A_ELEMS * 2) % 16 == 0 && (B_ELEMS * 2) % 16 == 0 && (LDA * 2) % 16 == 0, "16-byte aligned rows");
constexpr int SPLIT_THREADS = 256;  // split_a_bf16: 4 k per thread
}  // namespace tc

// Values k .. k + 3 of the A row at src (zeros past K, and all zeros unless ok): one float4 load
// where `vec` (A's k stride 1, its rows and src 16-byte aligned) and all four lie below K.
__device__ __forceinline__ void load4(float (&x)[4], const float* src, bool ok, bool vec, unsigned int k,
                                      const Params& p) {
    if (ok && vec && k + 3 < p.k) {
        const float4 v = *reinterpret_cast<const float4*>(src + k);
        x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] = (ok && k + e < p.k) ? src[(size_t)(k + e) * p.a_col] : 0.0f;
    }
}

// split_a_bf16's bf16 parts of four values of A (k .. k + 3 of row r) into hi (and lo).
__device__ __forceinline__ void split_store4(unsigned int* hi, unsigned int* lo, size_t r, unsigned int kp,
                                             unsigned int k, const float (&x)[4]) {
    const __nv_bfloat162 h01 = __floats2bfloat162_rn(x[0], x[1]), h23 = __floats2bfloat162_rn(x[2], x[3]);
    const size_t o = (r * kp + k) / 2;  // in bf16 pairs
    *reinterpret_cast<uint2*>(hi + o) =
        make_uint2(*reinterpret_cast<const unsigned int*>(&h01), *reinterpret_cast<const unsigned int*>(&h23));
#ifndef MMA_ONE_PASS
    const float2 f01 = __bfloat1622float2(h01), f23 = __bfloat1622float2(h23);
    const __nv_bfloat162 l01 = __floats2bfloat162_rn(x[0] - f01.x, x[1] - f01.y);
    const __nv_bfloat162 l23 = __floats2bfloat162_rn(x[2] - f23.x, x[3] - f23.y);
    *reinterpret_cast<uint2*>(lo + o) =
        make_uint2(*reinterpret_cast<const unsigned int*>(&l01), *reinterpret_cast<const unsigned int*>(&l23));
#else
    (void)lo;
#endif
}

// Rows [0, total_rows) of A into hi (and lo) [total_rows, kp], bf16, zeros at k >= K. Row r is read
// from the group whose clamped offsets hold it (any group when a_group = 0, where all groups share
// one matrix); a row of no group is written as zeros (the GEMM never reads it). Grid: (k chunks of
// 4 SPLIT_THREADS, rows (loops)).
extern "C" __global__ void __launch_bounds__(tc::SPLIT_THREADS)
    split_a_bf16(unsigned int* hi, unsigned int* lo, const float* a, const unsigned int* offsets, Params p,
                 unsigned int kp) {
    const unsigned int k = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (k >= kp) return;
    const bool vec = p.a_col == 1 && (p.a_row & 3) == 0 && (p.a_group & 3) == 0 && ((size_t)a & 15) == 0;
    for (unsigned int r = blockIdx.y; r < p.total_rows; r += gridDim.y) {
        const float* src = nullptr;
        if (p.a_group == 0) {
            src = a + (size_t)r * p.a_row;
        } else {
            for (unsigned int g = 0; g < p.groups; ++g) {
                const unsigned int end = min(offsets[g + 1], p.total_rows), start = min(offsets[g], end);
                if (r >= start && r < end) {
                    src = a + (size_t)g * p.a_group + (size_t)r * p.a_row;
                    break;
                }
            }
        }
        float x[4];
        load4(x, src, src != nullptr, vec, k, p);
        split_store4(hi, lo, r, kp, k, x);
    }
}

// ---- the split with a LoRA down-projection ----
//
// split_a_bf16_down writes split_a_bf16's output for every row a group owns (rows of no group are
// not written: the products never store them) and, in the same read of A, the partial sums of a
// LoRA down-projection R(s, j) = Σ_k A(s, k) F_g(j, k) (j < rank ≤ sd::RANK; F_g(j, k) = f[g fg +
// j fj + k fk]; u = x A_eᵀ forward, du = dy B_e for the input gradients) per chunk c of sd::KC k:
// part[(c total_rows + s) RANK + j]. split_down_reduce then adds the chunks in order.
// Block (chunk x, row tiles y of sd::TM rows of one group, row_tile's numbering, grid-stride):
// thread tid owns k = x KC + 4 tid .. + 3 and holds F_g(j, k .. k + 3) in registers for the tile;
// per RU = 4 rows it reads four float4 of A, writes their bf16 parts and forms its 4 x 8 products
// (four k each, in k order), which a warp-wide reduce-scatter (31 shuffles) turns into lane l's
// warp sum of output o = 2 (l % 16) + l / 16 (row o / 8 of the four, j = o % 8); the 8 warps' sums
// meet in shared memory (two buffers: one barrier per 4 rows) and warp 0 adds them in warp order.
// Every sum runs in an order fixed by the shapes: the same bits on every run and card.
namespace sd {
constexpr int TM = 32, RANK = 8, RU = 4, KC = 4 * tc::SPLIT_THREADS, WARPS = tc::SPLIT_THREADS / 32;
static_assert(RU * RANK == 32, "one output per lane after the reduce-scatter");
}  // namespace sd

// Must match `SdFactor` in mod.rs (#[repr(C)]).
struct SdFactor {
    const float* f;
    unsigned long long fj, fk, fg;
    unsigned int rank;
};

template <bool SPLIT>
__device__ __forceinline__ void split_down(unsigned int* hi, unsigned int* lo, const float* a,
                                           const unsigned int* offsets, const Params& p, unsigned int kp,
                                           const SdFactor& fac, float* part) {
    using namespace sd;
    __shared__ float red[2][WARPS][32];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const unsigned int k = blockIdx.x * KC + 4 * tid;
    const bool vec = p.a_col == 1 && (p.a_row & 3) == 0 && (p.a_group & 3) == 0 && ((size_t)a & 15) == 0;
    int buf = 0;
    for (unsigned int t = blockIdx.y, g, start, len, mt; row_tile<TM>(offsets, p, t, g, start, len, mt);
         t += gridDim.y) {
        float fr[RANK][4];
#pragma unroll
        for (int j = 0; j < RANK; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                fr[j][e] = (j < (int)fac.rank && k + e < p.k)
                               ? fac.f[(size_t)g * fac.fg + (size_t)j * fac.fj + (size_t)(k + e) * fac.fk]
                               : 0.0f;
        const float* ag = a + (size_t)g * p.a_group + (size_t)start * p.a_row;
        const unsigned int m0 = mt * TM, rows = min(len - m0, (unsigned int)TM);
        for (unsigned int r0 = 0; r0 < rows; r0 += RU) {
            float x[RU][4];
#pragma unroll
            for (int i = 0; i < RU; ++i) {
                load4(x[i], ag + (size_t)(m0 + r0 + i) * p.a_row, r0 + i < rows, vec, k, p);
            }
#pragma unroll
            for (int i = 0; i < RU; ++i)
                if (SPLIT && r0 + i < rows && k < kp) split_store4(hi, lo, (size_t)start + m0 + r0 + i, kp, k, x[i]);
            float v[32];
#pragma unroll
            for (int i = 0; i < RU; ++i)
#pragma unroll
                for (int j = 0; j < RANK; ++j) {
                    float s = x[i][0] * fr[j][0];
#pragma unroll
                    for (int e = 1; e < 4; ++e) s = fmaf(x[i][e], fr[j][e], s);
                    v[RANK * i + j] = s;
                }
            halve<16>(v, lane, 8);
            halve<8>(v, lane, 4);
            halve<4>(v, lane, 2);
            halve<2>(v, lane, 1);
            halve<1>(v, lane, 16);
            red[buf][warp][lane] = v[0];
            __syncthreads();
            if (warp == 0) {
                float s = red[buf][0][lane];
#pragma unroll
                for (int w = 1; w < WARPS; ++w) s += red[buf][w][lane];
                const int o = 2 * (lane % 16) + lane / 16, i = o / RANK, j = o % RANK;
                if (r0 + i < rows)
                    part[((size_t)blockIdx.x * p.total_rows + start + m0 + r0 + i) * RANK + j] = s;
            }
            buf ^= 1;
        }
    }
}

// 80 registers (three blocks an SM) and no spill.
extern "C" __global__ void __launch_bounds__(tc::SPLIT_THREADS, 3)
    split_a_bf16_down(unsigned int* hi, unsigned int* lo, const float* a, const unsigned int* offsets, Params p,
                      unsigned int kp, SdFactor fac, float* part) {
    split_down<true>(hi, lo, a, offsets, p, kp, fac, part);
}

// The same partial sums without the split (hi, lo and kp unused; kp sets the chunks): the LoRA
// down-projection of rows whose product does not run, the same bits as the split's.
extern "C" __global__ void __launch_bounds__(tc::SPLIT_THREADS, 3)
    lora_down_partials(const float* a, const unsigned int* offsets, Params p, unsigned int kp, SdFactor fac,
                       float* part) {
    split_down<false>(nullptr, nullptr, a, offsets, p, kp, fac, part);
}

// out[s ld + j] = alpha Σ_c part[(c rows + s) RANK + j] over the `chunks` chunks of
// split_a_bf16_down, in order, for s < rows, j < rank. Grid: (rows RANK / SPLIT_THREADS). Rows that
// no group owns get sums that no block wrote: their u is not specified (the products never store
// those rows).
extern "C" __global__ void __launch_bounds__(tc::SPLIT_THREADS)
    split_down_reduce(const float* part, float* out, unsigned long long ld, unsigned int rows, unsigned int rank,
                      unsigned int chunks, float alpha) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, s = i / sd::RANK;
    const unsigned int j = (unsigned int)(i % sd::RANK);
    if (s >= rows || j >= rank) return;
    float sum = 0.0f;
    for (unsigned int c = 0; c < chunks; ++c) sum += part[((size_t)c * rows + s) * sd::RANK + j];
    out[(size_t)s * ld + j] = alpha * sum;
}

// The MXFP4 products' epilogue terms (mod.rs: Mxfp4Epilogue; must match `Epi` there field for
// field): C(s, n) = alpha acc + beta C + bias[g N + n] + scaling Σ_{j<rank} u[s rank + j] B_g(j, n),
// s the absolute row of A (the slot), B_g(j, n) = lb[g lb_group + j lb_j + n lb_n]. A null bias
// adds nothing; rank 0 no LoRA term (the launcher passes rank ≤ EPI_RANK only).
struct Epi {
    const float* bias;
    const float* u;
    const float* lb;
    unsigned long long lb_j, lb_n, lb_group;
    unsigned int rank;
    float scaling;
};
constexpr int EPI_RANK = 16;

// Shared-memory row of one column's staged terms: bias, then B_g(j, n) for j < EPI_RANK (odd: a
// warp reading 32 consecutive columns hits distinct banks).
constexpr int EPI_LD = EPI_RANK + 1;

// Bytes of shared memory a tile of tm rows x tn columns stages its epilogue terms in.
__host__ __device__ constexpr int epi_smem_bytes(int tm, int tn) { return (tm * EPI_RANK + tn * EPI_LD) * 4; }

__device__ __forceinline__ bool epi_any(const Epi& e) { return e.bias != nullptr || e.rank != 0; }

// 4 bytes global -> shared without registers; pred false writes zero (src is not read but must be
// a valid address).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"((unsigned int)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(pred ? 4 : 0)
                 : "memory");
}

// The row stride of the staged u: 8 for ranks up to 8, else EPI_RANK (zero-padded past the rank,
// so that the sums run over a fixed count without a branch per term).
__device__ __forceinline__ int epi_u_stride(const Epi& e) { return e.rank <= 8 ? 8 : EPI_RANK; }

// Starts copying the epilogue terms of the tile at rows m0.., columns n0.. of group g (rows
// relative to the group's first row `start`) into shared memory, by all `threads` threads, with
// cp.async (no registers held, so that it costs the accumulators nothing): eu[r us + j] =
// u[start + m0 + r, j] with us = epi_u_stride (zeros past the rank and past the group),
// ec[c EPI_LD] = the bias of column n0 + c and ec[c EPI_LD + 1 + j] = B_g(j, n0 + c) (zeros past
// the rank and past N; epi_col applies the scaling). Global memory is read once per tile instead
// of once per stored element. The copies join the caller's next commit group.
template <int TM_, int TN_>
__device__ __forceinline__ void epi_stage(const Epi& e, const Params& p, float* eu, float* ec, unsigned int g,
                                          unsigned int start, unsigned int m0, unsigned int rows, unsigned int n0,
                                          int tid, int threads) {
    const int rank = (int)e.rank, us = epi_u_stride(e);
    const float* const dummy = e.bias != nullptr ? e.bias : e.lb;  // read by no copy
    if (rank > 0) {
        for (int i = tid; i < TM_ * us; i += threads) {
            const unsigned int gm = m0 + i / us;
            const int j = i % us;
            const bool ok = gm < rows && j < rank;
            cp_async4(eu + i, ok ? e.u + ((size_t)start + gm) * rank + j : e.u, ok);
        }
    }
    for (int i = tid; i < TN_ * EPI_LD; i += threads) {
        const int c = i / EPI_LD, j = i % EPI_LD - 1;
        const unsigned int n = n0 + c;
        const float* src = dummy;
        bool ok = false;
        if (n < p.n) {
            if (j < 0) {
                ok = e.bias != nullptr;
                if (ok) src = e.bias + (size_t)g * p.n + n;
            } else if (j < rank) {
                ok = true;
                src = e.lb + (size_t)g * e.lb_group + (size_t)j * e.lb_j + (size_t)n * e.lb_n;
            }
        }
        cp_async4(ec + i, src, ok);
    }
}

// One output column's staged terms, in registers: its bias and scaling B_g(j, n).
struct EpiCol {
    float bias;
    float b[EPI_RANK];
};

__device__ __forceinline__ void epi_col(const Epi& e, const float* ec, int c, EpiCol& col) {
    col.bias = ec[c * EPI_LD];
#pragma unroll
    for (int j = 0; j < EPI_RANK; ++j) col.b[j] = e.scaling * ec[c * EPI_LD + 1 + j];
}

// The epilogue terms of a column at staged row r: bias + Σ_j u[r, j] (scaling B_g(j, n)), over 8
// or 16 terms (the staged zeros past the rank add nothing), in two chains of dependent FMAs.
template <int N>
__device__ __forceinline__ float epi_dot(const EpiCol& col, const float* ur) {
    float v = col.bias, w = 0.0f;
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        const float4 q = *reinterpret_cast<const float4*>(ur + j);
        v = fmaf(q.x, col.b[j], v);
        w = fmaf(q.y, col.b[j + 1], w);
        v = fmaf(q.z, col.b[j + 2], v);
        w = fmaf(q.w, col.b[j + 3], w);
    }
    return v + w;
}

__device__ __forceinline__ float epi_value(const Epi& e, const EpiCol& col, const float* eu, int r) {
    if (e.rank == 0) return col.bias;
    return e.rank <= 8 ? epi_dot<8>(col, eu + r * 8) : epi_dot<EPI_RANK>(col, eu + r * EPI_RANK);
}

// C = alpha acc + beta C + the epilogue terms `extra`.
__device__ __forceinline__ void store_c_epi(float* cp, float acc, float extra, const Params& p) {
    *cp = c_value(cp, acc, p) + extra;
}

// The epilogue's case, uniform over a launch: EPI_NONE (a plain store), EPI_BIAS (the bias alone),
// else the count of staged LoRA terms per row (epi_u_stride: 8 or EPI_RANK).
constexpr int EPI_NONE = -1, EPI_BIAS = 0;
__device__ __forceinline__ int epi_terms(const Epi& e) {
    return !epi_any(e) ? EPI_NONE : e.rank == 0 ? EPI_BIAS : epi_u_stride(e);
}

// Stores COUNT values of one column of C: value i from s[i s_step] at cp + i c_step, row gm0 + i
// row_step of the group (stored only below `rows`, and only when col_ok), as alpha acc + beta C
// plus, by the case N: nothing (EPI_NONE), the column's bias (EPI_BIAS), or the bias and the dot of
// its N staged B terms with the row's staged u (eu + i eu_step). The values are computed for every
// row (the staged rows past the group hold zeros) and only the stores and C's reads are predicated;
// the address steps by a pointer increment instead of a 64-bit product per element.
template <int N, int COUNT, int UNROLL>
__device__ __forceinline__ void store_column(float* cp, size_t c_step, const float* s, int s_step, unsigned int gm0,
                                             int row_step, unsigned int rows, bool col_ok, const EpiCol& col,
                                             const float* eu, int eu_step, const Params& p) {
#pragma unroll(UNROLL)
    for (int i = 0; i < COUNT; ++i) {
        float v = c_value(cp, s[i * s_step], p, col_ok && gm0 + i * row_step < rows);
        if (N == EPI_BIAS) v += col.bias;
        if (N > 0) v += epi_dot<(N > 0 ? N : 8)>(col, eu + i * eu_step);
        if (col_ok && gm0 + i * row_step < rows) *cp = v;
        cp += c_step;
    }
}

// store_column with the epilogue's case chosen once (a uniform branch), not per element.
template <int COUNT, int UNROLL>
__device__ __forceinline__ void store_column_epi(int terms, float* cp, size_t c_step, const float* s, int s_step,
                                                 unsigned int gm0, int row_step, unsigned int rows, bool col_ok,
                                                 const EpiCol& col, const float* eu, int eu_step, const Params& p) {
    if (terms == EPI_NONE)
        store_column<EPI_NONE, COUNT, UNROLL>(cp, c_step, s, s_step, gm0, row_step, rows, col_ok, col, eu, 0, p);
    else if (terms == EPI_BIAS)
        store_column<EPI_BIAS, COUNT, UNROLL>(cp, c_step, s, s_step, gm0, row_step, rows, col_ok, col, eu, 0, p);
    else if (terms == 8)
        store_column<8, COUNT, UNROLL>(cp, c_step, s, s_step, gm0, row_step, rows, col_ok, col, eu, 8 * eu_step, p);
    else
        store_column<EPI_RANK, COUNT, UNROLL>(cp, c_step, s, s_step, gm0, row_step, rows, col_ok, col, eu,
                                              EPI_RANK * eu_step, p);
}

// Writes 16 rows of one 32-column slab of C from a warp's scratch ([16][ld] f32): lane l writes
// column gn (its own), rows row0 .. row0 + 15 below `rows`, adding the epilogue terms staged for
// the tile at (m0, n0) (eu, ec; not read when the epilogue adds nothing). The column's terms are
// read once per slab; the mma.sync kernels (at most 128 registers, their accumulators still live)
// read them per row instead (COL_IN_REGS false), which keeps them from spilling.
template <bool COL_IN_REGS>
__device__ __forceinline__ void write_c_slab(float* cg, const float* scratch, int ld, unsigned int row0,
                                             unsigned int gn, unsigned int rows, const Params& p, int lane,
                                             const Epi& e, const float* eu, const float* ec, unsigned int m0,
                                             unsigned int n0) {
    const bool any = epi_any(e);
    EpiCol col;
    if (COL_IN_REGS) {
        // The wgmma kernels, with registers to spare in the epilogue: the column's terms in
        // registers, the case chosen once per slab, four rows in flight together.
        if (any) epi_col(e, ec, (int)(gn - n0), col);
        const int terms = epi_terms(e), us = epi_u_stride(e);
        float* cp = cg + (size_t)row0 * p.c_row + (size_t)gn * p.c_col;
        store_column_epi<16, 4>(terms, cp, p.c_row, scratch + lane, ld, row0, 1, rows, gn < p.n, col,
                                eu + (row0 - m0) * us, 1, p);
        return;
    }
#pragma unroll 1
    for (int r = 0; r < 16; ++r) {
        const unsigned int gm = row0 + r;
        if (gm < rows && gn < p.n) {
            float extra = 0.0f;
            if (any) {
                epi_col(e, ec, (int)(gn - n0), col);
                extra = epi_value(e, col, eu, (int)(gm - m0));
            }
            store_c_epi(cg + (size_t)gm * p.c_row + (size_t)gn * p.c_col, scratch[r * ld + lane], extra, p);
        }
    }
}

// E8M0 scale byte s -> the bf16x2 multiplier 2^(s-127) in both halves: the exponent field is s
// (s = 0: the subnormal 2^-127).
__device__ __forceinline__ unsigned int e8m0_bf16x2(unsigned int s) {
    const unsigned int e = s ? s << 7 : 0x40u;
    return e | (e << 16);
}

// Four little-endian words of MXFP4 codes from q (8 codes each, low nibble first): one vector
// load when q is 16-byte aligned, bytes otherwise.
__device__ __forceinline__ uint4 load_codes16(const unsigned char* q, bool aligned) {
    if (aligned) return *reinterpret_cast<const uint4*>(q);
    unsigned int w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
        w[e] = q[4 * e] | (q[4 * e + 1] << 8) | (q[4 * e + 2] << 16) | ((unsigned int)q[4 * e + 3] << 24);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// One little-endian word of MXFP4 codes from q (4-byte aligned when `aligned`).
__device__ __forceinline__ unsigned int load_codes4(const unsigned char* q, bool aligned) {
    return aligned ? *reinterpret_cast<const unsigned int*>(q)
                   : q[0] | (q[1] << 8) | (q[2] << 16) | ((unsigned int)q[3] << 24);
}

// x · y per bf16 half. mul.bf16x2 is sm_90's; sm_80 and sm_8x take fma with -0 (x·y + -0 = x·y,
// signed zeros included).
__device__ __forceinline__ unsigned int mul_bf16x2(unsigned int x, unsigned int y) {
    unsigned int d;
#if __CUDA_ARCH__ >= 900
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(x), "r"(y));
#else
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(y), "r"(0x80008000u));
#endif
    return d;
}

// 8 E2M1 codes (nibble i = element i, low nibble first) -> 4 bf16x2 (word j from byte j), words
// 0 and 2 times the bf16x2 scale sa, words 1 and 3 times sb (decode8_bf16: one scale s2).
// The high and low bytes of the bf16 magnitudes 0 0.5 1 1.5 2 3 4 6 are two 8-entry byte tables
// that prmt indexes by the code's low 3 bits; the sign (bit 3) selects 0x80 from a third table.
__device__ __forceinline__ void decode8_bf16_rows(unsigned int q, unsigned int sa, unsigned int sb, unsigned int* out) {
    const unsigned int mag = q & 0x77777777u, neg = (q >> 1) & 0x44444444u;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const unsigned int sel = mag >> (16 * h), ssel = neg >> (16 * h);
        const unsigned int hi = __byte_perm(0x3F3F3F00u, 0x40404040u, sel) | __byte_perm(0u, 0x80808080u, ssel);
        const unsigned int lo = __byte_perm(0xC0800000u, 0xC0804000u, sel);
        out[2 * h] = mul_bf16x2(__byte_perm(lo, hi, 0x5140), sa);
        out[2 * h + 1] = mul_bf16x2(__byte_perm(lo, hi, 0x7362), sb);
    }
}

__device__ __forceinline__ uint4 decode8_bf16(unsigned int q, unsigned int s2) {
    unsigned int out[4];
    decode8_bf16_rows(q, s2, s2, out);
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

// 16 bytes global -> shared without registers; pred false fills the 16 bytes with zeros (src is
// not read but must be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(pred ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// epi_stage, then waits for the copies (no others in flight) and for the whole block, when the
// epilogue adds anything: the kernels that stage their terms after the main loop, in idle stages.
template <int TM_, int TN_>
__device__ __forceinline__ void epi_stage_now(const Epi& e, const Params& p, float* eu, float* ec, unsigned int g,
                                              unsigned int start, unsigned int m0, unsigned int rows,
                                              unsigned int n0, int tid, int threads) {
    if (!epi_any(e)) return;
    epi_stage<TM_, TN_>(e, p, eu, ec, g, start, m0, rows, n0, tid, threads);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
}

template <bool TRANSPOSED>
__device__ void mxfp4_tc_gemm(__nv_bfloat16* sm, float* c, const __nv_bfloat16* a_hi, const __nv_bfloat16* a_lo,
                              const unsigned char* blocks, const unsigned char* scales, const unsigned int* offsets,
                              const Params& p, unsigned int w_rows, unsigned int w_cols, unsigned int kp,
                              const Epi& epi) {
    using namespace tc;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const bool b_vec = ((size_t)blocks & 15) == 0;
    const unsigned int nblk = w_cols / 32;
    // A copier: 16-byte chunk a_ch of tile rows a_r + A_ROWS j. B loader: one MXFP4 block, b_y of
    // the slice's blocks of W row b_x (forward: row n0 + b_x, 2 blocks; transposed: k0 + b_x, 8).
    const int a_ch = tid % A_CHUNKS, a_r = tid / A_CHUNKS;
    // Transposed, a warp takes 4 W rows x 8 blocks (4 whole 128-byte rows of W), and each 8 lanes of
    // a 16-byte shared store 4 rows x 2 blocks: 528-byte rows and 64-byte blocks put their 8 stores
    // on distinct banks (one W row's 8 blocks, 64 bytes apart, would conflict 4 ways).
    const int b_x = TRANSPOSED ? (tid % 8) / 2 + 4 * (tid / 32) : tid / 2;
    const int b_y = TRANSPOSED ? tid % 2 + 2 * ((tid / 8) % 4) : tid % 2;
    const int b_dst = TRANSPOSED ? b_x * LDB_KN + 32 * b_y : b_x * LDB_NK + 32 * b_y;
    __nv_bfloat16* const decoded = sm + STAGES * A_STAGE;  // two decoded B tiles
    (void)a_lo;

    for (unsigned int t = first_tile(), g, start, rows, mt; row_tile<TM>(offsets, p, t, g, start, rows, mt);
         t += gridDim.y) {
        const int slices = (int)((p.k + TK - 1) / TK);
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
        const size_t w_row0 = (size_t)g * w_rows;
        for (unsigned int nt = blockIdx.x; (size_t)nt * TN < p.n; nt += gridDim.x) {
            const unsigned int m0 = mt * TM, n0 = nt * TN;
            // Slice s of A into stage st, as one commit group (empty past the last slice, so
            // that the group count stays one per slice).
            auto copy_a = [&](int s, int st) {
                if (s < slices) {
                    __nv_bfloat16* dst = sm + st * A_STAGE + a_r * LDA + 8 * a_ch;
                    const size_t k = (size_t)s * TK + 8 * a_ch;
#pragma unroll
                    for (int j = 0; j < TM / A_ROWS; ++j) {
                        const unsigned int gm = m0 + a_r + A_ROWS * j;
                        const bool ok = gm < rows;
                        const size_t src = (size_t)(start + (ok ? gm : 0u)) * kp + k;
                        cp_async16(dst + A_ROWS * j * LDA, a_hi + src, ok);
#ifndef MMA_ONE_PASS
                        cp_async16(dst + A_ELEMS + A_ROWS * j * LDA, a_lo + src, ok);
#endif
                    }
                }
                cp_async_commit();
            };
            uint4 bq;
            unsigned int bsc;
            auto load_b = [&](int s) {
                const unsigned int k0 = (unsigned int)s * TK;
                bool ok;
                size_t blk;
                if (TRANSPOSED) {
                    const unsigned int wr = k0 + b_x, wc = n0 + 32 * b_y;
                    ok = wr < w_rows && wc < w_cols;
                    blk = (w_row0 + wr) * nblk + wc / 32;
                } else {
                    const unsigned int wr = n0 + b_x, wc = k0 + 32 * b_y;
                    ok = wr < w_rows && wc < w_cols;
                    blk = (w_row0 + wr) * nblk + wc / 32;
                }
                bq = make_uint4(0u, 0u, 0u, 0u);
                bsc = 127u;
                if (ok) {
                    bsc = scales[blk];
                    bq = load_codes16(blocks + blk * 16, b_vec);
                }
            };
            auto decode_b = [&](int buf) {
                const unsigned int s2 = e8m0_bf16x2(bsc);
                __nv_bfloat16* d = decoded + buf * B_ELEMS + b_dst;
                *reinterpret_cast<uint4*>(d) = decode8_bf16(bq.x, s2);
                *reinterpret_cast<uint4*>(d + 8) = decode8_bf16(bq.y, s2);
                *reinterpret_cast<uint4*>(d + 16) = decode8_bf16(bq.z, s2);
                *reinterpret_cast<uint4*>(d + 24) = decode8_bf16(bq.w, s2);
            };

            float acc[4][4][4];  // [m16 fragment][n8 fragment][mma C register]
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
            // Prologue: A slices 0 .. STAGES - 2 in flight, B slice 0 decoded, slice 1 loading.
            // The previous tile's last barrier freed every buffer.
#pragma unroll
            for (int s = 0; s < STAGES - 1; ++s) copy_a(s, s);
            load_b(0);
            decode_b(0);
            if (slices > 1) load_b(1);
            for (int s = 0; s < slices; ++s) {
                // Groups committed: STAGES - 1 + s; at most STAGES - 2 pending: slice s landed.
                cp_async_wait<STAGES - 2>();
                // Every thread's copies of slice s and its decoded B are visible, and every warp
                // is past slice s - 1's products: its A stage and decoded tile are free.
                __syncthreads();
                copy_a(s + STAGES - 1, (s + STAGES - 1) % STAGES);
                const __nv_bfloat16* const ah_s = sm + (s % STAGES) * A_STAGE;
                const __nv_bfloat16* const bs = decoded + (s & 1) * B_ELEMS;
#pragma unroll
                for (int kk = 0; kk < TK; kk += 16) {
                    // Slice s + 1's B is decoded (and slice s + 2's loaded) once the first
                    // products are queued, so that the ALU work overlaps the tensor pipe.
                    if (kk == 16 && s + 1 < slices) {
                        decode_b((s + 1) & 1);
                        if (s + 2 < slices) load_b(s + 2);
                    }
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
                        ldsm_x4(al, ah_s + A_ELEMS + o);
#endif
                        ldsm_x4(ah, ah_s + o);
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
#ifndef MMA_ONE_PASS
                            mma_bf16_16816(acc[i][j], al, &bf[j / 2][2 * (j % 2)]);
#endif
                            mma_bf16_16816(acc[i][j], ah, &bf[j / 2][2 * (j % 2)]);
                        }
                    }
                }
            }
            // No copy in flight (the groups past the last slice are empty) and every warp past
            // its last read of the tiles: the tiles become each warp's [16][SC_LD] f32 scratch,
            // so that C is written one 32-column row per instruction.
            cp_async_wait<0>();
            __syncthreads();
            float* const scratch = reinterpret_cast<float*>(sm) + warp * 16 * SC_LD;
            // The epilogue's terms follow every warp's scratch.
            static_assert(TTHREADS / 32 * 16 * SC_LD * 4 + epi_smem_bytes(TM, TN) <= SMEM_ELEMS * 2,
                          "the scratch and the epilogue's terms fit in the tiles");
            float* const eu = reinterpret_cast<float*>(sm) + TTHREADS / 32 * 16 * SC_LD;
            float* const ec = eu + TM * EPI_RANK;
            epi_stage_now<TM, TN>(epi, p, eu, ec, g, start, m0, rows, n0, tid, TTHREADS);
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
                write_c_slab<false>(cg, scratch, SC_LD, m0 + wm * 64 + 16 * i, n0 + wn * 32 + lane, rows, p, lane,
                                    epi, eu, ec, m0, n0);
                __syncwarp();
            }
            __syncthreads();  // the next tile's first copies overwrite the scratch
        }
    }
}

// ---- MXFP4 B on Hopper's warpgroup tensor cores (sm_90a) ----
//
// The same product as grouped_gemm_bf16a_mxfp4w (same arguments, same split A, same results up to
// the order of f32 additions inside a product), with wgmma: the tensor cores read both operands
// straight from shared memory, asynchronously, so no fragments pass through registers.
// C_g tile 128x256 per block of 256 threads (two warpgroups, each 64x256 of C: 128 f32 accumulators
// a thread), K walked in slices of TK = 64. Both operands sit in shared memory K-major, as a
// matrix descriptor describes them (wg_desc): A, and B in the forward orientation, in rows of 64 k
// (128 bytes) with the 128-byte swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8)), so
// that the tensor cores' reads and the threads' 16-byte writes of 8 consecutive rows hit distinct
// banks; the transposed B as unswizzled "core matrices" (8 rows x 16 bytes) whose 8-row groups are
// 1040 bytes apart (not 1024), which puts the transposed stores of 8 lanes on distinct banks.
// - A (split_a_bf16's hi and lo rows): STAGES stages filled by cp.async, two slices ahead.
// - B: each thread loads the MXFP4 bytes of slice s + 2 into registers while slice s is multiplied
//   and decodes slice s + 1's into one of three decoded tiles. Forward (B(k, n) = W[n, k]): thread
//   t decodes W row n0 + t's two blocks, 8 k per 16-byte store. Transposed (B(k, n) = W[k, n]):
//   thread (kg, nq) decodes 8 n of W rows 8 kg..8 kg + 7 (8 k per row) and transposes the 8x8 in
//   registers (one byte permute per output word) into 8 rows of 8 k.
// Per slice: one barrier, issue slice s's products (lo·B then hi·B per k16, or hi·B with
// MMA_ONE_PASS), wait until slice s - 1's products are done, decode slice s + 1's B into the tile
// that slice s - 2 used (the barrier proved every warpgroup done with it), wait for slice s + 1's
// A copies, make this thread's shared writes visible to the tensor cores (fence.proxy.async), and
// only then start slice s + 2's A copies and MXFP4 loads: the fence waits for all of this thread's
// memory accesses in flight, so placed before the barrier it would wait for those too.

namespace wg {
constexpr int TM = 128, TN = 256, TK = 64, WG_THREADS = 256, STAGES = 4, BBUF = 3;
#ifdef MMA_ONE_PASS
constexpr int A_TILES = 1;
#else
constexpr int A_TILES = 2;
#endif
constexpr int ROW = TK * 2;                      // bytes of a 64-k row: one 128-byte swizzle row
constexpr int SW_SBO = 8 * ROW;                  // 128B-swizzled tiles: bytes between 8-row groups
constexpr int A_TILE = TM * ROW;                 // bytes of one A tile (hi or lo)
constexpr int A_STAGE = A_TILES * A_TILE;
constexpr int BT_SBO = TK / 8 * 128 + 16;        // transposed B (no swizzle): padded, see above
constexpr int B_TILE = 33 * 1024;                // a decoded B tile either way, 1024-byte aligned
static_assert(TN * ROW <= B_TILE && TN / 8 * BT_SBO <= B_TILE, "both B layouts fit");
constexpr int B_OFF = STAGES * A_STAGE;          // the decoded tiles follow the A stages
constexpr int SMEM = B_OFF + BBUF * B_TILE;      // mod.rs (wg_smem_bytes) computes the same bytes
static_assert(SMEM == STAGES * A_TILES * 16384 + 3 * 33792, "wg_smem_bytes in mod.rs");
static_assert(A_TILE % 1024 == 0 && B_OFF % 1024 == 0, "swizzle atoms (8 rows x 128 bytes) 1024-byte aligned");
static_assert(SMEM <= 232448, "the H100's shared memory per block");
constexpr int SC_LD = 40;
static_assert(WG_THREADS / 32 * 16 * SC_LD * 4 <= STAGES * A_STAGE, "the epilogue scratch fits in the A stages");
static_assert(TM * TK / 8 % WG_THREADS == 0 && TN == WG_THREADS && TK == 64, "A chunks, B rows and blocks per thread");
}  // namespace wg

// Matrix descriptor of a K-major bf16 operand in shared memory at byte address addr: with
// swizzle128, rows of 128 bytes whose 16-byte chunks are permuted (chunk c of row r at c ^ (r % 8))
// in 1024-byte atoms of 8 rows (SBO 1024; the k16 step moves the start by 32 bytes inside the row);
// without, core matrices of 8 rows x 16 bytes, LBO = 128 bytes between them along K, SBO between
// 8-row groups.
__device__ __forceinline__ unsigned long long wg_desc(unsigned int addr, unsigned int sbo, bool swizzle128) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(128 >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (swizzle128 ? 1ull << 62 : 0ull);
}

// The output operands of a wgmma over d[i..i + 31] (f32 accumulators, read and written).
#define WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_D32(i) WG_D8(i), WG_D8(i + 8), WG_D8(i + 16), WG_D8(i + 24)

// d (64 x 256 of the warpgroup, f32) += A · B, both bf16 in shared memory as K-major core matrices
// (descriptors da, db): one asynchronous warpgroup product m64n256k16.
__device__ __forceinline__ void wgmma_m64n256k16(float* d, unsigned long long da, unsigned long long db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, 0, 0;"
        : WG_D32(0), WG_D32(32), WG_D32(64), WG_D32(96)
        : "l"(da), "l"(db));
}

// d (64 x N of the warpgroup, f32; N/2 accumulators a thread) += A · B with A (64 x 16 bf16) in
// registers as the mma.sync m16n8k16 A fragment per warp (warp w: rows 16 w..; a[0] (row g,
// k 2t..2t+1), a[1] (row g + 8, k 2t..), a[2] (row g, k 2t + 8..), a[3] (row g + 8, k 2t + 8..),
// g = lane / 4, t = lane % 4) and B K-major in shared memory (descriptor db), N = 64 .. 256.
template <int N>
__device__ __forceinline__ void wgmma_rs(float* d, const unsigned int* a, unsigned long long db);

template <>
__device__ __forceinline__ void wgmma_rs<64>(float* d, const unsigned int* a, unsigned long long db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 0;"
        : WG_D32(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

template <>
__device__ __forceinline__ void wgmma_rs<128>(float* d, const unsigned int* a, unsigned long long db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;"
        : WG_D32(0), WG_D32(32)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

template <>
__device__ __forceinline__ void wgmma_rs<192>(float* d, const unsigned int* a, unsigned long long db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, {%96, %97, %98, %99}, %100, 1, 1, 1, 0;"
        : WG_D32(0), WG_D32(32), WG_D32(64)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

template <>
__device__ __forceinline__ void wgmma_rs<256>(float* d, const unsigned int* a, unsigned long long db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, 1, 1, 1, 0;"
        : WG_D32(0), WG_D32(32), WG_D32(64), WG_D32(96)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// This thread's generic-proxy shared memory writes (stores, completed cp.async) become visible to
// the tensor cores' async proxy (before the barrier that publishes them).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Slice s (wg::TK = 64 k) of split_a_bf16's rows m0 .. m0 + TM_ of a group starting at row `start` into
// the stage at `stage`: rows of 128 bytes with the 128-byte swizzle (16-byte chunk c of row r at
// c ^ (r % 8)), the hi tile and, unless MMA_ONE_PASS, the lo tile A_TILE_ bytes after it; thread
// tid copies chunk tid % 8 of rows tid / 8 + (NT / 8) j by cp.async, rows past the group's `rows`
// as zeros. One commit group per call, empty past the last slice.
template <int TM_, int NT, int A_TILE_>
__device__ __forceinline__ void copy_a_slice(unsigned char* stage, const __nv_bfloat16* a_hi,
                                             const __nv_bfloat16* a_lo, int s, int slices, unsigned int start,
                                             unsigned int m0, unsigned int rows, unsigned int kp, int tid) {
    static_assert(TM_ * 8 % NT == 0, "whole rows of chunks per pass");
    if (s < slices) {
        const int ch = tid % 8;
        const size_t k = (size_t)s * wg::TK + 8 * ch;
#pragma unroll
        for (int j = 0; j < TM_ * 8 / NT; ++j) {
            const int r = tid / 8 + NT / 8 * j;
            const unsigned int gm = m0 + r;
            const bool ok = gm < rows;
            const size_t src = (size_t)(start + (ok ? gm : 0u)) * kp + k;
            unsigned char* dst = stage + r * wg::ROW + ((ch ^ (r % 8)) * 16);
            cp_async16(dst, a_hi + src, ok);
#ifndef MMA_ONE_PASS
            cp_async16(dst + A_TILE_, a_lo + src, ok);
#else
            (void)a_lo;
#endif
        }
    }
    cp_async_commit();
}

template <bool TRANSPOSED>
__device__ void mxfp4_wg_gemm(unsigned char* sm, float* c, const __nv_bfloat16* a_hi, const __nv_bfloat16* a_lo,
                              const unsigned char* blocks, const unsigned char* scales, const unsigned int* offsets,
                              const Params& p, unsigned int w_rows, unsigned int w_cols, unsigned int kp,
                              const Epi& epi) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace wg;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wgi = tid / 128;
    const bool b_vec = ((size_t)blocks & 15) == 0;
    const unsigned int nblk = w_cols / 32;
    const unsigned int sbase = smem_addr(sm);
    if (sbase % 1024 != 0) __trap();  // the swizzled tiles assume 1024-byte aligned shared memory
    // Transposed decoder: k group kg (W rows 8 kg..+7 of the slice), n group nq (8 n).
    const int kg = tid / 32, nq = tid % 32;
    (void)a_lo;

    for (unsigned int t = first_tile(), g, start, rows, mt; row_tile<TM>(offsets, p, t, g, start, rows, mt);
         t += gridDim.y) {
        const int slices = (int)((p.k + TK - 1) / TK);
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
        const size_t w_row0 = (size_t)g * w_rows;
        for (unsigned int nt = blockIdx.x; (size_t)nt * TN < p.n; nt += gridDim.x) {
            const unsigned int m0 = mt * TM, n0 = nt * TN;
            // Slice s of A into stage st: 16-byte chunk tid % 8 (k 8 (tid % 8)..) of rows
            // tid / 8 + 32 j; one commit group per call (empty past the last slice).
            auto copy_a = [&](int s, int st) {
                copy_a_slice<TM, WG_THREADS, A_TILE>(sm + st * A_STAGE, a_hi, a_lo, s, slices, start, m0, rows, kp,
                                                     tid);
            };
            // MXFP4 bytes of slice s in registers: forward, W row n0 + tid's two blocks (q[0..3],
            // q[4..7], scales sc[0], sc[1]); transposed, 4 bytes (8 n) of 8 W rows (q[r], sc[r]).
            unsigned int q[8], sc[8];
            auto load_b = [&](int s) {
                const unsigned int k0 = (unsigned int)s * TK;
                if (TRANSPOSED) {
                    const unsigned int wc = n0 + 8 * nq;
#pragma unroll
                    for (int r = 0; r < 8; ++r) {
                        const unsigned int wr = k0 + 8 * kg + r;
                        q[r] = 0u;
                        sc[r] = 127u;
                        if (wr < w_rows && wc < w_cols) {
                            const size_t row = (w_row0 + wr) * nblk;
                            sc[r] = scales[row + wc / 32];
                            q[r] = load_codes4(blocks + row * 16 + wc / 2, b_vec);
                        }
                    }
                } else {
                    const unsigned int wr = n0 + tid;
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const unsigned int wc = k0 + 32 * h;
                        q[4 * h] = q[4 * h + 1] = q[4 * h + 2] = q[4 * h + 3] = 0u;
                        sc[h] = 127u;
                        if (wr < w_rows && wc < w_cols) {
                            const size_t blk = (w_row0 + wr) * nblk + wc / 32;
                            sc[h] = scales[blk];
                            const uint4 v = load_codes16(blocks + blk * 16, b_vec);
                            q[4 * h] = v.x, q[4 * h + 1] = v.y, q[4 * h + 2] = v.z, q[4 * h + 3] = v.w;
                        }
                    }
                }
            };
            auto decode_b = [&](int buf) {
                unsigned char* tile = sm + B_OFF + buf * B_TILE;
                if (TRANSPOSED) {
                    uint4 d[8];  // d[r]: n pairs (0,1) (2,3) (4,5) (6,7) of W row 8 kg + r
#pragma unroll
                    for (int r = 0; r < 8; ++r) d[r] = decode8_bf16(q[r], e8m0_bf16x2(sc[r]));
                    unsigned char* dst = tile + nq * BT_SBO + kg * 128;
#pragma unroll
                    for (int n = 0; n < 8; ++n) {
                        // Row n of the core matrix: k pairs (2j, 2j + 1) = element n of rows 2j, 2j + 1.
                        const unsigned int sel = n % 2 ? 0x7632u : 0x5410u;
                        auto word = [&](const uint4& v) {
                            const int w = n / 2;
                            return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
                        };
                        *reinterpret_cast<uint4*>(dst + n * 16) =
                            make_uint4(__byte_perm(word(d[0]), word(d[1]), sel), __byte_perm(word(d[2]), word(d[3]), sel),
                                       __byte_perm(word(d[4]), word(d[5]), sel), __byte_perm(word(d[6]), word(d[7]), sel));
                    }
                } else {
                    // Row n = tid, swizzled: k group c at chunk c ^ (n % 8).
                    unsigned char* dst = tile + tid * ROW;
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const unsigned int s2 = e8m0_bf16x2(sc[h]);
#pragma unroll
                        for (int j = 0; j < 4; ++j)
                            *reinterpret_cast<uint4*>(dst + (((4 * h + j) ^ (tid % 8)) * 16)) =
                                decode8_bf16(q[4 * h + j], s2);
                    }
                }
            };

            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
            // Prologue: A slice 0 landed and slice 1 in flight, B slice 0 decoded, slice 1 in
            // registers, all fenced. The previous tile's last barrier freed every buffer.
            copy_a(0, 0);
            copy_a(1, 1);
            load_b(0);
            decode_b(0);
            cp_async_wait<1>();
            fence_proxy_async();
            if (slices > 1) load_b(1);
            for (int s = 0; s < slices; ++s) {
                // Slice s's A and decoded B are visible to every warpgroup's tensor cores, and
                // every warpgroup has finished slice s - 2's products.
                __syncthreads();
                wgmma_fence();
                const unsigned int a_addr = sbase + (s % STAGES) * A_STAGE + wgi * 64 * ROW;
                const unsigned int b_addr = sbase + B_OFF + (s % BBUF) * B_TILE;
#pragma unroll
                for (int kk = 0; kk < TK / 16; ++kk) {
                    const unsigned long long db = TRANSPOSED ? wg_desc(b_addr + kk * 256, BT_SBO, false)
                                                             : wg_desc(b_addr + kk * 32, SW_SBO, true);
#ifndef MMA_ONE_PASS
                    wgmma_m64n256k16(acc, wg_desc(a_addr + A_TILE + kk * 32, SW_SBO, true), db);
#endif
                    wgmma_m64n256k16(acc, wg_desc(a_addr + kk * 32, SW_SBO, true), db);
                }
                wgmma_commit();
                // This warpgroup's slice s - 1 products are done (slice s's run on).
                wgmma_wait<1>();
                if (s + 1 < slices) decode_b((s + 1) % BBUF);
                // Slice s + 1's A landed (the one group in flight) and, with the decoded B, is
                // made visible to the tensor cores. The proxy fence waits for every memory
                // access of this thread in flight, so it comes before the next copies and loads
                // are issued (after them it would wait for those too).
                cp_async_wait<0>();
                fence_proxy_async();
                copy_a(s + 2, (s + 2) % STAGES);
                if (s + 2 < slices) load_b(s + 2);
            }
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(acc[i])::"memory");
            // No copy in flight (the groups past the last slice are empty) and every warpgroup
            // done with the tiles: the A stages become each warp's [16][SC_LD] f32 scratch.
            cp_async_wait<0>();
            __syncthreads();
            float* const scratch = reinterpret_cast<float*>(sm) + warp * 16 * SC_LD;
            // The epilogue's terms follow every warp's scratch.
            static_assert(WG_THREADS / 32 * 16 * SC_LD * 4 + epi_smem_bytes(TM, TN) <= SMEM,
                          "the scratch and the epilogue's terms fit in the stages");
            float* const eu = reinterpret_cast<float*>(sm) + WG_THREADS / 32 * 16 * SC_LD;
            float* const ec = eu + TM * EPI_RANK;
            epi_stage_now<TM, TN>(epi, p, eu, ec, g, start, m0, rows, n0, tid, WG_THREADS);
            const int gr = lane / 4, tq = lane % 4;
            const unsigned int row0 = m0 + 64 * wgi + 16 * (warp % 4);
#pragma unroll
            for (int cc = 0; cc < TN / 32; ++cc) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float* d = acc + 4 * (4 * cc + j);
                    *reinterpret_cast<float2*>(scratch + gr * SC_LD + 8 * j + 2 * tq) = make_float2(d[0], d[1]);
                    *reinterpret_cast<float2*>(scratch + (gr + 8) * SC_LD + 8 * j + 2 * tq) = make_float2(d[2], d[3]);
                }
                __syncwarp();
                write_c_slab<true>(cg, scratch, SC_LD, row0, n0 + 32 * cc + lane, rows, p, lane, epi, eu, ec, m0, n0);
                __syncwarp();
            }
            __syncthreads();  // the next tile's first copies overwrite the scratch
        }
    }
#else
    __trap();  // built for another architecture: mod.rs launches these on sm_90a only
#endif
}

#define MXFP4W_WG_KERNEL(name, transposed)                                                                \
    extern "C" __global__ void __launch_bounds__(wg::WG_THREADS, 1)                                         \
        name(float* c, const __nv_bfloat16* a_hi, const __nv_bfloat16* a_lo, const unsigned char* blocks, \
             const unsigned char* scales, const unsigned int* offsets, Params p, unsigned int w_rows,     \
             unsigned int w_cols, unsigned int kp, Epi epi) {                                               \
        extern __shared__ __align__(128) unsigned char wg_smem[];                                        \
        mxfp4_wg_gemm<transposed>(wg_smem, c, a_hi, a_lo, blocks, scales, offsets, p, w_rows, w_cols, kp, epi); \
    }

MXFP4W_WG_KERNEL(grouped_gemm_bf16a_mxfp4w_wg, false)
MXFP4W_WG_KERNEL(grouped_gemm_bf16a_mxfp4w_wg_transposed, true)

// ---- Forward MXFP4 product with the weight in registers (sm_90a) ----
//
// grouped_gemm_bf16a_mxfp4w_rs: the forward orientation (B(k, n) = W[n, k]) of the product above,
// computed transposed, C_gᵀ = W_g · A_gᵀ, so that the MXFP4 weight is wgmma's register operand:
// each thread decodes exactly the 16 weight values of its A fragment per k16 step straight into
// registers (no decoded tile in shared memory, no stores, no barrier for it), and the activation
// tile (split_a_bf16's rows, K-major with the 128-byte swizzle, as the B operand) is the only
// thing in shared memory. Tile: 128 weight rows (C columns) x 256 activation rows (C rows) per
// block of two warpgroups, each 64 weight rows x 256 rows: each decoded value meets 256 rows (the
// one-block kernel: 128), so the decode per product halves.
// - A (activations): STAGES_RS = 3 stages filled by cp.async, two slices ahead.
// - W: thread (warp w of warpgroup wg, lane g t) owns W rows n0 + 64 wg + 16 w + g and + 8; per
//   64-k slice it loads both rows' two 16-byte MXFP4 blocks and scales into registers after the
//   slice's barrier (the proxy fence before it would wait for loads in flight), and decodes them
//   while the slice's products run: k16 step kk needs byte t and t + 4 of half kk % 2 of block
//   kk / 2 of each row (two nibbles each), gathered by byte permutes into one word whose four bytes
//   decode to the fragment's four bf16 pairs, each times its row's block scale. The fragments of
//   consecutive slices alternate between two register sets, so slice s + 1's decode never
//   overwrites registers that slice s's products still read.
// - Per slice: wait for slice s's copies, fence, one barrier (it also proves every warpgroup done
//   with slice s - 1, whose stage the next copies refill), load slice s + 1's MXFP4 bytes, issue
//   slice s's products (lo then hi with Mma::Split), start slice s + 2's copies, decode slice
//   s + 1, wait for slice s's products.
// - Epilogue: lane (g, t) holds C rows (tokens) 8 j + 2 t, +1 of C columns g and g + 8 of its
//   warp's 16; 32 rows at a time go through a per-warp scratch in the idle stages, from which each
//   store instruction writes two rows of 16 consecutive columns, adding the epilogue terms (bias,
//   LoRA up-projection: Epi), which were copied with slice 0 into a region of their own past the
//   stages.
namespace rs {
// The k slice, the swizzled 128-byte rows and the hi/lo parts are wgmma's (namespace wg).
using wg::A_TILES, wg::ROW, wg::SW_SBO, wg::TK;
constexpr int TM = 256, TN = 128, THREADS_RS = 256, STAGES_RS = 3;
constexpr int A_TILE = TM * ROW;  // 32 KiB
constexpr int A_STAGE = A_TILES * A_TILE;
constexpr int SMEM = STAGES_RS * A_STAGE;
// The stages and then the tile's epilogue terms: mod.rs (rs_smem_bytes) computes the same bytes.
constexpr int SMEM_EPI = SMEM + epi_smem_bytes(TM, TN);
static_assert(SMEM_EPI == STAGES_RS * A_TILES * 32768 + 25088 && SMEM_EPI <= 232448, "rs_smem_bytes in mod.rs");
static_assert(TM * TK / 8 % THREADS_RS == 0 && TN == 2 * 64 && TK == 64, "A chunks; two 64-row warpgroups");
constexpr int RS_LD = 17;  // epilogue scratch row (f32)
static_assert(THREADS_RS / 32 * 32 * RS_LD * 4 <= A_TILE, "the epilogue scratch fits in a stage");
}  // namespace rs

// One slice's products of the register-operand kernel, N activation rows wide: per k16 step the
// fragment f[kk] times the lo (Mma::Split) and then the hi tile of the stage at a_addr.
// (KK0, KK: the k16 steps KK0 .. KK0 + KK - 1 alone.)
template <int N, int KK0 = 0, int KK = rs::TK / 16>
__device__ __forceinline__ void rs_issue(float* acc, const unsigned int (&f)[4][4], unsigned int a_addr) {
#pragma unroll
    for (int kk = KK0; kk < KK0 + KK; ++kk) {
#ifndef MMA_ONE_PASS
        wgmma_rs<N>(acc, f[kk], wg_desc(a_addr + rs::A_TILE + kk * 32, rs::SW_SBO, true));
#endif
        wgmma_rs<N>(acc, f[kk], wg_desc(a_addr + kk * 32, rs::SW_SBO, true));
    }
}

// The fragment word of k16 step kk (block kk / 2, half kk % 2) from rows g (x) and g + 8 (y): bytes
// (x byte t of word 2 h, y's, x byte t of word 2 h + 1, y's); sel = t | (t + 4) << 4.
__device__ __forceinline__ unsigned int rs_gather(const uint4& x, const uint4& y, int h, unsigned int sel) {
    const unsigned int u = __byte_perm(h ? x.z : x.x, h ? y.z : y.x, sel);
    const unsigned int v = __byte_perm(h ? x.w : x.y, h ? y.w : y.y, sel);
    return __byte_perm(u, v, 0x5410);
}

// The register-operand kernels' epilogue: acc[4 j + 2 hf + e] = C(row m0 + 8 j + 2 tq + e, column
// n0 + wr_lo + 8 hf) goes through a per-warp [32][RS_LD] f32 scratch `scr`, 32 rows at a time, so
// that the stores' addresses are computed in a loop, not held for all 256 rows; each store
// instruction writes two rows of 16 columns, adding the epilogue terms (bias, LoRA up-projection:
// Epi) staged at eu / ec (landed before the call). The columns are consecutive; with T (the
// transposed warp-specialized kernel) fragment row g + 8 hf of warp w (of 4) in warpgroup wg is
// column 64 wg + 32 (w / 2) + 4 g + 2 (w % 2) + hf (see ws_t_words).
template <bool T = false>
__device__ __forceinline__ void rs_epilogue(float (&acc)[128], float* scr, float* cg, const Params& p, const Epi& epi,
                                            const float* eu, const float* ec, unsigned int m0, unsigned int n0,
                                            unsigned int rows, int warp, int lane) {
    using namespace rs;
    const int gq = lane / 4, tq = lane % 4;
    const int w4 = warp % 4, l16 = lane % 16;
    // Every store of this lane is in column gn (scratch column lane % 16); a chunk's column terms
    // are read after its accumulators went to the scratch, when their registers are free.
    const unsigned int gn =
        n0 + 64 * (warp / 4) + (T ? 32 * (w4 / 2) + 4 * (l16 % 8) + 2 * (w4 % 2) + l16 / 8 : 16 * w4 + l16);
    EpiCol ecol;
    const bool any = epi_any(epi);
    const int terms = epi_terms(epi), us = epi_u_stride(epi);
#pragma unroll
    for (int cc = 0; cc < TM / 32; ++cc) {
        if (m0 + 32 * cc >= rows) break;  // rows past the group (never multiplied)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    scr[(8 * jj + 2 * tq + e) * RS_LD + 8 * hf + gq] = acc[4 * (4 * cc + jj) + 2 * hf + e];
        __syncwarp();
        if (any) epi_col(epi, ec, (int)(gn - n0), ecol);
        // Lane l stores column gn of rows row0 + l / 16 + 2 i, i < 16.
        const unsigned int row0 = m0 + 32 * cc + lane / 16;
        store_column_epi<16, 4>(terms, cg + (size_t)row0 * p.c_row + (size_t)gn * p.c_col, 2 * p.c_row,
                                scr + (lane / 16) * RS_LD + lane % 16, 2 * RS_LD, row0, 2, rows, gn < p.n, ecol,
                                eu + (row0 - m0) * us, 2, p);
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(rs::THREADS_RS, 1)
    grouped_gemm_bf16a_mxfp4w_rs(float* c, const __nv_bfloat16* a_hi, const __nv_bfloat16* a_lo,
                                 const unsigned char* blocks, const unsigned char* scales, const unsigned int* offsets,
                                 Params p, unsigned int w_rows, unsigned int w_cols, unsigned int kp, Epi epi) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace rs;
    extern __shared__ __align__(1024) unsigned char rs_smem[];
    unsigned char* const sm = rs_smem;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wgi = tid / 128;
    const int gq = lane / 4, tq = lane % 4;
    const unsigned int sel = (unsigned int)tq | ((unsigned int)(tq + 4) << 4);
    const bool b_vec = ((size_t)blocks & 15) == 0;
    const unsigned int nblk = w_cols / 32;
    const unsigned int sbase = smem_addr(sm);
    if (sbase % 1024 != 0) __trap();
    (void)a_lo;
    // This thread's two W rows within the tile.
    const int wr_lo = 64 * wgi + 16 * (warp % 4) + gq;
    // The epilogue's terms, past the stages (SMEM_EPI).
    float* const eu = reinterpret_cast<float*>(sm + SMEM);
    float* const ec = eu + TM * EPI_RANK;
    const bool any = epi_any(epi);

    for (unsigned int t = first_tile(), g, start, rows, mt; row_tile<TM>(offsets, p, t, g, start, rows, mt);
         t += gridDim.y) {
        const int slices = (int)((p.k + TK - 1) / TK);
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
        const size_t w_row0 = (size_t)g * w_rows;
        for (unsigned int nt = blockIdx.x; (size_t)nt * TN < p.n; nt += gridDim.x) {
            const unsigned int m0 = mt * TM, n0 = nt * TN;
            // The tile's rows in 64-row steps (1..4): the products' width.
            const int width64 = (int)min((rows - m0 + 63) / 64, 4u);
            auto copy_a = [&](int s, int st) {
                copy_a_slice<TM, THREADS_RS, A_TILE>(sm + st * A_STAGE, a_hi, a_lo, s, slices, start, m0, rows, kp,
                                                     tid);
            };
            // MXFP4 blocks 2 s, 2 s + 1 of rows wr_lo (x) and wr_lo + 8 (y), and their scales.
            uint4 x[2], y[2];
            unsigned int sx[2], sy[2];
            auto load_w = [&](int s) {
#pragma unroll
                for (int b = 0; b < 2; ++b) {
                    const unsigned int wc = (unsigned int)s * TK + 32 * b;
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const unsigned int wr = n0 + wr_lo + 8 * e;
                        uint4 v = make_uint4(0u, 0u, 0u, 0u);
                        unsigned int sc = 127u;
                        if (wr < w_rows && wc < w_cols) {
                            const size_t blk = (w_row0 + wr) * nblk + wc / 32;
                            sc = scales[blk];
                            v = load_codes16(blocks + blk * 16, b_vec);
                        }
                        if (e == 0) {
                            x[b] = v;
                            sx[b] = sc;
                        } else {
                            y[b] = v;
                            sy[b] = sc;
                        }
                    }
                }
            };
            // The slice's four k16 fragments (4 words each) from the registers load_w filled.
            auto decode_w = [&](unsigned int (&f)[4][4]) {
#pragma unroll
                for (int b = 0; b < 2; ++b) {
                    const unsigned int s2x = e8m0_bf16x2(sx[b]), s2y = e8m0_bf16x2(sy[b]);
#pragma unroll
                    for (int h = 0; h < 2; ++h) decode8_bf16_rows(rs_gather(x[b], y[b], h, sel), s2x, s2y, f[2 * b + h]);
                }
            };

            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
            unsigned int fa[4][4], fb[4][4];
            // One slice: f holds slice s's fragments, fn receives slice s + 1's.
            auto step = [&](int s, unsigned int (&f)[4][4], unsigned int (&fn)[4][4]) {
                // Groups committed: 2 + s; at most one pending: slice s landed.
                cp_async_wait<1>();
                fence_proxy_async();
                // Slice s's A is visible to every warpgroup's tensor cores; every warpgroup is
                // done with slice s - 1 (it waited for its products), whose stage is refilled.
                __syncthreads();
                if (s + 1 < slices) load_w(s + 1);
                wgmma_fence();
                const unsigned int a_addr = sbase + (s % STAGES_RS) * A_STAGE;
                // Only as many activation rows as the tile holds, in steps of 64 (a group's
                // last tile is often short): one of four instruction widths, uniform per tile.
                if (width64 == 4) {
                    rs_issue<256>(acc, f, a_addr);
                } else if (width64 == 3) {
                    rs_issue<192>(acc, f, a_addr);
                } else if (width64 == 2) {
                    rs_issue<128>(acc, f, a_addr);
                } else {
                    rs_issue<64>(acc, f, a_addr);
                }
                wgmma_commit();
                copy_a(s + 2, (s + 2) % STAGES_RS);
                if (s + 1 < slices) decode_w(fn);
                wgmma_wait<0>();
            };
            // The tile's epilogue terms, in slice 0's commit group: they land long before the
            // epilogue, in a region of their own past the stages.
            if (any) epi_stage<TM, TN>(epi, p, eu, ec, g, start, m0, rows, n0, tid, THREADS_RS);
            copy_a(0, 0);
            copy_a(1, 1);
            load_w(0);
            decode_w(fa);
            for (int s = 0; s < slices; s += 2) {
                step(s, fa, fb);
                if (s + 1 < slices) step(s + 1, fb, fa);
            }
#pragma unroll
            for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(acc[i])::"memory");
            cp_async_wait<0>();
            __syncthreads();  // every warpgroup done with the stages
            rs_epilogue(acc, reinterpret_cast<float*>(sm) + warp * 32 * RS_LD, cg, p, epi, eu, ec, m0, n0, rows, warp,
                        lane);
            __syncthreads();  // the next tile's first copies overwrite the scratch
        }
    }
#else
    __trap();  // built for another architecture: mod.rs launches it on sm_90a only
#endif
}

// ---- MXFP4 products, warp-specialized (sm_90a) ----
//
// grouped_gemm_bf16a_mxfp4w_ws: _rs's product and tile (C_gᵀ = W_g · A_gᵀ, 128 weight rows x 256
// activation rows per block, the decoded weight as wgmma's register operand, the same epilogue),
// with the copies taken off the consumers' path (the transposed kernel, below, shares all of it):
// - A producer warpgroup copies each slice's activation tiles (hi and lo, or hi alone) and the
//   raw MXFP4 bytes of the block's 128 weight rows into shared memory by TMA (one thread issues;
//   tensor maps from the launcher: the activations with the 128-byte swizzle that the descriptors
//   read, the codes as 32-byte rows), and the rows' block scales (their rows are not 16-byte
//   aligned, so not TMA's): each thread loads one row's two scales four slices ahead into
//   registers and stores them next to the codes. Each stage has a `full` mbarrier (the issuing
//   thread's arrival with the bytes to expect, and for a weight stage every producer thread's after
//   its scales, then the TMA's bytes complete it) and an `empty` one (one arrival per consumer
//   warp when done with it); the producer runs as far ahead as the stages allow, into the next
//   tile too. Rows past a group's end or past W's rows load their neighbours' values (the
//   tensor's end reads zeros): in the forward kernel the C rows and columns they feed are never
//   stored; in the transposed one W's rows are K, and the next expert's rows past the last slice's
//   end do feed stored values, as finite codes (E2M1 has no inf or NaN) times the scale 1 that the
//   producer writes past W's rows, times A's zeros past K (split_a_bf16's padding): exactly 0.
// - Two consumer warpgroups, no block-wide barrier per slice: wait for slice s's stage, issue its
//   products (lo then hi with Mma::Split) in two commit groups (k16 steps 0-1, 2-3), then decode
//   slice s + 1's weight fragments from shared memory into the register set slice s - 1 used, each
//   half as soon as slice s - 1's group that read it is done (after the second, slice s - 1's stage
//   goes back to the producer). The tensor cores get slice s + 1's products while slice s's still
//   run. (One group per slice, the decode after all of slice s - 1: bf16 gate_up 0.704 ms against
//   0.588; four groups: the step slower than two.)
// - The epilogue goes through the stage of the tile's last slice, which the consumers give back
//   only after it (the producer fills the other stages with the next tile meanwhile).
// grouped_gemm_bf16a_mxfp4w_ws_transposed: the input gradients C = A · W_g (B(k, n) = W[k, n], k
// over the weight's rows, n over its columns) the same way, as Cᵀ = W_gᵀ · Aᵀ with W_gᵀ the
// register operand: 128 weight columns (C columns) x 256 activation rows per block, the same A
// stages, products and epilogue. Per slice the producer copies the codes of the slice's 64 weight
// rows x the tile's 128 columns (64-byte rows, TMA's 64-byte swizzle: 16-byte chunk c of row r at
// c ^ (r / 2 % 4), so that 8 consecutive rows' chunks fall in distinct banks) and writes their
// block scales as bf16 ([4 blocks][64 rows]). A fragment's k pairs are now two weight rows and its
// two rows two columns: ldmatrix.trans, the codes read as 16-bit units of 4 columns, gives lane
// (g, t) exactly rows 2t, 2t + 1 (and + 8) of unit g, and ws_t_words keeps the lane's 2 columns,
// decodes, pairs them by column and multiplies by the two rows' scales. Warp w (of 4) of warpgroup
// wg takes byte w % 2 of the units of block 2 wg + w / 2: fragment row g + 8 hf is column
// 64 wg + 32 (w / 2) + 4 g + 2 (w % 2) + hf, which the epilogue (rs_epilogue<true>) maps back.
// The launcher runs them only when their tensor maps can describe the operands (16-byte aligned
// codes), K > 0, their tile numbers, weight rows and an expert's scale bytes fit 32 bits, and the
// build gives a thread the 168 entry registers their setmaxnreg counts assume; the other cases
// take _rs and _wg_transposed.
namespace ws {
using rs::A_STAGE, rs::A_TILE, rs::RS_LD, rs::TM, rs::TN, wg::A_TILES, wg::SW_SBO, wg::TK;
// A producer warpgroup (setmaxnreg works on whole warpgroups) and two consumers.
constexpr int CONSUMERS = 256, THREADS_WS = CONSUMERS + 128;
// Registers per thread after setmaxnreg. The block starts with 168 a thread (65,536 / 384 rounded
// down to 8: ptxas's allocation under these launch bounds) and setmaxnreg moves registers only
// within the block: the producer warpgroup gives (168 - 40) x 128 back, exactly what the consumers
// take, (232 - 168) x 256 (asking more would wait forever). At 24 the transposed producer spilled
// (142 spill instructions in its SASS); 40 / 232 measured +2% a step (PERFORMANCE.md v15).
constexpr int CONSUMER_REGS = 232, PRODUCER_REGS = 40;
static_assert((168 - PRODUCER_REGS) * (THREADS_WS - CONSUMERS) == (CONSUMER_REGS - 168) * CONSUMERS,
              "setmaxnreg moves registers within the block");
#ifdef MMA_ONE_PASS
constexpr int STAGES = 5, W_STAGES = 4;
#else
constexpr int STAGES = 3, W_STAGES = 2;
#endif
constexpr int W_ROW = 2 * 16;                  // a row's two MXFP4 blocks of a slice
// 4 KiB of codes (forward: 128 weight rows x 32 bytes; transposed: 64 weight rows x 64 bytes, 128
// columns), then the scales: forward each row's two bytes, transposed bf16 [4 blocks][64 rows].
constexpr int W_CODES = TN * W_ROW;
constexpr int W_SCALES = TN / 32 * TK * 2;
constexpr int W_TILE = W_CODES + W_SCALES;
static_assert(W_CODES == TK * TN / 2 && W_SCALES >= TN * 2, "both orientations fill the same stage");
static_assert(W_TILE % 512 == 0, "TMA destinations, the 64-byte swizzle's 512-byte pattern");
constexpr int W_OFF = STAGES * A_STAGE;        // after the A stages (1024-byte aligned)
constexpr int EPI_OFF = W_OFF + W_STAGES * W_TILE;
constexpr int BAR_OFF = EPI_OFF + epi_smem_bytes(TM, TN);
constexpr int SMEM = BAR_OFF + 8 * 2 * (STAGES + W_STAGES);
// mod.rs (ws_smem_bytes) computes the same bytes.
static_assert(SMEM == STAGES * A_TILES * 32768 + W_STAGES * 4608 + 25088 + 16 * (STAGES + W_STAGES),
              "ws_smem_bytes in mod.rs");
static_assert(SMEM <= 232448, "the H100's shared memory per block");
static_assert(CONSUMERS / 32 * 32 * RS_LD * 4 <= A_TILE, "the epilogue scratch fits in a stage");
static_assert(BAR_OFF % 8 == 0, "mbarriers are 8-byte aligned");
}  // namespace ws

// A CUtensorMap (the driver's opaque 128-byte TMA descriptor), passed by value as a
// __grid_constant__ kernel parameter.
struct __align__(64) TmaMap {
    unsigned long long v[16];
};

__device__ __forceinline__ void mbar_init(unsigned int bar, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// Arrives if `pred`: a predicated instruction, not a branch (a divergent branch while products are
// in flight makes ptxas serialize them).
__device__ __forceinline__ void mbar_arrive(unsigned int bar, bool pred = true) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t.reg .b64 st;\n\tsetp.ne.u32 p, %1, 0;\n\t@p mbarrier.arrive.shared::cta.b64 st, [%0];\n\t}" ::"r"(
            bar),
        "r"((unsigned int)pred)
        : "memory");
}
// Arrives and expects `bytes` more of asynchronous copies before the phase completes.
__device__ __forceinline__ void mbar_expect_tx(unsigned int bar, unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase of parity `parity` has completed (a fresh barrier counts parity 1 as done).
__device__ __forceinline__ void mbar_wait(unsigned int bar, unsigned int parity) {
    asm volatile(
        "{\n\t.reg .pred P1;\n"
        "LAB_WAIT:\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n\t"
        "@P1 bra DONE;\n\t"
        "bra LAB_WAIT;\n"
        "DONE:\n\t}" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// The box of `map` at (inner c0, outer c1) into shared memory at dst; its bytes complete bar.
__device__ __forceinline__ void tma_load_2d(unsigned int dst, const TmaMap& map, int c0, int c1, unsigned int bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            dst),
        "l"(reinterpret_cast<unsigned long long>(&map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
// The consumers' view of the activation stages: shared addresses of the stages and of their
// mbarriers, the tile's slice count, the lane.
struct WsRing {
    unsigned int sbase, a_full, a_empty;
    int slices, lane;
};

// A tile's products, N activation rows wide, in the consumer warpgroups of the warp-specialized
// kernels: fa holds slice 0's fragments; per slice, wait for its stage, issue its products in two
// groups (k16 steps 0-1, 2-3), and decode slice s + 1 into the register set that slice s - 1 used,
// each half (decode(f, h): steps 2 h, 2 h + 1) as soon as slice s - 1's group that read those
// registers is done; slice s - 1's stage goes back to the producer once both its groups are (before
// the second half is decoded). a_it: the stages' position.
template <int N, class Decode>
__device__ __forceinline__ void ws_slices(float (&acc)[128], unsigned int (&fa)[4][4], unsigned int (&fb)[4][4],
                                          Decode& decode, unsigned int& a_it, const WsRing& r) {
    constexpr int STAGES = ws::STAGES;
    auto step = [&](int s, unsigned int (&f)[4][4], unsigned int (&fn)[4][4]) {
        const unsigned int ai = a_it % STAGES;
        mbar_wait(r.a_full + 8 * ai, (a_it / STAGES) & 1);
        ++a_it;
        wgmma_fence();
        rs_issue<N, 0, 2>(acc, f, r.sbase + ai * ws::A_STAGE);
        wgmma_commit();
        rs_issue<N, 2, 2>(acc, f, r.sbase + ai * ws::A_STAGE);
        wgmma_commit();
        wgmma_wait<3>();
        if (s + 1 < r.slices) decode(fn, 0);
        wgmma_wait<2>();
        mbar_arrive(r.a_empty + 8 * ((ai + STAGES - 1) % STAGES), s > 0 && r.lane == 0);
        if (s + 1 < r.slices) decode(fn, 1);
    };
    for (int s = 0; s < r.slices; s += 2) {
        step(s, fa, fb);
        if (s + 1 < r.slices) step(s + 1, fb, fa);
    }
    wgmma_wait<0>();
}

// Named barrier 1 over the consumer warps (barrier 0 is __syncthreads).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(ws::CONSUMERS) : "memory"); }

// Two fragment words of the transposed kernel from an ldmatrix.trans word rw of codes (weight row
// r's 4 columns in bits 0-15, row r + 1's in bits 16-31): byte `bsel` of each half (selector 0x20:
// columns c, c + 1; 0x31: c + 2, c + 3) decodes, as decode8_bf16_rows, to (c, c + 1) of row r and
// of row r + 1, which byte permutes pair by column (the fragment's k pairs are weight rows r, r + 1)
// and a multiply by the two rows' bf16 scales p2 finishes: x = column c, y = column c + 1.
__device__ __forceinline__ void ws_t_words(unsigned int rw, unsigned int bsel, unsigned int p2, unsigned int& x,
                                           unsigned int& y) {
    const unsigned int q = __byte_perm(rw, 0u, bsel);  // nibbles: c and c + 1 of row r, then of r + 1
    const unsigned int mag = q & 0x7777u, neg = (q >> 1) & 0x4444u;
    const unsigned int hi = __byte_perm(0x3F3F3F00u, 0x40404040u, mag) | __byte_perm(0u, 0x80808080u, neg);
    const unsigned int lo = __byte_perm(0xC0800000u, 0xC0804000u, mag);
    const unsigned int r0 = __byte_perm(lo, hi, 0x5140), r1 = __byte_perm(lo, hi, 0x7362);
    x = mul_bf16x2(__byte_perm(r0, r1, 0x5410), p2);
    y = mul_bf16x2(__byte_perm(r0, r1, 0x7632), p2);
}

// E8M0 scale byte s -> the bf16 bits of 2^(s - 127) (s = 0: the subnormal 2^-127).
__device__ __forceinline__ unsigned short e8m0_bf16(unsigned int s) { return (unsigned short)(s ? s << 7 : 0x40u); }

// The warp-specialized kernels (T: the transposed orientation), see above the namespace ws.
template <bool T>
__device__ __forceinline__ void ws_gemm(float* c, const unsigned char* scales, const unsigned int* offsets,
                                        const Params& p, unsigned int w_rows, unsigned int w_cols, const Epi& epi,
                                        const TmaMap& tm_hi, const TmaMap& tm_lo, const TmaMap& tm_w) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace ws;
    extern __shared__ __align__(1024) unsigned char ws_smem[];
    unsigned char* const sm = ws_smem;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const unsigned int sbase = smem_addr(sm);
    if (sbase % 1024 != 0) __trap();
    const unsigned int bars = sbase + BAR_OFF;
    // a_full[i], a_empty[i] (i < STAGES), then w_full[i], w_empty[i] (i < W_STAGES).
    const unsigned int a_full = bars, a_empty = bars + 8 * STAGES, w_full = bars + 16 * STAGES,
                       w_empty = w_full + 8 * W_STAGES;
    if (tid == 0) {
        for (int i = 0; i < STAGES; ++i) {
            mbar_init(a_full + 8 * i, 1);
            mbar_init(a_empty + 8 * i, CONSUMERS / 32);
        }
        for (int i = 0; i < W_STAGES; ++i) {
            mbar_init(w_full + 8 * i, THREADS_WS - CONSUMERS);
            mbar_init(w_empty + 8 * i, CONSUMERS / 32);
        }
        // The initialized barriers are visible to the TMA unit's completions (as CUTLASS's
        // fence_barrier_init), not only to this block's threads after the barrier below.
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int slices = (int)((p.k + TK - 1) / TK);
    // Tiles u = blockIdx.x, + gridDim.x, ...: row tile u / n_tiles (row_tile's numbering), C column
    // tile u % n_tiles (weight rows forward, weight columns transposed). The launcher sizes the grid
    // to the SMs (one block each): the producer fills the next tile's stages while the consumers
    // store the last one.
    const unsigned int n_tiles = (p.n + TN - 1) / TN;

    if (warp >= CONSUMERS / 32) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
        // The producer warpgroup: thread pt owns two block scales of each slice (forward: of weight
        // row pt of the tile; transposed: of row pt % 64 of the slice), read four slices ahead:
        // registers sc0..sc3, the loop unrolled by four so that no register with a load in flight
        // is moved; thread 0 also issues the TMA copies. Both rings' positions run on across tiles.
        const int pt = tid - CONSUMERS;
        const unsigned int nblk = w_cols / 32;
        // Every row's scales start 2-byte aligned and hold whole pairs (gpt-oss: 90 a row).
        const bool pairs = nblk % 2 == 0 && ((size_t)scales & 1) == 0;
        unsigned int a_it = 0, w_it = 0;
        for (unsigned int u = blockIdx.x, g, start, rows, mt;
             row_tile<TM>(offsets, p, u / n_tiles, g, start, rows, mt); u += gridDim.x) {
            const unsigned int nt = u % n_tiles;
            const int a_row = (int)(start + mt * TM);
            // Forward: weight row wr = nt TN + pt, its two blocks of slice s (2 s, 2 s + 1).
            // Transposed: weight row s TK + pt % 64 of slice s, its blocks b0, b0 + 1 of the
            // tile's four (b0 = 4 nt + 2 (pt / 64)).
            const unsigned int wr = T ? pt % 64 : nt * TN + pt, b0 = T ? 4 * nt + 2 * (pt / 64) : 0;
            const unsigned char* q = T ? scales + (size_t)g * w_rows * nblk + b0
                                       : scales + ((size_t)g * w_rows + min(wr, w_rows - 1)) * nblk;
            // Slice s's two scales (127, a scale of 1, past W): one 16-bit load where they are
            // 2-byte aligned (then nothing waits for it before the store four slices later).
            auto load = [&](int s) {
                const unsigned int row = T ? (unsigned int)s * TK + wr : wr, b = T ? row * nblk : 2u * (unsigned int)s;
                const bool ok = s < slices && row < w_rows && (!T || b0 < nblk);
                const bool ok1 = ok && (T ? b0 + 1 : 2u * (unsigned int)s + 1) < nblk;
                if (pairs) return ok ? (unsigned int)*reinterpret_cast<const unsigned short*>(q + b) : 0x7F7Fu;
                return (ok ? (unsigned int)q[b] : 127u) | (ok1 ? (unsigned int)q[b + 1] : 127u) << 8;
            };
            auto step = [&](int s, unsigned int& sc) {
                const unsigned int wi = w_it % W_STAGES, ai = a_it % STAGES;
                ++w_it;
                ++a_it;
                mbar_wait(w_empty + 8 * wi, (((w_it - 1) / W_STAGES) & 1) ^ 1);
                unsigned short* const scs = reinterpret_cast<unsigned short*>(sm + W_OFF + wi * W_TILE + W_CODES);
                if (T) {
                    // bf16 scales, [block][row]: a consumer reads rows r, r + 1 as one word.
                    scs[(2 * (pt / 64)) * TK + wr] = e8m0_bf16(sc & 255u);
                    scs[(2 * (pt / 64) + 1) * TK + wr] = e8m0_bf16(sc >> 8);
                } else {
                    scs[pt] = (unsigned short)sc;
                }
                if (pt == 0) {
                    mbar_expect_tx(w_full + 8 * wi, W_CODES);
                    // Forward: 128 rows of a slice's 32 bytes; transposed: 64 rows (the slice) of
                    // the tile's 64 bytes (128 columns), with the 64-byte swizzle.
                    const int c0 = T ? (int)(nt * (TN / 2)) : s * (TK / 2);
                    const int c1 = (int)(g * w_rows) + (T ? s * TK : (int)(nt * TN));
                    tma_load_2d(sbase + W_OFF + wi * W_TILE, tm_w, c0, c1, w_full + 8 * wi);
                } else {
                    mbar_arrive(w_full + 8 * wi);
                }
                sc = load(s + 4);
                if (pt == 0) {
                    mbar_wait(a_empty + 8 * ai, (((a_it - 1) / STAGES) & 1) ^ 1);
                    mbar_expect_tx(a_full + 8 * ai, A_STAGE);
                    tma_load_2d(sbase + ai * A_STAGE, tm_hi, s * TK, a_row, a_full + 8 * ai);
#ifndef MMA_ONE_PASS
                    tma_load_2d(sbase + ai * A_STAGE + A_TILE, tm_lo, s * TK, a_row, a_full + 8 * ai);
#else
                    (void)tm_lo;
#endif
                }
            };
            unsigned int sc0 = load(0), sc1 = load(1), sc2 = load(2), sc3 = load(3);
            for (int s = 0; s < slices; s += 4) {
                step(s, sc0);
                if (s + 1 < slices) step(s + 1, sc1);
                if (s + 2 < slices) step(s + 2, sc2);
                if (s + 3 < slices) step(s + 3, sc3);
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
    const int wgi = warp / 4, gq = lane / 4, tq = lane % 4;
    const unsigned int sel = (unsigned int)tq | ((unsigned int)(tq + 4) << 4);
    // This thread's two W rows within the tile: wr_lo and wr_lo + 8.
    const int wr_lo = 64 * wgi + 16 * (warp % 4) + gq;
    float* const eu = reinterpret_cast<float*>(sm + EPI_OFF);
    float* const ec = eu + TM * EPI_RANK;
    const bool any = epi_any(epi);
    unsigned int a_it = 0, w_it = 0;

    for (unsigned int u = blockIdx.x, g, start, rows, mt; row_tile<TM>(offsets, p, u / n_tiles, g, start, rows, mt);
         u += gridDim.x) {
        float* cg = c + (size_t)g * p.c_group + (size_t)start * p.c_row;
        const unsigned int nt = u % n_tiles;
        const unsigned int m0 = mt * TM, n0 = nt * TN;
        const int width64 = (int)min((rows - m0 + 63) / 64, 4u);
        // Half h (k16 steps 2 h, 2 h + 1) of the next slice's fragments from the next weight stage
        // (the producer's slice order), which goes back to the producer once both are read.
        auto decode_w = [&](unsigned int (&f)[4][4], int h) {
            const unsigned int wi = (w_it - h) % W_STAGES;
            if (h == 0) {
                mbar_wait(w_full + 8 * wi, (w_it / W_STAGES) & 1);
                ++w_it;
            }
            const unsigned char* wt = sm + W_OFF + wi * W_TILE;
            if (T) {
                // This warp's 16 columns are half of the 32 (one block, 16 bytes a weight row) of
                // chunk ch: byte w4 % 2 of each 16-bit unit. ldmatrix.trans over the chunk's rows
                // 32 h + lane: matrix i holds k16 step 2 h + i / 2, rows 8 (i % 2) + 2 tq, + 1, unit
                // gq (the codes' 16-byte chunks swizzled by TMA: chunk c of row r at c ^ (r / 2 % 4)).
                const int w4 = warp % 4, ch = 2 * wgi + w4 / 2;
                const unsigned int bsel = w4 % 2 ? 0x3131u : 0x2020u;
                const unsigned int* scl = reinterpret_cast<const unsigned int*>(wt + W_CODES + ch * TK * 2);
                {
                    const int row = 32 * h + lane;
                    unsigned int r[4];
                    ldsm_x4_trans(r, wt + row * (TN / 2) + ((ch ^ ((row >> 1) & 3)) << 4));
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int kk = 2 * h + i / 2, hr = i % 2;
                        ws_t_words(r[i], bsel, scl[8 * kk + 4 * hr + tq], f[kk][2 * hr], f[kk][2 * hr + 1]);
                    }
                }
            } else {
                const unsigned short* scs = reinterpret_cast<const unsigned short*>(wt + W_CODES);
                const unsigned int sx = scs[wr_lo], sy = scs[wr_lo + 8];
                {
                    // Block b = h of rows wr_lo (x) and wr_lo + 8 (y).
                    const int b = h;
                    const uint4 x = *reinterpret_cast<const uint4*>(wt + wr_lo * W_ROW + 16 * b);
                    const uint4 y = *reinterpret_cast<const uint4*>(wt + (wr_lo + 8) * W_ROW + 16 * b);
                    const unsigned int s2x = e8m0_bf16x2((sx >> 8 * b) & 255u),
                                       s2y = e8m0_bf16x2((sy >> 8 * b) & 255u);
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh)
                        decode8_bf16_rows(rs_gather(x, y, hh, sel), s2x, s2y, f[2 * b + hh]);
                }
            }
            if (h == 1) {
                __syncwarp();
                mbar_arrive(w_empty + 8 * wi, lane == 0);
            }
        };

        if (any) epi_stage<TM, TN>(epi, p, eu, ec, g, start, m0, rows, n0, tid, CONSUMERS);
        cp_async_commit();
        float acc[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
        unsigned int fa[4][4], fb[4][4];
        decode_w(fa, 0);
        decode_w(fa, 1);
        // Only as many activation rows as the tile holds, in steps of 64 (a group's last tile
        // is often short): one loop per width, so that no branch on it comes between products
        // in flight (ptxas would serialize them).
        const WsRing ring{sbase, a_full, a_empty, slices, lane};
        if (width64 == 4) {
            ws_slices<256>(acc, fa, fb, decode_w, a_it, ring);
        } else if (width64 == 3) {
            ws_slices<192>(acc, fa, fb, decode_w, a_it, ring);
        } else if (width64 == 2) {
            ws_slices<128>(acc, fa, fb, decode_w, a_it, ring);
        } else {
            ws_slices<64>(acc, fa, fb, decode_w, a_it, ring);
        }
#pragma unroll
        for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(acc[i])::"memory");
        // The last slice's stage is the epilogue's scratch: every consumer warp is done with
        // its products (and the epilogue terms have landed) after this barrier.
        const unsigned int last = (a_it + STAGES - 1) % STAGES;
        cp_async_wait<0>();
        consumers_sync();
        rs_epilogue<T>(acc, reinterpret_cast<float*>(sm + last * A_STAGE) + warp * 32 * RS_LD, cg, p, epi, eu, ec,
                       m0, n0, rows, warp, lane);
        // The scratch's writes come before the TMA's refill of the stage.
        fence_proxy_async();
        __syncwarp();
        mbar_arrive(a_empty + 8 * last, lane == 0);
        consumers_sync();  // the next tile's epilogue terms overwrite eu and ec
    }
#else
    __trap();  // built for another architecture: mod.rs launches it on sm_90a only
#endif
}

// The entry points: C = A · W_gᵀ (forward) and C = A · W_g (transposed, the input gradients).
#define MXFP4W_WS_KERNEL(name, transposed)                                                                 \
    extern "C" __global__ void __launch_bounds__(ws::THREADS_WS, 1)                                          \
        name(float* c, const unsigned char* scales, const unsigned int* offsets, Params p, unsigned int w_rows, \
             unsigned int w_cols, Epi epi, const __grid_constant__ TmaMap tm_hi,                                \
             const __grid_constant__ TmaMap tm_lo, const __grid_constant__ TmaMap tm_w) {                       \
        ws_gemm<transposed>(c, scales, offsets, p, w_rows, w_cols, epi, tm_hi, tm_lo, tm_w);                    \
    }

MXFP4W_WS_KERNEL(grouped_gemm_bf16a_mxfp4w_ws, false)
MXFP4W_WS_KERNEL(grouped_gemm_bf16a_mxfp4w_ws_transposed, true)

// Two entry points, one per orientation: inlined into one kernel, both would share its register
// allocation and spill. a_hi / a_lo: split_a_bf16's output ([total_rows, kp] bf16; a_lo unused with
// MMA_ONE_PASS).
#define MXFP4W_KERNEL(name, transposed)                                                                   \
    extern "C" __global__ void __launch_bounds__(tc::TTHREADS, 1)                                        \
        name(float* c, const __nv_bfloat16* a_hi, const __nv_bfloat16* a_lo, const unsigned char* blocks, \
             const unsigned char* scales, const unsigned int* offsets, Params p, unsigned int w_rows,     \
             unsigned int w_cols, unsigned int kp, Epi epi) {                                               \
        extern __shared__ __align__(128) unsigned char tc_smem[];                                        \
        mxfp4_tc_gemm<transposed>(reinterpret_cast<__nv_bfloat16*>(tc_smem), c, a_hi, a_lo, blocks, scales, \
                                  offsets, p, w_rows, w_cols, kp, epi);                                     \
    }

MXFP4W_KERNEL(grouped_gemm_bf16a_mxfp4w, false)
MXFP4W_KERNEL(grouped_gemm_bf16a_mxfp4w_transposed, true)
