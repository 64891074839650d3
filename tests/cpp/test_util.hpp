// Shared helpers of the C++ tests: a tiny assertion harness, synthetic problems and naive references.
//
// The references are deliberately written again here, as plain loops over examples and dense Gaussian elimination,
// without the core's blocking, BLAS calls or Cholesky, so that each test compares the core with an independent
// computation of the same formula (families.hpp, objective.hpp, engine.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "pyinfluence/pyinfluence.hpp"

namespace pyitest {

using namespace pyinfluence;

// ---------------------------------------------------------------------------------------------------------------
// Assertions: every failure is printed with its file, line and the current section; main() returns finish().
// ---------------------------------------------------------------------------------------------------------------
struct Stats {
  int checks = 0;
  int failures = 0;
  std::string section;
};
inline Stats& stats() {
  static Stats s;
  return s;
}
inline void section(const std::string& name) { stats().section = name; }
inline void report(bool ok, const char* file, int line, const std::string& what) {
  ++stats().checks;
  if (ok) return;
  ++stats().failures;
  std::fprintf(stderr, "FAILED %s:%d [%s]: %s\n", file, line, stats().section.c_str(), what.c_str());
}
inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failures\n", name, stats().checks, stats().failures);
  return stats().failures == 0 ? 0 : 1;
}

