// Build features and thread control of the core.
#pragma once

#include <exception>
#include <mutex>

#include "pyinfluence/types.hpp"

#ifdef PYINFLUENCE_HAS_OPENMP
#include <omp.h>
#endif

namespace pyinfluence {

// Carries the first exception thrown inside an OpenMP loop body back to the calling thread (an exception
// escaping a parallel region would terminate the process). Use: carrier.run([&] { body }); after the loop,
// carrier.rethrow().
class ExceptionCarrier {
 public:
  template <class F>
  void run(F&& body) noexcept {
    try {
      body();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::mutex mutex_;
};

bool has_openmp();
// Threads the core's OpenMP regions may use (1 without OpenMP).
int max_threads();
// Sets the threads of the core's OpenMP regions and of its BLAS (when it is the scipy-openblas32 wheel, whose
// pool is private to pyinfluence; a system BLAS is left alone). n < 1 counts as 1.
void set_max_threads(int n);
// Threads of the core's own BLAS pool, or -1 when the BLAS is not one pyinfluence controls.
int blas_threads();

// Threads for a row-partitioned kernel: each thread takes a contiguous share of the rows and calls the BLAS
// single-threaded on it (see SingleThreadedBlas), so a kernel that alternates memory-bound passes with BLAS
// calls runs in ONE thread pool instead of handing work between OpenMP and the BLAS's own pool after every
// block (measured: that hand-off cost a third of the throughput on 2 cores). Returns 1 when partitioning would
// not pay (no OpenMP, one thread, too little work: work_flops below ~1e7, fewer than 64 rows per thread) or
// when the BLAS's threading is not under our control (a system BLAS might oversubscribe).
int partition_threads(Index rows, double work_flops);

// While alive, the core's own BLAS pool runs single-threaded (restored on destruction). Each OpenMP thread
// may then call the BLAS on its own data concurrently.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int saved_;
};

// Runs body(t, first, last) for t = 0..threads−1 on the row ranges [k·t/T, k·(t+1)/T), one per OpenMP thread,
// with the core's BLAS single-threaded meanwhile; threads == 1 runs body(0, 0, k) on the caller with the BLAS
// as configured. Exceptions thrown by a body are carried back and rethrown here.
template <class F>
void run_row_partition(int threads, Index k, F&& body) {
  if (threads <= 1) {
    body(0, Index(0), k);
    return;
  }
#ifdef PYINFLUENCE_HAS_OPENMP
  SingleThreadedBlas single_threaded_blas;
  ExceptionCarrier carrier;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    carrier.run([&] { body(t, k * t / threads, k * (t + 1) / threads); });
  }
  carrier.rethrow();
#else
  body(0, Index(0), k);
#endif
}

}  // namespace pyinfluence
