// gemv_quant.cu -- y = W x for batch-1 decode with weight-only quantized W (server/model/quant.py's layout),
// fp32 accumulation; and the dequantization of one such matrix to the model dtype (prefill's scratch).
//
// Layout (quant.py, QuantLinear): W is [N, K]; groups of G inputs along K; scale (and, int4, minv) fp16 [N, K/G].
//   int8: q int8 [N, K],       w = q * scale
//   int4: q uint8 [N, K/2],    w = nib * scale + minv; byte j holds input 2j (low nibble) and 2j+1 (high), so the
//         nibble at bits 4e..4e+3 of a 32-bit word is the word's input e (little-endian)
//
// Work split (the fp16 gemv's, gemv.cu, with two rows per warp): blocks of 8 warps; a warp takes a pair of rows
// (rows 2p and 2p+1, or gate row p and up row p+N for SwiGLU) and its lanes stream 16-byte chunks of both rows
// (32 inputs for int4, 16 for int8) with kQUnroll chunks per lane and row in flight. One chunk lies inside one
// group (G is a multiple of the chunk's inputs), so a chunk's dot product is taken on the integer values first
// and scaled once:
//   int8: acc += scale * sum(q * x)
//   int4: acc += scale * sum(nib * x) + minv * sum(x)   (sum(x) over the chunk: staged once per block, fp32)
// The integers become fp16 exactly in registers (the 0x6400 magic: half(1024 + v) - 1024), then fp32; products
// and sums are fp32. The input (optionally the embedding row, optionally RMSNorm'd, rounded to the model dtype at
// the same points as gemv.cu) is staged once per block in shared memory in the model dtype, swizzled so that a
// warp's 16-byte reads of consecutive chunks hit distinct banks; both rows of a pair use each converted input.
// Sums are in a fixed order (per lane in chunk order, then the warp's butterfly): every run gives the same bits.
//
// Epilogues as gemv.cu's GemvMode: store (QKV), residual add in place (O, down), SwiGLU over gate|up, fp32
// logits with the per-block argmax partials greedy sampling reads (lm_head). Weights (and their scales) are
// read-only, so each warp's first chunk is loaded before griddepcontrol.wait.
//
// Three kernels share the staging (qstage) and the epilogues (qpair_out, qamax_out): qgemv_kernel above (fp32
// products: bf16 models), qgemv_tc_kernel (tensor cores: fp16 models, int4 since entry 50, int8 since entry 56) and
// qgemv_h2_kernel (fp16 models with CASE4_QGEMV=h2: half2 products of 8 inputs at a time summed
// in fp32, the next tile prefetched); qgemv_init says which runs, each kernel's own comment how.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "common.cuh"
#include "ops.h"

namespace case4 {

constexpr int kQWarps = 8;
constexpr int kQUnroll = 4;  // 16-byte chunks per lane and row in flight
constexpr int kQMaxSmem = 200 * 1024;  // at most; qgemv_init lowers it to the device's opt-in limit (A100: 163 KB)
static int q_smem_limit = 48 * 1024;    // what qgemv_init set (the launcher refuses a K that needs more)

// inputs per 16-byte chunk of weights, and 16-byte vectors of the staged input (8 values of T) per chunk
template <int QM> struct QTraits;
template <> struct QTraits<8> { static constexpr int kpc = 16, vpc = 2; };
template <> struct QTraits<4> { static constexpr int kpc = 32, vpc = 4; };

// Staged-input swizzle: vector i of the input lives at xs[i ^ ((i >> 3) & (vpc - 1))]. A warp's lanes read
// chunks c, c+1, ... (vpc vectors each, 16*vpc bytes apart): without it every 8 lanes (one shared-memory
// wavefront of 16-byte reads) would land on 2 (int8) or 4 (int4) bank groups, with it on 8 distinct ones.
template <int VPC>
__device__ __forceinline__ int xswz(int i) { return i ^ ((i >> 3) & (VPC - 1)); }

// exact small integers -> float: the half2 (1024 + a, 1024 + b) (bits 0x64.. with a, b in the low mantissa) minus
// BIAS as a half (1024 for int4's nibbles, 1152 = 1024 + 128 for int8's sign-flipped bytes); exact in half and in
// the conversion to float
template <unsigned short BIAS>
__device__ __forceinline__ float2 magic_pair(unsigned h) {
    const __half2 v = __hsub2(*reinterpret_cast<const __half2 *>(&h), __half2half2(__ushort_as_half(BIAS)));
    return __half22float2(v);
}
__device__ __forceinline__ unsigned lop_or(unsigned a, unsigned mask, unsigned orv) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(orv));  // (a & mask) | orv
    return r;
}

// The integer values of one 32-bit word of q as floats, in input order: int4 8 inputs (input e at bits
// 4e..4e+3), int8 4 (input b in byte b; int8 -> uint8 + 128 by flipping the sign bit).
template <int QM> constexpr int kPerWord = QM == 4 ? 8 : 4;
template <int QM>
__device__ __forceinline__ void unpack_word(unsigned w, float (&f)[kPerWord<QM>]) {
    if constexpr (QM == 4) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 p = magic_pair<0x6400>(lop_or(w >> (4 * e), 0x000F000Fu, 0x64006400u));  // inputs e, e + 4
            f[e] = p.x;
            f[e + 4] = p.y;
        }
    } else {
        const unsigned u = w ^ 0x80808080u;
        // bytes (b0, 0x64, b2, 0x64) and (b1, 0x64, b3, 0x64): the halves 1024 + q + 128
        const float2 p02 = magic_pair<0x6480>(__byte_perm(u, 0x64u, 0x4240));
        const float2 p13 = magic_pair<0x6480>(__byte_perm(u, 0x64u, 0x4341));
        f[0] = p02.x;
        f[2] = p02.y;
        f[1] = p13.x;
        f[3] = p13.y;
    }
}

// The integer values of one 16-byte chunk (KPC of them, in input order) as floats.
template <int QM>
__device__ __forceinline__ void unpack_q(const uint4 &w, float (&f)[QTraits<QM>::kpc]) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int d = 0; d < 4; ++d) {
        float t[kPerWord<QM>];
        unpack_word<QM>(ws[d], t);
#pragma unroll
        for (int e = 0; e < kPerWord<QM>; ++e) f[kPerWord<QM> * d + e] = t[e];
    }
}

template <typename T> __device__ __forceinline__ float2 to_f2(unsigned v);
template <> __device__ __forceinline__ float2 to_f2<half>(unsigned v) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&v));
}
template <> __device__ __forceinline__ float2 to_f2<__nv_bfloat16>(unsigned v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&v));
}

// the staged input of chunk c as floats (TC: the tensor-core kernel's slots, in their order, for the chunk's sum)
template <typename T, int QM, bool TC = false>
__device__ __forceinline__ void load_x(const uint4 *xs, int c, float (&xf)[QTraits<QM>::kpc]) {
    constexpr int VPC = QTraits<QM>::vpc;
#pragma unroll
    for (int j = 0; j < VPC; ++j) {
        const uint4 v = xs[TC ? c * VPC + j : xswz<VPC>(c * VPC + j)];
        const unsigned vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const float2 p = to_f2<T>(vs[h]);
            xf[8 * j + 2 * h] = p.x;
            xf[8 * j + 2 * h + 1] = p.y;
        }
    }
}

__device__ __forceinline__ float ld_half(const void *p, size_t i) {
    return __half2float(__ldg(reinterpret_cast<const __half *>(p) + i));
}

