#include "pyinfluence/threads.hpp"

#ifdef PYINFLUENCE_HAS_OPENMP
#include <omp.h>
#endif

namespace pyinfluence {

#ifdef PYINFLUENCE_HAS_OPENMP
bool has_openmp() { return true; }
int max_threads() { return omp_get_max_threads(); }
void set_max_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }
#else
bool has_openmp() { return false; }
int max_threads() { return 1; }
void set_max_threads(int) {}
#endif

}  // namespace pyinfluence
