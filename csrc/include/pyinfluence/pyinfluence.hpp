// Umbrella header of the pyinfluence C++ core.
#pragma once

#include "pyinfluence/cholesky.hpp"
#include "pyinfluence/engine.hpp"
#include "pyinfluence/families.hpp"
#include "pyinfluence/newton.hpp"
#include "pyinfluence/objective.hpp"
#include "pyinfluence/status.hpp"
#include "pyinfluence/threads.hpp"
#include "pyinfluence/types.hpp"
