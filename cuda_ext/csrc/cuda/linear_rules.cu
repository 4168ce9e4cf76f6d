// Sum rule (linear transformer) and delta rule (DeltaNet): one kernel pair, the sum rule being a write without
// vbar and beta (docs/kernels.md §2, §3). Forward: no block barrier at all (each warp's columns
// evolve alone). Backward: one reverse pass; dq and dk sum over all columns, so each step's per-warp partials
// go through shared memory (double-buffered, one barrier per step) and are added in a fixed warp order.
#include "common.cuh"
#include "launchers.h"

namespace rfwp {
namespace {

template <int RPL, int CPW>
__global__ void __launch_bounds__(1024)
    linear_forward_kernel(Shape s, const uint8_t* reset, const float* q, Writes w, const float* W0, float* y,
                          float* WT, float* vbar) {
  const Tile<RPL, CPW> tl(s.E, s.M);
  const int64_t n = blockIdx.x, N = s.N();
  float W[RPL][CPW];
  tl.load(W, W0 + n * s.E * s.M);
  // The loads of step t+1 are issued before step t computes: otherwise their latency is on the chain.
  WriteIn<RPL, CPW> in, next;
  float qv[RPL], q_next[RPL];
  in.load(tl, w, n, false);
  tl.rows(qv, q + n * s.E);
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t i = t * N + n;
    if (t + 1 < s.T) {
      next.load(tl, w, i + N, false);
      tl.rows(q_next, q + (i + N) * s.E);
    }
    if (is_reset(reset, s, t, n)) tl.zero(W);
    float yv[CPW];
    write_forward(tl, W, w, in, w.is_sum() ? nullptr : vbar + i * s.M);
    tl.read(W, qv, yv);  // y_t = W_t^T q_t (write, then read)
    tl.store_cols(yv, y + i * s.M);
    in = next;
#pragma unroll
    for (int r = 0; r < RPL; ++r) qv[r] = q_next[r];
  }
  tl.store(W, WT + n * s.E * s.M);
}

template <int RPL, int CPW>
__global__ void __launch_bounds__(1024)
    linear_backward_kernel(Shape s, const uint8_t* reset, const float* q, Writes w, const float* W0,
                           const float* WT, const float* gy, const float* gWT, float* dq, float* dk, float* dv,
                           float* dbeta, float* dW0) {
  float* smem = shared_memory();  // [2][nwarps][2E + 1]: partial dq, dk, dbeta of each warp
  const Tile<RPL, CPW> tl(s.E, s.M);
  const int64_t n = blockIdx.x, N = s.N(), EM = s.E * s.M;
  const int width = int(2 * s.E + 1);
  float W[RPL][CPW], G[RPL][CPW];
  tl.load(W, WT + n * EM);
  tl.load(G, gWT + n * EM);
  WriteIn<RPL, CPW> in, prev;  // step t's inputs, and step t-1's loaded while step t computes
  float qv[RPL], q_prev[RPL], g[CPW], g_prev[CPW];
  const int64_t last = (s.T - 1) * N + n;
  in.load(tl, w, last, true);
  tl.rows(qv, q + last * s.E);
  tl.cols(g, gy + last * s.M);
  for (int64_t t = s.T - 1; t >= 0; --t) {
    const int64_t i = t * N + n;
    if (t > 0) {
      prev.load(tl, w, i - N, true);
      tl.rows(q_prev, q + (i - N) * s.E);
      tl.cols(g_prev, gy + (i - N) * s.M);
    }
    float pdq[RPL], pdk[RPL] = {}, dvv[CPW];
    tl.apply_part(W, g, pdq);  // dq_t = W_t g_t
    tl.add_outer(G, qv, g);    // y_t = W_t^T q_t
    const float pdb = write_backward(tl, W, G, W0 + n * EM, w, reset, s, t, n, in, dvv, pdk);
    tl.store_cols(dvv, dv + i * s.M);
    float* buf = smem + (t & 1) * tl.nwarps * width;
    tl.put_rows(buf, width, pdq);
    tl.put_rows(buf + s.E, width, pdk);
    tl.put_scalar(buf + 2 * s.E, width, pdb);
    __syncthreads();
    for (int x = threadIdx.x; x < width; x += blockDim.x) {
      float sum = 0.f;
      for (int wp = 0; wp < tl.nwarps; ++wp) sum += buf[wp * width + x];
      if (x < s.E)
        dq[i * s.E + x] = sum;
      else if (x < 2 * s.E)
        dk[i * s.E + x - s.E] = sum;
      else if (dbeta != nullptr)
        dbeta[i] = sum;
    }
    in = prev;
#pragma unroll
    for (int r = 0; r < RPL; ++r) qv[r] = q_prev[r];
#pragma unroll
    for (int j = 0; j < CPW; ++j) g[j] = g_prev[j];
  }
  tl.store(G, dW0 + n * EM);
}

constexpr int64_t kMaxLinearDim = 256;

// Slots per thread: rows per lane 1, 2, 4 or 8 (E <= 32, 64, 128, 256), columns per warp likewise for M (so at
// most 32 warps and a short chain: one column per warp up to M = 32). At most 16 state elements per thread.
int slots(int64_t size) { return size <= 32 ? 1 : size <= 64 ? 2 : size <= 128 ? 4 : 8; }

const char* check_linear_dims(int64_t E, int64_t M) {
  if (E < 1 || M < 1 || E > kMaxLinearDim || M > kMaxLinearDim || slots(E) * slots(M) > 16)
    return "rfwp cuda: the sum and delta rule kernels need key and value sizes between 1 and 256 with "
           "ceil(E/32) * ceil(M/32) <= 16 (e.g. 64 x 256, 128 x 128, 256 x 64)";
  return nullptr;
}

template <int RPL, class F>
void dispatch_cols(int64_t M, F&& f) {
  switch (slots(M)) {
    case 1: f(Int<RPL>{}, Int<1>{}); break;
    case 2: f(Int<RPL>{}, Int<2>{}); break;
    case 4: if constexpr (RPL <= 4) f(Int<RPL>{}, Int<4>{}); break;
    default: if constexpr (RPL <= 2) f(Int<RPL>{}, Int<8>{}); break;
  }
}

template <class F>
void dispatch_linear(int64_t E, int64_t M, F&& f) {
  switch (slots(E)) {
    case 1: dispatch_cols<1>(M, f); break;
    case 2: dispatch_cols<2>(M, f); break;
    case 4: dispatch_cols<4>(M, f); break;
    default: dispatch_cols<8>(M, f); break;
  }
}

}  // namespace
}  // namespace rfwp

