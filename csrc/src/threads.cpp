#include "pyinfluence/threads.hpp"

#include <algorithm>

#ifdef PYINFLUENCE_HAS_OPENMP
#include <omp.h>
#endif

#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
// Thread control of the scipy-openblas32 wheel (its exported symbols carry the scipy_ prefix).
extern "C" void scipy_openblas_set_num_threads(int);
extern "C" int scipy_openblas_get_num_threads(void);
#endif

namespace pyinfluence {

bool has_openmp() {
#ifdef PYINFLUENCE_HAS_OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef PYINFLUENCE_HAS_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_max_threads(int n) {
  if (n < 1) n = 1;
#ifdef PYINFLUENCE_HAS_OPENMP
  omp_set_num_threads(n);
#endif
#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
  scipy_openblas_set_num_threads(n);
#endif
}

int partition_threads(Index rows, double work_flops) {
#ifdef PYINFLUENCE_HAS_OPENMP
#if defined(PYINFLUENCE_BLAS_SCIPY_OPENBLAS) || defined(PYINFLUENCE_BLAS_NONE)
  if (omp_in_parallel()) return 1;
  const int threads = omp_get_max_threads();
  if (threads < 2 || work_flops < 1e7) return 1;
  return int(std::max<Index>(1, std::min<Index>(threads, rows / 64)));
#else
  (void)rows;
  (void)work_flops;
  return 1;
#endif
#else
  (void)rows;
  (void)work_flops;
  return 1;
#endif
}

SingleThreadedBlas::SingleThreadedBlas() : saved_(blas_threads()) {
#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
  if (saved_ > 1) scipy_openblas_set_num_threads(1);
#endif
}

SingleThreadedBlas::~SingleThreadedBlas() {
#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
  if (saved_ > 1) scipy_openblas_set_num_threads(saved_);
#endif
}

int blas_threads() {
#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
  return scipy_openblas_get_num_threads();
#else
  return -1;
#endif
}

}  // namespace pyinfluence
