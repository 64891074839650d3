#include "pyinfluence/engine.hpp"

#include "pyinfluence/threads.hpp"

#include <Eigen/Cholesky>
#include <Eigen/LU>
#include <algorithm>
#include <atomic>
#include <iomanip>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyinfluence {

namespace {
template <class S>
const ConstVectorRef<S> no_weights() {
  static const Vector<S> empty;
  return empty;
}

[[noreturn]] void throw_non_finite(const char* what) { throw NonFiniteError(what); }

// What the engine's errors about a Hessian that is not positive definite advise (damping cures them all).
constexpr const char* kDampingAdvice =
    ". Influence needs H + damping*I to be positive definite: pass damping > 0 (e.g. damping=1e-3; results then "
    "approximate the undamped influence) or increase l2.";

std::string format_number(double x) {
  std::ostringstream out;
  out << std::setprecision(3) << x;
  return out.str();
}

// Every query's result passes through here: a single vectorised pass, small beside the products that made it
// (the large k×m score matrices are checked block by block instead, while in cache: score_all, top_k).
template <class M>
M require_finite(M&& out, const char* what) {
  if (!out.allFinite()) throw_non_finite(what);
  return std::forward<M>(out);
}
}  // namespace

template <class S>
struct LinearInfluenceEngine<S>::Assembly {
  RowMatrix<S> residual, curvature;  // n×K each, at θ̂
  ColMatrix<S> H;                    // ∇²R(θ̂)
  CholeskyFactor<S> factor;          // of H + λI (+ gauge)
  double grad_norm = 0.0;
  RowMatrix<S> grad_sum;  // Σ_i r_i ⊗ x̃_i over all n_total points (K×d_eff)
  Index n_total = 0;
  bool block = false;
  Status status = Status::Ok;  // NonFinite: H or the residuals overflowed (then factor is not computed)
};

template <class S>
typename LinearInfluenceEngine<S>::Assembly LinearInfluenceEngine<S>::assemble(const ModelSpec& spec,
                                                                               const ConstRowMatrixRef<S>& X,
                                                                               const ConstVectorRef<S>& y,
                                                                               const ConstRowMatrixRef<S>& W,
                                                                               double damping) {
  check_problem<S>(spec, X, y, W, no_weights<S>());
  if (!(damping >= 0.0) || !std::isfinite(damping)) throw std::invalid_argument("damping must be a finite number >= 0");
  const Index n = X.rows(), K = spec.n_outputs;
  const double p = double(K * spec.d_eff(X.cols()));
  const SerialIfSmall serial(double(n) * p * p + p * p * p / 3.0);  // assembly + factorisation
  Assembly out;
  RowMatrix<S> scores;
  compute_scores<S>(spec, X, W, scores);
  out.residual.resize(n, K);
  out.curvature.resize(n, K);
  per_example_from_scores<S>(spec, scores, y, nullptr, out.residual.data(), out.curvature.data());
  {  // ∇R(θ̂) = Rᵀ X̃ / n + l2 P θ̂ from the residuals (one pass over X)
    const Index d = X.cols(), de = spec.d_eff(d);
    RowMatrix<S> grad(K, de);
    grad.leftCols(d).noalias() = out.residual.transpose() * X;
    if (spec.fit_intercept) grad.col(d) = out.residual.colwise().sum().transpose();
    out.grad_sum = grad;
    out.n_total = n;
    grad /= S(n);
    for (Index j = 0; j < de; ++j)
      if (spec.penalized(j, d)) grad.col(j) += S(spec.l2) * W.col(j);
    out.grad_norm = double(grad.norm());
  }
  out.H = pyinfluence::hessian<S>(spec, X, y, W, no_weights<S>());
  if (!out.H.allFinite() || !out.residual.allFinite() || !std::isfinite(out.grad_norm)) {
    out.status = Status::NonFinite;  // an overflow, not an indefinite H: damping would not help
    return out;
  }
  ColMatrix<S> A = out.H;
  // Undamped, the multinomial intercept gauge makes H invertible (pseudo-inverse answers, families.hpp);
  // damped, H + λI is already positive definite along that direction and we solve it as it is.
  if (damping == 0.0) add_intercept_gauge<S>(spec, X.cols(), A);
  out.status = out.factor.compute(std::move(A), damping);
  return out;
}

template <class S>
typename LinearInfluenceEngine<S>::Assembly LinearInfluenceEngine<S>::assemble_or_throw(const ModelSpec& spec,
                                                                                        const ConstRowMatrixRef<S>& X,
                                                                                        const ConstVectorRef<S>& y,
                                                                                        const ConstRowMatrixRef<S>& W,
                                                                                        double damping) {
  return throw_if_failed(assemble(spec, X, y, W, damping));
}

template <class S>
typename LinearInfluenceEngine<S>::Assembly LinearInfluenceEngine<S>::throw_if_failed(Assembly&& out) {
  if (out.status == Status::NonFinite) {
    if (out.block)
      throw NonFiniteError("the given training Hessian H (or gradient sum, or the block's residuals)",
                           "the training values are too large in magnitude for this floating-point type");
    throw NonFiniteError("the training Hessian H (or the training residuals)",
                         "X_train's values are too large in magnitude for this floating-point type");
  }
  if (out.status != Status::Ok) {
    const FactorFailure& f = out.factor.failure();
    std::string advice = kDampingAdvice;
    if (std::isfinite(f.suggested_damping))
      advice.insert(advice.size() - 1,
                    "; a damping of " + format_number(f.suggested_damping) + " makes the failing pivot positive");
    throw out.factor.not_positive_definite("the Hessian H + damping*I", advice);
  }
  return std::move(out);
}

