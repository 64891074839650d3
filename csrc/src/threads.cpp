#include "pyinfluence/threads.hpp"

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

int blas_threads() {
#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
  return scipy_openblas_get_num_threads();
#else
  return -1;
#endif
}

}  // namespace pyinfluence
