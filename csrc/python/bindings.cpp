// pyinfluence._core: the one pybind11 file (the C++ core itself has no Python in it). It validates array layouts
// (C-contiguous, matching dtype — no silent conversion), releases the GIL around every kernel, and maps C++ errors
// to Python exceptions: std::invalid_argument → ValueError; pyinfluence::NotPositiveDefiniteError →
// pyinfluence.errors.NotPositiveDefiniteError and pyinfluence::NonFiniteError → pyinfluence.errors.NonFiniteError,
// constructed with their diagnosis as keyword fields (pivot, size, min_pivot, suggested_damping, train_index;
// what), so that Python code reads fields instead of parsing messages.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstddef>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "pyinfluence/pyinfluence.hpp"
#ifdef PYINFLUENCE_HAS_CUDA
#include "pyinfluence/cuda.hpp"
#endif

namespace py = pybind11;
using namespace pyinfluence;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// The enums Python sees (_core.Status, _core.Family): each table lists an enum's values in order with the name
// Python gives them. The static_asserts tie every entry to the C++ enumerator of that value, so that renumbering,
// reordering or extending an enum breaks the build here instead of mislabelling values in Python.
// ---------------------------------------------------------------------------------------------------------------
constexpr std::pair<Status, const char*> kStatusNames[] = {
    {Status::Ok, "ok"},
    {Status::NotPositiveDefinite, "not_positive_definite"},
    {Status::NotConverged, "not_converged"},
    {Status::NonFinite, "non_finite"},
};
constexpr std::pair<Family, const char*> kFamilyNames[] = {
    {Family::Logistic, "logistic"},
    {Family::Multinomial, "multinomial"},
    {Family::SmoothHinge, "smooth_hinge"},
    {Family::Squared, "squared"},
};

// Whether entry i of a table holds the enumerator of value i.
template <class E, std::size_t N>
constexpr bool indexed_by_value(const std::pair<E, const char*> (&table)[N]) {
  for (std::size_t i = 0; i < N; ++i)
    if (static_cast<std::size_t>(table[i].first) != i) return false;
  return true;
}

static_assert(static_cast<int>(Status::Ok) == 0 && static_cast<int>(Status::NotPositiveDefinite) == 1 &&
                  static_cast<int>(Status::NotConverged) == 2 && static_cast<int>(Status::NonFinite) == 3,
              "pyinfluence::Status changed: update kStatusNames, _core.pyi and the Python tests of _core.Status");
static_assert(std::size(kStatusNames) == 4 && indexed_by_value(kStatusNames),
              "kStatusNames must list every pyinfluence::Status in value order");
static_assert(static_cast<int>(Family::Logistic) == 0 && static_cast<int>(Family::Multinomial) == 1 &&
                  static_cast<int>(Family::SmoothHinge) == 2 && static_cast<int>(Family::Squared) == 3,
              "pyinfluence::Family changed: update kFamilyNames, _core.pyi and the Python tests of _core.Family");
static_assert(std::size(kFamilyNames) == 4 && indexed_by_value(kFamilyNames),
              "kFamilyNames must list every pyinfluence::Family in value order");
#ifdef PYINFLUENCE_HAS_CUDA
// cuda_binding::device_model converts Family to cuda::DeviceFamily by value.
static_assert(static_cast<int>(cuda::DeviceFamily::Logistic) == static_cast<int>(Family::Logistic) &&
                  static_cast<int>(cuda::DeviceFamily::Multinomial) == static_cast<int>(Family::Multinomial) &&
                  static_cast<int>(cuda::DeviceFamily::SmoothHinge) == static_cast<int>(Family::SmoothHinge) &&
                  static_cast<int>(cuda::DeviceFamily::Squared) == static_cast<int>(Family::Squared),
              "cuda::DeviceFamily must have the values of pyinfluence::Family");
#endif

template <class S>
constexpr const char* dtype_name() {
  return sizeof(S) == 8 ? "float64" : "float32";
}

template <class S>
void check_array(const py::array& a, const char* name, int ndim) {
  // isinstance<array_t<S>> compares dtypes by equivalence (PyArray_EquivTypes): an array unpickled in another process
  // (a Dask worker) has an equal dtype that is not numpy's canonical instance, so identity would refuse it.
  if (!py::isinstance<py::array_t<S>>(a))
    throw std::invalid_argument(std::string(name) + " must be a " + dtype_name<S>() + " array; got dtype " +
                                std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + " must be " + std::to_string(ndim) + "-dimensional; got " +
                                std::to_string(a.ndim()) + " dimensions");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
}

template <class S>
Eigen::Map<const RowMatrix<S>> matrix_arg(const py::array& a, const char* name) {
  check_array<S>(a, name, 2);
  return {static_cast<const S*>(a.data()), Index(a.shape(0)), Index(a.shape(1))};
}

template <class S>
Eigen::Map<const Vector<S>> vector_arg(const py::array& a, const char* name) {
  check_array<S>(a, name, 1);
  return {static_cast<const S*>(a.data()), Index(a.shape(0))};
}

