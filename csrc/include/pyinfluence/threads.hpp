// Build features and thread control of the core.
#pragma once

#include <exception>
#include <mutex>

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

}  // namespace pyinfluence
