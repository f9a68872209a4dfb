// step.cu -- one decode step = the kernels of every layer, enqueued on one stream.
//
// Custom path, per layer (5 launches):
//   gemv[norm+QKV]  ->  attention[RoPE + K/V write + split-KV + merge]  ->  gemv[O + residual]
//   -> gemv[norm + gate|up + SwiGLU]  ->  gemv[down + residual]
// or, where attn_o_parts > 0 (small models), 4: O fused into attention (its rows summed over the heads in fixed
// point), gate|up adding O to x (into xn), down adding xn (and zeroing the sums).
// plus gemv[final norm + lm_head -> fp32 logits] and finish[sampling, seq_len += 1] (seq_len advanced by lm_head
// instead where it is lm_small_kernel: GemvLmArgs).
// The embedding gather is fused into layer 0's QKV gemv (it also fills the residual x). A model with q/k/v biases
// (Plan::qkv_bias, Qwen2) adds them in the QKV gemv's store (GemvBiasArgs; QGemvArgs::bias) and rotates in attention.
// cuBLAS path (A/B): RMSNorm, cublasGemmEx per linear and elementwise epilogues.
// One function per layer's kernels (custom_layer, cublas_layer) and one for the head (custom_head, cublas_head);
// step_pos chooses every launch's position (T, or seq_len_dev[s] when dynamic). The options (EngineOptions,
// step.h) come from the Engine.
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"
#include "step.h"

namespace case4 {

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
    need(!quant || !use_cublas, "quantized weights run on the custom kernels (gemm custom), not cuBLAS");
    auto mat = [&](const void *w, const QuantMat &q) { return (w != nullptr) != (q.mode != 0); };
    bool any = q_lm_head.mode != 0;
    need(mat(lm_head, q_lm_head), "lm_head: one of an fp16 pointer or a quantized matrix");
    for (const LayerPtrs &l : layers) {
        need(mat(l.w_qkv, l.q_qkv) && mat(l.w_o, l.q_o) && mat(l.w_gu, l.q_gu) && mat(l.w_down, l.q_down),
             "layer matrices: one of an fp16 pointer or a quantized matrix each");
        need((l.b_qkv != nullptr) == qkv_bias, "q/k/v biases: every layer's b_qkv pointer iff plan.qkv_bias");
        any = any || l.q_qkv.mode || l.q_o.mode || l.q_gu.mode || l.q_down.mode;
    }
    need(any == quant, "plan.quant must say whether any matrix is quantized");
    // the quantized layouts the kernels take (BadArgument, one line naming the matrix) before any launch
    auto chk = [](const QuantMat &q, int n, int k, const char *who) {
        if (q.mode) check_quant(q, n, k, who);
    };
    chk(q_lm_head, V, H, "lm_head");
    for (const LayerPtrs &l : layers) {
        chk(l.q_qkv, qkv_rows(), H, "w_qkv");
        chk(l.q_o, H, Hq * D, "w_o");
        chk(l.q_gu, 2 * I, H, "w_gu");
        chk(l.q_down, H, I, "w_down");
    }
}

// ---- kernel timeline (ops.h)
void KernelTrace::reset(uintptr_t b, int count) {
    buf = reinterpret_cast<unsigned long long *>(b);
    n = b ? count : 0;
    next = 0;
    names.clear();
}
unsigned long long *KernelTrace::slot(const char *fmt, int a, int b, int c) {
    if (!buf || next >= n) return nullptr;
    char name[96];
    snprintf(name, sizeof name, fmt, a, b, c);
    names.emplace_back(name);
    return buf + kKtraceSlot * (size_t)next++;
}

// The position of one step's kernels, chosen in one place for every launch (attention, the fused RoPE,
// lm_head's seq_len write, finish): T >= 0 is a host constant baked into the launch (eager, exact graphs);
// T < 0 means dynamic: the kernels read T from seq_len_dev[s] and attention's grid is sized for max_seq.
struct StepPos {
    int pos;           // T, or 0 (unused) when dynamic
    const int *dev;    // seq_len_dev + s when dynamic, else nullptr
    int grid_splits;   // attention's blocks along the split axis
};
static StepPos step_pos(const Plan &p, int s, int T) {
    if (T < 0) return {0, p.seq_len_dev + s, p.max_splits};
    return {T, nullptr, (T + 1 + kSplitLen - 1) / kSplitLen};
}

