// The regularised training objective of a linear model and its derivatives, with optional example
// weights ω (for leave-one-out and leave-group-out retraining, ω_i = 0 removes example i):
//
//   R(θ)  = Σ_i ω_i L(z_i, θ) / Σ_i ω_i + (l2/2) ‖P θ‖²
//   ∇R    = Σ_i ω_i r_i ⊗ x̃_i / Σ ω + l2 P θ
//   ∇²R   = Σ_i ω_i D_i ⊗ x̃_i x̃_iᵀ / Σ ω + l2 P
//
// P is the diagonal mask of penalised parameters (the intercept is unpenalised unless asked).
// objective() and hessian() are exactly R, ∇R, ∇²R; solvers add the intercept gauge of ModelSpec themselves.
// The Hessian is assembled in blocks of rows as symmetric rank-b updates (SYRK), so memory does not grow
// with n and only the lower triangle is computed; for the multinomial family
//   Σ_i D_i ⊗ x̃x̃ᵀ = blockdiag_a(X̃ᵀ diag(p_a) X̃) − Gᵀ G,   G_i = p_i ⊗ x̃_i,
// i.e. one wide SYRK plus K narrow ones.
#pragma once

#include "pyinfluence/families.hpp"

namespace pyinfluence {

template <class S>
struct ObjectiveValue {
  double value = 0.0;  // R(θ)
  RowMatrix<S> grad;   // ∇R, K×d_eff
};

// X: n×d, y: n, W: K×d_eff, weights: empty (all ones) or n nonnegative values with positive sum.
template <class S>
ObjectiveValue<S> objective(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                            const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights, bool with_gradient = true);

// ∇²R (p×p, full symmetric, column-major), l2 included, no damping.
template <class S>
ColMatrix<S> hessian(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                     const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights);

// Only the data part Σ ω_i D_i ⊗ x̃x̃ᵀ / Σ ω (no l2), lower triangle filled and mirrored.
template <class S>
ColMatrix<S> data_hessian(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                          const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights);

// The internal gauge term (γ/2)(Σ_k b_k)² of ModelSpec::intercept_gauge (no-op unless has_intercept_gauge()):
// added to a Hessian before factorising, or to an objective value and gradient inside the Newton trainer.
template <class S>
void add_intercept_gauge(const ModelSpec& spec, Index d, ColMatrix<S>& H);
template <class S>
void add_intercept_gauge(const ModelSpec& spec, const ConstRowMatrixRef<S>& W, ObjectiveValue<S>& obj);

// Checks shapes and values of (X, y, W, weights) against the spec; throws std::invalid_argument.
template <class S>
void check_problem(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                   const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights);

// Rows per block so that a block of `width` values per row stays near `budget_bytes`.
Index rows_per_block(Index n, Index width, std::size_t scalar_size, std::size_t budget_bytes = std::size_t(32) << 20);

}  // namespace pyinfluence
