// common.cuh -- shared helpers for the Case4 decode kernels (llama.cpp ggml-cuda style).
//
// Conventions used by every kernel:
//   * weights / activations are fp16 or bf16 (template parameter T), accumulation is fp32;
//   * results are rounded to T at the same points as HF transformers (after each linear,
//     after each norm, after the residual add), so the kernels track the torch reference;
//   * a "position" T is either a host constant baked into the launch (exact graphs, eager)
//     or read from seq_len_dev[s] on the device (dynamic graph): see `read_pos`.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "check.h"
#include "ops.h"

namespace case4 {

constexpr int kWarp = 32;
constexpr int kSampleThreads = 1024;


// ---------------------------------------------------------------- conversions
__device__ __forceinline__ float to_f(half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ half from_f<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// round a float through T and back (the "result rounded to the model dtype" points)
template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f(from_f<T>(v)); }

// RoPE of one dimension (HF rotate_half): x at dim d, p at its partner d +- R/2, c / s the fp32 table
// entries at (T, d mod R/2); first: d < R/2. Rounded once to T, as the reference. Shared by the
// attention kernel and the QKV gemv's fused RoPE, so that both compile the same expression.
template <typename T>
__device__ __forceinline__ float rope_rotate(float x, float p, float c, float s, bool first) {
    return round_t<T>(first ? x * c - p * s : x * c + p * s);
}

// 8 packed T values (one 16-byte vector) -> 8 floats
template <typename T> __device__ __forceinline__ void unpack8(const uint4 &v, float (&f)[8]);
template <> __device__ __forceinline__ void unpack8<half>(const uint4 &v, float (&f)[8]) {
    const half2 *h = reinterpret_cast<const half2 *>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 t = __half22float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}
template <> __device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4 &v, float (&f)[8]) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 t = __bfloat1622float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}
template <typename T> __device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 v;
    T *p = reinterpret_cast<T *>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = from_f<T>(f[i]);
    return v;
}

// L2 cache policy for the weight stream (createpolicy). evict_first: weights are read once per
// token, so their lines go before anything else in L2 (KV rows, activations, the next kernel's
// early loads); evict_normal: the default behaviour.
__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
    uint64_t p;
    if (evict_first) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    else asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
    return p;
}
// 16-byte streaming load of data read once per token (weights): bypass L1, L2 policy `pol`.
__device__ __forceinline__ uint4 ld_stream(const uint4 *p, uint64_t pol) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "l"(pol));
    return r;
}

// ---------------------------------------------------------------- kernel timeline (opt-in)
// With a trace slot (Engine::set_kernel_trace, bench/quick_timing.py --timeline) every block (the first
// kKtraceBlocks of a grid, row-major over (y, x)) writes its own record of kKtraceRec uint64, in ns of the
// global timer, with plain stores (no atomics, no barriers: the timed kernel runs as it does untraced):
// [0] start and [1] past griddepcontrol.wait (thread 0), [2..11] the end of a kernel-specific phase
// (ktrace_mark, thread 0: attention, the tensor-core qgemv), [12 + w] the end of warp w. The host takes the
// min / max over the blocks (kernel_timeline). Without a slot (the default) nothing is written.
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned long long *ktrace_rec(unsigned long long *t) {
    const unsigned b = blockIdx.y * gridDim.x + blockIdx.x;
    return b < (unsigned)kKtraceBlocks ? t + (size_t)b * kKtraceRec : nullptr;
}
// what: 0 start, 1 past the wait (thread 0)
__device__ __forceinline__ void ktrace(unsigned long long *t, int what) {
    if (t && threadIdx.x == 0)
        if (unsigned long long *r = ktrace_rec(t)) r[what] = global_ns();
}
// end of phase k (2..11) in this block (thread 0 only records)
__device__ __forceinline__ void ktrace_mark(unsigned long long *t, int k) {
    if (t && threadIdx.x == 0)
        if (unsigned long long *r = ktrace_rec(t)) r[k] = global_ns();
}
// end of a warp's work: every warp calls it (lane 0 records)
__device__ __forceinline__ void ktrace_end(unsigned long long *t) {
    if (t && threadIdx.x % 32 == 0)
        if (unsigned long long *r = ktrace_rec(t)) r[kKtraceWarp0 + threadIdx.x / 32] = global_ns();
}

// ---------------------------------------------------------------- reductions
struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// reduction over the whole block (`id`: the identity of `op`); `red` is >= 32 floats of shared
// memory; all threads get the result
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float *red, float id, Op op) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : id;
    return warp_reduce(v, op);
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp{}); }

