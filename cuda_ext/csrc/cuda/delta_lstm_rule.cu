// Recurrent part of the Delta LSTM v4 (docs/kernels.md §2, §3): three fast recurrent matrices R_g, g = (i, u, o),
// each delta-updated by (kr_g, vr_g, br_g) and read with s = softmax(y_{t-1}); i = σ(.), u linear, o = σ(.);
// c_t = i u + (1 - i) c_{t-1}; y_t = o c_t. Same structure as the Delta RNN with three matrices: one barrier
// per step in each direction. The cell state is per column and stays in registers.
#include "common.cuh"
#include "launchers.h"

namespace rfwp {
namespace {

// The writes into gate g's matrix: kr, vr, vbar [T, N, 3, d], br [T, N, 3].
__device__ __forceinline__ Writes gate_writes(const float* kr, const float* vr, const float* vbar, const float* br,
                                              int64_t d, int g) {
  return Writes{kr, vr, vbar, br, 3 * d, 3 * d, g * d, 3, g};
}

template <int RPL, int CPW>
__global__ void __launch_bounds__(256)
    dlstm_forward_kernel(Shape s, const uint8_t* reset, const float* z, const float* kr, const float* vr,
                         const float* br, const float* R0, const float* h0, const float* c0, float* y, float* RT,
                         float* hT, float* cT, float* vbar, float* gates, float* cs) {
  float* sh_h = shared_memory();  // [2][d]: y of the previous step, double-buffered
  const int64_t d = s.E, n = blockIdx.x, N = s.N(), dd = d * d;
  const Tile<RPL, CPW> tl(d, d);
  float Rm[3][RPL][CPW], c[CPW];
#pragma unroll
  for (int g = 0; g < 3; ++g) tl.load(Rm[g], R0 + (n * 3 + g) * dd);
  tl.cols(c, c0 + n * d);
  block_copy(sh_h, h0 + n * d, d);
  __syncthreads();
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t i = t * N + n;
    const bool rs = is_reset(reset, s, t, n);
    if (rs) {
#pragma unroll
      for (int g = 0; g < 3; ++g) tl.zero(Rm[g]);
#pragma unroll
      for (int j = 0; j < CPW; ++j) c[j] = 0.f;
    }
    float sv[RPL], pre[3][CPW], yv[CPW];
    tl.softmax_of(sh_h + (t & 1) * d, rs, sv);
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      const Writes w = gate_writes(kr, vr, vbar, br, d, g);
      WriteIn<RPL, CPW> in;
      in.load(tl, w, i, false);
      write_forward(tl, Rm[g], w, in, vbar + (i * 3 + g) * d);
      tl.read_add(Rm[g], sv, z + (i * 3 + g) * d, pre[g]);
    }
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
      pre[0][j] = sigmoid(pre[0][j]);  // input gate (coupled with forgetting)
      pre[2][j] = sigmoid(pre[2][j]);  // output gate; pre[1] is the (unsquashed) update
      c[j] = pre[0][j] * pre[1][j] + (1.f - pre[0][j]) * c[j];
      yv[j] = pre[2][j] * c[j];
    }
#pragma unroll
    for (int g = 0; g < 3; ++g) tl.store_cols(pre[g], gates + (i * 3 + g) * d);
    tl.store_cols(c, cs + i * d);
    tl.store_cols(yv, y + i * d);
    tl.store_cols(yv, sh_h + ((t + 1) & 1) * d);
    __syncthreads();
  }
#pragma unroll
  for (int g = 0; g < 3; ++g) tl.store(Rm[g], RT + (n * 3 + g) * dd);
  tl.store_cols(c, cT + n * d);
  block_copy(hT + n * d, sh_h + (s.T & 1) * d, d);
}

