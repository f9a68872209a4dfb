// gemv.cu -- y = W x for batch-1 decode, fp16/bf16 weights, fp32 accumulation.
//
// Layout: W is [N, K] row-major (nn.Linear weight), K % 8 == 0 (16-byte rows).
// Work split: one warp per output row (per row pair for SwiGLU), each lane streams
// 16-byte vectors of the row with kUnroll independent loads in flight; the grid loops over
// rows (persistent-ish grid; row mapping in gemv_kernel). Blocks of 8 warps, or of 16 when no warp
// has more than one row (kGemvWarpsOneRow).
// The input vector sits in shared memory, staged once per block (as T, or as fp32 for the small
// normed kernels: F32X in gemv_kernel). Fused prologue:
// optional embedding-row gather and RMSNorm (each block recomputes the sum of squares:
// K elements from L2, negligible next to the weights). Fused epilogues: store, residual
// add in place, SwiGLU over the gate|up halves, fp32 logits.
// Critical path after griddepcontrol.wait: one L2 round trip to stage the input, the norm's block
// reduction, the dot products, the store. Everything that does not depend on the previous kernel
// is issued before the wait: each warp's first weight chunk (registers) and the norm weights
// (cp.async into shared memory); the residual of a warp's first row is read right after the
// wait, with the input.
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace case4 {

// Warps per block. A kernel whose rows give each warp at most one (N <= max_blocks * 8: SmolLM2's
// QKV, O, gate|up, down; Llama-2-7B's O and down) runs blocks of 16 warps instead of 8 -- half the
// blocks, on half the SMs, each warp's work unchanged. Measured (H100, docs/performance.md log entry 28):
// SmolLM2 -1.5 to -3 %, 7B -1.1 % per token; 12, 24 or 32 warps, or 16 for only some of the kernels,
// were slower. Kernels with several rows per warp (lm_head, 7B's QKV and gate|up) keep 8.
constexpr int kGemvWarps = 8;
constexpr int kGemvWarpsOneRow = 16;
constexpr int kUnrollSmall = 4;  // 16-byte loads in flight per lane per row (K <= 1024, and SwiGLU)
constexpr int kUnrollLarge = 8;  // K > 1024: fewer dependent round trips per row
constexpr int kGemvMaxSmem = 96 * 1024;

// 8 loads per lane once a row has more than 4 vectors per lane: the whole row of K <= 2048 (e.g. SmolLM2's
// down, K = 1536) is then in registers before the wait, none after it
static bool unroll_large(int K) { return K > kWarp * kUnrollSmall * 8; }
// With 8-warp blocks no warp would have more than one row: such kernels run kGemvWarpsOneRow-warp blocks
static bool one_row_per_warp(int N, int max_blocks) {
    return max_blocks <= 0 || (N + kGemvWarps - 1) / kGemvWarps <= max_blocks;
}

// 8 products of one 16-byte weight vector with the input's vector i, summed in a fixed order. The
// staged input `xs` is T (uint4 vectors), or with F32X fp32 holding exactly the same values: vector i
// is then xs[i] (values 0-3) and xs[nvec + i] (values 4-7) as float4, so a warp's reads of
// consecutive vectors stay contiguous (no bank conflicts), and a row converts only its weights.
template <typename T, bool F32X>
__device__ __forceinline__ float dot8(const uint4 &w, const uint4 *xs, int nvec, int i) {
    float wf[8], xf[8];
    unpack8<T>(w, wf);
    if constexpr (F32X) {
        const float4 *x4 = reinterpret_cast<const float4 *>(xs);
        const float4 lo = x4[i], hi = x4[nvec + i];
        xf[0] = lo.x; xf[1] = lo.y; xf[2] = lo.z; xf[3] = lo.w;
        xf[4] = hi.x; xf[5] = hi.y; xf[6] = hi.z; xf[7] = hi.w;
    } else {
        unpack8<T>(xs[i], xf);
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(wf[i], xf[i], s);
    return s;
}

// Load the chunk of a row that starts at vector `base` (kUnroll vectors per lane).
template <int kUnroll>
__device__ __forceinline__ void load_chunk(const uint4 *__restrict__ wrow, int base, int nvec, int lane,
                                           uint4 (&w)[kUnroll], uint64_t pol) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kWarp + lane;
        w[u] = i < nvec ? ld_stream(wrow + i, pol) : make_uint4(0, 0, 0, 0);
    }
}

// Dot product of one weight row with the staged input (whole warp; result in every lane).
// `w` may hold the row's first chunk already (loaded before griddepcontrol.wait).
template <typename T, bool F32X, int kUnroll>
__device__ __forceinline__ float row_dot(const uint4 *__restrict__ wrow, const uint4 *xs, int nvec, int lane,
                                         uint4 (&w)[kUnroll], bool first_loaded, uint64_t pol) {
    float acc = 0.f;
    for (int base = 0; base < nvec; base += kWarp * kUnroll) {
        if (!(first_loaded && base == 0)) load_chunk<kUnroll>(wrow, base, nvec, lane, w, pol);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kWarp + lane;
            if (i < nvec) acc += dot8<T, F32X>(w[u], xs, nvec, i);
        }
    }
    return warp_sum(acc);
}

