// ops.h -- host-side launchers of the decode kernels (one .cu per op family).
// Plain C++ header: included by every .cu, step.h, graphs.cpp and bindings.cpp; the only interface between
// the source files (docs/kernels.md).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace case4 {

constexpr int kSplitLen = 64;  // KV positions per flash-decoding split (attention.cu)
constexpr int kMaxGroup = 8;   // max query heads per KV head (attention.cu)
enum DType : int { kF16 = 0, kBF16 = 1 };

// ------------------------------------------------------------------ how a launcher enqueues
// Opt-in per-launch timing (Engine::set_kernel_trace; timing tool only, bench/quick_timing.py --timeline):
// `buf` holds n slots of kKtraceSlot uint64, one per launch, each a record of kKtraceRec words per block (see
// ktrace in common.cuh); each launch enqueued (or captured) afterwards takes the next slot and its name is
// recorded. buf = 0 turns it off. Record: 0 start, 1 past the wait, 2-11 phase ends (attention), 12 + w warp w's end.
constexpr int kKtraceBlocks = 544;  // blocks recorded per launch (lm_head's grid: 4 per SM, 132 SMs)
constexpr int kKtraceWarp0 = 12;    // record word of warp 0's end (words 2-11: phase ends)
constexpr int kKtraceRec = 48;      // kKtraceWarp0 + up to 32 warps (finish: 1024 threads), padded
constexpr size_t kKtraceSlot = (size_t)kKtraceBlocks * kKtraceRec;
struct KernelTrace {
    unsigned long long *buf = nullptr;
    int n = 0, next = 0;
    std::vector<std::string> names;
    void reset(uintptr_t b, int count);
    unsigned long long *slot(const char *fmt, int a = 0, int b = 0, int c = 0);  // nullptr when off or full
};

// Programmatic dependent launch level (EngineOptions::pdl, CASE4_PDL): 0 plain launches, 1 PDL, 2 PDL + each gemv
// warp's first weight row requested towards L2 before the wait, 3 PDL + its first chunk loaded into registers
// before the wait (the default; gemv.cu, GemvArgs::prefetch). Level 2 measured: SmolLM2 ~1 % faster, 7B ~7 % slower
// (the prefetched lines are evicted by the running kernel's stream); level 3 has nothing to evict.
enum PdlLevel : int { kPdlOff = 0, kPdlOn = 1, kPdlL2 = 2, kPdlPreload = 3 };

// Every launcher that uses launch_pdl (common.cuh) takes one: the stream, the PDL level and the timeline.
struct Launch {
    cudaStream_t st = nullptr;
    int pdl = kPdlPreload;
    KernelTrace *trace = nullptr;  // off: nullptr
    unsigned long long *slot(const char *fmt, int a = 0, int b = 0, int c = 0) const {
        return trace ? trace->slot(fmt, a, b, c) : nullptr;
    }
};

// ------------------------------------------------------------------ gemv.cu
enum GemvMode : int {
    kGemvStore = 0,   // out[n] = round(W x)                         (QKV; + bias[n] before the rounding: GemvBiasArgs)
    kGemvResid = 1,   // out[n] = round(round(W x) + out[n])          (O, down: residual add in place)
    kGemvSwiglu = 2,  // out[n] = round(silu(round(Wg x)) * round(Wu x)); W has 2N rows (gate | up)
    kGemvF32 = 3,     // out[n] = float(W x) (optionally rounded through the dtype)  (lm_head)
};