// One step's fixed inputs, shared by the per-layer functions
struct Step {
    const Plan &p;
    const EngineOptions &o;
    int s;
    StepPos pos;
    Launch L;
};

static AttnArgs attn_args(const Step &c, int l) {
    const Plan &p = c.p;
    AttnArgs a;
    a.qkv = p.qkv;
    a.k_cache = p.k_cache(c.s, l);
    a.v_cache = p.v_cache(c.s, l);
    a.rope_cos = p.rope_cos;
    a.rope_sin = p.rope_sin;
    a.rotary_dim = p.R;
    a.Hq = p.Hq; a.Hkv = p.Hkv; a.D = p.D; a.max_seq = p.max_seq;
    a.pos = c.pos.pos;
    a.pos_dev = c.pos.dev;
    a.grid_splits = c.pos.grid_splits;
    a.part_acc = p.part_acc; a.part_ml = p.part_ml; a.max_splits = p.max_splits;
    a.counters = p.counters;
    a.ctx = p.ctx;
    a.sm_count = p.sm_count;
    a.per_kv_head = c.o.attn_per_kv_head ? 1 : 0;
    return a;
}

// sampling and seq_len += 1 (unless lm_head advanced it); amax_n > 0: greedy picks from lm_head's per-block
// argmax partials in tmp (custom_head)
static void finish(const Step &c, int amax_n, bool seq_advanced) {
    const Plan &p = c.p;
    FinishArgs f;
    f.seq_advanced = seq_advanced ? 1 : 0;
    f.logits = p.logits;
    f.V = p.V;
    if (amax_n > 0) {
        f.amax_part = reinterpret_cast<const int2 *>(p.tmp);
        f.amax_n = amax_n;
    }
    f.pos = c.pos.pos;
    f.pos_dev = c.pos.dev;
    f.seq_len_dev = p.seq_len_dev + c.s;
    f.params = p.params_dev + c.s;
    f.token_dev = p.token_dev + c.s;
    f.ring = p.ring + (size_t)c.s * p.ring_len;
    f.ring_len = p.ring_len;
    launch_finish(f, c.L);
}

// Timing ablation only (EngineOptions::step_skip; tests/gpu/quick_timing.py, docs/performance.md "where the gap
// goes"): bit i drops kernel i of every layer (1 QKV, 2 attention, 4 O, 8 gate|up, 16 down; 32 lm_head); with
// bit 64 each dropped kernel is replaced by an empty one-block PDL kernel, so the launch count stays the same.
// The results are wrong; only the time is of interest. 0 = normal step.
__global__ void noop_kernel() {
    pdl_trigger();
    pdl_wait();
}

static bool run_kernel(const Step &c, int bit) {
    if (!(c.o.step_skip & bit)) return true;
    if (c.o.step_skip & 64) launch_pdl(c.L, noop_kernel, 1, kWarp, 0);
    return false;
}

constexpr size_t kPreLongStreamBytes = 16u << 20;  // "a long weight stream": >= 16 MiB (~5.6 us at 3 TB/s)