template <class S>
typename LinearInfluenceEngine<S>::Assembly LinearInfluenceEngine<S>::assemble_block(
    const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y, const ConstRowMatrixRef<S>& W,
    double damping, const ConstColMatrixRef<S>& H, Index n_total, const ConstRowMatrixRef<S>& grad_sum) {
  spec.validate();
  const Index b = X.rows(), d = X.cols(), K = spec.n_outputs, de = spec.d_eff(d), p = K * de;
  if (b > 0) {
    check_problem<S>(spec, X, y, W, no_weights<S>());
  } else {  // a block without rows: check what check_problem would, except the row count
    if (d == 0) throw std::invalid_argument("X must have at least one column");
    if (y.size() != 0) throw std::invalid_argument("y has " + std::to_string(y.size()) + " entries but X has 0 rows");
    if (W.rows() != K || W.cols() != de)
      throw std::invalid_argument("theta must have shape (" + std::to_string(K) + ", " + std::to_string(de) +
                                  ") for this model and X");
    if (!W.allFinite()) throw std::invalid_argument("theta contains NaN or inf");
  }
  if (!(damping >= 0.0) || !std::isfinite(damping)) throw std::invalid_argument("damping must be a finite number >= 0");
  if (n_total < std::max<Index>(b, 1))
    throw std::invalid_argument("n_total (" + std::to_string(n_total) +
                                ") must be at least 1 and at least the block's number of rows (" + std::to_string(b) +
                                ")");
  if (H.rows() != p || H.cols() != p)
    throw std::invalid_argument("H must have shape (" + std::to_string(p) + ", " + std::to_string(p) + "); got (" +
                                std::to_string(H.rows()) + ", " + std::to_string(H.cols()) + ")");
  if (grad_sum.rows() != K || grad_sum.cols() != de)
    throw std::invalid_argument("grad_sum must have shape (" + std::to_string(K) + ", " + std::to_string(de) +
                                "); got (" + std::to_string(grad_sum.rows()) + ", " + std::to_string(grad_sum.cols()) +
                                ")");
  const SerialIfSmall serial(double(b) * double(p) + double(p) * double(p) * double(p) / 3.0);
  Assembly out;
  out.block = true;
  out.n_total = n_total;
  out.residual.resize(b, K);
  out.curvature.resize(b, K);
  if (b > 0) {
    RowMatrix<S> scores;
    compute_scores<S>(spec, X, W, scores);
    per_example_from_scores<S>(spec, scores, y, nullptr, out.residual.data(), out.curvature.data());
  }
  out.grad_sum = grad_sum;
  {  // ∇R(θ̂) = Σ_i r_i ⊗ x̃_i / n + l2 P θ̂ over the whole set
    RowMatrix<S> grad = grad_sum / S(n_total);
    for (Index j = 0; j < de; ++j)
      if (spec.penalized(j, d)) grad.col(j) += S(spec.l2) * W.col(j);
    out.grad_norm = double(grad.norm());
  }
  out.H = H;
  if (!out.H.allFinite() || !out.residual.allFinite() || !std::isfinite(out.grad_norm)) {
    out.status = Status::NonFinite;
    return out;
  }
  ColMatrix<S> A = out.H;
  if (damping == 0.0) add_intercept_gauge<S>(spec, d, A);  // as assemble()
  out.status = out.factor.compute(std::move(A), damping);
  return out;
}

template <class S>
LinearInfluenceEngine<S>::LinearInfluenceEngine(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train,
                                                const ConstVectorRef<S>& y_train, const ConstRowMatrixRef<S>& W,
                                                double damping, Assembly&& assembly)
    : spec_(spec),
      X_(X_train),
      y_(y_train),
      W_(W),
      damping_(damping),
      residual_(std::move(assembly.residual)),
      curvature_(std::move(assembly.curvature)),
      H_(std::move(assembly.H)),
      factor_(std::move(assembly.factor)),
      grad_norm_(assembly.grad_norm),
      grad_sum_(std::move(assembly.grad_sum)),
      n_total_(assembly.n_total),
      block_(assembly.block) {}

template <class S>
LinearInfluenceEngine<S>::LinearInfluenceEngine(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train,
                                                const ConstVectorRef<S>& y_train, const ConstRowMatrixRef<S>& W,
                                                double damping)
    : LinearInfluenceEngine(spec, X_train, y_train, W, damping, assemble_or_throw(spec, X_train, y_train, W, damping)) {
}

template <class S>
LinearInfluenceEngine<S>::LinearInfluenceEngine(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_block,
                                                const ConstVectorRef<S>& y_block, const ConstRowMatrixRef<S>& W,
                                                double damping, const ConstColMatrixRef<S>& H, Index n_total,
                                                const ConstRowMatrixRef<S>& grad_sum)
    : LinearInfluenceEngine(spec, X_block, y_block, W, damping,
                            throw_if_failed(assemble_block(spec, X_block, y_block, W, damping, H, n_total, grad_sum))) {
}

template <class S>
void LinearInfluenceEngine<S>::require_whole_set(const char* what) const {
  if (block_)
    throw std::invalid_argument(std::string(what) +
                                " needs every training row in one engine; this engine holds a block of " +
                                std::to_string(X_.rows()) + " of the " + std::to_string(n_total_) + " rows");
}

