// Exact influence for a fitted linear model (Koh & Liang 2017, §2), for many training and test points at once.
//
// The engine keeps the training data (by reference: the caller keeps it alive), θ̂, the per-example
// residuals r_i and curvatures D_i, H = ∇²R(θ̂) and the Cholesky factor L Lᵀ = H + λI. Signs and scaling:
//   up_params(z)          = −(H+λI)⁻¹ ∇θL(z)                                  (k×p)
//   up_loss(z, z_test)    = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇θL(z)                      (k×m)
//   pert_loss(z, z_test)  = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇x∇θL(z)                    (k×m×d)
//   self_influence(z)     = up_loss(z, z)                                      (k)
// Test points enter only through s_test = (H+λI)⁻¹ ∇θL(z_test); training points only through their
// residuals and features, since ∇θL(z) = r ⊗ x̃. Hence (up_loss)_{it} = Σ_k r_ik (x̃_iᵀ S_t[k,:]) with S_t the
// K×d_eff reshaping of s_test: one GEMM X̃ Ŝ per block of training rows, never the k×p gradient matrix.
#pragma once

#include <algorithm>

#include <memory>
#include <vector>

#include "pyinfluence/cholesky.hpp"
#include "pyinfluence/families.hpp"
#include "pyinfluence/newton.hpp"
#include "pyinfluence/objective.hpp"
#include "pyinfluence/status.hpp"

namespace pyinfluence {

template <class S>
struct TopK {
  // Each (m×k): per test point, the training indices with the most negative up_loss (helpful: upweighting
  // them lowers the test loss) in increasing order of score, and the most positive (harmful) in decreasing order.
  IndexRowMatrix helpful_idx, harmful_idx;
  RowMatrix<S> helpful_val, harmful_val;
};

template <class S>
class LinearInfluenceEngine;

// What LinearInfluenceEngine::create returns: the engine, or the reason there is none.
template <class S>
struct EngineOrStatus {
  std::unique_ptr<LinearInfluenceEngine<S>> engine;  // null unless status is Ok
  Status status = Status::Ok;  // NotPositiveDefinite (H + λI) or NonFinite (H or the residuals overflowed)
  FactorFailure failure;       // the factorisation's diagnosis when status is NotPositiveDefinite
};

template <class S>
class LinearInfluenceEngine {
 public:
  // Factorises H + λI (undamped multinomial models with an unpenalised intercept: plus the gauge of
  // families.hpp, so solves return the pseudo-inverse answer along the softmax shift direction). Throws
  // std::invalid_argument on bad shapes/values, NotPositiveDefiniteError (a std::domain_error carrying the
  // failing pivot, the size and a suggested damping) when H + λI is not positive definite, and NonFiniteError
  // when H or the training residuals overflow (scale the features; damping would not help). A constructed
  // engine always holds its factorisation.
  LinearInfluenceEngine(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train, const ConstVectorRef<S>& y_train,
                        const ConstRowMatrixRef<S>& W, double damping);
  // The engine of a BLOCK of the rows of a larger training set of n_total points (e.g. one chunk of a Dask array,
  // whose Hessian and gradient were summed over every chunk elsewhere). H = ∇²R(θ̂) of the whole set (l2 included,
  // no damping; its lower triangle is read) and grad_sum = Σ_i ∇θL(z_i, θ̂) = Σ_i r_i ⊗ x̃_i over all n_total points
  // (K×d_eff) are given, not assembled: only H + λI is factorised here (p³/3), and the block's residuals and
  // curvatures computed. Every query then answers as the engine of the whole set would: queries on explicit points,
  // the block's own scores (up_loss_train, self_influence_train, top_k, with indices local to the block) and
  // loo_newton (indices local to the block; the leave-one-out objective is that of all n_total points, through
  // n_total and grad_sum). loo_newton_group and refit_without need every training row and throw
  // std::invalid_argument. X_block may have no rows (an engine for test-side queries: s_test, solve, gradients).
  // Throws as the constructor above; NonFiniteError names H when H or grad_sum is not finite.
  LinearInfluenceEngine(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_block, const ConstVectorRef<S>& y_block,
                        const ConstRowMatrixRef<S>& W, double damping, const ConstColMatrixRef<S>& H, Index n_total,
                        const ConstRowMatrixRef<S>& grad_sum);
  // The same, reporting a numerical failure as a Status (and its diagnosis) instead of an exception; misuse still
  // throws std::invalid_argument.
  [[nodiscard]] static EngineOrStatus<S> create(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train,
                                                const ConstVectorRef<S>& y_train, const ConstRowMatrixRef<S>& W,
                                                double damping);

