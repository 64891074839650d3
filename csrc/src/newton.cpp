#include "pyinfluence/newton.hpp"

#include <cmath>
#include <limits>
#include "pyinfluence/cholesky.hpp"

namespace pyinfluence {

template <class S>
NewtonResult<S> fit_newton(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                           const ConstRowMatrixRef<S>& W0, const ConstVectorRef<S>& weights, double tol, int max_iter) {
  check_problem<S>(spec, X, y, W0, weights);
  NewtonResult<S> res;
  res.W = W0;
  const Index K = W0.rows(), de = W0.cols(), p = K * de;
  // The trainer minimises R plus the intercept gauge (zero at its optimum Σ_k b_k = 0), see families.hpp.
  const auto gauged_objective = [&](const RowMatrix<S>& W) {
    ObjectiveValue<S> v = objective<S>(spec, X, y, W, weights, true);
    add_intercept_gauge<S>(spec, W, v);
    return v;
  };
  ObjectiveValue<S> cur = gauged_objective(res.W);
  CholeskyFactor<S> factor;
  const double eps = double(std::numeric_limits<S>::epsilon());
  for (res.iterations = 0; res.iterations < max_iter; ++res.iterations) {
    const double gnorm = double(cur.grad.norm());
    if (!std::isfinite(cur.value) || !std::isfinite(gnorm)) {
      res.status = Status::NonFinite;
      break;
    }
    if (gnorm <= tol) break;
    ColMatrix<S> H = hessian<S>(spec, X, y, res.W, weights);
    add_intercept_gauge<S>(spec, X.cols(), H);
    if (const Status factored = factor.compute(std::move(H)); factored != Status::Ok) {
      res.status = factored;  // NotPositiveDefinite, or NonFinite for a Hessian with NaN or inf
      res.failure = factor.failure();
      break;
    }
    const Vector<S> g = Eigen::Map<const Vector<S>>(cur.grad.data(), p);
    const Vector<S> step = factor.solve(g);        // Newton direction is −step
    const double decrement = double(g.dot(step));  // gᵀ H⁻¹ g ≥ 0
    double alpha = 1.0;
    bool accepted = false;
    ObjectiveValue<S> trial;
    RowMatrix<S> Wt;
    for (int ls = 0; ls < 60; ++ls) {
      Wt = res.W - S(alpha) * Eigen::Map<const RowMatrix<S>>(step.data(), K, de);
      trial = gauged_objective(Wt);
      const bool armijo = trial.value <= cur.value - 1e-4 * alpha * decrement;
      // Near the optimum the decrease of R is below rounding; accept steps that do not raise R beyond
      // rounding and reduce the gradient.
      const bool rounding_ok =
          trial.value <= cur.value + 16 * eps * std::abs(cur.value) && double(trial.grad.norm()) < gnorm;
      if (std::isfinite(trial.value) && (armijo || rounding_ok)) {
        accepted = true;
        break;
      }
      alpha *= 0.5;
    }
    if (!accepted) {
      res.status = Status::NotConverged;  // no acceptable step: precision limit reached
      break;
    }
    res.W = Wt;
    cur = std::move(trial);
  }
  // Report ‖∇R‖ and R themselves (without the gauge).
  const ObjectiveValue<S> plain = objective<S>(spec, X, y, res.W, weights, true);
  res.grad_norm = double(plain.grad.norm());
  res.objective = plain.value;
  if (res.status == Status::Ok && !(double(cur.grad.norm()) <= tol)) res.status = Status::NotConverged;
  return res;
}

template NewtonResult<float> fit_newton<float>(const ModelSpec&, const ConstRowMatrixRef<float>&,
                                               const ConstVectorRef<float>&, const ConstRowMatrixRef<float>&,
                                               const ConstVectorRef<float>&, double, int);
template NewtonResult<double> fit_newton<double>(const ModelSpec&, const ConstRowMatrixRef<double>&,
                                                 const ConstVectorRef<double>&, const ConstRowMatrixRef<double>&,
                                                 const ConstVectorRef<double>&, double, int);

}  // namespace pyinfluence
