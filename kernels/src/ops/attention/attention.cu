// Attention with per-head sinks over per-query visible key ranges, forward and backward, f32 in
// and out (see mod.rs for the math and the layouts). Flash style: O(T) memory, online softmax,
// the log-sum-exp kept for the backward, no [T, T] buffer.
//
// Products run on the bf16 tensor cores (mma.sync m16n8k16, f32 accumulation) with every f32
// operand split as hi = bf16(x), lo = bf16(x - hi) and a·b ≈ hi·hi + hi·lo + lo·hi: the dropped
// lo·lo and the rounding of lo are ~2^-17 of |a|·|b|, close to f32 rounding. Compiled with
// MMA_ONE_PASS defined (mod.rs: SRC_ONE_PASS, Mma::Bf16) only hi·hi is taken: operands rounded to
// bf16 once, as a bf16 PyTorch model computes, for a third of the tensor-core work.
//
// The streamed operands (Q, K, V, and dO in the backward) are split once per call by
// attention_split_f32 into scratch [FA_PARTS][heads][rows + FA_TILE][DP] bf16 (hi, then lo unless
// MMA_ONE_PASS): head-major, head dims padded with zeros to DP (16, 32, 64 or 128), FA_TILE zero
// rows after the last, so a tile of FA_TILE rows starting at any valid row is FA_TILE·DP
// contiguous elements inside its head. The tiled kernels (attention_{fwd,bwd_dq,bwd_dkdv}_f32_d<DP>)
// copy such tiles into shared memory with 16-byte cp.async (row stride DP + 8: ldmatrix reads
// eight rows without bank conflicts) and take every fragment with ldmatrix: A operands and
// B = X^T operands straight, B = X operands (P·V, dS·K, P^T·dO, dS^T·Q) with .trans, so one
// row-major tile serves both and nothing is transposed or converted inside a block.
//
// Each block runs FA_WARPS warps on a tile of FA_TILE rows (queries of one head, or keys of one KV
// head for a run of its query heads); each warp owns 16 rows, whose own operand tile (Q, dO or K, V) also stays in shared
// memory and is re-read per product rather than held in registers. The other side (keys, or the
// queries of the run's heads) streams through shared memory in tiles of FA_TILE, and only tiles
// that some row of the block can see are visited (a sliding layer touches ~3 key tiles per query
// tile). The forward and dq kernels overlap the copy of one streamed tile with the products on
// the other (K while P·V / dP runs, V while Q·K^T / dS·K runs); dkdv copies Q and dO together and
// relies on the other resident blocks to hide the copy. The backward kernels walk the streamed
// tile in chunks of FA_CH·8 columns (a chunk's scores, then at once their products), so only a
// chunk of scores is live next to the accumulators; FA_MINF / FA_MINB cap the d64 kernels'
// registers so that 3–4 blocks (12–16 warps) fit an SM. Softmax exponentials are exp2f of
// scores pre-multiplied by scale·log2(e) (the running max in log2 units); lse is still the
// natural-log log-sum-exp.
//
// Fragment layouts are the PTX ISA's for m16n8k16 (g = lane / 4, t = lane % 4): a lane holds rows
// g and g + 8 of its warp's 16 rows and, of each 8 columns, the pair 2t, 2t + 1; a score tile's
// accumulators are therefore also the A operand of the next product without a trip through
// shared memory. Rows of a streamed tile past the visible range hold other rows' data or the
// zero padding, and meet only probabilities that are exactly 0.
// Visible ranges are clamped to the buffers, so bad ranges give wrong numbers, never bad reads.
// No atomics to global memory: every output element has one owner (deterministic).
//
// attention_delta_f32 and attention_dsinks_f32 are one warp per item / one block per head.

#include <cuda_bf16.h>

#define ATT_WARPS 8
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no <cmath> INFINITY
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

#define FA_WARPS 4
#define FA_TILE (16 * FA_WARPS)  // rows per block = rows per streamed tile
#define FA_NB (FA_TILE / 8)      // 8-column blocks of a score tile
#define FA_CH 2                  // 8-column blocks per chunk in the backward kernels
#ifdef MMA_ONE_PASS
#define FA_PARTS 1  // bf16 hi only
#else
#define FA_PARTS 2  // bf16 hi and lo
#endif
// Blocks per SM the d64 kernels are compiled for (a register cap of 65536 / (128 · n)): 4 (16
// warps, 128 registers) where shared memory allows it; the exact backward kernels hold 4 tile
// pairs (74 KB), so 3 blocks fit and they get 168 registers. Other widths are left uncapped.
#define FA_MINF 4
#ifdef MMA_ONE_PASS
#define FA_MINB 4
#else
#define FA_MINB 3
#endif

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