  Index n_train() const { return X_.rows(); }  // the rows this engine holds (a block: the block's rows)
  Index n_total() const { return n_total_; }   // n of R(θ) = (1/n) Σ L + …: n_train() unless a block engine
  bool is_block() const { return block_; }
  // Σ_i ∇θL(z_i, θ̂) over all n_total training points (K×d_eff), as used by loo_newton.
  const RowMatrix<S>& grad_sum() const { return grad_sum_; }
  Index n_features() const { return X_.cols(); }
  Index n_params() const { return spec_.n_params(X_.cols()); }
  const ModelSpec& spec() const { return spec_; }
  const ColMatrix<S>& hessian() const { return H_; }  // ∇²R(θ̂), l2 included, no damping
  // ‖∇R(θ̂)‖₂ on the training set (from the cached residuals): influence assumes θ̂ is the minimiser.
  double grad_norm() const { return grad_norm_; }

  // Explicit per-example gradients (k×p). For checks and small k; the scoring paths never form them.
  RowMatrix<S> gradients(const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const;
  // (H+λI)⁻¹ B for B (p×r).
  ColMatrix<S> solve(const ConstColMatrixRef<S>& B) const;
  // s_test vectors for m test points, (p×m).
  ColMatrix<S> s_test(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test) const;

  RowMatrix<S> up_params(const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const;
  // Training side given explicitly (X, y), or the whole training set when X has zero rows and zero cols.
  RowMatrix<S> up_loss(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                       const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const;
  RowMatrix<S> up_loss_train(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test) const;
  // (k×(m·d)) row-major = (k, m, d) C-order.
  RowMatrix<S> pert_loss(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                         const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const;
  Vector<S> self_influence(const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const;
  Vector<S> self_influence_train() const;
  // Streaming top-k over the whole training set: memory O(block·m + m·k), independent of n.
  TopK<S> top_k(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test, Index k) const;

  // Newton-step leave-one-out estimate of L(z_test, θ̂₋ᵢ) − L(z_test, θ̂) for the training points idx (k×m).
  // One exact Newton step from θ̂ on R₋ᵢ(θ) = (1/(n−1)) Σ_{j≠i} L_j + (l2/2)‖Pθ‖² (Hessian + λI), whose
  // Hessian differs from that of R_{mean over n−1} by the rank-K term H_i/(n−1): all points share one
  // Cholesky factor of A = (n/(n−1)) H_data + l2 P + λI and a K×K Woodbury system each.
  RowMatrix<S> loo_newton(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                          const ConstIndexVectorRef& idx) const;
  // Exact retraining without the training points idx (removed together): the minimiser of
  // R₋(θ) = (1/(n−g)) Σ_{j∉idx} L_j + (l2/2)‖Pθ‖², warm-started from θ̂, to ‖∇R₋‖₂ ≤ tol. Uses the chord
  // (simplified Newton) method with the fixed matrix ∇²R₋(θ̂) = (n·H_data − g·H_data(idx))/(n−g) + l2P,
  // built from the cached H at a cost of g·p² + p³/3 instead of n·p² per iteration; θ̂₋ is close to θ̂, so
  // it converges in a few steps. Falls back to full Newton (fit_newton) when the chord steps stall.
  [[nodiscard]] NewtonResult<S> refit_without(const ConstIndexVectorRef& idx, double tol, int max_iter) const;

  // The same for a group removed together (one factorisation for the group): (m).
  Vector<S> loo_newton_group(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                             const ConstIndexVectorRef& idx) const;

 private:
  struct Assembly;    // what the constructors compute: residuals, curvatures, H, its factor, ‖∇R(θ̂)‖ (engine.cpp)
  struct LooContext;  // loo_newton: what every removed point shares (A⁻¹, the test side)
  struct LooRows;     // loo_newton: the removed training rows' projections
  // Validates the inputs, assembles H and factorises H + λI; a numerical failure is Assembly::status.
  static Assembly assemble(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train, const ConstVectorRef<S>& y_train,
                           const ConstRowMatrixRef<S>& W, double damping);
  // The block constructor's assembly: validates, computes the block's residuals and factorises the given H + λI.
  static Assembly assemble_block(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_block,
                                 const ConstVectorRef<S>& y_block, const ConstRowMatrixRef<S>& W, double damping,
                                 const ConstColMatrixRef<S>& H, Index n_total, const ConstRowMatrixRef<S>& grad_sum);
  // assemble(), throwing NotPositiveDefiniteError or NonFiniteError for a numerical failure.
  static Assembly assemble_or_throw(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train,
                                    const ConstVectorRef<S>& y_train, const ConstRowMatrixRef<S>& W, double damping);
  // Throws NotPositiveDefiniteError or NonFiniteError for an assembly whose status is not Ok; returns it otherwise.
  static Assembly throw_if_failed(Assembly&& assembly);
  // Throws std::invalid_argument for a block engine: `what` needs every training row in this engine.
  void require_whole_set(const char* what) const;
  LinearInfluenceEngine(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train, const ConstVectorRef<S>& y_train,
                        const ConstRowMatrixRef<S>& W, double damping, Assembly&& assembly);

  // Rows [start, start+b) of the explicit gradients r_i ⊗ x̃_i from residuals R (rows aligned with X) into G (b×p).
  void gradient_rows(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R, Index start, Index b, RowMatrix<S>& G) const;
  // The diagonal of l2·P (p): the penalty's share of H.
  Vector<S> penalty_diagonal() const;
  // Throws std::invalid_argument for a training index outside [0, n).
  void check_train_indices(const ConstIndexVectorRef& idx) const;
  // loo_newton's steps: A⁻¹ for A = (n/(n−1)) H_data + l2 P + λI; the test side shared by every removal; the
  // removed rows' projections; one removal's Woodbury step into out.row(i) (false: the removal leaves a singular
  // Hessian).
  ColMatrix<S> loo_hessian_inverse(const Vector<S>& penalty) const;
  LooContext loo_context(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                         const Vector<S>& penalty) const;
  LooRows loo_rows(const LooContext& ctx, const ConstIndexVectorRef& idx) const;
  bool loo_step(const LooContext& ctx, const LooRows& rows, Index i, Index row, const ConstVectorRef<S>& y_test,
                RowMatrixRef<S> out) const;
  // Weights 1 for kept and 0 for removed training points; validates the indices.
  Vector<S> removal_weights(const ConstIndexVectorRef& idx) const;
  // ∇²R₋(θ̂) of the objective without the zero-weight points (mean over the kept ones), from the cached H.
  ColMatrix<S> leave_out_hessian(const Vector<S>& weights) const;
  Vector<S> self_influence_from(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R) const;
  void check_points(const char* what, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const;
  // Ŝ: the d_eff × (K·m) rearrangement of S (p×m): Ŝ(:, k·m + t) = S(k·d_eff : (k+1)·d_eff, t).
  ColMatrix<S> reshape_for_contraction(const ColMatrix<S>& Sm) const;
  // Scores block: out(i, t) = −Σ_k r_ik (X̃_i · Ŝ(:, k·m+t)) for rows [start, start+rows) of (X, R).
  void score_block(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R, const ColMatrix<S>& Shat, Index m, Index start,
                   Index rows, RowMatrix<S>& Z, RowMatrixRef<S> out) const;
  // Work of scoring k training points against m test points, in flops, to size the thread choice (SerialIfSmall):
  // the p×m solve (2p²m) and the scoring GEMM (2kpm), or — when larger — the time of reading the k×d_eff training
  // block counted as ~32 flops per element (~10 GB/s of memory against ~40 GFLOP/s per core): a single-test-point
  // query (m = 1) is a memory-bound matvec, which a second thread does speed up at large k.
  double scoring_flops(Index k, Index m) const {
    const double p = double(n_params()), d_eff = p / double(spec_.n_outputs);
    return std::max(2.0 * p * double(m) * (p + double(k)), 32.0 * double(k) * d_eff);
  }
  // All rows of (X, R) in blocks: the (k×m) up_loss matrix.
  RowMatrix<S> score_all(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R, const ColMatrix<S>& Shat, Index m) const;

  ModelSpec spec_;
  ConstRowMatrixRef<S> X_;
  Vector<S> y_;
  RowMatrix<S> W_;
  double damping_;
  RowMatrix<S> residual_, curvature_;  // n×K each, at θ̂
  ColMatrix<S> H_;
  CholeskyFactor<S> factor_;  // of H + λI (+ gauge), in its own storage
  double grad_norm_ = 0.0;
  RowMatrix<S> grad_sum_;  // Σ_i r_i ⊗ x̃_i over all n_total points (K×d_eff)
  Index n_total_ = 0;      // the n of the objective: X_.rows() unless a block engine
  bool block_ = false;     // constructed from a given H for a block of the training rows
};

}  // namespace pyinfluence
