// Status codes for numerical outcomes. Misuse (bad shapes, bad arguments) throws std::invalid_argument;
// numerical failure (a matrix that is not positive definite, a trainer that did not converge) is a
// Status value, never an exception thrown from deep inside a loop.
#pragma once

namespace pyinfluence {

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
