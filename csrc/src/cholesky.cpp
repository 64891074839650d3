#include "pyinfluence/cholesky.hpp"
#include "pyinfluence/threads.hpp"

#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <iomanip>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyinfluence {

namespace {

// x rounded up to two significant digits (a printable suggestion that still satisfies the bound).
double round_up_2_digits(double x) {
  if (!(x > 0.0) || !std::isfinite(x)) return x;
  const double e = std::floor(std::log10(x)) - 1.0;  // x = digits · 10^e with 10 ≤ digits < 100
  const double digits = std::ceil(x / std::pow(10.0, e));
  // Dividing by an exact power of ten rounds correctly: 15 / 1e9 is the double nearest 1.5e-8.
  return e >= 0.0 ? digits * std::pow(10.0, e) : digits / std::pow(10.0, -e);
}

std::string shortest(double x) {
  std::ostringstream out;
  out << std::setprecision(3) << x;
  return out.str();
}

}  // namespace

template <class S>
Status CholeskyFactor<S>::compute(ColMatrix<S> A, double shift) {
  if (A.rows() != A.cols())
    throw std::invalid_argument("the matrix to factorise must be square, got " + std::to_string(A.rows()) + " x " +
                                std::to_string(A.cols()));
  if (!(shift >= 0.0) || !std::isfinite(shift)) throw std::invalid_argument("damping must be a finite number >= 0");
  L_ = std::move(A);
  const Index p = L_.rows();
  failure_ = FactorFailure{};
  failure_.size = p;
  if (p == 0) return status_ = Status::Ok;
  if (shift != 0.0) L_.diagonal().array() += S(shift);
  for (Index j = 0; j < p; ++j)  // the lower triangle only: the upper one is never read
    if (!L_.col(j).tail(p - j).allFinite()) {
      failure_.status = Status::NonFinite;
      failure_.pivot = j;
      return status_ = Status::NonFinite;
    }
  const Vector<S> diagonal = L_.diagonal();  // M_jj = A_jj + shift, for the value of a failing pivot
  const double max_diag = double(diagonal.cwiseAbs().maxCoeff());
  const SerialIfSmall serial(double(p) * double(p) * double(p) / 3.0);
  // Eigen's blocked in-place kernel (LAPACK potrf when the build routes Eigen to a BLAS/LAPACK) returns the
  // first failing column, or −1. It works on L_'s storage: no copy of the p×p matrix.
  const Index failed = Eigen::internal::llt_inplace<S, Eigen::Lower>::blocked(L_);
  if (failed >= 0) {
    // Every Cholesky variant has computed row `failed` of L left of the diagonal before it meets that pivot:
    // d_j = M_jj − Σ_{k<j} L_jk².
    const double value = double(diagonal[failed]) - double(L_.row(failed).head(failed).squaredNorm());
    return fail(failed, value, max_diag, shift);
  }
  Index j_min = 0;
  const S min_pivot = L_.diagonal().minCoeff(&j_min);
  const double threshold = double(p) * double(std::numeric_limits<S>::epsilon()) * max_diag;
  if (!(double(min_pivot) * double(min_pivot) > threshold))
    return fail(j_min, double(min_pivot) * double(min_pivot), max_diag, shift);
  return status_ = Status::Ok;
}

template <class S>
Status CholeskyFactor<S>::fail(Index j, double pivot_value, double max_diag, double shift) {
  const double p = double(L_.rows()), eps = double(std::numeric_limits<S>::epsilon());
  failure_.status = Status::NotPositiveDefinite;
  failure_.pivot = j;
  failure_.pivot_value = pivot_value;
  failure_.threshold = p * eps * max_diag;
  // Adding δ to the diagonal raises d_j by at least δ (the Schur complement of a larger shift) and the threshold
  // by p·ε·δ: δ > (threshold − d_j)/(1 − p·ε) passes this pivot. Twice that, and at least √ε·max|M_ii|.
  if (std::isfinite(pivot_value) && max_diag > 0.0) {
    const double deficit = std::max(0.0, failure_.threshold - pivot_value) / std::max(0.5, 1.0 - p * eps);
    const double suggestion = round_up_2_digits(shift + std::max(2.0 * deficit, std::sqrt(eps) * max_diag));
    if (suggestion > shift && std::isfinite(suggestion)) failure_.suggested_damping = suggestion;
  }
  return status_ = Status::NotPositiveDefinite;
}

template <class S>
std::string CholeskyFactor<S>::failure_message(const std::string& what) const {
  const std::string p = std::to_string(L_.rows());
  const std::string shape = what + " (" + p + " x " + p + ")";
  if (status_ == Status::NonFinite) return shape + " contains NaN or inf";
  std::string msg = shape + " is not positive definite (Cholesky failed at pivot " + std::to_string(failure_.pivot);
  const double value = failure_.pivot_value;
  if (std::isnan(value)) return msg + ")";
  if (value > 0.0)
    return msg + ", whose value " + shortest(value) + " is below the numerical-singularity threshold " +
           shortest(failure_.threshold) + ")";
  return msg + ", whose value is " + shortest(value) + ")";
}

template <class S>
NotPositiveDefiniteError CholeskyFactor<S>::not_positive_definite(const std::string& what,
                                                                  const std::string& advice) const {
  return NotPositiveDefiniteError(failure_message(what) + advice, failure_);
}

template <class S>
void CholeskyFactor<S>::require_ok() const {
  if (status_ == Status::NotPositiveDefinite) throw not_positive_definite("the matrix");
  if (status_ != Status::Ok) throw std::domain_error(failure_message("the matrix"));
}

template <class S>
void CholeskyFactor<S>::solve_in_place(ColMatrixRef<S> B) const {
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
ColMatrix<S> CholeskyFactor<S>::solve(const ConstColMatrixRef<S>& B) const {
  ColMatrix<S> X = B;
  solve_in_place(X);
  return X;
}

template <class S>
void CholeskyFactor<S>::whiten_rows_in_place(RowMatrixRef<S> G) const {
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