// The custom path's per-step choices, made once for all layers
struct Custom {
    int max_blocks;
    size_t b_o, b_gu, b_down;  // weight bytes of O, gate|up and down
    bool rope_in_qkv;          // RoPE in the QKV gemv (performance.md log entry 29), else in attention
    int o_parts;               // > 0: O fused into attention (attn_o_parts); gate|up then adds O to x (into xn)
};
static Custom custom_plan(const Step &c) {
    const Plan &p = c.p;
    Custom u;
    u.max_blocks = p.sm_count * 4;
    const size_t e = p.elem();
    u.b_o = (size_t)p.H * p.Hq * p.D * e;
    u.b_gu = (size_t)2 * p.I * p.H * e;
    u.b_down = (size_t)p.H * p.I * e;
    // a bias model's QKV is the bias gemv (GemvBiasArgs: GemvRopeArgs is at the 128-byte limit), RoPE in attention
    u.rope_in_qkv = c.o.rope_in_qkv && !p.qkv_bias && gemv_rope_fits(p.qkv_rows(), p.H, p.D, p.R, u.max_blocks);
    u.o_parts = p.o_sum && p.xn && c.o.o_in_attention && !c.o.attn_per_kv_head
                    ? attn_o_parts(p.H, p.Hq, p.Hkv, p.D) : 0;
    return u;
}

// Weight preload before the wait (GemvArgs::pre_eighths): every block when the previous kernel moves few bytes
// (attention, sampling, a small model's gemvs), half of them after a long weight stream: there the DRAM is busy
// anyway, and a preload still in flight when that stream ends delays this kernel's wait release
// (docs/performance.md, log entry 15)
static signed char pre_eighths(size_t prev_bytes) { return prev_bytes < kPreLongStreamBytes ? 8 : 4; }

static GemvArgs gemv_base(const Step &c, const Custom &u) {
    GemvArgs g;
    g.max_blocks = u.max_blocks;
    g.eps = c.p.eps;
    return g;
}

// Layer l of the custom path: norm + QKV (+ RoPE), attention (+ O), [O + residual], norm + gate|up + SwiGLU,
// down + residual
static void custom_layer(const Step &c, const Custom &u, int l) {
    const Plan &p = c.p;
    const LayerPtrs &w = p.layers[l];
    const bool fo = u.o_parts > 0;

    // norm + QKV (layer 0: gather the embedding row of token_dev[s] into x first)
    GemvArgs g = gemv_base(c, u);
    g.W = w.w_qkv; g.N = p.qkv_rows(); g.K = p.H;
    g.x = l == 0 ? p.embed : p.x;
    g.tok = l == 0 ? p.token_dev + c.s : nullptr;
    g.x_out = l == 0 ? p.x : nullptr;
    g.norm_w = w.attn_norm; g.out = p.qkv; g.mode = kGemvStore;
    g.pre_eighths = pre_eighths(l == 0 ? 0 : u.b_down);  // layer 0: after the sampling kernel
    if (run_kernel(c, 1)) {
        if (u.rope_in_qkv) {
            GemvRopeArgs r;
            static_cast<GemvArgs &>(r) = g;
            r.rope_rows = (p.Hq + p.Hkv) * p.D;
            r.rope_d = p.D;
            r.rope_cos = p.rope_cos;
            r.rope_sin = p.rope_sin;
            r.pos = c.pos.pos;
            r.pos_dev = c.pos.dev;
            launch_gemv_rope(r, p.dtype, c.L);
        } else if (w.b_qkv) {  // out = round(W x + b) (never rope_in_qkv: custom_plan)
            GemvBiasArgs b;
            static_cast<GemvArgs &>(b) = g;
            b.bias = w.b_qkv;
            launch_gemv_bias(b, p.dtype, c.L);
        } else {
            launch_gemv(g, p.dtype, c.L);
        }
    }
    // attention (RoPE unless the QKV gemv applied it; O's rows too where fused)
    AttnArgs at = attn_args(c, l);
    at.prerotated = u.rope_in_qkv ? 1 : 0;
    if (fo) {
        at.w_o = w.w_o; at.H = p.H; at.o_parts = u.o_parts; at.o_sum = p.o_sum;
    }
    if (run_kernel(c, 2)) launch_attention(at, p.dtype, c.L);
    // O + residual (in place on x), unless fused
    g = gemv_base(c, u);
    g.W = w.w_o; g.N = p.H; g.K = p.Hq * p.D; g.x = p.ctx; g.out = p.x; g.mode = kGemvResid;
    g.pre_eighths = pre_eighths(0);  // after attention
    if (!fo && run_kernel(c, 4)) launch_gemv(g, p.dtype, c.L);
    // norm + gate|up + SwiGLU (with O fused: its input is x + O, which block 0 stores in xn)
    g = gemv_base(c, u);
    g.W = w.w_gu; g.N = p.I; g.K = p.H; g.x = p.x; g.norm_w = w.mlp_norm; g.out = p.mlp; g.mode = kGemvSwiglu;
    g.pre_eighths = pre_eighths(fo ? 0 : u.b_o);
    GemvFoArgs f;
    if (fo) {
        g.x_out = p.xn;
        static_cast<GemvArgs &>(f) = g;
        f.o_sum = p.o_sum;
    }
    if (run_kernel(c, 8)) {
        if (fo) launch_gemv_fo(f, p.dtype, c.L);
        else launch_gemv(g, p.dtype, c.L);
    }
    // down + residual (x := down + x, or + xn with O fused)
    g = gemv_base(c, u);
    g.W = w.w_down; g.N = p.H; g.K = p.I; g.x = p.mlp; g.out = p.x; g.mode = kGemvResid;
    g.pre_eighths = pre_eighths(u.b_gu);
    f = GemvFoArgs{};
    if (fo) {
        static_cast<GemvArgs &>(f) = g;
        f.resid = p.xn;
        f.o_sum = p.o_sum;  // zeroed by block 0 for the next layer
    }
    if (run_kernel(c, 16)) {
        if (fo) launch_gemv_fo(f, p.dtype, c.L);
        else launch_gemv(g, p.dtype, c.L);
    }
}

