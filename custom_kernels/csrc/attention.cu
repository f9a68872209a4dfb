// attention.cu -- decode attention (flash-decoding) with fused RoPE and K/V write.
//
// Grid (Hq / G, splits): block row x takes G query heads (G = 1, or the whole group of a KV head when
// it has more than 4 query heads). The positions are cut into block-chunks of NG * 64; nblk blocks
// of the row are at work (one for up to kAttnChunksPerBlock block-chunks, else one per block-chunk,
// at most gridDim.y), block y takes the block-chunks y, y + nblk, .... A block holds NG groups of
// 128 threads; D/8 threads share a K/V row (8 columns each), so a group covers RPP = 128 / (D/8)
// rows per pass, and pass pp of group g holds the positions pp * NG * RPP + g * RPP + [0, RPP) of
// the block-chunk: a short sequence keeps every group busy. Per block:
//   1. before griddepcontrol.wait: T (launch constant, or seq_len_dev in a dynamic graph) and the K/V
//      rows < T of its first block-chunk into registers (see the kernel for why that is safe);
//   2. one L2 round trip: each thread's 8 columns of q (and their RoPE partners) and the RoPE table
//      entries; the thread of row T also K_T and V_T. Rotate; the block of the KV head's first query
//      head writes K_T and V_T into the arena. When the QKV gemv has rotated q and k already
//      (AttnArgs::prerotated, gemv_rope_fits), only q, K_T and V_T are loaded;
//   3. registers only: the scores of a thread's rows (shuffles over the D/8 threads of a row), their
//      max, sum and sum_j p_j V_j, carried over the block's block-chunks (online softmax; the rows of
//      a later block-chunk are loaded after the earlier one's are used), then merged over the rows of
//      the warp by shuffles;
//   4. one (max, sum, acc) per warp into shared memory, one barrier, the merge over the warps in a
//      fixed order (deterministic) -> ctx. Several blocks at work: each writes a partial, and the last
//      block of the row to finish (atomic counter, reset to 0 after: graph-safe) merges them.
#include <algorithm>

#include "common.cuh"
#include "ops.h"

