// Links pyinfluence::cuda on its own and prints what the CUDA runtime sees; succeeds with or without a GPU.
#include <cstdio>

#include "pyinfluence/cuda.hpp"

int main() {
  const int devices = pyinfluence::cuda::device_count();
  std::printf("pyinfluence::cuda: %d device(s), %s\n", devices, pyinfluence::cuda::version_info().c_str());
  return devices >= 0 ? 0 : 1;
}