// The custom path's head: final norm + lm_head -> fp32 logits. Returns the number of lm_head blocks whose argmax
// partials are in p.tmp (0: none); *seq_advanced: lm_head writes seq_len (GemvLmArgs::seq_len_dev), so finish
// need not
static int custom_head(const Step &c, const Custom &u, bool *seq_advanced) {
    const Plan &p = c.p;
    GemvLmArgs g;
    static_cast<GemvArgs &>(g) = gemv_base(c, u);
    g.pre_eighths = pre_eighths(u.b_down);
    g.W = p.lm_head; g.N = p.V; g.K = p.H; g.x = p.x; g.norm_w = p.final_norm; g.out = p.logits;
    g.mode = kGemvF32; g.round_logits = p.round_logits;
    g.l2_ahead = c.o.lm_head_l2_ahead ? 1 : 0;
    // per-block argmax into tmp (unused by the custom path otherwise), if it holds a partial per block
    const bool part = p.tmp && p.tmp_bytes() >= (size_t)u.max_blocks * sizeof(int2);
    g.amax_part = part ? reinterpret_cast<int2 *>(p.tmp) : nullptr;
    g.x_out = part ? const_cast<void *>(p.embed) : nullptr;  // the winner's embedding row towards L2
    if (!run_kernel(c, 32)) return 0;
    // lm_head advances seq_len where it is lm_small_kernel (the launcher's rule, lm_small_runs)
    *seq_advanced = c.o.lm_head_seq_len && lm_small_runs(g);
    if (*seq_advanced) {
        g.seq_len_dev = p.seq_len_dev + c.s;
        g.pos = c.pos.pos;
        g.pos_dev = c.pos.dev;
    }
    const int grid = launch_gemv_lm(g, p.dtype, c.L);
    return part ? grid : 0;
}