// two rows at once (gate and up of SwiGLU): twice the loads in flight
template <typename T, bool F32X, int kUnroll>
__device__ __forceinline__ float2 row_dot2(const uint4 *__restrict__ wa, const uint4 *__restrict__ wb,
                                           const uint4 *xs, int nvec, int lane, uint4 (&va)[kUnroll],
                                           uint4 (&vb)[kUnroll], bool first_loaded, uint64_t pol) {
    float a = 0.f, b = 0.f;
    for (int base = 0; base < nvec; base += kWarp * kUnroll) {
        if (!(first_loaded && base == 0)) {
            load_chunk<kUnroll>(wa, base, nvec, lane, va, pol);
            load_chunk<kUnroll>(wb, base, nvec, lane, vb, pol);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kWarp + lane;
            if (i < nvec) {
                a += dot8<T, F32X>(va[u], xs, nvec, i);
                b += dot8<T, F32X>(vb[u], xs, nvec, i);
            }
        }
    }
    return make_float2(warp_sum(a), warp_sum(b));
}

constexpr int kStageVecs = 4;  // input vectors per thread per staging round (loads issued together)

// fp32 input for the small normed kernels (K <= 1024, i.e. kUnrollSmall: QKV, gate|up, lm_head of SmolLM2-sized
// models): one pass over shared memory (the normed vector stored once) and no input converts per row (SmolLM2
// -4.3 %, performance.md log entry 24); with K > 1024 the doubled shared-memory reads cost 7B +1.5 %, and the
// kernels without a norm (one row per warp) were slower. One rule for the kernel (F32X) and the launcher's
// shared-memory size.
__host__ __device__ constexpr bool f32_input(bool norm, int unroll) { return norm && unroll == kUnrollSmall; }

// Fused RoPE (GemvRopeArgs): the row of warp `warp` in block b. Below rope_rows (q and k heads of D
// dims; 16 | D, so a block lies in one head) block k of a head takes dims [8k, 8k + 8) in warps 0-7 and
// their partners d + D/2 in warps 8-15; the v rows keep their order.
static_assert(kGemvWarpsOneRow == 16, "fused RoPE pairs warps w and w ^ 8");
__device__ __forceinline__ int rope_row(int b, int warp, int D, int rope_rows) {
    const int r = b * kGemvWarpsOneRow + warp;
    if (r >= rope_rows) return r;
    const int base = r - r % D, k = r % D / 16;
    return base + 8 * k + (warp & 7) + (warp >= 8 ? D / 2 : 0);
}

// F32X staging (K <= 1024, normed): thread i < nvec loads input vector i (with FO: adds O's fixed-point sums, and
// block 0 writes x + O to x_out), the block sums the squares, and the normed vector goes to shared memory as fp32
// ([2][nvec] float4, dot8). `nws`: the norm weights (cp.async'd before the wait), `red`: NW floats.
// Used by gemv_kernel and lm_small_kernel; the caller's __syncthreads makes xs visible.
template <typename T, int WARPS, bool FO, typename A>
__device__ __forceinline__ void stage_f32_normed(const A &a, const uint4 *xin, uint4 *xs, uint4 *nws, int nvec,
                                                 bool write_resid, float *red) {
    float ss = 0.f;
    // K <= 1024: at most one input vector per thread (nvec <= 128 <= blockDim); it stays in
    // registers through the norm's reduction, then goes to shared memory normed, as fp32:
    // round(w * round(x * inv)), exactly the T value the other path stores
    const int i = threadIdx.x;
    const uint4 v = i < nvec ? xin[i] : make_uint4(0, 0, 0, 0);
    // FO: O's 8 fixed-point sums of vector i (64 bytes) cp.async'd with the input's load (one L2 round trip)
    // into this thread's own slots of shared memory (no registers held across it), read back by it
    uint4 *osum = nws + nvec;
    if constexpr (FO)
        if (i < nvec)
#pragma unroll
            for (int j = 0; j < 4; ++j) cp_async16(osum + 4 * i + j, reinterpret_cast<const uint4 *>(a.o_sum) + 4 * i + j);
    float f[8];
    unpack8<T>(v, f);
    if (FO && i < nvec) {  // x := round(round(O) + x), the residual stream after O
        cp_async_wait_all();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint4 q = osum[4 * i + j];
            f[2 * j] = round_t<T>(round_t<T>(o_unfix(((unsigned long long)q.y << 32) | q.x)) + f[2 * j]);
            f[2 * j + 1] = round_t<T>(round_t<T>(o_unfix(((unsigned long long)q.w << 32) | q.z)) + f[2 * j + 1]);
        }
        if (blockIdx.x == 0) reinterpret_cast<uint4 *>(a.x_out)[i] = pack8<T>(f);  // for down's residual
    }
    if (i < nvec) {
        if (write_resid) reinterpret_cast<uint4 *>(a.x_out)[i] = v;
#pragma unroll
        for (int k = 0; k < 8; ++k) ss = fmaf(f[k], f[k], ss);
    }
    const float inv = rsqrtf(block_sum_once<WARPS>(ss, red) / (float)a.K + a.eps);
    if (i < nvec) {
        cp_async_wait_all();  // this thread's own copies (same i)
        float w[8];
        unpack8<T>(nws[i], w);
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = round_t<T>(w[k] * round_t<T>(f[k] * inv));
        float4 *x4 = reinterpret_cast<float4 *>(xs);
        x4[i] = make_float4(f[0], f[1], f[2], f[3]);
        x4[nvec + i] = make_float4(f[4], f[5], f[6], f[7]);
    }
}

