// Status codes and exceptions for numerical outcomes. Misuse (bad shapes, bad arguments) throws
// std::invalid_argument; numerical failure (a matrix that is not positive definite, a trainer that did not
// converge) is a Status value, never an exception thrown from deep inside a loop. Where an object cannot exist
// without a successful factorisation (LinearInfluenceEngine), its constructor throws NotPositiveDefiniteError
// or NonFiniteError (below) and a static factory returns the Status instead. A query of the influence engine
// whose result would not be finite throws NonFiniteError once, after its loops: no NaN or inf is ever returned
// or ranked. The exceptions carry the diagnosis as fields, so that callers (and the Python binding) never parse
// messages.
#pragma once

#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "pyinfluence/types.hpp"

namespace pyinfluence {

enum class [[nodiscard]] Status {
  Ok = 0,
  NotPositiveDefinite = 1,  // Cholesky of H + λI failed: H is singular or indefinite
  NotConverged = 2,         // an iterative method hit its iteration limit
  NonFinite = 3,            // NaN or inf appeared in an intermediate result
};

[[nodiscard]] inline const char* status_message(Status s) {
  switch (s) {
    case Status::Ok: return "ok";
    case Status::NotPositiveDefinite: return "matrix is not positive definite";
    case Status::NotConverged: return "did not converge";
    case Status::NonFinite: return "non-finite value encountered";
  }
  return "unknown status";
}

// Why a Cholesky factorisation of M = A + shift·I failed (CholeskyFactor::failure()). Pivot j is the diagonal
// entry of the Schur complement the factorisation meets at step j: d_j = M_jj − Σ_{k<j} L_jk², and L_jj = √d_j.
struct FactorFailure {
  static constexpr double unknown = std::numeric_limits<double>::quiet_NaN();
  Status status = Status::Ok;
  Index pivot = -1;  // 0-based index of the failing pivot (the first non-finite column for NonFinite); −1: none
  Index size = 0;    // order p of the matrix
  // d_j of the failing pivot: ≤ 0 (or NaN) when M is indefinite, or so small against the diagonal that the
  // factor is numerically singular (d_j ≤ p·ε·max_i |M_ii|). NaN when unknown.
  double pivot_value = unknown;
  // The pivot test's threshold p·ε·max_i |M_ii| (NaN when unknown).
  double threshold = unknown;
  // A damping (total shift, ≥ the current one) that makes this pivot pass the test, with a margin and at least
  // √ε·max_i |M_ii| (the result then keeps about half the digits of the scalar type): adding δ to the diagonal
  // raises every Schur-complement pivot by at least δ. Later pivots may still fail; NaN when unknown.
  double suggested_damping = unknown;
};

// A matrix that must be positive definite is not (numerically). std::domain_error: code that catches that keeps
// working. `failure` holds the diagnosis (pivot, size, pivot value, suggested damping) where a Cholesky
// factorisation found it; `train_index` the training point whose removal caused it (leave-one-out), else −1.
class NotPositiveDefiniteError : public std::domain_error {
 public:
  explicit NotPositiveDefiniteError(const std::string& message, FactorFailure failure = {}, Index train_index = -1)
      : std::domain_error(message), failure_(failure), train_index_(train_index) {}
  [[nodiscard]] const FactorFailure& failure() const noexcept { return failure_; }
  [[nodiscard]] Index train_index() const noexcept { return train_index_; }

 private:
  FactorFailure failure_;
  Index train_index_;
};

// A result (Hessian, test gradients, s_test, scores) overflowed to inf or became NaN from finite inputs: the
// features' magnitude exceeds what the scalar type can hold through the computation. `quantity()` names what
// overflowed (e.g. "the influence scores up_loss"); the message adds why.
class NonFiniteError : public std::runtime_error {
 public:
  explicit NonFiniteError(std::string quantity, const std::string& reason =
                                                    "the inputs are finite, but too large in magnitude for this "
                                                    "floating-point type")
      : std::runtime_error(quantity + " overflowed to inf or NaN (" + reason + ")"), quantity_(std::move(quantity)) {}
  [[nodiscard]] const std::string& quantity() const noexcept { return quantity_; }

 private:
  std::string quantity_;
};

}  // namespace pyinfluence