// ---- the quantized path (Plan::quant): per layer norm + QKV, attention (with RoPE), O + residual, norm + gate|up
// + SwiGLU, down + residual, then norm + lm_head; every quantized matrix through launch_qgemv (gemv_quant.cu), an
// unquantized one (a GGUF tensor kept in fp16) through launch_gemv with the same epilogue. None of the fp16
// path's fusions that read a weight matrix outside a gemv (O in attention) or rotate in the gemv (RoPE) apply:
// attention rotates q and k itself. `bias` (kGemvStore, the QKV of a bias model): added before the rounding
// (QGemvArgs::bias, or the fp16 bias gemv). Returns the grid (the number of argmax partials for kGemvF32).
static int mat_gemv(const Step &c, const void *w, const QuantMat &q, const GemvArgs &g, const void *bias = nullptr) {
    if (!q.mode) {
        if (bias) {
            GemvBiasArgs b;
            static_cast<GemvArgs &>(b) = g;
            b.W = w;
            b.bias = bias;
            return launch_gemv_bias(b, c.p.dtype, c.L);
        }
        GemvArgs f = g;
        f.W = w;
        return launch_gemv(f, c.p.dtype, c.L);
    }
    QGemvArgs a;
    a.bias = bias;
    a.q = q.q; a.scale = q.scale; a.minv = q.minv; a.qmode = (signed char)q.mode; a.group = q.group;
    a.x = g.x; a.tok = g.tok; a.x_out = g.x_out; a.norm_w = g.norm_w; a.out = g.out; a.amax_part = g.amax_part;
    a.N = g.N; a.K = g.K; a.max_blocks = g.max_blocks; a.eps = g.eps; a.mode = g.mode; a.round_logits = g.round_logits;
    return launch_qgemv(a, c.p.dtype, c.L);
}

static void quant_layer(const Step &c, int l) {
    const Plan &p = c.p;
    const LayerPtrs &w = p.layers[l];
    const int max_blocks = p.sm_count * 4;
    auto base = [&]() {
        GemvArgs g;
        g.max_blocks = max_blocks;
        g.eps = p.eps;
        return g;
    };
    GemvArgs g = base();  // norm + QKV (layer 0: the embedding row of token_dev[s], copied into x)
    g.N = p.qkv_rows(); g.K = p.H;
    g.x = l == 0 ? p.embed : p.x;
    g.tok = l == 0 ? p.token_dev + c.s : nullptr;
    g.x_out = l == 0 ? p.x : nullptr;
    g.norm_w = w.attn_norm; g.out = p.qkv; g.mode = kGemvStore;
    if (run_kernel(c, 1)) mat_gemv(c, w.w_qkv, w.q_qkv, g, w.b_qkv);
    if (run_kernel(c, 2)) launch_attention(attn_args(c, l), p.dtype, c.L);  // RoPE, K/V row T, ctx
    g = base();  // O + residual (in place on x)
    g.N = p.H; g.K = p.Hq * p.D; g.x = p.ctx; g.out = p.x; g.mode = kGemvResid;
    if (run_kernel(c, 4)) mat_gemv(c, w.w_o, w.q_o, g);
    g = base();  // norm + gate|up + SwiGLU
    g.N = p.I; g.K = p.H; g.x = p.x; g.norm_w = w.mlp_norm; g.out = p.mlp; g.mode = kGemvSwiglu;
    if (run_kernel(c, 8)) mat_gemv(c, w.w_gu, w.q_gu, g);
    g = base();  // down + residual
    g.N = p.H; g.K = p.I; g.x = p.mlp; g.out = p.x; g.mode = kGemvResid;
    if (run_kernel(c, 16)) mat_gemv(c, w.w_down, w.q_down, g);
}

// final norm + lm_head -> fp32 logits, with the per-block argmax partials in tmp when it holds them (as
// custom_head); returns their number (0: none). finish advances seq_len.
static int quant_head(const Step &c) {
    const Plan &p = c.p;
    GemvArgs g;
    g.max_blocks = p.sm_count * 4;
    g.eps = p.eps;
    g.N = p.V; g.K = p.H; g.x = p.x; g.norm_w = p.final_norm; g.out = p.logits;
    g.mode = kGemvF32; g.round_logits = (signed char)p.round_logits;
    const bool part = p.tmp && p.tmp_bytes() >= (size_t)g.max_blocks * sizeof(int2);
    g.amax_part = part ? reinterpret_cast<int2 *>(p.tmp) : nullptr;
    if (!run_kernel(c, 32)) return 0;
    const int grid = mat_gemv(c, p.lm_head, p.q_lm_head, g);
    return part ? grid : 0;
}