// kGemvF32 with amax_part: the block's argmax of the logits its threads stored (each thread's best, -inf /
// kNoIndex for none) into amax_part[block], for the sampling kernel (whole block)
template <typename T>
__device__ __forceinline__ void amax_tail(const GemvArgs &a, float best, int best_row) {
    block_argmax_pick(best, best_row);
    if (threadIdx.x == 0) a.amax_part[blockIdx.x] = make_int2(__float_as_int(best), best_row);
    // x_out (kGemvF32: the embedding table, [N, K]): the row of this block's argmax towards L2, so that the
    // next step's gather of the winning row hits L2 (lm_head streamed it with evict_first)
    if (a.x_out && best_row != kNoIndex) {
        const size_t bytes = (size_t)a.K * sizeof(T);
        const char *r = reinterpret_cast<const char *>(a.x_out) + (size_t)best_row * bytes;
        const char *l0 = reinterpret_cast<const char *>(reinterpret_cast<uintptr_t>(r) & ~(uintptr_t)127);
        if ((size_t)threadIdx.x * 128 < (size_t)(r - l0) + bytes) prefetch_l2(l0 + (size_t)threadIdx.x * 128);
    }
}

// FO: the kernels after a fused attention + O (AttnArgs::o_parts; parameter GemvFoArgs): gate|up's input is
// x + O from the fixed-point sums (GemvFoArgs::o_sum), down's residual is read from GemvFoArgs::resid and down
// zeroes the sums. A template flag, so that the other kernels' code is unchanged.
// BIAS: the normed QKV of a model with q/k/v biases (parameter GemvBiasArgs): out = round(acc + bias[row]); lane 0
// reads its first row's bias before the wait (a weight), the others' after the dot product. Also a template flag.
template <typename T, int MODE, bool NORM, int U, int WARPS, bool ROPE = false, bool FO = false, bool BIAS = false>
__global__ void __launch_bounds__(WARPS * kWarp, 4 * kGemvWarps / WARPS)  // <= 64 registers
    gemv_kernel(std::conditional_t<ROPE, GemvRopeArgs,
                                   std::conditional_t<FO, GemvFoArgs,
                                                      std::conditional_t<BIAS, GemvBiasArgs, GemvArgs>>> a) {
    static_assert(!ROPE || (MODE == kGemvStore && WARPS == kGemvWarpsOneRow), "fused RoPE: QKV in 16-warp blocks");
    static_assert(!FO || (MODE == kGemvSwiglu && NORM && U == kUnrollSmall) || (MODE == kGemvResid && !NORM),
                  "O's sums: gate|up (normed, K <= 1024); separate residual: down");
    static_assert(!BIAS || (MODE == kGemvStore && NORM && !ROPE && !FO),
                  "bias: the normed QKV store (RoPE in attention)");
    // the (normed) input: K/8 vectors of T, or with F32X K fp32 values ([2][K/8] float4, dot8); with NORM,
    // then K/8 vectors of the norm weights
    extern __shared__ uint4 xs[];
    __shared__ __align__(16) float red[kWarp];
    constexpr int UR = MODE == kGemvSwiglu ? kUnrollSmall : U;  // loads per lane per row and chunk
    constexpr bool F32X = f32_input(NORM, U);  // the input staged as fp32 (f32_input)
    const int nvec = a.K / 8;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const uint4 *W = reinterpret_cast<const uint4 *>(a.W);
    // Row mapping. One row per warp (N <= grid * WARPS, e.g. O and down, N = 4096 over 256 blocks):
    // a block's warps take consecutive rows (row = block * WARPS + warp: neighbouring DRAM pages).
    // Several rows per warp (QKV, gate|up, lm_head): rows go round-robin over the blocks first
    // (row = warp * grid + block) so every SM gets the same number of rows (+-1) even when N is
    // not a multiple of the grid's warps.
    // a block without rows exits at once, before the trigger (the launcher's grids have none; performance.md log
    // entry 33: builds with this check ran the SmolLM2 step 0.5-1 % faster than without, for reasons not found)
    if constexpr (WARPS == kGemvWarpsOneRow)
        if ((int)blockIdx.x * WARPS >= a.N) return;
    const bool one_row = (long long)gridDim.x * WARPS >= a.N;
    int row0 = one_row ? blockIdx.x * WARPS + warp : warp * gridDim.x + blockIdx.x;
    if constexpr (ROPE) row0 = rope_row(blockIdx.x, warp, a.rope_d, a.rope_rows);  // one row per warp (launcher)
    const int stride = gridDim.x * WARPS;

    // ---- the first chunk of each warp's first row goes into registers before the input is
    // staged, so the weight stream is in flight during the prologue; with a.prefetch == 2 it is
    // issued even before griddepcontrol.wait (only read-only weights are touched there)
    uint4 wa[UR], wb[UR];
    ktrace(a.trace, 0);
    const bool first_loaded = row0 < a.N;
    const uint64_t pol = l2_policy(true);
    const bool pre = a.prefetch == 2 && (int)blockIdx.x * 8 < (int)gridDim.x * a.pre_eighths;
    if (pre && first_loaded) {
        load_chunk<UR>(W + (size_t)row0 * nvec, 0, nvec, lane, wa, pol);
        if (MODE == kGemvSwiglu) load_chunk<UR>(W + (size_t)(row0 + a.N) * nvec, 0, nvec, lane, wb, pol);
    } else if (a.prefetch == 1 && first_loaded) {  // or just towards L2
        for (int i = lane * 4; i < nvec; i += kWarp * 4) {  // one 64-byte prefetch per 4 vectors
            prefetch_l2(W + (size_t)row0 * nvec + i);
            if (MODE == kGemvSwiglu) prefetch_l2(W + (size_t)(row0 + a.N) * nvec + i);
        }
    }
    uint4 *nws = xs + nvec * (F32X ? 2 : 1);  // norm weights (NORM only): a read-only weight, copied before the wait
    if (NORM)
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) cp_async16(nws + i, reinterpret_cast<const uint4 *>(a.norm_w) + i);
    // fused RoPE: this row's table entries at T, read before the wait like attention's T (the previous step
    // wrote seq_len before its finish let this step's kernels launch, so T is final here)
    float rc = 1.f, rs = 0.f;
    bool rot = false;  // block-uniform
    if constexpr (ROPE) {
        rot = (int)blockIdx.x * WARPS < a.rope_rows;
        if (rot && lane == 0) {
            const int pos = read_pos(a.pos, a.pos_dev), half = a.rope_d / 2, d = row0 % a.rope_d;
            const size_t j = (size_t)pos * half + (d < half ? d : d - half);
            rc = a.rope_cos[j];
            rs = a.rope_sin[j];
        }
    }
    float bias0 = 0.f;  // BIAS: the first row's bias (a read-only weight: before the wait)
    if constexpr (BIAS)
        if (first_loaded && lane == 0) bias0 = to_f(reinterpret_cast<const T *>(a.bias)[row0]);
    pdl_trigger();
    pdl_wait();
    ktrace(a.trace, 1);
    if (!pre && first_loaded) {
        load_chunk<UR>(W + (size_t)row0 * nvec, 0, nvec, lane, wa, pol);
        if (MODE == kGemvSwiglu) load_chunk<UR>(W + (size_t)(row0 + a.N) * nvec, 0, nvec, lane, wb, pol);
    }
    // residual of the warp's first row: read now, in the shadow of the input staging, instead of
    // after the dot product (one dependent L2 round trip less at the end)
    float res0 = 0.f;
    const T *resid = reinterpret_cast<const T *>(a.out);  // kGemvResid: the residual (FO: GemvFoArgs::resid)
    if constexpr (FO) resid = reinterpret_cast<const T *>(a.resid);
    if (MODE == kGemvResid && first_loaded && lane == 0) res0 = to_f(resid[row0]);
    if constexpr (FO && MODE == kGemvResid)  // down: O's sums back to 0 (gate|up, their reader, has completed)
        if (blockIdx.x == 0)
            for (int i = threadIdx.x; i < a.N; i += blockDim.x) a.o_sum[i] = 0ull;

    // ---- prologue: stage the input (optionally the embedding row, optionally RMSNorm'd);
    // kStageVecs loads per thread are issued before any is used (one L2 round trip per round
    // instead of one per vector)
    const uint4 *xin = reinterpret_cast<const uint4 *>(a.x);
    if (a.tok) xin += (size_t)(*a.tok) * nvec;
    const bool write_resid = a.tok && a.x_out && blockIdx.x == 0;
    float ss = 0.f;
    if constexpr (F32X) stage_f32_normed<T, WARPS, FO>(a, xin, xs, nws, nvec, write_resid, red);
    for (int i0 = threadIdx.x; !F32X && i0 < nvec; i0 += blockDim.x * kStageVecs) {
        uint4 v[kStageVecs];
#pragma unroll
        for (int j = 0; j < kStageVecs; ++j) {
            const int i = i0 + j * blockDim.x;
            v[j] = i < nvec ? xin[i] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < kStageVecs; ++j) {
            const int i = i0 + j * blockDim.x;
            if (i < nvec) {
                xs[i] = v[j];
                if (write_resid) reinterpret_cast<uint4 *>(a.x_out)[i] = v[j];
                if (NORM) {
                    float f[8];
                    unpack8<T>(v[j], f);
#pragma unroll
                    for (int k = 0; k < 8; ++k) ss = fmaf(f[k], f[k], ss);
                }
            }
        }
    }
    if (NORM && !F32X) {
        const float inv = rsqrtf(block_sum_once<WARPS>(ss, red) / (float)a.K + a.eps);
        const uint4 *nw = nws;
        cp_async_wait_all();  // this thread's own copies (same i as below)
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            float f[8], w[8];
            unpack8<T>(xs[i], f);
            unpack8<T>(nw[i], w);
#pragma unroll
            for (int j = 0; j < 8; ++j) f[j] = w[j] * round_t<T>(f[j] * inv);
            xs[i] = pack8<T>(f);
        }
    }
    __syncthreads();

    // ---- rows
    float best = -INFINITY;  // kGemvF32 with amax_part: lane 0's largest stored logit and its row
    int best_row = kNoIndex;
    float yq = 0.f;  // fused RoPE: lane 0's rounded result, rotated after the loop
    for (int row = row0; row < a.N; row += stride) {
        const bool first = first_loaded && row == row0;
        if (MODE == kGemvSwiglu) {
            const float2 gu = row_dot2<T, F32X, UR>(W + (size_t)row * nvec, W + (size_t)(row + a.N) * nvec, xs, nvec,
                                              lane, wa, wb, first, pol);
            if (lane == 0) {
                const float g = round_t<T>(gu.x), u = round_t<T>(gu.y);
                const float act = round_t<T>(g / (1.f + __expf(-g)));
                reinterpret_cast<T *>(a.out)[row] = from_f<T>(act * u);
            }
        } else {
            const float acc = row_dot<T, F32X, UR>(W + (size_t)row * nvec, xs, nvec, lane, wa, first, pol);
            if (lane == 0) {
                if (MODE == kGemvStore) {
                    if constexpr (ROPE) yq = round_t<T>(acc);
                    else if constexpr (BIAS)  // fp32 sum + fp32 bias, rounded once (HF's nn.Linear)
                        reinterpret_cast<T *>(a.out)[row] =
                            from_f<T>(acc + (first ? bias0 : to_f(reinterpret_cast<const T *>(a.bias)[row])));
                    else reinterpret_cast<T *>(a.out)[row] = from_f<T>(acc);
                } else if (MODE == kGemvResid) {
                    T *o = reinterpret_cast<T *>(a.out);
                    const float r = first ? res0 : to_f(resid[row]);
                    o[row] = from_f<T>(round_t<T>(acc) + r);
                } else {  // kGemvF32
                    const float v = a.round_logits ? round_t<T>(acc) : acc;
                    reinterpret_cast<float *>(a.out)[row] = v;
                    if (v > best) { best = v; best_row = row; }  // rows ascend: the lowest row of a tie stays
                }
            }
        }
    }
    if constexpr (ROPE) {  // partners through shared memory (warp w ^ 8), then rotate and store
        __shared__ float yr[WARPS];
        if (rot) {
            if (lane == 0) yr[warp] = yq;
            __syncthreads();
            if (lane == 0) yq = rope_rotate<T>(yq, yr[warp ^ 8], rc, rs, warp < 8);
        }
        if (lane == 0 && first_loaded) reinterpret_cast<T *>(a.out)[row0] = from_f<T>(yq);
    }
    if (MODE == kGemvF32 && a.amax_part) {  // the block's argmax, for the sampling kernel
        if (lane != 0) best = -INFINITY, best_row = kNoIndex;  // only lane 0 of a warp tracked its rows
        amax_tail<T>(a, best, best_row);
    }
    ktrace_end(a.trace);
}

