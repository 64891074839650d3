// Status codes for numerical outcomes. Misuse (bad shapes, bad arguments) throws std::invalid_argument;
// numerical failure (a matrix that is not positive definite, a trainer that did not converge) is a
// Status value, never an exception thrown from deep inside a loop. A query of the influence engine whose
// result would not be finite throws NonFiniteError (below) once, after its loops: no NaN or inf is ever
// returned or ranked.
#pragma once

#include <stdexcept>
#include <string>

namespace pyinfluence {

// A result (Hessian, test gradients, s_test, scores) overflowed to inf or became NaN from finite inputs:
// the features' magnitude exceeds what the scalar type can hold through the computation.
struct NonFiniteError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Status {
  Ok = 0,
  NotPositiveDefinite = 1,  // Cholesky of H + λI failed: H is singular or indefinite
  NotConverged = 2,         // an iterative method hit its iteration limit
  NonFinite = 3,            // NaN or inf appeared in an intermediate result
};

inline const char* status_message(Status s) {
  switch (s) {
    case Status::Ok: return "ok";
    case Status::NotPositiveDefinite: return "matrix is not positive definite";
    case Status::NotConverged: return "did not converge";
    case Status::NonFinite: return "non-finite value encountered";
  }
  return "unknown status";
}

}  // namespace pyinfluence