// (x, y) as packed bf16 hi and lo pairs (x in the low half).
__device__ __forceinline__ void split2(float x, float y, unsigned int& hi, unsigned int& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x - __low2float(h), y - __high2float(h));
    hi = *reinterpret_cast<const unsigned int*>(&h);
    lo = *reinterpret_cast<const unsigned int*>(&l);
}

// Column i of one head of x rotated by the rotary embedding (half-split layout: i pairs with
// i ± d/2) with cs = that row's [d/2][2] cos and sin (rope.cu's rope_table_f32), each product and
// sum rounded on its own (no FMA), as rope_apply_table computes it on the CPU.
__device__ __forceinline__ float roped(const float* head, const float* cs, unsigned int i, unsigned int half) {
    if (i < half) return __fsub_rn(__fmul_rn(head[i], cs[2 * i]), __fmul_rn(head[i + half], cs[2 * i + 1]));
    const unsigned int j = i - half;
    return __fadd_rn(__fmul_rn(head[i], cs[2 * j]), __fmul_rn(head[j], cs[2 * j + 1]));
}

// The rotation's transpose of the pair (a, b) = (column c, column c + d/2) of a gradient with
// respect to rotated rows, with that column's cos co and sin si (rope_f32's inverse), each product
// and sum rounded on its own, as rope_apply_table computes it with `inverse`.
__device__ __forceinline__ void unrope(float a, float b, float co, float si, float& x, float& y) {
    x = __fadd_rn(__fmul_rn(a, co), __fmul_rn(b, si));
    y = __fsub_rn(__fmul_rn(b, co), __fmul_rn(a, si));
}

// Splits x [rows, heads·d] (row-major, f32) into dst [FA_PARTS][heads][rows + FA_TILE][dp] bf16
// (the lo part, if any, n = heads·(rows + FA_TILE)·dp elements after the hi part). Columns >= d
// and rows >= rows are zeros. With cs (not null: [rows][d/2][2], q and k, whose rows are tokens)
// each head is rotated first (roped). One thread per pair of columns (d and dp are even).
extern "C" __global__ void attention_split_f32(unsigned int* __restrict__ dst, const float* __restrict__ x,
                                               const float* __restrict__ cs, unsigned int rows,
                                               unsigned int heads, unsigned int d, unsigned int dp) {
    const size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t per_row = dp / 2, prow = (size_t)rows + FA_TILE, pairs = (size_t)heads * prow * per_row;
    if (p >= pairs) return;
    const unsigned int c = 2 * (unsigned int)(p % per_row);
    const size_t r = (p / per_row) % prow, h = p / per_row / prow;
    float a = 0.0f, b = 0.0f;
    if (r < rows && c < d) {
        const float* head = x + r * heads * d + h * d;
        if (cs != nullptr) {
            const float* row_cs = cs + r * d;  // d/2 pairs of (cos, sin)
            a = roped(head, row_cs, c, d / 2);
            b = roped(head, row_cs, c + 1, d / 2);
        } else {
            a = head[c];
            b = head[c + 1];
        }
    }
    unsigned int hi, lo;
    split2(a, b, hi, lo);
    dst[p] = hi;
#ifndef MMA_ONE_PASS
    dst[pairs + p] = lo;
#endif
}

// c += a · b for one m16n8k16 bf16 product.
__device__ __forceinline__ void mma(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}