// ---- lm_head of a small model (kGemvF32, normed, K <= kLmSmallK: SmolLM2's 49152 x 576): 8 lanes per row, a
// warp on 4 consecutive rows at a time, 9 vectors of 16 bytes per lane. So each warp has 4.6 KB of weights in
// flight instead of one 1.15 KB row (gemv_kernel's layout: a row per warp, 2.25 vectors per lane), a third of the
// passes, and 3 shuffle levels per row instead of 5. The rows' groups of 4 go round-robin over the blocks; the
// first group of every warp is loaded before the wait, and each warp's next group is requested towards L2 (one
// bulk prefetch) before it multiplies the current one (l2_ahead: the registers hold one group, so without it the
// DRAM idled during the staging and between the passes; performance.md log entry 35). Block 0 may also advance
// seq_len (GemvLmArgs). Staging, argmax partials and the winner's prefetch are gemv_kernel's (stage_f32_normed,
// amax_tail).
constexpr int kLmLanes = 8;                    // lanes per row
constexpr int kLmVpl = 9;                      // 16-byte vectors per lane
constexpr int kLmRows = kWarp / kLmLanes;      // rows per warp and pass
constexpr int kLmSmallK = kLmLanes * kLmVpl * 8;  // 576
bool lm_small_runs(const GemvArgs &a) {
    return a.mode == kGemvF32 && a.norm_w && !a.tok && a.K <= kLmSmallK;
}

