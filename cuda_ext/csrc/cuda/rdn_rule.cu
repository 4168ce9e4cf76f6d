// Recurrent Delta Net (docs/kernels.md §2, §3). q, k, v and beta of step t depend on the whole y_{t-1}, so a step
// needs block-wide exchanges: two barriers per step in each direction. The slow matrices Rq, Rk, Rv of the
// chain's head sit in registers with the same split as W, so their products are the same warp reductions.
// Their gradients are per-chain partials, summed over the batch afterwards in a fixed order (no atomics).
#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace rfwp {
namespace {

template <int RPL, int CPW>
__global__ void __launch_bounds__(256)
    rdn_forward_kernel(Shape s, const uint8_t* reset, const float* qx, const float* kx, const float* vx,
                       const float* bx, const float* Rq, const float* Rk, const float* Rv, const float* rb,
                       const float* W0, const float* h0, float* y, float* WT, float* hT, float* qs, float* ks,
                       float* vs, float* vbar, float* betas) {
  // shared: h = y_{t-1} [d], the logits of q and k [2d], each warp's softmax statistics [nwarps][4]
  float* smem = shared_memory();
  const int64_t d = s.E, n = blockIdx.x, N = s.N(), head = n % s.H;
  const Tile<RPL, CPW> tl(d, d);
  float *sh_h = smem, *sh_lq = smem + d, *sh_lk = smem + 2 * d, *sh_stats = smem + 3 * d;
  float W[RPL][CPW], Aq[RPL][CPW], Ak[RPL][CPW], Av[RPL][CPW], rbv[RPL];
  tl.load(W, W0 + n * d * d);
  tl.load(Aq, Rq + head * d * d);
  tl.load(Ak, Rk + head * d * d);
  tl.load(Av, Rv + head * d * d);
  tl.rows(rbv, rb + head * d);
  block_copy(sh_h, h0 + n * d, d);
  __syncthreads();
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t i = t * N + n;
    const bool rs = is_reset(reset, s, t, n);
    if (rs) tl.zero(W);
    float a[RPL], lq[CPW], lk[CPW], vv[CPW], xq[CPW], xk[CPW], xv[CPW];
#pragma unroll
    for (int r = 0; r < RPL; ++r) a[r] = !rs && tl.has_row(r) ? tanhf(sh_h[tl.row(r)]) : 0.f;
    tl.read(Aq, a, lq);
    tl.read(Ak, a, lk);
    tl.read(Av, a, vv);
    float ab = 0.f;
#pragma unroll
    for (int r = 0; r < RPL; ++r) ab += a[r] * rbv[r];
    const float beta = sigmoid(bx[i] + warp_sum(ab));
    tl.cols(xq, qx + i * d);
    tl.cols(xk, kx + i * d);
    tl.cols(xv, vx + i * d);
    float mq = -INFINITY, mk = -INFINITY, sq = 0.f, sk = 0.f;
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
      lq[j] += xq[j], lk[j] += xk[j], vv[j] += xv[j];
      if (tl.has_col(j)) mq = fmaxf(mq, lq[j]), mk = fmaxf(mk, lk[j]);
    }
#pragma unroll
    for (int j = 0; j < CPW; ++j)
      if (tl.has_col(j)) sq += expf(lq[j] - mq), sk += expf(lk[j] - mk);
    if (tl.lane == 0) {
#pragma unroll
      for (int j = 0; j < CPW; ++j)
        if (tl.has_col(j)) sh_lq[tl.col(j)] = lq[j], sh_lk[tl.col(j)] = lk[j];
      float* st = sh_stats + 4 * tl.warp;
      st[0] = mq, st[1] = sq, st[2] = mk, st[3] = sk;
    }
    __syncthreads();
    // Combine the warps' (max, sum of exp) pairs: lane l takes warp l's.
    const bool has = tl.lane < tl.nwarps;
    const float* st = sh_stats + 4 * tl.lane;
    const float Mq = warp_max(has ? st[0] : -INFINITY), Mk = warp_max(has ? st[2] : -INFINITY);
    const float Sq = warp_sum(has ? st[1] * expf(st[0] - Mq) : 0.f);
    const float Sk = warp_sum(has ? st[3] * expf(st[2] - Mk) : 0.f);
    float qv[RPL], kv[RPL];
#pragma unroll
    for (int r = 0; r < RPL; ++r) {
      qv[r] = tl.has_row(r) ? expf(sh_lq[tl.row(r)] - Mq) / Sq : 0.f;
      kv[r] = tl.has_row(r) ? expf(sh_lk[tl.row(r)] - Mk) / Sk : 0.f;
    }
    tl.store_rows(qv, qs + i * d);
    tl.store_rows(kv, ks + i * d);
    tl.store_cols(vv, vs + i * d);
    if (threadIdx.x == 0) betas[i] = beta;
    float yv[CPW];
    write_delta(tl, W, kv, vv, beta, vbar + i * d);  // as the backward's replay repeats it
    tl.read(W, qv, yv);
    tl.store_cols(yv, y + i * d);
    if (tl.lane == 0) {
#pragma unroll
      for (int j = 0; j < CPW; ++j)
        if (tl.has_col(j)) sh_h[tl.col(j)] = yv[j];
    }
    __syncthreads();
  }
  tl.store(W, WT + n * d * d);
  block_copy(hT + n * d, sh_h, d);
}