// Four 8 x 8 bf16 matrices from shared memory: lanes 8i .. 8i + 7 give the row addresses of
// matrix i, and r[i] is its fragment (lane: row lane / 4, columns 2 (lane % 4) and + 1; with
// .trans, of the transposed matrix).
__device__ __forceinline__ void ldsm(unsigned int* r, unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldsm_t(unsigned int* r, unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// The shared address of p as a value the compiler cannot see through: the fixed offsets added
// to it stay next to each ldmatrix (folded into its immediate) instead of being hoisted out of
// the loops as dozens of live registers.
__device__ __forceinline__ unsigned int opaque_addr(const bf16* p) {
    unsigned int a = smem_addr(p);
    asm volatile("mov.b32 %0, %0;\n" : "+r"(a));
    return a;
}

__device__ __forceinline__ void cp16(bf16* dst, const bf16* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits for this thread's copies (all groups committed so far); a __syncthreads() must follow
// before other threads' copies are read.
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Lane offsets into a row-major tile of row stride ld for ldmatrix.x4: `a_lane` gives the
// fragments a0..a3 of a 16 x 16 A block at the tile's top left (matrices: rows 0-7 | 8-15 by
// columns 0-7 | 8-15), and with .trans the fragments b0, b1 of two 8-column blocks of a
// 16 (k) x 16 (n) B block stored [k][n] (r = {b0, b1 of columns 0-7, b0, b1 of columns 8-15});
// `b_lane` the same four of a B block stored [n][k] (B = X^T), read straight.
__device__ __forceinline__ int a_lane(int ld) {
    const int l = threadIdx.x & 31;
    return ((l & 7) + 8 * ((l >> 3) & 1)) * ld + 8 * (l >> 4);
}

__device__ __forceinline__ int b_lane(int ld) {
    const int l = threadIdx.x & 31;
    return ((l & 7) + 8 * (l >> 4)) * ld + 8 * ((l >> 3) & 1);
}

// The A fragments (hi, lo) of columns 16kk .. 16kk + 16 of a 16-row accumulator tile s[.][4].
__device__ __forceinline__ void acc_to_a(const float (*s)[4], int kk, unsigned int* ah, unsigned int* al) {
    split2(s[2 * kk][0], s[2 * kk][1], ah[0], al[0]);
    split2(s[2 * kk][2], s[2 * kk][3], ah[1], al[1]);
    split2(s[2 * kk + 1][0], s[2 * kk + 1][1], ah[2], al[2]);
    split2(s[2 * kk + 1][2], s[2 * kk + 1][3], ah[3], al[3]);
}

// Copies rows r0 .. r0 + FA_TILE of one head's scratch (src points at row r0 of the hi part; the
// lo part is `part` elements on) into the tile pair at dst: [FA_PARTS][FA_TILE][DP + 8] bf16.
// Not committed: the caller groups copies with cp_commit().
template <int DP>
__device__ __forceinline__ void copy_tile(bf16* dst, const bf16* __restrict__ src, size_t part) {
    constexpr int LD = DP + 8, CH = DP / 8;  // 16-byte chunks per row
#pragma unroll
    for (int pt = 0; pt < FA_PARTS; ++pt) {
#pragma unroll
        for (int it = 0; it < FA_TILE * CH / (32 * FA_WARPS); ++it) {
            const int e = threadIdx.x + it * 32 * FA_WARPS, r = e / CH, c = (e % CH) * 8;
            cp16(dst + pt * FA_TILE * LD + r * LD + c, src + pt * part + (size_t)r * DP + c);
        }
    }
}

// The block's rows' visible ranges [lo, hi) of the other side (clamped to `limit`) into
// rlo/rhi [FA_TILE], and their union's bounds into span[0..2] (span[0] >= span[1]: nothing).
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

// store_rows of a gradient with respect to rotated rows (q) turned into the gradient with respect
// to the rows before the rotation (the rotary embedding's transpose, rope_f32's inverse) with the
// rows' cos and sin cs [rows][DP/2][2]: for d = DP only (a multiple of 16), where column c < DP/2
// and its partner c + DP/2 sit in the same lane, blocks n and n + DP/16. Each product and sum is
// rounded on its own (unrope).
template <int DP>
__device__ __forceinline__ void store_rows_unrope(float* __restrict__ dst, size_t stride, const float (*acc)[4],
                                                  unsigned int r0, unsigned int rows, float mul,
                                                  const float* __restrict__ cs) {
    constexpr int H = DP / 16;  // 8-column blocks per half
    const unsigned int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < H; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const unsigned int r = r0 + g + 8 * (e >> 1), c = n * 8 + 2 * t + (e & 1);
            if (r < rows) {
                const float* rc = cs + (size_t)r * DP + 2 * c;
                float* row = dst + (size_t)r * stride;
                unrope(acc[n][e] * mul, acc[n + H][e] * mul, rc[0], rc[1], row[c], row[c + DP / 2]);
            }
        }
    }
}

// s[NB][4] (16 x 8·NB) = A · B^T: A the warp's 16 rows at `a`, B the 8·NB rows at `b`, both in
// row-major tile pairs [FA_PARTS][FA_TILE][DP + 8] (hi, lo) in shared memory.
template <int DP, int NB>
__device__ __forceinline__ void scores(float (*s)[4], const bf16* a, const bf16* b) {
    constexpr int LD = DP + 8;
    const unsigned int ao = opaque_addr(a + a_lane(LD)), bo = opaque_addr(b + b_lane(LD));
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
        unsigned int ah[4];
        ldsm(ah, ao + 2 * (kk * 16));
#ifndef MMA_ONE_PASS
        unsigned int al[4];
        ldsm(al, ao + 2 * (FA_TILE * LD + kk * 16));
#endif
#pragma unroll
        for (int n2 = 0; n2 < NB / 2; ++n2) {
            unsigned int bh[4];
            ldsm(bh, bo + 2 * (n2 * 16 * LD + kk * 16));
            mma(s[2 * n2], ah, bh[0], bh[1]);
            mma(s[2 * n2 + 1], ah, bh[2], bh[3]);
#ifndef MMA_ONE_PASS
            unsigned int bl[4];
            ldsm(bl, bo + 2 * (FA_TILE * LD + n2 * 16 * LD + kk * 16));
            mma(s[2 * n2], ah, bl[0], bl[1]);
            mma(s[2 * n2 + 1], ah, bl[2], bl[3]);
            mma(s[2 * n2], al, bh[0], bh[1]);
            mma(s[2 * n2 + 1], al, bh[2], bh[3]);
#endif
        }
    }
}