template <int RPL, int CPW>
__global__ void __launch_bounds__(256)
    dlstm_backward_kernel(Shape s, const uint8_t* reset, const float* kr, const float* vr, const float* br,
                          const float* R0, const float* h0, const float* c0, const float* y, const float* RT,
                          const float* vbar, const float* gates, const float* cs, const float* gy, const float* gRT,
                          const float* ghT, const float* gcT, float* dz, float* dkr, float* dvr, float* dbr,
                          float* dR0, float* dh0, float* dc0) {
  // [2][nwarps][4d + 3]: per-warp partials of ds [d], dkr of each gate [3][d], dbr of each gate [3]
  float* smem = shared_memory();
  const int64_t d = s.E, n = blockIdx.x, N = s.N(), dd = d * d;
  const Tile<RPL, CPW> tl(d, d);
  const int width = int(4 * d + 3);
  float Rm[3][RPL][CPW], G[3][RPL][CPW], delta[CPW], dc[CPW];
#pragma unroll
  for (int g = 0; g < 3; ++g) {
    tl.load(Rm[g], RT + (n * 3 + g) * dd);
    tl.load(G[g], gRT + (n * 3 + g) * dd);
  }
  tl.cols(delta, ghT + n * d);
  tl.cols(dc, gcT + n * d);
  for (int64_t t = s.T - 1; t >= 0; --t) {
    const int64_t i = t * N + n;
    const bool rs = is_reset(reset, s, t, n);
    float sv[RPL], gi[CPW], gu[CPW], go[CPW], ct[CPW], cp[CPW], g[CPW], dpre[3][CPW], pds[RPL];
    tl.softmax_of(t > 0 ? y + (i - N) * d : h0 + n * d, rs, sv);
    tl.cols(gi, gates + (i * 3) * d);
    tl.cols(gu, gates + (i * 3 + 1) * d);
    tl.cols(go, gates + (i * 3 + 2) * d);
    tl.cols(ct, cs + i * d);
    tl.cols(cp, t > 0 ? cs + (i - N) * d : c0 + n * d);
    tl.cols(g, gy + i * d);
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
      const float c_prev = rs ? 0.f : cp[j];
      const float dy = delta[j] + g[j];
      const float dct = dc[j] + dy * go[j];
      dpre[0][j] = dct * (gu[j] - c_prev) * gi[j] * (1.f - gi[j]);
      dpre[1][j] = dct * gi[j];
      dpre[2][j] = dy * ct[j] * go[j] * (1.f - go[j]);
      dc[j] = rs ? 0.f : dct * (1.f - gi[j]);
    }
    float* buf = smem + (t & 1) * tl.nwarps * width;
#pragma unroll
    for (int gate = 0; gate < 3; ++gate) {
      const Writes w = gate_writes(kr, vr, vbar, br, d, gate);
      WriteIn<RPL, CPW> in;
      float pdk[RPL] = {}, dv[CPW];
      in.load(tl, w, i, true);
      tl.store_cols(dpre[gate], dz + (i * 3 + gate) * d);
      tl.apply_part(Rm[gate], dpre[gate], pds, gate > 0);  // ds = sum_g R_g,t dpre_g
      tl.add_outer(G[gate], sv, dpre[gate]);
      const float pdb =
          write_backward(tl, Rm[gate], G[gate], R0 + (n * 3 + gate) * dd, w, reset, s, t, n, in, dv, pdk);
      tl.store_cols(dv, dvr + (i * 3 + gate) * d);
      tl.put_rows(buf + (1 + gate) * d, width, pdk);
      tl.put_scalar(buf + 4 * d + gate, width, pdb);
    }
    tl.put_rows(buf, width, pds);
    __syncthreads();
    float ds[RPL], dn[RPL];
#pragma unroll
    for (int gate = 0; gate < 3; ++gate) {
      float dk[RPL];
      tl.sum_rows(buf + (1 + gate) * d, width, dk);
      tl.store_rows(dk, dkr + (i * 3 + gate) * d);
      const float db = tl.sum_scalar(buf + 4 * d + gate, width);
      if (threadIdx.x == 0) dbr[i * 3 + gate] = db;
    }
    tl.sum_rows(buf, width, ds);
    tl.softmax_backward_rows(sv, ds, dn, rs);
    tl.rows_to_cols(dn, delta);
  }
#pragma unroll
  for (int g = 0; g < 3; ++g) tl.store(G[g], dR0 + (n * 3 + g) * dd);
  tl.store_cols(delta, dh0 + n * d);
  tl.store_cols(dc, dc0 + n * d);
}

}  // namespace
}  // namespace rfwp

using namespace rfwp;

extern "C" const char* rfwp_delta_lstm_forward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                               const float* z, const float* kr, const float* vr, const float* br,
                                               const float* R0, const float* h0, const float* c0, float* y,
                                               float* RT, float* hT, float* cT, float* vbar, float* gates, float* cs,
                                               void* stream) {
  return launch_recurrent(T, B, H, d, stream, [&](auto R, auto C, const Shape& s, int warps, cudaStream_t st) {
    RFWP_LAUNCH(s.N(), 32 * warps, sizeof(float) * 2 * d, st,
                dlstm_forward_kernel<decltype(R)::value, decltype(C)::value>)(
        s, reset, z, kr, vr, br, R0, h0, c0, y, RT, hT, cT, vbar, gates, cs);
  });
}

extern "C" const char* rfwp_delta_lstm_backward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                                const float* kr, const float* vr, const float* br, const float* R0,
                                                const float* h0, const float* c0, const float* y, const float* RT,
                                                const float* vbar, const float* gates, const float* cs,
                                                const float* gy, const float* gRT, const float* ghT,
                                                const float* gcT, float* dz, float* dkr, float* dvr, float* dbr,
                                                float* dR0, float* dh0, float* dc0, void* stream) {
  return launch_recurrent(T, B, H, d, stream, [&](auto R, auto C, const Shape& s, int warps, cudaStream_t st) {
    const size_t smem = sizeof(float) * 2 * warps * (4 * d + 3);
    RFWP_LAUNCH(s.N(), 32 * warps, smem, st, dlstm_backward_kernel<decltype(R)::value, decltype(C)::value>)(
        s, reset, kr, vr, br, R0, h0, c0, y, RT, vbar, gates, cs, gy, gRT, ghT, gcT, dz, dkr, dvr, dbr, dR0,
        dh0, dc0);
  });
}
