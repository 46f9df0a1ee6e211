// CPU kernels of the recurrence ops (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include "cpu/recurrence.h"

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("recurrence_forward", &lstm_fused::cpu::recurrence_forward);
  m.impl("recurrence_backward", &lstm_fused::cpu::recurrence_backward);
}