// Kernel parameter: at most 128 bytes, so that nvcc reads every field at a fixed constant offset (in the PTX,
// a larger parameter struct, e.g. 136 or 152 bytes, is addressed through a register). So the per-launch
// switches are bytes, and what only some kernels need lives in the derived structs below (GemvRopeArgs: 128
// bytes, GemvFoArgs: 104, GemvBiasArgs: 96). Measured (performance.md log entry 31): the step with O fused into
// attention 0.345-0.346 ms/token packed, 0.353-0.354 with int fields (GemvRopeArgs 152, GemvFoArgs 136 bytes).
struct GemvArgs {
    const void *W = nullptr;     // [N (x2 for swiglu), K] row-major, dtype
    const void *x = nullptr;     // input [K] dtype; with `tok`, the embedding table base [V, K]
    const int *tok = nullptr;    // optional: x := embedding row tok[0]; block 0 copies it to x_out
    void *x_out = nullptr;       // residual buffer filled by the embedding gather (or by GemvFoArgs::o_sum); kGemvF32
                                 // with amax_part: the embedding table, whose row of each block's argmax is
                                 // prefetched into L2 for the next step's gather (optional)
    const void *norm_w = nullptr;  // optional: RMSNorm the input with this weight first (fused)
    void *out = nullptr;
    int2 *amax_part = nullptr;   // kGemvF32, optional: per block {float bits, row} of its largest stored
                                 // logit (lowest row on ties; NaN never wins; none: {-inf, kNoIndex}); greedy
                                 // sampling then reduces grid values instead of V (FinishArgs)
    unsigned long long *trace = nullptr;  // set by the launcher: timeline slot (off: nullptr)
    int N = 0, K = 0;
    int max_blocks = 0;          // persistent grid cap (SMs * blocks per SM); 0 = one row-group per block
    float eps = 1e-5f;
    signed char mode = kGemvStore;
    signed char round_logits = 1;  // kGemvF32: round through the dtype first (as HF's fp16 lm_head)
    signed char prefetch = 0;    // set by the launcher from Launch::pdl: 1 L2 prefetch (kPdlL2), 2 register preload
                                 // (kPdlPreload)
    signed char pre_eighths = 8;  // with prefetch 2: only the first pre_eighths / 8 of the blocks preload
};
// The kernels after a fused attention + O (AttnArgs::o_parts; launch_gemv_fo). gate|up (normed, K <= 1024):
// its input is x + O, O = round(o_sum[K] * 2^-kOFixShift) (the attention blocks' fixed-point sums), and
// x + O rounded (the residual stream after O), which block 0 writes to x_out. down: the residual is read from
// `resid` (that x_out) instead of out, and block 0 sets o_sum back to 0 for the next layer's attention (gate|up,
// its only reader, has completed when down passes its wait).
struct GemvFoArgs : GemvArgs {
    unsigned long long *o_sum = nullptr;
    const void *resid = nullptr;
};
// kGemvStore with a fused RoPE (QKV of a model whose rows give each warp one, in 16-warp blocks): rows
// [0, rope_rows) are q and k heads of rope_d dims, stored rotated at position pos (or *pos_dev) over all
// rope_d dims. Warps w and w ^ 8 of a block take the partner dims d and d + rope_d / 2. (A struct of its
// own: the other gemvs' kernel parameter stays GemvArgs, and so does their code.)
struct GemvRopeArgs : GemvArgs {
    int rope_rows = 0;
    int rope_d = 0;
    const float *rope_cos = nullptr, *rope_sin = nullptr;  // [max_seq, rope_d / 2]
    int pos = 0;
    const int *pos_dev = nullptr;
};
// kGemvStore with a bias (QKV of a model with q/k/v_proj biases, Qwen2): out[n] = round(W x + bias[n]), the
// bias added in fp32 to the fp32 sum before the one rounding (HF's nn.Linear, server/reference.py _lin). Normed
// input only (the QKV's). A struct of its own, like GemvRopeArgs (which is at the 128-byte limit, so a bias model
// takes RoPE in attention): the other gemvs' kernel parameter stays GemvArgs, and so does their code.
struct GemvBiasArgs : GemvArgs {
    const void *bias = nullptr;  // [N] dtype
};
// The QKV gemv ([N, K]) can apply RoPE itself (launch_gemv_rope) for these shapes: every dim rotated (R = D),
// partners 8-aligned, a head a whole number of 16-row blocks, one row per warp (N <= 8 * max_blocks), K <= 1024
bool gemv_rope_fits(int N, int K, int D, int R, int max_blocks);
void gemv_init(int dtype);
// Every gemv kernel loads its weights with the L2 evict_first policy, copies the norm weights to shared memory
// (cp.async) before its wait and reads the residual of a warp's first row right after it (performance.md log
// entries 5 and 10).
int launch_gemv(const GemvArgs &a, int dtype, const Launch &L);  // returns the grid size
int launch_gemv_rope(const GemvRopeArgs &a, int dtype, const Launch &L);  // QKV + RoPE (gemv_rope_fits)
int launch_gemv_fo(const GemvFoArgs &a, int dtype, const Launch &L);  // gate|up or down after a fused O
int launch_gemv_bias(const GemvBiasArgs &a, int dtype, const Launch &L);  // normed QKV + bias (kGemvStore)
// lm_head (kGemvF32). seq_len_dev (lm_small_kernel only): block 0 writes seq_len_dev := T + 1 after its wait, when
// every earlier kernel of the step has completed (T = pos or *pos_dev, read before the wait like attention's), so
// that finish can let the next step launch as soon as it passes its own wait (FinishArgs::seq_advanced).
// l2_ahead (lm_small_kernel; EngineOptions::lm_head_l2_ahead, default on; launch_gemv sets it): each warp requests its next
// row group towards L2 (one bulk prefetch of 4 rows) before it multiplies the current one, so the DRAM streams
// the next pass while the warp's registers still hold this one (performance.md log entry 35).
struct GemvLmArgs : GemvArgs {
    int *seq_len_dev = nullptr;
    const int *pos_dev = nullptr;
    int pos = 0;
    signed char l2_ahead = 1;
};
int launch_gemv_lm(const GemvLmArgs &a, int dtype, const Launch &L);
// launch_gemv / launch_gemv_lm run this gemv (its GemvArgs part) as lm_small_kernel: normed fp32 logits, K <= 576,
// no embedding gather
bool lm_small_runs(const GemvArgs &a);

