// Thin torch binding of the CUDA kernels: Bindings<CudaImpl> (binding.h) checks the tensors and passes raw
// float32 pointers and the stream (from Python: torch.cuda.current_stream().cuda_stream) to the launchers of
// cuda/launchers.h. No c10/cuda or ATen/cuda headers, so this file also compiles against a CPU build of torch.
// With RFWP_EMULATE the same launchers run on the CPU under cuda/emulator.h (tests only).
#include "binding.h"
#include "cuda/launchers.h"

namespace rfwp {
namespace {

#ifdef RFWP_EMULATE
constexpr at::DeviceType kDevice = at::kCPU;
#else
constexpr at::DeviceType kDevice = at::kCUDA;
#endif

void ok(const char* err) { TORCH_CHECK(err == nullptr, "rfwp cuda: ", err); }

const uint8_t* bytes(const bool* reset) { return reinterpret_cast<const uint8_t*>(reset); }

struct CudaImpl {
  static void check_first(const char* fn, const Tensor& t) {
    TORCH_CHECK(t.device().type() == kDevice, fn, ": the cuda backend needs ", kDevice, " tensors, got ",
                t.device());
  }
  template <class F>
  static void dispatch(at::ScalarType dtype, F&& f) {
    TORCH_CHECK(dtype == at::kFloat, "rfwp cuda backend: float32 tensors are required, got ", dtype);
    f(float{});
  }

  static void linear_forward(const Dims& d, const bool* r, const float* q, const float* k, const float* v,
                             const float* beta, const float* W0, float* y, float* WT, float* vbar, void* st) {
    ok(rfwp_linear_forward(d.T, d.B, d.H, d.E, d.M, bytes(r), q, k, v, beta, W0, y, WT, vbar, st));
  }
  static void linear_backward(const Dims& d, const bool* r, const float* q, const float* k, const float* v,
                              const float* beta, const float* W0, const float* WT, const float* vbar,
                              const float* gy, const float* gWT, float* dq, float* dk, float* dv, float* dbeta,
                              float* dW0, void* st) {
    ok(rfwp_linear_backward(d.T, d.B, d.H, d.E, d.M, bytes(r), q, k, v, beta, W0, WT, vbar, gy, gWT, dq, dk, dv,
                            dbeta, dW0, st));
  }
  static void rdn_forward(const Dims& d, const bool* r, const float* qx, const float* kx, const float* vx,
                          const float* bx, const float* Rq, const float* Rk, const float* Rv, const float* rb,
                          const float* W0, const float* h0, float* y, float* WT, float* hT, float* qs, float* ks,
                          float* vs, float* vbar, float* betas, void* st) {
    ok(rfwp_rdn_forward(d.T, d.B, d.H, d.E, bytes(r), qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, h0, y, WT, hT, qs, ks, vs,
                        vbar, betas, st));
  }
  static int64_t rdn_partials(int64_t B) { return B; }  // one slot of partial gradients per sample
  static void rdn_backward(const Dims& d, const bool* r, const float* Rq, const float* Rk, const float* Rv,
                           const float* rb, const float* W0, const float* h0, const float* y, const float* WT,
                           const float* qs, const float* ks, const float* vs, const float* vbar, const float* betas,
                           const float* gy, const float* gWT, const float* ghT, float* dqx, float* dkx, float* dvx,
                           float* dbx, float* dRq, float* dRk, float* dRv, float* drb, float* dW0, float* dh0,
                           float* dR_part, float* drb_part, void* st) {
    ok(rfwp_rdn_backward(d.T, d.B, d.H, d.E, bytes(r), Rq, Rk, Rv, rb, W0, h0, y, WT, qs, ks, vs, vbar, betas, gy,
                         gWT, ghT, dqx, dkx, dvx, dbx, dRq, dRk, dRv, drb, dW0, dh0, dR_part, drb_part, st));
  }
  static void delta_rnn_forward(const Dims& d, const bool* r, const float* z, const float* kr, const float* vr,
                                const float* br, const float* R0, const float* h0, float* y, float* RT, float* hT,
                                float* vbar, void* st) {
    ok(rfwp_delta_rnn_forward(d.T, d.B, d.H, d.E, bytes(r), z, kr, vr, br, R0, h0, y, RT, hT, vbar, st));
  }
  static void delta_rnn_backward(const Dims& d, const bool* r, const float* kr, const float* vr, const float* br,
                                 const float* R0, const float* h0, const float* y, const float* RT,
                                 const float* vbar, const float* gy, const float* gRT, const float* ghT, float* dz,
                                 float* dkr, float* dvr, float* dbr, float* dR0, float* dh0, void* st) {
    ok(rfwp_delta_rnn_backward(d.T, d.B, d.H, d.E, bytes(r), kr, vr, br, R0, h0, y, RT, vbar, gy, gRT, ghT, dz, dkr,
                               dvr, dbr, dR0, dh0, st));
  }
  static void delta_lstm_forward(const Dims& d, const bool* r, const float* z, const float* kr, const float* vr,
                                 const float* br, const float* R0, const float* h0, const float* c0, float* y,
                                 float* RT, float* hT, float* cT, float* vbar, float* gates, float* cs, void* st) {
    ok(rfwp_delta_lstm_forward(d.T, d.B, d.H, d.E, bytes(r), z, kr, vr, br, R0, h0, c0, y, RT, hT, cT, vbar, gates,
                               cs, st));
  }
  static void delta_lstm_backward(const Dims& d, const bool* r, const float* kr, const float* vr, const float* br,
                                  const float* R0, const float* h0, const float* c0, const float* y,
                                  const float* RT, const float* vbar, const float* gates, const float* cs,
                                  const float* gy, const float* gRT, const float* ghT, const float* gcT, float* dz,
                                  float* dkr, float* dvr, float* dbr, float* dR0, float* dh0, float* dc0, void* st) {
    ok(rfwp_delta_lstm_backward(d.T, d.B, d.H, d.E, bytes(r), kr, vr, br, R0, h0, c0, y, RT, vbar, gates, cs, gy,
                                gRT, ghT, gcT, dz, dkr, dvr, dbr, dR0, dh0, dc0, st));
  }
};

}  // namespace
}  // namespace rfwp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rfwp CUDA kernels of the fast-weight update rules (see cuda_ext/functions.py)";
  rfwp::Bindings<rfwp::CudaImpl>::define(m);
}