// The half2 kernels' staged input: each 8-value vector in the order the unpacked weight pairs come in (unpack_h2),
// so that pair i of a word's integers meets pair i of the input: int4 (x0,x4)(x1,x5)(x2,x6)(x3,x7), int8
// (x0,x2)(x1,x3)(x4,x6)(x5,x7). PERM = 0: as it is (the fp32 kernel).
template <int PERM>
__device__ __forceinline__ uint4 xperm(const uint4 &v) {
    if constexpr (PERM == 4)
        return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410),
                          __byte_perm(v.y, v.w, 0x7632));
    else if constexpr (PERM == 8)
        return make_uint4(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.x, v.y, 0x7632), __byte_perm(v.z, v.w, 0x5410),
                          __byte_perm(v.z, v.w, 0x7632));
    else if constexpr (PERM == 5)  // tensor-core kernel, int4: (x0,x4)(x2,x6) | (x1,x5)(x3,x7)
        return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                          __byte_perm(v.y, v.w, 0x7632));
    else if constexpr (PERM == 9)  // tensor-core kernel, int8: (x0,x2)(x4,x6) | (x1,x3)(x5,x7)
        return make_uint4(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.z, v.w, 0x5410), __byte_perm(v.x, v.y, 0x7632),
                          __byte_perm(v.z, v.w, 0x7632));
    else
        return v;
}

// Where qstage puts vector i of the input. The tensor-core kernel's orders (PERM 5, 9): chunk-major, each vector's
// two 8-byte halves apart, half h of vector d of chunk c in 8-byte slot (2 c + h) VPC + d, so that an owner lane's
// B values of a chunk (half h of each of its VPC vectors) are VPC / 2 contiguous 16-byte words; the other kernels':
// the swizzled 16-byte slot xswz(i).
template <int PERM> constexpr bool kTcOrder = PERM == 5 || PERM == 9;
template <int VPC, int PERM>
__device__ __forceinline__ void xs_put(uint4 *xs, int i, const uint4 &v) {
    if constexpr (kTcOrder<PERM>) {
        uint2 *x2 = reinterpret_cast<uint2 *>(xs);
        const int s = (i / VPC) * 2 * VPC + i % VPC;
        x2[s] = make_uint2(v.x, v.y);
        x2[s + VPC] = make_uint2(v.z, v.w);
    } else {
        xs[xswz<VPC>(i)] = v;
    }
}
template <int VPC, int PERM>
__device__ __forceinline__ uint4 xs_get(const uint4 *xs, int i) {
    if constexpr (kTcOrder<PERM>) {
        const uint2 *x2 = reinterpret_cast<const uint2 *>(xs);
        const int s = (i / VPC) * 2 * VPC + i % VPC;
        const uint2 lo = x2[s], hi = x2[s + VPC];
        return make_uint4(lo.x, lo.y, hi.x, hi.y);
    } else {
        return xs[xswz<VPC>(i)];
    }
}

// Stage the input of one block in shared memory (K / 8 vectors of T at xs_put's slots, each in xperm<PERM>'s order), then,
// int4, the fp32 sum of each chunk's inputs: the embedding row of tok[0] when given (block 0 then fills the
// residual x_out), RMSNorm'd when NORM: round(w * round(x * inv)), as gemv.cu and the reference.
template <typename T, bool NORM, int QM, int PERM>
__device__ __forceinline__ void qstage(const QGemvArgs &a, uint4 *xs, float *xsum, float *red) {
    constexpr int KPC = QTraits<QM>::kpc, VPC = QTraits<QM>::vpc;
    const int nvec = a.K / 8, nchunk = a.K / KPC;
    const uint4 *xin = reinterpret_cast<const uint4 *>(a.x);
    if (a.tok) xin += (size_t)(*a.tok) * nvec;
    const bool write_resid = a.tok && a.x_out && blockIdx.x == 0;
    float ss = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const uint4 v = xin[i];
        xs_put<VPC, PERM>(xs, i, NORM ? v : xperm<PERM>(v));
        if (write_resid) reinterpret_cast<uint4 *>(a.x_out)[i] = v;
        if (NORM) {
            float f[8];
            unpack8<T>(v, f);
#pragma unroll
            for (int k = 0; k < 8; ++k) ss = fmaf(f[k], f[k], ss);
        }
    }
    if constexpr (NORM) {  // same threads, same vectors: no barrier between the passes
        const float inv = rsqrtf(block_sum(ss, red) / (float)a.K + a.eps);
        const uint4 *nw = reinterpret_cast<const uint4 *>(a.norm_w);
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            float f[8], w[8];
            unpack8<T>(xs_get<VPC, PERM>(xs, i), f);
            unpack8<T>(nw[i], w);
#pragma unroll
            for (int j = 0; j < 8; ++j) f[j] = w[j] * round_t<T>(f[j] * inv);
            xs_put<VPC, PERM>(xs, i, xperm<PERM>(pack8<T>(f)));
        }
    }
    __syncthreads();
    if constexpr (QM == 4) {  // sum(x) per chunk, in the staged order
        for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
            float xf[KPC];
            load_x<T, QM, kTcOrder<PERM>>(xs, c, xf);
            float s = 0.f;
#pragma unroll
            for (int k = 0; k < KPC; ++k) s += xf[k];
            xsum[c] = s;
        }
        __syncthreads();
    }
}

// A pair's two fp32 sums (lane 0) into the epilogue of MODE; kGemvF32 also keeps the lane's best logit
template <typename T, int MODE>
__device__ __forceinline__ void qpair_out(const QGemvArgs &a, int ra, int rb, float acc_a, float acc_b, float &best,
                                          int &best_row) {
    if constexpr (MODE == kGemvSwiglu) {
        const float g = round_t<T>(acc_a), u = round_t<T>(acc_b);
        const float act = round_t<T>(g / (1.f + __expf(-g)));
        reinterpret_cast<T *>(a.out)[ra] = from_f<T>(act * u);
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = h ? rb : ra;
            const float acc = h ? acc_b : acc_a;
            if (r < 0) continue;
            if constexpr (MODE == kGemvStore) {  // with a bias: fp32 sum + fp32 bias, rounded once (HF's nn.Linear)
                reinterpret_cast<T *>(a.out)[r] =
                    from_f<T>(a.bias ? acc + to_f(reinterpret_cast<const T *>(a.bias)[r]) : acc);
            } else if constexpr (MODE == kGemvResid) {
                T *o = reinterpret_cast<T *>(a.out);
                o[r] = from_f<T>(round_t<T>(acc) + to_f(o[r]));
            } else {  // kGemvF32
                const float v = a.round_logits ? round_t<T>(acc) : acc;
                reinterpret_cast<float *>(a.out)[r] = v;
                if (v > best) { best = v; best_row = r; }  // rows ascend: the lowest row of a tie stays
            }
        }
    }
}

// kGemvF32: the block's argmax for the sampling kernel (FinishArgs::amax_part), from lane 0s' best
__device__ __forceinline__ void qamax_out(const QGemvArgs &a, float best, int best_row) {
    if (!a.amax_part) return;
    if (threadIdx.x % kWarp != 0) best = -INFINITY, best_row = kNoIndex;
    block_argmax_pick(best, best_row);
    if (threadIdx.x == 0) a.amax_part[blockIdx.x] = make_int2(__float_as_int(best), best_row);
}

