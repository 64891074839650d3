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
// driver, out of memory), with the CUDA error text.
#pragma once

#include <cstdint>
#include <string>

namespace pyinfluence {
namespace cuda {

enum class DType { Float32, Float64 };

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
