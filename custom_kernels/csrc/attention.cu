// attention.cu -- split-KV decode attention (flash-decoding) with fused RoPE and K/V write.
//
// Grid (Hkv, splits): block (h, s) serves all G = Hq/Hkv query heads of KV head h over
// positions [s*kSplitLen, min((s+1)*kSplitLen, T+1)), so every K/V row is read once.
//   1. prologue: rotate the group's query heads (fp32 tables), and if the block owns
//      position T, rotate K_T and write K_T, V_T into the KV arena (the step's K/V write);
//   2. scores q.k for the split (D/8 threads per row, one 16-byte vector each), softmax
//      statistics (max, sum) per head, then sum_j p_j V_j;
//   3. one split: write ctx directly. Several: write (max, sum, acc) partials, and the
//      last block to finish (atomic counter per KV head) merges them and resets the
//      counter to 0, so the kernel is graph-safe and needs no second launch.
// With pos_dev (dynamic graph) the grid has max_splits columns and blocks past T exit.
#include "common.cuh"
#include "ops.h"
#include "rope.cuh"

namespace case4 {

constexpr int kAttnThreads = 128;

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attn_kernel(AttnArgs a) {
    constexpr int TPR = D / 8;                 // threads per K/V row
    constexpr int RPP = kAttnThreads / TPR;    // rows per pass
    __shared__ float q_s[kMaxGroup][D];
    __shared__ float p_s[kMaxGroup][kSplitLen];
    __shared__ float acc_w[kAttnThreads / kWarp][kMaxGroup][D];  // per-warp partial sums (fixed order)
    __shared__ float m_s[kMaxGroup], l_s[kMaxGroup];
    __shared__ int last_s;

    pdl_trigger();
    pdl_wait();
    const int kvh = blockIdx.x, split = blockIdx.y;
    const int pos = read_pos(a.pos, a.pos_dev);
    const int n = pos + 1;
    const int nsplit = (n + kSplitLen - 1) / kSplitLen;
    if (split >= nsplit) return;  // idle block of a fixed (dynamic) grid
    const int G = a.Hq / a.Hkv;
    const int start = split * kSplitLen, len = min(kSplitLen, n - start);
    const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
    const int R = a.rotary_dim;
    const T *qkv = reinterpret_cast<const T *>(a.qkv);
    const float *cs = a.rope_cos + (size_t)pos * (R / 2);
    const float *sn = a.rope_sin + (size_t)pos * (R / 2);
    T *kc = reinterpret_cast<T *>(a.k_cache) + (size_t)kvh * a.max_seq * D;
    T *vc = reinterpret_cast<T *>(a.v_cache) + (size_t)kvh * a.max_seq * D;

    // ---- 1. RoPE on the query group; K/V write at T by the block that owns T
    const float scale = rsqrtf((float)D);
    for (int i = tid; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        q_s[g][d] = rope_elem<T>(qkv + (size_t)(kvh * G + g) * D, d, R, cs, sn) * scale;
    }
    if (pos >= start && pos < start + len) {
        const T *kh = qkv + (size_t)(a.Hq + kvh) * D;
        const T *vh = qkv + (size_t)(a.Hq + a.Hkv + kvh) * D;
        for (int d = tid; d < D; d += blockDim.x) {
            kc[(size_t)pos * D + d] = from_f<T>(rope_elem<T>(kh, d, R, cs, sn));
            vc[(size_t)pos * D + d] = vh[d];
        }
    }
    __syncthreads();  // also makes this block's K_T/V_T writes visible to its own threads

    // ---- 2a. scores
    const int r = tid / TPR, c = tid % TPR;
    float q[kMaxGroup][8];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) q[g][i] = g < G ? q_s[g][c * 8 + i] : 0.f;
    constexpr int NP = kSplitLen / RPP;  // passes over the split; all K and V loads issued up front
    uint4 kv[NP], vv[NP];
#pragma unroll
    for (int pp = 0; pp < NP; ++pp) {
        const int j = pp * RPP + r;
        kv[pp] = j < len ? *reinterpret_cast<const uint4 *>(kc + (size_t)(start + j) * D + c * 8)
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int pp = 0; pp < NP; ++pp) {
        const int j = pp * RPP + r;
        vv[pp] = j < len ? *reinterpret_cast<const uint4 *>(vc + (size_t)(start + j) * D + c * 8)
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int pp = 0; pp < NP; ++pp) {
        const int j = pp * RPP + r;
        float kf[8];
        unpack8<T>(kv[pp], kf);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g < G) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) s = fmaf(q[g][i], kf[i], s);
