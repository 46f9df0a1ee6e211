// Everything the step kernels use from outside step_kernels_impl.h, included by each
// step_kernels_<isa>.cpp before it switches the compiler to a wider instruction set, so that
// none of it is compiled for that set (see step_kernels_impl.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu/activations.h"
#include "cpu/step_kernels.h"