// One tile of a warp's row pair: U 16-byte chunks a lane of each row (chunks base + u * 32 + lane) and their
// groups' scales (and int4 minimums); chunks past the row, and row b when rb < 0, read as zero
template <int QM, int U>
struct QTile {
    uint4 wa[U], wb[U];
    float sa[U], sb[U], ma[U], mb[U];
};
// (nchunk = K / chunk inputs and ng = K / group, the kernel's own; Q = a.q, row r starting at chunk r * nchunk)
template <int QM, int U>
__device__ __forceinline__ void qload(const QGemvArgs &a, const uint4 *Q, int nchunk, int ng, int lane, int ra, int rb,
                                      int base, uint64_t pol, QTile<QM, U> &b) {
    constexpr int KPC = QTraits<QM>::kpc;
    // the chunk's group without an integer division (a power of two of chunks a group, or one group a row)
    const int cpg = a.group / KPC, gsh = (cpg & (cpg - 1)) == 0 ? __ffs(cpg) - 1 : -1;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = base + u * kWarp + lane;
        const bool in = c < nchunk;
        const int g = !in || ng == 1 ? 0 : gsh >= 0 ? c >> gsh : c / cpg;
        b.wa[u] = in ? ld_stream(Q + (size_t)ra * nchunk + c, pol) : make_uint4(0, 0, 0, 0);
        b.wb[u] = in && rb >= 0 ? ld_stream(Q + (size_t)rb * nchunk + c, pol) : make_uint4(0, 0, 0, 0);
        b.sa[u] = in ? ld_half(a.scale, (size_t)ra * ng + g) : 0.f;
        b.sb[u] = in && rb >= 0 ? ld_half(a.scale, (size_t)rb * ng + g) : 0.f;
        if constexpr (QM == 4) {
            b.ma[u] = in ? ld_half(a.minv, (size_t)ra * ng + g) : 0.f;
            b.mb[u] = in && rb >= 0 ? ld_half(a.minv, (size_t)rb * ng + g) : 0.f;
        }
    }
}

template <typename T, int MODE, bool NORM, int QM>
__global__ void __launch_bounds__(kQWarps * kWarp, 2) qgemv_kernel(QGemvArgs a) {
    using Tr = QTraits<QM>;
    constexpr int KPC = Tr::kpc, U = kQUnroll;
    extern __shared__ uint4 xs[];               // K / 8 vectors of T (swizzled), then K / KPC fp32 chunk sums
    __shared__ __align__(16) float red[kWarp];
    const int nvec = a.K / 8, nchunk = a.K / KPC, ng = a.K / a.group;
    float *xsum = reinterpret_cast<float *>(xs + nvec);
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const uint4 *Q = reinterpret_cast<const uint4 *>(a.q);  // row r starts at chunk r * nchunk
    const int pairs = MODE == kGemvSwiglu ? a.N : (a.N + 1) / 2;
    const int stride = gridDim.x * kQWarps;
    const int p0 = blockIdx.x * kQWarps + warp;
    const uint64_t pol = l2_policy(true);

    // rows of pair p: (2p, 2p + 1) or (p, p + N) for gate|up; rb < 0: none (odd N)
    auto rows_of = [&](int p, int &ra, int &rb) {
        if (MODE == kGemvSwiglu) { ra = p; rb = p + a.N; }
        else { ra = 2 * p; rb = 2 * p + 1 < a.N ? 2 * p + 1 : -1; }
    };
    QTile<QM, U> w;
    auto load = [&](int ra, int rb, int base) { qload(a, Q, nchunk, ng, lane, ra, rb, base, pol, w); };

    ktrace(a.trace, 0);
    int ra0 = 0, rb0 = -1;
    const bool first_loaded = p0 < pairs;
    if (first_loaded) {
        rows_of(p0, ra0, rb0);
        if (a.preload) load(ra0, rb0, 0);  // read-only weights: before the wait
    }
    pdl_trigger();
    pdl_wait();
    ktrace(a.trace, 1);
    if (first_loaded && !a.preload) load(ra0, rb0, 0);

    qstage<T, NORM, QM, 0>(a, xs, xsum, red);

    // ---- rows
    float best = -INFINITY;  // kGemvF32: lane 0's largest stored logit and its row
    int best_row = kNoIndex;
    for (int p = p0; p < pairs; p += stride) {
        int ra, rb;
        rows_of(p, ra, rb);
        float acc_a = 0.f, acc_b = 0.f;
        for (int base = 0; base < nchunk; base += kWarp * U) {
            if (!(p == p0 && base == 0)) load(ra, rb, base);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = base + u * kWarp + lane;
                if (c < nchunk) {
                    float xf[KPC], qf[KPC];
                    load_x<T, QM>(xs, c, xf);
                    float da = 0.f, db = 0.f;
                    unpack_q<QM>(w.wa[u], qf);
#pragma unroll
                    for (int k = 0; k < KPC; ++k) da = fmaf(qf[k], xf[k], da);
                    unpack_q<QM>(w.wb[u], qf);
#pragma unroll
                    for (int k = 0; k < KPC; ++k) db = fmaf(qf[k], xf[k], db);
                    if constexpr (QM == 4) {
                        const float sx = xsum[c];
                        acc_a += fmaf(w.sa[u], da, w.ma[u] * sx);
                        acc_b += fmaf(w.sb[u], db, w.mb[u] * sx);
                    } else {
                        acc_a += w.sa[u] * da;
                        acc_b += w.sb[u] * db;
                    }
                }
            }
        }
        acc_a = warp_sum(acc_a);
        acc_b = warp_sum(acc_b);
        if (lane == 0) qpair_out<T, MODE>(a, ra, rb, acc_a, acc_b, best, best_row);
    }
    if constexpr (MODE == kGemvF32) qamax_out(a, best, best_row);
    ktrace_end(a.trace);
}

// ---- the half2 kernel (fp16 models; docs/performance.md entry 45)
// The fp32 kernel above spends ~14 lane-instructions a weight byte on int4 (entry 39: each integer made a float,
// each product an FFMA), which is more than the floor leaves the issue slots. Here a word's integers stay half2
// and meet the staged input (xperm's order) in HFMA2s: per 8 inputs and row, int4 is 1 shift + 4 lop3 + 4 HFMA2
// (integers) + 4 HFMA2 (products) + 2 conversions + 2 FADD, about 2.1 instructions a weight instead of ~7.
// Range and exactness: the integers are made exact small fractions in [-1, 1) (int4 (v - 8) / 8, int8 q / 128:
// powers of two, exact in fp16), so each 8-input dot product in fp16 (4 products a half) stays below 4 max|x|
// (no overflow below |x| = 16k) and is rounded at most 4 times at fp16's 2^-11 before it joins the fp32 sum; the
// scales take the factors back in fp32: int4 acc += 8s * D + (minv + 8s) * sum(x), int8 acc += 128s * D.
// Tiles: a warp's pairs and their chunk rounds in one sequence t = 0 .. ntile - 1 (kQH2U chunks per lane and row a
// tile); tile t + 1's weights and scales are loaded into the other register buffer before tile t is computed, so
// every warp keeps a load in flight while it computes (across pairs too); with PDL's preload both buffers are
// filled before griddepcontrol.wait. Sums in a fixed order: every run gives the same bits. (Entry 45 also built
// 4 chunks a tile with and without the prefetch; only this one was timed.)
constexpr int kQH2U = 2;  // chunks per lane and row in one tile
template <int QM>
__device__ __forceinline__ void unpack_h2(const uint4 &w, int j, __half2 (&q)[4]) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
    auto h2 = [](unsigned v) { return *reinterpret_cast<const __half2 *>(&v); };
    if constexpr (QM == 4) {  // word j: inputs 8j .. 8j + 7 of the chunk; nibble e at bits 4e
        const unsigned lo = ws[j], hi = ws[j] >> 8;
        // (1024 + v) / 8 - 129 and (1024 + 16 v) / 128 - 9: both (v - 8) / 8, exact
        const __half2 k8 = __floats2half2_rn(0.125f, 0.125f), b8 = __floats2half2_rn(-129.f, -129.f);
        const __half2 k128 = __floats2half2_rn(0.0078125f, 0.0078125f), b128 = __floats2half2_rn(-9.f, -9.f);
        q[0] = __hfma2(h2(lop_or(lo, 0x000F000Fu, 0x64006400u)), k8, b8);      // inputs 0, 4
        q[1] = __hfma2(h2(lop_or(lo, 0x00F000F0u, 0x64006400u)), k128, b128);  // 1, 5
        q[2] = __hfma2(h2(lop_or(hi, 0x000F000Fu, 0x64006400u)), k8, b8);      // 2, 6
        q[3] = __hfma2(h2(lop_or(hi, 0x00F000F0u, 0x64006400u)), k128, b128);  // 3, 7
    } else {  // words 2j, 2j + 1: inputs 8j .. 8j + 7; (1152 + q) / 128 - 9 = q / 128, exact
        const __half2 k = __floats2half2_rn(0.0078125f, 0.0078125f), b = __floats2half2_rn(-9.f, -9.f);
#pragma unroll
        for (int d = 0; d < 2; ++d) {
            const unsigned u = ws[2 * j + d] ^ 0x80808080u;
            q[2 * d] = __hfma2(h2(__byte_perm(u, 0x64u, 0x4240)), k, b);      // inputs 4d + 0, 4d + 2
            q[2 * d + 1] = __hfma2(h2(__byte_perm(u, 0x64u, 0x4341)), k, b);  // 4d + 1, 4d + 3
        }
    }
}
// one 8-input dot product in half2, then fp32
__device__ __forceinline__ float dot8_h2(const __half2 (&q)[4], const uint4 &xv) {
    const __half2 *x = reinterpret_cast<const __half2 *>(&xv);
    __half2 h = __hmul2(q[0], x[0]);
    h = __hfma2(q[1], x[1], h);
    h = __hfma2(q[2], x[2], h);
    h = __hfma2(q[3], x[3], h);
    const float2 f = __half22float2(h);
    return f.x + f.y;
}