// acc[DP / 8][4] (16 x DP) += P · B: P the warp's 16 x 8·NB accumulator tile p[NB][4], B the
// 8·NB rows (k) at `b` of a row-major tile pair [FA_PARTS][FA_TILE][DP + 8], read transposed.
template <int DP, int NB>
__device__ __forceinline__ void accumulate(float (*acc)[4], const float (*p)[4], const bf16* b) {
    constexpr int LD = DP + 8;
    const unsigned int bo = opaque_addr(b + a_lane(LD));
#pragma unroll
    for (int kk = 0; kk < NB / 2; ++kk) {
        unsigned int ah[4], al[4];
        acc_to_a(p, kk, ah, al);
#pragma unroll
        for (int n2 = 0; n2 < DP / 16; ++n2) {
            unsigned int bh[4];
            ldsm_t(bh, bo + 2 * (kk * 16 * LD + n2 * 16));
            mma(acc[2 * n2], ah, bh[0], bh[1]);
            mma(acc[2 * n2 + 1], ah, bh[2], bh[3]);
#ifndef MMA_ONE_PASS
            unsigned int bl[4];
            ldsm_t(bl, bo + 2 * (FA_TILE * LD + kk * 16 * LD + n2 * 16));
            mma(acc[2 * n2], ah, bl[0], bl[1]);
            mma(acc[2 * n2 + 1], ah, bl[2], bl[3]);
            mma(acc[2 * n2], al, bh[0], bh[1]);
            mma(acc[2 * n2 + 1], al, bh[2], bh[3]);
#endif
        }
    }
}

// Forward: block (query tile, head h), blockIdx.x = tile_rev * nq + h (heads of a KV group are
// neighbours, reading the same K/V; the longest causal tiles go first).
// qs, ks, vs: the split scratch of q [T, nq*d], k and v [Tk, nkv*d]; sinks [nq], klo/khi [T]
// -> o [T, nq*d], lse [T, nq]. The running max (in log2 units) starts at the sink, so a query
// with no visible key ends with o = 0, lse = sink.
// Shared memory: Q, K, V tile pairs [FA_PARTS][FA_TILE][DP + 8]; ranges.
// Copies: Q and K_0 before the loop; V_j while Q·K_j^T and the softmax run, K_j+1 while P·V_j runs.
template <int DP>
__device__ __forceinline__ void fwd(float* __restrict__ o, float* __restrict__ lse, const bf16* __restrict__ qs,
                                    const bf16* __restrict__ ks, const bf16* __restrict__ vs,
                                    const float* __restrict__ sinks, const unsigned int* __restrict__ klo,
                                    const unsigned int* __restrict__ khi, unsigned int T, unsigned int Tk,
                                    unsigned int nq, unsigned int nkv, unsigned int d, float scale) {
    constexpr int LD = DP + 8, PAIR = FA_PARTS * FA_TILE * LD;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* qt = reinterpret_cast<bf16*>(smem);
    bf16* kt = qt + PAIR;
    bf16* vt = kt + PAIR;
    unsigned int* rlo = reinterpret_cast<unsigned int*>(vt + PAIR);
    unsigned int* rhi = rlo + FA_TILE;
    unsigned int* span = rhi + FA_TILE;

    const unsigned int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned int tiles = (T + FA_TILE - 1) / FA_TILE;
    const unsigned int h = blockIdx.x % nq, q0 = (tiles - 1 - blockIdx.x / nq) * FA_TILE;
    const unsigned int kvh = h / (nq / nkv);
    const size_t qrows = (size_t)T + FA_TILE, krows = (size_t)Tk + FA_TILE;
    const size_t qpart = nq * qrows * DP, kpart = nkv * krows * DP;
    const bf16* kg = ks + kvh * krows * DP;
    const bf16* vg = vs + kvh * krows * DP;

    copy_tile<DP>(qt, qs + (h * qrows + q0) * DP, qpart);
    cp_commit();
    row_ranges(rlo, rhi, span, klo, khi, q0, T, Tk);
    unsigned int lo[2], hi[2];
    float m[2], z[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        lo[x] = rlo[warp * 16 + g + 8 * x];
        hi[x] = rhi[warp * 16 + g + 8 * x];
        m[x] = sinks[h] * LOG2E;
        z[x] = 1.0f;
    }
    const unsigned int kbeg = span[0], kend = span[1];
    if (kbeg < kend) copy_tile<DP>(kt, kg + (size_t)kbeg * DP, kpart);
    cp_commit();

    const float sl2 = scale * LOG2E;
    const bf16* qw = qt + warp * 16 * LD;
    float acc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (unsigned int k0 = kbeg; k0 < kend; k0 += FA_TILE) {
        cp_wait_all();
        __syncthreads();  // Q and K_j are in; no warp reads V_j-1 any more
        copy_tile<DP>(vt, vg + (size_t)k0 * DP, kpart);
        cp_commit();
        float s[FA_NB][4];
        scores<DP, FA_NB>(s, qw, kt);
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nb = 0; nb < FA_NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned int j = k0 + nb * 8 + 2 * t + (e & 1), x = e >> 1;
                s[nb][e] = (j >= lo[x] && j < hi[x]) ? s[nb][e] * sl2 : NEG_INF;
                mx[x] = fmaxf(mx[x], s[nb][e]);
            }
        }
        float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            const float m_new = fmaxf(m[x], quad_max(mx[x]));
            corr[x] = exp2f(m[x] - m_new);
            m[x] = m_new;
        }
