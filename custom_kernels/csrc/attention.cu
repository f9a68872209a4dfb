// attention.cu -- decode attention (flash-decoding) with fused RoPE and K/V write.
//
// Positions are cut into 64-row chunks (kSplitLen). A block of KV head h holds NG 128-thread
// groups, one chunk each (NG = 1, 2 or 4, picked by the host: see launch_dg), and takes the
// block-chunks b, b + gridDim.y, ... of NG consecutive chunks, so every K/V row is read once. A
// short sequence (up to 256 positions) fits in one block per KV head and needs no cross-block merge.
//   1. T (launch constant, or seq_len_dev in a dynamic graph) and the K/V rows of earlier
//      positions go into registers before griddepcontrol.wait (see the kernel for why it is safe);
//   2. rotate the group's query heads (fp32 tables); K_T is rotated, K_T and V_T are written into
//      the arena and handed to the thread of row T through shared memory (one L2 round trip);
//   3. per group: scores q.k (D/8 threads per row, one 16-byte vector each), softmax statistics,
//      sum_j p_j V_j; the groups are merged in shared memory (fixed order: deterministic);
//   4. one block-chunk per KV head: write ctx. Several: write (max, sum, acc) partials, and the
//      last block to finish (atomic counter per KV head) merges them and resets the counter to 0,
//      so the kernel is graph-safe and needs no second launch.
#include <algorithm>

#include "common.cuh"
#include "ops.h"
#include "rope.cuh"

namespace case4 {

constexpr int kAttnGroup = 128;  // threads per 64-position chunk

// Per (head_dim, max group size GM): how many chunk groups one block may hold, so that the
// per-thread K/V registers (2 * 64 / (128 / (D/8)) vectors) and q/acc (2 * GM * 8 floats) fit.
__host__ __device__ constexpr int attn_max_groups(int D, int GM) {
    return D >= 256 ? 1 : (GM >= 8 || GM * D >= 512) ? 2 : 4;
}

template <typename T, int D, int GM>
__global__ void __launch_bounds__(attn_max_groups(D, GM) * kAttnGroup, 1) attn_kernel(AttnArgs a) {
    constexpr int NGM = attn_max_groups(D, GM);
    constexpr int TPR = D / 8;                 // threads per K/V row
    constexpr int RPP = kAttnGroup / TPR;      // rows per pass of a group
    constexpr int NP = kSplitLen / RPP;        // passes over the chunk; all loads issued up front
    constexpr int WPG = kAttnGroup / kWarp;    // warps per group
    __shared__ float q_s[GM][D];
    __shared__ uint4 kt_s[D / 8], vt_s[D / 8];  // this step's K_T (rotated) and V_T, dtype
    __shared__ float p_s[NGM][GM][kSplitLen];
    __shared__ float acc_w[NGM * WPG][GM][D];  // per-warp partial sums
    __shared__ float m_s[NGM][GM], l_s[NGM][GM];
    __shared__ int last_s;
    __shared__ volatile unsigned sink_s[attn_max_groups(D, GM) * kAttnGroup];  // kv_in's stores (timeline)

    const int NG = blockDim.x / kAttnGroup;
    const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
    const int grp = tid / kAttnGroup, gt = tid % kAttnGroup;
    const int r = gt / TPR, c = gt % TPR;
    const int G = a.heads_per_block;  // query heads of this block: a KV head's whole group, or part of it
    const int qb = blockIdx.x, h0 = qb * G, kvh = h0 / (a.Hq / a.Hkv);  // first query head, its KV head
    T *kc = reinterpret_cast<T *>(a.k_cache) + (size_t)kvh * a.max_seq * D;
    T *vc = reinterpret_cast<T *>(a.v_cache) + (size_t)kvh * a.max_seq * D;

    // ---- 1. K/V rows of positions < T of block-chunk bc (row T is this step's: shared memory)
    uint4 kv[NP], vv[NP];
    auto load_kv = [&](int bc, int pos) {
        const int start = (bc * NG + grp) * kSplitLen;
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) {
            const int p = start + pp * RPP + r;
            kv[pp] = p < pos ? *reinterpret_cast<const uint4 *>(kc + (size_t)p * D + c * 8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) {
            const int p = start + pp * RPP + r;
            vv[pp] = p < pos ? *reinterpret_cast<const uint4 *>(vc + (size_t)p * D + c * 8) : make_uint4(0, 0, 0, 0);
        }
    };
    // timeline only: wait until this thread's K (or V) rows are in registers (a store that depends
    // on every word), to mark when the rows read ahead of the wait have arrived
    auto kv_in = [&](const uint4 (&r)[NP]) {
        unsigned x = 0;
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) x ^= r[pp].x ^ r[pp].y ^ r[pp].z ^ r[pp].w;
        sink_s[tid] = x;
    };
    ktrace(a.trace, 0);
    // T and the K/V rows < T are read before the wait. They were written by the previous steps:
    // the step's sampling kernel (finish) sets seq_len only after its own wait -- so after every
    // earlier kernel has completed -- and lets the next kernels launch only after that write
    // (sampling.cu). So when any kernel of this step is running, all kernels of earlier steps have
    // completed, and seq_len_dev (dynamic graph) and the rows < T are final.
    const int pos = read_pos(a.pos, a.pos_dev);
    const int n = pos + 1;
    const int nchunk = (n + kSplitLen - 1) / kSplitLen;
    const int nblk = (nchunk + NG - 1) / NG;  // block-chunks of NG chunks; this block takes
    if ((int)blockIdx.y >= nblk) {            // blockIdx.y, + gridDim.y, ... (idle: exit)
        ktrace_end(a.trace);
        return;
    }
    load_kv(blockIdx.y, pos);
    pdl_trigger();
    pdl_wait();
    ktrace(a.trace, 1);
    const int R = a.rotary_dim;
    const T *qkv = reinterpret_cast<const T *>(a.qkv);
    const float *cs = a.rope_cos + (size_t)pos * (R / 2);
    const float *sn = a.rope_sin + (size_t)pos * (R / 2);