Eigen::Map<const IndexVector> index_arg(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<std::int64_t>>(a) || a.ndim() != 1 || !(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + " must be a 1-dimensional C-contiguous int64 array");
  return {static_cast<const std::int64_t*>(a.data()), Index(a.shape(0))};
}

// Hands an Eigen matrix to numpy without copying: the array owns a heap copy moved from the result.
template <class Mat>
py::array to_numpy(Mat&& m) {
  using Plain = std::decay_t<Mat>;
  using S = typename Plain::Scalar;
  auto* owned = new Plain(std::move(m));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<Plain*>(p); });
  const py::ssize_t rows = owned->rows(), cols = owned->cols(), sz = sizeof(S);
  std::vector<py::ssize_t> strides =
      Plain::IsRowMajor ? std::vector<py::ssize_t>{cols * sz, sz} : std::vector<py::ssize_t>{sz, rows * sz};
  return py::array(py::dtype::of<S>(), {rows, cols}, strides, owned->data(), free_when_done);
}

template <class S>
py::array vector_to_numpy(Vector<S>&& v) {
  auto* owned = new Vector<S>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<Vector<S>*>(p); });
  return py::array(py::dtype::of<S>(), {py::ssize_t(owned->size())}, {py::ssize_t(sizeof(S))}, owned->data(),
                   free_when_done);
}

// Dispatch on the dtype of the first array argument.
bool array_is_float32(const py::array& a) { return py::isinstance<py::array_t<float>>(a); }

template <class S>
const ConstVectorRef<S> weights_arg(const py::object& w, Vector<S>& storage) {
  if (w.is_none()) return storage;  // empty: all ones
  return vector_arg<S>(w.cast<py::array>(), "sample_weight");
}

template <class S>
py::tuple per_example_impl(const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta) {
  auto Xm = matrix_arg<S>(X, "X");
  auto ym = vector_arg<S>(y, "y");
  auto Wm = matrix_arg<S>(theta, "theta");
  Vector<S> empty;
  Vector<S> loss;
  RowMatrix<S> R, C, scores;
  {
    py::gil_scoped_release release;
    check_problem<S>(spec, Xm, ym, Wm, empty);
    compute_scores<S>(spec, Xm, Wm, scores);
    loss.resize(Xm.rows());
    R.resize(Xm.rows(), spec.n_outputs);
    C.resize(Xm.rows(), spec.n_outputs);
    per_example_from_scores<S>(spec, scores, ym, loss.data(), R.data(), C.data());
  }
  return py::make_tuple(vector_to_numpy<S>(std::move(loss)), to_numpy(std::move(R)), to_numpy(std::move(scores)));
}

template <class S>
py::tuple objective_impl(const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta,
                         const py::object& sample_weight) {
  auto Xm = matrix_arg<S>(X, "X");
  auto ym = vector_arg<S>(y, "y");
  auto Wm = matrix_arg<S>(theta, "theta");
  Vector<S> storage;
  const auto w = weights_arg<S>(sample_weight, storage);
  ObjectiveValue<S> out;
  {
    py::gil_scoped_release release;
    check_problem<S>(spec, Xm, ym, Wm, w);
    out = objective<S>(spec, Xm, ym, Wm, w, true);
  }
  return py::make_tuple(out.value, to_numpy(std::move(out.grad)));
}

template <class S>
py::array hessian_impl(const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta,
                       const py::object& sample_weight) {
  auto Xm = matrix_arg<S>(X, "X");
  auto ym = vector_arg<S>(y, "y");
  auto Wm = matrix_arg<S>(theta, "theta");
  Vector<S> storage;
  const auto w = weights_arg<S>(sample_weight, storage);
  ColMatrix<S> H;
  {
    py::gil_scoped_release release;
    check_problem<S>(spec, Xm, ym, Wm, w);
    H = hessian<S>(spec, Xm, ym, Wm, w);
  }
  return to_numpy(std::move(H));
}

template <class S>
py::tuple fit_newton_impl(const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta0,
                          const py::object& sample_weight, double tol, int max_iter) {
  auto Xm = matrix_arg<S>(X, "X");
  auto ym = vector_arg<S>(y, "y");
  auto Wm = matrix_arg<S>(theta0, "theta0");
  if (!(tol >= 0.0)) throw std::invalid_argument("tol must be >= 0");
  if (max_iter < 0) throw std::invalid_argument("max_iter must be >= 0");
  Vector<S> storage;
  const auto w = weights_arg<S>(sample_weight, storage);
  NewtonResult<S> res;
  {
    py::gil_scoped_release release;
    res = fit_newton<S>(spec, Xm, ym, Wm, w, tol, max_iter);
  }
  if (res.status == Status::NotPositiveDefinite)
    throw NotPositiveDefiniteError(
        "the training Hessian became singular or indefinite during Newton's method (iteration " +
            std::to_string(res.iterations) + ": Cholesky failed at pivot " + std::to_string(res.failure.pivot) +
            " of " + std::to_string(res.failure.size) + "; e.g. l2 = 0 with collinear features or separable classes)",
        res.failure);
  if (res.status == Status::NonFinite)
    throw std::invalid_argument(
        "the training objective became NaN or inf during Newton's method; check the scale of X");
  const bool converged = res.grad_norm <= tol;
  return py::make_tuple(to_numpy(std::move(res.W)), res.iterations, res.grad_norm, converged);
}

