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

ArgCheck check_per_example(const DeviceModel& model, DType dtype, int device, const void* X, const void* y,
                           const void* W, std::int64_t n, std::int64_t d, const void* loss, const void* residual,
                           const void* curvature) {
  ArgCheck c = detail::check_model(model, dtype, device, d);
  if (c.ok()) c = detail::check_rows(model, n, d);
  const std::size_t es = detail::element_size(dtype);
  if (c.ok()) c = detail::check_pointer("X", X, es);
  if (c.ok()) c = detail::check_pointer("y", y, es);
  if (c.ok()) c = detail::check_pointer("W", W, es);
  if (c.ok()) c = detail::check_pointer("loss", loss, es, /*optional=*/true);
  if (c.ok()) c = detail::check_pointer("residual", residual, es);
  if (c.ok()) c = detail::check_pointer("curvature", curvature, es);
  return c;
}

ArgCheck check_hessian(const DeviceModel& model, DType dtype, int device, const void* X, const void* curvature,
                       std::int64_t n, std::int64_t d, const void* H) {
  ArgCheck c = detail::check_model(model, dtype, device, d);
  if (c.ok()) c = detail::check_rows(model, n, d);
  if (c.ok()) {
    const std::int64_t p = detail::n_params(model, d), tiles = detail::hessian_tiles(p / model.n_outputs);
    if (!detail::fits(p, p))
      c = detail::fail(ArgStatus::TooLarge, "H (" + std::to_string(p) + " x " + std::to_string(p) + ") is too large");
    else if (tiles * tiles * model.n_outputs * model.n_outputs >= (std::int64_t(1) << 31))
      c = detail::fail(ArgStatus::TooLarge, "too many Hessian tiles for one launch");
  }
  const std::size_t es = detail::element_size(dtype);
  if (c.ok()) c = detail::check_pointer("X", X, es);
  if (c.ok()) c = detail::check_pointer("curvature", curvature, es);
  if (c.ok()) c = detail::check_pointer("H", H, es);
  return c;
}

ArgCheck check_up_loss(const DeviceModel& model, DType dtype, int device, const void* X, const void* residual,
                       std::int64_t n, std::int64_t d, const void* S, std::int64_t m, const void* out) {
  ArgCheck c = detail::check_model(model, dtype, device, d);
  if (c.ok()) c = detail::check_rows(model, n, d);
  if (c.ok()) c = detail::check_tests(m, detail::n_params(model, d));
  if (c.ok() && !detail::fits(n, m))
    c = detail::fail(ArgStatus::TooLarge,
                     "the score matrix (" + std::to_string(n) + " x " + std::to_string(m) + ") is too large");
  if (c.ok() && (n + detail::kTI - 1) / detail::kTI >= (std::int64_t(1) << 31))
    c = detail::fail(ArgStatus::TooLarge, "too many training rows for one launch");
  const std::size_t es = detail::element_size(dtype);
  if (c.ok()) c = detail::check_pointer("X", X, es);
  if (c.ok()) c = detail::check_pointer("residual", residual, es);
  if (c.ok()) c = detail::check_pointer("S", S, es);
  if (c.ok()) c = detail::check_pointer("out", out, es);
  return c;
}

ArgCheck check_top_k(const DeviceModel& model, DType dtype, int device, const void* X, const void* residual,
                     std::int64_t n, std::int64_t d, const void* S, std::int64_t m, std::int64_t k,
                     const std::int64_t* helpful_idx, const void* helpful_val, const std::int64_t* harmful_idx,
                     const void* harmful_val) {
  ArgCheck c = detail::check_model(model, dtype, device, d);
  if (c.ok()) c = detail::check_rows(model, n, d);
  if (c.ok()) c = detail::check_tests(m, detail::n_params(model, d));
  if (c.ok() && !(k >= 1 && k <= n))
    c = detail::fail(ArgStatus::BadShape, "k must be between 1 and the number of training points (" +
                                              std::to_string(n) + "); got " + std::to_string(k));
  if (c.ok() && !detail::fits(2 * m, k))
    c = detail::fail(ArgStatus::TooLarge,
                     "the top-k lists (" + std::to_string(m) + " x " + std::to_string(k) + ") are too large");
  const std::size_t es = detail::element_size(dtype);
  if (c.ok()) c = detail::check_pointer("X", X, es);
  if (c.ok()) c = detail::check_pointer("residual", residual, es);
  if (c.ok()) c = detail::check_pointer("S", S, es);
  if (c.ok()) c = detail::check_pointer("helpful_idx", helpful_idx, sizeof(std::int64_t));
  if (c.ok()) c = detail::check_pointer("helpful_val", helpful_val, es);
  if (c.ok()) c = detail::check_pointer("harmful_idx", harmful_idx, sizeof(std::int64_t));
  if (c.ok()) c = detail::check_pointer("harmful_val", harmful_val, es);
  return c;
}

void per_example(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* y,
                 const void* W, std::int64_t n, std::int64_t d, void* loss, void* residual, void* curvature) {
  detail::require(check_per_example(model, dtype, device, X, y, W, n, d, loss, residual, curvature));
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::per_example_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X),
                                     static_cast<const double*>(y), static_cast<const double*>(W), n,
                                     static_cast<double*>(loss), static_cast<double*>(residual),
                                     static_cast<double*>(curvature));
  else
    detail::per_example_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X),
                                    static_cast<const float*>(y), static_cast<const float*>(W), n,
                                    static_cast<float*>(loss), static_cast<float*>(residual),
                                    static_cast<float*>(curvature));
}

void hessian(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* curvature,
             std::int64_t n, std::int64_t d, void* H) {
  detail::require(check_hessian(model, dtype, device, X, curvature, n, d, H));
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::hessian_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X),
                                 static_cast<const double*>(curvature), n, static_cast<double*>(H));
  else
    detail::hessian_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X),
                                static_cast<const float*>(curvature), n, static_cast<float*>(H));
}

void up_loss(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* residual,
             std::int64_t n, std::int64_t d, const void* S, std::int64_t m, void* out) {
  detail::require(check_up_loss(model, dtype, device, X, residual, n, d, S, m, out));
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::up_loss_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X),
                                 static_cast<const double*>(residual), n, static_cast<const double*>(S), m,
                                 static_cast<double*>(out));
  else
    detail::up_loss_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X),
                                static_cast<const float*>(residual), n, static_cast<const float*>(S), m,
                                static_cast<float*>(out));
}

void top_k(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* residual,
           std::int64_t n, std::int64_t d, const void* S, std::int64_t m, std::int64_t k, std::int64_t* helpful_idx,
           void* helpful_val, std::int64_t* harmful_idx, void* harmful_val) {
  detail::require(check_top_k(model, dtype, device, X, residual, n, d, S, m, k, helpful_idx, helpful_val, harmful_idx,
                              harmful_val));
  const detail::Model M = detail::make_model(model, d);
  detail::DeviceGuard guard(device);
  if (dtype == DType::Float64)
    detail::top_k_impl<double>(M, detail::as_stream(stream), static_cast<const double*>(X),
                               static_cast<const double*>(residual), n, static_cast<const double*>(S), m, k,
                               helpful_idx, static_cast<double*>(helpful_val), harmful_idx,
                               static_cast<double*>(harmful_val));
  else
    detail::top_k_impl<float>(M, detail::as_stream(stream), static_cast<const float*>(X),
                              static_cast<const float*>(residual), n, static_cast<const float*>(S), m, k, helpful_idx,
                              static_cast<float*>(helpful_val), harmful_idx, static_cast<float*>(harmful_val));
}

}  // namespace cuda
}  // namespace pyinfluence