namespace case4 {

constexpr int kAttnGroup = 128;  // threads per group
// Up to kAttnChunksPerBlock block-chunks of positions, one block takes them all (it loops: the rows
// of its second block-chunk are one L2 round trip after the wait); past that, one block per
// block-chunk (at most gridDim.y) and the merge of 4b (its fence, counter and partial reads are
// three round trips behind the next kernel's weight preload). performance.md, log entry 18
constexpr int kAttnChunksPerBlock = 2;

// Groups per block for (head_dim, max heads per block GM): the per-thread K/V registers
// (2 * 64 / (128 / (D/8)) vectors) and q/acc (2 * GM * 8 floats) must fit.
__host__ __device__ constexpr int attn_groups(int D, int GM) {
    return D >= 256 ? 1 : (GM >= 8 || GM * D >= 512) ? 2 : 4;
}

// Query heads per block
static int attn_heads_per_block(int Hq, int Hkv, bool per_kv_head) {
    // one block row per query head (shorter serial work per block; the G block rows of a KV head
    // read its rows at the same time, mostly from L2), except for groups of more than 4 (their K/V
    // would be read G times over at long T)
    const int G = Hq / Hkv;
    return per_kv_head || G > 4 ? G : 1;
}

// The kernel's parameter: the fields of AttnArgs it reads, in 128 bytes (sizes as 16-bit fields). nvcc reads
// the fields of a kernel parameter of at most 128 bytes at fixed constant offsets; AttnArgs itself (176 bytes)
// is addressed through a register in the PTX (see GemvArgs in ops.h; performance.md log entry 31).
struct AttnKArgs {
    const void *qkv;
    void *k_cache, *v_cache;
    const float *rope_cos, *rope_sin;
    const int *pos_dev;
    float *part_acc, *part_ml;
    int *counters;
    void *ctx;
    unsigned long long *trace;
    const void *w_o;
    unsigned long long *o_sum;
    int max_seq, pos;
    short rotary_dim, Hq, Hkv, heads_per_block, solo_len, max_splits, H, o_parts;
};
static_assert(sizeof(AttnKArgs) <= 128, "attention's kernel parameter: at most 128 bytes");

// ---- fused O (AttnArgs::o_parts): W_o (row, 8-column vector) pairs per lane, held in registers from before the
// wait; a part's rows are split evenly over the warps, and the D/8 lanes of a row slice are aligned in the warp
// (3: SmolLM2's 9 rows per warp at P = 4 take 3 passes of 4 rows; with 4, every warp ran a 4th pass of FMAs and
// shuffles for no row. 3 took the tail after ctx from 0.71 to 0.64 us: performance.md log entry 33)
constexpr int kOU = 3;

// this warp's pair u: the W_o row (or -1: none) and the 8-column vector of the head's D columns
template <int D>
__device__ __forceinline__ int o_pair_row(const AttnKArgs &a, int part, int warp, int nw, int lane, int u, int &vec) {
    constexpr int TPRO = D / 8;
    const int rb = (a.H + a.o_parts - 1) / a.o_parts, lo = part * rb, hi = min(a.H, lo + rb);
    const int rpw = (rb + nw - 1) / nw;
    const int f = lane + u * kWarp, rl = f / TPRO;
    vec = f % TPRO;
    const int row = lo + warp * rpw + rl;
    return rl < rpw && row < hi ? row : -1;
}

// o_sum[row] += sum over the head's D columns of W_o[row, h * D + c] * ctx[c] (ctx: the head's rounded
// attention output, in shared memory; whole block, after a barrier), in fixed point (o_fix: integer adds, so
// the sum over the heads does not depend on their order)
template <typename T, int D, int NW>
__device__ void o_tail(const AttnKArgs &a, int h, int part, const float *ctx_s, const uint4 (&wo)[kOU]) {
    constexpr int TPRO = D / 8;
    static_assert(kWarp % TPRO == 0, "a row's lanes lie in one warp");
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    constexpr int nw = NW;  // warps per block: a constant divisor (no integer division in the tail)
#pragma unroll
    for (int u = 0; u < kOU; ++u) {
        int vec;
        const int row = o_pair_row<D>(a, part, warp, nw, lane, u, vec);
        float wf[8];
        unpack8<T>(wo[u], wf);  // zero where row < 0
        const float4 c0 = reinterpret_cast<const float4 *>(ctx_s)[2 * vec];
        const float4 c1 = reinterpret_cast<const float4 *>(ctx_s)[2 * vec + 1];
        float s = wf[0] * c0.x;
        s = fmaf(wf[1], c0.y, s); s = fmaf(wf[2], c0.z, s); s = fmaf(wf[3], c0.w, s);
        s = fmaf(wf[4], c1.x, s); s = fmaf(wf[5], c1.y, s); s = fmaf(wf[6], c1.z, s); s = fmaf(wf[7], c1.w, s);
#pragma unroll
        for (int o = TPRO / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (row >= 0 && vec == 0) atomicAdd(a.o_sum + row, o_fix(s));  // red.add.u64
    }
}

// ---- 4b. the last block of a block row to finish merges the nblk per-block partials of its G query
// heads into ctx (with O fused: the head's ctx into ctx_s, rounded; the caller runs o_tail). Partial slots of
// block row sr (= the query head, or the block row with O fused). Returns whether this block merged.
template <typename T, int D>
__device__ bool merge_block_partials(const AttnKArgs &a, int qb, int h0, int G, int nblk, int sr, float *ctx_s) {
    __shared__ int last_s;
    const int tid = threadIdx.x;
    __threadfence();
    __syncthreads();
    if (tid == 0) last_s = atomicAdd(&a.counters[qb], 1) == nblk - 1;
    __syncthreads();
    if (!last_s) return false;
    if (tid == 0) a.counters[qb] = 0;  // ready for the next launch
    __threadfence();
    T *ctx = reinterpret_cast<T *>(a.ctx);
    for (int i = tid; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D, h = h0 + g, hs = ctx_s ? sr : h;
        const float *ml = a.part_ml + (size_t)hs * a.max_splits * 2;
        const float *pa = a.part_acc + (size_t)hs * a.max_splits * D + d;
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
        if (ctx_s) ctx_s[d] = round_t<T>(o / L);
        else ctx[(size_t)h * D + d] = from_f<T>(o / L);
    }
    return true;
}

// PRE: q and k in qkv are already rotated (AttnArgs::prerotated: the QKV gemv's fused RoPE), so step 2 only
// loads them. OF: O fused (AttnArgs::o_parts; GM = 1): the head's ctx stays in shared memory and the block
// multiplies its part of W_o's rows by it (o_tail)
template <typename T, int D, int GM, bool PRE, bool OF = false>
__global__ void __launch_bounds__(attn_groups(D, GM) * kAttnGroup, 1) attn_kernel(AttnKArgs a) {
    static_assert(!OF || GM == 1, "fused O: one query head per block");
    constexpr int NG = attn_groups(D, GM);
    constexpr int TPR = D / 8;                 // threads per K/V row
    constexpr int RPP = kAttnGroup / TPR;      // rows per pass of a group
    constexpr int NP = kSplitLen / RPP;        // passes over a block-chunk; all loads issued up front
    constexpr int NW = NG * kAttnGroup / kWarp;  // warps per block
    constexpr int BCL = NG * kSplitLen;        // positions per block-chunk
    __shared__ float acc_w[NW][GM][D];         // per-warp (max, sum, acc) of its rows
    __shared__ float m_w[NW][GM], l_w[NW][GM];
    __shared__ volatile unsigned sink_s[NG * kAttnGroup];  // kv_in's stores (timeline)
    __shared__ __align__(16) float ctx_s[OF ? D : 1];      // OF: the head's ctx (rounded to T)

    const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
    const int grp = tid / kAttnGroup, gt = tid % kAttnGroup;
    const int r = gt / TPR, c = gt % TPR, d0 = c * 8;
    const int G = a.heads_per_block;  // query heads of this block: a KV head's whole group, or one
    // block row qb: query-head group, and with O fused the part of W_o's rows (qb = part * Hq / G + group)
    const int qb = blockIdx.x, part = OF ? qb / (a.Hq / G) : 0;
    const int h0 = (OF ? qb % (a.Hq / G) : qb) * G, kvh = h0 / (a.Hq / a.Hkv);  // first query head, its KV head
    const int sr = OF ? qb : h0;  // partial slots (split-KV) of this block row (OF: G = 1)
    T *kc = reinterpret_cast<T *>(a.k_cache) + (size_t)kvh * a.max_seq * D;
    T *vc = reinterpret_cast<T *>(a.v_cache) + (size_t)kvh * a.max_seq * D;

    auto row_of = [&](int pp) { return pp * NG * RPP + grp * RPP + r; };  // in the block-chunk
    uint4 kv[NP], vv[NP];
    auto load_kv = [&](int bc, int pos) {
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) {
            const int p = bc * BCL + row_of(pp);
            kv[pp] = p < pos ? *reinterpret_cast<const uint4 *>(kc + (size_t)p * D + d0) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) {
            const int p = bc * BCL + row_of(pp);
            vv[pp] = p < pos ? *reinterpret_cast<const uint4 *>(vc + (size_t)p * D + d0) : make_uint4(0, 0, 0, 0);
        }
    };
    // timeline only: wait until this thread's K (or V) rows are in registers (a store that depends
    // on every word), to mark when the rows read ahead of the wait have arrived
    auto kv_in = [&](const uint4 (&x)[NP]) {
        unsigned s = 0;
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) s ^= x[pp].x ^ x[pp].y ^ x[pp].z ^ x[pp].w;
        sink_s[tid] = s;
    };
    ktrace(a.trace, 0);
    // ---- 1. T and the K/V rows < T are read before the wait. They were written by the previous
    // steps: a step sets seq_len only after every earlier kernel of it has completed (lm_head after
    // its wait, or finish after its wait) and the finish kernel lets the next kernels launch only
    // after its wait, so after that write (sampling.cu). So when any kernel of this step is running,
    // all kernels of earlier steps have completed, and seq_len_dev (dynamic graph) and the rows < T
    // are final.
    const int pos = read_pos(a.pos, a.pos_dev);
    const int n = pos + 1;
    const int nchunk = (n + BCL - 1) / BCL;  // block-chunks
    const int nblk = n <= a.solo_len ? 1 : min((int)gridDim.y, nchunk);  // blocks of the row at work
    if ((int)blockIdx.y >= nblk) {         // idle block row (a dynamic graph's grid is sized for max_seq)
        ktrace_end(a.trace);
        return;
    }
    load_kv(blockIdx.y, pos);
    // the thread of row T: block-chunk bc_t (taken by block row bc_t % nblk), pass, group, row
    const int bc_t = pos / BCL, off_t = pos % BCL;
    const int pp_t = off_t / (NG * RPP), grp_t = off_t % (NG * RPP) / RPP, r_t = off_t % RPP;
    const bool holds_t = bc_t % nblk == (int)blockIdx.y && grp == grp_t && r == r_t;
    const bool writes_t = holds_t && h0 % (a.Hq / a.Hkv) == 0 && part == 0;
    // OF: this warp's W_o pairs (weights: read-only, so before the wait)
    uint4 wo[OF ? kOU : 1];
    if constexpr (OF) {
        const uint64_t pol = l2_policy(true);
        const uint4 *W = reinterpret_cast<const uint4 *>(a.w_o);
        const size_t row_vecs = (size_t)a.Hq * D / 8;
#pragma unroll
        for (int u = 0; u < kOU; ++u) {
            int vec;
            const int row = o_pair_row<D>(a, part, warp, NW, lane, u, vec);
            wo[u] = row >= 0 ? ld_stream(W + row * row_vecs + (size_t)h0 * D / 8 + vec, pol) : make_uint4(0, 0, 0, 0);
        }
    }
    pdl_trigger();
    pdl_wait();
    ktrace(a.trace, 1);

