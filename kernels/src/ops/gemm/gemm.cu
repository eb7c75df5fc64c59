// Grouped, arbitrarily strided f32 GEMM (see mod.rs for the definition), with B either an f32
// strided operand or an MXFP4 expert weight decoded tile by tile into shared memory.
//
// SIMT f32 FMA: a block of 256 threads owns a 64x64 tile of C_g and walks K in slices of 32; each
// thread accumulates 4x4 outputs at rows ty + 16 i and columns tx + 16 j, so its shared-memory
// reads are broadcasts (A) or 16 consecutive words (B), both free of bank conflicts. Tiles are
// stored k-major with one word of padding, so the loaders may walk either dimension fastest
// (whichever has the smaller global stride, to coalesce) without bank conflicts.
//
// Grid: x = n tiles, y = m tiles (at most 65535), z = groups (at most 65535); every level loops
// grid-stride, and a Grouped::M block loops over the row tiles of its own group's length, so the
// result never depends on the grid size. Offsets are clamped to total_rows, so a bad offsets
// array cannot make the kernel read or write outside the bounds the launcher checked.

#define BM 64
#define BN 64
#define BK 32
#define THREADS 256
#define LDS (BM + 1)

static_assert(BM == BN, "one padded row length serves both tiles");
static_assert(THREADS == 256 && BM == 64 && BN == 64 && BK == 32,
              "the 16x16 thread grid, the 4x4 micro-tiles and the MXFP4 loaders assume these sizes");

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

// FP4 E2M1 code -> float, built from its bits: 0 0.5 1 1.5 2 3 4 6 and their negatives.
__device__ __forceinline__ float e2m1(unsigned int code) {
    const unsigned int e = (code >> 1) & 3u, m = code & 1u;
    const unsigned int bits = e ? (((e + 126u) << 23) | (m << 22)) : (m ? 0x3F000000u : 0u);
    return __uint_as_float(bits | ((code & 8u) << 28));
}

// E8M0 scale byte -> 2^(s - 127) exactly (s = 0 is the subnormal 2^-127).
__device__ __forceinline__ float e8m0(unsigned int s) {
    return __uint_as_float(s ? (s << 23) : 0x00400000u);
}

// Decodes the 4 bytes at p (8 consecutive elements) times the scale into v.
__device__ __forceinline__ void decode8(const unsigned char* p, float scale, float* v) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const unsigned int byte = p[e];
        v[2 * e] = e2m1(byte & 15u) * scale;
        v[2 * e + 1] = e2m1(byte >> 4) * scale;
    }
}

// B from expert weights W_e [rows, cols] in MXFP4 (blocks [E, rows, cols/32, 16], scales
// [E, rows, cols/32]); group g uses expert g. !transposed: B(k, n) = W_g[n, k] (K = cols, N = rows);
// transposed: B(k, n) = W_g[k, n] (K = rows, N = cols). Each thread decodes 4 bytes = 8 elements.
struct Mxfp4B {
    const unsigned char* blocks;
    const unsigned char* scales;
    unsigned int rows, cols;
    unsigned int transposed;

    __device__ void operator()(float (*Bs)[LDS], unsigned int g, unsigned int k0, unsigned int n0,
                               unsigned int depth, unsigned int kbase) const {
        (void)depth;
        (void)kbase;  // Grouped::M only: kbase is 0 and depth is K
        const unsigned int nblk = cols / 32;
        const size_t expert_row0 = (size_t)g * rows;
        const int t = threadIdx.x;
        float v[8];
        if (!transposed) {
            // 64 W rows (n) x one 32-element block (k0 is a multiple of 32 and K = cols, so whole).
            const int nn = t / 4, q = t % 4;
            const unsigned int gn = n0 + nn;
            if (gn < rows) {
                const size_t blk = (expert_row0 + gn) * nblk + k0 / 32;
                decode8(blocks + blk * 16 + q * 4, e8m0(scales[blk]), v);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) Bs[q * 8 + e][nn] = v[e];
        } else {
            // 32 W rows (k) x two 32-element blocks (n0 is a multiple of 64; cols of 32).
            const int kk = t / 8, nb = (t % 8) / 4, q = t % 4;
            const unsigned int gk = k0 + kk, gn = n0 + nb * 32;
            if (gk < rows && gn < cols) {
                const size_t blk = (expert_row0 + gk) * nblk + gn / 32;
                decode8(blocks + blk * 16 + q * 4, e8m0(scales[blk]), v);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) Bs[kk][nb * 32 + q * 8 + e] = v[e];
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

extern "C" __global__ void __launch_bounds__(THREADS)
    grouped_gemm_f32_mxfp4w(float* c, const float* a, const unsigned char* blocks, const unsigned char* scales,
                            const unsigned int* offsets, Params p, unsigned int w_rows, unsigned int w_cols,
                            unsigned int transposed) {
    const Mxfp4B load_b{blocks, scales, w_rows, w_cols, transposed};
    grouped_gemm(a, c, offsets, p, load_b);
}
