// Per-example maths of the loss families and the top-k ordering, as __host__ __device__ functions: compiled into the
// kernels by nvcc and, unchanged, by the host compiler in tests/cpp (test_cuda_emulated.cpp), which checks them
// against the core's families.cpp. Formulas (families.hpp): with scores s = W x̃,
//   logistic      L = softplus(s) − y s,               r = σ(s) − y,        c = σ(s)(1 − σ(s))
//   smooth hinge  L = t·softplus(u), u = (1 − y s)/t,  r = −y σ(u),         c = σ(u)(1 − σ(u))/t
//   squared       L = ½(s − y)²,                       r = s − y,           c = 1
//   multinomial   L = logsumexp(s) − s_y,              r = p − e_y,         c = p = softmax(s)  (D = diag(p) − ppᵀ)
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYI_HD __host__ __device__ __forceinline__
#else
#include <math.h>

#include <cmath>
#define PYI_HD inline
#endif

namespace pyinfluence {
namespace cuda {
namespace detail {

enum : int { kLogistic = 0, kMultinomial = 1, kSmoothHinge = 2, kSquared = 3 };

// Everything a kernel needs to know about the model, passed by value.
struct Model {
  int family;
  int K;   // outputs
  int d;   // features
  int de;  // d + intercept
  int fit_intercept;
  int penalize_intercept;
  double l2;
  double temperature;
};

// Float and double overloads that resolve the same way in device code and on the host.
PYI_HD float m_exp(float x) { return expf(x); }
PYI_HD double m_exp(double x) { return exp(x); }
PYI_HD float m_log(float x) { return logf(x); }
PYI_HD double m_log(double x) { return log(x); }
PYI_HD float m_log1p(float x) { return log1pf(x); }
PYI_HD double m_log1p(double x) { return log1p(x); }
PYI_HD float m_floor(float x) { return floorf(x); }
PYI_HD double m_floor(double x) { return floor(x); }

// log(1 + e^u) without overflow; σ(u) = 1/(1 + e^−u) without overflow.
template <class T>
PYI_HD T softplus(T u) {
  return u > T(0) ? u + m_log1p(m_exp(-u)) : m_log1p(m_exp(u));
}
template <class T>
PYI_HD T sigmoid(T u) {
  if (u >= T(0)) return T(1) / (T(1) + m_exp(-u));
  const T e = m_exp(u);
  return e / (T(1) + e);
}

template <class T>
PYI_HD bool valid_label(const Model& M, T y) {
  switch (M.family) {
    case kLogistic: return y == T(0) || y == T(1);
    case kSmoothHinge: return y == T(-1) || y == T(1);
    case kMultinomial: return y >= T(0) && y < T(M.K) && y == m_floor(y);
    default: return (y - y) == T(0);  // squared: finite
  }
}

// One example, in place: on entry rs[0..K) holds the scores s, on exit the residual r; c[0..K) receives the
// curvature. Returns false (and touches nothing) when the label is invalid. The loss is written when loss != null.
template <class T>
PYI_HD bool example_in_place(const Model& M, T* rs, T* c, T y, T* loss) {
  if (!valid_label(M, y)) return false;
  switch (M.family) {
    case kLogistic: {
      const T s = rs[0], q = sigmoid(s);
      if (loss) *loss = softplus(s) - y * s;
      rs[0] = q - y;
      c[0] = q * (T(1) - q);
      return true;
    }
    case kSmoothHinge: {
      const T t = T(M.temperature), u = (T(1) - y * rs[0]) / t, q = sigmoid(u);
      if (loss) *loss = t * softplus(u);
      rs[0] = -y * q;
      c[0] = q * (T(1) - q) / t;
      return true;
    }
    case kSquared: {
      const T e = rs[0] - y;
      if (loss) *loss = T(0.5) * e * e;
      rs[0] = e;
      c[0] = T(1);
      return true;
    }
    default: {  // multinomial: the loss needs s_y, so it is taken before the scores are overwritten
      const int K = M.K, label = int(y);
      T mx = rs[0];
      for (int k = 1; k < K; ++k) mx = rs[k] > mx ? rs[k] : mx;
      T z = 0;
      for (int k = 0; k < K; ++k) z += m_exp(rs[k] - mx);
      const T lse = mx + m_log(z);
      if (loss) *loss = lse - rs[label];
      for (int k = 0; k < K; ++k) {
        const T p = m_exp(rs[k] - lse);
        c[k] = p;
        rs[k] = p - (k == label ? T(1) : T(0));
      }
      return true;
    }
  }
}

// x̃_ij: the feature, the intercept's constant 1 (j == d), or 0 beyond d_eff (padding of a tile).
template <class T>
PYI_HD T feature(const Model& M, const T* X, std::int64_t i, int j) {
  if (j < M.d) return X[i * M.d + j];
  return (j == M.d && M.fit_intercept) ? T(1) : T(0);
}

// Curvature weight D_i[a, b] of the pair of classes (a, b): binary families c_i; multinomial p_a δ_ab − p_a p_b.
template <class T>
PYI_HD T curvature_weight(const Model& M, const T* C, std::int64_t i, int a, int b) {
  if (M.family != kMultinomial) return C[i];
  const T pa = C[i * M.K + a], pb = C[i * M.K + b];
  return (a == b ? pa : T(0)) - pa * pb;
}

// Whether parameter column j (of d_eff) carries the l2 penalty.
PYI_HD bool penalized(const Model& M, int j) { return !(M.fit_intercept && !M.penalize_intercept && j == M.d); }

// Top-k order. helpful: smaller score first; harmful: larger score first; equal scores: smaller index first (the
// CPU engine's order). Sentinels (index −1, score +inf for helpful, −inf for harmful) are never better than a real
// entry with a finite score.
template <class T>
PYI_HD bool better(bool harmful, T va, std::int64_t ia, T vb, std::int64_t ib) {
  if (harmful) return va > vb || (va == vb && ia < ib);
  return va < vb || (va == vb && ia < ib);
}

// Number of entries of a list sorted best-first (sentinels last) that are better than (v, idx): the prefix where
// better() holds, found by binary search.
template <class T>
PYI_HD std::int64_t count_better(bool harmful, const T* vals, const std::int64_t* idx, std::int64_t len, T v,
                                 std::int64_t i) {
  std::int64_t lo = 0, hi = len;
  while (lo < hi) {
    const std::int64_t mid = lo + (hi - lo) / 2;
    if (better(harmful, vals[mid], idx[mid], v, i))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

}  // namespace detail
}  // namespace cuda
}  // namespace pyinfluence
