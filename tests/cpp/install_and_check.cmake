# ctest fixture: install the build tree BUILD_DIR into a fresh PREFIX and check what a C++ user needs is there.
# cmake -DBUILD_DIR=... -DPREFIX=... -DCONFIG=... -DHAS_CUDA=ON|OFF -P install_and_check.cmake
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" --config "${CONFIG}"
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
set(expected
  include/pyinfluence/pyinfluence.hpp include/pyinfluence/types.hpp include/pyinfluence/families.hpp
  include/pyinfluence/objective.hpp include/pyinfluence/cholesky.hpp include/pyinfluence/engine.hpp
  include/pyinfluence/newton.hpp include/pyinfluence/status.hpp include/pyinfluence/threads.hpp)
if(HAS_CUDA)
  list(APPEND expected include/pyinfluence/cuda.hpp)
endif()
foreach(f IN LISTS expected)
  if(NOT EXISTS "${PREFIX}/${f}")
    message(FATAL_ERROR "missing from the install: ${f}")
  endif()
endforeach()
file(GLOB_RECURSE configs "${PREFIX}/*/pyinfluenceConfig.cmake")
file(GLOB_RECURSE versions "${PREFIX}/*/pyinfluenceConfigVersion.cmake")
file(GLOB_RECURSE targets "${PREFIX}/*/pyinfluenceTargets.cmake")
file(GLOB_RECURSE libs "${PREFIX}/*libpyinfluence_core.a" "${PREFIX}/*pyinfluence_core.lib")
foreach(v configs versions targets libs)
  if(NOT ${v})
    message(FATAL_ERROR "missing from the install: ${v} (pyinfluenceConfig.cmake, ...ConfigVersion.cmake, "
                        "...Targets.cmake, the static library)")
  endif()
endforeach()
# Nothing of the Python component.
file(GLOB_RECURSE python_bits "${PREFIX}/*_core*.so" "${PREFIX}/*_core*.pyd")
if(python_bits)
  message(FATAL_ERROR "the C++ install contains Python modules: ${python_bits}")
endif()
message(STATUS "installed into ${PREFIX}: ${configs}")