#pragma unroll
                for (int o = TPR / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (c == 0 && j < len) p_s[g][j] = s;
            }
        }
    }
    __syncthreads();

    // ---- 2b. softmax statistics per head (one warp per head)
    for (int g = warp; g < G; g += kAttnThreads / kWarp) {
        float m = -INFINITY;
        for (int j = lane; j < len; j += kWarp) m = fmaxf(m, p_s[g][j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = lane; j < len; j += kWarp) {
            const float e = __expf(p_s[g][j] - m);
            p_s[g][j] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) { m_s[g] = m; l_s[g] = l; }
    }
    __syncthreads();

    // ---- 2c. acc = sum_j p_j V_j
    float acc[kMaxGroup][8];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
#pragma unroll
    for (int pp = 0; pp < NP; ++pp) {
        const int j = pp * RPP + r;
        if (j < len) {
            float vf[8];
            unpack8<T>(vv[pp], vf);
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g) {
                if (g < G) {
                    const float p = p_s[g][j];
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
                }
            }
        }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
        if (g < G) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float v = acc[g][i];
#pragma unroll
                for (int o = TPR; o < kWarp; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane < TPR) acc_w[warp][g][c * 8 + i] = v;
            }
        }
    }
    __syncthreads();
    // sum of the warps' partials in a fixed order: the kernel is deterministic
    auto acc_of = [&](int g, int d) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kAttnThreads / kWarp; ++w) v += acc_w[w][g][d];
        return v;
    };

    T *ctx = reinterpret_cast<T *>(a.ctx);
    if (nsplit == 1) {  // short sequence: no merge needed
        for (int i = tid; i < G * D; i += blockDim.x) {
            const int g = i / D, d = i % D;
            ctx[(size_t)(kvh * G + g) * D + d] = from_f<T>(acc_of(g, d) / l_s[g]);
        }
        return;
    }

    // ---- 3. partials, then the last block of this KV head merges them
    for (int i = tid; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D, h = kvh * G + g;
        a.part_acc[((size_t)h * a.max_splits + split) * D + d] = acc_of(g, d);
    }
    if (tid < G) {
        const int h = kvh * G + tid;
        a.part_ml[((size_t)h * a.max_splits + split) * 2 + 0] = m_s[tid];
        a.part_ml[((size_t)h * a.max_splits + split) * 2 + 1] = l_s[tid];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last_s = atomicAdd(&a.counters[kvh], 1) == nsplit - 1;
    __syncthreads();
    if (!last_s) return;
    if (tid == 0) a.counters[kvh] = 0;  // ready for the next launch
    __threadfence();
    for (int i = tid; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D, h = kvh * G + g;
        const float *ml = a.part_ml + (size_t)h * a.max_splits * 2;
        const float *pa = a.part_acc + (size_t)h * a.max_splits * D + d;
        // 4 splits per iteration: independent L2 loads in flight instead of a serial chain
        float M = -INFINITY;
        for (int s0 = 0; s0 < nsplit; s0 += 4) {
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (s0 + u < nsplit) M = fmaxf(M, __ldcg(ml + 2 * (s0 + u)));
        }
        float L = 0.f, o = 0.f;
        for (int s0 = 0; s0 < nsplit; s0 += 4) {
            float m4[4], l4[4], a4[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const bool ok = s0 + u < nsplit;
                m4[u] = ok ? __ldcg(ml + 2 * (s0 + u)) : -INFINITY;
                l4[u] = ok ? __ldcg(ml + 2 * (s0 + u) + 1) : 0.f;
                a4[u] = ok ? __ldcg(pa + (size_t)(s0 + u) * D) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const float w = __expf(m4[u] - M);
                L = fmaf(l4[u], w, L);
                o = fmaf(a4[u], w, o);
            }
        }
        ctx[(size_t)h * D + d] = from_f<T>(o / L);
    }
}

template <typename T>
static void launch_t(const AttnArgs &a, cudaStream_t st) {
    const dim3 grid(a.Hkv, a.grid_splits);
    switch (a.D) {
        case 32: launch_pdl(attn_kernel<T, 32>, grid, kAttnThreads, 0, st, a); break;
        case 64: launch_pdl(attn_kernel<T, 64>, grid, kAttnThreads, 0, st, a); break;
        case 128: launch_pdl(attn_kernel<T, 128>, grid, kAttnThreads, 0, st, a); break;
        case 256: launch_pdl(attn_kernel<T, 256>, grid, kAttnThreads, 0, st, a); break;
        default: throw std::runtime_error("attention: head_dim must be 32, 64, 128 or 256");
    }
}

void launch_attention(const AttnArgs &a, int dtype, cudaStream_t st) {
    if (a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > kMaxGroup)
        throw std::runtime_error("attention: query heads per KV head must be <= 8");
    if (dtype == kF16) launch_t<half>(a, st); else launch_t<__nv_bfloat16>(a, st);
}

}  // namespace case4