template <int MODE, bool NORM, int QM>
__global__ void __launch_bounds__(kQWarps * kWarp, 2) qgemv_h2_kernel(QGemvArgs a) {
    using T = half;
    constexpr int KPC = QTraits<QM>::kpc, VPC = QTraits<QM>::vpc, U = kQH2U;
    extern __shared__ uint4 xs[];  // K / 8 vectors (swizzled, xperm'd), then K / KPC fp32 chunk sums
    __shared__ __align__(16) float red[kWarp];
    const int nchunk = a.K / KPC, ng = a.K / a.group;
    float *xsum = reinterpret_cast<float *>(xs + a.K / 8);
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const uint4 *Q = reinterpret_cast<const uint4 *>(a.q);  // row r starts at chunk r * nchunk
    const int pairs = MODE == kGemvSwiglu ? a.N : (a.N + 1) / 2;
    const int stride = gridDim.x * kQWarps;
    const int p0 = blockIdx.x * kQWarps + warp;
    const int nb = (nchunk + kWarp * U - 1) / (kWarp * U);  // tiles a pair
    const int ntile = (p0 < pairs ? (pairs - p0 + stride - 1) / stride : 0) * nb;
    const uint64_t pol = l2_policy(true);

    auto rows_of = [&](int t, int &ra, int &rb) {  // the rows of tile t's pair; rb < 0: none (odd N)
        const int p = p0 + (t / nb) * stride;
        if (MODE == kGemvSwiglu) { ra = p; rb = p + a.N; }
        else { ra = 2 * p; rb = 2 * p + 1 < a.N ? 2 * p + 1 : -1; }
    };
    auto load = [&](int t, QTile<QM, U> &b) {
        if (t >= ntile) return;
        int ra, rb;
        rows_of(t, ra, rb);
        qload(a, Q, nchunk, ng, lane, ra, rb, (t % nb) * kWarp * U, pol, b);
    };

    QTile<QM, U> A, B;
    ktrace(a.trace, 0);
    if (a.preload) {  // read-only weights: before the wait, both buffers
        load(0, A);
        load(1, B);
    }
    pdl_trigger();
    pdl_wait();
    ktrace(a.trace, 1);
    if (!a.preload) load(0, A);
    qstage<T, NORM, QM, QM>(a, xs, xsum, red);

    float best = -INFINITY;  // kGemvF32: lane 0's largest stored logit and its row
    int best_row = kNoIndex;
    float acc_a = 0.f, acc_b = 0.f;
    auto run = [&](int t, QTile<QM, U> &cur, QTile<QM, U> &nxt) {
        if (t > 0 || !a.preload) load(t + 1, nxt);
        int ra, rb;
        rows_of(t, ra, rb);
        const int base = (t % nb) * kWarp * U;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = base + u * kWarp + lane;
            if (c < nchunk) {
                float da = 0.f, db = 0.f;
#pragma unroll
                for (int j = 0; j < VPC; ++j) {
                    const uint4 xv = xs[xswz<VPC>(c * VPC + j)];
                    __half2 q[4];
                    unpack_h2<QM>(cur.wa[u], j, q);
                    da += dot8_h2(q, xv);
                    unpack_h2<QM>(cur.wb[u], j, q);
                    db += dot8_h2(q, xv);
                }
                if constexpr (QM == 4) {
                    const float sx = xsum[c];
                    acc_a += fmaf(8.f * cur.sa[u], da, fmaf(8.f, cur.sa[u], cur.ma[u]) * sx);
                    acc_b += fmaf(8.f * cur.sb[u], db, fmaf(8.f, cur.sb[u], cur.mb[u]) * sx);
                } else {
                    acc_a += (128.f * cur.sa[u]) * da;
                    acc_b += (128.f * cur.sb[u]) * db;
                }
            }
        }
        if (t % nb != nb - 1) return;  // the pair's last tile: its two sums are complete
        acc_a = warp_sum(acc_a);
        acc_b = warp_sum(acc_b);
        if (lane == 0) qpair_out<T, MODE>(a, ra, rb, acc_a, acc_b, best, best_row);
        acc_a = acc_b = 0.f;
    };
    for (int t = 0; t < ntile; t += 2) {
        run(t, A, B);
        if (t + 1 < ntile) run(t + 1, B, A);
    }
    if constexpr (MODE == kGemvF32) qamax_out(a, best, best_row);
    ktrace_end(a.trace);
}

// ---- the tensor-core kernel (fp16 models: int4 and int8 by default; docs/performance.md entries 49-50, 56)
// ncu (entry 47) found the fp32 and half2 kernels issue-bound: 0.32 warp-instructions a weight byte at ~4 warps a
// scheduler, where 3 TB/s leaves room for ~0.15. Here the products and their sums go to the tensor cores
// (mma.sync m16n8k16, fp16 in, fp32 accumulation), with three changes from entry 48's tensor-core kernel (slower
// than the fp32 one, docs/experiments/qgemv-mma2.patch), whose 16-row tiles left the grid unbalanced (QKV: 768
// tiles on 528 blocks, 2 against 1) and whose O and down filled half the SMs:
//   - tiles of 8 rows (4 gate|up pairs for SwiGLU): lane (g, t) (g = lane / 4, t = lane % 4) streams row g of the
//     tile, chunk 4s + t of step s, one 16-byte load a step (the 4 lanes of a row read 64 contiguous bytes);
//   - the grid is the blocks resident at once (32 warps a SM at <= 64 registers: 4 blocks of 8 warps or 2 of 16),
//     spread so that every block has the same number of tiles (8 warps: QKV 1536 tiles in 512 blocks of 3; O, down 512
//     of 1; gate|up 2752: 459 of 6); a block's W warps take the steps of each of its tiles in turn (warp w: steps w,
//     w + W, ...). Every block stages and norms the whole input, so 16-warp blocks halve that per warp (entry 51:
//     launch_tc's rule picks them for the matrices with steps enough for every warp);
//   - kQTDepth steps in flight a lane (registers), each buffer reloaded once it is consumed; with PDL's preload the
//     first kQTDepth before griddepcontrol.wait;
//   - (entry 50) a lane's row offsets are set once a tile and its chunk advanced by a constant a step, and each owner
//     lane reads its B values of a step in one (int8) or two (int4) 16-byte loads from xs_put's chunk-major slots.
// Operands: the weights are A, each 32-bit word made exact fp16 integers in registers (int4 v - 8: lop3 magic and
// one HSUB2/HFMA2 a pair; int8 q: prmt magic and one HSUB2), all 8 of a lane's A values from its own row: k slots
// (2t, 2t+1, 2t+8, 2t+9) of A's row g hold inputs (0,4)(2,6) of the word (int8: (0,2)(4,6) of a word pair) and those
// of A's row g + 8 inputs (1,5)(3,7) ((1,3)(5,7)). The input is B, and B's columns keep the lanes apart: column 2t
// holds the input of lane t's chunk in the k slots of row g's values, column 2t + 1 in those of row g + 8's (the
// owner lanes g = 2t + h; zero elsewhere), so C[g][2t] + C[g + 8][2t + 1] (lane (g, t)'s c0 + c3) is the dot product
// of its word with its inputs: exact products summed in fp32 (lane mapping emulated against float64 before the GPU).
// Each step's dot is scaled in fp32 per chunk (int4 acc += s * D + (minv + 8 s) * sum(x), int8 acc += s * D); a
// warp's 4 lanes of a row are summed by two butterflies, the warps' sums of a tile in shared memory, and after the
// block's last tile each row is the W warps' sums in warp order, then the epilogue (qpair_out). Every sum is in a
// fixed order given the shape and the grid: every replay gives the same bits.
constexpr int kQTDepth = 4;  // steps in flight a lane