// The Python-facing engine: one of two typed engines, plus references to the arrays it reads.
class PyLinearEngine {
 public:
  PyLinearEngine(const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta, double damping)
      : float32_(array_is_float32(X)), X_(X), y_(y) {
    if (float32_)
      make<float>(spec, theta, damping);
    else
      make<double>(spec, theta, damping);
  }

  // The engine of a block of the training rows, from the whole set's Hessian H, size n_total and gradient sum
  // (LinearInfluenceEngine's block constructor; the Dask path builds one per chunk).
  static std::unique_ptr<PyLinearEngine> block(const ModelSpec& spec, const py::array& X, const py::array& y,
                                               const py::array& theta, double damping, const py::array& H,
                                               Index n_total, const py::array& grad_sum) {
    std::unique_ptr<PyLinearEngine> out(new PyLinearEngine(X, y));
    if (out->float32_)
      out->make_block<float>(spec, theta, damping, H, n_total, grad_sum);
    else
      out->make_block<double>(spec, theta, damping, H, n_total, grad_sum);
    return out;
  }

  bool is_float32() const { return float32_; }
  std::string dtype() const { return float32_ ? "float32" : "float64"; }
  Index n_train() const { return float32_ ? e32_->n_train() : e64_->n_train(); }
  Index n_total() const { return float32_ ? e32_->n_total() : e64_->n_total(); }
  py::array grad_sum() const {
    if (float32_) return to_numpy(RowMatrix<float>(e32_->grad_sum()));
    return to_numpy(RowMatrix<double>(e64_->grad_sum()));
  }
  Index n_params() const { return float32_ ? e32_->n_params() : e64_->n_params(); }
  double grad_norm() const { return float32_ ? e32_->grad_norm() : e64_->grad_norm(); }