using namespace rfwp;

extern "C" const char* rfwp_linear_forward(int64_t T, int64_t B, int64_t H, int64_t E, int64_t M,
                                           const uint8_t* reset, const float* q, const float* k, const float* v,
                                           const float* beta, const float* W0, float* y, float* WT, float* vbar,
                                           void* stream) {
  if (const char* err = check_linear_dims(E, M)) return err;
  const Shape s{T, B, H, E, M};
  const auto st = static_cast<cudaStream_t>(stream);
  const Writes w{k, v, beta ? vbar : nullptr, beta, E, M, 0, 1, 0};
  dispatch_linear(E, M, [&](auto R, auto C) {
    constexpr int RPL = decltype(R)::value, CPW = decltype(C)::value;
    RFWP_LAUNCH(s.N(), 32 * warps_for(M, CPW), 0, st, linear_forward_kernel<RPL, CPW>)(s, reset, q, w, W0, y, WT,
                                                                                       vbar);
  });
  return launch_error();
}

extern "C" const char* rfwp_linear_backward(int64_t T, int64_t B, int64_t H, int64_t E, int64_t M,
                                            const uint8_t* reset, const float* q, const float* k, const float* v,
                                            const float* beta, const float* W0, const float* WT, const float* vbar,
                                            const float* gy, const float* gWT, float* dq, float* dk, float* dv,
                                            float* dbeta, float* dW0, void* stream) {
  if (const char* err = check_linear_dims(E, M)) return err;
  const Shape s{T, B, H, E, M};
  const auto st = static_cast<cudaStream_t>(stream);
  const Writes w{k, v, beta ? vbar : nullptr, beta, E, M, 0, 1, 0};
  const char* err = nullptr;
  dispatch_linear(E, M, [&](auto R, auto C) {
    constexpr int RPL = decltype(R)::value, CPW = decltype(C)::value;
    const int warps = warps_for(M, CPW);
    const size_t smem = sizeof(float) * 2 * warps * (2 * E + 1);
    if ((err = allow_shared_memory(linear_backward_kernel<RPL, CPW>, smem))) return;
    RFWP_LAUNCH(s.N(), 32 * warps, smem, st, linear_backward_kernel<RPL, CPW>)(
        s, reset, q, w, W0, WT, gy, gWT, dq, dk, dv, dbeta, dW0);
  });
  return err ? err : launch_error();
}
