// step.cu -- one decode step = the kernels of every layer, enqueued on one stream.
//
// Custom path, per layer (5 launches):
//   gemv[norm+QKV]  ->  attention[RoPE + K/V write + split-KV + merge]  ->  gemv[O + residual]
//   -> gemv[norm + gate|up + SwiGLU]  ->  gemv[down + residual]
// or, where attn_o_parts > 0 (small models), 4: O fused into attention (its rows summed over the heads in fixed
// point), gate|up adding O to x (into xn), down adding xn (and zeroing the sums).
// plus gemv[final norm + lm_head -> fp32 logits] and finish[sampling, seq_len += 1] (seq_len advanced by lm_head
// instead where it is lm_small_kernel: GemvLmArgs).
// The embedding gather is fused into layer 0's QKV gemv (it also fills the residual x).
// cuBLAS path (A/B): RMSNorm, cublasGemmEx per linear and elementwise epilogues.
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"
#include "step.h"

namespace case4 {

#define CASE4_CUBLAS_CHECK(expr)                                                                  \
    do {                                                                                          \
        cublasStatus_t st__ = (expr);                                                             \
        if (st__ != CUBLAS_STATUS_SUCCESS)                                                        \
            throw std::runtime_error(std::string("cuBLAS error ") + std::to_string((int)st__) +  \
                                     " at " __FILE__ ":" + std::to_string(__LINE__));             \
    } while (0)

void Plan::validate() const {
    auto need = [](bool c, const char *what) {
        if (!c) throw std::runtime_error(std::string("plan: ") + what);
    };
    need(dtype == kF16 || dtype == kBF16, "dtype must be float16 or bfloat16");
    need(H % 8 == 0 && I % 8 == 0 && D % 8 == 0, "hidden, intermediate and head dims must be multiples of 8");
    need(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, "query heads per KV head must be <= 8");
    need(D == 32 || D == 64 || D == 128 || D == 256, "head_dim must be 32, 64, 128 or 256");
    need(R > 0 && R <= D && R % 2 == 0, "rotary_dim must be even and <= head_dim");
    need((int)layers.size() == L, "one LayerPtrs per layer");
    need(V < (1 << 20), "vocab must be < 2^20 (device sampler key)");
    need(max_splits >= (max_seq + kSplitLen - 1) / kSplitLen, "max_splits too small for max_seq");
    need(x && qkv && ctx && mlp && logits && part_acc && part_ml && counters, "scratch pointer missing");
    need(token_dev && seq_len_dev && params_dev && ring && ring_len > 0, "session state pointer missing");
    need(!use_cublas || (xn && tmp), "cuBLAS path needs xn and tmp scratch");
}

// y[N] = W[N, K] x[K] through cuBLAS (W row-major = column-major [K, N], so op T)
static void blas_gemv(cublasHandle_t h, int dtype, const void *W, const void *x, void *y, int N, int K) {
    const float one = 1.f, zero = 0.f;
    const cudaDataType_t t = dtype == kF16 ? CUDA_R_16F : CUDA_R_16BF;
    CASE4_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, 1, K, &one, W, t, K, x, t, K, &zero, y, t, N,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static AttnArgs attn_args(const Plan &p, int s, int l, int T) {
    AttnArgs a;
    a.qkv = p.qkv;
    a.k_cache = p.k_cache(s, l);
    a.v_cache = p.v_cache(s, l);
    a.rope_cos = p.rope_cos;
    a.rope_sin = p.rope_sin;
    a.rotary_dim = p.R;
    a.Hq = p.Hq; a.Hkv = p.Hkv; a.D = p.D; a.max_seq = p.max_seq;
    a.pos = T < 0 ? 0 : T;
    a.pos_dev = T < 0 ? p.seq_len_dev + s : nullptr;
    a.grid_splits = T < 0 ? p.max_splits : (T + 1 + kSplitLen - 1) / kSplitLen;
    a.part_acc = p.part_acc; a.part_ml = p.part_ml; a.max_splits = p.max_splits;
    a.counters = p.counters;
    a.ctx = p.ctx;
    a.sm_count = p.sm_count;
    return a;
}

static void finish(const Plan &p, int s, int T, cudaStream_t st, int amax_n, bool seq_advanced) {
    FinishArgs f;
    f.seq_advanced = seq_advanced ? 1 : 0;
    f.logits = p.logits;
    f.V = p.V;
    if (amax_n > 0) {  // custom lm_head: its per-block argmax in tmp (step_custom)
        f.amax_part = reinterpret_cast<const int2 *>(p.tmp);
        f.amax_n = amax_n;
    }
    f.pos = T < 0 ? 0 : T;
    f.pos_dev = T < 0 ? p.seq_len_dev + s : nullptr;
    f.seq_len_dev = p.seq_len_dev + s;
    f.params = p.params_dev + s;
    f.token_dev = p.token_dev + s;
    f.ring = p.ring + (size_t)s * p.ring_len;
    f.ring_len = p.ring_len;
    launch_finish(f, st);
}

// ---- kernel timeline (ops.h)
static unsigned long long *g_kt_buf = nullptr;
static int g_kt_n = 0, g_kt_next = 0;
static std::vector<std::string> g_kt_names;
void set_kernel_trace(uintptr_t buf, int n) {
    g_kt_buf = reinterpret_cast<unsigned long long *>(buf);
    g_kt_n = buf ? n : 0;
    g_kt_next = 0;
    g_kt_names.clear();
}
unsigned long long *ktrace_slot(const char *fmt, int a, int b, int c) {
    if (!g_kt_buf || g_kt_next >= g_kt_n) return nullptr;
    char name[96];
    snprintf(name, sizeof name, fmt, a, b, c);
    g_kt_names.emplace_back(name);
    return g_kt_buf + kKtraceSlot * (size_t)g_kt_next++;
}
int kernel_trace_next() { return g_kt_next; }
const char *kernel_trace_name(int i) {
    return i >= 0 && i < (int)g_kt_names.size() ? g_kt_names[i].c_str() : "";
}

static int g_tuning = 0;
void set_tuning(int bits) { g_tuning = bits; }
int tuning() { return g_tuning; }

// Timing ablation only (tests/gpu/quick_timing.py, docs/performance.md "where the gap goes"):
// bit i drops kernel i of every layer (1 QKV, 2 attention, 4 O, 8 gate|up, 16 down; 32 lm_head);
// with bit 64 each dropped kernel is replaced by an empty one-block PDL kernel, so the launch
// count stays the same. The results are wrong; only the time is of interest. 0 = normal step.
static int g_step_skip = 0;
void set_step_skip(int mask) { g_step_skip = mask; }

__global__ void noop_kernel() {
    pdl_trigger();
    pdl_wait();
}

static bool run_kernel(int bit, cudaStream_t st) {
    if (!(g_step_skip & bit)) return true;
    if (g_step_skip & 64) launch_pdl(noop_kernel, 1, kWarp, 0, st);
    return false;
}

constexpr size_t kPreLongStreamBytes = 16u << 20;  // "a long weight stream": >= 16 MiB (~5.6 us at 3 TB/s)

// returns the number of lm_head blocks whose argmax partials are in p.tmp (0: none); *seq_advanced: lm_head
// writes seq_len (GemvLmArgs::seq_len_dev), so finish need not
static int step_custom(const Plan &p, int s, int T, cudaStream_t st, bool *seq_advanced) {
    const int max_blocks = p.sm_count * 4;
    // Weight preload before the wait (GemvArgs::pre_eighths): every block when the previous kernel
    // moves few bytes (attention, sampling, a small model's gemvs), half of them after a long weight
    // stream: there the DRAM is busy anyway, and a preload still in flight when that stream ends
    // delays this kernel's wait release (docs/performance.md, log entry 15)
    const size_t e = p.elem();
    const size_t b_o = (size_t)p.H * p.Hq * p.D * e;
    const size_t b_gu = (size_t)2 * p.I * p.H * e, b_down = (size_t)p.H * p.I * e;
    auto pre_eighths = [](size_t prev_bytes) {
        return tuning() & kTunePreAll || prev_bytes < kPreLongStreamBytes ? 8 : 4;
    };
    const bool rope_in_qkv = !(tuning() & kTuneNoQkvRope) && gemv_rope_fits(p.qkv_rows(), p.H, p.D, p.R, max_blocks);
    // O fused into attention where the shape allows (attn_o_parts); gate|up then adds O to x
    // (into xn, for down's residual)
    const int o_parts = p.o_sum && p.xn && !(tuning() & (kTuneNoAttnO | kTuneAttnPerKvHead))
                            ? attn_o_parts(p.H, p.Hq, p.Hkv, p.D) : 0;
    for (int l = 0; l < p.L; ++l) {
        const LayerPtrs &w = p.layers[l];
        GemvArgs g;
        g.max_blocks = max_blocks;
        g.eps = p.eps;

        // norm + QKV (layer 0: gather the embedding row of token_dev[s] into x first)
        g.W = w.w_qkv; g.N = p.qkv_rows(); g.K = p.H;
        g.x = l == 0 ? p.embed : p.x;
        g.tok = l == 0 ? p.token_dev + s : nullptr;
        g.x_out = l == 0 ? p.x : nullptr;
        g.norm_w = w.attn_norm; g.out = p.qkv; g.mode = kGemvStore;
        g.pre_eighths = pre_eighths(l == 0 ? 0 : b_down);  // layer 0: after the sampling kernel
        // RoPE in the QKV gemv where its shape allows (performance.md log entry 29), else in attention
        if (run_kernel(1, st)) {
            if (rope_in_qkv) {
                GemvRopeArgs r;
                static_cast<GemvArgs &>(r) = g;
                r.rope_rows = (p.Hq + p.Hkv) * p.D;
                r.rope_d = p.D;
                r.rope_cos = p.rope_cos;
                r.rope_sin = p.rope_sin;
                r.pos = T < 0 ? 0 : T;
                r.pos_dev = T < 0 ? p.seq_len_dev + s : nullptr;
                launch_gemv_rope(r, p.dtype, st);
            } else {
                launch_gemv(g, p.dtype, st);
            }
        }
        AttnArgs at = attn_args(p, s, l, T);
        at.prerotated = rope_in_qkv ? 1 : 0;
        if (o_parts > 0) {
            at.w_o = w.w_o; at.H = p.H; at.o_parts = o_parts; at.o_sum = p.o_sum;
        }
        if (run_kernel(2, st)) launch_attention(at, p.dtype, st);
        // O + residual (in place on x), unless fused
        g = GemvArgs{}; g.max_blocks = max_blocks; g.eps = p.eps;
        g.W = w.w_o; g.N = p.H; g.K = p.Hq * p.D; g.x = p.ctx; g.out = p.x; g.mode = kGemvResid;
        g.pre_eighths = pre_eighths(0);  // after attention
        if (o_parts == 0 && run_kernel(4, st)) launch_gemv(g, p.dtype, st);
        // norm + gate|up + SwiGLU (with O fused: its input is x + O, which block 0 stores in xn)
        g = GemvArgs{}; g.max_blocks = max_blocks; g.eps = p.eps;
        g.W = w.w_gu; g.N = p.I; g.K = p.H; g.x = p.x; g.norm_w = w.mlp_norm; g.out = p.mlp; g.mode = kGemvSwiglu;
        g.pre_eighths = pre_eighths(o_parts > 0 ? 0 : b_o);
        GemvFoArgs fo;
        if (o_parts > 0) {
            g.x_out = p.xn;
            static_cast<GemvArgs &>(fo) = g;
            fo.o_sum = p.o_sum;
        }
        if (run_kernel(8, st)) {
            if (o_parts > 0) launch_gemv_fo(fo, p.dtype, st);
            else launch_gemv(g, p.dtype, st);
        }
        // down + residual (x := down + x, or + xn with O fused)
        g = GemvArgs{}; g.max_blocks = max_blocks; g.eps = p.eps;
        g.W = w.w_down; g.N = p.H; g.K = p.I; g.x = p.mlp; g.out = p.x; g.mode = kGemvResid;
        g.pre_eighths = pre_eighths(b_gu);
        fo = GemvFoArgs{};
        if (o_parts > 0) {
            static_cast<GemvArgs &>(fo) = g;
            fo.resid = p.xn;
            fo.o_sum = p.o_sum;  // zeroed by block 0 for the next layer
        }
        if (run_kernel(16, st)) {
            if (o_parts > 0) launch_gemv_fo(fo, p.dtype, st);
            else launch_gemv(g, p.dtype, st);
        }
    }
    GemvLmArgs g;
    g.max_blocks = max_blocks; g.eps = p.eps;
    g.pre_eighths = pre_eighths(b_down);
    g.W = p.lm_head; g.N = p.V; g.K = p.H; g.x = p.x; g.norm_w = p.final_norm; g.out = p.logits;
    g.mode = kGemvF32; g.round_logits = p.round_logits;
    // per-block argmax into tmp (unused by the custom path otherwise), if it holds a partial per block
    const bool part = p.tmp && p.tmp_bytes() >= (size_t)max_blocks * sizeof(int2) && !(tuning() & kTuneNoLmArgmax);
    g.amax_part = part ? reinterpret_cast<int2 *>(p.tmp) : nullptr;
    g.x_out = part ? const_cast<void *>(p.embed) : nullptr;  // the winner's embedding row towards L2
    if (!run_kernel(32, st)) return 0;
    // lm_head advances seq_len where it is lm_small_kernel (the launcher's rule, lm_small_runs)
    *seq_advanced = !(tuning() & kTuneNoLmSeq) && lm_small_runs(g);
    if (*seq_advanced) {
        g.seq_len_dev = p.seq_len_dev + s;
        g.pos = T < 0 ? 0 : T;
        g.pos_dev = T < 0 ? p.seq_len_dev + s : nullptr;
    }
    const int grid = launch_gemv_lm(g, p.dtype, st);
    return part ? grid : 0;
}

static void step_cublas(const Plan &p, int s, int T, cudaStream_t st, cublasHandle_t h) {
    if (!h) throw std::runtime_error("cuBLAS path without a handle");
    for (int l = 0; l < p.L; ++l) {
        const LayerPtrs &w = p.layers[l];
        launch_rmsnorm(l == 0 ? p.embed : p.x, l == 0 ? p.token_dev + s : nullptr, l == 0 ? p.x : nullptr,
                       w.attn_norm, p.xn, p.H, p.eps, p.dtype, st);
        blas_gemv(h, p.dtype, w.w_qkv, p.xn, p.qkv, p.qkv_rows(), p.H);
        launch_attention(attn_args(p, s, l, T), p.dtype, st);
        blas_gemv(h, p.dtype, w.w_o, p.ctx, p.tmp, p.H, p.Hq * p.D);
        launch_resid_add(p.tmp, p.x, p.H, p.dtype, st);
        launch_rmsnorm(p.x, nullptr, nullptr, w.mlp_norm, p.xn, p.H, p.eps, p.dtype, st);
        blas_gemv(h, p.dtype, w.w_gu, p.xn, p.tmp, 2 * p.I, p.H);
        launch_swiglu(p.tmp, p.mlp, p.I, p.dtype, st);
        blas_gemv(h, p.dtype, w.w_down, p.mlp, p.tmp, p.H, p.I);
        launch_resid_add(p.tmp, p.x, p.H, p.dtype, st);
    }
    launch_rmsnorm(p.x, nullptr, nullptr, p.final_norm, p.xn, p.H, p.eps, p.dtype, st);
    blas_gemv(h, p.dtype, p.lm_head, p.xn, p.tmp, p.V, p.H);
    launch_to_f32(p.tmp, p.logits, p.V, p.dtype, st);
}

void enqueue_step(const Plan &p, int s, int T, cudaStream_t st, cublasHandle_t blas) {
    if (s < 0 || s >= p.sessions) throw std::runtime_error("step: session out of range");
    if (T >= p.max_seq) throw std::runtime_error("step: position beyond max_seq");
    int amax_n = 0;
    bool seq_advanced = false;
    if (p.use_cublas) step_cublas(p, s, T, st, blas);
    else amax_n = step_custom(p, s, T, st, &seq_advanced);
    finish(p, s, T, st, amax_n, seq_advanced);
}

}  // namespace case4