#define CHECK(cond) ::pyitest::report(bool(cond), __FILE__, __LINE__, #cond)
// |a − b| ≤ tol, with both values printed on failure.
#define CHECK_NEAR(a, b, tol)                                                                                          \
  do {                                                                                                                 \
    const double a_ = double(a), b_ = double(b), t_ = double(tol);                                                     \
    ::pyitest::report(std::abs(a_ - b_) <= t_, __FILE__, __LINE__,                                                     \
                      std::string(#a " ~ " #b ": ") + std::to_string(a_) + " vs " + std::to_string(b_) + " (|diff| " + \
                          std::to_string(std::abs(a_ - b_)) + " > " + std::to_string(t_) + ")");                       \
  } while (0)
// value ≤ bound (e.g. a relative error), printed on failure.
#define CHECK_LE(value, bound)                                            \
  do {                                                                    \
    const double v_ = double(value), b_ = double(bound);                  \
    char buf_[160];                                                       \
    std::snprintf(buf_, sizeof buf_, "%s = %.3e > %.3e", #value, v_, b_); \
    ::pyitest::report(v_ <= b_, __FILE__, __LINE__, buf_);                \
  } while (0)
// expr throws Exc (not some other exception, not nothing).
#define CHECK_THROWS(expr, Exc)                                                                           \
  do {                                                                                                    \
    std::string got_ = "no exception";                                                                    \
    bool ok_ = false;                                                                                     \
    try {                                                                                                 \
      (void)(expr);                                                                                       \
    } catch (const Exc&) {                                                                                \
      ok_ = true;                                                                                         \
    } catch (const std::exception& e_) {                                                                  \
      got_ = std::string("another exception: ") + e_.what();                                              \
    }                                                                                                     \
    ::pyitest::report(ok_, __FILE__, __LINE__, std::string(#expr " should throw " #Exc "; got ") + got_); \
  } while (0)

// ---------------------------------------------------------------------------------------------------------------
// Synthetic problems
// ---------------------------------------------------------------------------------------------------------------
template <class S>
struct Problem {
  ModelSpec spec;
  RowMatrix<S> X;  // n×d
  Vector<S> y;     // n
  RowMatrix<S> W;  // K×d_eff (zero unless fitted)
};

inline ModelSpec make_spec(Family family, Index K, bool intercept, double l2, bool penalize_intercept = false) {
  ModelSpec spec;
  spec.family = family;
  spec.n_outputs = K;
  spec.fit_intercept = intercept;
  spec.penalize_intercept = penalize_intercept;
  spec.l2 = l2;
  spec.temperature = 0.5;
  spec.validate();
  return spec;
}

// Gaussian features and labels drawn from a random linear model of the family, so classes overlap (finite optimum).
template <class S>
Problem<S> make_problem(const ModelSpec& spec, Index n, Index d, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const Index K = spec.n_outputs;
  Problem<S> P;
  P.spec = spec;
  P.X.resize(n, d);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < d; ++j) P.X(i, j) = S(normal(rng));
  std::vector<double> Wtrue(std::size_t(K * d));
  for (auto& w : Wtrue) w = 0.8 * normal(rng);
  P.y.resize(n);
  for (Index i = 0; i < n; ++i) {
    std::vector<double> s(std::size_t(K), 0.0);
    for (Index a = 0; a < K; ++a)
      for (Index j = 0; j < d; ++j) s[std::size_t(a)] += Wtrue[std::size_t(a * d + j)] * double(P.X(i, j));
    switch (spec.family) {
      case Family::Logistic: P.y[i] = S(unif(rng) < 1.0 / (1.0 + std::exp(-s[0])) ? 1 : 0); break;
      case Family::SmoothHinge: P.y[i] = S(unif(rng) < 1.0 / (1.0 + std::exp(-2.0 * s[0])) ? 1 : -1); break;
      case Family::Squared: P.y[i] = S(s[0] + 0.3 * normal(rng)); break;
      case Family::Multinomial: {
        double mx = *std::max_element(s.begin(), s.end()), z = 0.0;
        for (auto& v : s) z += (v = std::exp(v - mx));
        double u = unif(rng) * z, acc = 0.0;
        Index label = K - 1;
        for (Index a = 0; a < K; ++a)
          if ((acc += s[std::size_t(a)]) >= u) {
            label = a;
            break;
          }
        P.y[i] = S(label);
        break;
      }
    }
  }
  P.W = RowMatrix<S>::Zero(K, spec.d_eff(d));
  return P;
}

template <class S>
NewtonResult<S> fit(Problem<S>& P, double tol = 1e-10) {
  const Vector<S> no_weights;
  NewtonResult<S> r = fit_newton<S>(P.spec, P.X, P.y, P.W, no_weights, tol, 100);
  P.W = r.W;
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Naive references (double precision, one example at a time)
// ---------------------------------------------------------------------------------------------------------------
using Dense = std::vector<std::vector<double>>;  // row-major p×p

inline Dense zeros(Index p) { return Dense(std::size_t(p), std::vector<double>(std::size_t(p), 0.0)); }

// x̃ = [x, 1] with an intercept.
template <class S>
std::vector<double> augmented(const ModelSpec& spec, const RowMatrix<S>& X, Index i) {
  std::vector<double> x(std::size_t(X.cols()));
  for (Index j = 0; j < X.cols(); ++j) x[std::size_t(j)] = double(X(i, j));
  if (spec.fit_intercept) x.push_back(1.0);
  return x;
}

// Loss, residual r = ∂L/∂s and curvature D = ∂²L/∂s² (K×K, row-major) of one example from its scores.
struct Example {
  double loss = 0.0;
  std::vector<double> r, D;
};

inline Example naive_example(const ModelSpec& spec, const std::vector<double>& s, double y) {
  const std::size_t K = s.size();
  Example e;
  e.r.assign(K, 0.0);
  e.D.assign(K * K, 0.0);
  const auto sigma = [](double u) { return 1.0 / (1.0 + std::exp(-u)); };
  const auto softplus = [](double u) { return u > 0 ? u + std::log1p(std::exp(-u)) : std::log1p(std::exp(u)); };
  switch (spec.family) {
    case Family::Logistic: {  // L = log(1 + e^s) − y s
      const double q = sigma(s[0]);
      e.loss = softplus(s[0]) - y * s[0];
      e.r[0] = q - y;
      e.D[0] = q * (1 - q);
      break;
    }
    case Family::SmoothHinge: {  // L = t·log(1 + exp((1 − y s)/t))
      const double t = spec.temperature, u = (1 - y * s[0]) / t, q = sigma(u);
      e.loss = t * softplus(u);
      e.r[0] = -y * q;
      e.D[0] = q * (1 - q) / t;  // y² = 1
      break;
    }
    case Family::Squared:  // L = ½(s − y)²
      e.loss = 0.5 * (s[0] - y) * (s[0] - y);
      e.r[0] = s[0] - y;
      e.D[0] = 1.0;
      break;
    case Family::Multinomial: {  // L = logsumexp(s) − s_y; r = p − e_y; D = diag(p) − ppᵀ
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0.0;
      for (double v : s) z += std::exp(v - mx);
      const double lse = mx + std::log(z);
      const std::size_t label = std::size_t(y);
      e.loss = lse - s[label];
      std::vector<double> p(K);
      for (std::size_t a = 0; a < K; ++a) p[a] = std::exp(s[a] - lse);
      for (std::size_t a = 0; a < K; ++a) {
        e.r[a] = p[a] - (a == label ? 1.0 : 0.0);
        for (std::size_t b = 0; b < K; ++b) e.D[a * K + b] = (a == b ? p[a] : 0.0) - p[a] * p[b];
      }
      break;
    }
  }
  return e;
}

template <class S>
Example naive_point(const ModelSpec& spec, const RowMatrix<S>& W, const RowMatrix<S>& X, const Vector<S>& y, Index i) {
  const std::vector<double> x = augmented(spec, X, i);
  std::vector<double> s(std::size_t(spec.n_outputs), 0.0);
  for (Index a = 0; a < spec.n_outputs; ++a)
    for (std::size_t j = 0; j < x.size(); ++j) s[std::size_t(a)] += double(W(a, Index(j))) * x[j];
  return naive_example(spec, s, double(y[i]));
}

// ∇θL(z_i) = r ⊗ x̃ (p), θ[a·d_eff + j] = W(a, j).
template <class S>
std::vector<double> naive_gradient(const ModelSpec& spec, const RowMatrix<S>& W, const RowMatrix<S>& X,
                                   const Vector<S>& y, Index i) {
  const Example e = naive_point(spec, W, X, y, i);
  const std::vector<double> x = augmented(spec, X, i);
  std::vector<double> g;
  for (Index a = 0; a < spec.n_outputs; ++a)
    for (double xj : x) g.push_back(e.r[std::size_t(a)] * xj);
  return g;
}

inline bool penalized(const ModelSpec& spec, std::size_t j, std::size_t d) {
  return !(spec.fit_intercept && !spec.penalize_intercept && j == d);
}

// ∇R = (1/n) Σ r_i ⊗ x̃_i + l2 P θ.
template <class S>
std::vector<double> naive_full_gradient(const Problem<S>& P) {
  const Index n = P.X.rows(), d = P.X.cols(), de = P.spec.d_eff(d), p = P.spec.n_params(d);
  std::vector<double> g(std::size_t(p), 0.0);
  for (Index i = 0; i < n; ++i) {
    const std::vector<double> gi = naive_gradient(P.spec, P.W, P.X, P.y, i);
    for (Index q = 0; q < p; ++q) g[std::size_t(q)] += gi[std::size_t(q)] / double(n);
  }
  for (Index a = 0; a < P.spec.n_outputs; ++a)
    for (Index j = 0; j < de; ++j)
      if (penalized(P.spec, std::size_t(j), std::size_t(d)))
        g[std::size_t(a * de + j)] += P.spec.l2 * double(P.W(a, j));
  return g;
}

// H = (1/n) Σ D_i ⊗ x̃_i x̃_iᵀ + l2 P, entry by entry.
template <class S>
Dense naive_hessian(const Problem<S>& P) {
  const Index n = P.X.rows(), d = P.X.cols(), K = P.spec.n_outputs, de = P.spec.d_eff(d), p = K * de;
  Dense H = zeros(p);
  for (Index i = 0; i < n; ++i) {
    const Example e = naive_point(P.spec, P.W, P.X, P.y, i);
    const std::vector<double> x = augmented(P.spec, P.X, i);
    for (Index a = 0; a < K; ++a)
      for (Index b = 0; b < K; ++b)
        for (Index j = 0; j < de; ++j)
          for (Index l = 0; l < de; ++l)
            H[std::size_t(a * de + j)][std::size_t(b * de + l)] +=
                e.D[std::size_t(a * K + b)] * x[std::size_t(j)] * x[std::size_t(l)] / double(n);
  }
  for (Index a = 0; a < K; ++a)
    for (Index j = 0; j < de; ++j)
      if (penalized(P.spec, std::size_t(j), std::size_t(d)))
        H[std::size_t(a * de + j)][std::size_t(a * de + j)] += P.spec.l2;
  return H;
}

// A⁻¹ by Gauss–Jordan elimination with partial pivoting (throws on a singular matrix).
inline Dense naive_inverse(Dense A) {
  const std::size_t p = A.size();
  Dense inv = zeros(Index(p));
  for (std::size_t i = 0; i < p; ++i) inv[i][i] = 1.0;
  for (std::size_t c = 0; c < p; ++c) {
    std::size_t piv = c;
    for (std::size_t r = c + 1; r < p; ++r)
      if (std::abs(A[r][c]) > std::abs(A[piv][c])) piv = r;
    if (A[piv][c] == 0.0) throw std::runtime_error("naive_inverse: singular matrix");
    std::swap(A[c], A[piv]);
    std::swap(inv[c], inv[piv]);
    const double f = 1.0 / A[c][c];
    for (std::size_t j = 0; j < p; ++j) {
      A[c][j] *= f;
      inv[c][j] *= f;
    }
    for (std::size_t r = 0; r < p; ++r) {
      if (r == c || A[r][c] == 0.0) continue;
      const double g = A[r][c];
      for (std::size_t j = 0; j < p; ++j) {
        A[r][j] -= g * A[c][j];
        inv[r][j] -= g * inv[c][j];
      }
    }
  }
  return inv;
}

inline double quad(const std::vector<double>& u, const Dense& M, const std::vector<double>& v) {
  double s = 0.0;
  for (std::size_t a = 0; a < u.size(); ++a) {
    double row = 0.0;
    for (std::size_t b = 0; b < v.size(); ++b) row += M[a][b] * v[b];
    s += u[a] * row;
  }
  return s;
}

template <class M>
double max_abs(const M& A) {
  return double(A.cwiseAbs().maxCoeff());
}

}  // namespace pyitest
