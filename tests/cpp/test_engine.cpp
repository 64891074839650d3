// LinearInfluenceEngine against naive per-point loops:
//   up_loss(i, t)      = −g_tᵀ (H + λI)⁻¹ g_i     (batched GEMM path vs one quadratic form per pair)
//   self_influence(i)  = −g_iᵀ (H + λI)⁻¹ g_i
//   up_params(i)       = −(H + λI)⁻¹ g_i
// with H assembled by the naive loop and inverted by Gauss–Jordan elimination in the test; and the streaming
// top-k against a full sort of the up_loss matrix, on a training set large enough to span several row blocks.
#include <numeric>

#include "test_util.hpp"

using namespace pyitest;

namespace {

struct Case {
  Family family;
  Index K;
  bool intercept;
  bool penalize_intercept;
  double l2, damping;
};

std::string name(const Case& c) {
  return std::string(family_name(c.family)) + " K=" + std::to_string(c.K) + (c.intercept ? " +intercept" : "") +
         (c.penalize_intercept ? " (penalised)" : "") + " l2=" + std::to_string(c.l2) +
         " damping=" + std::to_string(c.damping);
}

template <class S>
void scores_vs_naive(const Case& c, unsigned seed, double tol) {
  const Index n = 150, d = 4, m = 7;
  Problem<S> P = make_problem<S>(make_spec(c.family, c.K, c.intercept, c.l2, c.penalize_intercept), n, d, seed);
  fit(P, sizeof(S) == 8 ? 1e-10 : 1e-5);
  Problem<S> T = make_problem<S>(P.spec, m, d, seed + 100);  // test points
  section(name(c) + (sizeof(S) == 8 ? " float64" : " float32") + ": scores vs naive loop");

  const LinearInfluenceEngine<S> engine(P.spec, P.X, P.y, P.W, c.damping);
  const Index p = engine.n_params();
  // Reference inverse of H + λI. Undamped multinomial with an unpenalised intercept: H is singular along the shift
  // u of all intercepts; the answer is the pseudo-inverse one, H⁺g = (H + uuᵀ)⁻¹g since every gradient g ⟂ u.
  Dense A = naive_hessian(P);
  const Index de = P.spec.d_eff(d);
  for (Index q = 0; q < p; ++q) A[std::size_t(q)][std::size_t(q)] += c.damping;
  if (c.damping == 0.0 && P.spec.has_intercept_gauge())
    for (Index a = 0; a < c.K; ++a)
      for (Index b = 0; b < c.K; ++b) A[std::size_t(a * de + d)][std::size_t(b * de + d)] += 1.0;
  const Dense Ainv = naive_inverse(A);

  std::vector<std::vector<double>> gtr, gte;
  for (Index i = 0; i < n; ++i) gtr.push_back(naive_gradient(P.spec, P.W, P.X, P.y, i));
  for (Index t = 0; t < m; ++t) gte.push_back(naive_gradient(P.spec, P.W, T.X, T.y, t));

  // Every pair (i, t), one quadratic form at a time.
  RowMatrix<double> ref(n, m);
  for (Index i = 0; i < n; ++i)
    for (Index t = 0; t < m; ++t) ref(i, t) = -quad(gte[std::size_t(t)], Ainv, gtr[std::size_t(i)]);
  const double scale = max_abs(ref);
  const RowMatrix<S> all = engine.up_loss_train(T.X, T.y);
  CHECK(all.rows() == n && all.cols() == m);
  CHECK_LE(max_abs(RowMatrix<double>(all.template cast<double>() - ref)) / scale, tol);
  // The explicit training side (a subset, in a different order) gives the same rows.
  const Index k = 9;
  RowMatrix<S> Xs(k, d);
  Vector<S> ys(k);
  std::vector<Index> rows(static_cast<std::size_t>(k));
  for (Index j = 0; j < k; ++j) {
    rows[std::size_t(j)] = (17 * j + 5) % n;
    Xs.row(j) = P.X.row(rows[std::size_t(j)]);
    ys[j] = P.y[rows[std::size_t(j)]];
  }
  const RowMatrix<S> sub = engine.up_loss(T.X, T.y, Xs, ys);
  for (Index j = 0; j < k; ++j)
    for (Index t = 0; t < m; ++t) CHECK_NEAR(sub(j, t), ref(rows[std::size_t(j)], t), tol * scale);

  // Self-influence −g_iᵀ A⁻¹ g_i ≤ 0.
  const Vector<S> self = engine.self_influence_train();
  double self_scale = 0.0;
  for (Index i = 0; i < n; ++i) self_scale = std::max(self_scale, quad(gtr[std::size_t(i)], Ainv, gtr[std::size_t(i)]));
  for (Index i = 0; i < n; ++i) {
    const double r = -quad(gtr[std::size_t(i)], Ainv, gtr[std::size_t(i)]);
    CHECK_NEAR(self[i], r, tol * self_scale);
    CHECK(self[i] <= S(0));
  }
  const Vector<S> self_sub = engine.self_influence(Xs, ys);
  for (Index j = 0; j < k; ++j) CHECK_NEAR(self_sub[j], self[rows[std::size_t(j)]], tol * self_scale);

  // up_params(i) = −A⁻¹ g_i.
  const RowMatrix<S> up = engine.up_params(Xs, ys);
  double up_scale = 0.0;
  std::vector<std::vector<double>> up_ref;
  for (Index j = 0; j < k; ++j) {
    std::vector<double> v(std::size_t(p), 0.0);
    for (Index a = 0; a < p; ++a)
      for (Index b = 0; b < p; ++b)
        v[std::size_t(a)] -=
            Ainv[std::size_t(a)][std::size_t(b)] * gtr[std::size_t(rows[std::size_t(j)])][std::size_t(b)];
    for (double x : v) up_scale = std::max(up_scale, std::abs(x));
    up_ref.push_back(v);
  }
  for (Index j = 0; j < k; ++j)
    for (Index a = 0; a < p; ++a) CHECK_NEAR(up(j, a), up_ref[std::size_t(j)][std::size_t(a)], tol * up_scale);

  // The engine's per-example gradients and Hessian are the naive ones.
  const RowMatrix<S> G = engine.gradients(Xs, ys);
  for (Index j = 0; j < k; ++j)
    for (Index a = 0; a < p; ++a) CHECK_NEAR(G(j, a), gtr[std::size_t(rows[std::size_t(j)])][std::size_t(a)], tol);
  CHECK(engine.grad_norm() <= (sizeof(S) == 8 ? 1e-9 : 1e-3));
}

// Streaming top-k vs a full sort of the up_loss matrix (n×m) for each test point.
void top_k_vs_sort(Index n, Index m, Index k, unsigned seed) {
  section("top_k n=" + std::to_string(n) + " m=" + std::to_string(m) + " k=" + std::to_string(k));
  Problem<double> P = make_problem<double>(make_spec(Family::Logistic, 1, true, 1e-2), n, 3, seed);
  // Exact duplicates of some rows: equal scores, where only the index decides the order.
  for (Index i = 0; i + 1 < n; i += 97) {
    P.X.row(i + 1) = P.X.row(i);
    P.y[i + 1] = P.y[i];
  }
  fit(P);
  Problem<double> T = make_problem<double>(P.spec, m, 3, seed + 1);
  const LinearInfluenceEngine<double> engine(P.spec, P.X, P.y, P.W, 0.0);
  const RowMatrix<double> full = engine.up_loss_train(T.X, T.y);
  const TopK<double> top = engine.top_k(T.X, T.y, k);
  CHECK(top.helpful_idx.rows() == m && top.helpful_idx.cols() == k);
  CHECK(top.harmful_val.rows() == m && top.harmful_val.cols() == k);
  const double tol = 1e-12 * max_abs(full);
  for (Index t = 0; t < m; ++t) {
    std::vector<Index> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), Index(0));
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return full(a, t) < full(b, t); });
    std::vector<char> in_helpful(std::size_t(n), 0), in_harmful(std::size_t(n), 0);
    for (Index j = 0; j < k; ++j) {
      const Index hi = Index(top.helpful_idx(t, j)), ha = Index(top.harmful_idx(t, j));
      CHECK(hi >= 0 && hi < n && ha >= 0 && ha < n);
      if (!(hi >= 0 && hi < n && ha >= 0 && ha < n)) return;
      // Values: the j-th smallest / largest of the full sort, and the value of the returned index.
      CHECK_NEAR(top.helpful_val(t, j), full(order[std::size_t(j)], t), tol);
      CHECK_NEAR(top.harmful_val(t, j), full(order[std::size_t(n - 1 - j)], t), tol);
      CHECK_NEAR(top.helpful_val(t, j), full(hi, t), tol);
      CHECK_NEAR(top.harmful_val(t, j), full(ha, t), tol);
      CHECK(!in_helpful[std::size_t(hi)] && !in_harmful[std::size_t(ha)]);  // no index twice
      in_helpful[std::size_t(hi)] = in_harmful[std::size_t(ha)] = 1;
      if (j > 0) {  // sorted; equal values in increasing index order
        CHECK(
            top.helpful_val(t, j - 1) < top.helpful_val(t, j) ||
            (top.helpful_val(t, j - 1) == top.helpful_val(t, j) && top.helpful_idx(t, j - 1) < top.helpful_idx(t, j)));
        CHECK(
            top.harmful_val(t, j - 1) > top.harmful_val(t, j) ||
            (top.harmful_val(t, j - 1) == top.harmful_val(t, j) && top.harmful_idx(t, j - 1) < top.harmful_idx(t, j)));
      }
    }
    // Nothing left out scores better than the last one kept.
    const double last_helpful = top.helpful_val(t, k - 1), last_harmful = top.harmful_val(t, k - 1);
    for (Index i = 0; i < n; ++i) {
      if (!in_helpful[std::size_t(i)]) CHECK(full(i, t) >= last_helpful - tol);
      if (!in_harmful[std::size_t(i)]) CHECK(full(i, t) <= last_harmful + tol);
    }
  }
}

}  // namespace

