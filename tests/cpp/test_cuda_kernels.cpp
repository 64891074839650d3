// The CUDA kernels of the linear path (csrc/cuda) against the CPU core, through the public API of pyinfluence/cuda.hpp:
//   per_example   loss, residual, curvature          vs compute_scores + per_example_from_scores
//   hessian       (1/n) Σ D_i ⊗ x̃x̃ᵀ + l2P            vs pyinfluence::hessian
//   up_loss       −∇L(z_i)ᵀ s_t                        vs LinearInfluenceEngine::up_loss_train (same s_test)
//   top_k         streaming selection                  vs a full sort of up_loss (exact, ties included)
//                                                        and the CPU engine's top_k (values)
// Built twice: test_cuda_emulated (PYI_EMULATE: the kernels run on the host emulator of cuda_emulator.hpp; always
// built with the tests) and test_cuda_device (the real build, when PYINFLUENCE_CUDA found a compiler; exits 77 =
// skipped when the machine has no GPU).
#ifdef PYI_EMULATE
#include "cuda_emulator.hpp"
// (api_impl.cuh defines the public functions on top of the emulated runtime)
#include "api_impl.cuh"
#else
#include <cuda_runtime.h>

#include "pyinfluence/cuda.hpp"
#endif
#include <numeric>

#include "device_math.cuh"
#include "test_util.hpp"

using namespace pyitest;
namespace pc = pyinfluence::cuda;

// The bindings convert Family to DeviceFamily by value, and the kernels switch on detail::k*: all three agree.
static_assert(int(pc::DeviceFamily::Logistic) == int(Family::Logistic) &&
              int(Family::Logistic) == pc::detail::kLogistic);
static_assert(int(pc::DeviceFamily::Multinomial) == int(Family::Multinomial) &&
              int(Family::Multinomial) == pc::detail::kMultinomial);
static_assert(int(pc::DeviceFamily::SmoothHinge) == int(Family::SmoothHinge) &&
              int(Family::SmoothHinge) == pc::detail::kSmoothHinge);
static_assert(int(pc::DeviceFamily::Squared) == int(Family::Squared) && int(Family::Squared) == pc::detail::kSquared);