template <class S>
EngineOrStatus<S> LinearInfluenceEngine<S>::create(const ModelSpec& spec, const ConstRowMatrixRef<S>& X_train,
                                                   const ConstVectorRef<S>& y_train, const ConstRowMatrixRef<S>& W,
                                                   double damping) {
  Assembly assembly = assemble(spec, X_train, y_train, W, damping);
  EngineOrStatus<S> out;
  out.status = assembly.status;
  if (assembly.status != Status::Ok) {
    out.failure = assembly.factor.failure();
    out.failure.status = assembly.status;
    return out;
  }
  out.engine.reset(new LinearInfluenceEngine(spec, X_train, y_train, W, damping, std::move(assembly)));
  return out;
}

template <class S>
void LinearInfluenceEngine<S>::check_points(const char* what, const ConstRowMatrixRef<S>& X,
                                            const ConstVectorRef<S>& y) const {
  const std::string name(what);
  if (X.cols() != X_.cols())
    throw std::invalid_argument("X" + name + " has " + std::to_string(X.cols()) +
                                " features but the model was trained on " + std::to_string(X_.cols()));
  if (y.size() != X.rows())
    throw std::invalid_argument("y" + name + " has " + std::to_string(y.size()) + " entries but X" + name + " has " +
                                std::to_string(X.rows()) + " rows");
  if (!X.allFinite()) throw std::invalid_argument("X" + name + " contains NaN or inf");
}

template <class S>
void LinearInfluenceEngine<S>::gradient_rows(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R, Index start, Index b,
                                             RowMatrix<S>& G) const {
  const Index d = X.cols(), K = spec_.n_outputs, de = spec_.d_eff(d);
  G.resize(b, K * de);
  for (Index i = 0; i < b; ++i)
    for (Index a = 0; a < K; ++a) {
      const S r = R(start + i, a);
      G.row(i).segment(a * de, d) = r * X.row(start + i);
      if (spec_.fit_intercept) G(i, a * de + d) = r;
    }
}