  py::array hessian() const {
    if (float32_) return to_numpy(ColMatrix<float>(e32_->hessian()));
    return to_numpy(ColMatrix<double>(e64_->hessian()));
  }
  py::array gradients(const py::array& X, const py::array& y) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Xm = matrix_arg<S>(X, "X");
      auto ym = vector_arg<S>(y, "y");
      RowMatrix<S> G;
      {
        py::gil_scoped_release r;
        G = e.gradients(Xm, ym);
      }
      return to_numpy(std::move(G));
    });
  }
  py::array solve(const py::array& B) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Bm = matrix_arg<S>(B, "B");
      ColMatrix<S> out;
      {
        py::gil_scoped_release r;
        out = e.solve(ColMatrix<S>(Bm));
      }
      return to_numpy(std::move(out));
    });
  }
  py::array up_params(const py::array& X, const py::array& y) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Xm = matrix_arg<S>(X, "X");
      auto ym = vector_arg<S>(y, "y");
      RowMatrix<S> out;
      {
        py::gil_scoped_release r;
        out = e.up_params(Xm, ym);
      }
      return to_numpy(std::move(out));
    });
  }
  py::array up_loss(const py::array& Xt, const py::array& yt, const py::object& X, const py::object& y) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Xtm = matrix_arg<S>(Xt, "X_test");
      auto ytm = vector_arg<S>(yt, "y_test");
      RowMatrix<S> out;
      if (X.is_none()) {
        py::gil_scoped_release r;
        out = e.up_loss_train(Xtm, ytm);
      } else {
        auto Xm = matrix_arg<S>(X.cast<py::array>(), "X");
        auto ym = vector_arg<S>(y.cast<py::array>(), "y");
        py::gil_scoped_release r;
        out = e.up_loss(Xtm, ytm, Xm, ym);
      }
      return to_numpy(std::move(out));
    });
  }
  py::array pert_loss(const py::array& Xt, const py::array& yt, const py::object& X, const py::object& y) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Xtm = matrix_arg<S>(Xt, "X_test");
      auto ytm = vector_arg<S>(yt, "y_test");
      const py::array Xa = X.is_none() ? X_ : X.cast<py::array>();
      const py::array ya = y.is_none() ? y_ : y.cast<py::array>();
      auto Xm = matrix_arg<S>(Xa, "X");
      auto ym = vector_arg<S>(ya, "y");
      RowMatrix<S> out;
      {
        py::gil_scoped_release r;
        out = e.pert_loss(Xtm, ytm, Xm, ym);
      }
      const py::ssize_t k = Xm.rows(), m = Xtm.rows(), d = Xm.cols();
      return to_numpy(std::move(out)).reshape({k, m, d});
    });
  }
  py::array self_influence(const py::object& X, const py::object& y) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      Vector<S> out;
      if (X.is_none()) {
        py::gil_scoped_release r;
        out = e.self_influence_train();
      } else {
        auto Xm = matrix_arg<S>(X.cast<py::array>(), "X");
        auto ym = vector_arg<S>(y.cast<py::array>(), "y");
        py::gil_scoped_release r;
        out = e.self_influence(Xm, ym);
      }
      return vector_to_numpy<S>(std::move(out));
    });
  }
  py::tuple top_k(const py::array& Xt, const py::array& yt, Index k) const {
    return call<py::tuple>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Xtm = matrix_arg<S>(Xt, "X_test");
      auto ytm = vector_arg<S>(yt, "y_test");
      TopK<S> out;
      {
        py::gil_scoped_release r;
        out = e.top_k(Xtm, ytm, k);
      }
      return py::make_tuple(to_numpy(std::move(out.helpful_idx)), to_numpy(std::move(out.helpful_val)),
                            to_numpy(std::move(out.harmful_idx)), to_numpy(std::move(out.harmful_val)));
    });
  }
  py::array loo_newton(const py::array& Xt, const py::array& yt, const py::array& idx) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Xtm = matrix_arg<S>(Xt, "X_test");
      auto ytm = vector_arg<S>(yt, "y_test");
      auto im = index_arg(idx, "train_idx");
      RowMatrix<S> out;
      {
        py::gil_scoped_release r;
        out = e.loo_newton(Xtm, ytm, im);
      }
      return to_numpy(std::move(out));
    });
  }
  py::tuple refit_without(const py::array& idx, double tol, int max_iter) const {
    return call<py::tuple>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto im = index_arg(idx, "train_idx");
      NewtonResult<S> res;
      {
        py::gil_scoped_release r;
        res = e.refit_without(im, tol, max_iter);
      }
      if (res.status == Status::NotPositiveDefinite)
        throw NotPositiveDefiniteError(
            "the leave-out training Hessian is singular or indefinite (Cholesky failed at "
            "pivot " +
                std::to_string(res.failure.pivot) + " of " + std::to_string(res.failure.size) + ")",
            res.failure);
      if (res.status == Status::NonFinite) throw std::invalid_argument("the leave-out objective became NaN or inf");
      const bool converged = res.status == Status::Ok;
      return py::make_tuple(to_numpy(std::move(res.W)), res.iterations, res.grad_norm, converged);
    });
  }
  py::array loo_newton_group(const py::array& Xt, const py::array& yt, const py::array& idx) const {
    return call<py::array>([&](auto& e, auto tag) {
      using S = decltype(tag);
      auto Xtm = matrix_arg<S>(Xt, "X_test");
      auto ytm = vector_arg<S>(yt, "y_test");
      auto im = index_arg(idx, "train_idx");
      Vector<S> out;
      {
        py::gil_scoped_release r;
        out = e.loo_newton_group(Xtm, ytm, im);
      }
      return vector_to_numpy<S>(std::move(out));
    });
  }

 private:
  PyLinearEngine(const py::array& X, const py::array& y) : float32_(array_is_float32(X)), X_(X), y_(y) {}

  template <class S>
  void make_block(const ModelSpec& spec, const py::array& theta, double damping, const py::array& H, Index n_total,
                  const py::array& grad_sum) {
    auto Xm = matrix_arg<S>(X_, "X_block");
    auto ym = vector_arg<S>(y_, "y_block");
    auto Wm = matrix_arg<S>(theta, "theta");
    auto Hm = matrix_arg<S>(H, "H");
    auto Gm = matrix_arg<S>(grad_sum, "grad_sum");
    std::unique_ptr<LinearInfluenceEngine<S>> e;
    {
      py::gil_scoped_release r;
      const ColMatrix<S> Hc = Hm;  // one copy into column-major storage (the engine keeps its own)
      e = std::make_unique<LinearInfluenceEngine<S>>(spec, Xm, ym, Wm, damping, Hc, n_total, Gm);
    }
    if constexpr (std::is_same_v<S, float>)
      e32_ = std::move(e);
    else
      e64_ = std::move(e);
  }

  template <class S>
  void make(const ModelSpec& spec, const py::array& theta, double damping) {
    auto Xm = matrix_arg<S>(X_, "X_train");
    auto ym = vector_arg<S>(y_, "y_train");
    auto Wm = matrix_arg<S>(theta, "theta");
    std::unique_ptr<LinearInfluenceEngine<S>> e;
    {
      py::gil_scoped_release r;
      e = std::make_unique<LinearInfluenceEngine<S>>(spec, Xm, ym, Wm, damping);
    }
    if constexpr (std::is_same_v<S, float>)
      e32_ = std::move(e);
    else
      e64_ = std::move(e);
  }
  template <class R, class F>
  R call(F&& f) const {
    if (float32_) return f(*e32_, float{});
    return f(*e64_, double{});
  }

  bool float32_;
  py::array X_, y_;  // keep the training arrays alive: the engine reads them in place
  std::unique_ptr<LinearInfluenceEngine<float>> e32_;
  std::unique_ptr<LinearInfluenceEngine<double>> e64_;
};

