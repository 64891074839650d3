#include "pyinfluence/cholesky.hpp"
#include "pyinfluence/threads.hpp"

#include <Eigen/Cholesky>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyinfluence {

template <class S>
Status CholeskyFactor<S>::compute(ColMatrix<S> A, double shift) {
  if (A.rows() != A.cols())
    throw std::invalid_argument("the matrix to factorise must be square, got " + std::to_string(A.rows()) + " x " +
                                std::to_string(A.cols()));
  if (!(shift >= 0.0) || !std::isfinite(shift)) throw std::invalid_argument("damping must be a finite number >= 0");
  L_ = std::move(A);
  failed_pivot_ = -1;
  const Index p = L_.rows();
  if (p == 0) return status_ = Status::Ok;
  if (shift != 0.0) L_.diagonal().array() += S(shift);
  for (Index j = 0; j < p; ++j)  // the lower triangle only: the upper one is never read
    if (!L_.col(j).tail(p - j).allFinite()) {
      failed_pivot_ = j;
      return status_ = Status::NonFinite;
    }
  const S max_diag = L_.diagonal().cwiseAbs().maxCoeff();
  const SerialIfSmall serial(double(p) * double(p) * double(p) / 3.0);
  // Eigen's blocked in-place kernel (LAPACK potrf when the build routes Eigen to a BLAS/LAPACK) returns the
  // first failing column, or −1. It works on L_'s storage: no copy of the p×p matrix.
  const Index failed = Eigen::internal::llt_inplace<S, Eigen::Lower>::blocked(L_);
  if (failed >= 0) {
    failed_pivot_ = failed;
    return status_ = Status::NotPositiveDefinite;
  }
  Index j_min = 0;
  const S min_pivot = L_.diagonal().minCoeff(&j_min);
  const S threshold = S(p) * std::numeric_limits<S>::epsilon() * max_diag;
  if (!(min_pivot * min_pivot > threshold)) {
    failed_pivot_ = j_min;
    return status_ = Status::NotPositiveDefinite;
  }
  return status_ = Status::Ok;
}

template <class S>
std::string CholeskyFactor<S>::failure_message(const std::string& what) const {
  const std::string p = std::to_string(L_.rows());
  if (status_ == Status::NonFinite) return what + " (" + p + " x " + p + ") contains NaN or inf";
  return what + " (" + p + " x " + p + ") is not positive definite (Cholesky failed at pivot " +
         std::to_string(failed_pivot_) + ")";
}

template <class S>
void CholeskyFactor<S>::require_ok() const {
  if (status_ != Status::Ok) throw std::domain_error(failure_message("the matrix"));
}

template <class S>
void CholeskyFactor<S>::solve_in_place(Eigen::Ref<ColMatrix<S>> B) const {
  require_ok();
  if (B.rows() != L_.rows())
    throw std::invalid_argument("the right-hand side must have " + std::to_string(L_.rows()) + " rows, got " +
                                std::to_string(B.rows()));
  const SerialIfSmall serial(2.0 * double(L_.rows()) * double(L_.rows()) * double(B.cols()));
  const auto L = L_.template triangularView<Eigen::Lower>();
  L.solveInPlace(B);            // L y = b
  L.adjoint().solveInPlace(B);  // Lᵀ x = y
}

template <class S>
ColMatrix<S> CholeskyFactor<S>::solve(const Eigen::Ref<const ColMatrix<S>>& B) const {
  ColMatrix<S> X = B;
  solve_in_place(X);
  return X;
}

template <class S>
void CholeskyFactor<S>::whiten_rows_in_place(Eigen::Ref<RowMatrix<S>> G) const {
  require_ok();
  if (G.cols() != L_.rows())
    throw std::invalid_argument("the rows must have " + std::to_string(L_.rows()) + " entries, got " +
                                std::to_string(G.cols()));
  // G L⁻ᵀ: a right-sided triangular solve with Lᵀ (upper), on the row-major block itself.
  L_.template triangularView<Eigen::Lower>().adjoint().template solveInPlace<Eigen::OnTheRight>(G);
}

template class CholeskyFactor<float>;
template class CholeskyFactor<double>;

}  // namespace pyinfluence