    // ---- 2. q (G heads), K_T and V_T: every load issued before any is used (one L2 round trip)
    // RoPE table entries of this thread's 8 columns at row T (hot in L2: every layer reads this row)
    const int R = a.rotary_dim, half_r = R / 2;
    float cs[8], sn[8];  // unused with PRE
    if (PRE) {  // nothing to load
    } else if (d0 < R && half_r % 8 == 0) {  // 8 consecutive entries: two 16-byte loads per table
        const size_t j = (size_t)pos * half_r + (d0 < half_r ? d0 : d0 - half_r);
        const float4 c0 = *reinterpret_cast<const float4 *>(a.rope_cos + j), c1 = *reinterpret_cast<const float4 *>(a.rope_cos + j + 4);
        const float4 s0 = *reinterpret_cast<const float4 *>(a.rope_sin + j), s1 = *reinterpret_cast<const float4 *>(a.rope_sin + j + 4);
        cs[0] = c0.x; cs[1] = c0.y; cs[2] = c0.z; cs[3] = c0.w; cs[4] = c1.x; cs[5] = c1.y; cs[6] = c1.z; cs[7] = c1.w;
        sn[0] = s0.x; sn[1] = s0.y; sn[2] = s0.z; sn[3] = s0.w; sn[4] = s1.x; sn[5] = s1.y; sn[6] = s1.z; sn[7] = s1.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = d0 + i, j = d < half_r ? d : d - half_r;
            cs[i] = d < R ? a.rope_cos[(size_t)pos * half_r + j] : 1.f;
            sn[i] = d < R ? a.rope_sin[(size_t)pos * half_r + j] : 0.f;
        }
    }
    const T *qkv = reinterpret_cast<const T *>(a.qkv);
    // RoPE partner of column d < R is d +- R/2: with R/2 % 8 == 0 (every real model) the partners
    // of a thread's 8 columns are one 16-byte vector, otherwise 8 scalars
    auto load_partner = [&](const T *src) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (PRE || d0 >= R) return v;
        if (half_r % 8 == 0) return *reinterpret_cast<const uint4 *>(src + (d0 < half_r ? d0 + half_r : d0 - half_r));
        T *e = reinterpret_cast<T *>(&v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = d0 + i;
            e[i] = d < R ? src[d < half_r ? d + half_r : d - half_r] : src[d];
        }
        return v;
    };
    uint4 qr[GM], qp[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        if (g < G) {
            const T *src = qkv + (size_t)(h0 + g) * D;
            qr[g] = *reinterpret_cast<const uint4 *>(src + d0);
            qp[g] = load_partner(src);
        }
    }
    uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0), kp = make_uint4(0, 0, 0, 0);
    if (holds_t) {
        const T *ks = qkv + (size_t)(a.Hq + kvh) * D, *vs = qkv + (size_t)(a.Hq + a.Hkv + kvh) * D;
        kr = *reinterpret_cast<const uint4 *>(ks + d0);
        vr = *reinterpret_cast<const uint4 *>(vs + d0);
        kp = load_partner(ks);
    }
    // rotate (fp32 tables, rounded once to T, as the reference); q scaled by 1/sqrt(D)
    auto rotate = [&](const uint4 &x, const uint4 &pv, float (&f)[8]) {
        unpack8<T>(x, f);
        if (PRE) return;
        float p[8];
        unpack8<T>(pv, p);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = d0 + i;
            if (d < R) f[i] = rope_rotate<T>(f[i], p[i], cs[i], sn[i], d < half_r);
        }
    };
    const float scale = rsqrtf((float)D);
    float q[GM][8];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        float f[8];
        if (g < G) {
            rotate(qr[g], qp[g], f);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) f[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) q[g][i] = f[i] * scale;
    }
    uint4 kt = kr;
    if (holds_t) {
        if (!PRE) {
            float f[8];
            rotate(kr, kp, f);
            kt = pack8<T>(f);  // exact: f is already rounded to T
        }
        if (writes_t) {
            *reinterpret_cast<uint4 *>(kc + (size_t)pos * D + d0) = kt;
            *reinterpret_cast<uint4 *>(vc + (size_t)pos * D + d0) = vr;
        }
    }
    ktrace_mark(a.trace, 3);  // q rotated, K_T / V_T in registers (this block's thread 0)
    if (a.trace) {  // timeline only: when the rows < T (loaded before the wait) are in
        kv_in(kv);
        __syncthreads();
        ktrace_mark(a.trace, 10);
        kv_in(vv);
        __syncthreads();
        ktrace_mark(a.trace, 11);
    }

    // ---- 3. block-chunks bc = blockIdx.y, + nblk, ...: the scores of this thread's rows (passes
    // wholly past the end, the same for the whole group, are skipped), their max, sum and
    // sum_j p_j V_j, carried over the block-chunks in registers (online softmax)
    float m[GM], l[GM], acc[GM][8];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
    }
    for (int bc = blockIdx.y; bc < nchunk; bc += nblk) {
        if (bc != (int)blockIdx.y) load_kv(bc, pos);
        const int len = n - bc * BCL;  // positions of this block-chunk (row_of(pp) < len: a real row)
        if (holds_t && bc == bc_t) {
#pragma unroll
            for (int pp = 0; pp < NP; ++pp)
                if (pp == pp_t) { kv[pp] = kt; vv[pp] = vr; }
        }
        float s[NP][GM];
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) {
#pragma unroll
            for (int g = 0; g < GM; ++g) s[pp][g] = -INFINITY;
            if (row_of(pp) - r >= len) continue;  // the group's whole pass is past the end
            const bool ok = row_of(pp) < len;
            float kf[8];
            unpack8<T>(kv[pp], kf);
#pragma unroll
            for (int g = 0; g < GM; ++g) {
                if (g < G) {
                    float x = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; ++i) x = fmaf(q[g][i], kf[i], x);
#pragma unroll
                    for (int o = TPR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
                    if (ok) s[pp][g] = x;
                }
            }
        }
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            float mn = m[g];
#pragma unroll
            for (int pp = 0; pp < NP; ++pp) mn = fmaxf(mn, s[pp][g]);
            const float ms = mn == -INFINITY ? 0.f : mn;  // no rows yet: every p = 0
            const float w = __expf(m[g] - ms);            // rescale the earlier block-chunks (0 if none)
            l[g] *= w;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] *= w;
            m[g] = mn;