// ------------------------------------------------------------------ gemv_quant.cu
// A weight-only quantized [N, K] matrix (server/model/quant.py QuantLinear): groups of `group` inputs along K;
// int8 (mode 8): q int8 [N, K], w = q * scale; int4 (mode 4): q uint8 [N, K/2] (input 2j in byte j's low nibble),
// w = nib * scale + minv; scale, minv fp16 [N, K / group]. mode 0: not quantized (the plan's fp16 pointer).
struct QuantMat {
    const void *q = nullptr;
    const void *scale = nullptr;
    const void *minv = nullptr;  // int4 only
    int mode = 0;                // 0 none, 8 int8, 4 int4
    int group = 0;
};
// The quantized gemv's kernel parameter (<= 128 bytes, as GemvArgs): the GemvMode epilogues of gemv.cu with the same
// rounding points (store, optionally with a bias, residual add in place, SwiGLU over gate|up rows [0, N) | [N, 2N),
// fp32 logits with the optional per-block argmax partials), the optional RMSNorm of the input and the optional
// embedding gather (tok: x is the table, block 0 copies the row to x_out).
struct QGemvArgs {
    const void *q = nullptr, *scale = nullptr, *minv = nullptr;
    const void *x = nullptr;
    const int *tok = nullptr;
    void *x_out = nullptr;
    const void *norm_w = nullptr;
    void *out = nullptr;
    int2 *amax_part = nullptr;
    unsigned long long *trace = nullptr;  // set by the launcher
    const void *bias = nullptr;  // kGemvStore, optional: out[n] = round(W x + bias[n]) ([N] dtype, as GemvBiasArgs)
    int N = 0, K = 0, group = 0;
    int max_blocks = 0;          // grid cap (SMs * blocks per SM); 0: one pair of rows per warp
    float eps = 1e-5f;
    signed char mode = kGemvStore;
    signed char qmode = 4;       // 8 | 4
    signed char round_logits = 1;
    signed char preload = 0;     // set by the launcher (kPdlPreload): each warp's first chunk before the wait
};
void qgemv_init(int dtype);  // the kernels' attributes and CASE4_QGEMV, once per device and dtype
// BadArgument naming `who` unless the kernels can take m as an [N, K] matrix (mode, pointers, K and the group a
// multiple of the 16-byte chunk's inputs, the group dividing K, q 16-byte aligned)
void check_quant(const QuantMat &m, int N, int K, const char *who);
// Launch y = W x (fp32 accumulation, deterministic) on W quantized; returns the grid size. BadArgument (one line)
// for a layout the kernel cannot take (K or the group not a multiple of the 16-byte chunk's inputs, misaligned q).
int launch_qgemv(const QGemvArgs &a, int dtype, const Launch &L);
// out [N, K] (model dtype) := the matrix's values (fp32, as quant.py's dequantize) rounded once to the model dtype;
// a plain launch on `st` (capturable), for prefill's per-layer scratch
void launch_dequant(const QuantMat &m, int N, int K, void *out, int dtype, cudaStream_t st);