    // ---- 2. RoPE on the query group; K_T and V_T into shared memory (every block: D elements),
    // and into the arena by the block whose block-chunks include T. The (G + 2) D elements are
    // taken 4 per thread and round: every load of a round is issued before any result is stored,
    // so q, K_T and V_T arrive in one L2 round trip.
    const float scale = rsqrtf((float)D);
    const int bc_t = pos / kSplitLen / NG;  // block-chunk of T
    const bool writes_t = bc_t % gridDim.y == blockIdx.y && h0 % (a.Hq / a.Hkv) == 0;
    const int nel = (G + 2) * D;
    for (int i0 = tid; i0 < nel; i0 += 4 * blockDim.x) {
        float val[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = i0 + u * blockDim.x, hh = i / D, d = i % D;  // hh < G: query head; G: K; G + 1: V
            if (i < nel) {
                const T *src = qkv + (size_t)(hh < G ? h0 + hh : hh == G ? a.Hq + kvh : a.Hq + a.Hkv + kvh) * D;
                val[u] = hh <= G ? rope_elem<T>(src, d, R, cs, sn) : to_f(src[d]);
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = i0 + u * blockDim.x, hh = i / D, d = i % D;
            if (i >= nel) continue;
            if (hh < G) {
                q_s[hh][d] = val[u] * scale;
            } else {
                const T v = from_f<T>(val[u]);  // K_T rotated (already rounded), V_T raw: exact
                reinterpret_cast<T *>(hh == G ? kt_s : vt_s)[d] = v;
                if (writes_t) (hh == G ? kc : vc)[(size_t)pos * D + d] = v;
            }
        }
    }
    __syncthreads();
    ktrace_mark(a.trace, 3);  // q rotated, K_T / V_T staged
    if (a.trace) {  // timeline only: when the rows < T (loaded before the wait) are in
        kv_in(kv);
        __syncthreads();
        ktrace_mark(a.trace, 10);
        kv_in(vv);
        __syncthreads();
        ktrace_mark(a.trace, 11);
    }
    float q[GM][8];
#pragma unroll
    for (int g = 0; g < GM; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) q[g][i] = g < G ? q_s[g][c * 8 + i] : 0.f;
    T *ctx = reinterpret_cast<T *>(a.ctx);
    int iters = 0;
    for (int bc = blockIdx.y; bc < nblk; bc += gridDim.y, ++iters) {
        if (bc != (int)blockIdx.y) {
            __syncthreads();  // shared p_s / acc_w / m_s of the previous block-chunk are consumed
            load_kv(bc, pos);
        }
        const int start = (bc * NG + grp) * kSplitLen;    // this group's chunk
        const int len = max(0, min(kSplitLen, n - start));  // 0: idle group of the last block-chunk
        if (bc == bc_t) {
#pragma unroll
            for (int pp = 0; pp < NP; ++pp) {
                if (start + pp * RPP + r == pos) {
                    kv[pp] = kt_s[c];
                    vv[pp] = vt_s[c];
                }
            }
        }

        // ---- 3a. scores of this group's chunk (passes wholly past the end, the same for every
        // thread of the group, are skipped: short sequences leave most of a block idle)
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) {
            if (pp * RPP >= len) continue;
            const int j = pp * RPP + r;
            float kf[8];
            unpack8<T>(kv[pp], kf);
#pragma unroll
            for (int g = 0; g < GM; ++g) {
                if (g < G) {
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; ++i) s = fmaf(q[g][i], kf[i], s);
#pragma unroll
                    for (int o = TPR / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                    if (c == 0 && j < len) p_s[grp][g][j] = s;
                }
            }
        }
        __syncthreads();
        if (iters == 0) ktrace_mark(a.trace, 4);  // scores

        // ---- 3b. softmax statistics per (group, head): one warp of the group per head
        for (int g = warp % WPG; g < G; g += WPG) {
            float m = -INFINITY;
            for (int j = lane; j < len; j += kWarp) m = fmaxf(m, p_s[grp][g][j]);
            m = warp_max(m);
            float l = 0.f;
            for (int j = lane; j < len; j += kWarp) {
                const float e = __expf(p_s[grp][g][j] - m);
                p_s[grp][g][j] = e;
                l += e;
            }
            l = warp_sum(l);
            if (lane == 0) { m_s[grp][g] = m; l_s[grp][g] = l; }
        }
        __syncthreads();
        if (iters == 0) ktrace_mark(a.trace, 5);  // softmax statistics

        // ---- 3c. acc = sum_j p_j V_j over the chunk
        float acc[GM][8];
#pragma unroll
        for (int g = 0; g < GM; ++g)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) {
            const int j = pp * RPP + r;
            if (pp * RPP < len && j < len) {
                float vf[8];
                unpack8<T>(vv[pp], vf);
#pragma unroll
                for (int g = 0; g < GM; ++g) {
                    if (g < G) {
                        const float p = p_s[grp][g][j];
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g < G && len > 0) {  // an idle group's acc_w is never read (l = 0)
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
        if (iters == 0) ktrace_mark(a.trace, 6);  // sum_j p_j V_j

        // ---- 3d. merge the groups (fixed order), then ctx or the block-chunk's partial
        for (int i = tid; i < G * D; i += blockDim.x) {
            const int g = i / D, d = i % D;
            float M = -INFINITY;
            for (int q2 = 0; q2 < NG; ++q2) M = fmaxf(M, m_s[q2][g]);
            float L = 0.f, o = 0.f;
            for (int q2 = 0; q2 < NG; ++q2) {
                const float l = l_s[q2][g];
                if (l > 0.f) {  // an idle group (no rows) has l = 0, m = -inf
                    const float w = __expf(m_s[q2][g] - M);
                    float sacc = 0.f;
#pragma unroll
                    for (int w2 = 0; w2 < WPG; ++w2) sacc += acc_w[q2 * WPG + w2][g][d];
                    L = fmaf(l, w, L);
                    o = fmaf(sacc, w, o);
                }
            }
            const int h = h0 + g;
            if (nblk == 1) {
                ctx[(size_t)h * D + d] = from_f<T>(o / L);
            } else {
                a.part_acc[((size_t)h * a.max_splits + bc) * D + d] = o;
                if (d == 0) {
                    a.part_ml[((size_t)h * a.max_splits + bc) * 2 + 0] = M;
                    a.part_ml[((size_t)h * a.max_splits + bc) * 2 + 1] = L;
                }
            }
        }
    }  // block-chunks
    ktrace_mark(a.trace, 7);  // ctx (one block-chunk) or partials written
    if (nblk == 1) {
        ktrace_end(a.trace);
        return;
    }

    // ---- 4. the last block of this KV head to finish merges the nblk partials
    __threadfence();
    __syncthreads();
    if (tid == 0) last_s = atomicAdd(&a.counters[qb], iters) == nblk - iters;
    __syncthreads();
    if (!last_s) {
        ktrace_end(a.trace);
        return;
    }
    if (tid == 0) a.counters[qb] = 0;  // ready for the next launch
    __threadfence();
    for (int i = tid; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D, h = h0 + g;
        const float *ml = a.part_ml + (size_t)h * a.max_splits * 2;
        const float *pa = a.part_acc + (size_t)h * a.max_splits * D + d;
        // 4 partials per iteration: independent L2 loads in flight instead of a serial chain
        float M = -INFINITY;
        for (int s0 = 0; s0 < nblk; s0 += 4) {
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (s0 + u < nblk) M = fmaxf(M, __ldcg(ml + 2 * (s0 + u)));
        }
        float L = 0.f, o = 0.f;
        for (int s0 = 0; s0 < nblk; s0 += 4) {
            float m4[4], l4[4], a4[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const bool ok = s0 + u < nblk;
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
    ktrace_end(a.trace);
}

// Groups per block: the chunks of T+1 positions (dynamic graph: of max_seq) rounded up to a
// power of two, capped by attn_max_groups; the block-chunks of a KV head are spread over at most
// max(1, SMs / Hkv) blocks (one wave; a block loops over its block-chunks), so a dynamic graph's
// grid has no long tail of idle blocks.

template <typename T, int D, int GM>
static void launch_dg(const AttnArgs &a0, cudaStream_t st) {
    AttnArgs a = a0;
    a.trace = ktrace_slot("attention");
    const int cap = tuning() & kTuneAttnOneGroup ? 1 : attn_max_groups(D, GM);
    int ng = 1;
    while (ng < cap && ng < a.grid_splits) ng *= 2;
    const int nblk = (a.grid_splits + ng - 1) / ng;
    const int heads = a.Hq / a.heads_per_block;  // blocks along x: query-head groups
    const int per_head = std::max(1, a.sm_count / heads);
    const dim3 grid(heads, std::min(nblk, per_head));
    launch_pdl(attn_kernel<T, D, GM>, grid, ng * kAttnGroup, 0, st, a);
}

template <typename T, int D>
static void launch_d(const AttnArgs &a, cudaStream_t st) {
    const int G = a.heads_per_block;
    if (G <= 1) launch_dg<T, D, 1>(a, st);
    else if (G <= 2) launch_dg<T, D, 2>(a, st);
    else if (G <= 4) launch_dg<T, D, 4>(a, st);
    else launch_dg<T, D, 8>(a, st);
}

template <typename T>
static void launch_t(const AttnArgs &a, cudaStream_t st) {
    switch (a.D) {
        case 32: launch_d<T, 32>(a, st); break;
        case 64: launch_d<T, 64>(a, st); break;
        case 128: launch_d<T, 128>(a, st); break;
        case 256: launch_d<T, 256>(a, st); break;
        default: throw std::runtime_error("attention: head_dim must be 32, 64, 128 or 256");
    }
}

void launch_attention(const AttnArgs &a, int dtype, cudaStream_t st) {
    if (a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > kMaxGroup)
        throw std::runtime_error("attention: query heads per KV head must be <= 8");
    if (a.sm_count <= 0) throw std::runtime_error("attention: sm_count must be set");
    AttnArgs b = a;
    // one block row per query head (shorter serial score / PV / merge work per block; the G block
    // rows of a KV head read its rows at the same time, mostly from L2), except for groups of 8
    // (their K/V would be read 8 times over at long T)
    const int G = a.Hq / a.Hkv;
    b.heads_per_block = tuning() & kTuneAttnPerKvHead || G > 4 ? G : 1;
    if (dtype == kF16) launch_t<half>(b, st); else launch_t<__nv_bfloat16>(b, st);
}

}  // namespace case4
