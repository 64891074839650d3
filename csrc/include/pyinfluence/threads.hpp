// Build features and thread control of the core.
#pragma once

namespace pyinfluence {

bool has_openmp();
// Threads the core's OpenMP regions may use (1 without OpenMP).
int max_threads();
// Sets the threads of the core's OpenMP regions and of its BLAS (when it is the scipy-openblas32 wheel, whose
// pool is private to pyinfluence; a system BLAS is left alone). n < 1 counts as 1.
void set_max_threads(int n);
// Threads of the core's own BLAS pool, or -1 when the BLAS is not one pyinfluence controls.
int blas_threads();

}  // namespace pyinfluence