// ------------------------------------------------------------------ norm.cu (cuBLAS path helpers)
// out = round(w * round(x * rsqrt(mean(x^2) + eps))); with tok: x = embed row tok[0] and x_out = x
void launch_rmsnorm(const void *x, const int *tok, void *x_out, const void *w, void *out, int n,
                    float eps, int dtype, cudaStream_t st);
// epilogues of a cuBLAS GEMV result `y` (dtype): resid: out = round(y + out); swiglu: out = round(silu(y[:N]) * y[N:])
void launch_resid_add(const void *y, void *out, int n, int dtype, cudaStream_t st);
void launch_swiglu(const void *y, void *out, int n, int dtype, cudaStream_t st);
void launch_to_f32(const void *y, float *out, int n, int dtype, cudaStream_t st);

// ------------------------------------------------------------------ attention.cu
struct AttnArgs {
    const void *qkv = nullptr;   // [(Hq + 2 Hkv) * D] this step's raw projections (dtype)
    void *k_cache = nullptr;     // this (session, layer): K rows [Hkv, max_seq, D]
    void *v_cache = nullptr;     // V rows [Hkv, max_seq, D]
    const float *rope_cos = nullptr, *rope_sin = nullptr;  // [max_seq, R/2]
    int rotary_dim = 0;
    int Hq = 0, Hkv = 0, D = 0, max_seq = 0;
    int pos = 0;                 // T (host constant) ...
    const int *pos_dev = nullptr;  // ... or read from the device (dynamic graph)
    int grid_splits = 0;         // blocks along the split axis (>= needed; extra blocks exit)
    float *part_acc = nullptr;   // [Hq, max_splits, D]
    float *part_ml = nullptr;    // [Hq, max_splits, 2]  (max, sum)
    int max_splits = 0;
    int *counters = nullptr;     // [Hq] last-block-done counters, one per block row (zero at rest)
    void *ctx = nullptr;         // out [Hq * D] dtype
    int sm_count = 0;            // SMs of the device: at most max(1, sm_count / Hkv) blocks per KV head
    int heads_per_block = 0;     // set by the launcher: query heads per block (attn_heads_per_block)
    int per_kv_head = 0;         // 1: one block row per KV head's group for every group size (EngineOptions::
                                 // attn_per_kv_head; default: per query head for groups of up to 4)
    int solo_len = 0;            // set by the launcher: up to this many positions one block takes them all
    int prerotated = 0;          // 1: q and k in qkv are already rotated (the QKV gemv's fused RoPE)
    // O fused (o_parts > 0, one query head per block, attn_o_parts): block row x = part * Hq + head; after its
    // head's ctx (kept in shared memory, not written) it multiplies W_o's rows [part * ceil(H / o_parts), ...)
    // in that head's D columns by it and adds the results into o_sum[row] in fixed point (o_fix); gate|up reads
    // the sums (GemvFoArgs::o_sum), down zeroes them.
    const void *w_o = nullptr;   // [H, Hq * D] dtype
    int H = 0;
    int o_parts = 0;
    unsigned long long *o_sum = nullptr;  // [H] int64, 2^-kOFixShift units; zero before the kernel
    unsigned long long *trace = nullptr;  // set by the launcher: timeline slot (off: nullptr)
};
void launch_attention(const AttnArgs &a, int dtype, const Launch &L);
// Parts of O's rows per query head when O is fused into attention (0: not fused): small W_o (<= 4 MiB),
// one query head per block, H <= 1024 (the consumer gemv's one-vector-per-thread staging) and a part's rows
// for each warp in registers; at least 32 blocks in all, at most kMaxOParts parts
constexpr int kMaxOParts = 16;
int attn_o_parts(int H, int Hq, int Hkv, int D);
// O's sum over the heads in fixed point: round(v * 2^kOFixShift) as int64 (two's complement; red.add.u64 adds
// exactly, so the sum is the same in any order and every replay is bitwise equal). |O| < 2^27 per head and in
// the sum (fp16's range with room to spare), resolution 2^-32 (2.3e-10; fp16's smallest subnormal is 6e-8).
// Out-of-range values saturate, NaN gives 0 (cvt.rni.s64.f32). Measured against fp32 partials per head
// summed in order by gate|up: performance.md log entry 32.
constexpr int kOFixShift = 32;
constexpr float kOFixScale = (float)(1ull << kOFixShift);  // exact: a power of two, and so is its inverse
#ifdef __CUDACC__
__device__ __forceinline__ unsigned long long o_fix(float v) { return (unsigned long long)__float2ll_rn(v * kOFixScale); }
__device__ __forceinline__ float o_unfix(unsigned long long q) { return __ll2float_rn((long long)q) * (1.f / kOFixScale); }
#endif

