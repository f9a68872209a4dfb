// check.h -- error checks shared by host code (.cpp) and kernels (.cu).
#pragma once

#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

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