#pragma unroll
        for (int nb = 0; nb < FA_NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int x = e >> 1;
                s[nb][e] = s[nb][e] == NEG_INF ? 0.0f : exp2f(s[nb][e] - m[x]);
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
        cp_wait_all();
        __syncthreads();  // V_j is in; no warp reads K_j any more
        if (k0 + FA_TILE < kend) copy_tile<DP>(kt, kg + (size_t)(k0 + FA_TILE) * DP, kpart);
        cp_commit();
        accumulate<DP, FA_NB>(acc, s, vt);
    }
    cp_wait_all();  // nothing in flight at exit (a block with no visible key never waited for Q)
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] /= z[e >> 1];
    }
    const size_t qrow = (size_t)nq * d;
    store_rows<DP>(o + (size_t)h * d, qrow, acc, q0 + warp * 16, T, d, 1.0f);
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const unsigned int i = q0 + warp * 16 + g + 8 * x;
        if (t == 0 && i < T) lse[(size_t)i * nq + h] = m[x] * LN2 + logf(z[x]);
    }
}

// dq [T, nq*d] (assigned): block (query tile, head h) as in the forward. Over the visible key
// tiles: p_ij = exp(s_ij - lse_i), ds_ij = p_ij (dO_i . v_j - D_i), dq_i = scale sum_j ds_ij k_j.
// With cs (not null; d = DP only) the stored dq is that of the queries before their rotation
// (store_rows_unrope).
// qs, ks, vs, dos: the split scratch of q, k, v and dout.
// Shared memory: Q, dO, K, V tile pairs [FA_PARTS][FA_TILE][DP + 8]; ranges.
// Copies: Q, dO and V_0 before the loop; K_j while dO·V_j^T runs, V_j+1 while the chunks of
// Q·K_j^T and dS·K_j run.
template <int DP>
__device__ __forceinline__ void bwd_dq(float* __restrict__ dq, const bf16* __restrict__ qs,
                                       const bf16* __restrict__ ks, const bf16* __restrict__ vs,
                                       const bf16* __restrict__ dos, const float* __restrict__ lse,
                                       const float* __restrict__ delta, const unsigned int* __restrict__ klo,
                                       const unsigned int* __restrict__ khi, unsigned int T, unsigned int Tk,
                                       unsigned int nq, unsigned int nkv, unsigned int d, float scale,
                                       const float* __restrict__ cs) {
    constexpr int LD = DP + 8, PAIR = FA_PARTS * FA_TILE * LD, CW = 8 * FA_CH;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* qt = reinterpret_cast<bf16*>(smem);
    bf16* ot = qt + PAIR;
    bf16* kt = ot + PAIR;
    bf16* vt = kt + PAIR;
    unsigned int* rlo = reinterpret_cast<unsigned int*>(vt + PAIR);
    unsigned int* rhi = rlo + FA_TILE;
    unsigned int* span = rhi + FA_TILE;

    const unsigned int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned int tiles = (T + FA_TILE - 1) / FA_TILE;
    const unsigned int h = blockIdx.x % nq, q0 = (tiles - 1 - blockIdx.x / nq) * FA_TILE;
    const unsigned int kvh = h / (nq / nkv);
    const size_t qrows = (size_t)T + FA_TILE, krows = (size_t)Tk + FA_TILE;
    const size_t qpart = nq * qrows * DP, kpart = nkv * krows * DP;
    const bf16* kg = ks + kvh * krows * DP;
    const bf16* vg = vs + kvh * krows * DP;

    copy_tile<DP>(qt, qs + (h * qrows + q0) * DP, qpart);
    copy_tile<DP>(ot, dos + (h * qrows + q0) * DP, qpart);
    cp_commit();
    row_ranges(rlo, rhi, span, klo, khi, q0, T, Tk);
    unsigned int lo[2], hi[2];
    float li[2], di[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const unsigned int r = warp * 16 + g + 8 * x, i = q0 + r;
        lo[x] = rlo[r];
        hi[x] = rhi[r];
        li[x] = i < T ? lse[(size_t)i * nq + h] * LOG2E : 0.0f;
        di[x] = i < T ? delta[(size_t)i * nq + h] : 0.0f;
    }
    const unsigned int kbeg = span[0], kend = span[1];
    if (kbeg < kend) copy_tile<DP>(vt, vg + (size_t)kbeg * DP, kpart);
    cp_commit();

    const float sl2 = scale * LOG2E;
    float acc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (unsigned int k0 = kbeg; k0 < kend; k0 += FA_TILE) {
        cp_wait_all();
        __syncthreads();  // Q, dO and V_j are in; no warp reads K_j-1 any more
        copy_tile<DP>(kt, kg + (size_t)k0 * DP, kpart);
        cp_commit();
        float dp[FA_NB][4];
        scores<DP, FA_NB>(dp, ot + warp * 16 * LD, vt);
        cp_wait_all();
        __syncthreads();  // K_j is in; no warp reads V_j any more
        if (k0 + FA_TILE < kend) copy_tile<DP>(vt, vg + (size_t)(k0 + FA_TILE) * DP, kpart);
        cp_commit();
#pragma unroll
        for (int c = 0; c < FA_NB / FA_CH; ++c) {
            float s[FA_CH][4];
            scores<DP, FA_CH>(s, qt + warp * 16 * LD, kt + c * CW * LD);
#pragma unroll
            for (int nb = 0; nb < FA_CH; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const unsigned int j = k0 + c * CW + nb * 8 + 2 * t + (e & 1), x = e >> 1;
                    const float p = (j >= lo[x] && j < hi[x]) ? exp2f(s[nb][e] * sl2 - li[x]) : 0.0f;
                    s[nb][e] = p * (dp[c * FA_CH + nb][e] - di[x]);
                }
            }
            accumulate<DP, FA_CH>(acc, s, kt + c * CW * LD);
        }
    }
    cp_wait_all();
    if (cs != nullptr) {
        store_rows_unrope<DP>(dq + (size_t)h * d, (size_t)nq * d, acc, q0 + warp * 16, T, scale, cs);
    } else {
        store_rows<DP>(dq + (size_t)h * d, (size_t)nq * d, acc, q0 + warp * 16, T, d, scale);
    }
}