#pragma unroll
            for (int pp = 0; pp < NP; ++pp) {
                if (row_of(pp) - r >= len) continue;
                const float p = __expf(s[pp][g] - ms);
                l[g] += p;
                float vf[8];
                unpack8<T>(vv[pp], vf);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
            }
        }
    }  // block-chunks
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        // merge the rows of the warp (lanes of the same columns)
#pragma unroll
        for (int o = TPR; o < kWarp; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float l2 = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float M = fmaxf(m[g], m2), Ms = M == -INFINITY ? 0.f : M;
            const float w1 = __expf(m[g] - Ms), w2 = __expf(m2 - Ms);
            l[g] = l[g] * w1 + l2 * w2;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * w1 + __shfl_xor_sync(0xffffffffu, acc[g][i], o) * w2;
            m[g] = M;
        }
        if (g < G && lane < TPR) {
#pragma unroll
            for (int i = 0; i < 8; ++i) acc_w[warp][g][d0 + i] = acc[g][i];
            if (lane == 0) { m_w[warp][g] = m[g]; l_w[warp][g] = l[g]; }
        }
    }
    ktrace_mark(a.trace, 4);  // this block's thread 0: its rows done
    __syncthreads();
    ktrace_mark(a.trace, 5);  // every warp's partial in shared memory

    // ---- 4. merge the warps in a fixed order (a warp without rows has m = -inf, l = 0, acc = 0),
    // then ctx or the block's partial
    T *ctx = reinterpret_cast<T *>(a.ctx);
    for (int i = tid; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        float mw[NW], M = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            mw[w] = m_w[w][g];
            M = fmaxf(M, mw[w]);
        }
        float L = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float e = __expf(mw[w] - M);
            L = fmaf(l_w[w][g], e, L);
            o = fmaf(acc_w[w][g][d], e, o);
        }
        const int h = h0 + g, hs = OF ? sr : h;
        if (nblk == 1) {
            if (OF) ctx_s[d] = round_t<T>(o / L);
            else ctx[(size_t)h * D + d] = from_f<T>(o / L);
        } else {
            a.part_acc[((size_t)hs * a.max_splits + blockIdx.y) * D + d] = o;
            if (d == 0) {
                a.part_ml[((size_t)hs * a.max_splits + blockIdx.y) * 2 + 0] = M;
                a.part_ml[((size_t)hs * a.max_splits + blockIdx.y) * 2 + 1] = L;
            }
        }
    }
    ktrace_mark(a.trace, 7);  // ctx (one block-chunk) or partials written
    bool has_ctx = nblk == 1;
    if (nblk > 1) has_ctx = merge_block_partials<T, D>(a, qb, h0, G, nblk, sr, OF ? ctx_s : nullptr);
    if constexpr (OF) {
        if (has_ctx) {  // block-uniform
            __syncthreads();
            o_tail<T, D, NW>(a, h0, part, ctx_s, wo);
        }
    }
    ktrace_end(a.trace);
}