__device__ __forceinline__ void mma_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned h2_bits(__half2 v) { return *reinterpret_cast<const unsigned *>(&v); }
__device__ __forceinline__ __half2 bits_h2(unsigned v) { return *reinterpret_cast<const __half2 *>(&v); }

// One 32-bit word of q as exact fp16 integer pairs: int4 v - 8 of inputs (0,4) (1,5) (2,6) (3,7) into q[0..3];
// int8 q of inputs (0,2) (1,3) into q[0..1].
template <int QM>
__device__ __forceinline__ void unpack_tc(unsigned w, unsigned (&q)[QM == 4 ? 4 : 2]) {
    if constexpr (QM == 4) {
        const unsigned hi = w >> 8;
        // (1024 + v) - 1032 and (1024 + 16 v) / 16 - 72: both v - 8, exact
        const __half2 b1032 = __half2half2(__ushort_as_half(0x6408));
        const __half2 k16 = __floats2half2_rn(0.0625f, 0.0625f), b72 = __floats2half2_rn(-72.f, -72.f);
        q[0] = h2_bits(__hsub2(bits_h2(lop_or(w, 0x000F000Fu, 0x64006400u)), b1032));
        q[1] = h2_bits(__hfma2(bits_h2(lop_or(w, 0x00F000F0u, 0x64006400u)), k16, b72));
        q[2] = h2_bits(__hsub2(bits_h2(lop_or(hi, 0x000F000Fu, 0x64006400u)), b1032));
        q[3] = h2_bits(__hfma2(bits_h2(lop_or(hi, 0x00F000F0u, 0x64006400u)), k16, b72));
    } else {  // int8 -> uint8 + 128 by the sign bit; (1024 + 128 + q) - 1152 = q, exact
        const unsigned u = w ^ 0x80808080u;
        const __half2 b1152 = __half2half2(__ushort_as_half(0x6480));
        q[0] = h2_bits(__hsub2(bits_h2(__byte_perm(u, 0x64u, 0x4240)), b1152));
        q[1] = h2_bits(__hsub2(bits_h2(__byte_perm(u, 0x64u, 0x4341)), b1152));
    }
}

struct QTStep {  // one step of a lane: its 16-byte chunk and the chunk's group scale (and int4 minimum)
    uint4 w;
    float s, m;
};

