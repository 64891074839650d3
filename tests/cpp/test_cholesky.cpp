// CholeskyFactor: residuals ‖LLᵀ − (H + λI)‖ and ‖(H + λI)x − b‖ on real Hessians and random SPD matrices,
// the right-sided whitening, and the status codes of non-positive-definite, singular and non-finite input.
#include <Eigen/Cholesky>
#include <cmath>
#include <limits>

#include "test_util.hpp"

using namespace pyitest;

template <class S>
void check_factor(const ColMatrix<S>& A, double shift, double tol, const std::string& name) {
  section(name);
  const Index p = A.rows();
  CholeskyFactor<S> f;
  CHECK(f.compute(A, shift) == Status::Ok);
  CHECK(f.ok());
  CHECK(f.failed_pivot() == -1);
  CHECK(f.size() == p);
  // ‖LLᵀ − (A + λI)‖_max relative to ‖A + λI‖_max (only the lower triangle of packed() is the factor).
  ColMatrix<S> target = A;
  target.diagonal().array() += S(shift);
  const ColMatrix<S> L = f.packed().template triangularView<Eigen::Lower>();
  const ColMatrix<S> LLt = L * L.transpose();
  CHECK_LE(max_abs(ColMatrix<S>(LLt - target)) / max_abs(target), tol);
  // Solve residual ‖(A + λI)X − B‖ / (‖A + λI‖‖X‖), several right-hand sides at once.
  const ColMatrix<S> B = ColMatrix<S>::Random(p, 3);
  const ColMatrix<S> X = f.solve(B);
  CHECK_LE(max_abs(ColMatrix<S>(target * X - B)) / (max_abs(target) * max_abs(X) * double(p)), tol);
  ColMatrix<S> Bi = B;
  f.solve_in_place(Bi);
  CHECK_LE(max_abs(ColMatrix<S>(Bi - X)), 0.0);
  // Whitening: row i of G L⁻ᵀ has ‖·‖² = g_iᵀ (A + λI)⁻¹ g_i.
  RowMatrix<S> G = RowMatrix<S>::Random(4, p);
  const RowMatrix<S> G0 = G;
  f.whiten_rows_in_place(G);
  const ColMatrix<S> Y = f.solve(G0.transpose());
  for (Index i = 0; i < 4; ++i) {
    const double direct = double(G0.row(i).dot(Y.col(i)));
    CHECK_LE(std::abs(double(G.row(i).squaredNorm()) - direct) / std::abs(direct), tol);
  }
}