template <int RPL, int CPW>
__global__ void __launch_bounds__(256)
    rdn_backward_kernel(Shape s, const uint8_t* reset, const float* Rq, const float* Rk, const float* Rv,
                        const float* rb, const float* W0, const float* h0, const float* y, const float* WT,
                        const float* qs, const float* ks, const float* vs, const float* vbar, const float* betas,
                        const float* gy, const float* gWT, const float* ghT, float* dqx, float* dkx, float* dvx,
                        float* dbx, float* dW0, float* dh0, float* dR_part, float* drb_part) {
  // shared: per-warp partials of (dq, dk, dbeta) [nwarps][2d + 1], then of da [nwarps][d]
  float* smem = shared_memory();
  const int64_t d = s.E, n = blockIdx.x, N = s.N(), head = n % s.H, dd = d * d;
  const Tile<RPL, CPW> tl(d, d);
  const int w1 = int(2 * d + 1);
  float *P1 = smem, *P2 = smem + tl.nwarps * w1;
  float W[RPL][CPW], G[RPL][CPW], Aq[RPL][CPW], Ak[RPL][CPW], Av[RPL][CPW];
  float dAq[RPL][CPW], dAk[RPL][CPW], dAv[RPL][CPW], rbv[RPL], drbv[RPL] = {}, delta[CPW];
  tl.load(W, WT + n * dd);
  tl.load(G, gWT + n * dd);
  tl.load(Aq, Rq + head * dd);
  tl.load(Ak, Rk + head * dd);
  tl.load(Av, Rv + head * dd);
  tl.rows(rbv, rb + head * d);
  tl.zero(dAq), tl.zero(dAk), tl.zero(dAv);
  tl.cols(delta, ghT + n * d);  // dL/dy of the last step, from the final state h_T
  const Writes w{ks, vs, vbar, betas, d, d, 0, 1, 0};
  for (int64_t t = s.T - 1; t >= 0; --t) {
    const int64_t i = t * N + n;
    const bool rs = is_reset(reset, s, t, n);
    float g[CPW], a[RPL], qv[RPL], pdq[RPL], pdk[RPL] = {}, dv[CPW];
    WriteIn<RPL, CPW> in;  // k, v, vbar, beta of the step (after the activations)
    in.load(tl, w, i, true);
    tl.cols(g, gy + i * d);
#pragma unroll
    for (int j = 0; j < CPW; ++j) delta[j] += g[j];
    tl.rows(a, t > 0 ? y + (i - N) * d : h0 + n * d, rs);
#pragma unroll
    for (int r = 0; r < RPL; ++r) a[r] = tanhf(a[r]);
    tl.rows(qv, qs + i * d);
    tl.apply_part(W, delta, pdq);  // dq = W_t delta
    tl.add_outer(G, qv, delta);
    const float pdb = write_backward(tl, W, G, W0 + n * dd, w, reset, s, t, n, in, dv, pdk);
    tl.put_rows(P1, w1, pdq);
    tl.put_rows(P1 + d, w1, pdk);
    tl.put_scalar(P1 + 2 * d, w1, pdb);
    __syncthreads();
    float dq[RPL], dk[RPL], dqr[RPL], dkr[RPL], dqc[CPW], dkc[CPW], pda[RPL];
    tl.sum_rows(P1, w1, dq);
    tl.sum_rows(P1 + d, w1, dk);
    const float dbl = in.beta * (1.f - in.beta) * tl.sum_scalar(P1 + 2 * d, w1);  // through the sigmoid
    tl.softmax_backward_rows(qv, dq, dqr);
    tl.softmax_backward_rows(in.k, dk, dkr);
    tl.store_rows(dqr, dqx + i * d);
    tl.store_rows(dkr, dkx + i * d);
    tl.store_cols(dv, dvx + i * d);
    if (threadIdx.x == 0) dbx[i] = dbl;
    tl.rows_to_cols(dqr, dqc);
    tl.rows_to_cols(dkr, dkc);
    tl.apply_part(Aq, dqc, pda);  // da = Rq dqx + Rk dkx + Rv dv (+ rb dbx below)
    tl.apply_part(Ak, dkc, pda, true);
    tl.apply_part(Av, dv, pda, true);
    tl.add_outer(dAq, a, dqc);
    tl.add_outer(dAk, a, dkc);
    tl.add_outer(dAv, a, dv);
#pragma unroll
    for (int r = 0; r < RPL; ++r) drbv[r] += a[r] * dbl;
    tl.put_rows(P2, int(d), pda);
    __syncthreads();
    float da[RPL], dn[RPL];
    tl.sum_rows(P2, int(d), da);
    // a = tanh(h_{t-1}); after a reset h_{t-1} was replaced by zeros and gets no gradient
#pragma unroll
    for (int r = 0; r < RPL; ++r) dn[r] = rs ? 0.f : (1.f - a[r] * a[r]) * (da[r] + rbv[r] * dbl);
    tl.rows_to_cols(dn, delta);
  }
  tl.store(G, dW0 + n * dd);
  tl.store_cols(delta, dh0 + n * d);
  tl.store(dAq, dR_part + n * dd);
  tl.store(dAk, dR_part + (N + n) * dd);
  tl.store(dAv, dR_part + (2 * N + n) * dd);
  tl.store_rows(drbv, drb_part + n * d);
}