namespace {

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device array filled from / read back to the host.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t n, const T* host = nullptr) : n_(n) {
    cuda_ok(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    if (host) cuda_ok(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return p_; }
  std::vector<T> host() const {
    std::vector<T> out(n_);
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cuda_ok(cudaMemcpy(out.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
    return out;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_;
};

template <class T>
DeviceArray<T> upload(const RowMatrix<T>& A) {
  return DeviceArray<T>(std::size_t(A.size()), A.data());
}
template <class T>
DeviceArray<T> upload(const Vector<T>& v) {
  return DeviceArray<T>(std::size_t(v.size()), v.data());
}

pc::DeviceModel device_model(const ModelSpec& s) {
  pc::DeviceModel m;
  m.family = pc::DeviceFamily(int(s.family));
  m.n_outputs = s.n_outputs;
  m.fit_intercept = s.fit_intercept;
  m.penalize_intercept = s.penalize_intercept;
  m.l2 = s.l2;
  m.temperature = s.temperature;
  return m;
}
template <class T>
pc::DType dtype_of() {
  return sizeof(T) == 8 ? pc::DType::Float64 : pc::DType::Float32;
}
template <class T>
double tolerance() {
  return sizeof(T) == 8 ? 1e-12 : 2e-5;
}
std::string label(const ModelSpec& s, const char* what, std::size_t scalar) {
  return std::string(what) + " " + family_name(s.family) + " K=" + std::to_string(s.n_outputs) +
         (s.fit_intercept ? " +intercept" : "") + (scalar == 8 ? " float64" : " float32");
}

// device_math.cuh against families.cpp, value by value (both are host code here).
void device_math_vs_core() {
  section("device_math.cuh vs families.cpp");
  std::mt19937 rng(3);
  std::normal_distribution<double> normal(0.0, 4.0);
  for (Family fam : {Family::Logistic, Family::Multinomial, Family::SmoothHinge, Family::Squared}) {
    const ModelSpec spec = make_spec(fam, fam == Family::Multinomial ? 4 : 1, true, 0.0);
    pc::detail::Model M;  // what launch.cuh's make_model builds (d = 3)
    M.family = int(fam);
    M.K = int(spec.n_outputs);
    M.d = 3;
    M.de = 4;
    M.fit_intercept = 1;
    M.penalize_intercept = 0;
    M.l2 = 0.0;
    M.temperature = spec.temperature;
    for (int trial = 0; trial < 50; ++trial) {
      double s[4], rs[4], r[4], c[4], c2[4], y;
      for (int a = 0; a < 4; ++a) rs[a] = s[a] = normal(rng);
      switch (fam) {
        case Family::Logistic: y = trial % 2; break;
        case Family::SmoothHinge: y = trial % 2 ? 1 : -1; break;
        case Family::Multinomial: y = trial % 4; break;
        default: y = normal(rng);
      }
      double loss = 0;
      CHECK(pc::detail::example_in_place(M, rs, c2, y, &loss));
      const double ref = per_example_row<double>(spec, s, y, r, c);
      CHECK_NEAR(loss, ref, 1e-13 * std::max(1.0, std::abs(ref)));
      for (Index a = 0; a < spec.n_outputs; ++a) {
        CHECK_NEAR(rs[a], r[a], 1e-14);
        CHECK_NEAR(c2[a], c[a], 1e-14);
      }
    }
    double rs[4] = {0, 0, 0, 0}, c[4], loss;
    CHECK(!pc::detail::example_in_place(M, rs, c, fam == Family::Squared ? std::nan("") : 7.5, &loss));
  }
}

template <class T>
void per_example_vs_core(const ModelSpec& spec, Index n, Index d, unsigned seed) {
  section(label(spec, "per_example", sizeof(T)));
  Problem<T> P = make_problem<T>(spec, n, d, seed);
  std::srand(seed);
  P.W = RowMatrix<T>::Random(spec.n_outputs, spec.d_eff(d));
  const Index K = spec.n_outputs;
  DeviceArray<T> X = upload(P.X), y = upload(P.y), W = upload(P.W), loss(static_cast<std::size_t>(n)),
                 R(std::size_t(n * K)), C(std::size_t(n * K));
  pc::per_example(device_model(spec), dtype_of<T>(), 0, nullptr, X.get(), y.get(), W.get(), n, d, loss.get(), R.get(),
                  C.get());
  RowMatrix<T> scores;
  compute_scores<T>(spec, P.X, P.W, scores);
  Vector<T> l(n);
  RowMatrix<T> r(n, K), c(n, K);
  per_example_from_scores<T>(spec, scores, P.y, l.data(), r.data(), c.data());
  const std::vector<T> gl = loss.host(), gr = R.host(), gc = C.host();
  const double tol = tolerance<T>() * 10;
  for (Index i = 0; i < n; ++i) {
    CHECK_NEAR(gl[std::size_t(i)], l[i], tol * std::max(1.0, std::abs(double(l[i]))));
    for (Index a = 0; a < K; ++a) {
      CHECK_NEAR(gr[std::size_t(i * K + a)], r(i, a), tol);
      CHECK_NEAR(gc[std::size_t(i * K + a)], c(i, a), tol);
    }
  }
  // An invalid label is reported with its row.
  Vector<T> ybad = P.y;
  ybad[n / 2] = T(spec.family == Family::Squared ? std::nan("") : 9.5);
  DeviceArray<T> yb = upload(ybad);
  bool named_row = false;
  try {
    pc::per_example(device_model(spec), dtype_of<T>(), 0, nullptr, X.get(), yb.get(), W.get(), n, d, nullptr, R.get(),
                    C.get());
  } catch (const std::invalid_argument& e) {
    named_row = std::string(e.what()).find("y[" + std::to_string(n / 2) + "]") != std::string::npos;
  }
  CHECK(named_row);
}

template <class T>
void hessian_vs_core(const ModelSpec& spec, Index n, Index d, unsigned seed) {
  section(label(spec, "hessian", sizeof(T)) + " n=" + std::to_string(n) + " d=" + std::to_string(d));
  Problem<T> P = make_problem<T>(spec, n, d, seed);
  std::srand(seed);
  P.W = T(0.5) * RowMatrix<T>::Random(spec.n_outputs, spec.d_eff(d));
  const Index K = spec.n_outputs, p = spec.n_params(d);
  DeviceArray<T> X = upload(P.X), y = upload(P.y), W = upload(P.W), R(std::size_t(n * K)), C(std::size_t(n * K)),
                 H(std::size_t(p * p));
  const pc::DeviceModel dm = device_model(spec);
  pc::per_example(dm, dtype_of<T>(), 0, nullptr, X.get(), y.get(), W.get(), n, d, nullptr, R.get(), C.get());
  pc::hessian(dm, dtype_of<T>(), 0, nullptr, X.get(), C.get(), n, d, H.get());
  const Vector<T> no_w;
  const ColMatrix<T> ref = hessian<T>(spec, P.X, P.y, P.W, no_w);
  const std::vector<T> g = H.host();
  const double scale = max_abs(ref);
  double err = 0.0, asym = 0.0;
  for (Index a = 0; a < p; ++a)
    for (Index b = 0; b < p; ++b) {
      err = std::max(err, std::abs(double(g[std::size_t(a * p + b)]) - double(ref(a, b))));
      asym = std::max(asym, std::abs(double(g[std::size_t(a * p + b)]) - double(g[std::size_t(b * p + a)])));
    }
  CHECK_LE(err / scale, tolerance<T>() * 10);
  CHECK_LE(asym, 0.0);
}

// up_loss and top_k share the setup: a fitted model, the CPU engine, and s_test from it.
template <class T>
struct Scoring {
  Problem<T> P, Tst;
  std::unique_ptr<LinearInfluenceEngine<T>> engine;
  RowMatrix<T> S;  // m×p: the s_test vectors as rows
  Scoring(const ModelSpec& spec, Index n, Index m, Index d, unsigned seed, bool duplicates = false) {
    P = make_problem<T>(spec, n, d, seed);
    if (duplicates)  // exact copies: equal scores, ordered by index
      for (Index i = 0; i + 1 < n; i += 7) {
        P.X.row(i + 1) = P.X.row(i);
        P.y[i + 1] = P.y[i];
      }
    fit(P, sizeof(T) == 8 ? 1e-10 : 1e-4);
    Tst = make_problem<T>(spec, m, d, seed + 1);
    engine = std::make_unique<LinearInfluenceEngine<T>>(spec, P.X, P.y, P.W, 1e-3);
    S = engine->s_test(Tst.X, Tst.y).transpose();
  }
};

template <class T>
std::vector<T> device_up_loss(const Scoring<T>& sc, DeviceArray<T>& X, DeviceArray<T>& R) {
  const Index n = sc.P.X.rows(), m = sc.S.rows(), d = sc.P.X.cols();
  DeviceArray<T> S = upload(sc.S), out(std::size_t(n * m));
  pc::up_loss(device_model(sc.P.spec), dtype_of<T>(), 0, nullptr, X.get(), R.get(), n, d, S.get(), m, out.get());
  return out.host();
}

template <class T>
void scores_vs_core(const ModelSpec& spec, Index n, Index m, Index d, const std::vector<Index>& ks, unsigned seed,
                    bool duplicates = false) {
  section(label(spec, "up_loss/top_k", sizeof(T)) + " n=" + std::to_string(n) + " m=" + std::to_string(m));
  const Scoring<T> sc(spec, n, m, d, seed, duplicates);
  const Index K = spec.n_outputs;
  DeviceArray<T> X = upload(sc.P.X), y = upload(sc.P.y), W = upload(sc.P.W), R(std::size_t(n * K)),
                 C(std::size_t(n * K));
  const pc::DeviceModel dm = device_model(spec);
  pc::per_example(dm, dtype_of<T>(), 0, nullptr, X.get(), y.get(), W.get(), n, d, nullptr, R.get(), C.get());
  const std::vector<T> up = device_up_loss(sc, X, R);
  const RowMatrix<T> ref = sc.engine->up_loss_train(sc.Tst.X, sc.Tst.y);
  const double scale = max_abs(ref), tol = tolerance<T>() * 10 * scale;
  double err = 0.0;
  for (Index i = 0; i < n; ++i)
    for (Index t = 0; t < m; ++t) err = std::max(err, std::abs(double(up[std::size_t(i * m + t)]) - double(ref(i, t))));
  CHECK_LE(err, tol);

  DeviceArray<T> S = upload(sc.S);
  for (Index k : ks) {
    section(label(spec, "top_k", sizeof(T)) + " n=" + std::to_string(n) + " m=" + std::to_string(m) +
            " k=" + std::to_string(k));
    DeviceArray<std::int64_t> hi(std::size_t(m * k)), ri(std::size_t(m * k));
    DeviceArray<T> hv(std::size_t(m * k)), rv(std::size_t(m * k));
    pc::top_k(dm, dtype_of<T>(), 0, nullptr, X.get(), R.get(), n, d, S.get(), m, k, hi.get(), hv.get(), ri.get(),
              rv.get());
    const std::vector<std::int64_t> ghi = hi.host(), gri = ri.host();
    const std::vector<T> ghv = hv.host(), grv = rv.host();
    const TopK<T> cpu = sc.engine->top_k(sc.Tst.X, sc.Tst.y, k);
    for (Index t = 0; t < m; ++t) {
      // Exact: the device's own scores, fully sorted by (score, index).
      std::vector<Index> order(static_cast<std::size_t>(n));
      std::iota(order.begin(), order.end(), Index(0));
      const auto score = [&](Index i) { return up[std::size_t(i * m + t)]; };
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return score(a) < score(b); });
      std::vector<Index> order_harm(order.size());
      std::iota(order_harm.begin(), order_harm.end(), Index(0));
      std::stable_sort(order_harm.begin(), order_harm.end(), [&](Index a, Index b) { return score(a) > score(b); });
      bool exact = true;
      for (Index j = 0; j < k; ++j) {
        const std::size_t e = std::size_t(t * k + j);
        exact = exact && ghi[e] == order[std::size_t(j)] && ghv[e] == score(order[std::size_t(j)]);
        exact = exact && gri[e] == order_harm[std::size_t(j)] && grv[e] == score(order_harm[std::size_t(j)]);
        // And the CPU engine's values (its own rounding).
        CHECK_NEAR(ghv[e], cpu.helpful_val(t, j), tol);
        CHECK_NEAR(grv[e], cpu.harmful_val(t, j), tol);
      }
      CHECK(exact);
    }
  }
}

void misuse() {
  section("misuse: std::invalid_argument");
  const ModelSpec spec = make_spec(Family::Logistic, 1, true, 1e-2);
  pc::DeviceModel dm = device_model(spec);
  DeviceArray<double> X(10 * 3), R(10), S(4), out(40), v(40);
  DeviceArray<std::int64_t> i1(40), i2(40);
  const auto top = [&](std::int64_t n, std::int64_t m, std::int64_t k) {
    pc::top_k(dm, pc::DType::Float64, 0, nullptr, X.get(), R.get(), n, 3, S.get(), m, k, i1.get(), v.get(), i2.get(),
              out.get());
  };
  CHECK_THROWS(top(10, 1, 0), std::invalid_argument);
  CHECK_THROWS(top(10, 1, 11), std::invalid_argument);
  CHECK_THROWS(top(10, 0, 1), std::invalid_argument);
  CHECK_THROWS(top(0, 1, 1), std::invalid_argument);
  CHECK_THROWS(pc::up_loss(dm, pc::DType::Float64, 0, nullptr, X.get(), R.get(), 10, 0, S.get(), 1, out.get()),
               std::invalid_argument);
  CHECK_THROWS(pc::up_loss(dm, pc::DType::Float64, 0, nullptr, nullptr, R.get(), 10, 3, S.get(), 1, out.get()),
               std::invalid_argument);
  dm.n_outputs = 2;  // logistic has one output
  CHECK_THROWS(pc::hessian(dm, pc::DType::Float64, 0, nullptr, X.get(), R.get(), 10, 3, out.get()),
               std::invalid_argument);
  dm.family = pc::DeviceFamily::Multinomial;
  dm.n_outputs = 1;
  CHECK_THROWS(pc::hessian(dm, pc::DType::Float64, 0, nullptr, X.get(), R.get(), 10, 3, out.get()),
               std::invalid_argument);
}

// Every entry point checks its dimensions, model, dtype, device and pointers first: a bad argument is a status from
// check_* and std::invalid_argument from the entry point, with no kernel launched and no memory touched.
void argument_checks() {
  section("argument checks: a status, never an out-of-bounds access");
  const ModelSpec spec = make_spec(Family::Logistic, 1, true, 1e-2);
  const pc::DeviceModel dm = device_model(spec);
  const auto f64 = pc::DType::Float64;
  DeviceArray<double> X(10 * 3), y(10), W(4), R(10), C(10), S(4), out(40), v(40);
  DeviceArray<std::int64_t> i1(40), i2(40);
  CHECK(pc::check_per_example(dm, f64, 0, X.get(), y.get(), W.get(), 10, 3, nullptr, R.get(), C.get()).ok());
  CHECK(pc::check_hessian(dm, f64, 0, X.get(), C.get(), 10, 3, out.get()).ok());
  CHECK(pc::check_up_loss(dm, f64, 0, X.get(), R.get(), 10, 3, S.get(), 1, out.get()).ok());
  CHECK(
      pc::check_top_k(dm, f64, 0, X.get(), R.get(), 10, 3, S.get(), 1, 4, i1.get(), v.get(), i2.get(), out.get()).ok());
  const auto status_of = [](const pc::ArgCheck& c) { return c.status; };
  // Dimensions whose products overflow 64-bit sizes, or exceed the launch limits.
  const std::int64_t huge = std::int64_t(1) << 62;
  CHECK(status_of(pc::check_up_loss(dm, f64, 0, X.get(), R.get(), huge, 3, S.get(), 1, out.get())) ==
        pc::ArgStatus::TooLarge);
  CHECK(status_of(pc::check_up_loss(dm, f64, 0, X.get(), R.get(), 10, 3, S.get(), huge, out.get())) ==
        pc::ArgStatus::TooLarge);
  CHECK(status_of(pc::check_hessian(dm, f64, 0, X.get(), C.get(), 10, std::int64_t(1) << 40, out.get())) ==
        pc::ArgStatus::TooLarge);
  CHECK(status_of(pc::check_per_example(dm, f64, 0, X.get(), y.get(), W.get(), huge, huge, nullptr, R.get(),
                                        C.get())) == pc::ArgStatus::TooLarge);
  CHECK(status_of(pc::check_top_k(dm, f64, 0, X.get(), R.get(), 10, 3, S.get(), 1, 11, i1.get(), v.get(), i2.get(),
                                  out.get())) == pc::ArgStatus::BadShape);
  CHECK(status_of(pc::check_up_loss(dm, f64, 0, X.get(), R.get(), 0, 3, S.get(), 1, out.get())) ==
        pc::ArgStatus::BadShape);
  CHECK(status_of(pc::check_up_loss(dm, f64, 0, X.get(), R.get(), 10, -1, S.get(), 1, out.get())) ==
        pc::ArgStatus::BadShape);
  // The model, the dtype and the device.
  pc::DeviceModel bad = dm;
  bad.family = pc::DeviceFamily(7);
  CHECK(status_of(pc::check_hessian(bad, f64, 0, X.get(), C.get(), 10, 3, out.get())) == pc::ArgStatus::BadModel);
  bad = dm;
  bad.l2 = std::numeric_limits<double>::quiet_NaN();
  CHECK(status_of(pc::check_hessian(bad, f64, 0, X.get(), C.get(), 10, 3, out.get())) == pc::ArgStatus::BadModel);
  CHECK(status_of(pc::check_hessian(dm, pc::DType(5), 0, X.get(), C.get(), 10, 3, out.get())) ==
        pc::ArgStatus::BadDType);
  CHECK(status_of(pc::check_hessian(dm, f64, -1, X.get(), C.get(), 10, 3, out.get())) == pc::ArgStatus::BadDevice);
  // Pointers: null (the loss alone may be), and misaligned for the element type.
  CHECK(status_of(pc::check_per_example(dm, f64, 0, X.get(), y.get(), W.get(), 10, 3, nullptr, nullptr, C.get())) ==
        pc::ArgStatus::NullPointer);
  const void* odd = reinterpret_cast<const char*>(X.get()) + 4;  // 4-byte aligned: fine for float, not double
  CHECK(status_of(pc::check_up_loss(dm, f64, 0, odd, R.get(), 10, 3, S.get(), 1, out.get())) ==
        pc::ArgStatus::Misaligned);
  CHECK(pc::check_up_loss(dm, pc::DType::Float32, 0, odd, R.get(), 10, 3, S.get(), 1, out.get()).ok());
  const auto* odd_idx = reinterpret_cast<const std::int64_t*>(reinterpret_cast<const char*>(i1.get()) + 4);
  CHECK(status_of(pc::check_top_k(dm, f64, 0, X.get(), R.get(), 10, 3, S.get(), 1, 4, odd_idx, v.get(), i2.get(),
                                  out.get())) == pc::ArgStatus::Misaligned);
  CHECK(!pc::check_hessian(bad, f64, 0, X.get(), C.get(), 10, 3, out.get()).message.empty());
  // The entry points throw the check's message before touching anything.
#ifdef PYI_EMULATE
  const long long launches = emu::launches;
#endif
  CHECK_THROWS(pc::up_loss(dm, f64, 0, nullptr, X.get(), R.get(), huge, 3, S.get(), 1, out.get()),
               std::invalid_argument);
  pc::DeviceModel unknown = dm;
  unknown.family = pc::DeviceFamily(7);
  CHECK_THROWS(pc::per_example(unknown, f64, 0, nullptr, X.get(), y.get(), W.get(), 10, 3, nullptr, R.get(), C.get()),
               std::invalid_argument);
  CHECK_THROWS(pc::hessian(dm, f64, 0, nullptr, odd, C.get(), 10, 3, out.get()), std::invalid_argument);
#ifdef PYI_EMULATE
  CHECK(emu::launches == launches);
#endif
}

}  // namespace

int main() {
#ifndef PYI_EMULATE
  if (pc::device_count() == 0) {
    std::printf("test_cuda_device: no CUDA device (%s): skipped\n", pc::version_info().c_str());
    return 77;
  }
#endif
  device_math_vs_core();
  const ModelSpec logistic = make_spec(Family::Logistic, 1, true, 1e-2);
  const ModelSpec multinomial = make_spec(Family::Multinomial, 3, true, 1e-2);
  const ModelSpec multinomial_noint = make_spec(Family::Multinomial, 3, false, 1e-2);
  const ModelSpec hinge = make_spec(Family::SmoothHinge, 1, true, 1e-2);
  const ModelSpec squared = make_spec(Family::Squared, 1, true, 1e-1, true);
  for (const ModelSpec* s : {&logistic, &multinomial, &hinge, &squared}) {
    per_example_vs_core<double>(*s, 70, 4, 1);
    per_example_vs_core<float>(*s, 70, 4, 2);
  }
  per_example_vs_core<double>(make_spec(Family::Multinomial, 11, false, 1e-2), 30, 5, 3);  // K > 8: two class groups
  for (const ModelSpec* s : {&logistic, &multinomial, &multinomial_noint, &hinge, &squared}) {
    hessian_vs_core<double>(*s, 90, 5, 4);
    hessian_vs_core<float>(*s, 90, 5, 5);
  }
  hessian_vs_core<double>(multinomial, 40, 40, 6);                  // several 32-wide tiles per class block
  hessian_vs_core<double>(logistic, 50, 200, 7);                    // 64-wide tiles
  hessian_vs_core<double>(logistic, 1100, 3, 8);                    // rows split over several blocks (atomics)
  scores_vs_core<double>(logistic, 1000, 3, 4, {1, 5, 64, 70}, 9);  // several chunks; k above the 64 slots per block
  scores_vs_core<double>(multinomial, 150, 20, 4, {3, 150}, 10);    // two test tiles; k = n
  scores_vs_core<double>(hinge, 300, 2, 3, {4}, 11, /*duplicates=*/true);
  scores_vs_core<float>(logistic, 400, 5, 4, {6}, 12);
  scores_vs_core<float>(multinomial_noint, 130, 17, 4, {2}, 13, /*duplicates=*/true);
  misuse();
  argument_checks();
#ifdef PYI_EMULATE
  return finish("test_cuda_emulated");
#else
  return finish("test_cuda_device");
#endif
}
