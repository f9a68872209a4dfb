// rope.cuh -- rotary position embedding (HF half rotation of the first R dims of a head).
// Fused into the attention kernel's prologue (attention.cu): the block of KV head h rotates
// its query-head group and, if it owns position T, K_T, and writes K_T/V_T to the arena.
// cos/sin come from the fp32 tables [max_seq, R/2] of the weight loader (never recomputed).
#pragma once
#include "common.cuh"

namespace case4 {

// Rotated value of element d of one head `x` (raw, dtype) at table row `cs`/`sn`:
//   d < R/2:       x[d] c - x[d + R/2] s
//   R/2 <= d < R:  x[d] c + x[d - R/2] s
//   d >= R:        x[d]
// computed in fp32 and rounded once to T (as the reference does).
template <typename T>
__device__ __forceinline__ float rope_elem(const T *x, int d, int R, const float *cs, const float *sn) {
    const int half_r = R / 2;
    const float v = to_f(x[d]);
    if (d < half_r) return round_t<T>(v * cs[d] - to_f(x[d + half_r]) * sn[d]);
    if (d < R) return round_t<T>(v * cs[d - half_r] + to_f(x[d - half_r]) * sn[d - half_r]);
    return v;
}

}  // namespace case4