template <int MODE, bool NORM, int QM, int W>  // W: warps a block, 8 or 16 (32 / W blocks a SM at <= 64 registers)
__global__ void __launch_bounds__(W * kWarp, 32 / W) qgemv_tc_kernel(QGemvArgs a) {
    static_assert(W == 8 || W == 16, "the tensor-core kernel's blocks: 8 or 16 warps");
    constexpr int kQTWarps = W, kQTPart = W * 8;  // fp32 partial sums a tile: W warps x 8 rows
    using T = half;
    constexpr int KPC = QTraits<QM>::kpc, VPC = QTraits<QM>::vpc, D = kQTDepth;
    extern __shared__ uint4 xs[];  // K / 8 vectors (xperm<5|9>'d, at xs_put's slots), int4's chunk sums, the partials
    __shared__ __align__(16) float red[kWarp];
    __shared__ uint4 bx0[2];  // the B words of the lanes that own no column (zeros)
    const int nchunk = a.K / KPC, ng = a.K / a.group;
    float *xsum = reinterpret_cast<float *>(xs + a.K / 8);
    float *part = xsum + (QM == 4 ? nchunk : 0);  // [tile of this block][warp][8 rows]
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int g = lane >> 2, t = lane & 3, h = g & 1;
    const bool owner = (g >> 1) == t;  // holds B's column g = 2t + h
    const uint4 *Q = reinterpret_cast<const uint4 *>(a.q);  // row r starts at chunk r * nchunk
    const int ntiles = MODE == kGemvSwiglu ? (a.N + 3) / 4 : (a.N + 7) / 8;
    const int nsteps = (nchunk + 3) / 4;
    const int per_warp = warp < nsteps ? (nsteps - warp + kQTWarps - 1) / kQTWarps : 0;  // a tile's steps, this warp
    const int my_tiles = (int)blockIdx.x < ntiles ? (ntiles - (int)blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    const int nitem = my_tiles * per_warp;
    const uint64_t pol = l2_policy(true);

    auto row_of = [&](int j) {  // this lane's row in the block's tile j (< 0: past the matrix)
        const int tile = blockIdx.x + j * gridDim.x;
        if (MODE == kGemvSwiglu) {
            const int p = 4 * tile + (g & 3);
            return p < a.N ? (g < 4 ? p : p + a.N) : -1;
        }
        const int r = 8 * tile + g;
        return r < a.N ? r : -1;
    };
    // a chunk's group: no integer division in the loop (the group a power of two of chunks, or one group a row)
    const int cpg = a.group / KPC, gsh = (cpg & (cpg - 1)) == 0 ? __ffs(cpg) - 1 : -1;
    auto group_of = [&](int c) { return ng == 1 ? 0 : gsh >= 0 ? c >> gsh : c / cpg; };
    // The load cursor: the block's tile lj, the warp's step ls of it, this lane's chunk lc of its row there; the row's
    // first chunk (lq) and group (lg) are set once a tile (lrow: the row is in the matrix), a step adds 4 W chunks.
    const int c0 = 4 * warp + t;
    int lj = 0, ls = 0, lc = c0, lq = 0, lg = 0;
    bool lrow = false;
    auto tile_rows = [&]() {
        const int r = lj < my_tiles ? row_of(lj) : -1;
        lrow = r >= 0;
        lq = lrow ? r * nchunk : 0;  // < 2^31: checked by the launcher
        lg = lrow ? r * ng : 0;
        lc = c0;
    };
    tile_rows();
    auto load_next = [&](QTStep &b) {
        if (per_warp == 0 || lj >= my_tiles) return;
        // every lane loads (no branch): past the row or the matrix, chunk 0 and group 0, and a zero scale and
        // minimum make that step's term 0 (its weights are finite integers, its B zero or finite)
        const bool in = lrow && lc < nchunk;
        const int qi = in ? lq + lc : 0, gi = in ? lg + group_of(lc) : 0;
        b.w = ld_stream(Q + qi, pol);
        const float sv = ld_half(a.scale, gi);
        b.s = in ? sv : 0.f;
        if constexpr (QM == 4) {
            const float mv = ld_half(a.minv, gi);
            b.m = in ? mv : 0.f;
        }
        lc += 4 * kQTWarps;
        if (++ls == per_warp) {
            ls = 0;
            ++lj;
            tile_rows();
        }
    };

    QTStep buf[D];
    ktrace(a.trace, 0);
    if (a.preload) {  // read-only weights: before the wait
#pragma unroll
        for (int d = 0; d < D; ++d) load_next(buf[d]);
    }
    pdl_trigger();
    pdl_wait();
    ktrace(a.trace, 1);
    if (!a.preload) {
#pragma unroll
        for (int d = 0; d < D; ++d) load_next(buf[d]);
    }
    for (int k = threadIdx.x; k < my_tiles * kQTPart; k += blockDim.x) part[k] = 0.f;  // before qstage's barrier
    if (threadIdx.x < 2) bx0[threadIdx.x] = make_uint4(0, 0, 0, 0);
    qstage<T, NORM, QM, QM == 4 ? 5 : 9>(a, xs, xsum, red);
    ktrace_mark(a.trace, 8);  // the input staged (this block's thread 0)

    float acc = 0.f;  // this lane's chunks of its row, over the warp's steps of the current tile
    int rj = 0, rs = 0, rc = c0;  // the step being computed: tile rj, step rs, this lane's chunk rc
    auto run = [&](QTStep &cur) {
        // B: the owner's half h of the input of chunk rc (lane t's): VPC 8-byte words, one per mma, in 16-byte loads
        // (every lane loads, no branch: the others read 32 zero bytes, bx0)
        const bool bx = owner && rc < nchunk;
        const uint4 *xb = bx ? xs + rc * VPC + h * (VPC / 2) : bx0;
        float cc[4] = {0.f, 0.f, 0.f, 0.f};
        const unsigned ws[4] = {cur.w.x, cur.w.y, cur.w.z, cur.w.w};
        if constexpr (QM == 4) {
            const uint4 b01 = xb[0], b23 = xb[1];
            const unsigned bs[8] = {b01.x, b01.y, b01.z, b01.w, b23.x, b23.y, b23.z, b23.w};
#pragma unroll
            for (int d = 0; d < 4; ++d) {  // word d: inputs 8d .. 8d + 7 of the chunk
                unsigned q[4];
                unpack_tc<4>(ws[d], q);
                mma_16816(cc, q[0], q[1], q[2], q[3], bs[2 * d], bs[2 * d + 1]);
            }
        } else {
            const uint4 b = xb[0];
            const unsigned bs[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int d = 0; d < 2; ++d) {  // words 2d, 2d + 1: inputs 8d .. 8d + 7 of the chunk
                unsigned q0[2], q1[2];
                unpack_tc<8>(ws[2 * d], q0);
                unpack_tc<8>(ws[2 * d + 1], q1);
                mma_16816(cc, q0[0], q0[1], q1[0], q1[1], bs[2 * d], bs[2 * d + 1]);
            }
        }
        const float dot = cc[0] + cc[3];
        const int cx = min(rc, nchunk - 1);
        rc += 4 * kQTWarps;
        // dot: sum((v - 8) x) (int4) or sum(q x) (int8)
        if constexpr (QM == 4) acc += fmaf(cur.s, dot, fmaf(8.f, cur.s, cur.m) * xsum[cx]);
        else acc += cur.s * dot;
        load_next(cur);  // the buffer is free: the step D ahead
        if (++rs != per_warp) return;  // the warp's last step of the tile: its sums of the tile's 8 rows
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        if (t == 0) part[(rj * kQTWarps + warp) * 8 + g] = acc;
        acc = 0.f;
        rs = 0;
        rc = c0;
        ++rj;
    };
    for (int i = 0; i < nitem; i += D) {
#pragma unroll
        for (int d = 0; d < D; ++d)
            if (i + d < nitem) run(buf[d]);
    }
    __syncthreads();
    ktrace_mark(a.trace, 9);  // every warp's steps done

    // the block's rows: the W warps' sums in warp order, then the epilogue
    float best = -INFINITY;  // kGemvF32: this thread's largest stored logit and its row
    int best_row = kNoIndex;
    for (int k = threadIdx.x; k < my_tiles * 8; k += blockDim.x) {
        const int j = k / 8, r = k % 8, tile = blockIdx.x + j * gridDim.x;
        const float *pj = part + j * kQTPart;
        auto sum_of = [&](int rr) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < kQTWarps; ++w) v += pj[w * 8 + rr];
            return v;
        };
        if constexpr (MODE == kGemvSwiglu) {
            const int p = 4 * tile + r;
            if (r < 4 && p < a.N) qpair_out<T, MODE>(a, p, p + a.N, sum_of(r), sum_of(r + 4), best, best_row);
        } else {
            const int row = 8 * tile + r;
            if (row < a.N) qpair_out<T, MODE>(a, row, -1, sum_of(r), 0.f, best, best_row);
        }
    }
    if constexpr (MODE == kGemvF32) {
        if (a.amax_part) {
            block_argmax_pick(best, best_row);
            if (threadIdx.x == 0) a.amax_part[blockIdx.x] = make_int2(__float_as_int(best), best_row);
        }
    }
    ktrace_end(a.trace);
}

static_assert(sizeof(QGemvArgs) <= 128, "qgemv's kernel parameter: at most 128 bytes (ops.h GemvArgs)");

static size_t qsmem(int K, int qmode) { return (size_t)K * 2 + (size_t)K / (qmode == 4 ? 32 : 16) * 4; }

// Which kernel fp16 models use (bf16 always takes the fp32 one): CASE4_QGEMV, read once by qgemv_init.
//   auto (or unset, the default), or tc: the tensor-core kernel for both modes. Measured side by side on one H100
//     (docs/performance.md entries 50 and 56): 7B int4 G128 2.092 ms/token against the fp32 kernel's 2.502 (entry 50);
//     int8 with the branchless loop 2.656 against the fp32 kernel's 2.962 (entry 56; before that loop tc's int8 was
//     the slower, 3.091 against 2.959, and auto kept int8 on the fp32 kernel); on every test of
//     tests/gpu/test_quant_kernels.py (the real SmolLM2 GGUF's included) both pass, and the tensor-core kernel's
//     rounding is the fp32 kernel's (exact integer products, fp32 sums).
//   f32: the fp32 kernel for both modes.
//   h2: the half2 kernel (opt-in since entry 47: its fp16 partial sums moved one teacher-forced argmax in 256 on the
//     real SmolLM2 GGUF by more than an fp16 near-tie, the GPU test's bound).
enum QKernel { kQTc, kQF32, kQH2 };  // auto and tc: kQTc
static QKernel q_kernel = kQTc;
static int q_sms = 0;  // the device's SMs (qgemv_init)
// The half2 kernel's grid: at most the blocks resident at once (occupancy x SMs; 2 a SM at its ~100 registers),
// below the plan's max_blocks (4 a SM, the fp16 gemv's), so that no second wave of blocks stages and norms the
// input again behind the first. CASE4_QGEMV_GRID=x4 keeps max_blocks (the A/B of entry 47: resident was 2 % faster
// on the 7B int4 step, equal on int8; the outputs are the same bits, a row being one warp's sum either way). The
// fp32 kernel (bf16 models) keeps max_blocks: not measured.
static bool q_grid_resident = true;
// The tensor-core kernel's warps a block: CASE4_QGEMV_TCW=auto (0: the launcher's rule, entry 51), 8 or 16 (A/B).
static int q_tc_warps = 0;