// Cholesky factor of a symmetric matrix A + damping·I, for solvers written in Python (the torch path's Exact).
class PyCholeskyFactor {
 public:
  PyCholeskyFactor(const py::array& A, double damping) : float32_(array_is_float32(A)) {
    if (float32_)
      make<float>(A, damping);
    else
      make<double>(A, damping);
  }
  Index size() const { return float32_ ? f32_.size() : f64_.size(); }
  py::dtype dtype() const { return float32_ ? py::dtype::of<float>() : py::dtype::of<double>(); }
  py::array solve(const py::array& B) const {
    if (float32_) return solve_impl<float>(f32_, B);
    return solve_impl<double>(f64_, B);
  }

 private:
  template <class S>
  void make(const py::array& A, double damping) {
    auto Am = matrix_arg<S>(A, "A");
    if (Am.rows() != Am.cols())
      throw std::invalid_argument("A must be square, got shape (" + std::to_string(Am.rows()) + ", " +
                                  std::to_string(Am.cols()) + ")");
    CholeskyFactor<S>& f = factor<S>();
    Status st;
    {
      py::gil_scoped_release r;
      // One copy into column-major storage (A's lower triangle as numpy indexes it), then factorised in place.
      st = f.compute(ColMatrix<S>(Am), damping);
    }
    if (st == Status::NonFinite) throw std::invalid_argument(f.failure_message("A + damping*I"));
    if (st != Status::Ok) throw f.not_positive_definite("A + damping*I");
  }
  template <class S>
  CholeskyFactor<S>& factor() {
    if constexpr (std::is_same_v<S, float>)
      return f32_;
    else
      return f64_;
  }
  template <class S>
  py::array solve_impl(const CholeskyFactor<S>& f, const py::array& B) const {
    if (B.ndim() == 1) {
      auto b = vector_arg<S>(B, "B");
      if (b.size() != f.size())
        throw std::invalid_argument("B must have " + std::to_string(f.size()) + " entries, got " +
                                    std::to_string(b.size()));
      ColMatrix<S> X = b;
      {
        py::gil_scoped_release r;
        f.solve_in_place(X);
      }
      Vector<S> out = Eigen::Map<const Vector<S>>(X.data(), X.rows());
      return vector_to_numpy<S>(std::move(out));
    }
    auto Bm = matrix_arg<S>(B, "B");
    if (Bm.rows() != f.size())
      throw std::invalid_argument("B must have " + std::to_string(f.size()) + " rows, got " +
                                  std::to_string(Bm.rows()));
    ColMatrix<S> X;
    {
      py::gil_scoped_release r;
      X = Bm;
      f.solve_in_place(X);
    }
    return to_numpy(std::move(X));
  }

  bool float32_;
  CholeskyFactor<float> f32_;
  CholeskyFactor<double> f64_;
};

}  // namespace

