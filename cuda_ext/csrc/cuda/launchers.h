// Host entry points of the CUDA kernels: raw float32 device pointers (contiguous, laid out as in docs/api.md),
// a reset mask [T, B] of bytes (or null) and a cudaStream_t passed as void*. Each returns null on success or an
// error message. Included by the .cu files and by the thin torch binding (binding_cuda.cpp); no torch or CUDA
// headers here. The argument order of each function is the one of models/ops/rules.py and binding.h (results
// after the inputs; the backward's saved tensors, output gradients, input gradients, then scratch).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Sum rule (beta == vbar == dbeta == null) and delta rule.
const char* rfwp_linear_forward(int64_t T, int64_t B, int64_t H, int64_t E, int64_t M, const uint8_t* reset,
                                const float* q, const float* k, const float* v, const float* beta, const float* W0,
                                float* y, float* WT, float* vbar, void* stream);
const char* rfwp_linear_backward(int64_t T, int64_t B, int64_t H, int64_t E, int64_t M, const uint8_t* reset,
                                 const float* q, const float* k, const float* v, const float* beta,
                                 const float* W0, const float* WT, const float* vbar, const float* gy,
                                 const float* gWT, float* dq, float* dk, float* dv, float* dbeta, float* dW0,
                                 void* stream);

const char* rfwp_rdn_forward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset, const float* qx,
                             const float* kx, const float* vx, const float* bx, const float* Rq, const float* Rk,
                             const float* Rv, const float* rb, const float* W0, const float* h0, float* y, float* WT,
                             float* hT, float* qs, float* ks, float* vs, float* vbar, float* betas, void* stream);
const char* rfwp_rdn_backward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset, const float* Rq,
                              const float* Rk, const float* Rv, const float* rb, const float* W0, const float* h0,
                              const float* y, const float* WT, const float* qs, const float* ks, const float* vs,
                              const float* vbar, const float* betas, const float* gy, const float* gWT,
                              const float* ghT, float* dqx, float* dkx, float* dvx, float* dbx, float* dRq,
                              float* dRk, float* dRv, float* drb, float* dW0, float* dh0, float* dR_part,
                              float* drb_part, void* stream);

const char* rfwp_delta_rnn_forward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                   const float* z, const float* kr, const float* vr, const float* br,
                                   const float* R0, const float* h0, float* y, float* RT, float* hT, float* vbar,
                                   void* stream);
const char* rfwp_delta_rnn_backward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                    const float* kr, const float* vr, const float* br, const float* R0,
                                    const float* h0, const float* y, const float* RT, const float* vbar,
                                    const float* gy, const float* gRT, const float* ghT, float* dz, float* dkr,
                                    float* dvr, float* dbr, float* dR0, float* dh0, void* stream);

const char* rfwp_delta_lstm_forward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                    const float* z, const float* kr, const float* vr, const float* br,
                                    const float* R0, const float* h0, const float* c0, float* y, float* RT,
                                    float* hT, float* cT, float* vbar, float* gates, float* cs, void* stream);
const char* rfwp_delta_lstm_backward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                     const float* kr, const float* vr, const float* br, const float* R0,
                                     const float* h0, const float* c0, const float* y, const float* RT,
                                     const float* vbar, const float* gates, const float* cs, const float* gy,
                                     const float* gRT, const float* ghT, const float* gcT, float* dz, float* dkr,
                                     float* dvr, float* dbr, float* dR0, float* dh0, float* dc0, void* stream);

#ifdef __cplusplus
}
#endif
