// sampling.cu -- the end of a decode step: device sampling and seq_len_dev[s] := T + 1 (unless lm_head
// advanced it: FinishArgs::seq_advanced).
//
// One block of 1024 threads over the fp32 logits [V]. Greedy: argmax (lowest id on ties).
// Otherwise the function of case4_sampling.py, without a sort: every kept set is a prefix
// of the order "descending probability, ascending id", so each cut is found by a radix
// select over a 52-bit key (32 order-preserving bits of the logit, then 20 bits of ~id):
// 7 passes of 256-bin histograms (count or probability mass) per cut.
//   top-k cut  -> k-th key;  top-p cut -> first key whose cumulative mass >= top_p;
//   the token  -> first kept key whose cumulative mass > u * kept_mass.
// u = uniform(seed, position) (splitmix64 counter RNG, bit-identical to the client).
#include "common.cuh"
#include "ops.h"

namespace case4 {

constexpr unsigned long long kGolden = 0x9E3779B97F4A7C15ull;
constexpr int kIdBits = 20;  // vocab < 2^20

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    unsigned long long z = x + kGolden;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float uniform01(unsigned long long seed, long long position) {
    const unsigned long long z = splitmix64(seed * kGolden + (unsigned long long)position);
    return (float)(z >> 40) / 16777216.0f;
}

__device__ __forceinline__ unsigned long long sort_key(float l, int id) {
    unsigned int b = __float_as_uint(l);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)b << kIdBits) | (unsigned long long)((1 << kIdBits) - 1 - id);
}

struct SampleCtx {
    const float *logits;
    int V;
    float temp, mx, Z;
    __device__ float prob(float l) const { return expf(l / temp - mx / temp) / Z; }
};

// Largest key r (among keys >= cut) with F(r) = sum_{keys k >= r, k >= cut} f(k) ">= target"
// (strict: "> target"); f = 1 (count) or the probability. Returns false if none.
__device__ bool radix_find(const SampleCtx &c, unsigned long long cut, bool count, float target, bool strict,
                           unsigned long long *result, float *hist, unsigned long long *sh_prefix, int *sh_ok,
                           float *sh_above) {
    __syncthreads();  // the previous call's readers are done with the shared state
    if (threadIdx.x == 0) { *sh_prefix = 0ull; *sh_above = 0.f; *sh_ok = 1; }
    for (int shift = 48; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0.f;
        __syncthreads();
        const unsigned long long prefix = *sh_prefix;
        for (int i = threadIdx.x; i < c.V; i += blockDim.x) {
            const float l = c.logits[i];
            const unsigned long long k = sort_key(l, i);
            if (k < cut || (k >> (shift + 8)) != (prefix >> (shift + 8))) continue;
            atomicAdd(&hist[(k >> shift) & 255], count ? 1.f : c.prob(l));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float cum = *sh_above;
            int chosen = -1;
            for (int d = 255; d >= 0; --d) {
                const float next = cum + hist[d];
                if (strict ? next > target : next >= target) { chosen = d; break; }
                cum = next;
            }
            if (chosen < 0) *sh_ok = 0;
            else { *sh_above = cum; *sh_prefix = prefix | ((unsigned long long)chosen << shift); }
        }
        __syncthreads();
        if (!*sh_ok) return false;
    }
    *result = *sh_prefix;
    return true;
}

// not inlined (nor part_argmax): inlined beside block_sample, finish spills at 64 registers
__device__ __noinline__ int block_argmax(const float *logits, int V) {
    float bv = -INFINITY;
    int bi = kNoIndex;
    constexpr int U = 8;  // 8 independent loads in flight per thread
    for (int base = threadIdx.x; base < V; base += U * blockDim.x) {
        float v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = base + u * blockDim.x;
            v[u] = i < V ? logits[i] : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < U; ++u)  // indices increase with u: strict '>' keeps the lowest id
            if (v[u] > bv) { bv = v[u]; bi = base + u * blockDim.x; }
    }
    block_argmax_pick(bv, bi);
    return bi;
}

// mass of the kept prefix {key >= cut}
// greedy from lm_head's per-block argmax (GemvArgs::amax_part): the largest value, lowest row on
// ties, as block_argmax over the logits; no candidate (all NaN or -inf) gives kNoIndex
__device__ __noinline__ int part_argmax(const int2 *part, int n) {
    float bv = -INFINITY;
    int bi = kNoIndex;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {  // partials ascend in neither value nor row
        const float v = __int_as_float(part[i].x);
        const int r = part[i].y;
        if (v > bv || (v == bv && r < bi)) { bv = v; bi = r; }
    }
    block_argmax_pick(bv, bi);
    return bi;
}

__device__ float kept_mass(const SampleCtx &c, unsigned long long cut, float *red) {
    float s = 0.f;
    for (int i = threadIdx.x; i < c.V; i += blockDim.x) {
        const float l = c.logits[i];
        if (sort_key(l, i) >= cut) s += c.prob(l);
    }
    return block_sum(s, red);
}