// dk, dv [Tk, nkv*d] (assigned): block (key tile, KV head kvh, head split sp), blockIdx.x =
// (tile * nkv + kvh) * hs + sp (the longest causal tiles go first). The group's query heads are
// split into hs runs of group / hs: the block sums over run sp's heads and the query tiles that see
// some key of the tile (qlo/qhi [Tk]): dv_j = sum_i p_ij dO_i, dk_j = scale sum_i ds_ij q_i. Warp
// rows are keys (P^T, dS^T). With hs = 1 that is the whole sum; with hs > 1 dk and dv point at
// hs partial sums [hs][Tk, nkv*d] (part sp at sp * Tk * nkv * d), which attention_sum_parts_f32
// then adds in the order sp = 0, 1, ...: more blocks (with one block per key tile and KV head,
// gpt-oss-20b's 8 KV heads at 2K tokens give 256 blocks, their lengths from 1 to 32 query tiles),
// and the same bits on every card (hs depends on the shapes alone).
// qs, ks, vs, dos: the split scratch of q, k, v and dout.
// Shared memory: K, V, Q, dO tile pairs [FA_PARTS][FA_TILE][DP + 8]; ranges; lse (log2 units)
// and delta of the query tile.
template <int DP>
__device__ __forceinline__ void bwd_dkdv(float* __restrict__ dk, float* __restrict__ dv,
                                         const bf16* __restrict__ qs, const bf16* __restrict__ ks,
                                         const bf16* __restrict__ vs, const bf16* __restrict__ dos,
                                         const float* __restrict__ lse, const float* __restrict__ delta,
                                         const unsigned int* __restrict__ qlo,
                                         const unsigned int* __restrict__ qhi, unsigned int T, unsigned int Tk,
                                         unsigned int nq, unsigned int nkv, unsigned int d, float scale,
                                         unsigned int hs) {
    constexpr int LD = DP + 8, PAIR = FA_PARTS * FA_TILE * LD, CW = 8 * FA_CH;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* kt = reinterpret_cast<bf16*>(smem);
    bf16* vt = kt + PAIR;
    bf16* qt = vt + PAIR;
    bf16* ot = qt + PAIR;
    unsigned int* rlo = reinterpret_cast<unsigned int*>(ot + PAIR);
    unsigned int* rhi = rlo + FA_TILE;
    unsigned int* span = rhi + FA_TILE;
    float* lse_sh = reinterpret_cast<float*>(span + 2);
    float* delta_sh = lse_sh + FA_TILE;

    const unsigned int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned int sp = blockIdx.x % hs, kvh = (blockIdx.x / hs) % nkv, j0 = (blockIdx.x / hs / nkv) * FA_TILE;
    const unsigned int group = nq / nkv, run = group / hs;
    const size_t qrows = (size_t)T + FA_TILE, krows = (size_t)Tk + FA_TILE;
    const size_t qpart = nq * qrows * DP, kpart = nkv * krows * DP;

    copy_tile<DP>(kt, ks + (kvh * krows + j0) * DP, kpart);
    copy_tile<DP>(vt, vs + (kvh * krows + j0) * DP, kpart);
    cp_commit();
    row_ranges(rlo, rhi, span, qlo, qhi, j0, Tk, T);
    unsigned int lo[2], hi[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        lo[x] = rlo[warp * 16 + g + 8 * x];
        hi[x] = rhi[warp * 16 + g + 8 * x];
    }
    const unsigned int ibeg = span[0], iend = span[1];

    const float sl2 = scale * LOG2E;
    const bf16* kw = kt + warp * 16 * LD;
    const bf16* vw = vt + warp * 16 * LD;
    float acc_k[DP / 8][4], acc_v[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_k[n][e] = acc_v[n][e] = 0.0f;
    }
    for (unsigned int h = kvh * group + sp * run; h < kvh * group + (sp + 1) * run; ++h) {
        for (unsigned int i0 = ibeg; i0 < iend; i0 += FA_TILE) {
            __syncthreads();  // no warp reads the previous Q, dO, lse or delta tile any more
            copy_tile<DP>(qt, qs + (h * qrows + i0) * DP, qpart);
            copy_tile<DP>(ot, dos + (h * qrows + i0) * DP, qpart);
            cp_commit();
            if (threadIdx.x < FA_TILE) {
                const unsigned int i = i0 + threadIdx.x;
                lse_sh[threadIdx.x] = i < iend ? lse[(size_t)i * nq + h] * LOG2E : 0.0f;
                delta_sh[threadIdx.x] = i < iend ? delta[(size_t)i * nq + h] : 0.0f;
            }
            cp_wait_all();
            __syncthreads();  // K, V (first time), Q, dO, lse and delta are in
#pragma unroll
            for (int c = 0; c < FA_NB / FA_CH; ++c) {
                float s[FA_CH][4], dp[FA_CH][4];
                scores<DP, FA_CH>(s, kw, qt + c * CW * LD);
                scores<DP, FA_CH>(dp, vw, ot + c * CW * LD);
#pragma unroll
                for (int nb = 0; nb < FA_CH; ++nb) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const unsigned int col = c * CW + nb * 8 + 2 * t + (e & 1), i = i0 + col, x = e >> 1;
                        const float p = (i >= lo[x] && i < hi[x]) ? exp2f(s[nb][e] * sl2 - lse_sh[col]) : 0.0f;
                        s[nb][e] = p;
                        dp[nb][e] = p * (dp[nb][e] - delta_sh[col]);
                    }
                }
                accumulate<DP, FA_CH>(acc_v, s, ot + c * CW * LD);
                accumulate<DP, FA_CH>(acc_k, dp, qt + c * CW * LD);
            }
        }
    }
    cp_wait_all();  // a block whose keys no query sees never waited for K and V
    const size_t part = (size_t)sp * Tk * nkv * d + (size_t)kvh * d;
    store_rows<DP>(dk + part, (size_t)nkv * d, acc_k, j0 + warp * 16, Tk, d, scale);
    store_rows<DP>(dv + part, (size_t)nkv * d, acc_v, j0 + warp * 16, Tk, d, 1.0f);
}

