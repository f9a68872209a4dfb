// norm.cu -- RMSNorm and the elementwise epilogues used by the cuBLAS A/B path
// (the custom path fuses all of these into the GEMV kernels, see gemv.cu).
#include "common.cuh"
#include "ops.h"

namespace case4 {

template <typename T>
__global__ void rmsnorm_kernel(const T *x, const int *tok, T *x_out, const T *w, T *out, int n, float eps) {
    __shared__ float red[kWarp];
    if (tok) x += (size_t)(*tok) * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = to_f(x[i]);
        ss = fmaf(v, v, ss);
        if (x_out) x_out[i] = x[i];
    }
    const float inv = rsqrtf(block_sum(ss, red) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[i] = from_f<T>(to_f(w[i]) * round_t<T>(to_f(x[i]) * inv));
}

template <typename T>
__global__ void resid_kernel(const T *y, T *out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_f<T>(to_f(y[i]) + to_f(out[i]));
}

template <typename T>
__global__ void swiglu_kernel(const T *y, T *out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = to_f(y[i]);
        out[i] = from_f<T>(round_t<T>(g / (1.f + __expf(-g))) * to_f(y[i + n]));
    }
}

template <typename T>
__global__ void to_f32_kernel(const T *y, float *out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = to_f(y[i]);
}

#define CASE4_DISPATCH(dtype, ...)                                   \
    do {                                                             \
        if ((dtype) == kF16) { using T = half; __VA_ARGS__; }        \
        else { using T = __nv_bfloat16; __VA_ARGS__; }               \
    } while (0)

void launch_rmsnorm(const void *x, const int *tok, void *x_out, const void *w, void *out, int n, float eps,
                    int dtype, cudaStream_t st) {
    CASE4_DISPATCH(dtype, rmsnorm_kernel<T><<<1, 1024, 0, st>>>((const T *)x, tok, (T *)x_out, (const T *)w,
                                                                  (T *)out, n, eps));
    CASE4_LAUNCH_CHECK();
}
void launch_resid_add(const void *y, void *out, int n, int dtype, cudaStream_t st) {
    CASE4_DISPATCH(dtype, resid_kernel<T><<<(n + 255) / 256, 256, 0, st>>>((const T *)y, (T *)out, n));
    CASE4_LAUNCH_CHECK();
}
void launch_swiglu(const void *y, void *out, int n, int dtype, cudaStream_t st) {
    CASE4_DISPATCH(dtype, swiglu_kernel<T><<<(n + 255) / 256, 256, 0, st>>>((const T *)y, (T *)out, n));
    CASE4_LAUNCH_CHECK();
}
void launch_to_f32(const void *y, float *out, int n, int dtype, cudaStream_t st) {
    CASE4_DISPATCH(dtype, to_f32_kernel<T><<<(n + 255) / 256, 256, 0, st>>>((const T *)y, out, n));
    CASE4_LAUNCH_CHECK();
}

}  // namespace case4