int main() {
  const double eps64 = std::numeric_limits<double>::epsilon(), eps32 = std::numeric_limits<float>::epsilon();
  // Hessians of real objectives (the core's own assembly) with and without damping.
  for (Family fam : {Family::Logistic, Family::Multinomial, Family::SmoothHinge, Family::Squared}) {
    const Index K = fam == Family::Multinomial ? 3 : 1;
    auto P = make_problem<double>(make_spec(fam, K, true, 1e-2, true), 300, 6, 11);
    fit(P);
    const Vector<double> no_w;
    const ColMatrix<double> H = hessian<double>(P.spec, P.X, P.y, P.W, no_w);
    for (double lambda : {0.0, 1e-3, 0.5})
      check_factor<double>(H, lambda, 200 * eps64,
                           std::string("hessian ") + family_name(fam) + " lambda=" + std::to_string(lambda));
  }
  // Random SPD matrices M Mᵀ + I of growing size (crossing Eigen's block size), float64 and float32.
  for (Index p : {1, 7, 64, 129}) {
    std::srand(unsigned(p));
    const ColMatrix<double> M = ColMatrix<double>::Random(p, p);
    const ColMatrix<double> A = M * M.transpose() + ColMatrix<double>::Identity(p, p);
    check_factor<double>(A, 0.0, 50 * double(p) * eps64, "random spd p=" + std::to_string(p));
    check_factor<float>(A.cast<float>(), 0.25, 50 * double(p) * eps32, "random spd float p=" + std::to_string(p));
  }

  section("indefinite: NotPositiveDefinite, pivot reported, solves throw");
  {
    ColMatrix<double> A = ColMatrix<double>::Identity(4, 4);
    A(2, 2) = -1.0;
    CholeskyFactor<double> f;
    CHECK(f.compute(A) == Status::NotPositiveDefinite);
    CHECK(!f.ok());
    CHECK(f.failed_pivot() == 2);
    // The diagnosis: d_2 = −1 exactly (identity elsewhere); the suggested damping passes that pivot.
    CHECK(f.failure().status == Status::NotPositiveDefinite);
    CHECK(f.failure().pivot == 2 && f.failure().size == 4);
    CHECK(f.failure().pivot_value == -1.0);
    CHECK(f.failure().suggested_damping > 1.0 && f.failure().suggested_damping < 3.0);
    CholeskyFactor<double> g;
    CHECK(g.compute(A, f.failure().suggested_damping) == Status::Ok);
    CHECK_THROWS(f.solve(ColMatrix<double>::Ones(4, 1)), std::domain_error);
    CHECK_THROWS(f.solve(ColMatrix<double>::Ones(4, 1)), NotPositiveDefiniteError);
    try {
      throw f.not_positive_definite("H", "; advice");
    } catch (const NotPositiveDefiniteError& e) {
      CHECK(e.failure().pivot == 2);
      CHECK(std::string(e.what()) == f.failure_message("H") + "; advice");
    }
    RowMatrix<double> G = RowMatrix<double>::Ones(1, 4);
    CHECK_THROWS(f.whiten_rows_in_place(G), std::domain_error);
    CHECK(f.failure_message("H").find("not positive definite") != std::string::npos);
    // Damping makes it positive definite: A + 2I has eigenvalues 3, 3, 1, 3.
    CHECK(f.compute(A, 2.0) == Status::Ok);
  }
  section("singular positive semi-definite (duplicated feature): NotPositiveDefinite");
  {
    ColMatrix<double> M = ColMatrix<double>::Random(5, 20);
    M.row(4) = M.row(3);  // two identical rows → A = M Mᵀ has rank 4
    const ColMatrix<double> A = M * M.transpose();
    CholeskyFactor<double> f;
    CHECK(f.compute(A) == Status::NotPositiveDefinite);
    CHECK(f.failed_pivot() >= 0);
    CHECK(f.failure().pivot_value <= f.failure().threshold);
    CHECK(f.failure_message("A").find("not positive definite") != std::string::npos);
    CHECK(std::isfinite(f.failure().suggested_damping));
    CholeskyFactor<double> g;
    CHECK(g.compute(A, f.failure().suggested_damping) == Status::Ok);
    CHECK(f.compute(A, 1e-3) == Status::Ok);
    CHECK(f.failure().status == Status::Ok && f.failure().pivot == -1);
  }
  section("failing pivot beyond the first block: its value is the Schur complement");
  {
    // p = 200 crosses Eigen's block size: the pivot value must come from the partially factorised row.
    const Index p = 200, j = 150;
    std::srand(7);
    const ColMatrix<double> M = ColMatrix<double>::Random(p, p);
    ColMatrix<double> A = M * M.transpose() + ColMatrix<double>::Identity(p, p);
    A(j, j) -= 1e4;
    const ColMatrix<double> B = A.topLeftCorner(j, j);
    const Vector<double> b = A.row(j).head(j).transpose();
    const double schur = A(j, j) - b.dot(B.llt().solve(b));
    CholeskyFactor<double> f;
    CHECK(f.compute(A) == Status::NotPositiveDefinite);
    CHECK(f.failure().pivot == j);
    CHECK_NEAR(f.failure().pivot_value, schur, 1e-8 * std::abs(schur));
    CholeskyFactor<double> g;
    CHECK(g.compute(A, f.failure().suggested_damping) == Status::Ok);  // the only indefinite direction
  }
  section("non-finite input: NonFinite");
  {
    ColMatrix<double> A = ColMatrix<double>::Identity(3, 3);
    A(2, 1) = std::numeric_limits<double>::quiet_NaN();
    CholeskyFactor<double> f;
    CHECK(f.compute(A) == Status::NonFinite);
    CHECK(f.failed_pivot() == 1);
    CHECK(f.failure().status == Status::NonFinite);
    CHECK(std::isnan(f.failure().suggested_damping));  // damping does not cure NaN
  }
  section("misuse: std::invalid_argument");
  {
    CholeskyFactor<double> f;
    CHECK_THROWS(f.compute(ColMatrix<double>::Identity(3, 4)), std::invalid_argument);
    CHECK_THROWS(f.compute(ColMatrix<double>::Identity(3, 3), -1.0), std::invalid_argument);
    CHECK_THROWS(f.compute(ColMatrix<double>::Identity(3, 3), std::numeric_limits<double>::infinity()),
                 std::invalid_argument);
    CHECK(f.compute(ColMatrix<double>::Identity(3, 3)) == Status::Ok);
    CHECK_THROWS(f.solve(ColMatrix<double>::Ones(4, 1)), std::invalid_argument);
    RowMatrix<double> G = RowMatrix<double>::Ones(2, 5);
    CHECK_THROWS(f.whiten_rows_in_place(G), std::invalid_argument);
  }
  return finish("test_cholesky");
}
