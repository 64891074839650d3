#include "pyinfluence/families.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

namespace pyinfluence {

Family family_from_string(const std::string& name) {
  if (name == "logistic") return Family::Logistic;
  if (name == "multinomial") return Family::Multinomial;
  if (name == "smooth_hinge") return Family::SmoothHinge;
  if (name == "squared") return Family::Squared;
  throw std::invalid_argument("family must be one of 'logistic', 'multinomial', 'smooth_hinge', 'squared'; got '" +
                              name + "'");
}

const char* family_name(Family f) {
  switch (f) {
    case Family::Logistic: return "logistic";
    case Family::Multinomial: return "multinomial";
    case Family::SmoothHinge: return "smooth_hinge";
    case Family::Squared: return "squared";
  }
  return "?";
}

void ModelSpec::validate() const {
  if (family == Family::Multinomial) {
    if (n_outputs < 2) throw std::invalid_argument("n_outputs must be >= 2 for the multinomial family");
  } else if (n_outputs != 1) {
    throw std::invalid_argument(std::string("n_outputs must be 1 for the ") + family_name(family) + " family");
  }
  if (!(l2 >= 0.0) || !std::isfinite(l2)) throw std::invalid_argument("l2 must be a finite number >= 0");
  if (family == Family::SmoothHinge && (!(temperature > 0.0) || !std::isfinite(temperature)))
    throw std::invalid_argument("temperature must be a finite number > 0 for the smooth hinge");
}

namespace {

// log(1 + e^u) without overflow.
template <class S>
inline S softplus(S u) {
  return u > S(0) ? u + std::log1p(std::exp(-u)) : std::log1p(std::exp(u));
}
template <class S>
inline S sigmoid(S u) {
  if (u >= S(0)) return S(1) / (S(1) + std::exp(-u));
  const S e = std::exp(u);
  return e / (S(1) + e);
}

[[noreturn]] void bad_label(Index row, const char* expected, double value) {
  throw std::invalid_argument("y[" + std::to_string(row) + "] = " + std::to_string(value) +
                              " is not a valid label: " + expected);
}

template <class S>
inline void check_label(const ModelSpec& spec, Index i, S yi) {
  switch (spec.family) {
    case Family::Logistic:
      if (!(yi == S(0) || yi == S(1))) bad_label(i, "expected 0 or 1", double(yi));
      break;
    case Family::SmoothHinge:
      if (!(yi == S(-1) || yi == S(1))) bad_label(i, "expected -1 or +1", double(yi));
      break;
    case Family::Multinomial:
      if (!(yi >= S(0) && yi < S(spec.n_outputs) && yi == std::floor(yi)))
        bad_label(i, "expected a class index in [0, n_outputs)", double(yi));
      break;
    case Family::Squared:
      if (!std::isfinite(yi)) bad_label(i, "expected a finite number", double(yi));
      break;
  }
}

// One example: loss, and optionally residual and curvature rows (length K).
template <class S>
inline S one_example(const ModelSpec& spec, const S* s, S yi, S* r, S* c) {
  const Index K = spec.n_outputs;
  switch (spec.family) {
    case Family::Logistic: {
      const S p = sigmoid(s[0]);
      if (r) {
        r[0] = p - yi;
        c[0] = p * (S(1) - p);
      }
      return softplus(s[0]) - yi * s[0];
    }
    case Family::SmoothHinge: {
      const S t = S(spec.temperature);
      const S u = (S(1) - yi * s[0]) / t;  // L = t·softplus(u), ∂L/∂s = −y σ(u), ∂²L/∂s² = σ(u)(1 − σ(u))/t
      if (r) {
        const S q = sigmoid(u);
        r[0] = -yi * q;
        c[0] = q * (S(1) - q) / t;
      }
      return t * softplus(u);
    }
    case Family::Squared: {
      const S e = s[0] - yi;
      if (r) {
        r[0] = e;
        c[0] = S(1);
      }
      return S(0.5) * e * e;
    }
    case Family::Multinomial: {
      S mx = s[0];
      for (Index k = 1; k < K; ++k) mx = s[k] > mx ? s[k] : mx;
      S z = 0;
      for (Index k = 0; k < K; ++k) z += std::exp(s[k] - mx);
      const S lse = mx + std::log(z);
      const Index label = Index(yi);
      if (r) {
        for (Index k = 0; k < K; ++k) {
          const S p = std::exp(s[k] - lse);
          c[k] = p;
          r[k] = p - (k == label ? S(1) : S(0));
        }
      }
      return lse - s[label];
    }
  }
  return S(0);
}

}  // namespace

template <class S>
S per_example_row(const ModelSpec& spec, const S* scores, S y, S* residual, S* curvature) {
  return one_example(spec, scores, y, residual, curvature);
}

template <class S>
void check_labels(const ModelSpec& spec, const ConstVectorRef<S>& y) {
  for (Index i = 0; i < y.size(); ++i) check_label(spec, i, y[i]);
}

template <class S>
void per_example_from_scores(const ModelSpec& spec, const ConstRowMatrixRef<S>& scores, const ConstVectorRef<S>& y,
                             S* loss, S* residual, S* curvature) {
  const Index b = scores.rows(), K = spec.n_outputs;
  for (Index i = 0; i < b; ++i) check_label(spec, i, y[i]);
#ifdef PYINFLUENCE_HAS_OPENMP
#pragma omp parallel for schedule(static) if (b > 4096)
#endif
  for (Index i = 0; i < b; ++i) {
    const S l = one_example(spec, scores.row(i).data(), y[i], residual ? residual + i * K : nullptr,
                            curvature ? curvature + i * K : nullptr);
    if (loss) loss[i] = l;
  }
}

template <class S>
void loss_from_scores(const ModelSpec& spec, const ConstRowMatrixRef<S>& scores, const ConstVectorRef<S>& y, S* loss) {
  per_example_from_scores<S>(spec, scores, y, loss, nullptr, nullptr);
}

template <class S>
void compute_scores(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, const ConstRowMatrixRef<S>& W,
                    RowMatrix<S>& scores) {
  const Index d = X.cols();
  scores.resize(X.rows(), spec.n_outputs);
  scores.noalias() = X * W.leftCols(d).transpose();
  if (spec.fit_intercept) scores.rowwise() += W.col(d).transpose();
}

template <class S>
ConstRowMatrixRef<S> augmented_rows(const ModelSpec& spec, const ConstRowMatrixRef<S>& X, Index start, Index rows,
                                    RowMatrix<S>& buffer) {
  if (!spec.fit_intercept) return X.middleRows(start, rows);
  const Index d = X.cols();
  buffer.resize(rows, d + 1);
  buffer.leftCols(d) = X.middleRows(start, rows);
  buffer.col(d).setOnes();
  return buffer;
}

#define PYINFLUENCE_INSTANTIATE(S)                                                                                  \
  template S per_example_row<S>(const ModelSpec&, const S*, S, S*, S*);                                             \
  template void check_labels<S>(const ModelSpec&, const ConstVectorRef<S>&);                                        \
  template void per_example_from_scores<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&, \
                                           S*, S*, S*);                                                             \
  template void loss_from_scores<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, const ConstVectorRef<S>&, S*);   \
  template void compute_scores<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, const ConstRowMatrixRef<S>&,       \
                                  RowMatrix<S>&);                                                                   \
  template ConstRowMatrixRef<S> augmented_rows<S>(const ModelSpec&, const ConstRowMatrixRef<S>&, Index, Index,      \
                                                  RowMatrix<S>&);
PYINFLUENCE_INSTANTIATE(float)
PYINFLUENCE_INSTANTIATE(double)
#undef PYINFLUENCE_INSTANTIATE

}  // namespace pyinfluence
