// The public entry points of pyinfluence/cuda.hpp: dtype dispatch onto the templated host code of launch.cuh.
// Included by api.cu (nvcc, the CUDA runtime) and by tests/cpp/test_cuda_kernels.cpp on the host emulator.
#pragma once

#include <cstdint>
#include <string>

#include "launch.cuh"

namespace pyinfluence {
namespace cuda {

namespace detail {
inline cudaStream_t as_stream(Stream s) { return static_cast<cudaStream_t>(s); }
}  // namespace detail

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: not an error here
    return 0;
  }
  return count;
}

std::string version_info() {
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  const auto text = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
  return "runtime " + text(runtime) + ", driver " + (driver ? text(driver) : std::string("none"));
}

void per_example(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* y,
                 const void* W, std::int64_t n, std::int64_t d, void* loss, void* residual, void* curvature) {
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::per_example_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X), static_cast<const double*>(y),
                                     static_cast<const double*>(W), n, static_cast<double*>(loss),
                                     static_cast<double*>(residual), static_cast<double*>(curvature));
  else
    detail::per_example_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X), static_cast<const float*>(y),
                                    static_cast<const float*>(W), n, static_cast<float*>(loss),
                                    static_cast<float*>(residual), static_cast<float*>(curvature));
}

void hessian(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* curvature,
             std::int64_t n, std::int64_t d, void* H) {
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::hessian_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X),
                                 static_cast<const double*>(curvature), n, static_cast<double*>(H));
  else
    detail::hessian_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X), static_cast<const float*>(curvature),
                                n, static_cast<float*>(H));
}

void up_loss(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* residual,
             std::int64_t n, std::int64_t d, const void* S, std::int64_t m, void* out) {
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::up_loss_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X), static_cast<const double*>(residual),
                                 n, static_cast<const double*>(S), m, static_cast<double*>(out));
  else
    detail::up_loss_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X), static_cast<const float*>(residual),
                                n, static_cast<const float*>(S), m, static_cast<float*>(out));
}

void top_k(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* residual,
           std::int64_t n, std::int64_t d, const void* S, std::int64_t m, std::int64_t k, std::int64_t* helpful_idx,
           void* helpful_val, std::int64_t* harmful_idx, void* harmful_val) {
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::top_k_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X), static_cast<const double*>(residual),
                               n, static_cast<const double*>(S), m, k, helpful_idx, static_cast<double*>(helpful_val),
                               harmful_idx, static_cast<double*>(harmful_val));
  else
    detail::top_k_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X), static_cast<const float*>(residual), n,
                              static_cast<const float*>(S), m, k, helpful_idx, static_cast<float*>(helpful_val),
                              harmful_idx, static_cast<float*>(harmful_val));
}

}  // namespace cuda
}  // namespace pyinfluence