template <typename K>
static void set_smem(K k) {
    CASE4_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, q_smem_limit));
}
template <typename T, int MODE, int QM>
static void set_attr_q() {
    set_smem(qgemv_kernel<T, MODE, false, QM>);
    set_smem(qgemv_kernel<T, MODE, true, QM>);
    if constexpr (std::is_same_v<T, half>) {
        set_smem(qgemv_h2_kernel<MODE, false, QM>);
        set_smem(qgemv_h2_kernel<MODE, true, QM>);
        set_smem(qgemv_tc_kernel<MODE, false, QM, 8>);
        set_smem(qgemv_tc_kernel<MODE, true, QM, 8>);
        set_smem(qgemv_tc_kernel<MODE, false, QM, 16>);
        set_smem(qgemv_tc_kernel<MODE, true, QM, 16>);
    }
}
template <typename T, int QM>
static void init_q() {
    set_attr_q<T, kGemvStore, QM>(); set_attr_q<T, kGemvResid, QM>();
    set_attr_q<T, kGemvSwiglu, QM>(); set_attr_q<T, kGemvF32, QM>();
}
void qgemv_init(int dtype) {  // once per device and dtype (the Engines and the test binding call it)
    static std::mutex mu;
    static std::set<std::pair<int, int>> done;
    const std::lock_guard<std::mutex> lock(mu);
    int dev = 0, optin = 0;
    CASE4_CUDA_CHECK(cudaGetDevice(&dev));
    if (done.count({dev, dtype})) return;
    CASE4_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    // the kernel's static shared memory (the reduction scratch and block_argmax_pick's) comes on top
    q_smem_limit = std::min(kQMaxSmem, optin - 1024);
    const char *v = std::getenv("CASE4_QGEMV");
    const std::string which = v ? v : "";
    if (which == "" || which == "auto" || which == "tc") q_kernel = kQTc;
    else if (which == "f32") q_kernel = kQF32;
    else if (which == "h2") q_kernel = kQH2;
    else throw BadArgument("CASE4_QGEMV must be auto, f32, h2 or tc, got '" + which + "'");
    const char *gv = std::getenv("CASE4_QGEMV_GRID");
    const std::string grid = gv ? gv : "";
    if (grid != "" && grid != "resident" && grid != "x4")
        throw BadArgument("CASE4_QGEMV_GRID must be resident or x4, got '" + grid + "'");
    q_grid_resident = grid != "x4";
    const char *wv = std::getenv("CASE4_QGEMV_TCW");
    const std::string tcw = wv ? wv : "";
    if (tcw != "" && tcw != "auto" && tcw != "8" && tcw != "16")
        throw BadArgument("CASE4_QGEMV_TCW must be auto, 8 or 16, got '" + tcw + "'");
    q_tc_warps = tcw == "8" ? 8 : tcw == "16" ? 16 : 0;
    CASE4_CUDA_CHECK(cudaDeviceGetAttribute(&q_sms, cudaDevAttrMultiProcessorCount, dev));
    if (dtype == kF16) { init_q<half, 8>(); init_q<half, 4>(); }
    else { init_q<__nv_bfloat16, 8>(); init_q<__nv_bfloat16, 4>(); }
    done.insert({dev, dtype});
}

// the checks every launcher shares: what the kernel's layout needs (one line each; also Plan::validate's)
void check_quant(const QuantMat &m, int N, int K, const char *who) {
    auto need = [&](bool c, const std::string &what) {
        if (!c) throw BadArgument(std::string(who) + ": " + what);
    };
    need(m.mode == 8 || m.mode == 4, "quant mode must be int8 (8) or int4 (4)");
    need(m.q && m.scale && (m.mode == 8 || m.minv), "quantized matrix pointer missing");
    const int kpc = m.mode == 4 ? 32 : 16;
    need(N > 0 && K > 0 && K % kpc == 0, "K must be a multiple of " + std::to_string(kpc) + " for " +
                                             (m.mode == 4 ? "int4" : "int8") + ", got " + std::to_string(K));
    need(m.group > 0 && K % m.group == 0 && m.group % kpc == 0,
         "group size " + std::to_string(m.group) + " must divide K = " + std::to_string(K) + " and be a multiple of " +
             std::to_string(kpc));
    need(reinterpret_cast<uintptr_t>(m.q) % 16 == 0, "quantized weights must be 16-byte aligned");
}

// blocks of `kernel` (`threads` a block) resident on one SM with `smem` bytes of dynamic shared memory (cached: the
// occupancy query is a driver call, and eager decode launches every step)
template <typename K>
static int resident_per_sm(K kernel, size_t smem, int threads = kQWarps * kWarp) {
    static std::mutex mu;
    static std::map<std::pair<const void *, size_t>, int> cache;
    const std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_pair(reinterpret_cast<const void *>(kernel), smem);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    int per_sm = 0;
    CASE4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    cache[key] = per_sm;
    return per_sm;
}

// the tensor-core kernel with W warps a block: tiles of 8 rows (4 SwiGLU pairs), the same number a block, the grid at
// most the blocks resident at once
template <int MODE, int QM, int W>
static int launch_tc(const QGemvArgs &a, const Launch &L, size_t smem, int ntiles) {
    auto kernel = a.norm_w ? qgemv_tc_kernel<MODE, true, QM, W> : qgemv_tc_kernel<MODE, false, QM, W>;
    const size_t per_tile = (size_t)W * 8 * 4;  // a block's fp32 partial sums of one tile
    auto smem_for = [&](int blocks) { return smem + (size_t)((ntiles + blocks - 1) / blocks) * per_tile; };
    if (smem + per_tile > (size_t)q_smem_limit) throw BadArgument("qgemv: K too large for shared memory");
    // At least the blocks whose partial sums fit in shared memory, above a small max_blocks if need be (a grid cap of
    // 7 gave a SwiGLU 11008 x 4096 block 394 tiles, 201 KB of partials at 16 warps): not another kernel or another W,
    // whose sums would differ in the last bits (a row's sum depends on W, not on the grid).
    const int max_tiles = (int)(((size_t)q_smem_limit - smem) / per_tile);
    const int min_grid = (ntiles + max_tiles - 1) / max_tiles;
    int tgrid = std::max(a.max_blocks > 0 ? std::min(ntiles, a.max_blocks) : ntiles, min_grid);
    const int per_sm = resident_per_sm(kernel, smem_for(tgrid), W * kWarp);
    if (per_sm > 0) tgrid = std::max(std::min(tgrid, per_sm * q_sms), min_grid);
    const int per_block = (ntiles + tgrid - 1) / tgrid;
    tgrid = (ntiles + per_block - 1) / per_block;  // the fewest blocks with that many tiles each (<= max_tiles: fits)
    launch_pdl(L, kernel, dim3(tgrid), dim3(W * kWarp), smem_for(tgrid), a);
    return tgrid;
}