// out[j] = sum_b part[b][j] for part [B][size], in the order b = 0, 1, ...
__global__ void sum_over_batch_kernel(const float* part, float* out, int64_t B, int64_t size) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < size; j += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t b = 0; b < B; ++b) s += part[b * size + j];
    out[j] = s;
  }
}

void sum_over_batch(const float* part, float* out, int64_t B, int64_t size, cudaStream_t stream) {
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((size + threads - 1) / threads, 1024));
  RFWP_LAUNCH(blocks, threads, 0, stream, sum_over_batch_kernel)(part, out, B, size);
}

}  // namespace
}  // namespace rfwp

using namespace rfwp;

extern "C" const char* rfwp_rdn_forward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                        const float* qx, const float* kx, const float* vx, const float* bx,
                                        const float* Rq, const float* Rk, const float* Rv, const float* rb,
                                        const float* W0, const float* h0, float* y, float* WT, float* hT, float* qs,
                                        float* ks, float* vs, float* vbar, float* betas, void* stream) {
  return launch_recurrent(T, B, H, d, stream, [&](auto R, auto C, const Shape& s, int warps, cudaStream_t st) {
    const size_t smem = sizeof(float) * (3 * d + 4 * warps);
    RFWP_LAUNCH(s.N(), 32 * warps, smem, st, rdn_forward_kernel<decltype(R)::value, decltype(C)::value>)(
        s, reset, qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, h0, y, WT, hT, qs, ks, vs, vbar, betas);
  });
}

extern "C" const char* rfwp_rdn_backward(int64_t T, int64_t B, int64_t H, int64_t d, const uint8_t* reset,
                                         const float* Rq, const float* Rk, const float* Rv, const float* rb,
                                         const float* W0, const float* h0, const float* y, const float* WT,
                                         const float* qs, const float* ks, const float* vs, const float* vbar,
                                         const float* betas, const float* gy, const float* gWT, const float* ghT,
                                         float* dqx, float* dkx, float* dvx, float* dbx, float* dRq, float* dRk,
                                         float* dRv, float* drb, float* dW0, float* dh0, float* dR_part,
                                         float* drb_part, void* stream) {
  const char* err =
      launch_recurrent(T, B, H, d, stream, [&](auto R, auto C, const Shape& s, int warps, cudaStream_t st) {
        const size_t smem = sizeof(float) * warps * (3 * d + 1);
        RFWP_LAUNCH(s.N(), 32 * warps, smem, st, rdn_backward_kernel<decltype(R)::value, decltype(C)::value>)(
            s, reset, Rq, Rk, Rv, rb, W0, h0, y, WT, qs, ks, vs, vbar, betas, gy, gWT, ghT, dqx, dkx, dvx, dbx, dW0,
            dh0, dR_part, drb_part);
      });
  if (err != nullptr) return err;
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t Hdd = H * d * d;  // dR_part is [3][B][H][d][d]
  sum_over_batch(dR_part, dRq, B, Hdd, st);
  sum_over_batch(dR_part + B * Hdd, dRk, B, Hdd, st);
  sum_over_batch(dR_part + 2 * B * Hdd, dRv, B, Hdd, st);
  sum_over_batch(drb_part, drb, B, H * d, st);
  return launch_error();
}
