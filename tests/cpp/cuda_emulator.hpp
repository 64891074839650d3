// A host emulator for the subset of CUDA used by csrc/cuda (kernels.cuh, launch.cuh, api_impl.cuh), so that the
// kernels' indexing, tiling, shared-memory staging, barriers and top-k merging are tested on machines without a GPU.
//
// A launch runs its blocks one after another; the threads of a block are real threads (std::thread) meeting at a
// std::barrier for every __syncthreads() and at the end of each block. __shared__ becomes `static`: one copy shared by
// the threads of the running block (blocks do not overlap). Device memory is host memory; atomics take a mutex.
// What it cannot show: timing-dependent races beyond the barrier discipline, launch limits, real memory spaces.
#pragma once

#include <math.h>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 grid_dim, block_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline std::mutex atomic_mutex;
inline int multiprocessors = 2;  // what cudaDeviceGetAttribute reports: small, so that the top-k streams in chunks
inline long long launches = 0;

template <class F>
void launch(dim3 grid, dim3 block, F&& body) {
  ++launches;
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  grid_dim = grid;
  block_dim = block;
  std::barrier<> bar(nthreads);
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t)
    threads.emplace_back([&, t] {
      block_barrier = &bar;
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned long long b = 0; b < nblocks; ++b) {
        block_idx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (1ull * grid.x * grid.y)));
        body();
        bar.arrive_and_wait();  // the block ends when all its threads are done
      }
    });
  for (auto& th : threads) th.join();
}
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const T old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const unsigned long long old = *address;
  *address = std::min(old, value);
  return old;
}

#define PYI_LAUNCH(kernel, grid, block, stream, ...) ::emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); })

// ---- the runtime API calls used by csrc/cuda and the tests ------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorNotSupported = 801, cudaErrorInvalidValue = 1 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
using cudaStream_t = void*;

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::multiprocessors;
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  // Poisoned, like uninitialised device memory: kernels must not rely on zeros they did not write.
  *p = std::malloc(std::max<std::size_t>(bytes, 1));
  std::memset(*p, 0x7f, bytes);
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaMallocAsync(void** p, std::size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemsetAsync(void* p, int v, std::size_t bytes, cudaStream_t) {
  std::memset(p, v, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, k);
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
