// Build features and thread control of the core.
#pragma once

#include <exception>
#include <mutex>
#include <optional>

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

// Work below this many flops runs on one thread, the BLAS included (see SerialIfSmall and partition_threads).
// Measured on 2 cores (bench/RESULTS.md, "thread count by problem size"): splitting a call of less than ~50 ms
// (2e9 flops at ~40 GFLOP/s per core) was no faster than one thread when the machine was quiet, and up to 3×
// slower when another process held a core (the split waits for its slowest share). Adjustable for machines
// with more cores (set_parallel_min_flops); the default is kDefaultParallelMinFlops.
constexpr double kDefaultParallelMinFlops = 2e9;
double parallel_min_flops();
// Sets the threshold above; values < 0 count as 0 (always parallel when the threads allow).
void set_parallel_min_flops(double flops);

// Threads for a row-partitioned kernel: each thread takes a contiguous share of the rows and calls the BLAS
// single-threaded on it (see SingleThreadedBlas), so a kernel that alternates memory-bound passes with BLAS
// calls runs in ONE thread pool instead of handing work between OpenMP and the BLAS's own pool after every
// block (measured: that hand-off cost a third of the throughput on 2 cores). Returns 1 when partitioning would
// not pay (no OpenMP, one thread, too little work: work_flops below parallel_min_flops(), fewer than 64 rows
// per thread) or when the BLAS's threading is not under our control (a system BLAS might oversubscribe).
int partition_threads(Index rows, double work_flops);

// While alive, the core's own BLAS pool runs single-threaded (restored when the last such guard in the process
// ends: guards may overlap across caller threads). Each OpenMP thread may then call the BLAS on its own data
// concurrently.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

// While alive, and only if work_flops < parallel_min_flops(): the calling thread's OpenMP regions and the core's
// BLAS run on one thread. Put one at the entry of every kernel whose size is known (engine calls, Hessian
// assembly, factorisation), so a small call does not pay for waking (or waiting on) a second thread.
class SerialIfSmall {
 public:
  explicit SerialIfSmall(double work_flops);
  ~SerialIfSmall();
  SerialIfSmall(const SerialIfSmall&) = delete;
  SerialIfSmall& operator=(const SerialIfSmall&) = delete;

 private:
  bool active_ = false;
  int saved_omp_threads_ = 1;
  std::optional<SingleThreadedBlas> blas_;
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