template <typename T>
__global__ void __launch_bounds__(kGemvWarps * kWarp, 4) lm_small_kernel(GemvLmArgs a) {
    extern __shared__ uint4 xs[];  // the normed input as fp32 ([2][K/8] float4), then the norm weights
    __shared__ __align__(16) float red[kWarp];
    const int nvec = a.K / 8;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int sub = lane / kLmLanes, j = lane % kLmLanes;  // this lane's row in the group, its first vector
    const uint4 *W = reinterpret_cast<const uint4 *>(a.W);
    const int groups = (a.N + kLmRows - 1) / kLmRows;
    const int g0 = warp * gridDim.x + blockIdx.x, gstride = gridDim.x * kGemvWarps;
    const uint64_t pol = l2_policy(true);
    uint4 w[kLmVpl];
    auto load = [&](int g) {
        const int row = g * kLmRows + sub;
        const uint4 *wr = W + (size_t)row * nvec;
#pragma unroll
        for (int u = 0; u < kLmVpl; ++u) {
            const int i = j + u * kLmLanes;
            w[u] = row < a.N && i < nvec ? ld_stream(wr + i, pol) : make_uint4(0, 0, 0, 0);
        }
    };
    // l2_ahead: group g's rows (contiguous) requested towards L2 by lane 0, one bulk prefetch
    auto ahead = [&](int g) {
        if (a.l2_ahead && lane == 0 && g < groups)
            prefetch_l2_bulk(W + (size_t)g * kLmRows * nvec, (unsigned)(min(kLmRows, a.N - g * kLmRows) * nvec * 16));
    };
    ktrace(a.trace, 0);
    const bool pre = a.prefetch == 2 && (int)blockIdx.x * 8 < (int)gridDim.x * a.pre_eighths;
    if (pre && g0 < groups) load(g0);
    uint4 *nws = xs + 2 * nvec;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) cp_async16(nws + i, reinterpret_cast<const uint4 *>(a.norm_w) + i);
    // seq_len_dev: this step's T, read before the wait like attention's (the previous step wrote it before this
    // step's kernels could launch); written after the wait, when every earlier kernel of the step has completed
    // (a plain load: read_pos's volatile one costs this kernel a stack frame)
    const bool seq = a.seq_len_dev && blockIdx.x == 0 && threadIdx.x == 0;
    const int next_len = seq ? (a.pos_dev ? *a.pos_dev : a.pos) + 1 : 0;
    pdl_trigger();
    pdl_wait();
    ktrace(a.trace, 1);
    if (seq) *a.seq_len_dev = next_len;
    ahead(g0 + gstride);  // the DRAM streams the second pass during the staging and the first pass's products
    if (!pre && g0 < groups) load(g0);
    stage_f32_normed<T, kGemvWarps, false>(a, reinterpret_cast<const uint4 *>(a.x), xs, nws, nvec, false, red);
    __syncthreads();

    float best = -INFINITY;  // lanes j == 0: the largest stored logit of their rows and its row
    int best_row = kNoIndex;
    for (int g = g0; g < groups; g += gstride) {
        if (g != g0) {
            load(g);
            ahead(g + gstride);
        }
        float acc = 0.f;
#pragma unroll
        for (int u = 0; u < kLmVpl; ++u) {
            const int i = j + u * kLmLanes;
            if (i < nvec) acc += dot8<T, true>(w[u], xs, nvec, i);
        }
#pragma unroll
        for (int o = kLmLanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        const int row = g * kLmRows + sub;
        if (j == 0 && row < a.N) {
            const float v = a.round_logits ? round_t<T>(acc) : acc;
            reinterpret_cast<float *>(a.out)[row] = v;
            if (v > best) { best = v; best_row = row; }  // rows ascend: the lowest row of a tie stays
        }
    }
    if (a.amax_part) amax_tail<T>(a, best, best_row);
    ktrace_end(a.trace);
}

