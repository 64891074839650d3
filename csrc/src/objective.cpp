#include "pyinfluence/objective.hpp"

#include "pyinfluence/threads.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyinfluence {

Index rows_per_block(Index n, Index width, std::size_t scalar_size, std::size_t budget_bytes) {
  const Index per_row = std::max<Index>(1, width) * Index(scalar_size);
  const Index rows = std::max<Index>(64, Index(budget_bytes) / per_row);
  return std::max<Index>(1, std::min(n, rows));
}

template <class S>
void check_problem(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                   const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights) {
  spec.validate();
  const Index n = X.rows(), d = X.cols();
  if (n == 0) throw std::invalid_argument("X must have at least one row");
  if (d == 0) throw std::invalid_argument("X must have at least one column");
  if (y.size() != n)
    throw std::invalid_argument("y has " + std::to_string(y.size()) + " entries but X has " + std::to_string(n) +
                                " rows");
  if (W.rows() != spec.n_outputs || W.cols() != spec.d_eff(d))
    throw std::invalid_argument("theta must have shape (" + std::to_string(spec.n_outputs) + ", " +
                                std::to_string(spec.d_eff(d)) + ") for this model and X; got (" +
                                std::to_string(W.rows()) + ", " + std::to_string(W.cols()) + ")");
  if (!X.allFinite()) throw std::invalid_argument("X contains NaN or inf");
  if (!W.allFinite()) throw std::invalid_argument("theta contains NaN or inf");
  if (weights.size() != 0) {
    if (weights.size() != n)
      throw std::invalid_argument("sample_weight has " + std::to_string(weights.size()) + " entries but X has " +
                                  std::to_string(n) + " rows");
    if (!weights.allFinite() || (weights.array() < S(0)).any())
      throw std::invalid_argument("sample_weight must be finite and nonnegative");
    if (!(weights.sum() > S(0))) throw std::invalid_argument("sample_weight must have a positive sum");
  }
}

namespace {

template <class S>
inline S weight_sum(const ConstVectorRef<S>& weights, Index n) {
  return weights.size() ? weights.sum() : S(n);
}

}  // namespace

template <class S>
ObjectiveValue<S> objective(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                            const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights, bool with_gradient) {
  const Index n = X.rows(), d = X.cols(), K = spec.n_outputs, de = spec.d_eff(d);
  const bool weighted = weights.size() != 0;
  ObjectiveValue<S> out;
  if (with_gradient) out.grad = RowMatrix<S>::Zero(K, de);
  const Index block = rows_per_block(n, de + 3 * K, sizeof(S));
  RowMatrix<S> scores, R(block, K), C(block, K), xbuf;
  Vector<S> loss(block);
  double total = 0.0;  // accumulate the objective in double even for float32
  for (Index start = 0; start < n; start += block) {
    const Index b = std::min(block, n - start);
    compute_scores<S>(spec, X.middleRows(start, b), W, scores);
    per_example_from_scores<S>(spec, scores, y.segment(start, b), loss.data(), with_gradient ? R.data() : nullptr,
                               with_gradient ? C.data() : nullptr);
    if (weighted) {
      total += double((loss.head(b).array() * weights.segment(start, b).array()).sum());
    } else {
      total += double(loss.head(b).sum());
    }
    if (with_gradient) {
      auto Rb = R.topRows(b);
      if (weighted) Rb.array().colwise() *= weights.segment(start, b).array();
      // Σ_i r_i ⊗ x̃_i = Rᵀ X̃ (K×d_eff)
      out.grad.leftCols(d).noalias() += Rb.transpose() * X.middleRows(start, b);
      if (spec.fit_intercept) out.grad.col(d) += Rb.colwise().sum().transpose();
    }
  }
  const S wsum = weight_sum<S>(weights, n);
  out.value = total / double(wsum);
  double penalty = 0.0;
  for (Index j = 0; j < de; ++j)
    if (spec.penalized(j, d)) penalty += double(W.col(j).squaredNorm());
  out.value += 0.5 * spec.l2 * penalty;
  if (with_gradient) {
    out.grad /= wsum;
    for (Index j = 0; j < de; ++j)
      if (spec.penalized(j, d)) out.grad.col(j) += S(spec.l2) * W.col(j);
  }
  return out;
}

