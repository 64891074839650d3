// Matrix aliases shared by the core. Data matrices (X: n×d, one example per row) are row-major to match
// C-contiguous numpy arrays; the parameter matrix W (K×d_eff) is row-major so that the flattened θ is
// vec(W) row by row: θ[k*d_eff + j] = W(k, j).
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace pyinfluence {

using Index = Eigen::Index;

template <class S>
using RowMatrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using ColMatrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
template <class S>
using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;

// Integer index arrays (training-point indices, top-k results): int64 to match numpy's default integer.
using IndexVector = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;
using IndexRowMatrix = Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Non-owning views: function parameters take these, so that matrices, blocks and maps of matching layout
// pass without a copy.
template <class S>
using ConstRowMatrixRef = Eigen::Ref<const RowMatrix<S>>;
template <class S>
using ConstColMatrixRef = Eigen::Ref<const ColMatrix<S>>;
template <class S>
using ConstVectorRef = Eigen::Ref<const Vector<S>>;
template <class S>
using RowMatrixRef = Eigen::Ref<RowMatrix<S>>;
template <class S>
using ColMatrixRef = Eigen::Ref<ColMatrix<S>>;
using ConstIndexVectorRef = Eigen::Ref<const IndexVector>;

}  // namespace pyinfluence
