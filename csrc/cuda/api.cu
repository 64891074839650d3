// The compiled CUDA part of pyinfluence: the public functions of pyinfluence/cuda.hpp (api_impl.cuh) with real
// launches.
#include <cuda_runtime.h>

#define PYI_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#include "api_impl.cuh"