int main() {
  const Case cases[] = {
      {Family::Logistic, 1, true, false, 1e-2, 0.0},     {Family::Logistic, 1, false, false, 1e-3, 1e-2},
      {Family::Multinomial, 3, true, false, 1e-2, 0.0},  // undamped: the intercept gauge (pseudo-inverse answer)
      {Family::Multinomial, 3, true, false, 1e-2, 1e-3}, {Family::Multinomial, 4, true, true, 1e-3, 0.0},
      {Family::SmoothHinge, 1, true, false, 1e-2, 0.0},  {Family::Squared, 1, true, false, 0.0, 0.0},
  };
  unsigned seed = 1;
  for (const Case& c : cases) {
    scores_vs_naive<double>(c, seed, 1e-10);
    scores_vs_naive<float>(c, seed, 2e-3);
    ++seed;
  }
  // Small; one block with k = n; and n·m large enough that the top-k streams over several row blocks (the block
  // holds ~16 MB of scores: 512 test points → 2048 rows).
  top_k_vs_sort(50, 3, 5, 7);
  top_k_vs_sort(40, 2, 40, 8);
  top_k_vs_sort(5000, 512, 10, 9);
  top_k_vs_sort(5000, 512, 1, 10);
  section("top_k misuse");
  {
    Problem<double> P = make_problem<double>(make_spec(Family::Logistic, 1, true, 1e-2), 20, 3, 3);
    const LinearInfluenceEngine<double> engine(P.spec, P.X, P.y, P.W, 0.0);
    CHECK_THROWS(engine.top_k(P.X, P.y, 0), std::invalid_argument);
    CHECK_THROWS(engine.top_k(P.X, P.y, 21), std::invalid_argument);
  }
  return finish("test_engine");
}