// One extern "C" symbol per padded head width DP; blockDim.x is 32 * FA_WARPS and the dynamic
// shared memory is what mod.rs (tile_smem_bytes) computes for the kernel, DP and FA_PARTS.
#define FA_STAMP(DP, LBF, LBB)                                                                            \
    extern "C" __global__ void LBF attention_fwd_f32_d##DP(                                               \
        float* __restrict__ o, float* __restrict__ lse, const bf16* __restrict__ qs,                      \
        const bf16* __restrict__ ks, const bf16* __restrict__ vs, const float* __restrict__ sinks,        \
        const unsigned int* __restrict__ klo, const unsigned int* __restrict__ khi, unsigned int T,       \
        unsigned int Tk, unsigned int nq, unsigned int nkv, unsigned int d, float scale) {                \
        fwd<DP>(o, lse, qs, ks, vs, sinks, klo, khi, T, Tk, nq, nkv, d, scale);                           \
    }                                                                                                     \
    extern "C" __global__ void LBB attention_bwd_dq_f32_d##DP(                                            \
        float* __restrict__ dq, const bf16* __restrict__ qs, const bf16* __restrict__ ks,                 \
        const bf16* __restrict__ vs, const bf16* __restrict__ dos, const float* __restrict__ lse,         \
        const float* __restrict__ delta, const unsigned int* __restrict__ klo,                            \
        const unsigned int* __restrict__ khi, unsigned int T, unsigned int Tk, unsigned int nq,           \
        unsigned int nkv, unsigned int d, float scale, const float* __restrict__ cs) {                    \
        bwd_dq<DP>(dq, qs, ks, vs, dos, lse, delta, klo, khi, T, Tk, nq, nkv, d, scale, cs);              \
    }                                                                                                     \
    extern "C" __global__ void LBB attention_bwd_dkdv_f32_d##DP(                                          \
        float* __restrict__ dk, float* __restrict__ dv, const bf16* __restrict__ qs,                      \
        const bf16* __restrict__ ks, const bf16* __restrict__ vs, const bf16* __restrict__ dos,           \
        const float* __restrict__ lse, const float* __restrict__ delta,                                   \
        const unsigned int* __restrict__ qlo, const unsigned int* __restrict__ qhi, unsigned int T,       \
        unsigned int Tk, unsigned int nq, unsigned int nkv, unsigned int d, float scale, unsigned int hs) { \
        bwd_dkdv<DP>(dk, dv, qs, ks, vs, dos, lse, delta, qlo, qhi, T, Tk, nq, nkv, d, scale, hs);        \
    }

