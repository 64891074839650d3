// A C++ program that explains one prediction of its own logistic model with the installed pyinfluence core, then
// checks the answer against the same quantities computed here by hand (plain loops and a dense solve):
//   H = (1/n) Σ σ_i(1 − σ_i) x̃_i x̃_iᵀ + l2 P,   g_i = (σ_i − y_i) x̃_i,   up_loss(i) = −g_testᵀ H⁻¹ g_i.
#include <pyinfluence/pyinfluence.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

namespace pi = pyinfluence;

static int failures = 0;
static void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

// Solves A x = b by Gaussian elimination with partial pivoting (A is p×p, row-major, copied).
static std::vector<double> dense_solve(std::vector<double> A, std::vector<double> b) {
  const std::size_t p = b.size();
  for (std::size_t c = 0; c < p; ++c) {
    std::size_t piv = c;
    for (std::size_t r = c + 1; r < p; ++r)
      if (std::abs(A[r * p + c]) > std::abs(A[piv * p + c])) piv = r;
    for (std::size_t j = 0; j < p; ++j) std::swap(A[c * p + j], A[piv * p + j]);
    std::swap(b[c], b[piv]);
    for (std::size_t r = c + 1; r < p; ++r) {
      const double f = A[r * p + c] / A[c * p + c];
      for (std::size_t j = c; j < p; ++j) A[r * p + j] -= f * A[c * p + j];
      b[r] -= f * b[c];
    }
  }
  std::vector<double> x(p);
  for (std::size_t c = p; c-- > 0;) {
    double s = b[c];
    for (std::size_t j = c + 1; j < p; ++j) s -= A[c * p + j] * x[j];
    x[c] = s / A[c * p + c];
  }
  return x;
}

int main() {
  // Data: n points in d dimensions with noisy labels from a linear rule.
  const pi::Index n = 400, d = 5, k = 5;
  std::mt19937 rng(42);
  std::normal_distribution<double> normal;
  pi::RowMatrix<double> X(n, d);
  pi::Vector<double> y(n);
  for (pi::Index i = 0; i < n; ++i) {
    double s = 0.0;
    for (pi::Index j = 0; j < d; ++j) s += (X(i, j) = normal(rng)) * (j % 2 ? 1.0 : -0.5);
    y[i] = (s + 0.7 * normal(rng)) > 0 ? 1.0 : 0.0;
  }
  pi::RowMatrix<double> x_test(1, d);
  for (pi::Index j = 0; j < d; ++j) x_test(0, j) = normal(rng);
  pi::Vector<double> y_test(1);
  y_test[0] = 1.0;

  // Fit by Newton's method, then explain the test prediction.
  pi::ModelSpec spec;
  spec.family = pi::Family::Logistic;
  spec.fit_intercept = true;
  spec.l2 = 1e-2;
  const pi::Vector<double> no_weights;
  const pi::RowMatrix<double> W0 = pi::RowMatrix<double>::Zero(1, d + 1);
  const pi::NewtonResult<double> fit = pi::fit_newton<double>(spec, X, y, W0, no_weights, 1e-10, 100);
  expect(fit.status == pi::Status::Ok, "Newton converged");
  const pi::LinearInfluenceEngine<double> engine(spec, X, y, fit.W, /*damping=*/0.0);  // throws unless H is PD
  {
    const auto created = pi::LinearInfluenceEngine<double>::create(spec, X, y, fit.W, /*damping=*/0.0);
    expect(created.status == pi::Status::Ok && created.engine != nullptr, "H is positive definite (create())");
  }
  const pi::RowMatrix<double> scores = engine.up_loss_train(x_test, y_test);  // n×1
  const pi::TopK<double> top = engine.top_k(x_test, y_test, k);

  // Independently: gradient, Hessian and solve written out here.
  const std::size_t p = std::size_t(d + 1);
  const auto xt = [&](const pi::RowMatrix<double>& M, pi::Index i, std::size_t j) {
    return j < std::size_t(d) ? M(i, pi::Index(j)) : 1.0;
  };
  const auto sigma_of = [&](const pi::RowMatrix<double>& M, pi::Index i) {
    double s = 0.0;
    for (std::size_t j = 0; j < p; ++j) s += fit.W(0, pi::Index(j)) * xt(M, i, j);
    return 1.0 / (1.0 + std::exp(-s));
  };
  std::vector<double> H(p * p, 0.0), grad(p, 0.0);
  for (pi::Index i = 0; i < n; ++i) {
    const double q = sigma_of(X, i);
    for (std::size_t a = 0; a < p; ++a) {
      grad[a] += (q - y[i]) * xt(X, i, a) / double(n);
      for (std::size_t b = 0; b < p; ++b) H[a * p + b] += q * (1 - q) * xt(X, i, a) * xt(X, i, b) / double(n);
    }
  }
  for (std::size_t j = 0; j < p - 1; ++j) {  // the intercept is not penalised
    H[j * p + j] += spec.l2;
    grad[j] += spec.l2 * fit.W(0, pi::Index(j));
  }
  double gnorm = 0.0;
  for (double g : grad) gnorm += g * g;
  expect(std::sqrt(gnorm) <= 1e-10, "the fitted parameters are optimal (||grad R|| <= 1e-10)");

  std::vector<double> g_test(p);
  const double q_test = sigma_of(x_test, 0);
  for (std::size_t j = 0; j < p; ++j) g_test[j] = (q_test - y_test[0]) * xt(x_test, 0, j);
  const std::vector<double> s_test = dense_solve(H, g_test);  // H⁻¹ ∇L(z_test)
  std::vector<double> expected(static_cast<std::size_t>(n));
  double scale = 0.0, err = 0.0;
  for (pi::Index i = 0; i < n; ++i) {
    const double r = sigma_of(X, i) - y[i];
    double dot = 0.0;
    for (std::size_t j = 0; j < p; ++j) dot += s_test[j] * r * xt(X, i, j);
    expected[std::size_t(i)] = -dot;
    scale = std::max(scale, std::abs(dot));
  }
  for (pi::Index i = 0; i < n; ++i) err = std::max(err, std::abs(scores(i, 0) - expected[std::size_t(i)]));
  expect(err <= 1e-10 * scale, "up_loss matches -g_test^T H^-1 g_i");

  std::vector<pi::Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), pi::Index(0));
  std::sort(order.begin(), order.end(),
            [&](pi::Index a, pi::Index b) { return expected[std::size_t(a)] < expected[std::size_t(b)]; });
  for (pi::Index j = 0; j < k; ++j) {
    expect(top.helpful_idx(0, j) == order[std::size_t(j)], "helpful index matches the sorted reference");
    expect(top.harmful_idx(0, j) == order[std::size_t(n - 1 - j)], "harmful index matches the sorted reference");
    expect(std::abs(top.helpful_val(0, j) - expected[std::size_t(order[std::size_t(j)])]) <= 1e-10 * scale,
           "helpful value");
  }
  std::printf("most helpful: %lld (%.4g), most harmful: %lld (%.4g); max |error| %.2e; %d failures\n",
              static_cast<long long>(top.helpful_idx(0, 0)), top.helpful_val(0, 0),
              static_cast<long long>(top.harmful_idx(0, 0)), top.harmful_val(0, 0), err, failures);
  return failures == 0 ? 0 : 1;
}