// Launch: NG groups per block (attn_groups); the block-chunks of a query-head group are spread over
// at most max(1, SMs / (Hq / G)) block rows (one wave; a block loops over its block-chunks), so a
// dynamic graph's grid (sized for max_seq) has no long tail of idle blocks.
template <typename T, int D, int GM>
static void launch_dg(const AttnArgs &a, const Launch &L) {
    constexpr int ng = attn_groups(D, GM);
    auto s16 = [](int v) {
        if (v < 0 || v > 32767) throw std::runtime_error("attention: a size beyond the kernel's 16-bit fields");
        return (short)v;
    };
    AttnKArgs k;
    k.qkv = a.qkv; k.k_cache = a.k_cache; k.v_cache = a.v_cache; k.rope_cos = a.rope_cos; k.rope_sin = a.rope_sin;
    k.pos_dev = a.pos_dev; k.part_acc = a.part_acc; k.part_ml = a.part_ml; k.counters = a.counters; k.ctx = a.ctx;
    k.trace = L.slot("attention");
    k.w_o = a.w_o; k.o_sum = a.o_sum;
    k.max_seq = a.max_seq; k.pos = a.pos;
    k.rotary_dim = s16(a.rotary_dim); k.Hq = s16(a.Hq); k.Hkv = s16(a.Hkv); k.heads_per_block = s16(a.heads_per_block);
    k.solo_len = s16(ng * kSplitLen * kAttnChunksPerBlock);
    k.max_splits = s16(a.max_splits); k.H = s16(a.H); k.o_parts = s16(a.o_parts);
    const int nblk = (a.grid_splits + ng - 1) / ng;  // block-chunks of the longest sequence
    const int rows = a.Hq / a.heads_per_block * std::max(1, a.o_parts);  // blocks along x: head groups (x parts)
    const int per_head = std::max(1, a.sm_count / rows);
    const dim3 grid(rows, std::min(nblk, per_head));
    if (a.o_parts > 0) {
        if constexpr (GM == 1) {
            if (a.prerotated) launch_pdl(L, attn_kernel<T, D, 1, true, true>, grid, ng * kAttnGroup, 0, k);
            else launch_pdl(L, attn_kernel<T, D, 1, false, true>, grid, ng * kAttnGroup, 0, k);
        } else {
            throw std::runtime_error("attention: fused O needs one query head per block");
        }
    } else if (a.prerotated) {
        launch_pdl(L, attn_kernel<T, D, GM, true>, grid, ng * kAttnGroup, 0, k);
    } else {
        launch_pdl(L, attn_kernel<T, D, GM, false>, grid, ng * kAttnGroup, 0, k);
    }
}

