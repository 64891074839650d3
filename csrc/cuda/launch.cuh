// Host side of the CUDA kernels: argument checks, launch geometry, temporary device memory, the chunk loop of the
// streaming top-k. Templated on the scalar type; compiled by nvcc in api.cu and, with the CUDA runtime replaced by
// tests/cpp/cuda_emulator.hpp, by the host compiler in the emulated test. Kernels are launched with
// PYI_LAUNCH(kernel, grid, block, stream, args...), defined by the includer.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels.cuh"
#include "pyinfluence/cuda.hpp"

namespace pyinfluence {
namespace cuda {
namespace detail {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pyinfluence CUDA: ") + what + " failed: " + cudaGetErrorString(err));
}
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Makes `device` current for the duration of a call (and restores the caller's device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : target_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != target_) check_cuda(cudaSetDevice(target_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != target_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0, target_ = 0;
};

// Temporary device memory, stream-ordered (cudaMallocAsync) where the device supports memory pools.
class DeviceBuffer {
 public:
  DeviceBuffer(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    cudaError_t err = cudaMallocAsync(&ptr_, bytes, stream_);
    if (err == cudaErrorNotSupported) {
      (void)cudaGetLastError();
      async_ = false;
      err = cudaMalloc(&ptr_, bytes);
    }
    check_cuda(err, "device allocation");
  }
  ~DeviceBuffer() {
    if (!ptr_) return;
    if (async_) {
      cudaFreeAsync(ptr_, stream_);
    } else {
      cudaStreamSynchronize(stream_);
      cudaFree(ptr_);
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
  bool async_ = true;
};

inline int multiprocessors() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return std::max(1, sms);
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checks (the check_* functions of pyinfluence/cuda.hpp are built from these).
// ---------------------------------------------------------------------------------------------------------------
// Largest element count of any array the kernels index: × 8 bytes it still fits in int64 and a 64-bit size_t.
constexpr std::int64_t kMaxElements = std::int64_t(1) << 59;
// Largest n_outputs: the Hessian's class-pair blocks are indexed in blockIdx.x (K² · tiles² < 2³¹).
constexpr std::int64_t kMaxOutputs = 65535;
// Largest number of test points per call: test-point tiles index blockIdx.y (≤ 65535 tiles of kTT).
constexpr std::int64_t kMaxTests = std::int64_t(65535) * kTT;

inline ArgCheck fail(ArgStatus status, std::string message) {
  ArgCheck out;
  out.status = status;
  out.message = std::move(message);
  return out;
}

// a·b fits in kMaxElements (a, b ≥ 0).
inline bool fits(std::int64_t a, std::int64_t b) { return a == 0 || b <= kMaxElements / a; }

inline std::size_t element_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

// The model, dtype and device, and d with d_eff·K inside the kernels' int arithmetic.
inline ArgCheck check_model(const DeviceModel& m, DType dtype, int device, std::int64_t d) {
  const int family = int(m.family);
  if (family < kLogistic || family > kSquared)
    return fail(ArgStatus::BadModel, "unknown model family " + std::to_string(family));
  if (m.family == DeviceFamily::Multinomial ? m.n_outputs < 2 : m.n_outputs != 1)
    return fail(ArgStatus::BadModel, "n_outputs must be >= 2 for the multinomial family and 1 otherwise");
  if (m.n_outputs > kMaxOutputs) return fail(ArgStatus::TooLarge, "too many outputs for the CUDA kernels");
  if (!(m.l2 >= 0.0) || !(m.l2 < std::numeric_limits<double>::infinity()))
    return fail(ArgStatus::BadModel, "l2 must be a finite number >= 0");
  if (m.family == DeviceFamily::SmoothHinge &&
      (!(m.temperature > 0.0) || !(m.temperature < std::numeric_limits<double>::infinity())))
    return fail(ArgStatus::BadModel, "temperature must be a finite number > 0 for the smooth hinge");
  if (dtype != DType::Float32 && dtype != DType::Float64)
    return fail(ArgStatus::BadDType, "dtype must be Float32 or Float64");
  if (device < 0) return fail(ArgStatus::BadDevice, "device must be >= 0, got " + std::to_string(device));
  if (d < 1) return fail(ArgStatus::BadShape, "X must have at least one column");
  const std::int64_t de = d + (m.fit_intercept ? 1 : 0);
  if (de > std::int64_t(std::numeric_limits<int>::max()) / 2 / m.n_outputs)
    return fail(ArgStatus::TooLarge, "too many parameters for the CUDA kernels");
  return {};
}

// n ≥ 1 training rows, with X (n×d) and the per-example arrays (n×K) inside kMaxElements.
inline ArgCheck check_rows(const DeviceModel& m, std::int64_t n, std::int64_t d) {
  if (n < 1) return fail(ArgStatus::BadShape, "X must have at least one row");
  if (!fits(n, d) || !fits(n, m.n_outputs))
    return fail(ArgStatus::TooLarge, "X (" + std::to_string(n) + " x " + std::to_string(d) + ") is too large");
  return {};
}

// m test points: at least one, at most kMaxTests, S (m×p) inside kMaxElements.
inline ArgCheck check_tests(std::int64_t m, std::int64_t p) {
  if (m < 1) return fail(ArgStatus::BadShape, "at least one test point is needed");
  if (m > kMaxTests)
    return fail(ArgStatus::TooLarge,
                "at most " + std::to_string(kMaxTests) + " test points per call (split the test set)");
  if (!fits(m, p))
    return fail(ArgStatus::TooLarge, "S (" + std::to_string(m) + " x " + std::to_string(p) + ") is too large");
  return {};
}

// A required (or, with optional, possibly null) array: aligned for its element size.
inline ArgCheck check_pointer(const char* name, const void* ptr, std::size_t element, bool optional = false) {
  if (!ptr) return optional ? ArgCheck{} : fail(ArgStatus::NullPointer, std::string("null device pointer: ") + name);
  if (reinterpret_cast<std::uintptr_t>(ptr) % element != 0)
    return fail(ArgStatus::Misaligned,
                std::string(name) + " is not aligned to its " + std::to_string(element) + "-byte elements");
  return {};
}

inline std::int64_t n_params(const DeviceModel& m, std::int64_t d) {
  return m.n_outputs * (d + (m.fit_intercept ? 1 : 0));
}

// Hessian tiles: 64 wide when d_eff is large enough to fill them, else 32.
inline int hessian_tile(std::int64_t de) { return de >= 192 ? 64 : 32; }
inline std::int64_t hessian_tiles(std::int64_t de) {
  const int tile = hessian_tile(de);
  return (de + tile - 1) / tile;
}

// Converts a model that passed check_model.
inline Model make_model(const DeviceModel& m, std::int64_t d) {
  Model M;
  M.family = int(m.family);
  M.K = int(m.n_outputs);
  M.d = int(d);
  M.de = int(d + (m.fit_intercept ? 1 : 0));
  M.fit_intercept = m.fit_intercept ? 1 : 0;
  M.penalize_intercept = m.penalize_intercept ? 1 : 0;
  M.l2 = m.l2;
  M.temperature = m.temperature;
  return M;
}

// Throws std::invalid_argument with the message of a failed check.
inline void require(const ArgCheck& check) {
  if (!check.ok()) throw std::invalid_argument("pyinfluence CUDA: " + check.message);
}

inline unsigned grid_for(std::int64_t work, int threads) {
  const std::int64_t blocks = (work + threads - 1) / threads;
  return unsigned(std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, 65535 * 8)));
}

template <class T>
void per_example_impl(const Model& M, cudaStream_t stream, const T* X, const T* y, const T* W, std::int64_t n, T* loss,
                      T* R, T* C) {
  DeviceBuffer bad(sizeof(unsigned long long), stream);
  auto* bad_row = bad.as<unsigned long long>();
  check_cuda(cudaMemsetAsync(bad_row, 0xff, sizeof(unsigned long long), stream), "cudaMemsetAsync");
  const auto kernel = &per_example_kernel<T>;
  PYI_LAUNCH(kernel, dim3(grid_for(n, 128)), dim3(128), stream, M, X, y, W, n, loss, R, C, bad_row);
  check_launch("per_example_kernel");
  unsigned long long first_bad = 0;
  check_cuda(cudaMemcpyAsync(&first_bad, bad_row, sizeof first_bad, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  if (first_bad != std::numeric_limits<unsigned long long>::max()) {
    static const char* expected[] = {"0 or 1", "a class index in [0, n_outputs)", "-1 or +1", "a finite number"};
    throw std::invalid_argument("y[" + std::to_string(first_bad) + "] is not a valid label: expected " +
                                expected[M.family]);
  }
}

template <class T>
void hessian_impl(const Model& M, cudaStream_t stream, const T* X, const T* C, std::int64_t n, T* H) {
  const std::int64_t p = std::int64_t(M.K) * M.de;
  check_cuda(cudaMemsetAsync(H, 0, std::size_t(p * p) * sizeof(T), stream), "cudaMemsetAsync");
  const int tile = hessian_tile(M.de);
  const int n_tiles = int(hessian_tiles(M.de));
  const std::int64_t grid_x = std::int64_t(n_tiles) * n_tiles * M.K * M.K;  // < 2³¹: check_hessian
  // Tiles that do work (lower triangle), then enough row splits to give every multiprocessor a few blocks.
  const std::int64_t active =
      std::int64_t(M.K) * n_tiles * (n_tiles + 1) / 2 + std::int64_t(M.K) * (M.K - 1) / 2 * n_tiles * n_tiles;
  const std::int64_t want = (4 * std::int64_t(multiprocessors()) + active - 1) / active;
  const std::int64_t splits = std::max<std::int64_t>(1, std::min<std::int64_t>({want, n / 256, 65535}));
  const std::int64_t rows_per_split = (n + splits - 1) / splits;
  const dim3 grid(unsigned(grid_x), unsigned((n + rows_per_split - 1) / rows_per_split)), block(16, 16);
  const auto assemble = tile == 64 ? &hessian_kernel<T, 64> : &hessian_kernel<T, 32>;
  PYI_LAUNCH(assemble, grid, block, stream, M, X, C, n, rows_per_split, n_tiles, H);
  check_launch("hessian_kernel");
  const auto finish = &finish_hessian_kernel<T>;
  PYI_LAUNCH(finish, dim3(grid_for(p * p, 256)), dim3(256), stream, M, H, p, T(1) / T(n));
  check_launch("finish_hessian_kernel");
}

// Test-point tiles of a launch (m ≤ kMaxTests: check_tests).
inline std::int64_t test_tiles(std::int64_t m) { return (m + kTT - 1) / kTT; }

template <class T>
void up_loss_impl(const Model& M, cudaStream_t stream, const T* X, const T* R, std::int64_t n, const T* S,
                  std::int64_t m, T* out) {
  const std::int64_t t_tiles = test_tiles(m);
  const std::int64_t r_tiles = (n + kTI - 1) / kTI;  // < 2³¹: check_up_loss
  const auto kernel = &score_kernel<T, kWrite>;
  PYI_LAUNCH(kernel, dim3(unsigned(r_tiles), unsigned(t_tiles)), dim3(16, 16), stream, M, X, R, std::int64_t(0), n, S,
             m, out, SelectArgs<T>());
  check_launch("score_kernel");
}

template <class T>
void top_k_impl(const Model& M, cudaStream_t stream, const T* X, const T* R, std::int64_t n, const T* S, std::int64_t m,
                std::int64_t k, std::int64_t* help_idx, T* help_val, std::int64_t* harm_idx, T* harm_val) {
  const std::int64_t t_tiles = test_tiles(m);
  const std::int64_t kk = std::min<std::int64_t>(k, kTI);
  // Row blocks per chunk: enough blocks to fill the GPU (with the test-point tiles), capped so that the merge (each
  // entry binary-searches every other list) and the candidate memory (2·m·nb·kk entries) stay small.
  std::int64_t nb = (4 * std::int64_t(multiprocessors()) + t_tiles - 1) / t_tiles;
  nb = std::min<std::int64_t>({nb, 256, (n + kTI - 1) / kTI});
  nb = std::min<std::int64_t>(nb, std::max<std::int64_t>(1, (std::int64_t(64) << 20) / (2 * m * kk * 16)));
  nb = std::max<std::int64_t>(nb, 1);
  const T inf = std::numeric_limits<T>::infinity();
  DeviceBuffer cand(std::size_t(2 * m * nb * kk) * (sizeof(T) + sizeof(std::int64_t)), stream);
  DeviceBuffer run(std::size_t(2 * m * k) * (sizeof(T) + sizeof(std::int64_t)), stream);
  // Layout of each buffer: [help idx | harm idx | help val | harm val].
  std::int64_t* cand_idx = cand.as<std::int64_t>();
  T* cand_val = reinterpret_cast<T*>(cand_idx + 2 * m * nb * kk);
  std::int64_t* run_idx = run.as<std::int64_t>();
  T* run_val = reinterpret_cast<T*>(run_idx + 2 * m * k);
  // Running top-k ping-pongs between the temporary buffer and the caller's outputs.
  struct Lists {
    std::int64_t *hi, *ri;
    T *hv, *rv;
  };
  Lists tmp{run_idx, run_idx + m * k, run_val, run_val + m * k};
  Lists dst{help_idx, harm_idx, help_val, harm_val};
  Lists cur = tmp, nxt = dst;
  const auto fill = &fill_kernel<T>;
  const auto score = &score_kernel<T, kSelect>;
  const auto merge = &merge_kernel<T>;
  PYI_LAUNCH(fill, dim3(grid_for(m * k, 256)), dim3(256), stream, cur.hv, cur.hi, m * k, inf);
  PYI_LAUNCH(fill, dim3(grid_for(m * k, 256)), dim3(256), stream, cur.rv, cur.ri, m * k, -inf);
  check_launch("fill_kernel");
  for (std::int64_t start = 0; start < n; start += nb * kTI) {
    const std::int64_t end = std::min(n, start + nb * kTI);
    const std::int64_t blocks = (end - start + kTI - 1) / kTI;
    SelectArgs<T> sel;
    sel.k = k;
    sel.kk = kk;
    sel.nb = blocks;
    sel.inf = inf;
    sel.help_idx = cand_idx;
    sel.harm_idx = cand_idx + m * blocks * kk;
    sel.help_val = cand_val;
    sel.harm_val = cand_val + m * blocks * kk;
    PYI_LAUNCH(score, dim3(unsigned(blocks), unsigned(t_tiles)), dim3(16, 16), stream, M, X, R, start, end, S, m,
               static_cast<T*>(nullptr), sel);
    check_launch("score_kernel");
    PYI_LAUNCH(merge, dim3(unsigned(m)), dim3(256), stream, false, cur.hv, cur.hi, sel.help_val, sel.help_idx, k, kk,
               blocks, inf, nxt.hv, nxt.hi);
    PYI_LAUNCH(merge, dim3(unsigned(m)), dim3(256), stream, true, cur.rv, cur.ri, sel.harm_val, sel.harm_idx, k, kk,
               blocks, -inf, nxt.rv, nxt.ri);
    check_launch("merge_kernel");
    std::swap(cur, nxt);
  }
  if (cur.hi != help_idx) {  // the last merge wrote into the temporary buffer
    const std::size_t ib = std::size_t(m * k) * sizeof(std::int64_t), vb = std::size_t(m * k) * sizeof(T);
    check_cuda(cudaMemcpyAsync(help_idx, cur.hi, ib, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(harm_idx, cur.ri, ib, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(help_val, cur.hv, vb, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(harm_val, cur.rv, vb, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace pyinfluence
