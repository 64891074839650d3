// Numerical failure is a Status value or a typed exception with fields; misuse throws std::invalid_argument
// (status.hpp):
//   - an engine on a singular Hessian is never constructed: the constructor throws NotPositiveDefiniteError (a
//     domain_error carrying the pivot, the size, the pivot's value and a suggested damping) and create() returns
//     the Status with the same diagnosis;
//   - fit_newton reports NotConverged when it runs out of iterations, NotPositiveDefinite on a singular Hessian;
//   - bad shapes, labels, weights, damping, k, indices and model settings throw std::invalid_argument;
//   - an overflow is a NonFiniteError naming what overflowed (constructor, query) or NonFinite (create()), never
//     a returned inf/NaN or a ranked NaN;
//   - a leave-one-out Newton step whose removal leaves a singular Hessian throws domain_error, as the group one.
#include <limits>

#include "test_util.hpp"

using namespace pyitest;

int main() {
  const Vector<double> no_w;
  const double nan = std::numeric_limits<double>::quiet_NaN();

  section("engine on a singular Hessian (duplicated feature, l2 = 0)");
  {
    Problem<double> P = make_problem<double>(make_spec(Family::Logistic, 1, true, 0.0), 80, 3, 1);
    P.X.col(2) = P.X.col(1);  // H = X̃ᵀ diag(c) X̃ / n is singular along e1 − e2
    P.W.setZero();
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, P.X, P.y, P.W, 0.0), NotPositiveDefiniteError);
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, P.X, P.y, P.W, 0.0), std::domain_error);
    try {
      const LinearInfluenceEngine<double> engine(P.spec, P.X, P.y, P.W, 0.0);
      CHECK(false);  // not reached
    } catch (const NotPositiveDefiniteError& e) {
      const FactorFailure& f = e.failure();
      CHECK(f.status == Status::NotPositiveDefinite);
      CHECK(f.pivot >= 1 && f.pivot < 4);  // column 2 duplicates column 1: pivot 2 up to rounding
      CHECK(f.size == 4);
      CHECK(std::isfinite(f.pivot_value) && f.pivot_value <= f.threshold);
      CHECK(std::isfinite(f.suggested_damping) && f.suggested_damping > 0.0);
      CHECK(e.train_index() == -1);
      const std::string msg = e.what();
      CHECK(msg.find("pivot " + std::to_string(f.pivot)) != std::string::npos);
      CHECK(msg.find("damping > 0") != std::string::npos);
    }
    const EngineOrStatus<double> created = LinearInfluenceEngine<double>::create(P.spec, P.X, P.y, P.W, 0.0);
    CHECK(!created.engine);
    CHECK(created.status == Status::NotPositiveDefinite);
    CHECK(created.failure.pivot >= 1 && created.failure.size == 4);
    // Damping makes it positive definite; the suggested damping does here (one null direction).
    const EngineOrStatus<double> cured =
        LinearInfluenceEngine<double>::create(P.spec, P.X, P.y, P.W, created.failure.suggested_damping);
    CHECK(cured.status == Status::Ok && cured.engine);
    const LinearInfluenceEngine<double> damped(P.spec, P.X, P.y, P.W, 1e-3);
    CHECK(damped.up_loss_train(P.X, P.y).allFinite());
  }

  section("overflow: NonFinite status, NonFiniteError from queries");
  {
    Problem<double> P = make_problem<double>(make_spec(Family::Squared, 1, true, 1e-2), 60, 3, 6);
    fit(P);
    RowMatrix<double> Xbig = P.X;
    Xbig.row(5).setConstant(1e160);  // H ∝ Σ x xᵀ overflows: an overflow, not an indefinite H
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, Xbig, P.y, P.W, 0.0), NonFiniteError);
    try {
      const LinearInfluenceEngine<double> bad(P.spec, Xbig, P.y, P.W, 0.0);
      CHECK(false);  // not reached
    } catch (const NonFiniteError& e) {
      CHECK(e.quantity().find("training Hessian") != std::string::npos);
      CHECK(std::string(e.what()).find("X_train") != std::string::npos);
    }
    CHECK(LinearInfluenceEngine<double>::create(P.spec, Xbig, P.y, P.W, 0.0).status == Status::NonFinite);
    const LinearInfluenceEngine<double> engine(P.spec, P.X, P.y, P.W, 0.0);
    const RowMatrix<double> Xt = P.X.topRows(2) * 1e200;  // finite inputs, gradients beyond double's range
    CHECK_THROWS(engine.up_loss_train(Xt, P.y.head(2)), NonFiniteError);
    try {
      (void)engine.up_loss_train(Xt, P.y.head(2));
    } catch (const NonFiniteError& e) {
      CHECK(!e.quantity().empty());
      CHECK(std::string(e.what()).find(e.quantity() + " overflowed") == 0);
    }
    CHECK_THROWS(engine.top_k(Xt, P.y.head(2), 3), NonFiniteError);
    CHECK_THROWS(engine.up_loss(Xt, P.y.head(2), P.X, P.y), NonFiniteError);
    CHECK_THROWS(engine.pert_loss(Xt, P.y.head(2), P.X, P.y), NonFiniteError);
    CHECK(engine.up_loss_train(P.X.topRows(2), P.y.head(2)).allFinite());
    // float (range ends at 3.4e38): test features of 1e19 overflow the gradients or the scores; never ranked
    Problem<float> F = make_problem<float>(make_spec(Family::Squared, 1, true, 1e-2), 60, 3, 7);
    fit(F);
    const LinearInfluenceEngine<float> engine32(F.spec, F.X, F.y, F.W, 0.0);
    const RowMatrix<float> Xt32 = F.X.topRows(2) * 1e19f;
    CHECK_THROWS(engine32.top_k(Xt32, F.y.head(2), 3), NonFiniteError);
    CHECK_THROWS(engine32.up_loss_train(Xt32, F.y.head(2)), NonFiniteError);
  }

  section("leave-one-out Newton step on a removal that leaves a singular Hessian");
  {
    // ridge, l2 = 0, no intercept, n = p = 2: without either point one equation remains for two parameters
    const ModelSpec spec = make_spec(Family::Squared, 1, false, 0.0);
    RowMatrix<double> X(2, 2);
    X << 1.0, 0.0, 0.0, 1.0;
    Vector<double> y(2);
    y << 1.0, 2.0;
    RowMatrix<double> W(1, 2);
    W << 1.0, 2.0;  // the exact fit
    const LinearInfluenceEngine<double> engine(spec, X, y, W, 0.0);
    IndexVector idx(1);
    idx << 0;
    CHECK_THROWS(engine.loo_newton(X, y, idx), std::domain_error);
    CHECK_THROWS(engine.loo_newton_group(X, y, idx), std::domain_error);
    idx << 1;
    try {
      (void)engine.loo_newton(X, y, idx);
      CHECK(false);  // not reached
    } catch (const NotPositiveDefiniteError& e) {
      CHECK(e.train_index() == 1);
      CHECK(e.failure().size == 2);
      CHECK(std::string(e.what()).find("without training point 1") != std::string::npos);
    }
    try {
      (void)engine.loo_newton_group(X, y, idx);
      CHECK(false);  // not reached
    } catch (const NotPositiveDefiniteError& e) {
      CHECK(e.failure().pivot >= 0 && e.failure().size == 2);
    }
  }

  section("fit_newton status codes");
  {
    Problem<double> P = make_problem<double>(make_spec(Family::Logistic, 1, true, 1e-3), 100, 3, 2);
    const NewtonResult<double> one = fit_newton<double>(P.spec, P.X, P.y, P.W, no_w, 1e-14, 1);
    CHECK(one.status == Status::NotConverged);
    CHECK(one.iterations == 1);
    CHECK(one.grad_norm > 1e-14);
    // Squared loss with a duplicated column and l2 = 0: the Hessian X̃ᵀX̃/n is exactly singular.
    Problem<double> Q = make_problem<double>(make_spec(Family::Squared, 1, false, 0.0), 50, 3, 3);
    Q.X.col(2) = Q.X.col(0);
    const NewtonResult<double> sing = fit_newton<double>(Q.spec, Q.X, Q.y, Q.W, no_w, 1e-10, 20);
    CHECK(sing.status == Status::NotPositiveDefinite);
    CHECK(sing.failure.status == Status::NotPositiveDefinite && sing.failure.size == 3 && sing.failure.pivot >= 0);
    // tol = 0 is allowed; a converged run still reports Ok or NotConverged (never an exception).
    const NewtonResult<double> zero = fit_newton<double>(P.spec, P.X, P.y, P.W, no_w, 0.0, 50);
    CHECK(zero.status == Status::Ok || zero.status == Status::NotConverged);
    CHECK_LE(zero.grad_norm, 1e-12);
  }

  section("status messages");
  {
    CHECK(std::string(status_message(Status::Ok)) == "ok");
    CHECK(std::string(status_message(Status::NotPositiveDefinite)).find("positive definite") != std::string::npos);
    CHECK(std::string(status_message(Status::NotConverged)).find("converge") != std::string::npos);
    CHECK(std::string(status_message(Status::NonFinite)).find("finite") != std::string::npos);
  }

  section("misuse: model settings");
  {
    CHECK_THROWS(family_from_string("hinge"), std::invalid_argument);
    CHECK(family_from_string("multinomial") == Family::Multinomial);
    ModelSpec s;
    s.family = Family::Multinomial;
    s.n_outputs = 1;
    CHECK_THROWS(s.validate(), std::invalid_argument);
    s.family = Family::Logistic;
    s.n_outputs = 2;
    CHECK_THROWS(s.validate(), std::invalid_argument);
    s.n_outputs = 1;
    s.l2 = -1.0;
    CHECK_THROWS(s.validate(), std::invalid_argument);
    s.l2 = nan;
    CHECK_THROWS(s.validate(), std::invalid_argument);
    s.l2 = 0.0;
    s.family = Family::SmoothHinge;
    s.temperature = 0.0;
    CHECK_THROWS(s.validate(), std::invalid_argument);
  }

  section("misuse: objective, hessian and fit_newton arguments");
  {
    Problem<double> P = make_problem<double>(make_spec(Family::Logistic, 1, true, 1e-2), 30, 3, 4);
    const Vector<double> short_y = P.y.head(29);
    CHECK_THROWS(check_problem<double>(P.spec, P.X, short_y, P.W, no_w), std::invalid_argument);
    CHECK_THROWS(fit_newton<double>(P.spec, P.X, short_y, P.W, no_w, 1e-10, 10), std::invalid_argument);
    const RowMatrix<double> badW = RowMatrix<double>::Zero(1, 3);  // d_eff is 4 with the intercept
    CHECK_THROWS(fit_newton<double>(P.spec, P.X, P.y, badW, no_w, 1e-10, 10), std::invalid_argument);
    RowMatrix<double> Xnan = P.X;
    Xnan(3, 1) = nan;
    CHECK_THROWS(fit_newton<double>(P.spec, Xnan, P.y, P.W, no_w, 1e-10, 10), std::invalid_argument);
    Vector<double> w = Vector<double>::Ones(30);
    w[4] = -1.0;
    CHECK_THROWS(fit_newton<double>(P.spec, P.X, P.y, P.W, w, 1e-10, 10), std::invalid_argument);
    const Vector<double> wzero = Vector<double>::Zero(30);
    CHECK_THROWS(fit_newton<double>(P.spec, P.X, P.y, P.W, wzero, 1e-10, 10), std::invalid_argument);
    const Vector<double> wshort = Vector<double>::Ones(5);
    CHECK_THROWS(check_problem<double>(P.spec, P.X, P.y, P.W, wshort),
                 std::invalid_argument);  // objective() itself trusts its caller
    Vector<double> ybad = P.y;
    ybad[7] = 2.0;  // logistic labels are 0/1
    CHECK_THROWS(hessian<double>(P.spec, P.X, ybad, P.W, no_w), std::invalid_argument);
    CHECK_THROWS(fit_newton<double>(P.spec, P.X, ybad, P.W, no_w, 1e-10, 10), std::invalid_argument);
    const RowMatrix<double> empty(0, 3);
    const Vector<double> empty_y(0);
    CHECK_THROWS(fit_newton<double>(P.spec, empty, empty_y, P.W, no_w, 1e-10, 10), std::invalid_argument);
  }

  section("misuse: engine arguments");
  {
    Problem<double> P = make_problem<double>(make_spec(Family::Multinomial, 3, true, 1e-2), 40, 3, 5);
    fit(P);
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, P.X, P.y, P.W, -1.0), std::invalid_argument);
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, P.X, P.y, P.W, nan), std::invalid_argument);
    const Vector<double> short_y = P.y.head(10);
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, P.X, short_y, P.W, 0.0), std::invalid_argument);
    Vector<double> ybad = P.y;
    ybad[0] = 3.0;  // classes are 0, 1, 2
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, P.X, ybad, P.W, 0.0), std::invalid_argument);
    ybad[0] = 0.5;
    CHECK_THROWS(LinearInfluenceEngine<double>(P.spec, P.X, ybad, P.W, 0.0), std::invalid_argument);

    const LinearInfluenceEngine<double> engine(P.spec, P.X, P.y, P.W, 0.0);
    const RowMatrix<double> X2 = RowMatrix<double>::Zero(2, 4);  // 4 features, trained on 3
    const Vector<double> y2 = Vector<double>::Zero(2);
    CHECK_THROWS(engine.up_loss_train(X2, y2), std::invalid_argument);
    CHECK_THROWS(engine.top_k(X2, y2, 1), std::invalid_argument);
    const Vector<double> y3 = Vector<double>::Zero(3);
    CHECK_THROWS(engine.up_loss(P.X.topRows(2), y3, P.X, P.y), std::invalid_argument);
    RowMatrix<double> Xt = P.X.topRows(2);
    Xt(1, 1) = nan;
    CHECK_THROWS(engine.up_loss_train(Xt, P.y.head(2)), std::invalid_argument);
    CHECK_THROWS(engine.solve(ColMatrix<double>::Ones(engine.n_params() + 1, 1)), std::invalid_argument);
    IndexVector idx(2);
    idx << 0, 40;  // out of range
    CHECK_THROWS(engine.loo_newton(P.X.topRows(1), P.y.head(1), idx), std::invalid_argument);
    CHECK_THROWS(engine.refit_without(idx, 1e-10, 10), std::invalid_argument);
    idx << 0, 1;
    CHECK_THROWS(engine.refit_without(idx, -1.0, 10), std::invalid_argument);
    CHECK_THROWS(engine.refit_without(idx, 1e-10, 0), std::invalid_argument);
  }
  return finish("test_status");
}
