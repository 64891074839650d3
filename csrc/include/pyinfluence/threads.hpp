// Build features and thread control of the core.
#pragma once

namespace pyinfluence {

bool has_openmp();
// Threads OpenMP regions of the core may use (1 without OpenMP).
int max_threads();
void set_max_threads(int n);

}  // namespace pyinfluence