namespace {

// Adds the data curvature of rows [start, start+b) of (X, y) to the LOWER triangle of H (unnormalised:
// Σ_i ω_i ∇²_θ L_i). Buffers are reused across calls. `parallel_rows` lets the memory-bound first pass use the
// core's OpenMP threads (off when the caller already runs one accumulator per thread).
template <class S>
class CurvatureAccumulator {
 public:
  CurvatureAccumulator(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                       const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights, Index block)
      : spec_(spec), X_(X), y_(y), W_(W), weights_(weights), R_(block, spec.n_outputs), C_(block, spec.n_outputs) {}

  void add_rows(Index start, Index b, ColMatrix<S>& H, bool parallel_rows) {
    const Index d = X_.cols(), K = spec_.n_outputs, de = spec_.d_eff(d), p = K * de;
    const bool weighted = weights_.size() != 0;
    const bool binary = spec_.family != Family::Multinomial;
    const auto Xb = X_.middleRows(start, b);
    const auto Wx = W_.leftCols(d);
    auto Cb = C_.topRows(b);
    // One fused pass over the block's rows while each row is in cache: scores s = W x̃, residual and curvature,
    // and (binary families) the SYRK operand row B_i = √(ω_i c_i) x̃_i. Reading X once matters at large n: this
    // pass is memory-bound, the SYRK is not.
    if (binary) B_.resize(b, de);
    (void)parallel_rows;
#ifdef PYINFLUENCE_HAS_OPENMP
#pragma omp parallel for schedule(static) if (parallel_rows && b * de > 200000)
#endif
    for (Index i = 0; i < b; ++i) {
      S stack_scores[64];  // K scores of row i (heap only for more than 64 classes)
      std::vector<S> heap_scores;
      S* sc = stack_scores;
      if (K > 64) {
        heap_scores.resize(K);
        sc = heap_scores.data();
      }
      for (Index a = 0; a < K; ++a) sc[a] = Xb.row(i).dot(Wx.row(a)) + (spec_.fit_intercept ? W_(a, d) : S(0));
      per_example_row<S>(spec_, sc, y_[start + i], &R_(i, 0), &C_(i, 0));
      if (weighted)
        for (Index a = 0; a < K; ++a) C_(i, a) *= weights_[start + i];
      if (binary) {
        const S root = std::sqrt(C_(i, 0));
        B_.row(i).head(d) = root * Xb.row(i);
        if (spec_.fit_intercept) B_(i, d) = root;
      }
    }
    if (binary) {
      // Binary: D_i = c_i ≥ 0, so Σ c_i x̃x̃ᵀ = BᵀB with B = diag(√c) X̃ (one SYRK).
      H.template selfadjointView<Eigen::Lower>().rankUpdate(B_.transpose());
      return;
    }
    // Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃x̃ᵀ = blockdiag_a(X̃ᵀ diag(p_a) X̃) − GᵀG,  G_i = p_i ⊗ x̃_i.
    // With weights ω, C already holds ω_i p_i; G_i = √ω_i p_i ⊗ x̃_i, so rescale by 1/√ω_i.
    G_.resize(b, p);
    for (Index i = 0; i < b; ++i) {
      const S scale = weighted ? (weights_[start + i] > S(0) ? S(1) / std::sqrt(weights_[start + i]) : S(0)) : S(1);
      for (Index a = 0; a < K; ++a) {
        const S coef = scale * Cb(i, a);
        G_.row(i).segment(a * de, d) = coef * Xb.row(i);
        if (spec_.fit_intercept) G_(i, a * de + d) = coef;
      }
    }
    H.template selfadjointView<Eigen::Lower>().rankUpdate(G_.transpose(), S(-1));
    B_.resize(b, de);
    for (Index a = 0; a < K; ++a) {
      B_.leftCols(d) = Cb.col(a).array().sqrt().matrix().asDiagonal() * Xb;
      if (spec_.fit_intercept) B_.col(d) = Cb.col(a).array().sqrt().matrix();
      H.block(a * de, a * de, de, de).template selfadjointView<Eigen::Lower>().rankUpdate(B_.transpose());
    }
  }

 private:
  const ModelSpec& spec_;
  const ConstRowMatrixRef<S>& X_;
  const ConstVectorRef<S>& y_;
  const ConstRowMatrixRef<S>& W_;
  const ConstVectorRef<S>& weights_;
  RowMatrix<S> R_, C_, B_, G_;
};

// Extra memory the row-partitioned assembly may spend on per-thread Hessian accumulators.
constexpr std::size_t partial_hessian_budget = std::size_t(512) << 20;

}  // namespace