static_assert(sizeof(GemvLmArgs) <= 128, "lm_head's kernel parameter: at most 128 bytes");
// the gemv kernel parameters' sizes as docs/kernels.md gives them (each <= 128 bytes: ops.h GemvArgs)
static_assert(sizeof(GemvArgs) == 88 && sizeof(GemvRopeArgs) == 128 && sizeof(GemvFoArgs) == 104 &&
                  sizeof(GemvBiasArgs) == 96, "gemv kernel parameter sizes (docs/kernels.md)");

template <typename T, int MODE, bool NORM, int W>
static void set_attr_w() {
    if constexpr (MODE == kGemvSwiglu && NORM)
        CASE4_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, MODE, true, kUnrollSmall, W, false, true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvMaxSmem));
    if constexpr (MODE == kGemvStore && NORM) {  // the bias QKV (launch_bias)
        CASE4_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, MODE, true, kUnrollSmall, W, false, false, true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvMaxSmem));
        CASE4_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, MODE, true, kUnrollLarge, W, false, false, true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvMaxSmem));
    }
    CASE4_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, MODE, NORM, kUnrollSmall, W>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvMaxSmem));
    CASE4_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, MODE, NORM, kUnrollLarge, W>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvMaxSmem));
}
template <typename T, int MODE, bool NORM>
static void set_attr() {
    set_attr_w<T, MODE, NORM, kGemvWarps>();
    set_attr_w<T, MODE, NORM, kGemvWarpsOneRow>();
    if (MODE == kGemvStore && NORM)
        CASE4_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, kGemvStore, true, kUnrollSmall, kGemvWarpsOneRow, true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvMaxSmem));
}

// the fused RoPE kernel is the normed store kernel with 4 loads per lane (K <= 1024) in 16-warp blocks
bool gemv_rope_fits(int N, int K, int D, int R, int max_blocks) {
    return one_row_per_warp(N, max_blocks) && !unroll_large(K) && R == D && D % 16 == 0;  // D / 2 % 8 == 0 follows
}

