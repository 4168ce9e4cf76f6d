// Test-only build of the CUDA kernels and their binding for the CPU, under cuda/emulator.h (RFWP_EMULATE).
// Loaded as the "emulated" backend by tests/test_kernels.py, so that CI runs the kernels' own code against the
// float64 reference on a machine without a GPU. The binding comes first: torch's headers must not see the
// emulator's CUDA keyword macros.
#include "binding_cuda.cpp"
#include "cuda/delta_lstm_rule.cu"
#include "cuda/delta_rnn_rule.cu"
#include "cuda/linear_rules.cu"
#include "cuda/rdn_rule.cu"