__device__ int block_sample(const float *logits, int V, const SampleParams &p, long long rng_pos) {
    __shared__ float red[kWarp];
    __shared__ float hist[256];
    __shared__ unsigned long long sh_prefix;
    __shared__ int sh_ok;
    __shared__ float sh_above;
    SampleCtx c{logits, V, p.temperature, 0.f, 1.f};
    float m = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, logits[i]);
    c.mx = block_max(m, red);
    float z = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) z += expf(logits[i] / c.temp - c.mx / c.temp);
    c.Z = block_sum(z, red);

    unsigned long long cut = 0ull, key = 0ull;
    const int k = (p.top_k > 0 && p.top_k < V) ? p.top_k : V;
    if (k < V) radix_find(c, 0ull, true, (float)k, false, &cut, hist, &sh_prefix, &sh_ok, &sh_above);
    float mass = kept_mass(c, cut, red);
    const float u = uniform01(p.seed, rng_pos);
    float target = u * mass;
    if (p.top_p < 1.f && mass >= p.top_p) {
        unsigned long long cp;
        if (radix_find(c, cut, false, p.top_p, false, &cp, hist, &sh_prefix, &sh_ok, &sh_above)) {
            cut = cp;
            target = u * kept_mass(c, cut, red);
        }
    }
    if (!radix_find(c, cut, false, target, true, &key, hist, &sh_prefix, &sh_ok, &sh_above)) {
        // rounding: no kept token exceeds the target -> the last kept token
        if (cut != 0ull) key = cut;
        else radix_find(c, 0ull, true, (float)V, false, &key, hist, &sh_prefix, &sh_ok, &sh_above);
    }
    return (1 << kIdBits) - 1 - (int)(key & ((1ull << kIdBits) - 1));
}

// The next step's kernels may launch (griddepcontrol.launch_dependents) only once seq_len is
// written: past this kernel's wait every earlier kernel has completed, so from then on the next
// step may read T and the KV rows < T before its own waits (attention.cu). With seq_advanced, lm_head
// (which has completed once this kernel passes its wait) wrote it, so the trigger comes right after the
// wait; otherwise this kernel writes it first. Sampling itself still overlaps the next step's weight
// preloads.
__global__ void __launch_bounds__(kSampleThreads) finish_kernel(FinishArgs a) {
    ktrace(a.trace, 0);
    pdl_wait();
    ktrace(a.trace, 1);
    int pos;
    if (a.seq_advanced) {  // seq_len_dev already holds T + 1
        pdl_trigger();
        pos = a.pos_dev ? read_pos(0, a.pos_dev) - 1 : a.pos;
    } else {
        pos = read_pos(a.pos, a.pos_dev);
        __syncthreads();  // every thread has read pos before seq_len_dev changes
        if (threadIdx.x == 0 && a.seq_len_dev) {
            *a.seq_len_dev = pos + 1;
            __threadfence();
        }
        __syncthreads();
        pdl_trigger();
    }
    SampleParams p{};
    if (a.params) p = *a.params;
    if (a.force_sample || (a.params && p.enabled)) {
        const int raw = p.temperature > 0.f ? block_sample(a.logits, a.V, p, (long long)pos)
                        : a.amax_part       ? part_argmax(a.amax_part, a.amax_n)
                                            : block_argmax(a.logits, a.V);
        // all-NaN logits have no maximum: token 0 keeps the next step's embedding gather in bounds
        const int tok = (unsigned)raw < (unsigned)a.V ? raw : 0;
        if (threadIdx.x == 0) {
            if (a.token_dev) *a.token_dev = tok;
            if (a.ring) a.ring[(pos + 1) % a.ring_len] = tok;
        }
    }
    ktrace_end(a.trace);
}

// The token sampled by the step at position T draws with RNG position T, as Backend.generate's host sampler
// does with position = seq_len before the step (case4_sampling.py).
void launch_finish(const FinishArgs &a, const Launch &L) {
    FinishArgs b = a;
    b.trace = L.slot("finish");
    launch_pdl(L, finish_kernel, dim3(1), dim3(kSampleThreads), 0, b);
}

__global__ void set_int_kernel(int *dst, int v) { *dst = v; }
__global__ void set_params_kernel(SampleParams *dst, SampleParams v) { *dst = v; }

void launch_set_int(int *dst, int value, cudaStream_t st) {
    set_int_kernel<<<1, 1, 0, st>>>(dst, value);
    CASE4_LAUNCH_CHECK();
}
void launch_set_params(SampleParams *dst, SampleParams value, cudaStream_t st) {
    set_params_kernel<<<1, 1, 0, st>>>(dst, value);
    CASE4_LAUNCH_CHECK();
}

}  // namespace case4
