// The example of README.md ("Using the C++ core"), built and run with the consumer so that it keeps compiling.
#include <pyinfluence/pyinfluence.hpp>

#include <iostream>

namespace pi = pyinfluence;

// clang-format off: the code of README.md as it is printed there
int main() {
  pi::RowMatrix<double> X = pi::RowMatrix<double>::Random(500, 4);                 // n×d training features
  pi::Vector<double> y = ((X.col(0) + 0.5 * X.col(1)).array() > 0).cast<double>().matrix();  // labels 0/1
  pi::ModelSpec spec;                                                              // logistic, with intercept
  spec.family = pi::Family::Logistic;
  spec.l2 = 1e-2;
  const pi::RowMatrix<double> W0 = pi::RowMatrix<double>::Zero(1, 5);             // K×(d+1) start
  auto fit = pi::fit_newton<double>(spec, X, y, W0, pi::Vector<double>(), 1e-10, 100);
  if (fit.status != pi::Status::Ok) return 1;
  pi::LinearInfluenceEngine<double> engine(spec, X, y, fit.W, /*damping=*/0.0);    // H factorised once (or throws)
  auto top = engine.top_k(X.topRows(1), y.head(1), 5);                            // test point: row 0
  std::cout << "most harmful: " << top.harmful_idx(0, 0) << ", up_loss " << top.harmful_val(0, 0) << "\n";
}
// clang-format on
