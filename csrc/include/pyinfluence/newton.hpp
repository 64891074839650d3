// Newton's method with a backtracking (Armijo) line search for the convex objective R of objective.hpp.
// Each step solves (∇²R) Δ = −∇R by Cholesky; the method stops when ‖∇R‖₂ ≤ tol. Near the optimum the
// decrease of R drops below rounding, so a full step is also accepted when it lowers ‖∇R‖.
#pragma once

#include "pyinfluence/objective.hpp"
#include "pyinfluence/status.hpp"

namespace pyinfluence {

template <class S>
struct NewtonResult {
  RowMatrix<S> W;          // K×d_eff
  int iterations = 0;
  double grad_norm = 0.0;  // ‖∇R(W)‖₂ at return
  double objective = 0.0;
  Status status = Status::Ok;
};

template <class S>
NewtonResult<S> fit_newton(const ModelSpec& spec, const Eigen::Ref<const RowMatrix<S>>& X,
                           const Eigen::Ref<const Vector<S>>& y, const Eigen::Ref<const RowMatrix<S>>& W0,
                           const Eigen::Ref<const Vector<S>>& weights, double tol, int max_iter);

}  // namespace pyinfluence