template <typename T, int D>
static void launch_d(const AttnArgs &a, const Launch &L) {
    const int G = a.heads_per_block;
    if (G <= 1) launch_dg<T, D, 1>(a, L);
    else if (G <= 2) launch_dg<T, D, 2>(a, L);
    else if (G <= 4) launch_dg<T, D, 4>(a, L);
    else launch_dg<T, D, 8>(a, L);
}

template <typename T>
static void launch_t(const AttnArgs &a, const Launch &L) {
    switch (a.D) {
        case 32: launch_d<T, 32>(a, L); break;
        case 64: launch_d<T, 64>(a, L); break;
        case 128: launch_d<T, 128>(a, L); break;
        case 256: launch_d<T, 256>(a, L); break;
        default: throw std::runtime_error("attention: head_dim must be 32, 64, 128 or 256");
    }
}

void launch_attention(const AttnArgs &a, int dtype, const Launch &L) {
    if (a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > kMaxGroup)
        throw std::runtime_error("attention: query heads per KV head must be <= 8");
    if (a.sm_count <= 0) throw std::runtime_error("attention: sm_count must be set");
    AttnArgs b = a;
    b.heads_per_block = attn_heads_per_block(a.Hq, a.Hkv, a.per_kv_head != 0);
    if (a.o_parts > 0 && (a.o_parts != attn_o_parts(a.H, a.Hq, a.Hkv, a.D) || b.heads_per_block != 1 || !a.w_o ||
                          !a.o_sum))
        throw std::runtime_error("attention: fused O needs attn_o_parts' parts, one query head per block, w_o and o_sum");
    if (dtype == kF16) launch_t<half>(b, L); else launch_t<__nv_bfloat16>(b, L);
}

int attn_o_parts(int H, int Hq, int Hkv, int D) {
    if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > 4 || H <= 0 || H % 8 != 0 || H > 1024) return 0;
    if (D != 32 && D != 64 && D != 128 && D != 256) return 0;
    if ((size_t)H * Hq * D * 2 > ((size_t)4 << 20)) return 0;
    const int nw = attn_groups(D, 1) * kAttnGroup / kWarp;
    int P = 1;
    for (; P <= kMaxOParts; ++P) {
        const int rb = (H + P - 1) / P, rpw = (rb + nw - 1) / nw;
        if (rpw * (D / 8) <= kWarp * kOU) break;
    }
    if (P > kMaxOParts) return 0;
    while (Hq * P < 32 && P < kMaxOParts) ++P;  // enough blocks that each one's share of W_o is small
    return P;
}

}  // namespace case4
