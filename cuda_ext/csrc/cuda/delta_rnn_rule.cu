// Recurrent part of the Delta RNN v2 (docs/kernels.md §2, §3): s = softmax(y_{t-1}); a delta-rule write of
// (kr, vr, br) into R; y_t = R_t^T s + z_t. y_t (columns) becomes s (rows) of the next step through shared
// memory: one barrier per step in each direction.
#include "common.cuh"
#include "launchers.h"

namespace rfwp {
namespace {

template <int RPL, int CPW>
__global__ void __launch_bounds__(256)
    drnn_forward_kernel(Shape s, const uint8_t* reset, const float* z, Writes w, const float* R0, const float* h0,
                        float* y, float* RT, float* hT, float* vbar) {
  float* sh_h = shared_memory();  // [2][d]: y of the previous step, double-buffered
  const int64_t d = s.E, n = blockIdx.x, N = s.N();
  const Tile<RPL, CPW> tl(d, d);
  float Rm[RPL][CPW];
  tl.load(Rm, R0 + n * d * d);
  block_copy(sh_h, h0 + n * d, d);
  __syncthreads();
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t i = t * N + n;
    const bool rs = is_reset(reset, s, t, n);
    if (rs) tl.zero(Rm);
    float sv[RPL], yv[CPW];
    WriteIn<RPL, CPW> in;
    tl.softmax_of(sh_h + (t & 1) * d, rs, sv);
    in.load(tl, w, i, false);
    write_forward(tl, Rm, w, in, vbar + i * d);
    tl.read_add(Rm, sv, z + i * d, yv);
    tl.store_cols(yv, y + i * d);
    tl.store_cols(yv, sh_h + ((t + 1) & 1) * d);
    __syncthreads();
  }
  tl.store(Rm, RT + n * d * d);
  block_copy(hT + n * d, sh_h + (s.T & 1) * d, d);
}

template <int RPL, int CPW>
__global__ void __launch_bounds__(256)
    drnn_backward_kernel(Shape s, const uint8_t* reset, Writes w, const float* R0, const float* h0, const float* y,
                         const float* RT, const float* gy, const float* gRT, const float* ghT, float* dz, float* dkr,
                         float* dvr, float* dbr, float* dR0, float* dh0) {
  float* smem = shared_memory();  // [2][nwarps][2d + 1]: per-warp partials of ds, dkr, dbr
  const int64_t d = s.E, n = blockIdx.x, N = s.N(), dd = d * d;
  const Tile<RPL, CPW> tl(d, d);
  const int width = int(2 * d + 1);
  float Rm[RPL][CPW], G[RPL][CPW], delta[CPW];
  tl.load(Rm, RT + n * dd);
  tl.load(G, gRT + n * dd);
  tl.cols(delta, ghT + n * d);
  for (int64_t t = s.T - 1; t >= 0; --t) {
    const int64_t i = t * N + n;
    const bool rs = is_reset(reset, s, t, n);
    float g[CPW], sv[RPL], pds[RPL], pdk[RPL] = {}, dv[CPW];
    WriteIn<RPL, CPW> in;
    tl.cols(g, gy + i * d);
#pragma unroll
    for (int j = 0; j < CPW; ++j) delta[j] += g[j];
    tl.store_cols(delta, dz + i * d);
    tl.softmax_of(t > 0 ? y + (i - N) * d : h0 + n * d, rs, sv);
    in.load(tl, w, i, true);
    tl.apply_part(Rm, delta, pds);  // ds = R_t delta
    tl.add_outer(G, sv, delta);     // y_t = R_t^T s_t + z_t
    const float pdb = write_backward(tl, Rm, G, R0 + n * dd, w, reset, s, t, n, in, dv, pdk);
    tl.store_cols(dv, dvr + i * d);
    float* buf = smem + (t & 1) * tl.nwarps * width;
    tl.put_rows(buf, width, pds);
    tl.put_rows(buf + d, width, pdk);
    tl.put_scalar(buf + 2 * d, width, pdb);
    __syncthreads();
    float ds[RPL], dk[RPL], dn[RPL];
    tl.sum_rows(buf, width, ds);
    tl.sum_rows(buf + d, width, dk);
    tl.store_rows(dk, dkr + i * d);
    const float db = tl.sum_scalar(buf + 2 * d, width);
    if (threadIdx.x == 0) dbr[i] = db;
    tl.softmax_backward_rows(sv, ds, dn, rs);
    tl.rows_to_cols(dn, delta);
  }
  tl.store(G, dR0 + n * dd);
  tl.store_cols(delta, dh0 + n * d);
}

}  // namespace
}  // namespace rfwp

using namespace rfwp;

extern "C" const char* rfwp_delta_rnn_forward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                              const float* z, const float* kr, const float* vr, const float* br,
                                              const float* R0, const float* h0, float* y, float* RT, float* hT,
                                              float* vbar, void* stream) {
  const Writes w{kr, vr, vbar, br, d, d, 0, 1, 0};
  return launch_recurrent(T, B, H, d, stream, [&](auto R, auto C, const Shape& s, int warps, cudaStream_t st) {
    RFWP_LAUNCH(s.N(), 32 * warps, sizeof(float) * 2 * d, st,
                drnn_forward_kernel<decltype(R)::value, decltype(C)::value>)(s, reset, z, w, R0, h0, y, RT, hT, vbar);
  });
}

extern "C" const char* rfwp_delta_rnn_backward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                               const float* kr, const float* vr, const float* br, const float* R0,
                                               const float* h0, const float* y, const float* RT, const float* vbar,
                                               const float* gy, const float* gRT, const float* ghT, float* dz,
                                               float* dkr, float* dvr, float* dbr, float* dR0, float* dh0,
                                               void* stream) {
  const Writes w{kr, vr, vbar, br, d, d, 0, 1, 0};
  return launch_recurrent(T, B, H, d, stream, [&](auto R, auto C, const Shape& s, int warps, cudaStream_t st) {
    const size_t smem = sizeof(float) * 2 * warps * (2 * d + 1);
    RFWP_LAUNCH(s.N(), 32 * warps, smem, st, drnn_backward_kernel<decltype(R)::value, decltype(C)::value>)(
        s, reset, w, R0, h0, y, RT, gy, gRT, ghT, dz, dkr, dvr, dbr, dR0, dh0);
  });
}