#ifdef PYINFLUENCE_HAS_CUDA
// ---------------------------------------------------------------------------------------------------------------
// CUDA kernels (pyinfluence/cuda.hpp). Arrays arrive as raw device pointers (torch's tensor.data_ptr()) and the stream
// as an integer (torch.cuda.current_stream().cuda_stream); pyinfluence/linear/cuda.py makes the tensors contiguous,
// of one dtype, on the device. Each entry point of pyinfluence/cuda.hpp checks its dimensions, model, dtype and
// pointers before any launch (check_*: std::invalid_argument → ValueError), so here the arguments are passed
// through, with the GIL released.
// ---------------------------------------------------------------------------------------------------------------
namespace cuda_binding {

cuda::DeviceModel device_model(const ModelSpec& s) {
  s.validate();
  cuda::DeviceModel m;
  m.family = cuda::DeviceFamily(int(s.family));
  m.n_outputs = s.n_outputs;
  m.fit_intercept = s.fit_intercept;
  m.penalize_intercept = s.penalize_intercept;
  m.l2 = s.l2;
  m.temperature = s.temperature;
  return m;
}

cuda::DType dtype(const std::string& name) {
  if (name == "float64") return cuda::DType::Float64;
  if (name == "float32") return cuda::DType::Float32;
  throw std::invalid_argument("dtype must be 'float32' or 'float64', got '" + name + "'");
}

template <class P = void>
P* ptr(std::uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

void add_to_module(py::module_& m) {
  m.def("cuda_device_count", &cuda::device_count, "CUDA devices the driver reports (0 without a driver or GPU)");
  m.def("cuda_version", &cuda::version_info, "CUDA runtime (built in) and driver versions");
  m.def(
      "cuda_per_example",
      [](const ModelSpec& spec, const std::string& dt, int device, std::uintptr_t stream, std::uintptr_t X,
         std::uintptr_t y, std::uintptr_t W, std::int64_t n, std::int64_t d, std::uintptr_t loss, std::uintptr_t R,
         std::uintptr_t C) {
        const auto model = device_model(spec);
        const auto t = dtype(dt);
        py::gil_scoped_release release;
        cuda::per_example(model, t, device, ptr(stream), ptr(X), ptr(y), ptr(W), n, d, ptr(loss), ptr(R), ptr(C));
      },
      py::arg("spec"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("X"), py::arg("y"), py::arg("W"),
      py::arg("n"), py::arg("d"), py::arg("loss"), py::arg("residual"), py::arg("curvature"),
      "loss (n, or 0), residual (n, K), curvature (n, K) from device arrays X (n, d), y (n), W (K, d_eff)");
  m.def(
      "cuda_hessian",
      [](const ModelSpec& spec, const std::string& dt, int device, std::uintptr_t stream, std::uintptr_t X,
         std::uintptr_t C, std::int64_t n, std::int64_t d, std::uintptr_t H) {
        const auto model = device_model(spec);
        const auto t = dtype(dt);
        py::gil_scoped_release release;
        cuda::hessian(model, t, device, ptr(stream), ptr(X), ptr(C), n, d, ptr(H));
      },
      py::arg("spec"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("X"), py::arg("curvature"),
      py::arg("n"), py::arg("d"), py::arg("H"), "H (p, p) = (1/n) sum_i D_i (x) x_i x_i^T + l2 P on the device");
  m.def(
      "cuda_up_loss",
      [](const ModelSpec& spec, const std::string& dt, int device, std::uintptr_t stream, std::uintptr_t X,
         std::uintptr_t R, std::int64_t n, std::int64_t d, std::uintptr_t S, std::int64_t m_test, std::uintptr_t out) {
        const auto model = device_model(spec);
        const auto t = dtype(dt);
        py::gil_scoped_release release;
        cuda::up_loss(model, t, device, ptr(stream), ptr(X), ptr(R), n, d, ptr(S), m_test, ptr(out));
      },
      py::arg("spec"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("X"), py::arg("residual"),
      py::arg("n"), py::arg("d"), py::arg("S"), py::arg("m"), py::arg("out"),
      "out (n, m) = -grad L(z_i)^T s_t for the rows s_t of S (m, p)");
  m.def(
      "cuda_top_k",
      [](const ModelSpec& spec, const std::string& dt, int device, std::uintptr_t stream, std::uintptr_t X,
         std::uintptr_t R, std::int64_t n, std::int64_t d, std::uintptr_t S, std::int64_t m_test, std::int64_t k,
         std::uintptr_t help_idx, std::uintptr_t help_val, std::uintptr_t harm_idx, std::uintptr_t harm_val) {
        const auto model = device_model(spec);
        const auto t = dtype(dt);
        py::gil_scoped_release release;
        cuda::top_k(model, t, device, ptr(stream), ptr(X), ptr(R), n, d, ptr(S), m_test, k, ptr<std::int64_t>(help_idx),
                    ptr(help_val), ptr<std::int64_t>(harm_idx), ptr(harm_val));
      },
      py::arg("spec"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("X"), py::arg("residual"),
      py::arg("n"), py::arg("d"), py::arg("S"), py::arg("m"), py::arg("k"), py::arg("helpful_idx"),
      py::arg("helpful_val"), py::arg("harmful_idx"), py::arg("harmful_val"),
      "streaming top-k of up_loss into (m, k) device arrays (int64 indices, values of dtype)");
}

}  // namespace cuda_binding
#endif  // PYINFLUENCE_HAS_CUDA

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyinfluence C++ core (Eigen): exact influence functions for linear models";
  m.attr("__version__") = PYINFLUENCE_VERSION;
  m.attr("has_openmp") = has_openmp();
#ifdef PYINFLUENCE_HAS_CUDA
  m.attr("has_cuda") = true;  // the CUDA kernels were compiled in (a GPU may still be absent: cuda_device_count())
  cuda_binding::add_to_module(m);
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("blas") = PYINFLUENCE_BLAS_NAME;
  m.def("partition_threads", &partition_threads, py::arg("rows"), py::arg("work_flops"),
        "Threads a row-partitioned kernel (Hessian assembly, up_loss, self-influence) would use for this work "
        "(1: one thread, or the single-accumulator path with a multi-threaded BLAS)");
  m.def("parallel_min_flops", &parallel_min_flops,
        "Work (flops) below which a core call runs on one thread, its BLAS included (default 2e9: ~50 ms of "
        "one core's work, measured no faster split on 2 cores)");
  m.def("set_parallel_min_flops", &set_parallel_min_flops, py::arg("flops"),
        "Sets parallel_min_flops() (e.g. lower on machines with many idle cores; 0 = always split)");
  m.def("max_threads", &max_threads, "Threads the core's OpenMP regions may use");
  m.def("blas_threads", &blas_threads, "Threads of the core's own BLAS pool (-1: a BLAS pyinfluence does not control)");
  m.def("set_max_threads", &set_max_threads, py::arg("n"),
        "Threads for the core's OpenMP regions and its own BLAS pool (numpy's and torch's pools are not touched)");

  // Error mapping to pyinfluence.errors' classes (NotPositiveDefiniteError: a ValueError; NonFiniteError: an
  // ArithmeticError), constructed with keyword fields. If pyinfluence.errors cannot be imported, that import error
  // is what Python sees.
  py::register_exception_translator([](std::exception_ptr p) {
    const auto raise = [](const char* name, const char* message, const py::dict& fields) {
      try {
        const py::object cls = py::module_::import("pyinfluence.errors").attr(name);
        const py::object exc = cls(message, **fields);
        PyErr_SetObject(cls.ptr(), exc.ptr());
      } catch (py::error_already_set& err) {
        err.restore();
      }
    };
    // NaN (unknown) and −1 (none) become None.
    const auto number = [](double x) { return std::isnan(x) ? py::object(py::none()) : py::object(py::float_(x)); };
    const auto index = [](Index i) { return i < 0 ? py::object(py::none()) : py::object(py::int_(i)); };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const NotPositiveDefiniteError& e) {
      const FactorFailure& f = e.failure();
      py::dict fields;
      fields["pivot"] = index(f.pivot);
      fields["size"] = f.size > 0 ? py::object(py::int_(f.size)) : py::object(py::none());
      fields["min_pivot"] = number(f.pivot_value);
      fields["suggested_damping"] = number(f.suggested_damping);
      fields["train_index"] = index(e.train_index());
      raise("NotPositiveDefiniteError", e.what(), fields);
    } catch (const NonFiniteError& e) {
      py::dict fields;
      fields["what"] = e.quantity();
      raise("NonFiniteError", e.what(), fields);
    }
  });

  // The enums whose values Python sees (their names are also the strings of ModelSpec.family / family_name).
  py::enum_<Status> status_enum(m, "Status", "Numerical outcome codes of the C++ core (pyinfluence::Status)");
  for (const auto& [value, name] : kStatusNames) status_enum.value(name, value);
  py::enum_<Family> family_enum(m, "Family", "Loss families of linear models (pyinfluence::Family)");
  for (const auto& [value, name] : kFamilyNames) family_enum.value(name, value);

  py::class_<ModelSpec>(m, "ModelSpec")
      .def(py::init([](const std::string& family, Index n_outputs, bool fit_intercept, bool penalize_intercept,
                       double l2, double temperature) {
             ModelSpec s;
             s.family = family_from_string(family);
             s.n_outputs = n_outputs;
             s.fit_intercept = fit_intercept;
             s.penalize_intercept = penalize_intercept;
             s.l2 = l2;
             s.temperature = temperature;
             s.validate();
             return s;
           }),
           py::arg("family"), py::arg("n_outputs"), py::arg("fit_intercept"), py::arg("penalize_intercept"),
           py::arg("l2"), py::arg("temperature") = 1.0)
      .def_property_readonly("family",
                             [](const ModelSpec& s) { return std::string(kFamilyNames[int(s.family)].second); })
      .def_readonly("n_outputs", &ModelSpec::n_outputs)
      .def_readonly("fit_intercept", &ModelSpec::fit_intercept)
      .def_readonly("penalize_intercept", &ModelSpec::penalize_intercept)
      .def_readonly("l2", &ModelSpec::l2)
      .def_readonly("temperature", &ModelSpec::temperature)
      .def("__repr__", [](const ModelSpec& s) {
        return "ModelSpec(family='" + std::string(family_name(s.family)) +
               "', n_outputs=" + std::to_string(s.n_outputs) +
               ", fit_intercept=" + (s.fit_intercept ? "True" : "False") +
               ", penalize_intercept=" + (s.penalize_intercept ? "True" : "False") + ", l2=" + std::to_string(s.l2) +
               ", temperature=" + std::to_string(s.temperature) + ")";
      });

  m.def(
      "per_example",
      [](const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta) {
        return array_is_float32(X) ? per_example_impl<float>(spec, X, y, theta)
                                   : per_example_impl<double>(spec, X, y, theta);
      },
      py::arg("spec"), py::arg("X"), py::arg("y"), py::arg("theta"),
      "(loss (n,), residual dL/ds (n,K), scores (n,K)) for each example");
  m.def(
      "objective",
      [](const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta, const py::object& w) {
        return array_is_float32(X) ? objective_impl<float>(spec, X, y, theta, w)
                                   : objective_impl<double>(spec, X, y, theta, w);
      },
      py::arg("spec"), py::arg("X"), py::arg("y"), py::arg("theta"), py::arg("sample_weight") = py::none(),
      "(R(theta), grad R (K, d_eff)); R = weighted mean loss + (l2/2)||P theta||^2");
  m.def(
      "hessian",
      [](const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta, const py::object& w) {
        return array_is_float32(X) ? hessian_impl<float>(spec, X, y, theta, w)
                                   : hessian_impl<double>(spec, X, y, theta, w);
      },
      py::arg("spec"), py::arg("X"), py::arg("y"), py::arg("theta"), py::arg("sample_weight") = py::none(),
      "Hessian of R (p, p), l2 included");
  m.def(
      "fit_newton",
      [](const ModelSpec& spec, const py::array& X, const py::array& y, const py::array& theta0, const py::object& w,
         double tol, int max_iter) {
        return array_is_float32(X) ? fit_newton_impl<float>(spec, X, y, theta0, w, tol, max_iter)
                                   : fit_newton_impl<double>(spec, X, y, theta0, w, tol, max_iter);
      },
      py::arg("spec"), py::arg("X"), py::arg("y"), py::arg("theta0"), py::arg("sample_weight") = py::none(),
      py::arg("tol") = 1e-10, py::arg("max_iter") = 100,
      "Newton's method with line search: (theta (K, d_eff), n_iter, grad_norm, converged)");

  py::class_<PyCholeskyFactor>(m, "CholeskyFactor",
                               "Cholesky factor L Lᵀ = A + damping·I of a symmetric (p, p) float32/float64 matrix "
                               "(C-contiguous; its lower triangle is read). Raises NotPositiveDefiniteError naming the "
                               "failing pivot, also for numerically singular matrices (pivot² ≤ p·eps·max diag).")
      .def(py::init<const py::array&, double>(), py::arg("A"), py::arg("damping") = 0.0)
      .def_property_readonly("size", &PyCholeskyFactor::size)
      .def_property_readonly("dtype", &PyCholeskyFactor::dtype)
      .def("solve", &PyCholeskyFactor::solve, py::arg("B"),
           "(A + damping·I)⁻¹ B for B of shape (p,) or (p, r), same dtype; returns the same shape");

  py::class_<PyLinearEngine>(m, "LinearEngine")
      .def(py::init<const ModelSpec&, const py::array&, const py::array&, const py::array&, double>(), py::arg("spec"),
           py::arg("X_train"), py::arg("y_train"), py::arg("theta"), py::arg("damping") = 0.0)
      .def_property_readonly("dtype", &PyLinearEngine::dtype)
      .def_static("block", &PyLinearEngine::block, py::arg("spec"), py::arg("X_block"), py::arg("y_block"),
                  py::arg("theta"), py::arg("damping"), py::arg("H"), py::arg("n_total"), py::arg("grad_sum"),
                  "The engine of a block of the training rows (e.g. one Dask chunk), from the whole training set's "
                  "Hessian H (p, p), size n_total and gradient sum (K, d_eff); X_block may have no rows")
      .def_property_readonly("n_train", &PyLinearEngine::n_train, "rows held by this engine (a block: its rows)")
      .def_property_readonly("n_total", &PyLinearEngine::n_total, "n of the training objective (the whole set)")
      .def("grad_sum", &PyLinearEngine::grad_sum, "sum over all n_total training points of grad L (K, d_eff)")
      .def_property_readonly("n_params", &PyLinearEngine::n_params)
      .def_property_readonly("grad_norm", &PyLinearEngine::grad_norm, "||grad R(theta)||_2 on the training set")
      .def("hessian", &PyLinearEngine::hessian)
      .def("gradients", &PyLinearEngine::gradients, py::arg("X"), py::arg("y"))
      .def("solve", &PyLinearEngine::solve, py::arg("B"))
      .def("up_params", &PyLinearEngine::up_params, py::arg("X"), py::arg("y"))
      .def("up_loss", &PyLinearEngine::up_loss, py::arg("X_test"), py::arg("y_test"), py::arg("X") = py::none(),
           py::arg("y") = py::none())
      .def("pert_loss", &PyLinearEngine::pert_loss, py::arg("X_test"), py::arg("y_test"), py::arg("X") = py::none(),
           py::arg("y") = py::none())
      .def("self_influence", &PyLinearEngine::self_influence, py::arg("X") = py::none(), py::arg("y") = py::none())
      .def("top_k", &PyLinearEngine::top_k, py::arg("X_test"), py::arg("y_test"), py::arg("k"))
      .def("loo_newton", &PyLinearEngine::loo_newton, py::arg("X_test"), py::arg("y_test"), py::arg("train_idx"))
      .def("refit_without", &PyLinearEngine::refit_without, py::arg("train_idx"), py::arg("tol") = 1e-10,
           py::arg("max_iter") = 100,
           "exact retraining without train_idx (removed together), warm-started at theta: "
           "(theta, n_iter, grad_norm, converged)")
      .def("loo_newton_group", &PyLinearEngine::loo_newton_group, py::arg("X_test"), py::arg("y_test"),
           py::arg("train_idx"));
}