// y[N] = W[N, K] x[K] through cuBLAS (W row-major = column-major [K, N], so op T); accumulate: y = W x + y, in fp32
// before the one rounding (beta = 1: the QKV of a bias model, y holding the bias)
static void blas_gemv(cublasHandle_t h, int dtype, const void *W, const void *x, void *y, int N, int K,
                      bool accumulate = false) {
    const float one = 1.f, zero = 0.f;
    const cudaDataType_t t = dtype == kF16 ? CUDA_R_16F : CUDA_R_16BF;
    CASE4_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, 1, K, &one, W, t, K, x, t, K,
                                    accumulate ? &one : &zero, y, t, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Layer l of the cuBLAS path (A/B): RMSNorm, cublasGemmEx per linear and elementwise epilogues
static void cublas_layer(const Step &c, int l, cublasHandle_t h) {
    const Plan &p = c.p;
    const LayerPtrs &w = p.layers[l];
    cudaStream_t st = c.L.st;
    launch_rmsnorm(l == 0 ? p.embed : p.x, l == 0 ? p.token_dev + c.s : nullptr, l == 0 ? p.x : nullptr,
                   w.attn_norm, p.xn, p.H, p.eps, p.dtype, st);
    // q/k/v biases: qkv := b, then qkv = W x + qkv (cuBLAS's epilogue adds in fp32 and rounds once, as HF's addmm)
    if (w.b_qkv)
        CASE4_CUDA_CHECK(cudaMemcpyAsync(p.qkv, w.b_qkv, (size_t)p.qkv_rows() * p.elem(), cudaMemcpyDeviceToDevice,
                                         st));
    blas_gemv(h, p.dtype, w.w_qkv, p.xn, p.qkv, p.qkv_rows(), p.H, w.b_qkv != nullptr);
    launch_attention(attn_args(c, l), p.dtype, c.L);
    blas_gemv(h, p.dtype, w.w_o, p.ctx, p.tmp, p.H, p.Hq * p.D);
    launch_resid_add(p.tmp, p.x, p.H, p.dtype, st);
    launch_rmsnorm(p.x, nullptr, nullptr, w.mlp_norm, p.xn, p.H, p.eps, p.dtype, st);
    blas_gemv(h, p.dtype, w.w_gu, p.xn, p.tmp, 2 * p.I, p.H);
    launch_swiglu(p.tmp, p.mlp, p.I, p.dtype, st);
    blas_gemv(h, p.dtype, w.w_down, p.mlp, p.tmp, p.H, p.I);
    launch_resid_add(p.tmp, p.x, p.H, p.dtype, st);
}

static void cublas_head(const Step &c, cublasHandle_t h) {
    const Plan &p = c.p;
    launch_rmsnorm(p.x, nullptr, nullptr, p.final_norm, p.xn, p.H, p.eps, p.dtype, c.L.st);
    blas_gemv(h, p.dtype, p.lm_head, p.xn, p.tmp, p.V, p.H);
    launch_to_f32(p.tmp, p.logits, p.V, p.dtype, c.L.st);
}

void enqueue_step(const Plan &p, const EngineOptions &o, int s, int T, cudaStream_t st, cublasHandle_t blas,
                  KernelTrace *trace) {
    check_session(s, p.sessions, "step");
    if (T >= p.max_seq) throw BadArgument("step: position beyond max_seq");
    const Step c{p, o, s, step_pos(p, s, T), Launch{st, o.pdl, trace}};
    int amax_n = 0;
    bool seq_advanced = false;
    if (p.quant) {
        for (int l = 0; l < p.L; ++l) quant_layer(c, l);
        amax_n = quant_head(c);
    } else if (p.use_cublas) {
        if (!blas) throw std::runtime_error("cuBLAS path without a handle");
        for (int l = 0; l < p.L; ++l) cublas_layer(c, l, blas);
        cublas_head(c, blas);
    } else {
        const Custom u = custom_plan(c);
        for (int l = 0; l < p.L; ++l) custom_layer(c, u, l);
        amax_n = custom_head(c, u, &seq_advanced);
    }
    finish(c, amax_n, seq_advanced);
}

}  // namespace case4