template <typename T, int MODE, int QM>
static int launch_q3(const QGemvArgs &a, const Launch &L) {
    const int pairs = MODE == kGemvSwiglu ? a.N : (a.N + 1) / 2;
    const int groups = (pairs + kQWarps - 1) / kQWarps;
    int grid = a.max_blocks > 0 && groups > a.max_blocks ? a.max_blocks : groups;
    const size_t smem = qsmem(a.K, QM);
    if constexpr (std::is_same_v<T, half>) {
        // the tensor-core kernel indexes a row's chunks from r * nchunk in 32 bits: larger matrices take the fp32 one
        const long long chunks = (long long)(MODE == kGemvSwiglu ? 2 * a.N : a.N) * (a.K / QTraits<QM>::kpc);
        if (q_kernel == kQTc && chunks < (1LL << 31)) {
            // blocks of 16 warps stage the input once for twice the warps (entry 51): where every warp of such a block
            // has steps in each tile (nsteps >= 16) and a warp of 8-warp blocks would have >= 8 steps in all; else 8
            const int ntiles = MODE == kGemvSwiglu ? (a.N + 3) / 4 : (a.N + 7) / 8;
            const int nsteps = (a.K / QTraits<QM>::kpc + 3) / 4;
            const int items8 = (ntiles + 4 * q_sms - 1) / (4 * q_sms) * ((nsteps + 7) / 8);
            const bool w16 = q_tc_warps == 16 || (q_tc_warps == 0 && nsteps >= 16 && items8 >= 8);
            return w16 ? launch_tc<MODE, QM, 16>(a, L, smem, ntiles) : launch_tc<MODE, QM, 8>(a, L, smem, ntiles);
        }
        if (q_kernel == kQH2) {
            auto kernel = a.norm_w ? qgemv_h2_kernel<MODE, true, QM> : qgemv_h2_kernel<MODE, false, QM>;
            if (q_grid_resident) {
                const int per_sm = resident_per_sm(kernel, smem);
                if (per_sm > 0) grid = std::min(grid, per_sm * q_sms);
            }
            launch_pdl(L, kernel, dim3(grid), dim3(kQWarps * kWarp), smem, a);
            return grid;
        }
    }
    if (a.norm_w) launch_pdl(L, qgemv_kernel<T, MODE, true, QM>, grid, kQWarps * kWarp, smem, a);
    else launch_pdl(L, qgemv_kernel<T, MODE, false, QM>, grid, kQWarps * kWarp, smem, a);
    return grid;
}
template <typename T, int QM>
static int launch_q2(const QGemvArgs &a, const Launch &L) {
    switch (a.mode) {
        case kGemvStore: return launch_q3<T, kGemvStore, QM>(a, L);
        case kGemvResid: return launch_q3<T, kGemvResid, QM>(a, L);
        case kGemvSwiglu: return launch_q3<T, kGemvSwiglu, QM>(a, L);
        case kGemvF32: return launch_q3<T, kGemvF32, QM>(a, L);
        default: throw std::runtime_error("qgemv: bad mode");
    }
}

int launch_qgemv(const QGemvArgs &args, int dtype, const Launch &L) {
    if (args.bias && args.mode != kGemvStore) throw BadArgument("qgemv: a bias is for the store mode (QKV)");
    QuantMat m;
    m.q = args.q; m.scale = args.scale; m.minv = args.minv; m.mode = args.qmode; m.group = args.group;
    check_quant(m, args.N, args.K, "qgemv");
    if (qsmem(args.K, args.qmode) > (size_t)q_smem_limit) throw BadArgument("qgemv: K too large for shared memory");
    if (args.amax_part && args.mode != kGemvF32) throw BadArgument("qgemv: amax_part needs the fp32 logits mode");
    QGemvArgs a = args;
    a.preload = L.pdl == kPdlPreload ? 1 : 0;
    a.trace = L.slot("qgemv%d m%d N %d", args.qmode, args.mode, args.N);
    if (dtype == kF16) return a.qmode == 4 ? launch_q2<half, 4>(a, L) : launch_q2<half, 8>(a, L);
    return a.qmode == 4 ? launch_q2<__nv_bfloat16, 4>(a, L) : launch_q2<__nv_bfloat16, 8>(a, L);
}

// ---- dequantization into the model dtype (prefill's per-matrix scratch): memory-bound, 16.7 GB moved per 7B
// int4 prefill (3.5 read, 13.2 written), so the stores must coalesce. One thread writes one 16-byte vector of
// outputs (8 inputs of a row, inside one group): int4 reads the one word that holds them, int8 two; consecutive
// lanes write consecutive vectors (a warp: 512 contiguous bytes). Two vectors a thread per pass (loads first).
// unpack_word + fmaf/mul, as the gemv: the values are the layout's dequantization rounded once (bitwise tested).
// H200, 7B matrices (bench/dequant_rate.py, docs/performance.md entry 44): 0.64-0.89 of the copy rate, against
// 0.38-0.65 for the previous kernel (one thread per 16-byte chunk of q, its outputs 32/64 bytes apart across lanes).
template <int QM> struct DqWord;
template <> struct DqWord<4> { using W = unsigned; };
template <> struct DqWord<8> { using W = uint2; };

template <typename T, int QM>
__device__ __forceinline__ uint4 dq_vec(typename DqWord<QM>::W w, float s, float mn) {
    float v[8];
    if constexpr (QM == 4) {
        unpack_word<4>(w, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = fmaf(v[e], s, mn);
    } else {
        unpack_word<8>(w.x, reinterpret_cast<float (&)[4]>(v[0]));
        unpack_word<8>(w.y, reinterpret_cast<float (&)[4]>(v[4]));
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] *= s;
    }
    return pack8<T>(v);
}

template <typename T, int QM>
__global__ void dequant_kernel(const typename DqWord<QM>::W *__restrict__ q, const void *scale, const void *minv,
                               unsigned total, unsigned per_row, int ng, int group, uint4 *__restrict__ out) {
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned o0 = blockIdx.x * blockDim.x + threadIdx.x; o0 < total; o0 += 2 * stride) {
        const unsigned o1 = o0 + stride;
        const bool has1 = o1 < total;  // total < 2^31 (dequant_as): o0 + stride cannot wrap
        const typename DqWord<QM>::W w0 = __ldg(q + o0), w1 = has1 ? __ldg(q + o1) : typename DqWord<QM>::W{};
        const unsigned r0 = o0 / per_row, r1 = o1 / per_row;
        const size_t g0 = (size_t)r0 * ng + (o0 - r0 * per_row) * 8 / group;
        const size_t g1 = (size_t)r1 * ng + (o1 - r1 * per_row) * 8 / group;
        const float s0 = ld_half(scale, g0), m0 = QM == 4 ? ld_half(minv, g0) : 0.f;
        out[o0] = dq_vec<T, QM>(w0, s0, m0);
        if (has1) {
            const float s1 = ld_half(scale, g1), m1 = QM == 4 ? ld_half(minv, g1) : 0.f;
            out[o1] = dq_vec<T, QM>(w1, s1, m1);
        }
    }
}

template <typename T, int QM>
static void dequant_as(const QuantMat &m, int N, int K, uint4 *o, cudaStream_t st) {
    const int block = 256;
    const size_t total = (size_t)N * (K / 8);
    if (total >= (size_t)1 << 31) throw BadArgument("dequant: matrix too large (" + std::to_string(total) + " vectors)");
    const int grid = (int)std::min<size_t>((total + 2 * block - 1) / (2 * block), 132 * 16);
    dequant_kernel<T, QM><<<grid, block, 0, st>>>(reinterpret_cast<const typename DqWord<QM>::W *>(m.q), m.scale,
                                                  m.minv, (unsigned)total, (unsigned)(K / 8), K / m.group, m.group, o);
}

void launch_dequant(const QuantMat &m, int N, int K, void *out, int dtype, cudaStream_t st) {
    check_quant(m, N, K, "dequant");
    if (reinterpret_cast<uintptr_t>(out) % 16 != 0) throw BadArgument("dequant: output must be 16-byte aligned");
    uint4 *o = reinterpret_cast<uint4 *>(out);
    if (dtype == kF16) {
        if (m.mode == 4) dequant_as<half, 4>(m, N, K, o, st);
        else dequant_as<half, 8>(m, N, K, o, st);
    } else {
        if (m.mode == 4) dequant_as<__nv_bfloat16, 4>(m, N, K, o, st);
        else dequant_as<__nv_bfloat16, 8>(m, N, K, o, st);
    }
    CASE4_LAUNCH_CHECK();
}

}  // namespace case4