template <class S>
ColMatrix<S> data_hessian(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                          const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights) {
  const Index n = X.rows(), d = X.cols(), K = spec.n_outputs, de = spec.d_eff(d), p = K * de;
  check_labels<S>(spec, y);
  const SerialIfSmall serial(double(n) * double(p) * double(p));
  ColMatrix<S> H = ColMatrix<S>::Zero(p, p);
  const Index width = p + de + 2 * K;
  int threads = partition_threads(n, double(n) * double(p) * double(p));
  if (threads > 1 && std::size_t(threads - 1) * std::size_t(p) * std::size_t(p) * sizeof(S) > partial_hessian_budget)
    threads = 1;
  if (threads == 1) {
    // One accumulator; the BLAS and the first pass each use all threads.
    const Index block = rows_per_block(n, width, sizeof(S));
    CurvatureAccumulator<S> acc(spec, X, y, W, weights, block);
    for (Index start = 0; start < n; start += block) acc.add_rows(start, std::min(block, n - start), H, true);
  } else {
    // Row partition: thread t accumulates its rows into its own H_t with a single-threaded BLAS, then
    // H = Σ_t H_t. No hand-off between thread pools per block; (T−1)·p² extra memory (budgeted above).
    std::vector<ColMatrix<S>> partial(std::size_t(threads - 1));
    run_row_partition(threads, n, [&](int t, Index first, Index last) {
      ColMatrix<S>& Ht = t == 0 ? H : partial[std::size_t(t - 1)];
      if (t > 0) Ht.setZero(p, p);
      const Index block = rows_per_block(last - first, width, sizeof(S), (std::size_t(32) << 20) / threads);
      CurvatureAccumulator<S> acc(spec, X, y, W, weights, block);
      for (Index start = first; start < last; start += block)
        acc.add_rows(start, std::min(block, last - start), Ht, false);
    });
    for (const auto& Ht : partial) H += Ht;
  }
  H /= weight_sum<S>(weights, n);
  H.template triangularView<Eigen::StrictlyUpper>() = H.transpose();
  return H;
}

template <class S>
ColMatrix<S> hessian(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstVectorRef<S>& y,
                     const ConstRowMatrixRef<S>& W, const ConstVectorRef<S>& weights) {
  ColMatrix<S> H = data_hessian<S>(spec, X, y, W, weights);
  const Index d = X.cols(), de = spec.d_eff(d);
  for (Index k = 0; k < spec.n_outputs; ++k)
    for (Index j = 0; j < de; ++j)
      if (spec.penalized(j, d)) H(k * de + j, k * de + j) += S(spec.l2);
  return H;
}

template <class S>
void add_intercept_gauge(const ModelSpec& spec, Index d, ColMatrix<S>& H) {
  if (!spec.has_intercept_gauge()) return;
  const Index de = spec.d_eff(d);
  for (Index k = 0; k < spec.n_outputs; ++k)
    for (Index l = 0; l < spec.n_outputs; ++l) H(k * de + d, l * de + d) += S(ModelSpec::intercept_gauge);
}

template <class S>
void add_intercept_gauge(const ModelSpec& spec, const ConstRowMatrixRef<S>& W, ObjectiveValue<S>& obj) {
  if (!spec.has_intercept_gauge()) return;
  const Index d = W.cols() - 1;
  const S bsum = W.col(d).sum();
  obj.value += 0.5 * ModelSpec::intercept_gauge * double(bsum) * double(bsum);
  if (obj.grad.size()) obj.grad.col(d).array() += S(ModelSpec::intercept_gauge) * bsum;
}

#define PYINFLUENCE_INSTANTIATE(S)                                                                                 \
  template void add_intercept_gauge<S>(const ModelSpec&, Index, ColMatrix<S>&);                                    \
  template void add_intercept_gauge<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, ObjectiveValue<S>&);         \
  template void check_problem<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&,          \
                                 const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&);                           \
  template ObjectiveValue<S> objective<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&, \
                                          const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&, bool);            \
  template ColMatrix<S> data_hessian<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&,   \
                                        const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&);                    \
  template ColMatrix<S> hessian<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&,        \
                                   const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&);
PYINFLUENCE_INSTANTIATE(float)
PYINFLUENCE_INSTANTIATE(double)
#undef PYINFLUENCE_INSTANTIATE

}  // namespace pyinfluence