#define FA_LB __launch_bounds__(32 * FA_WARPS)
#define FA_LB_MIN(n) __launch_bounds__(32 * FA_WARPS, n)
FA_STAMP(16, FA_LB, FA_LB)
FA_STAMP(32, FA_LB, FA_LB)
FA_STAMP(64, FA_LB_MIN(FA_MINF), FA_LB_MIN(FA_MINB))
FA_STAMP(128, FA_LB, FA_LB)

// out[i] = sum_{s < hs} parts[s n + i] for i < n, added in the order s = 0, 1, ... (dk and dv from
// bwd_dkdv's hs partial sums). One thread per element.
extern "C" __global__ void attention_sum_parts_f32(float* __restrict__ out, const float* __restrict__ parts,
                                                   unsigned long long n, unsigned int hs) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = parts[i];
    for (unsigned int p = 1; p < hs; ++p) s += parts[p * n + i];
    out[i] = s;
}

// x [rows, heads*d] (in place): the gradient with respect to rotated rows turned into the one with
// respect to the rows before the rotation, with cs [rows][d/2][2] (unrope). One thread per (row,
// head, c < d/2).
extern "C" __global__ void attention_unrope_f32(float* __restrict__ x, const float* __restrict__ cs,
                                                unsigned int rows, unsigned int heads, unsigned int d) {
    const unsigned int half = d / 2;
    const size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (size_t)rows * heads * half) return;
    const unsigned int c = (unsigned int)(p % half);
    const size_t r = p / half / heads, h = p / half % heads;
    float* head = x + (r * heads + h) * d;
    unrope(head[c], head[c + half], cs[r * d + 2 * c], cs[r * d + 2 * c + 1], head[c], head[c + half]);
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
