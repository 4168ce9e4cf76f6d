// Recurrent part of the Delta RNN v2 (models.md §2.6, §5.4): s = softmax(y_{t-1}); a delta-rule write of
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
  for (int e = threadIdx.x; e < d; e += blockDim.x) sh_h[e] = h0[n * d + e];
  __syncthreads();
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t i = t * N + n;
    const bool rs = is_reset(reset, s, t, n);
    if (rs) tl.zero(Rm);
    float hp[RPL], sv[RPL], yv[CPW], zv[CPW];
    WriteIn<RPL, CPW> in;
#pragma unroll
    for (int r = 0; r < RPL; ++r) hp[r] = !rs && tl.has_row(r) ? sh_h[(t & 1) * d + tl.row(r)] : 0.f;
    tl.softmax_rows(hp, sv);
    in.load(tl, w, i, false);
    write_forward(tl, Rm, w, in, vbar + i * d);
    tl.read(Rm, sv, yv);
    tl.cols(zv, z + i * d);
#pragma unroll
    for (int j = 0; j < CPW; ++j) yv[j] += zv[j];
    tl.store_cols(yv, y + i * d);
    tl.store_cols(yv, sh_h + ((t + 1) & 1) * d);
    __syncthreads();
  }
  tl.store(Rm, RT + n * d * d);
  for (int e = threadIdx.x; e < d; e += blockDim.x) hT[n * d + e] = sh_h[(s.T & 1) * d + e];
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
    float g[CPW], hp[RPL], sv[RPL], pds[RPL], pdk[RPL] = {}, dv[CPW];
    WriteIn<RPL, CPW> in;
    tl.cols(g, gy + i * d);
#pragma unroll
    for (int j = 0; j < CPW; ++j) delta[j] += g[j];
    tl.store_cols(delta, dz + i * d);
    tl.rows(hp, t > 0 ? y + (i - N) * d : h0 + n * d);
#pragma unroll
    for (int r = 0; r < RPL; ++r) hp[r] = rs ? 0.f : hp[r];
    tl.softmax_rows(hp, sv);
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
    tl.softmax_backward_rows(sv, ds, dn);
#pragma unroll
    for (int r = 0; r < RPL; ++r) dn[r] = rs ? 0.f : dn[r];  // the state before a reset gets no gradient
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
  if (const char* err = check_head_dim(d)) return err;
  const Shape s{T, B, H, d, d};
  const auto st = static_cast<cudaStream_t>(stream);
  const Writes w{kr, vr, vbar, br, d, d, 0, 1, 0};
  dispatch_recurrent(d, [&](auto R, auto C) {
    constexpr int RPL = decltype(R)::value, CPW = decltype(C)::value;
    const int warps = warps_for(d, CPW);
    RFWP_LAUNCH(s.N(), 32 * warps, sizeof(float) * 2 * d, st, drnn_forward_kernel<RPL, CPW>)(
        s, reset, z, w, R0, h0, y, RT, hT, vbar);
  });
  return launch_error();
}

extern "C" const char* rfwp_delta_rnn_backward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                               const float* kr, const float* vr, const float* br, const float* R0,
                                               const float* h0, const float* y, const float* RT, const float* vbar,
                                               const float* gy, const float* gRT, const float* ghT, float* dz,
                                               float* dkr, float* dvr, float* dbr, float* dR0, float* dh0,
                                               void* stream) {
  if (const char* err = check_head_dim(d)) return err;
  const Shape s{T, B, H, d, d};
  const auto st = static_cast<cudaStream_t>(stream);
  const Writes w{kr, vr, vbar, br, d, d, 0, 1, 0};
  dispatch_recurrent(d, [&](auto R, auto C) {
    constexpr int RPL = decltype(R)::value, CPW = decltype(C)::value;
    const int warps = warps_for(d, CPW);
    const size_t smem = sizeof(float) * 2 * warps * (2 * d + 1);
    RFWP_LAUNCH(s.N(), 32 * warps, smem, st, drnn_backward_kernel<RPL, CPW>)(
        s, reset, w, R0, h0, y, RT, gy, gRT, ghT, dz, dkr, dvr, dbr, dR0, dh0);
  });
  return launch_error();
}
