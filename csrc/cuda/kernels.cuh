// CUDA kernels of the linear path. Written in a small subset of CUDA (no warp intrinsics; block-uniform early exits;
// shared memory, __syncthreads and atomicAdd/atomicMin only) so that tests/cpp/cuda_emulator.hpp can run them on the
// host, thread by thread, where no GPU is available. The host-side driver is in launch.cuh.
#pragma once

#include <cstdint>

#include "device_math.cuh"

namespace pyinfluence {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------------------------
// 1. Per-example pass: scores s = W x̃ (K dot products), then loss, residual r and curvature c (device_math.cuh).
//    One thread per row; the scores are accumulated 8 classes at a time so a row is read ⌈K/8⌉ times.
// ---------------------------------------------------------------------------------------------------------------
template <class T>
__global__ void per_example_kernel(Model M, const T* __restrict__ X, const T* __restrict__ y, const T* __restrict__ W,
                                   std::int64_t n, T* __restrict__ loss, T* __restrict__ R, T* __restrict__ C,
                                   unsigned long long* __restrict__ bad_row) {
  constexpr int G = 8;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    T* r = R + i * M.K;
    for (int a0 = 0; a0 < M.K; a0 += G) {
      const int cnt = M.K - a0 < G ? M.K - a0 : G;
      T acc[G];
      for (int u = 0; u < G; ++u) acc[u] = T(0);
      for (int j = 0; j < M.d; ++j) {
        const T x = X[i * M.d + j];
        for (int u = 0; u < G; ++u)
          if (u < cnt) acc[u] += x * W[std::int64_t(a0 + u) * M.de + j];
      }
      for (int u = 0; u < cnt; ++u)
        r[a0 + u] = acc[u] + (M.fit_intercept ? W[std::int64_t(a0 + u) * M.de + M.d] : T(0));
    }
    T l = T(0);
    if (!example_in_place(M, r, C + i * M.K, y[i], &l)) {
      atomicMin(bad_row, static_cast<unsigned long long>(i));
      l = T(0);
    }
    if (loss) loss[i] = l;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Hessian assembly, lower triangle: H[(a,j),(b,l)] += Σ_{i in this block's rows} x̃_ij · D_i[a,b] · x̃_il
//    for class pairs a ≥ b (and tiles with row ≥ column on the diagonal blocks a = b).
//    Block: 16×16 threads computing a TILE×TILE tile, MT×MT outputs per thread (rows ty + 16u, columns tx + 16v);
//    rows of X are staged TK at a time in shared memory, the right operand pre-scaled by D_i[a, b]. Blocks are
//    indexed (tile row, tile column, class a, class b) in blockIdx.x and by row range (split) in blockIdx.y; the
//    partial sums of the splits meet in H through atomicAdd (H must be zero on entry).
// ---------------------------------------------------------------------------------------------------------------
template <class T, int TILE>
__global__ void hessian_kernel(Model M, const T* __restrict__ X, const T* __restrict__ C, std::int64_t n,
                               std::int64_t rows_per_split, int n_tiles, T* __restrict__ H) {
  constexpr int TK = 16, MT = TILE / 16;
  __shared__ T xa[TK][TILE];
  __shared__ T xb[TK][TILE];
  std::int64_t q = blockIdx.x;
  const int tc = int(q % n_tiles);
  q /= n_tiles;
  const int tr = int(q % n_tiles);
  q /= n_tiles;
  const int b = int(q % M.K);
  const int a = int(q / M.K);
  if (a < b || (a == b && tr < tc)) return;  // upper triangle: the whole block leaves together
  const std::int64_t i_begin = std::int64_t(blockIdx.y) * rows_per_split;
  const std::int64_t i_end = i_begin + rows_per_split < n ? i_begin + rows_per_split : n;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  T acc[MT][MT];
  for (int u = 0; u < MT; ++u)
    for (int v = 0; v < MT; ++v) acc[u][v] = T(0);
  for (std::int64_t i0 = i_begin; i0 < i_end; i0 += TK) {
    for (int e = tid; e < TK * TILE; e += 256) {
      const int ii = e / TILE, jj = e % TILE;
      const std::int64_t i = i0 + ii;
      T va = T(0), vb = T(0);
      if (i < i_end) {
        va = feature(M, X, i, tr * TILE + jj);
        vb = curvature_weight(M, C, i, a, b) * feature(M, X, i, tc * TILE + jj);
      }
      xa[ii][jj] = va;
      xb[ii][jj] = vb;
    }
    __syncthreads();
    for (int ii = 0; ii < TK; ++ii) {
      T ra[MT], rb[MT];
      for (int u = 0; u < MT; ++u) ra[u] = xa[ii][ty + 16 * u];
      for (int v = 0; v < MT; ++v) rb[v] = xb[ii][tx + 16 * v];
      for (int u = 0; u < MT; ++u)
        for (int v = 0; v < MT; ++v) acc[u][v] += ra[u] * rb[v];
    }
    __syncthreads();
  }
  const std::int64_t p = std::int64_t(M.K) * M.de;
  for (int u = 0; u < MT; ++u)
    for (int v = 0; v < MT; ++v) {
      const int r = tr * TILE + ty + 16 * u, c = tc * TILE + tx + 16 * v;
      if (r >= M.de || c >= M.de) continue;
      const std::int64_t row = std::int64_t(a) * M.de + r, col = std::int64_t(b) * M.de + c;
      if (row >= col) atomicAdd(&H[row * p + col], acc[u][v]);
    }
}

// 3. H ← H/n + l2·P on the lower triangle, mirrored into the upper one.
template <class T>
__global__ void finish_hessian_kernel(Model M, T* __restrict__ H, std::int64_t p, T inv_n) {
  const std::int64_t total = p * p, stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t e = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const std::int64_t r = e / p, c = e % p;
    if (r < c) continue;
    T v = H[e] * inv_n;
    if (r == c && penalized(M, int(r % M.de))) v += T(M.l2);
    H[e] = v;
    H[c * p + r] = v;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Scores fused with the residual contraction: score(i, t) = −Σ_q G[i, q] S[t, q] with G[i, (a, j)] = r_ia x̃_ij
//    (the gradient r_i ⊗ x̃_i, formed in shared memory tile by tile, never stored). Block: 16×16 threads, a tile of
//    TI = 64 rows × TT = 16 test points, 4 rows per thread; the inner dimension p is walked TQ = 16 at a time.
//    kWrite: the scores go to out (rows row_begin.., m columns).
//    kSelect: each block keeps, per test point, its best min(k, 64) rows for both orders (rank = number of rows of the
//    tile that are better, so ranks are distinct and the candidates come out sorted), written to the candidate
//    lists cand_*[(t·nb + block)·kk + rank]; unused slots get sentinels.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kTI = 64, kTT = 16, kTQ = 16;
enum ScoreMode { kWrite = 0, kSelect = 1 };

template <class T>
struct SelectArgs {
  std::int64_t k = 0, kk = 0, nb = 0;  // k wanted; kk = min(k, kTI) slots per block list; nb blocks in this chunk
  T inf = T(0);                        // +∞ (sentinel score)
  T* help_val = nullptr;
  std::int64_t* help_idx = nullptr;
  T* harm_val = nullptr;
  std::int64_t* harm_idx = nullptr;
};

// The kSelect tail of score_kernel: per test point of the tile, the block's best min(k, kTI) rows in both orders.
template <class T>
__device__ void select_candidates(std::int64_t i0, std::int64_t row_end, std::int64_t t0, std::int64_t m,
                                  const T (&acc)[4], T (&sc)[kTT][kTI + 1], const SelectArgs<T>& sel) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  for (int u = 0; u < 4; ++u) sc[tx][ty + 16 * u] = -acc[u];
  __syncthreads();
  const std::int64_t left = row_end - i0;
  const int valid = left < kTI ? int(left) : kTI;
  for (int e = tid; e < kTT * kTI; e += 256) {
    const int tt = e / kTI, r = e % kTI;
    const std::int64_t t = t0 + tt;
    if (t >= m) continue;
    const std::int64_t base = (t * sel.nb + blockIdx.x) * sel.kk;
    if (r >= valid) {
      if (r < sel.kk) {  // fewer rows than slots: sentinels
        sel.help_val[base + r] = sel.inf;
        sel.help_idx[base + r] = -1;
        sel.harm_val[base + r] = -sel.inf;
        sel.harm_idx[base + r] = -1;
      }
      continue;
    }
    const T v = sc[tt][r];
    const std::int64_t idx = i0 + r;
    int rank_help = 0, rank_harm = 0;
    for (int r2 = 0; r2 < valid; ++r2) {
      const T v2 = sc[tt][r2];
      rank_help += better(false, v2, i0 + r2, v, idx) ? 1 : 0;
      rank_harm += better(true, v2, i0 + r2, v, idx) ? 1 : 0;
    }
    if (rank_help < sel.kk) {
      sel.help_val[base + rank_help] = v;
      sel.help_idx[base + rank_help] = idx;
    }
    if (rank_harm < sel.kk) {
      sel.harm_val[base + rank_harm] = v;
      sel.harm_idx[base + rank_harm] = idx;
    }
  }
}

template <class T, int MODE>
__global__ void score_kernel(Model M, const T* __restrict__ X, const T* __restrict__ R, std::int64_t row_begin,
                             std::int64_t row_end, const T* __restrict__ S, std::int64_t m, T* __restrict__ out,
                             SelectArgs<T> sel) {
  // +1: padding so that column-wise stores of a warp fall into different shared-memory banks.
  __shared__ T Gs[kTQ][kTI + 1];
  __shared__ T Ss[kTQ][kTT];
  __shared__ T sc[kTT][kTI + 1];
  const std::int64_t p = std::int64_t(M.K) * M.de;
  const std::int64_t i0 = row_begin + std::int64_t(blockIdx.x) * kTI, t0 = std::int64_t(blockIdx.y) * kTT;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  T acc[4] = {T(0), T(0), T(0), T(0)};
  for (std::int64_t q0 = 0; q0 < p; q0 += kTQ) {
    for (int e = tid; e < kTQ * kTI; e += 256) {
      const int row = e / kTQ, qq = e % kTQ;  // consecutive threads: consecutive q of one row (contiguous in X)
      const std::int64_t i = i0 + row, q = q0 + qq;
      T v = T(0);
      if (i < row_end && q < p) {
        const int a = int(q / M.de), j = int(q - std::int64_t(a) * M.de);
        v = R[i * M.K + a] * feature(M, X, i, j);
      }
      Gs[qq][row] = v;
    }
    {
      const int tt = tid / kTQ, qq = tid % kTQ;  // 256 = kTT·kTQ entries, one per thread
      const std::int64_t t = t0 + tt, q = q0 + qq;
      Ss[qq][tt] = (t < m && q < p) ? S[t * p + q] : T(0);
    }
    __syncthreads();
    for (int qq = 0; qq < kTQ; ++qq) {
      const T s = Ss[qq][tx];
      for (int u = 0; u < 4; ++u) acc[u] += Gs[qq][ty + 16 * u] * s;
    }
    __syncthreads();
  }
  if (MODE == kWrite) {
    for (int u = 0; u < 4; ++u) {
      const std::int64_t i = i0 + ty + 16 * u, t = t0 + tx;
      if (i < row_end && t < m) out[(i - row_begin) * m + t] = -acc[u];
    }
  } else {
    select_candidates(i0, row_end, t0, m, acc, sc, sel);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Merge of the running top-k (k per test point, sorted) with the nb candidate lists of a chunk (kk each, sorted):
//    the merged rank of an entry is its position in its own list plus, for every other list, the number of entries
//    better than it (binary search). Entries with rank < k land at that rank. One block per test point.
// ---------------------------------------------------------------------------------------------------------------
template <class T>
__global__ void merge_kernel(bool harmful, const T* __restrict__ run_val, const std::int64_t* __restrict__ run_idx,
                             const T* __restrict__ cand_val, const std::int64_t* __restrict__ cand_idx, std::int64_t k,
                             std::int64_t kk, std::int64_t nb, T sentinel, T* __restrict__ out_val,
                             std::int64_t* __restrict__ out_idx) {
  const std::int64_t t = blockIdx.x;
  const T* rv = run_val + t * k;
  const std::int64_t* ri = run_idx + t * k;
  const T* cv = cand_val + t * nb * kk;
  const std::int64_t* ci = cand_idx + t * nb * kk;
  for (std::int64_t s = threadIdx.x; s < k; s += blockDim.x) {
    out_val[t * k + s] = sentinel;
    out_idx[t * k + s] = -1;
  }
  __syncthreads();
  const std::int64_t total = k + nb * kk;
  for (std::int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    T v;
    std::int64_t idx, rank, own;  // own: −1 for the running list, else the candidate list
    if (e < k) {
      v = rv[e];
      idx = ri[e];
      rank = e;
      own = -1;
    } else {
      own = (e - k) / kk;
      rank = (e - k) % kk;
      v = cv[e - k];
      idx = ci[e - k];
    }
    if (idx < 0) continue;  // sentinel
    if (own >= 0) rank += count_better(harmful, rv, ri, k, v, idx);
    for (std::int64_t b = 0; b < nb && rank < k; ++b)
      if (b != own) rank += count_better(harmful, cv + b * kk, ci + b * kk, kk, v, idx);
    if (rank < k) {
      out_val[t * k + rank] = v;
      out_idx[t * k + rank] = idx;
    }
  }
}

// Fills n values (and indices with −1): the empty running top-k.
template <class T>
__global__ void fill_kernel(T* __restrict__ val, std::int64_t* __restrict__ idx, std::int64_t n, T v) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t e = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    val[e] = v;
    idx[e] = -1;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace pyinfluence