template <typename T>
static void init_t() {
    set_attr<T, kGemvStore, false>(); set_attr<T, kGemvStore, true>();
    set_attr<T, kGemvResid, false>(); set_attr<T, kGemvResid, true>();
    set_attr<T, kGemvSwiglu, false>(); set_attr<T, kGemvSwiglu, true>();
    set_attr<T, kGemvF32, false>(); set_attr<T, kGemvF32, true>();
    CASE4_CUDA_CHECK(cudaFuncSetAttribute(lm_small_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvMaxSmem));
}

void gemv_init(int dtype) {
    if (dtype == kF16) init_t<half>(); else init_t<__nv_bfloat16>();
}

template <typename T, int MODE, int W>
static void launch_fo(bool large, int grid, size_t smem, const Launch &L, const GemvFoArgs &f) {
    if constexpr (MODE == kGemvSwiglu) {
        launch_pdl(L, gemv_kernel<T, MODE, true, kUnrollSmall, W, false, true>, grid, W * kWarp, smem, f);
    } else if constexpr (MODE == kGemvResid) {
        if (large) launch_pdl(L, gemv_kernel<T, MODE, false, kUnrollLarge, W, false, true>, grid, W * kWarp, smem, f);
        else launch_pdl(L, gemv_kernel<T, MODE, false, kUnrollSmall, W, false, true>, grid, W * kWarp, smem, f);
    }
}

// the normed QKV with a bias (kGemvStore)
template <typename T, int W>
static void launch_bias(bool large, int grid, size_t smem, const Launch &L, const GemvBiasArgs &b) {
    if (large)
        launch_pdl(L, gemv_kernel<T, kGemvStore, true, kUnrollLarge, W, false, false, true>, grid, W * kWarp, smem, b);
    else
        launch_pdl(L, gemv_kernel<T, kGemvStore, true, kUnrollSmall, W, false, false, true>, grid, W * kWarp, smem, b);
}

template <typename T, int MODE, int W>
static void launch_w(bool norm, bool large, int grid, size_t smem, const Launch &L, const GemvArgs &b) {
    if (norm) {
        if (large) launch_pdl(L, gemv_kernel<T, MODE, true, kUnrollLarge, W>, grid, W * kWarp, smem, b);
        else launch_pdl(L, gemv_kernel<T, MODE, true, kUnrollSmall, W>, grid, W * kWarp, smem, b);
    } else {
        if (large) launch_pdl(L, gemv_kernel<T, MODE, false, kUnrollLarge, W>, grid, W * kWarp, smem, b);
        else launch_pdl(L, gemv_kernel<T, MODE, false, kUnrollSmall, W>, grid, W * kWarp, smem, b);
    }
}