template <class S>
RowMatrix<S> LinearInfluenceEngine<S>::gradients(const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const {
  check_points("", X, y);
  const Index k = X.rows(), K = spec_.n_outputs;
  RowMatrix<S> scores, R(k, K), C(k, K), G;
  compute_scores<S>(spec_, X, W_, scores);
  per_example_from_scores<S>(spec_, scores, y, nullptr, R.data(), C.data());
  gradient_rows(X, R, 0, k, G);
  return require_finite(std::move(G), "the per-example gradients");
}

template <class S>
ColMatrix<S> LinearInfluenceEngine<S>::solve(const ConstColMatrixRef<S>& B) const {
  if (B.rows() != n_params())
    throw std::invalid_argument("B must have " + std::to_string(n_params()) + " rows (one per parameter)");
  return factor_.solve(B);
}

template <class S>
ColMatrix<S> LinearInfluenceEngine<S>::s_test(const ConstRowMatrixRef<S>& X_test,
                                              const ConstVectorRef<S>& y_test) const {
  check_points("_test", X_test, y_test);
  const RowMatrix<S> G = gradients(X_test, y_test);  // checked finite there
  return require_finite(factor_.solve(G.transpose()), "s_test = (H + damping*I)^-1 grad L(z_test)");
}

template <class S>
ColMatrix<S> LinearInfluenceEngine<S>::reshape_for_contraction(const ColMatrix<S>& Sm) const {
  const Index m = Sm.cols(), K = spec_.n_outputs, de = spec_.d_eff(X_.cols());
  ColMatrix<S> Shat(de, K * m);
  for (Index a = 0; a < K; ++a) Shat.middleCols(a * m, m) = Sm.middleRows(a * de, de);
  return Shat;
}

template <class S>
void LinearInfluenceEngine<S>::score_block(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R,
                                           const ColMatrix<S>& Shat, Index m, Index start, Index rows, RowMatrix<S>& Z,
                                           RowMatrixRef<S> out) const {
  const Index K = spec_.n_outputs, d = X.cols();
  Z.resize(rows, K * m);
  // Z(i, a·m + t) = x̃_i · S_t[a, :]; the intercept's constant feature is added as a row, not copied into X.
  Z.noalias() = X.middleRows(start, rows) * Shat.topRows(d);
  if (spec_.fit_intercept) Z.rowwise() += Shat.row(d);
  // up_loss(i, t) = −Σ_a r_ia Z(i, a·m + t)
  out = -(R.col(0).segment(start, rows).asDiagonal() * Z.leftCols(m));
  for (Index a = 1; a < K; ++a) out.noalias() -= R.col(a).segment(start, rows).asDiagonal() * Z.middleCols(a * m, m);
}

template <class S>
RowMatrix<S> LinearInfluenceEngine<S>::up_params(const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const {
  const RowMatrix<S> G = gradients(X, y);
  return require_finite(RowMatrix<S>(-factor_.solve(G.transpose()).transpose()), "up_params");
}

template <class S>
RowMatrix<S> LinearInfluenceEngine<S>::score_all(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R,
                                                 const ColMatrix<S>& Shat, Index m) const {
  const Index k = X.rows();
  RowMatrix<S> out(k, m);
  const int threads = partition_threads(k, scoring_flops(k, m));
  std::atomic<bool> finite{true};
  run_row_partition(threads, k, [&](int, Index first, Index last) {
    RowMatrix<S> Z;
    const Index block =
        rows_per_block(last - first, Shat.cols() + Shat.rows(), sizeof(S), (std::size_t(32) << 20) / threads);
    for (Index start = first; start < last; start += block) {
      const Index b = std::min(block, last - start);
      score_block(X, R, Shat, m, start, b, Z, out.middleRows(start, b));
      // checked while the block is still in cache (a separate pass over a large k×m result costs ~5-10 %)
      if (!out.middleRows(start, b).allFinite()) finite = false;
    }
  });
  if (!finite) throw_non_finite("the influence scores up_loss");  // outside the parallel region
  return out;
}

template <class S>
RowMatrix<S> LinearInfluenceEngine<S>::up_loss(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                                               const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const {
  check_points("", X, y);
  const SerialIfSmall serial(scoring_flops(X.rows(), X_test.rows()));
  const ColMatrix<S> Shat = reshape_for_contraction(s_test(X_test, y_test));
  const Index k = X.rows(), K = spec_.n_outputs;
  RowMatrix<S> scores, R(k, K), C(k, K);
  compute_scores<S>(spec_, X, W_, scores);
  per_example_from_scores<S>(spec_, scores, y, nullptr, R.data(), C.data());
  return score_all(X, R, Shat, X_test.rows());
}

template <class S>
RowMatrix<S> LinearInfluenceEngine<S>::up_loss_train(const ConstRowMatrixRef<S>& X_test,
                                                     const ConstVectorRef<S>& y_test) const {
  const SerialIfSmall serial(scoring_flops(X_.rows(), X_test.rows()));
  const ColMatrix<S> Shat = reshape_for_contraction(s_test(X_test, y_test));
  return score_all(X_, residual_, Shat, X_test.rows());  // cached training residuals
}

template <class S>
RowMatrix<S> LinearInfluenceEngine<S>::pert_loss(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                                                 const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const {
  // ∇x∇θL(z) is the p×d Jacobian J((a,l), j) = (D W)(a, j) x̃_l + r_a δ_lj  (since ∇θL = r(s) ⊗ x̃, s = W x̃).
  // With S_t the K×d_eff reshaping of s_test and α_t = S_t x̃ (K):
  //   I_pert,loss(z, z_test)_j = −[(W_xᵀ D α_t)_j + (S_t,xᵀ r)_j],   W_x, S_t,x the first d columns.
  check_points("", X, y);
  const ColMatrix<S> Sm = s_test(X_test, y_test);
  const ColMatrix<S> Shat = reshape_for_contraction(Sm);
  const Index k = X.rows(), m = X_test.rows(), d = X.cols(), K = spec_.n_outputs, de = spec_.d_eff(d);
  RowMatrix<S> scores, R(k, K), C(k, K), xbuf;
  compute_scores<S>(spec_, X, W_, scores);
  per_example_from_scores<S>(spec_, scores, y, nullptr, R.data(), C.data());
  const ConstRowMatrixRef<S> Xt = augmented_rows<S>(spec_, X, 0, k, xbuf);
  const RowMatrix<S> Z = Xt * Shat;  // Z(i, a·m + t) = α_it[a]
  RowMatrix<S> DA(k * m, K);
  Vector<S> alpha(K);
  for (Index i = 0; i < k; ++i)
    for (Index t = 0; t < m; ++t) {
      for (Index a = 0; a < K; ++a) alpha[a] = Z(i, a * m + t);
      apply_curvature(spec_, C.row(i).data(), alpha.data(), DA.row(i * m + t).data());
    }
  // S3(a, t·d + j) = S_t(a, j)
  RowMatrix<S> S3(K, m * d);
  for (Index a = 0; a < K; ++a)
    for (Index t = 0; t < m; ++t) S3.row(a).segment(t * d, d) = Sm.col(t).segment(a * de, d).transpose();
  RowMatrix<S> out(k, m * d);
  out.noalias() = -(R * S3);
  Eigen::Map<RowMatrix<S>> out_rows(out.data(), k * m, d);
  out_rows.noalias() -= DA * W_.leftCols(d);
  return require_finite(std::move(out), "pert_loss");
}

template <class S>
Vector<S> LinearInfluenceEngine<S>::self_influence_from(const ConstRowMatrixRef<S>& X, const RowMatrix<S>& R) const {
  // −g_iᵀ(LLᵀ)⁻¹g_i = −‖L⁻¹ g_i‖²: one triangular solve per block of gradients.
  const Index k = X.rows(), p = n_params();
  const SerialIfSmall serial(double(k) * double(p) * double(p));
  Vector<S> out(k);
  const int threads = partition_threads(k, double(k) * double(p) * double(p));
  run_row_partition(threads, k, [&](int, Index first, Index last) {
    RowMatrix<S> G;
    const Index block = rows_per_block(last - first, p, sizeof(S), (std::size_t(32) << 20) / threads);
    for (Index start = first; start < last; start += block) {
      const Index b = std::min(block, last - start);
      gradient_rows(X, R, start, b, G);
      // G L⁻ᵀ = (L⁻¹ Gᵀ)ᵀ: a right-sided triangular solve on the row-major block, no transposed copy.
      factor_.whiten_rows_in_place(G);
      out.segment(start, b) = -G.rowwise().squaredNorm();
    }
  });
  return require_finite(std::move(out), "self_influence");
}

template <class S>
Vector<S> LinearInfluenceEngine<S>::self_influence(const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y) const {
  check_points("", X, y);
  const Index k = X.rows(), K = spec_.n_outputs;
  RowMatrix<S> scores, R(k, K), C(k, K);
  compute_scores<S>(spec_, X, W_, scores);
  per_example_from_scores<S>(spec_, scores, y, nullptr, R.data(), C.data());
  return self_influence_from(X, R);
}

template <class S>
Vector<S> LinearInfluenceEngine<S>::self_influence_train() const {
  return self_influence_from(X_, residual_);  // cached training residuals
}

template <class S>
TopK<S> LinearInfluenceEngine<S>::top_k(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                                        Index k) const {
  const Index n = X_.rows();
  if (k < 1 || k > n)
    throw std::invalid_argument("k must be between 1 and the number of training points (" + std::to_string(n) +
                                "); got " + std::to_string(k));
  const SerialIfSmall serial(scoring_flops(n, X_test.rows()));
  const ColMatrix<S> Shat = reshape_for_contraction(s_test(X_test, y_test));
  const Index m = X_test.rows();
  using Cand = std::pair<S, std::int64_t>;
  std::vector<std::vector<Cand>> helpful(m), harmful(m);
  const Index block = std::max<Index>(rows_per_block(n, Shat.cols() + m, sizeof(S), std::size_t(16) << 20), k);
  RowMatrix<S> scores(block, m), Z;
  ExceptionCarrier carrier;
  // Lexicographic order on (score, index) keeps results deterministic under ties.
  const auto less = [](const Cand& a, const Cand& b) {
    return a.first < b.first || (a.first == b.first && a.second < b.second);
  };
  const auto greater = [](const Cand& a, const Cand& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  for (Index start = 0; start < n; start += block) {
    const Index b = std::min(block, n - start);
    score_block(X_, residual_, Shat, m, start, b, Z, scores.topRows(b));
    if (!scores.topRows(b).allFinite()) throw_non_finite("the influence scores ranked by top_k");  // never rank a NaN
#ifdef PYINFLUENCE_HAS_OPENMP
#pragma omp parallel for schedule(static) if (m * b > 200000)
#endif
    for (Index t = 0; t < m; ++t) {
      carrier.run([&] {
        auto keep = [&](std::vector<Cand>& best, auto cmp) {
          for (Index i = 0; i < b; ++i) best.emplace_back(scores(i, t), std::int64_t(start + i));
          if (Index(best.size()) > k) {
            std::nth_element(best.begin(), best.begin() + k, best.end(), cmp);
            best.resize(k);
          }
        };
        keep(helpful[t], less);
        keep(harmful[t], greater);
      });
    }
    carrier.rethrow();
  }
  TopK<S> out;
  out.helpful_idx.resize(m, k);
  out.harmful_idx.resize(m, k);
  out.helpful_val.resize(m, k);
  out.harmful_val.resize(m, k);
  for (Index t = 0; t < m; ++t) {
    std::sort(helpful[t].begin(), helpful[t].end(), less);
    std::sort(harmful[t].begin(), harmful[t].end(), greater);
    for (Index j = 0; j < k; ++j) {
      out.helpful_idx(t, j) = helpful[t][j].second;
      out.helpful_val(t, j) = helpful[t][j].first;
      out.harmful_idx(t, j) = harmful[t][j].second;
      out.harmful_val(t, j) = harmful[t][j].first;
    }
  }
  return out;
}

// Newton-step leave-one-out (loo_newton). Notation: c = 1/(n−1), g_i = U_i r_i with U_i = I_K ⊗ x̃_i (p×K),
// H_i = U_i D_i U_iᵀ.
//   ∇R₋ᵢ(θ̂) = v0 − c g_i,        v0 = c Σ_j g_j + l2 P θ̂
//   ∇²R₋ᵢ + λI = A − c H_i,       A = (n/(n−1)) H_data + l2 P + λI   (H_data: the data part of H)
// Woodbury (push-through form, D may be singular):
//   (A − c U D Uᵀ)⁻¹ = A⁻¹ + c A⁻¹U (I − c D UᵀA⁻¹U)⁻¹ D UᵀA⁻¹.
// For test directions Q = [e_a ⊗ x̃_t], the score change of test point t is (QᵀΔθ_i),
//   QᵀΔθ_i = −QᵀA⁻¹v0 − c V_i (w_i − r_i),  V_i = QᵀA⁻¹U_i,  w_i = (I − c D_i M_i)⁻¹ D_i u_i,
//   M_i = U_iᵀA⁻¹U_i,  u_i = U_iᵀA⁻¹v0 − c M_i r_i.
template <class S>
struct LinearInfluenceEngine<S>::LooContext {
  S c = S(0);         // 1/(n−1)
  Index m = 0;        // test points
  ColMatrix<S> Ainv;  // A⁻¹ (p×p)
  Vector<S> base;     // QᵀA⁻¹v0 (K·m): column a·m + t
  RowMatrix<S> Av0;   // A⁻¹v0 reshaped to K×d_eff
  ColMatrix<S> Yhat;  // d_eff × K·K·m: Ŷ(:, b·Km + col) = AiQ(b-block, col), so (X̃ Ŷ)(i, b·Km + col) = V_i(col, b)
  RowMatrix<S> test_scores;  // m×K at θ̂
  Vector<S> test_loss0;      // m: the test losses at θ̂
};

template <class S>
struct LinearInfluenceEngine<S>::LooRows {
  RowMatrix<S> Xt;               // x̃_i of the removed points (k×d_eff)
  RowMatrix<S> Z;                // X̃ Ŷ (k × K·K·m)
  RowMatrix<S> U0;               // u0_i = U_iᵀA⁻¹v0 (k×K)
  std::vector<RowMatrix<S>> XA;  // [a·K + b], b ≥ a: X̃ A⁻¹[a-block, b-block], for M_i(a, b) = x̃_iᵀ A⁻¹[a, b] x̃_i
};

template <class S>
Vector<S> LinearInfluenceEngine<S>::penalty_diagonal() const {
  const Index d = X_.cols(), K = spec_.n_outputs, de = spec_.d_eff(d);
  Vector<S> penalty = Vector<S>::Zero(K * de);
  for (Index a = 0; a < K; ++a)
    for (Index j = 0; j < de; ++j)
      if (spec_.penalized(j, d)) penalty[a * de + j] = S(spec_.l2);
  return penalty;
}

template <class S>
void LinearInfluenceEngine<S>::check_train_indices(const ConstIndexVectorRef& idx) const {
  const Index n = X_.rows();
  for (Index j = 0; j < idx.size(); ++j)
    if (idx[j] < 0 || idx[j] >= n)
      throw std::invalid_argument("train index " + std::to_string(idx[j]) + " is out of range for " +
                                  std::to_string(n) + " training points");
}

template <class S>
ColMatrix<S> LinearInfluenceEngine<S>::loo_hessian_inverse(const Vector<S>& penalty) const {
  const Index n = n_total_, p = n_params();
  const S c = S(1) / S(n - 1);
  ColMatrix<S> A = H_;
  A.diagonal() -= penalty;
  A *= S(n) * c;
  A.diagonal() += penalty;
  A.diagonal().array() += S(damping_);
  if (damping_ == 0.0) add_intercept_gauge<S>(spec_, X_.cols(), A);
  CholeskyFactor<S> factor;
  if (factor.compute(std::move(A)) != Status::Ok) {
    if (factor.status() == Status::NotPositiveDefinite)
      throw factor.not_positive_definite("the leave-one-out Hessian", kDampingAdvice);
    throw NonFiniteError("the leave-one-out Hessian");
  }
  ColMatrix<S> Ainv = ColMatrix<S>::Identity(p, p);
  factor.solve_in_place(Ainv);
  return Ainv;
}

template <class S>
typename LinearInfluenceEngine<S>::LooContext LinearInfluenceEngine<S>::loo_context(const ConstRowMatrixRef<S>& X_test,
                                                                                    const ConstVectorRef<S>& y_test,
                                                                                    const Vector<S>& penalty) const {
  const Index n = n_total_, d = X_.cols(), K = spec_.n_outputs, de = spec_.d_eff(d), p = K * de;
  LooContext ctx;
  ctx.c = S(1) / S(n - 1);
  ctx.m = X_test.rows();
  const Index m = ctx.m;
  ctx.Ainv = loo_hessian_inverse(penalty);
  // v0 = c Σ_j g_j + l2 P θ̂ (Σ_j g_j over the whole training set: grad_sum_, also for a block engine).
  Vector<S> v0 = ctx.c * Eigen::Map<const Vector<S>>(grad_sum_.data(), p);
  v0 += penalty.cwiseProduct(Eigen::Map<const Vector<S>>(W_.data(), p));
  const Vector<S> Ainv_v0 = ctx.Ainv * v0;
  // Test side.
  compute_scores<S>(spec_, X_test, W_, ctx.test_scores);
  ctx.test_loss0.resize(m);
  loss_from_scores<S>(spec_, ctx.test_scores, y_test, ctx.test_loss0.data());
  RowMatrix<S> xtbuf;
  const ConstRowMatrixRef<S> Xtest_t = augmented_rows<S>(spec_, X_test, 0, m, xtbuf);
  ColMatrix<S> AiQ(p, K * m);  // column a·m + t = A⁻¹ (e_a ⊗ x̃_t)
  for (Index a = 0; a < K; ++a)
    AiQ.middleCols(a * m, m).noalias() = ctx.Ainv.middleCols(a * de, de) * Xtest_t.transpose();
  ctx.base = AiQ.transpose() * v0;
  ctx.Yhat.resize(de, K * K * m);
  for (Index b = 0; b < K; ++b) ctx.Yhat.middleCols(b * K * m, K * m) = AiQ.middleRows(b * de, de);
  ctx.Av0.resize(K, de);
  for (Index a = 0; a < K; ++a) ctx.Av0.row(a) = Ainv_v0.segment(a * de, de).transpose();
  return ctx;
}

template <class S>
typename LinearInfluenceEngine<S>::LooRows LinearInfluenceEngine<S>::loo_rows(const LooContext& ctx,
                                                                              const ConstIndexVectorRef& idx) const {
  const Index d = X_.cols(), K = spec_.n_outputs, de = spec_.d_eff(d), k = idx.size();
  LooRows rows;
  rows.Xt.resize(k, de);
  for (Index j = 0; j < k; ++j) {
    rows.Xt.row(j).head(d) = X_.row(idx[j]);
    if (spec_.fit_intercept) rows.Xt(j, d) = S(1);
  }
  rows.Z = rows.Xt * ctx.Yhat;
  rows.U0 = rows.Xt * ctx.Av0.transpose();
  rows.XA.resize(std::size_t(K * K));
  for (Index a = 0; a < K; ++a)
    for (Index b = a; b < K; ++b) rows.XA[std::size_t(a * K + b)] = rows.Xt * ctx.Ainv.block(a * de, b * de, de, de);
  return rows;
}

namespace {

// Whether removing a point leaves a Hessian that is not positive definite. ∇²R₋ᵢ + λI = A^{1/2} (I − c A^{-1/2} U D
// Uᵀ A^{-1/2}) A^{1/2}, and the middle factor's eigenvalues other than 1 are those of I − c D M (D, M positive
// semi-definite), so the removal is singular iff one of them is ≤ 0 (numerically: below p·eps, the Cholesky test of
// the group path), and then the step would be inf or garbage. K = 1: the scalar itself. K > 1: I − cDM is similar
// to I − c M^{1/2} D M^{1/2}, which is positive definite iff M − c M D M = M^{1/2}(…)M^{1/2} is (M ≻ 0; a point with
// x̃ = 0 has M = 0 and changes nothing): a K×K Cholesky with the pivot test of cholesky.cpp.
template <class S>
bool removal_is_singular(const ColMatrix<S>& M, const ColMatrix<S>& DM, const ColMatrix<S>& system, S c, Index p) {
  const S tiny = S(p) * std::numeric_limits<S>::epsilon();
  if (M.rows() == 1) return !(system(0, 0) > tiny);
  const ColMatrix<S> T = M - c * (M * DM);
  const Eigen::LLT<ColMatrix<S>> llt(T.template selfadjointView<Eigen::Lower>());
  const S max_diag = M.diagonal().cwiseAbs().maxCoeff();
  return max_diag > S(0) &&
         (llt.info() != Eigen::Success || !(llt.matrixLLT().diagonal().array().square().minCoeff() > tiny * max_diag));
}

}  // namespace

template <class S>
bool LinearInfluenceEngine<S>::loo_step(const LooContext& ctx, const LooRows& rows, Index i, Index row,
                                        const ConstVectorRef<S>& y_test, RowMatrixRef<S> out) const {
  const Index K = spec_.n_outputs, m = ctx.m;
  const S c = ctx.c;
  ColMatrix<S> M(K, K), DM(K, K);
  for (Index a = 0; a < K; ++a)
    for (Index b = a; b < K; ++b) M(a, b) = M(b, a) = rows.XA[std::size_t(a * K + b)].row(i).dot(rows.Xt.row(i));
  const S* cv = curvature_.row(row).data();
  const Vector<S> rv = residual_.row(row).transpose();
  const Vector<S> u = rows.U0.row(i).transpose() - c * (M * rv);
  Vector<S> Du(K), w(K);
  apply_curvature(spec_, cv, u.data(), Du.data());
  for (Index b = 0; b < K; ++b) apply_curvature(spec_, cv, M.col(b).data(), DM.col(b).data());
  const ColMatrix<S> system = ColMatrix<S>::Identity(K, K) - c * DM;
  if (removal_is_singular<S>(M, DM, system, c, n_params())) return false;
  if (K == 1)
    w[0] = Du[0] / system(0, 0);
  else
    w = system.partialPivLu().solve(Du);
  const Vector<S> coef = w - rv;  // Δs = −base − c V_i coef
  RowMatrix<S> sc(1, K);
  for (Index t = 0; t < m; ++t) {
    for (Index a = 0; a < K; ++a) {
      S vc = 0;
      for (Index b = 0; b < K; ++b) vc += rows.Z(i, b * K * m + a * m + t) * coef[b];
      sc(0, a) = ctx.test_scores(t, a) - ctx.base[a * m + t] - c * vc;
    }
    S l;
    loss_from_scores<S>(spec_, sc, y_test.segment(t, 1), &l);
    out(i, t) = l - ctx.test_loss0[t];
  }
  return true;
}

template <class S>
RowMatrix<S> LinearInfluenceEngine<S>::loo_newton(const ConstRowMatrixRef<S>& X_test, const ConstVectorRef<S>& y_test,
                                                  const ConstIndexVectorRef& idx) const {
  check_points("_test", X_test, y_test);
  if (n_total_ < 2) throw std::invalid_argument("leave-one-out needs at least 2 training points");
  check_train_indices(idx);
  const LooContext ctx = loo_context(X_test, y_test, penalty_diagonal());
  const LooRows rows = loo_rows(ctx, idx);
  const Index k = idx.size(), m = ctx.m, K = spec_.n_outputs;
  RowMatrix<S> out(k, m);
  ExceptionCarrier carrier;
  std::atomic<Index> singular{-1};  // a training index whose removal leaves a singular Hessian
#ifdef PYINFLUENCE_HAS_OPENMP
#pragma omp parallel for schedule(static) if (k * m * K > 20000)
#endif
  for (Index i = 0; i < k; ++i) {
    carrier.run([&] {
      if (!loo_step(ctx, rows, i, idx[i], y_test, out)) {
        Index expected = -1;
        singular.compare_exchange_strong(expected, idx[i]);  // report one; no exception inside the parallel loop
      }
    });
  }
  carrier.rethrow();
  if (singular.load() >= 0) {
    FactorFailure failure;
    failure.status = Status::NotPositiveDefinite;
    failure.size = n_params();
    throw NotPositiveDefiniteError(
        "the leave-one-out Hessian without training point " + std::to_string(singular.load()) +
            " is singular or indefinite (removing it leaves too little data to determine every parameter)" +
            kDampingAdvice,
        failure, singular.load());
  }
  return require_finite(std::move(out), "the Newton-step leave-one-out loss change");
}

template <class S>
Vector<S> LinearInfluenceEngine<S>::removal_weights(const ConstIndexVectorRef& idx) const {
  require_whole_set("leaving a group out (loo_newton_group, refit_without)");
  check_train_indices(idx);
  Vector<S> weights = Vector<S>::Ones(X_.rows());
  for (Index j = 0; j < idx.size(); ++j) weights[idx[j]] = S(0);
  if (!(weights.sum() > S(0))) throw std::invalid_argument("cannot remove every training point");
  return weights;
}

template <class S>
ColMatrix<S> LinearInfluenceEngine<S>::leave_out_hessian(const Vector<S>& weights) const {
  // ∇²R₋(θ̂) = (n·H_data − g·H_data(removed))/(n − g) + l2P, with H_data = H − l2P the mean over all n:
  // g·p² work for the removed rows instead of re-assembling n·p².
  const Index n = X_.rows(), d = X_.cols();
  const Index kept = Index((weights.array() > S(0)).count()), g = n - kept;
  const Vector<S> penalty = penalty_diagonal();
  ColMatrix<S> M = H_;
  M.diagonal() -= penalty;
  M *= S(n);
  if (g > 0) {
    RowMatrix<S> Xg(g, d);
    Vector<S> yg(g);
    Index r = 0;
    for (Index i = 0; i < n; ++i)
      if (!(weights[i] > S(0))) {
        Xg.row(r) = X_.row(i);
        yg[r] = y_[i];
        ++r;
      }
    const Vector<S> no_w;
    M -= S(g) * data_hessian<S>(spec_, Xg, yg, W_, no_w);
  }
  M /= S(kept);
  M.diagonal() += penalty;
  return M;
}

template <class S>
Vector<S> LinearInfluenceEngine<S>::loo_newton_group(const ConstRowMatrixRef<S>& X_test,
                                                     const ConstVectorRef<S>& y_test,
                                                     const ConstIndexVectorRef& idx) const {
  // One Newton step from θ̂ on the objective without the group (mean over the remaining points).
  const Index p = n_params(), m = X_test.rows();
  check_points("_test", X_test, y_test);
  const Vector<S> weights = removal_weights(idx);
  ColMatrix<S> Hg = leave_out_hessian(weights);
  Hg.diagonal().array() += S(damping_);
  if (damping_ == 0.0) add_intercept_gauge<S>(spec_, X_.cols(), Hg);
  CholeskyFactor<S> factor;
  if (factor.compute(std::move(Hg)) != Status::Ok) {
    if (factor.status() == Status::NotPositiveDefinite)
      throw factor.not_positive_definite("the leave-group-out Hessian", kDampingAdvice);
    throw NonFiniteError("the leave-group-out Hessian");
  }
  const ObjectiveValue<S> obj = objective<S>(spec_, X_, y_, W_, weights, true);
  const Vector<S> step = factor.solve(Eigen::Map<const Vector<S>>(obj.grad.data(), p));
  const RowMatrix<S> W1 = W_ - Eigen::Map<const RowMatrix<S>>(step.data(), W_.rows(), W_.cols());
  RowMatrix<S> s0, s1;
  compute_scores<S>(spec_, X_test, W_, s0);
  compute_scores<S>(spec_, X_test, W1, s1);
  Vector<S> l0(m), l1(m);
  loss_from_scores<S>(spec_, s0, y_test, l0.data());
  loss_from_scores<S>(spec_, s1, y_test, l1.data());
  return require_finite(Vector<S>(l1 - l0), "the Newton-step leave-group-out loss change");
}

template <class S>
NewtonResult<S> LinearInfluenceEngine<S>::refit_without(const ConstIndexVectorRef& idx, double tol,
                                                        int max_iter) const {
  const Index d = X_.cols(), K = spec_.n_outputs, de = spec_.d_eff(d), p = K * de;
  if (!(tol >= 0.0)) throw std::invalid_argument("tol must be >= 0");
  if (max_iter < 1) throw std::invalid_argument("max_iter must be >= 1");
  const Vector<S> weights = removal_weights(idx);
  // Chord matrix: ∇²R₋(θ̂), from the cached H.
  ColMatrix<S> M = leave_out_hessian(weights);
  add_intercept_gauge<S>(spec_, d, M);
  CholeskyFactor<S> chord;
  const bool chord_ok = chord.compute(std::move(M)) == Status::Ok;
  NewtonResult<S> res;
  res.W = W_;
  const auto gauged = [&](const RowMatrix<S>& W) {
    ObjectiveValue<S> v = objective<S>(spec_, X_, y_, W, weights, true);
    add_intercept_gauge<S>(spec_, W, v);
    return v;
  };
  bool fallback = !chord_ok;
  if (!fallback) {
    ObjectiveValue<S> cur = gauged(res.W);
    double gnorm = double(cur.grad.norm());
    for (res.iterations = 0; res.iterations < max_iter; ++res.iterations) {
      const bool at_tol = gnorm <= tol;
      const Vector<S> step = chord.solve(Eigen::Map<const Vector<S>>(cur.grad.data(), p));
      const RowMatrix<S> Wt = res.W - Eigen::Map<const RowMatrix<S>>(step.data(), K, de);
      ObjectiveValue<S> trial = gauged(Wt);
      const double tnorm = double(trial.grad.norm());
      if (!std::isfinite(trial.value) || !(tnorm < gnorm)) {
        fallback = !at_tol;  // no progress: at rounding level if at tol, else stalled → full Newton
        break;
      }
      const double previous = gnorm;
      res.W = Wt;
      cur = std::move(trial);
      gnorm = tnorm;
      // Past tol, keep polishing while steps still gain (ground truth should be exact to rounding).
      if (at_tol && tnorm > 0.5 * previous) break;
      if (!at_tol && tnorm > 0.5 * previous && tnorm > tol) {  // slow linear convergence: full Newton is cheaper
        fallback = true;
        break;
      }
    }
    if (!fallback && !(gnorm <= tol)) fallback = true;
  }
  if (fallback) {
    NewtonResult<S> full = fit_newton<S>(spec_, X_, y_, res.W, weights, tol, max_iter);
    full.iterations += res.iterations;
    return full;
  }
  const ObjectiveValue<S> plain = objective<S>(spec_, X_, y_, res.W, weights, true);
  res.grad_norm = double(plain.grad.norm());
  res.objective = plain.value;
  res.status = Status::Ok;
  return res;
}

template class LinearInfluenceEngine<float>;
template class LinearInfluenceEngine<double>;

}  // namespace pyinfluence
