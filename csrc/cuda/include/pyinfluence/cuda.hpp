// Optional CUDA kernels of the linear path (built with -DPYINFLUENCE_CUDA=ON when a CUDA compiler is found; the
// macro PYINFLUENCE_HAS_CUDA is then defined for users of pyinfluence::cuda).
//
// Plain C++: no CUDA, Eigen or torch headers. Arrays are raw DEVICE pointers to dense row-major data of one dtype
// (float32 or float64) on the given device; the stream is a cudaStream_t passed as an opaque pointer (nullptr: the
// legacy default stream). The calls are asynchronous on that stream unless said otherwise, so arrays coming from
// another library (e.g. torch's tensor.data_ptr() and torch.cuda.current_stream().cuda_stream) must be used on the
// same stream or synchronised by the caller. Notation as in families.hpp/engine.hpp: n training rows X (n×d), labels
// y (n), parameters W (K×d_eff, d_eff = d + intercept), p = K·d_eff, x̃ = [x, 1] with an intercept.
//
// Errors: std::invalid_argument for bad sizes or labels; std::runtime_error for CUDA failures (no device, an old
// driver, out of memory), with the CUDA error text. Every entry point first runs its argument check (check_*,
// below) and throws std::invalid_argument with the check's message, before it touches device memory, when the
// check fails: a wrong dimension is reported, never read or written out of bounds.
#pragma once

#include <cstdint>
#include <string>

namespace pyinfluence {
namespace cuda {

enum class DType : int { Float32 = 0, Float64 = 1 };

// The loss families of families.hpp, in the same order as pyinfluence::Family.
enum class DeviceFamily : int { Logistic = 0, Multinomial = 1, SmoothHinge = 2, Squared = 3 };

struct DeviceModel {
  DeviceFamily family = DeviceFamily::Logistic;
  std::int64_t n_outputs = 1;  // K
  bool fit_intercept = true;
  bool penalize_intercept = false;
  double l2 = 0.0;
  double temperature = 1.0;  // smooth hinge
};

using Stream = void*;  // cudaStream_t

// The argument checks of the entry points, callable on their own (no CUDA call, no exception): the model (a known
// family, K, l2, temperature), the dtype and the device index; every dimension (positive, and within the kernels'
// index ranges and launch limits) and every product of dimensions that sizes an array (it must fit in 64 bits with
// room for the element size); every pointer (non-null, except the optional loss, and aligned for its element type).
// Arrays are dense and row-major, so the dimensions are their only strides.
enum class ArgStatus : int {
  Ok = 0,
  BadModel = 1,     // unknown family, wrong n_outputs, l2 or temperature out of range
  BadDType = 2,     // not one of DType
  BadDevice = 3,    // a negative device index
  BadShape = 4,     // a dimension < 1 (or k outside [1, n])
  TooLarge = 5,     // dimensions beyond the kernels' index ranges or launch limits
  NullPointer = 6,  // a required array is null
  Misaligned = 7,   // an array is not aligned for its element type
};

struct [[nodiscard]] ArgCheck {
  ArgStatus status = ArgStatus::Ok;
  std::string message;  // what is wrong ("" when ok)
  [[nodiscard]] bool ok() const { return status == ArgStatus::Ok; }
};

[[nodiscard]] ArgCheck check_per_example(const DeviceModel& model, DType dtype, int device, const void* X,
                                         const void* y, const void* W, std::int64_t n, std::int64_t d, const void* loss,
                                         const void* residual, const void* curvature);
[[nodiscard]] ArgCheck check_hessian(const DeviceModel& model, DType dtype, int device, const void* X,
                                     const void* curvature, std::int64_t n, std::int64_t d, const void* H);
[[nodiscard]] ArgCheck check_up_loss(const DeviceModel& model, DType dtype, int device, const void* X,
                                     const void* residual, std::int64_t n, std::int64_t d, const void* S,
                                     std::int64_t m, const void* out);
[[nodiscard]] ArgCheck check_top_k(const DeviceModel& model, DType dtype, int device, const void* X,
                                   const void* residual, std::int64_t n, std::int64_t d, const void* S, std::int64_t m,
                                   std::int64_t k, const std::int64_t* helpful_idx, const void* helpful_val,
                                   const std::int64_t* harmful_idx, const void* harmful_val);

// Number of CUDA devices the driver reports (0 without a driver or a device; never throws).
int device_count();
// Runtime and driver versions as text, e.g. "runtime 13.0, driver 13.0" (for error messages and reports).
std::string version_info();

// Per-example loss (n, may be null), residual r = ∂L/∂s (n×K) and curvature (n×K: binary families ∂²L/∂s² in
// column 0; multinomial the class probabilities p, D = diag(p) − ppᵀ). Validates the labels on the device and
// synchronises the stream once to report an invalid one (std::invalid_argument naming its row).
void per_example(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* y,
                 const void* W, std::int64_t n, std::int64_t d, void* loss, void* residual, void* curvature);

// H = (1/n) Σ_i D_i ⊗ x̃_i x̃_iᵀ + l2·P (p×p, symmetric; no damping) from X and the curvature of per_example.
// The heavy part is one tiled product per class pair (a ≥ b) over the lower triangle, the weights D_i[a, b] formed
// on the fly from the curvature; split over row ranges summed with atomics (so the last bits may vary run to run).
void hessian(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* curvature,
             std::int64_t n, std::int64_t d, void* H);

// out (n×m) with out(i, t) = −∇θL(z_i)ᵀ s_t = −Σ_a r_ia (x̃_i · S_t[a, :]): up_loss of the training rows (X, residual)
// against m test points whose s_test vectors s_t = (H + λI)⁻¹ ∇θL(z_t) are the rows of S (m×p). The gradients
// r_i ⊗ x̃_i are formed tile by tile in shared memory, never stored.
void up_loss(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* residual,
             std::int64_t n, std::int64_t d, const void* S, std::int64_t m, void* out);

// Streaming top-k of up_loss: per test point, the k training indices with the most negative scores (helpful, in
// increasing order) and the most positive (harmful, in decreasing order); equal scores in increasing index order.
// Each block scores a tile of rows and keeps its own best candidates, which are merged into a running top-k per
// test point chunk by chunk: the n×m score matrix is never written, memory is O(m·k·blocks). Outputs (m×k each):
// helpful_idx/harmful_idx int64, helpful_val/harmful_val of dtype. 1 ≤ k ≤ n.
void top_k(const DeviceModel& model, DType dtype, int device, Stream stream, const void* X, const void* residual,
           std::int64_t n, std::int64_t d, const void* S, std::int64_t m, std::int64_t k, std::int64_t* helpful_idx,
           void* helpful_val, std::int64_t* harmful_idx, void* harmful_val);

}  // namespace cuda
}  // namespace pyinfluence
