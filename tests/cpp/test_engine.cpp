// LinearInfluenceEngine against naive per-point loops:
//   up_loss(i, t)      = −g_tᵀ (H + λI)⁻¹ g_i     (batched GEMM path vs one quadratic form per pair)
//   self_influence(i)  = −g_iᵀ (H + λI)⁻¹ g_i
//   up_params(i)       = −(H + λI)⁻¹ g_i
// with H assembled by the naive loop and inverted by Gauss–Jordan elimination in the test; and the streaming
// top-k against a full sort of the up_loss matrix, on a training set large enough to span several row blocks; and the
// block engines of the Dask path (built from the whole set's H for a block of rows) against the whole-set engine.
#include <iterator>
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

// Block engines (the Dask path's per-chunk engines): built from the whole set's H, n and gradient sum for a block of
// its rows, each answers as the whole-set engine does for its rows (same factorisation, so to rounding), and the
// gradient sum the whole engine reports is the naive Σ_i ∇θL(z_i).
void block_engines_vs_whole(const Case& c, unsigned seed) {
  const Index n = 150, d = 4, m = 5;
  Problem<double> P =
      make_problem<double>(make_spec(c.family, c.K, c.intercept, c.l2, c.penalize_intercept), n, d, seed);
  fit(P);
  Problem<double> T = make_problem<double>(P.spec, m, d, seed + 200);
  section(name(c) + ": block engines vs the whole set");
  const LinearInfluenceEngine<double> whole(P.spec, P.X, P.y, P.W, c.damping);
  CHECK(!whole.is_block() && whole.n_total() == n);
  const Index p = whole.n_params(), K = c.K, de = P.spec.d_eff(d);
  std::vector<double> gsum(std::size_t(p), 0.0);
  for (Index i = 0; i < n; ++i) {
    const std::vector<double> g = naive_gradient(P.spec, P.W, P.X, P.y, i);
    for (Index a = 0; a < p; ++a) gsum[std::size_t(a)] += g[std::size_t(a)];
  }
  double gscale = 1.0;
  for (double v : gsum) gscale = std::max(gscale, std::abs(v));
  for (Index a = 0; a < K; ++a)
    for (Index j = 0; j < de; ++j) CHECK_NEAR(whole.grad_sum()(a, j), gsum[std::size_t(a * de + j)], 1e-12 * gscale);

  const RowMatrix<double> up = whole.up_loss_train(T.X, T.y);
  const Vector<double> self = whole.self_influence_train();
  IndexVector all(n);
  for (Index i = 0; i < n; ++i) all[i] = i;
  const RowMatrix<double> loo = whole.loo_newton(T.X, T.y, all);
  const double up_tol = 1e-12 * max_abs(up), self_tol = 1e-12 * self.cwiseAbs().maxCoeff(),
               loo_tol = 1e-12 * max_abs(loo);
  const ColMatrix<double> H = whole.hessian();
  const Index bounds[] = {0, 40, 40, 110, n};  // blocks of 40, 0, 70 and 40 rows
  for (int blk = 0; blk + 1 < int(std::size(bounds)); ++blk) {
    const Index start = bounds[blk], b = bounds[blk + 1] - start;
    const RowMatrix<double> Xb = P.X.middleRows(start, b);
    const Vector<double> yb = P.y.segment(start, b);
    const LinearInfluenceEngine<double> part(P.spec, Xb, yb, P.W, c.damping, H, n, whole.grad_sum());
    CHECK(part.is_block() && part.n_total() == n && part.n_train() == b);
    CHECK_NEAR(part.grad_norm(), whole.grad_norm(), 1e-15 + 1e-12 * whole.grad_norm());
    const RowMatrix<double> up_b = part.up_loss_train(T.X, T.y);
    const Vector<double> self_b = part.self_influence_train();
    CHECK(up_b.rows() == b && self_b.size() == b);
    for (Index i = 0; i < b; ++i) {
      CHECK_NEAR(self_b[i], self[start + i], self_tol);
      for (Index t = 0; t < m; ++t) CHECK_NEAR(up_b(i, t), up(start + i, t), up_tol);
    }
    // s_test (through up_params of the test points) needs no training row: also from the empty block.
    const RowMatrix<double> st_b = part.up_params(T.X, T.y), st = whole.up_params(T.X, T.y);
    CHECK_LE(max_abs(RowMatrix<double>(st_b - st)) / max_abs(st), 1e-12);
    if (b == 0) continue;
    // Leave-one-out with indices local to the block: the whole set's objective (n, Σ g) all the same.
    IndexVector local(b);
    for (Index i = 0; i < b; ++i) local[i] = i;
    const RowMatrix<double> loo_b = part.loo_newton(T.X, T.y, local);
    for (Index i = 0; i < b; ++i)
      for (Index t = 0; t < m; ++t) CHECK_NEAR(loo_b(i, t), loo(start + i, t), loo_tol);
    // Top-k of the block: its k best scores, local indices.
    const Index k = std::min<Index>(3, b);
    const TopK<double> top = part.top_k(T.X, T.y, k);
    for (Index t = 0; t < m; ++t) {
      std::vector<double> col(static_cast<std::size_t>(b));
      for (Index i = 0; i < b; ++i) col[std::size_t(i)] = up(start + i, t);
      std::sort(col.begin(), col.end());
      for (Index j = 0; j < k; ++j) {
        CHECK_NEAR(top.helpful_val(t, j), col[std::size_t(j)], up_tol);
        CHECK_NEAR(top.harmful_val(t, j), col[std::size_t(b - 1 - j)], up_tol);
        CHECK_NEAR(up(start + top.helpful_idx(t, j), t), top.helpful_val(t, j), up_tol);
      }
    }
    // What needs every row refuses, naming itself.
    CHECK_THROWS(part.loo_newton_group(T.X, T.y, local.head(1)), std::invalid_argument);
    CHECK_THROWS(part.refit_without(local.head(1), 1e-10, 10), std::invalid_argument);
  }
  // Misuse: a Hessian of the wrong size, fewer total points than rows, a gradient sum of the wrong shape.
  const RowMatrix<double> X2 = P.X.topRows(10);
  const Vector<double> y2 = P.y.head(10);
  const ColMatrix<double> H_small = H.topLeftCorner(p - 1, p - 1);
  CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, X2, y2, P.W, c.damping, H_small, n, whole.grad_sum()),
               std::invalid_argument);
  CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, X2, y2, P.W, c.damping, H, 5, whole.grad_sum()),
               std::invalid_argument);
  const RowMatrix<double> g_bad = RowMatrix<double>::Zero(K + 1, de);
  CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, X2, y2, P.W, c.damping, H, n, g_bad), std::invalid_argument);
  // An indefinite given H is refused as the whole-set engine refuses one.
  const ColMatrix<double> H_neg = -H;
  CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, X2, y2, P.W, 0.0, H_neg, n, whole.grad_sum()),
               NotPositiveDefiniteError);
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
    block_engines_vs_whole(c, seed + 50);
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
