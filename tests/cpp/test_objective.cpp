// The training objective R(θ) = mean loss + (l2/2)‖Pθ‖², its gradient and Hessian, and the Newton trainer:
//   - objective value and ∇R against naive per-example loops,
//   - ∇²R against central finite differences of ∇R, and against the naive Σ D_i ⊗ x̃x̃ᵀ / n + l2 P,
//   - fit_newton reaches ‖∇R‖₂ ≤ 1e-10, measured by the naive gradient,
// for every family, with and without intercept, with and without example weights.
#include "test_util.hpp"

using namespace pyitest;

namespace {

struct Case {
  Family family;
  Index K;
  bool intercept;
  bool penalize_intercept;
  double l2;
};

std::string name(const Case& c) {
  return std::string(family_name(c.family)) + " K=" + std::to_string(c.K) + (c.intercept ? " +intercept" : "") +
         (c.penalize_intercept ? " (penalised)" : "") + " l2=" + std::to_string(c.l2);
}

void run(const Case& c, unsigned seed) {
  const Index n = 240, d = 5;
  Problem<double> P =
      make_problem<double>(make_spec(c.family, c.K, c.intercept, c.l2, c.penalize_intercept), n, d, seed);
  const Index de = P.spec.d_eff(d), p = P.spec.n_params(d);
  const Vector<double> no_w;
  // A generic point θ (not the optimum) for the derivative checks.
  std::srand(seed);
  P.W = 0.3 * RowMatrix<double>::Random(c.K, de);

  section(name(c) + ": objective and gradient vs naive loops");
  {
    const ObjectiveValue<double> obj = objective<double>(P.spec, P.X, P.y, P.W, no_w, true);
    double loss = 0.0, penalty = 0.0;
    for (Index i = 0; i < n; ++i) loss += naive_point(P.spec, P.W, P.X, P.y, i).loss / double(n);
    for (Index a = 0; a < c.K; ++a)
      for (Index j = 0; j < de; ++j)
        if (penalized(P.spec, std::size_t(j), std::size_t(d))) penalty += P.W(a, j) * P.W(a, j);
    CHECK_NEAR(obj.value, loss + 0.5 * c.l2 * penalty, 1e-12 * std::max(1.0, std::abs(loss)));
    const std::vector<double> g = naive_full_gradient(P);
    for (Index q = 0; q < p; ++q) CHECK_NEAR(obj.grad.data()[q], g[std::size_t(q)], 1e-12);
  }

  section(name(c) + ": Hessian vs naive sum and vs finite differences of the gradient");
  {
    const ColMatrix<double> H = hessian<double>(P.spec, P.X, P.y, P.W, no_w);
    const Dense Hn = naive_hessian(P);
    const double scale = max_abs(H);
    double err_naive = 0.0, asym = 0.0;
    for (Index a = 0; a < p; ++a)
      for (Index b = 0; b < p; ++b) {
        err_naive = std::max(err_naive, std::abs(H(a, b) - Hn[std::size_t(a)][std::size_t(b)]));
        asym = std::max(asym, std::abs(H(a, b) - H(b, a)));
      }
    CHECK_LE(err_naive / scale, 1e-13);
    CHECK_LE(asym, 0.0);  // mirrored exactly
    // Column q of ∇²R ≈ (∇R(θ + h e_q) − ∇R(θ − h e_q)) / 2h: truncation O(h²), rounding O(ε/h).
    const double h = 1e-5;
    double err_fd = 0.0;
    for (Index q = 0; q < p; ++q) {
      RowMatrix<double> Wp = P.W, Wm = P.W;
      Wp.data()[q] += h;
      Wm.data()[q] -= h;
      const RowMatrix<double> gp = objective<double>(P.spec, P.X, P.y, Wp, no_w, true).grad;
      const RowMatrix<double> gm = objective<double>(P.spec, P.X, P.y, Wm, no_w, true).grad;
      for (Index r = 0; r < p; ++r)
        err_fd = std::max(err_fd, std::abs((gp.data()[r] - gm.data()[r]) / (2 * h) - H(r, q)));
    }
    CHECK_LE(err_fd / scale, 1e-7);
  }

  section(name(c) + ": weighted objective = duplicated examples");
  {
    // Integer weights ω_i are the same as repeating example i ω_i times (weighted mean).
    Vector<double> w(n);
    for (Index i = 0; i < n; ++i) w[i] = double(i % 3);
    Index m = Index(w.sum());
    RowMatrix<double> Xr(m, d);
    Vector<double> yr(m);
    for (Index i = 0, r = 0; i < n; ++i)
      for (int k = 0; k < int(w[i]); ++k, ++r) {
        Xr.row(r) = P.X.row(i);
        yr[r] = P.y[i];
      }
    const ObjectiveValue<double> ow = objective<double>(P.spec, P.X, P.y, P.W, w, true);
    const ObjectiveValue<double> orep = objective<double>(P.spec, Xr, yr, P.W, no_w, true);
    CHECK_NEAR(ow.value, orep.value, 1e-12);
    CHECK_LE(max_abs(RowMatrix<double>(ow.grad - orep.grad)), 1e-12);
    const ColMatrix<double> Hw = hessian<double>(P.spec, P.X, P.y, P.W, w);
    const ColMatrix<double> Hrep = hessian<double>(P.spec, Xr, yr, P.W, no_w);
    CHECK_LE(max_abs(ColMatrix<double>(Hw - Hrep)) / max_abs(Hrep), 1e-13);
  }

  section(name(c) + ": fit_newton optimality");
  {
    P.W.setZero();
    const NewtonResult<double> r = fit(P, 1e-10);
    CHECK(r.status == Status::Ok);
    CHECK(r.iterations < 100);
    CHECK_LE(r.grad_norm, 1e-10);
    const std::vector<double> g = naive_full_gradient(P);
    double norm2 = 0.0;
    for (double v : g) norm2 += v * v;
    CHECK_LE(std::sqrt(norm2), 1e-10);
    // Weighted fit: optimal for the weighted objective.
    Vector<double> w(n);
    for (Index i = 0; i < n; ++i) w[i] = 0.5 + double(i % 4);
    const NewtonResult<double> rw = fit_newton<double>(P.spec, P.X, P.y, P.W, w, 1e-10, 100);
    CHECK(rw.status == Status::Ok);
    CHECK_LE(double(objective<double>(P.spec, P.X, P.y, rw.W, w, true).grad.norm()), 1e-10);
  }

  section(name(c) + ": float32 Hessian vs float64");
  {
    const RowMatrix<float> Xf = P.X.cast<float>(), Wf = P.W.cast<float>();
    const Vector<float> yf = P.y.cast<float>(), no_wf;
    const ColMatrix<float> Hf = hessian<float>(P.spec, Xf, yf, Wf, no_wf);
    const ColMatrix<double> Hd = hessian<double>(P.spec, Xf.cast<double>(), yf.cast<double>(), Wf.cast<double>(), no_w);
    CHECK_LE(max_abs(ColMatrix<double>(Hf.cast<double>() - Hd)) / max_abs(Hd), 1e-5);
  }
}

}  // namespace

int main() {
  const Case cases[] = {
      {Family::Logistic, 1, true, false, 1e-2},    {Family::Logistic, 1, false, false, 1e-3},
      {Family::Multinomial, 3, true, false, 1e-2}, {Family::Multinomial, 4, false, false, 1e-2},
      {Family::Multinomial, 3, true, true, 1e-3},  {Family::SmoothHinge, 1, true, false, 1e-2},
      {Family::Squared, 1, true, false, 0.0},      {Family::Squared, 1, true, true, 1e-1},
  };
  unsigned seed = 1;
  for (const Case& c : cases) run(c, seed++);
  return finish("test_objective");
}
