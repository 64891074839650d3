// Cholesky factorisation L Lᵀ = A + shift·I of a symmetric matrix, computed in place of the caller's matrix
// (no extra p×p copy), with a numerical-singularity check. Used for every solve with H + λI in the core and
// exposed to Python for the torch path's Exact solver.
#pragma once

#include <string>

#include "pyinfluence/status.hpp"
#include "pyinfluence/types.hpp"

namespace pyinfluence {

template <class S>
class CholeskyFactor {
 public:
  CholeskyFactor() = default;
  // Factorises A + shift·I (A symmetric; only its lower triangle is read). A is taken by value: pass it with
  // std::move to factorise in its storage. Returns status(): NotPositiveDefinite when a pivot is not positive,
  // or when the smallest pivot satisfies L_jj² ≤ p·ε·max_j |A_jj + shift| — Cholesky "succeeds" on a singular
  // matrix when rounding leaves a tiny positive pivot (e.g. duplicated features with l2 = 0), and solves with
  // such a factor are meaningless. NaN or inf in A gives NonFinite. failure() then says where and why. Throws
  // std::invalid_argument if A is not square or shift is negative or not finite.
  [[nodiscard]] Status compute(ColMatrix<S> A, double shift = 0.0);

  [[nodiscard]] Status status() const { return status_; }
  [[nodiscard]] bool ok() const { return status_ == Status::Ok; }
  // Index of the failing (or numerically zero) pivot when status() is not Ok, else −1.
  [[nodiscard]] Index failed_pivot() const { return failure_.pivot; }
  // The diagnosis of the last compute(): status, pivot, size, pivot value, threshold and suggested damping.
  [[nodiscard]] const FactorFailure& failure() const { return failure_; }
  [[nodiscard]] Index size() const { return L_.rows(); }
  // The factor: lower triangle of the stored matrix (the strict upper triangle holds leftovers of A).
  [[nodiscard]] const ColMatrix<S>& packed() const { return L_; }

  // X = (A + shift·I)⁻¹ B. B (p×r). Throw NotPositiveDefiniteError (a std::domain_error) when the factorisation
  // failed and std::invalid_argument on a row-count mismatch.
  [[nodiscard]] ColMatrix<S> solve(const ConstColMatrixRef<S>& B) const;
  void solve_in_place(ColMatrixRef<S> B) const;
  // G ← G L⁻ᵀ for a row-major block G (r×p): row i becomes (L⁻¹ gᵢ)ᵀ, so ‖row i‖² = gᵢᵀ(A + shift·I)⁻¹gᵢ.
  void whiten_rows_in_place(RowMatrixRef<S> G) const;
  // The error message for a failed factorisation, naming the pivot: "<what> (p x p) is not positive definite …".
  [[nodiscard]] std::string failure_message(const std::string& what) const;
  // NotPositiveDefiniteError with failure_message(what) + advice and failure() (for status() NotPositiveDefinite).
  [[nodiscard]] NotPositiveDefiniteError not_positive_definite(const std::string& what,
                                                               const std::string& advice = "") const;

 private:
  void require_ok() const;
  // Records a failed pivot j with its value d_j in failure_ (with the threshold and a suggested damping).
  Status fail(Index j, double pivot_value, double max_diag, double shift);
  ColMatrix<S> L_;
  Status status_ = Status::NotPositiveDefinite;
  FactorFailure failure_;
};

extern template class CholeskyFactor<float>;
extern template class CholeskyFactor<double>;

}  // namespace pyinfluence