// ------------------------------------------------------------------ sampling.cu
struct SampleParams {            // per session, on the device (so graphs need no recapture)
    float temperature;           // <= 0: greedy
    int top_k;                   // 0: all
    float top_p;                 // >= 1: all
    int enabled;                 // 0: no device sampling (client samples)
    unsigned long long seed;
};
struct FinishArgs {
    const float *logits = nullptr;  // [V]
    int V = 0;
    const int2 *amax_part = nullptr;  // optional: lm_head's per-block argmax (GemvArgs::amax_part) ...
    int amax_n = 0;                   // ... of amax_n blocks: greedy picks from these, not from V logits
    int pos = 0;                 // T of this step (host) ... (also the sampled token's RNG position, as in
    const int *pos_dev = nullptr;   // ... or on the device       case4_sampling.py)
    int *seq_len_dev = nullptr;  // optional: seq_len_dev[s] := T + 1
    const SampleParams *params = nullptr;
    int *token_dev = nullptr;    // next input token (written when sampling)
    int *ring = nullptr;         // optional: [ring_len] sampled tokens, index (T + 1) % ring_len
    int ring_len = 0;
    int force_sample = 0;        // 1: sample even if params->enabled == 0 (kernel tests, Engine::sample)
    int seq_advanced = 0;        // 1: lm_head has written seq_len_dev := T + 1 (GemvLmArgs::seq_len_dev)
    unsigned long long *trace = nullptr;  // set by the launcher: timeline slot (off: nullptr)
};
void launch_finish(const FinishArgs &a, const Launch &L);
void launch_set_int(int *dst, int value, cudaStream_t st);
void launch_set_params(SampleParams *dst, SampleParams value, cudaStream_t st);

}  // namespace case4
