// Loss families of linear models: L(z, θ) depends on θ only through the K scores s = W x̃,
// x̃ = [x, 1] when the model has an intercept (last column of W), else x.
//
//   logistic      K = 1, y ∈ {0, 1}:  L = log(1 + e^s) − y s
//   multinomial   K ≥ 2, y ∈ {0..K−1}: L = logsumexp(s) − s_y
//   smooth_hinge  K = 1, y ∈ {−1, +1}: L = t·log(1 + exp((1 − y s)/t))   (Koh & Liang §4)
//   squared       K = 1, y ∈ ℝ:        L = ½ (s − y)²
//
// Everything the influence computations need follows from three per-example quantities:
//   the residual r = ∂L/∂s (K),  so ∇θ L = r ⊗ x̃                                  (gradient)
//   the curvature D = ∂²L/∂s² (K×K), so ∇²θ L = D ⊗ x̃ x̃ᵀ                          (Hessian)
// For the binary families D is a scalar weight; for the multinomial D = diag(p) − p pᵀ, p = softmax(s),
// which we store as p and apply on the fly (apply_curvature).
#pragma once

#include <string>

#include "pyinfluence/types.hpp"

namespace pyinfluence {

enum class Family { Logistic, Multinomial, SmoothHinge, Squared };

Family family_from_string(const std::string& name);  // throws std::invalid_argument
const char* family_name(Family f);

struct ModelSpec {
  Family family = Family::Logistic;
  Index n_outputs = 1;  // K: 1 for the binary families and ridge, n_classes for multinomial
  bool fit_intercept = true;
  bool penalize_intercept = false;
  double l2 = 0.0;           // R(θ) = mean loss + (l2/2)‖Pθ‖²
  double temperature = 1.0;  // smooth hinge only

  // Throws std::invalid_argument on inconsistent settings.
  void validate() const;
  Index d_eff(Index d) const { return d + (fit_intercept ? 1 : 0); }
  Index n_params(Index d) const { return n_outputs * d_eff(d); }
  // Multinomial softmax is invariant to adding one constant to every class's score, so with an unpenalised
  // intercept R is flat along b → b + c·1 and H is singular. We fix this gauge with the extra term
  // (γ/2)(Σ_k b_k)², γ = intercept_gauge, inside the solvers only (Newton trainer, factorisations; the reported
  // R, ∇R and H exclude it). It changes no prediction and no loss, and because every gradient is orthogonal
  // to that direction (Σ_k r_k = 0), (H + γ·uuᵀ)⁻¹ g = H⁺ g: influence equals the pseudo-inverse answer.
  static constexpr double intercept_gauge = 1.0;
  bool has_intercept_gauge() const { return family == Family::Multinomial && fit_intercept && !penalize_intercept; }
  // Whether parameter column j (of d_eff) is penalised by l2.
  bool penalized(Index j, Index d) const { return !(fit_intercept && !penalize_intercept && j == d); }
};

// Per-example quantities for a block of examples, computed from their scores (b×K) and labels (b).
//   loss (b), residual (b×K) = ∂L/∂s, curvature (b×K): binary → the scalar ∂²L/∂s² in column 0;
//   multinomial → the class probabilities p (D = diag(p) − p pᵀ).
// Labels are validated; an invalid label throws std::invalid_argument naming its row.
template <class S>
void per_example_from_scores(const ModelSpec& spec, const ConstRowMatrixRef<S>& scores, const ConstVectorRef<S>& y,
                             S* loss, S* residual, S* curvature);

// One example from its K scores: returns the loss, writes residual and curvature rows (length K). The label is
// NOT validated (call check_labels first): for fused per-row loops.
template <class S>
S per_example_row(const ModelSpec& spec, const S* scores, S y, S* residual, S* curvature);
// Throws std::invalid_argument naming the first invalid label.
template <class S>
void check_labels(const ModelSpec& spec, const ConstVectorRef<S>& y);

// Only the losses (cheaper: used by line searches and test-loss evaluation).
template <class S>
void loss_from_scores(const ModelSpec& spec, const ConstRowMatrixRef<S>& scores, const ConstVectorRef<S>& y, S* loss);

// out = D a for one example, given its curvature row c (K) — see the class comment.
template <class S>
inline void apply_curvature(const ModelSpec& spec, const S* c, const S* a, S* out) {
  const Index K = spec.n_outputs;
  if (spec.family != Family::Multinomial) {
    out[0] = c[0] * a[0];
    return;
  }
  S pa = 0;
  for (Index k = 0; k < K; ++k) pa += c[k] * a[k];
  for (Index k = 0; k < K; ++k) out[k] = c[k] * (a[k] - pa);
}

// Scores s = X̃ Wᵀ for a block of rows (b×K). X is (b×d) row-major; W is (K×d_eff) row-major.
template <class S>
void compute_scores(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstRowMatrixRef<S>& W,
                    RowMatrix<S>& scores);

// Copies rows [start, start+rows) of X into `buffer` with a trailing column of ones when the model has
// an intercept, so that blocks of X̃ can be fed to BLAS; without an intercept, returns a view of X.
template <class S>
ConstRowMatrixRef<S> augmented_rows(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, Index start, Index rows,
                                    RowMatrix<S>& buffer);

}  // namespace pyinfluence
