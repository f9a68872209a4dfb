// step.h -- the decode-step plan: every pointer and size one token needs, fixed at start-up.
#pragma once

#include <algorithm>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <vector>

#include "ops.h"

namespace case4 {

// A matrix is either an fp16/bf16 view of the weight arena (w_*) or quantized (q_*, mode != 0; w_* is then null)
struct LayerPtrs {
    const void *attn_norm, *w_qkv, *w_o, *mlp_norm, *w_gu, *w_down;
    QuantMat q_qkv, q_o, q_gu, q_down;
    const void *b_qkv = nullptr;  // [qkv_rows] dtype: the q/k/v biases (Plan::qkv_bias), added by the QKV gemv
};

struct Plan {
    // model
    int dtype = kF16;
    int V = 0, H = 0, I = 0, L = 0, Hq = 0, Hkv = 0, D = 0, R = 0, max_seq = 0, sessions = 1;
    float eps = 1e-5f;
    int round_logits = 1;
    // the q/k/v projections add a bias (Qwen2): every layer's b_qkv is set (none is otherwise). The QKV gemv adds
    // it before its one rounding (GemvBiasArgs, QGemvArgs::bias, cuBLAS beta = 1), and RoPE runs in attention
    bool qkv_bias = false;
    // weights (views of the weight arena)
    const void *embed = nullptr, *final_norm = nullptr, *lm_head = nullptr;
    const float *rope_cos = nullptr, *rope_sin = nullptr;
    std::vector<LayerPtrs> layers;
    QuantMat q_lm_head;     // lm_head quantized (mode != 0; lm_head is then null)
    // any matrix quantized: the step runs the quantized path (step.cu quant_layer / quant_head: every quantized
    // matrix through gemv_quant.cu, the others through gemv.cu without the fp16 path's fusions); chosen once per
    // Engine, so the fp16 path's launches and kernels are unchanged
    bool quant = false;
    // KV arena [S, L, 2, Hkv, max_seq, D]
    void *kv = nullptr;
    // scratch, preallocated by the owner (CudaBackend: torch tensors); shared by all sessions
    // because every step runs on the one replay stream
    void *x = nullptr;      // [H] residual stream
    void *xn = nullptr;     // [H] normed input (cuBLAS path)
    void *qkv = nullptr;    // [(Hq + 2 Hkv) D]
    void *ctx = nullptr;    // [Hq D]
    void *mlp = nullptr;    // [I]
    void *tmp = nullptr;    // [max(2I, qkv_rows, H, V)] GEMM output (cuBLAS path); custom path: lm_head's
                            // per-block argmax {value bits, row} (int2 per block), read by finish
    float *logits = nullptr;   // [V] fp32
    // attention's block rows: Hq, or Hq * P with O fused (P = attn_o_parts(H, Hq, Hkv, D) > 0)
    float *part_acc = nullptr; // [rows, max_splits, D]
    float *part_ml = nullptr;  // [rows, max_splits, 2]
    int *counters = nullptr;   // [rows], zero
    unsigned long long *o_sum = nullptr;  // [H] int64: the fused attention's O in fixed point (used when P > 0;
                                          // zero at rest: each layer's down kernel zeroes it after gate|up)
    int max_splits = 0;
    // per-session device state
    int *token_dev = nullptr;          // [S] the next input token
    int *seq_len_dev = nullptr;        // [S]
    SampleParams *params_dev = nullptr;  // [S]
    int *ring = nullptr;               // [S, ring_len]
    int ring_len = 0;
    // launch shape
    int sm_count = 132;
    bool use_cublas = false;

    size_t elem() const { return 2; }
    int qkv_rows() const { return (Hq + 2 * Hkv) * D; }
    size_t tmp_bytes() const { return std::max({(size_t)2 * I, (size_t)qkv_rows(), (size_t)H, (size_t)V}) * elem(); }
    void *k_cache(int s, int l) const {
        return (char *)kv + (((size_t)s * L + l) * 2 + 0) * Hkv * max_seq * D * elem();
    }
    void *v_cache(int s, int l) const {
        return (char *)kv + (((size_t)s * L + l) * 2 + 1) * Hkv * max_seq * D * elem();
    }
    void validate() const;
};

// The step's options: one per Engine (EngineOptions, bindings.cpp exports them by name). The defaults are the
// measured best (docs/performance.md); the others are kept for the GPU tests that prove two paths equal
// (tests/gpu/test_step.py, test_kernels.py) and for A/B timing (bench/quick_timing.py).
struct EngineOptions {
    int pdl = kPdlPreload;          // PdlLevel (ops.h): 0 plain launches, 1 PDL, 2 + L2 prefetch, 3 + register preload
    bool rope_in_qkv = true;        // RoPE in the QKV gemv where gemv_rope_fits (else in attention; log entry 29)
    bool o_in_attention = true;     // O fused into attention where attn_o_parts > 0 (else its own gemv; log entry 31)
    bool attn_per_kv_head = false;  // attention: one block row per KV head's group for every group size (default:
                                    // per query head for groups of up to 4; log entry 10)
    bool lm_head_seq_len = true;    // lm_small_kernel writes seq_len, finish lets the next step launch right after
                                    // its wait (else finish writes it; log entry 35)
    bool lm_head_l2_ahead = true;   // lm_small_kernel's L2 look-ahead (GemvLmArgs::l2_ahead; log entry 35)
    int step_skip = 0;              // timing ablation only (wrong results; see step.cu): 0 = the normal step
};

// Enqueue one whole decode step of session s on `st`. T >= 0: position baked into every launch (eager, exact
// graphs); T < 0: kernels read it from seq_len_dev[s] (dynamic graph). Does not synchronize or allocate; safe to
// call inside stream capture. `blas` must be a handle dedicated to `st` (only used with plan.use_cublas);
// `trace`: the kernel timeline (off: nullptr).
void enqueue_step(const Plan &p, const EngineOptions &o, int s, int T, cudaStream_t st, cublasHandle_t blas,
                  KernelTrace *trace);

}  // namespace case4
