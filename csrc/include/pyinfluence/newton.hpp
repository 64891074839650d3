// Newton's method with a backtracking (Armijo) line search for the convex objective R of objective.hpp.
// Each step solves (∇²R) Δ = −∇R by Cholesky; the method stops when ‖∇R‖₂ ≤ tol. Near the optimum the
// decrease of R drops below rounding, so a full step is also accepted when it lowers ‖∇R‖.
#pragma once

#include "pyinfluence/objective.hpp"
#include "pyinfluence/status.hpp"

namespace pyinfluence {

template <class S>
struct NewtonResult {
  RowMatrix<S> W;  // K×d_eff
  int iterations = 0;
  double grad_norm = 0.0;  // ‖∇R(W)‖₂ at return
  double objective = 0.0;
  Status status = Status::Ok;
  FactorFailure failure;  // the Hessian factorisation's diagnosis when status is NotPositiveDefinite
};

// Status in the result: Ok, NotConverged (iteration limit, or no acceptable step at the precision limit),
// NotPositiveDefinite (a Hessian along the way; result.failure says where) or NonFinite. Misuse throws
// std::invalid_argument.
template <class S>
[[nodiscard]] NewtonResult<S> fit_newton(const ModelSpec& spec, const ConstRowMatrixRef<S>& X,
                                         const ConstVectorRef<S>& y, const ConstRowMatrixRef<S>& W0,
                                         const ConstVectorRef<S>& weights, double tol, int max_iter);

}  // namespace pyinfluence
