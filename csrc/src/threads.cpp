#include "pyinfluence/threads.hpp"

#include <algorithm>
#include <atomic>
#include <mutex>

#ifdef PYINFLUENCE_HAS_OPENMP
#include <omp.h>
#endif

#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
// Thread control of the scipy-openblas32 wheel (its exported symbols carry the scipy_ prefix).
extern "C" void scipy_openblas_set_num_threads(int);
extern "C" int scipy_openblas_get_num_threads(void);
#endif

namespace pyinfluence {

namespace {
std::atomic<double> g_parallel_min_flops{kDefaultParallelMinFlops};

#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
// Overlapping SingleThreadedBlas guards (several caller threads in the core at once, the GIL released) share
// one count, so the pool's thread count is saved by the first and restored by the last, never left at 1.
std::mutex g_blas_mutex;
int g_blas_guards = 0;
int g_blas_saved = 0;
#endif
}  // namespace

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
  std::lock_guard<std::mutex> lock(g_blas_mutex);
  if (g_blas_guards > 0)
    g_blas_saved = n;  // a single-threaded section is running: the last one to end applies n
  else
    scipy_openblas_set_num_threads(n);
#endif
}

int partition_threads(Index rows, double work_flops) {
#ifdef PYINFLUENCE_HAS_OPENMP
#if defined(PYINFLUENCE_BLAS_SCIPY_OPENBLAS) || defined(PYINFLUENCE_BLAS_NONE)
  if (omp_in_parallel()) return 1;
  const int threads = omp_get_max_threads();
  if (threads < 2 || work_flops < parallel_min_flops()) return 1;
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

double parallel_min_flops() { return g_parallel_min_flops.load(); }

void set_parallel_min_flops(double flops) { g_parallel_min_flops.store(flops > 0.0 ? flops : 0.0); }

SingleThreadedBlas::SingleThreadedBlas() {
#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
  std::lock_guard<std::mutex> lock(g_blas_mutex);
  if (g_blas_guards++ == 0) {
    g_blas_saved = blas_threads();
    if (g_blas_saved > 1) scipy_openblas_set_num_threads(1);
  }
#endif
}

SingleThreadedBlas::~SingleThreadedBlas() {
#ifdef PYINFLUENCE_BLAS_SCIPY_OPENBLAS
  std::lock_guard<std::mutex> lock(g_blas_mutex);
  if (--g_blas_guards == 0 && g_blas_saved > 1) scipy_openblas_set_num_threads(g_blas_saved);
#endif
}

SerialIfSmall::SerialIfSmall(double work_flops) {
  if (!(work_flops < parallel_min_flops())) return;
  active_ = true;
#ifdef PYINFLUENCE_HAS_OPENMP
  if (omp_in_parallel()) return;  // already inside a parallel region: nothing to serialise here
  saved_omp_threads_ = omp_get_max_threads();
  if (saved_omp_threads_ > 1) omp_set_num_threads(1);  // this thread's setting only (an OpenMP ICV)
#endif
  blas_.emplace();
}

SerialIfSmall::~SerialIfSmall() {
  if (!active_ || !blas_) return;
  blas_.reset();
#ifdef PYINFLUENCE_HAS_OPENMP
  if (saved_omp_threads_ > 1) omp_set_num_threads(saved_omp_threads_);
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