// rope / fo / lm / bias: the derived arguments of the fused-RoPE QKV, of a kernel after a fused O, of lm_head or of
// the QKV with a bias (at most one; a is then their GemvArgs part)
template <typename T, int MODE>
static int launch_mode(const GemvArgs &a, const Launch &L, const GemvRopeArgs *rope, const GemvFoArgs *fo,
                       const GemvLmArgs *lm, const GemvBiasArgs *bias) {
    const bool one_row = one_row_per_warp(a.N, a.max_blocks);
    const int W = one_row ? kGemvWarpsOneRow : kGemvWarps;
    const int groups = (a.N + W - 1) / W;
    const int grid = a.max_blocks > 0 && groups > a.max_blocks ? a.max_blocks : groups;
    const bool large = unroll_large(a.K);
    // the input (fp32 or T: f32_input) + the norm weights
    const bool norm = a.norm_w != nullptr;
    const bool f32x = f32_input(norm, large ? kUnrollLarge : kUnrollSmall);
    const bool o_in = fo && MODE == kGemvSwiglu;  // gate|up after a fused O: + O's int64 sums
    const size_t smem = (size_t)a.K * ((f32x ? 4 : sizeof(T)) + (norm ? sizeof(T) : 0) + (o_in ? 8 : 0));
    if (fo && MODE == kGemvSwiglu &&
        (!f32x || !fo->o_sum || !a.x_out || a.tok || smem > (size_t)kGemvMaxSmem))
        throw std::runtime_error("gemv: O's sums need a normed K <= 1024 gate|up with x_out and shared memory");
    if (fo && MODE == kGemvResid && (norm || !fo->resid || !fo->o_sum))
        throw std::runtime_error("gemv: a separate residual is for the down projection");
    if (fo && MODE != kGemvSwiglu && MODE != kGemvResid)
        throw std::runtime_error("gemv: after a fused O only gate|up and down");
    if (bias && (MODE != kGemvStore || !norm || !bias->bias))
        throw std::runtime_error("gemv: a bias is for the normed QKV store (kGemvStore, norm_w) and needs its pointer");
    GemvArgs b = a;
    b.prefetch = L.pdl == kPdlL2 ? 1 : L.pdl == kPdlPreload ? 2 : 0;
    b.trace = L.slot("gemv m%d N %d K %d", MODE, a.N, a.K);
    const bool lm_small = !rope && !fo && lm_small_runs(a);
    if (lm && lm->seq_len_dev && !lm_small)
        throw std::runtime_error("gemv: advancing seq_len is lm_small_kernel's (normed fp32 logits, K <= 576)");
    if (lm_small) {
        const int lgroups = (a.N + kLmRows * kGemvWarps - 1) / (kLmRows * kGemvWarps);  // blocks of 8 row groups
        const int lgrid = a.max_blocks > 0 && lgroups > a.max_blocks ? a.max_blocks : lgroups;
        GemvLmArgs l;  // without lm (launch_gemv): no seq_len write, the look-ahead on
        if (lm) l = *lm;
        static_cast<GemvArgs &>(l) = b;
        launch_pdl(L, lm_small_kernel<T>, lgrid, kGemvWarps * kWarp, (size_t)a.K * (4 + sizeof(T)), l);
        return lgrid;
    }
    if (bias) {
        if constexpr (MODE == kGemvStore) {
            GemvBiasArgs c = *bias;
            static_cast<GemvArgs &>(c) = b;
            if (one_row) launch_bias<T, kGemvWarpsOneRow>(large, grid, smem, L, c);
            else launch_bias<T, kGemvWarps>(large, grid, smem, L, c);
        }
    } else if (rope) {
        if constexpr (MODE == kGemvStore) {
            if (!norm || !gemv_rope_fits(a.N, a.K, rope->rope_d, rope->rope_d, a.max_blocks) || rope->rope_d <= 0 ||
                rope->rope_rows % rope->rope_d != 0 || rope->rope_rows > a.N || !rope->rope_cos || !rope->rope_sin)
                throw std::runtime_error("gemv: fused RoPE needs a normed QKV with one row per warp (gemv_rope_fits)");
            GemvRopeArgs r = *rope;
            static_cast<GemvArgs &>(r) = b;
            launch_pdl(L, gemv_kernel<T, kGemvStore, true, kUnrollSmall, kGemvWarpsOneRow, true>, grid,
                       kGemvWarpsOneRow * kWarp, smem, r);
        } else {
            throw std::runtime_error("gemv: fused RoPE is for the store mode (QKV)");
        }
    } else if (fo) {
        GemvFoArgs f = *fo;
        static_cast<GemvArgs &>(f) = b;
        if (one_row) launch_fo<T, MODE, kGemvWarpsOneRow>(large, grid, smem, L, f);
        else launch_fo<T, MODE, kGemvWarps>(large, grid, smem, L, f);
    } else if (one_row) {
        launch_w<T, MODE, kGemvWarpsOneRow>(norm, large, grid, smem, L, b);
    } else {
        launch_w<T, MODE, kGemvWarps>(norm, large, grid, smem, L, b);
    }
    return grid;
}

template <typename T>
static int launch_t(const GemvArgs &a, const Launch &L, const GemvRopeArgs *rope, const GemvFoArgs *fo,
                    const GemvLmArgs *lm, const GemvBiasArgs *bias) {
    switch (a.mode) {
        case kGemvStore: return launch_mode<T, kGemvStore>(a, L, rope, fo, lm, bias);
        case kGemvResid: return launch_mode<T, kGemvResid>(a, L, rope, fo, lm, bias);
        case kGemvSwiglu: return launch_mode<T, kGemvSwiglu>(a, L, rope, fo, lm, bias);
        case kGemvF32: return launch_mode<T, kGemvF32>(a, L, rope, fo, lm, bias);
        default: throw std::runtime_error("gemv: bad mode");
    }
}

static int launch_any(const GemvArgs &a, int dtype, const Launch &L, const GemvRopeArgs *rope,
                      const GemvFoArgs *fo = nullptr, const GemvLmArgs *lm = nullptr,
                      const GemvBiasArgs *bias = nullptr) {
    if (a.K % 8 != 0) throw std::runtime_error("gemv: K must be a multiple of 8");
    if ((size_t)a.K * 2 * (a.norm_w ? 2 : 1) > (size_t)kGemvMaxSmem)
        throw std::runtime_error("gemv: K too large for shared memory");
    if (a.amax_part && a.mode != kGemvF32) throw std::runtime_error("gemv: amax_part needs the fp32 logits mode");
    return dtype == kF16 ? launch_t<half>(a, L, rope, fo, lm, bias) : launch_t<__nv_bfloat16>(a, L, rope, fo, lm, bias);
}

int launch_gemv(const GemvArgs &a, int dtype, const Launch &L) { return launch_any(a, dtype, L, nullptr); }
int launch_gemv_rope(const GemvRopeArgs &a, int dtype, const Launch &L) { return launch_any(a, dtype, L, &a); }
int launch_gemv_fo(const GemvFoArgs &a, int dtype, const Launch &L) { return launch_any(a, dtype, L, nullptr, &a); }
int launch_gemv_lm(const GemvLmArgs &a, int dtype, const Launch &L) {
    return launch_any(a, dtype, L, nullptr, nullptr, &a);
}
int launch_gemv_bias(const GemvBiasArgs &a, int dtype, const Launch &L) {
    return launch_any(a, dtype, L, nullptr, nullptr, nullptr, &a);
}

}  // namespace case4
