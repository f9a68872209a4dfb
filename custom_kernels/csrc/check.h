// check.h -- error checks and the error types shared by host code (.cpp) and kernels (.cu).
// bindings.cpp registers the two exception types with Python (py::register_exception), so that callers catch
// them by type: PrecaptureTimeout (a RuntimeError) and BadArgument (a ValueError; CudaBackend turns it into
// BadInput). Everything else is a plain std::runtime_error (RuntimeError).
#pragma once

#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace case4 {

// Engine::wait_precapture ran out of time (the graphs were not all captured yet)
struct PrecaptureTimeout : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// a caller's argument is out of range (session, window, count, mode)
struct BadArgument : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The one session range check: 0 <= s < sessions
inline void check_session(int s, int sessions, const char *where) {
    if (s < 0 || s >= sessions)
        throw BadArgument(std::string(where) + ": session " + std::to_string(s) + " out of range [0, " +
                          std::to_string(sessions) + ")");
}

}  // namespace case4

#define CASE4_CUDA_CHECK(expr)                                                          \
    do {                                                                                \
        cudaError_t err__ = (expr);                                                     \
        if (err__ != cudaSuccess) {                                                     \
            throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorString(err__) + \
                                     " at " __FILE__ ":" + std::to_string(__LINE__) + ": " #expr); \
        }                                                                               \
    } while (0)

// After a launch: report configuration errors immediately (does not synchronize).
#define CASE4_LAUNCH_CHECK() CASE4_CUDA_CHECK(cudaPeekAtLastError())

// A cuBLAS call (the includer includes <cublas_v2.h>)
#define CASE4_CUBLAS_CHECK(expr)                                                                  \
    do {                                                                                          \
        cublasStatus_t st__ = (expr);                                                             \
        if (st__ != CUBLAS_STATUS_SUCCESS)                                                        \
            throw std::runtime_error(std::string("cuBLAS error ") + std::to_string((int)st__) +  \
                                     " at " __FILE__ ":" + std::to_string(__LINE__) + ": " #expr); \
    } while (0)