// Lane 0's result of warp_reduce(SumOp) over the 32 values r[0..NW) followed by zeros, as a tree over
// r[] (V_o(l) = V_2o(l) + V_2o(l ^ o), the shuffle butterfly's order); the terms of lanes >= NW are
// left out instead of added as +0, which gives the same sum unless a partial is -0.
template <int NW, int O, int L>
__device__ __forceinline__ float butterfly_sum(const float *r) {
    if constexpr (O == kWarp) {
        return r[L];
    } else {
        constexpr int P = L ^ O;
        if constexpr ((P & (2 * O - 1)) >= NW) return butterfly_sum<NW, 2 * O, L>(r);  // P's subtree: zeros
        else return butterfly_sum<NW, 2 * O, L>(r) + butterfly_sum<NW, 2 * O, P>(r);
    }
}
// Sum over a block of NW warps, for a kernel that reduces once (no earlier reader of `red` to wait
// for): one barrier, and the NW warp partials added from shared memory (every thread, the same tree)
// instead of block_reduce's second barrier and shuffle round. The same additions in the same order
// as block_sum, so the same result for non-negative values (a sum of squares). `red`: >= NW floats,
// 16-byte aligned.
template <int NW>
__device__ __forceinline__ float block_sum_once(float v, float *red) {
    v = warp_sum(v);
    if (threadIdx.x % kWarp == 0) red[threadIdx.x / kWarp] = v;
    __syncthreads();
    float r[NW];
#pragma unroll
    for (int i = 0; i < NW; ++i) r[i] = red[i];
    return butterfly_sum<NW, 1, 0>(r);
}
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp{}); }
__device__ __forceinline__ float block_sum(float v, float *red) { return block_reduce(v, red, 0.f, SumOp{}); }
__device__ __forceinline__ float block_max(float v, float *red) { return block_reduce(v, red, -INFINITY, MaxOp{}); }

// Argmax over the whole block: every thread brings its best (value bv, index bi), kNoIndex for
// none; all threads get back the largest value and its index, the lowest index on ties (kNoIndex
// if no thread had one). Callers never record NaN or -inf as a best, so neither can win.
constexpr int kNoIndex = 0x7fffffff;
__device__ inline void block_argmax_pick(float &bv, int &bi) {
    __shared__ float bv_s[kWarp];
    __shared__ int bi_s[kWarp];
    auto warp_pick = [&]() {
#pragma unroll
        for (int o = kWarp / 2; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
    };
    warp_pick();
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
    __syncthreads();  // a previous call's readers are done with bi_s
    if (lane == 0) { bv_s[warp] = bv; bi_s[warp] = bi; }
    __syncthreads();
    bv = lane < nw ? bv_s[lane] : -INFINITY;
    bi = lane < nw ? bi_s[lane] : kNoIndex;
    warp_pick();
}

// ---------------------------------------------------------------- programmatic dependent launch
// Kernels of a step are launched with the PDL attribute (see launch_pdl): the next kernel's
// blocks may start while the previous kernel drains. Each kernel therefore calls pdl_wait()
// before touching any activation memory (griddepcontrol.wait returns once the previous grid
// has completed and its writes are visible; a no-op without PDL), and lets its dependents
// launch early with pdl_trigger(). Only read-only weights may be touched before pdl_wait().
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
// [p, p + bytes) requested towards L2 through the TMA unit (sm_90; p and bytes multiples of 16); no data returns.
// Before sm_90 there is no bulk prefetch: a hint only, so it is dropped (same results, docs/decisions.md).
__device__ __forceinline__ void prefetch_l2_bulk(const void *p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
    (void)p;
    (void)bytes;
#endif
}
// 16-byte global -> shared copy that does not pass through registers (cp.async, sm_80);
// cp_async_wait_all() waits for the calling thread's copies
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// host: launch `k` on L.st, with programmatic stream serialization when L.pdl >= kPdlOn
template <typename... KArgs, typename... Args>
inline void launch_pdl(const Launch &L, void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = L.st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = L.pdl >= kPdlOn ? 1 : 0;
    CASE4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, k, args...));
}

// position of this step: host constant, or read from the device (dynamic graphs)
__device__ __forceinline__ int read_pos(int pos_host, const int *pos_dev) {
    return pos_dev ? *(volatile const int *)pos_dev : pos_host;
}

}  // namespace case4
