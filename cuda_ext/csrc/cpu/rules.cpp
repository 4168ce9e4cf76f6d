// Fused C++ CPU backend of the fast-weight update rules (sum, delta, RDN, Delta RNN, Delta LSTM), forward and
// backward, templated on the scalar type (float for speed, double to test against the float64 oracle).
//
// The loops mirror the CUDA kernels in ../cuda: one independent chain per (sample, head), the state kept in one
// buffer for the whole unroll, resets applied inside the loop, and the same backward scheme: one pass
// in reverse time that rebuilds W_{t-1} = W_t - k_t u_t^T by subtraction and, where step t reset the state,
// replays the segment before it from the saved writes. Equations and recursions: models.md §1.1, §2, §5;
// layouts: docs/api.md. Every per-step tensor is contiguous [T, B, H, ...], so chain n = b*H + h of step t
// starts at (t*N + n) * width.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "../binding.h"

namespace rfwp {
namespace {

struct Resets {
  const bool* p;
  int64_t B, H;
  bool at(int64_t t, int64_t n) const { return p != nullptr && p[t * B + n / H]; }
  // First step of the segment holding step t: the last reset at or before t, else 0.
  int64_t segment_start(int64_t t, int64_t n) const {
    while (t > 0 && !at(t, n)) --t;
    return t;
  }
};

// A per-step tensor [T, N, stride] seen at slot `offset` (a gate of the Delta LSTM, else 0).
template <class P>
struct Seq {
  P* p;
  int64_t N, stride, offset;
  P* at(int64_t t, int64_t n) const { return p + (t * N + n) * stride + offset; }
};

// ---- small dense helpers; matrices are key-major E x M (row e contiguous) -------------------------------

// The helpers' arguments never overlap (__restrict__), so the inner loops vectorize without alias checks.

// y[m] = sum_e W[e][m] x[e]  (W^T x: a read)
template <class S>
void read(const S* __restrict__ W, const S* __restrict__ x, S* __restrict__ y, int64_t E, int64_t M) {
  std::fill(y, y + M, S(0));
  for (int64_t e = 0; e < E; ++e) {
    const S xe = x[e];
    const S* __restrict__ w = W + e * M;
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) y[m] += xe * w[m];
  }
}

// y[e] (+)= sum_m W[e][m] x[m]  (W x: a gradient flowing back into keys or queries). `omp simd` lets the
// compiler split the sum into vector lanes (an order fixed at compile time, so results stay reproducible).
template <class S>
void apply(const S* __restrict__ W, const S* __restrict__ x, S* __restrict__ y, int64_t E, int64_t M,
           bool accumulate = false) {
  for (int64_t e = 0; e < E; ++e) {
    const S* w = W + e * M;
    S s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t m = 0; m < M; ++m) s += w[m] * x[m];
    y[e] = accumulate ? y[e] + s : s;
  }
}

// W += a b^T (sign = 1) or W -= a b^T (sign = -1)
template <class S>
void add_outer(S* __restrict__ W, const S* __restrict__ a, const S* __restrict__ b, int64_t E, int64_t M,
               S sign = S(1)) {
  for (int64_t e = 0; e < E; ++e) {
    const S ae = sign * a[e];
    S* __restrict__ w = W + e * M;
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) w[m] += ae * b[m];
  }
}

// exp over an array. float: a Cody-Waite range reduction and a polynomial (about 1 ulp, the Cephes expf
// coefficients) inlined as plain arithmetic instead of a libm call per element; double keeps std::exp (the
// float64 tests compare to rounding). GCC 12 at -O3 does not vectorize this loop (the clamp's float
// compares under -ftrapping-math); it is faster than std::exp even so.
inline void exp_array(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::min(std::max(x[i], -87.3f), 88.3f);
    const float k = (v * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(v / ln 2)
    const float r = (v - k * 0.693359375f) + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    x[i] = p * scale;
  }
}
inline void exp_array(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <class S>
void softmax(const S* x, S* y, int64_t d) {
  S mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < d; ++i) mx = std::max(mx, x[i]);
  for (int64_t i = 0; i < d; ++i) y[i] = x[i] - mx;
  exp_array(y, d);
  S sum = 0;
  for (int64_t i = 0; i < d; ++i) sum += y[i];
  for (int64_t i = 0; i < d; ++i) y[i] /= sum;
}

// y = sigmoid(x) and a = tanh(x) over arrays (x may be y / a), through exp_array.
template <class S>
void sigmoid_array(const S* x, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = -x[i];
  exp_array(y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = S(1) / (S(1) + y[i]);
}
inline void tanh_array(const double* x, double* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = std::tanh(x[i]);
}
// float: (1 - e) / (1 + e) with e = exp(-2|x|), and the odd Taylor series below |x| = 1/8 (where 1 - e cancels).
inline void tanh_array(const float* x, float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = -2.f * std::fabs(x[i]);
  exp_array(a, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i], e = a[i], v2 = v * v;
    const float big = std::copysign((1.f - e) / (1.f + e), v);
    const float small = v + v * v2 * (-1.f / 3 + v2 * (2.f / 15 + v2 * (-17.f / 315 + v2 * (62.f / 2835))));
    a[i] = std::fabs(v) < 0.125f ? small : big;
  }
}

// dx = y ⊙ (dy - <dy, y>): the softmax Jacobian applied to dy, where y = softmax(x).
template <class S>
void softmax_backward(const S* y, const S* dy, S* dx, int64_t d) {
  S dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < d; ++i) dot += dy[i] * y[i];
  for (int64_t i = 0; i < d; ++i) dx[i] = y[i] * (dy[i] - dot);
}

template <class S>
S sigmoid(S x) {
  return S(1) / (S(1) + std::exp(-x));
}

template <class S>
void load_or_zero(S* dst, const S* src, int64_t count, bool zero) {
  if (zero)
    std::fill(dst, dst + count, S(0));
  else
    std::copy(src, src + count, dst);
}

// ---- the writes into one fast-weight matrix ----------------------------------------------------------------

// Step t writes W += k_t u_t^T with u_t = beta_t (v_t - vbar_t) (delta rule, vbar_t = W_{t-1}^T k_t saved by
// the forward) or u_t = v_t (sum rule: vbar.p == nullptr). The forward and the replay both take u from here,
// so a replayed state is bitwise the forward's.
template <class S>
struct Writes {
  Seq<const S> k, v, vbar, beta;
  int64_t E, M;
  bool is_sum() const { return vbar.p == nullptr; }
  void u(int64_t t, int64_t n, S* out) const {
    const S* vt = v.at(t, n);
    if (is_sum()) {
      std::copy(vt, vt + M, out);
      return;
    }
    const S* vb = vbar.at(t, n);
    const S b = *beta.at(t, n);
    for (int64_t m = 0; m < M; ++m) out[m] = b * (vt[m] - vb[m]);
  }
};

// One forward step on one fast-weight matrix in (at most) two passes over it: vbar_t = Wsrc^T k_t (delta rule),
// then Wout = Wsrc + k_t u_t^T and y = Wout^T q_t together, each row of Wout read into y as it is written.
// Wsrc is the state before step t: the input state (so the output is written once, no copy first), Wout itself
// (in place, later steps), or nullptr (the zero state after a reset). Wout rows equal the replay's add_outer
// bitwise, and y accumulates over e in read()'s order.
template <class S>
void step(const S* Wsrc, S* Wout, int64_t t, int64_t n, const Writes<S>& w, S* vbar_out, S* u, const S* q, S* y) {
  const int64_t E = w.E, M = w.M;
  const S* k = w.k.at(t, n);
  if (!w.is_sum()) {
    if (Wsrc != nullptr)
      read(Wsrc, k, vbar_out, E, M);
    else
      std::fill(vbar_out, vbar_out + M, S(0));
  }
  w.u(t, n, u);
  std::fill(y, y + M, S(0));
  for (int64_t e = 0; e < E; ++e) {
    const S ke = k[e], qe = q[e];
    S* wo = Wout + e * M;
    if (Wsrc != nullptr) {
      const S* ws = Wsrc + e * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        const S x = ws[m] + ke * u[m];
        wo[m] = x;
        y[m] += qe * x;
      }
    } else {
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        const S x = S(0) + ke * u[m];
        wo[m] = x;
        y[m] += qe * x;
      }
    }
  }
}

// W <- the state right after step t, replayed from the start of its segment: from zero after a reset, from W0
// for the first segment. Used by the backward where step t+1 reset the state, so subtraction cannot recover it.
template <class S>
void replay(S* W, const S* W0, int64_t t, int64_t n, const Resets& R, const Writes<S>& w, S* u) {
  int64_t s = R.segment_start(t, n);
  load_or_zero(W, W0, w.E * w.M, R.at(s, n));
  for (; s <= t; ++s) {
    w.u(s, n, u);
    add_outer(W, w.k.at(s, n), u, w.E, w.M);
  }
}

// Backward of the write of step t (models.md §5.1, §5.2). On entry W = W_t and G = dL/dW_t including the
// reads of step t; writes dk_t, dv_t and (delta rule) dbeta_t; on exit W = W_{t-1} and G = dL/dW_{t-1}.
// At a reset step the earlier state influenced nothing: G <- 0 and W is replayed.
template <class S>
void write_backward(S* W, S* G, const S* W0, int64_t t, int64_t n, const Resets& R, const Writes<S>& w, S* dk,
                    S* dv, S* dbeta, S* u, S* du) {
  const int64_t E = w.E, M = w.M;
  const S* k = w.k.at(t, n);
  w.u(t, n, u);
  read(G, k, du, E, M);  // du = G^T k
  apply(G, u, dk, E, M);  // dk = G u
  if (w.is_sum()) {
    std::copy(du, du + M, dv);
  } else {
    const S* v = w.v.at(t, n);
    const S* vb = w.vbar.at(t, n);
    const S b = *w.beta.at(t, n);
    S db = 0;
    for (int64_t m = 0; m < M; ++m) {
      dv[m] = b * du[m];
      db += du[m] * (v[m] - vb[m]);
      du[m] = -b * du[m];  // now dL/dvbar_t
    }
    *dbeta = db;
  }
  if (R.at(t, n)) {
    std::fill(G, G + E * M, S(0));
    if (t > 0) replay(W, W0, t - 1, n, R, w, u);
    return;
  }
  add_outer(W, k, u, E, M, S(-1));  // W_{t-1}
  if (!w.is_sum()) {
    apply(W, du, dk, E, M, true);  // dk += W_{t-1} dvbar
    add_outer(G, k, du, E, M);     // vbar_t = W_{t-1}^T k_t feeds back into W_{t-1}
  }
}

// Run body(n, scratch) for every chain n in parallel; `work` is the rough cost of one chain.
template <class F>
void for_chains(int64_t N, int64_t work, F body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) body(n);
  });
}

// ---- sum rule and delta rule (one code path: the sum rule is a write without vbar) ------------------------

template <class S>
void linear_forward_loop(const Dims& d, const Resets& R, const S* q, const Writes<S>& w, const S* W0, S* y, S* WT,
                    S* vbar) {
  const int64_t E = d.E, M = d.M, N = d.N();
  for_chains(N, d.T * E * M * 3, [&](int64_t n) {
    S* W = WT + n * E * M;  // the state evolves in the output buffer
    std::vector<S> u(M);
    for (int64_t t = 0; t < d.T; ++t) {
      const S* src = R.at(t, n) ? nullptr : t == 0 ? W0 + n * E * M : W;
      step(src, W, t, n, w, vbar ? vbar + (t * N + n) * M : nullptr, u.data(), q + (t * N + n) * E,
           y + (t * N + n) * M);
    }
  });
}

template <class S>
void linear_backward_loop(const Dims& d, const Resets& R, const S* q, const Writes<S>& w, const S* W0, const S* WT,
                     const S* gy, const S* gWT, S* dq, S* dk, S* dv, S* dbeta, S* dW0) {
  const int64_t E = d.E, M = d.M, N = d.N();
  for_chains(N, d.T * E * M * 7, [&](int64_t n) {
    std::vector<S> W(WT + n * E * M, WT + (n + 1) * E * M), u(M), du(M);
    S* G = dW0 + n * E * M;  // dL/dW_t evolves in the output buffer and ends as dL/dW0
    std::copy(gWT + n * E * M, gWT + (n + 1) * E * M, G);
    for (int64_t t = d.T - 1; t >= 0; --t) {
      const int64_t i = t * N + n;
      const S* g = gy + i * M;
      apply(W.data(), g, dq + i * E, E, M);  // dq_t = W_t g_t
      add_outer(G, q + i * E, g, E, M);      // y_t = W_t^T q_t
      write_backward(W.data(), G, W0 + n * E * M, t, n, R, w, dk + i * E, dv + i * M, dbeta ? dbeta + i : nullptr,
                     u.data(), du.data());
    }
  });
}

// ---- RDN (models.md §2.5, §5.3) ----------------------------------------------------------------------------

template <class S>
struct RdnSlow {  // the slow recurrent weights of one head
  const S *Rq, *Rk, *Rv, *rb;
};

template <class S>
RdnSlow<S> rdn_head(const S* Rq, const S* Rk, const S* Rv, const S* rb, int64_t h, int64_t d) {
  return {Rq + h * d * d, Rk + h * d * d, Rv + h * d * d, rb + h * d};
}

template <class S>
void rdn_forward_loop(const Dims& D, const Resets& R, const S* qx, const S* kx, const S* vx, const S* bx, const S* Rq,
                 const S* Rk, const S* Rv, const S* rb, const S* W0, const S* h0, S* y, S* WT, S* hT, S* qs,
                 S* ks, S* vs, S* vbar, S* betas) {
  const int64_t d = D.E, N = D.N();
  const Writes<S> w{{ks, N, d, 0}, {vs, N, d, 0}, {vbar, N, d, 0}, {betas, N, 1, 0}, d, d};
  // Head-major chain order (n = b*H + h for j = h*B + b): consecutive chains share Rq, Rk, Rv, which stay in
  // cache while the fast weights stream.
  for_chains(N, D.T * d * d * 6, [&](int64_t j) {
    const int64_t n = (j % D.B) * D.H + j / D.B;
    const RdnSlow<S> P = rdn_head(Rq, Rk, Rv, rb, n % D.H, d);
    S *W = WT + n * d * d, *h = hT + n * d;  // the state evolves in the output buffers
    std::copy(h0 + n * d, h0 + (n + 1) * d, h);
    std::vector<S> a(d), lq(d), lk(d), u(d);
    for (int64_t t = 0; t < D.T; ++t) {
      const int64_t i = t * N + n;
      const bool reset = R.at(t, n);
      if (reset) std::fill(h, h + d, S(0));
      tanh_array(h, a.data(), d);
      S* lv = vs + i * d;
      std::copy(qx + i * d, qx + (i + 1) * d, lq.data());
      std::copy(kx + i * d, kx + (i + 1) * d, lk.data());
      std::copy(vx + i * d, vx + (i + 1) * d, lv);
      S bl = bx[i];
      for (int64_t e = 0; e < d; ++e) {  // l += R^T a for Rq, Rk, Rv in one pass
        const S ae = a[e];
        const S *rq = P.Rq + e * d, *rk = P.Rk + e * d, *rv = P.Rv + e * d;
        S *pq = lq.data(), *pk = lk.data();
#pragma omp simd
        for (int64_t m = 0; m < d; ++m) {
          pq[m] += ae * rq[m];
          pk[m] += ae * rk[m];
          lv[m] += ae * rv[m];
        }
        bl += ae * P.rb[e];
      }
      softmax(lq.data(), qs + i * d, d);
      softmax(lk.data(), ks + i * d, d);
      betas[i] = sigmoid(bl);
      const S* src = reset ? nullptr : t == 0 ? W0 + n * d * d : W;
      step(src, W, t, n, w, vbar + i * d, u.data(), qs + i * d, y + i * d);
      std::copy(y + i * d, y + (i + 1) * d, h);
    }
  });
}

// dRq etc. are per-chain partials [N, d, d] (summed over the batch by the caller in a fixed order).
template <class S>
void rdn_backward_loop(const Dims& D, const Resets& R, const S* Rq, const S* Rk, const S* Rv, const S* rb, const S* W0,
                  const S* h0, const S* y, const S* WT, const S* qs, const S* ks, const S* vs, const S* vbar,
                  const S* betas, const S* gy, const S* gWT, const S* ghT, S* dqx, S* dkx, S* dvx, S* dbx,
                  S* dRq_n, S* dRk_n, S* dRv_n, S* drb_n, S* dW0, S* dh0) {
  const int64_t d = D.E, N = D.N();
  const Writes<S> w{{ks, N, d, 0}, {vs, N, d, 0}, {vbar, N, d, 0}, {betas, N, 1, 0}, d, d};
  for_chains(N, D.T * d * d * 14, [&](int64_t n) {
    const RdnSlow<S> P = rdn_head(Rq, Rk, Rv, rb, n % D.H, d);
    std::vector<S> W(WT + n * d * d, WT + (n + 1) * d * d), G(gWT + n * d * d, gWT + (n + 1) * d * d);
    std::vector<S> delta(ghT + n * d, ghT + (n + 1) * d), a(d), dq(d), dk(d), u(d), du(d), da(d);
    S *dRq = dRq_n + n * d * d, *dRk = dRk_n + n * d * d, *dRv = dRv_n + n * d * d, *drb = drb_n + n * d;
    std::fill(dRq, dRq + d * d, S(0)), std::fill(dRk, dRk + d * d, S(0)), std::fill(dRv, dRv + d * d, S(0));
    std::fill(drb, drb + d, S(0));
    for (int64_t t = D.T - 1; t >= 0; --t) {
      const int64_t i = t * N + n;
      const bool reset = R.at(t, n);
      const S* hprev = t > 0 ? y + (i - N) * d : h0 + n * d;
      for (int64_t e = 0; e < d; ++e) {
        a[e] = reset ? S(0) : std::tanh(hprev[e]);
        delta[e] += gy[i * d + e];
      }
      apply(W.data(), delta.data(), dq.data(), d, d);  // dq = W_t delta
      softmax_backward(qs + i * d, dq.data(), dqx + i * d, d);
      add_outer(G.data(), qs + i * d, delta.data(), d, d);
      S db;
      write_backward(W.data(), G.data(), W0 + n * d * d, t, n, R, w, dk.data(), dvx + i * d, &db, u.data(),
                     du.data());
      const S b = betas[i];
      dbx[i] = b * (S(1) - b) * db;
      softmax_backward(ks + i * d, dk.data(), dkx + i * d, d);
      apply(P.Rq, dqx + i * d, da.data(), d, d);
      apply(P.Rk, dkx + i * d, da.data(), d, d, true);
      apply(P.Rv, dvx + i * d, da.data(), d, d, true);
      add_outer(dRq, a.data(), dqx + i * d, d, d);
      add_outer(dRk, a.data(), dkx + i * d, d, d);
      add_outer(dRv, a.data(), dvx + i * d, d, d);
      for (int64_t e = 0; e < d; ++e) {
        drb[e] += a[e] * dbx[i];
        // a = tanh(h_{t-1}); after a reset h_{t-1} was replaced by zeros and gets no gradient
        delta[e] = reset ? S(0) : (S(1) - a[e] * a[e]) * (da[e] + P.rb[e] * dbx[i]);
      }
    }
    std::copy(G.begin(), G.end(), dW0 + n * d * d);
    std::copy(delta.begin(), delta.end(), dh0 + n * d);
  });
}

// out[h] = sum_b part[b, h] in the order b = 0, 1, ... (deterministic), for part [B, H, size].
template <class S>
void sum_over_batch(const S* part, S* out, int64_t B, int64_t H, int64_t size) {
  const int64_t n = H * size;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    std::copy(part + begin, part + end, out + begin);
    for (int64_t b = 1; b < B; ++b) {
      const S* p = part + b * n;
      for (int64_t j = begin; j < end; ++j) out[j] += p[j];
    }
  });
}

// ---- Delta RNN v2, recurrent part (models.md §2.6, §5.4) --------------------------------------------------

template <class S>
void drnn_forward_loop(const Dims& D, const Resets& R, const S* z, const Writes<S>& w, const S* R0, const S* h0, S* y,
                  S* RT, S* hT, S* vbar) {
  const int64_t d = D.E, N = D.N();
  for_chains(N, D.T * d * d * 4, [&](int64_t n) {
    S *Rm = RT + n * d * d, *h = hT + n * d;  // the state evolves in the output buffers
    std::copy(h0 + n * d, h0 + (n + 1) * d, h);
    std::vector<S> s(d), u(d);
    for (int64_t t = 0; t < D.T; ++t) {
      const int64_t i = t * N + n;
      const bool reset = R.at(t, n);
      if (reset) std::fill(h, h + d, S(0));
      softmax(h, s.data(), d);
      step(reset ? nullptr : t == 0 ? R0 + n * d * d : Rm, Rm, t, n, w, vbar + i * d, u.data(), s.data(), h);
      for (int64_t m = 0; m < d; ++m) y[i * d + m] = (h[m] += z[i * d + m]);
    }
  });
}

template <class S>
void drnn_backward_loop(const Dims& D, const Resets& R, const Writes<S>& w, const S* R0, const S* h0, const S* y,
                   const S* RT, const S* gy, const S* gRT, const S* ghT, S* dz, S* dkr, S* dvr, S* dbr, S* dR0,
                   S* dh0) {
  const int64_t d = D.E, N = D.N();
  for_chains(N, D.T * d * d * 8, [&](int64_t n) {
    std::vector<S> Rm(RT + n * d * d, RT + (n + 1) * d * d), G(gRT + n * d * d, gRT + (n + 1) * d * d);
    std::vector<S> delta(ghT + n * d, ghT + (n + 1) * d), hp(d), s(d), ds(d), u(d), du(d);
    for (int64_t t = D.T - 1; t >= 0; --t) {
      const int64_t i = t * N + n;
      const bool reset = R.at(t, n);
      load_or_zero(hp.data(), t > 0 ? y + (i - N) * d : h0 + n * d, d, reset);
      softmax(hp.data(), s.data(), d);
      for (int64_t m = 0; m < d; ++m) dz[i * d + m] = (delta[m] += gy[i * d + m]);
      apply(Rm.data(), delta.data(), ds.data(), d, d);  // ds = R_t delta
      add_outer(G.data(), s.data(), delta.data(), d, d);
      write_backward(Rm.data(), G.data(), R0 + n * d * d, t, n, R, w, dkr + i * d, dvr + i * d, dbr + i,
                     u.data(), du.data());
      softmax_backward(s.data(), ds.data(), delta.data(), d);
      if (reset) std::fill(delta.begin(), delta.end(), S(0));
    }
    std::copy(G.begin(), G.end(), dR0 + n * d * d);
    std::copy(delta.begin(), delta.end(), dh0 + n * d);
  });
}

// ---- Delta LSTM v4, recurrent part (models.md §2.7, §5.5); gates g = (i, u, o) ------------------------------

template <class S>
std::array<Writes<S>, 3> lstm_writes(const S* kr, const S* vr, const S* br, const S* vbar, int64_t N, int64_t d) {
  std::array<Writes<S>, 3> w;
  for (int64_t g = 0; g < 3; ++g)
    w[g] = Writes<S>{{kr, N, 3 * d, g * d}, {vr, N, 3 * d, g * d}, {vbar, N, 3 * d, g * d}, {br, N, 3, g}, d, d};
  return w;
}

template <class S>
void dlstm_forward_loop(const Dims& D, const Resets& R, const S* z, const S* kr, const S* vr, const S* br, const S* R0,
                   const S* h0, const S* c0, S* y, S* RT, S* hT, S* cT, S* vbar, S* gates, S* cs) {
  const int64_t d = D.E, N = D.N(), dd = d * d;
  const auto w = lstm_writes(kr, vr, br, vbar, N, d);
  for_chains(N, D.T * dd * 12, [&](int64_t n) {
    S *Rm = RT + n * 3 * dd, *h = hT + n * d, *c = cT + n * d;  // the state evolves in the output buffers
    std::copy(h0 + n * d, h0 + (n + 1) * d, h);
    std::copy(c0 + n * d, c0 + (n + 1) * d, c);
    std::vector<S> s(d), u(d), pre(3 * d);
    for (int64_t t = 0; t < D.T; ++t) {
      const int64_t i = t * N + n;
      const bool reset = R.at(t, n);
      if (reset) {
        std::fill(h, h + d, S(0));
        std::fill(c, c + d, S(0));
      }
      softmax(h, s.data(), d);
      const S* src = reset ? nullptr : t == 0 ? R0 + n * 3 * dd : Rm;
      for (int64_t g = 0; g < 3; ++g)
        step(src ? src + g * dd : nullptr, Rm + g * dd, t, n, w[g], vbar + (i * 3 + g) * d, u.data(), s.data(),
             pre.data() + g * d);
      S* gt = gates + i * 3 * d;
      const S* zt = z + i * 3 * d;
      for (int64_t m = 0; m < 3 * d; ++m) gt[m] = pre[m] + zt[m];
      sigmoid_array(gt, gt, d);                  // input gate
      sigmoid_array(gt + 2 * d, gt + 2 * d, d);  // output gate
      for (int64_t m = 0; m < d; ++m) {
        const S ig = gt[m], ug = gt[d + m], og = gt[2 * d + m];
        c[m] = ig * ug + (S(1) - ig) * c[m];
        h[m] = og * c[m];
        cs[i * d + m] = c[m];
        y[i * d + m] = h[m];
      }
    }
  });
}

template <class S>
void dlstm_backward_loop(const Dims& D, const Resets& R, const S* kr, const S* vr, const S* br, const S* R0,
                    const S* h0, const S* c0, const S* y, const S* RT, const S* vbar, const S* gates, const S* cs,
                    const S* gy, const S* gRT, const S* ghT, const S* gcT, S* dz, S* dkr, S* dvr, S* dbr, S* dR0,
                    S* dh0, S* dc0) {
  const int64_t d = D.E, N = D.N(), dd = d * d;
  const auto w = lstm_writes(kr, vr, br, vbar, N, d);
  for_chains(N, D.T * dd * 24, [&](int64_t n) {
    std::vector<S> Rm(RT + n * 3 * dd, RT + (n + 1) * 3 * dd), G(gRT + n * 3 * dd, gRT + (n + 1) * 3 * dd);
    std::vector<S> delta(ghT + n * d, ghT + (n + 1) * d), dc(gcT + n * d, gcT + (n + 1) * d);
    std::vector<S> hp(d), s(d), ds(d), u(d), du(d);
    for (int64_t t = D.T - 1; t >= 0; --t) {
      const int64_t i = t * N + n;
      const bool reset = R.at(t, n);
      load_or_zero(hp.data(), t > 0 ? y + (i - N) * d : h0 + n * d, d, reset);
      softmax(hp.data(), s.data(), d);
      const S* cprev = t > 0 ? cs + (i - N) * d : c0 + n * d;
      const S* gt = gates + i * 3 * d;
      S* dpre = dz + i * 3 * d;  // dL/dz_g = dL/d(pre-activation of gate g)
      for (int64_t m = 0; m < d; ++m) {
        const S ig = gt[m], ug = gt[d + m], og = gt[2 * d + m], cp = reset ? S(0) : cprev[m];
        const S dy = delta[m] + gy[i * d + m];
        const S dct = dc[m] + dy * og;
        dpre[m] = dct * (ug - cp) * ig * (S(1) - ig);
        dpre[d + m] = dct * ig;
        dpre[2 * d + m] = dy * cs[i * d + m] * og * (S(1) - og);
        dc[m] = reset ? S(0) : dct * (S(1) - ig);
      }
      for (int64_t g = 0; g < 3; ++g) {
        apply(Rm.data() + g * dd, dpre + g * d, ds.data(), d, d, g > 0);  // ds = sum_g R_g,t dpre_g
        add_outer(G.data() + g * dd, s.data(), dpre + g * d, d, d);
        write_backward(Rm.data() + g * dd, G.data() + g * dd, R0 + n * 3 * dd + g * dd, t, n, R, w[g],
                       dkr + (i * 3 + g) * d, dvr + (i * 3 + g) * d, dbr + i * 3 + g, u.data(), du.data());
      }
      softmax_backward(s.data(), ds.data(), delta.data(), d);
      if (reset) std::fill(delta.begin(), delta.end(), S(0));
    }
    std::copy(G.begin(), G.end(), dR0 + n * 3 * dd);
    std::copy(delta.begin(), delta.end(), dh0 + n * d);
    std::copy(dc.begin(), dc.end(), dc0 + n * d);
  });
}

// ---- the entry points called by Bindings<CpuImpl> (binding.h): the CUDA launchers' argument lists ---------

struct CpuImpl {
  static void check_first(const char* fn, const Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), fn, ": the cpu backend needs CPU tensors, got ", t.device());
  }
  template <class F>
  static void dispatch(at::ScalarType dtype, F&& f) {
    if (dtype == at::kFloat)
      f(float{});
    else if (dtype == at::kDouble)
      f(double{});
    else
      TORCH_CHECK(false, "rfwp cpu backend: float32 or float64 tensors are required, got ", dtype);
  }

  template <class S>
  static Writes<S> linear_writes(const Dims& d, const S* k, const S* v, const S* beta, const S* vbar) {
    return {{k, d.N(), d.E, 0}, {v, d.N(), d.M, 0}, {vbar, d.N(), d.M, 0}, {beta, d.N(), 1, 0}, d.E, d.M};
  }
  template <class S>
  static Writes<S> square_writes(const Dims& d, const S* k, const S* v, const S* beta, const S* vbar) {
    return {{k, d.N(), d.E, 0}, {v, d.N(), d.E, 0}, {vbar, d.N(), d.E, 0}, {beta, d.N(), 1, 0}, d.E, d.E};
  }

  template <class S>
  static void linear_forward(const Dims& d, const bool* r, const S* q, const S* k, const S* v, const S* beta,
                             const S* W0, S* y, S* WT, S* vbar, void*) {
    linear_forward_loop<S>(d, {r, d.B, d.H}, q, linear_writes<S>(d, k, v, beta, vbar), W0, y, WT, vbar);
  }
  template <class S>
  static void linear_backward(const Dims& d, const bool* r, const S* q, const S* k, const S* v, const S* beta,
                              const S* W0, const S* WT, const S* vbar, const S* gy, const S* gWT, S* dq, S* dk,
                              S* dv, S* dbeta, S* dW0, void*) {
    linear_backward_loop<S>(d, {r, d.B, d.H}, q, linear_writes<S>(d, k, v, beta, vbar), W0, WT, gy, gWT, dq, dk,
                            dv, dbeta, dW0);
  }
  template <class S>
  static void rdn_forward(const Dims& d, const bool* r, const S* qx, const S* kx, const S* vx, const S* bx,
                          const S* Rq, const S* Rk, const S* Rv, const S* rb, const S* W0, const S* h0, S* y, S* WT,
                          S* hT, S* qs, S* ks, S* vs, S* vbar, S* betas, void*) {
    rdn_forward_loop<S>(d, {r, d.B, d.H}, qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, h0, y, WT, hT, qs, ks, vs, vbar,
                        betas);
  }
  template <class S>
  static void rdn_backward(const Dims& d, const bool* r, const S* Rq, const S* Rk, const S* Rv, const S* rb,
                           const S* W0, const S* h0, const S* y, const S* WT, const S* qs, const S* ks, const S* vs,
                           const S* vbar, const S* betas, const S* gy, const S* gWT, const S* ghT, S* dqx, S* dkx,
                           S* dvx, S* dbx, S* dRq, S* dRk, S* dRv, S* drb, S* dW0, S* dh0, S* dR_part, S* drb_part,
                           void*) {
    const int64_t Ndd = d.N() * d.E * d.E, dd = d.E * d.E;
    rdn_backward_loop<S>(d, {r, d.B, d.H}, Rq, Rk, Rv, rb, W0, h0, y, WT, qs, ks, vs, vbar, betas, gy, gWT, ghT,
                         dqx, dkx, dvx, dbx, dR_part, dR_part + Ndd, dR_part + 2 * Ndd, drb_part, dW0, dh0);
    sum_over_batch<S>(dR_part, dRq, d.B, d.H, dd);
    sum_over_batch<S>(dR_part + Ndd, dRk, d.B, d.H, dd);
    sum_over_batch<S>(dR_part + 2 * Ndd, dRv, d.B, d.H, dd);
    sum_over_batch<S>(drb_part, drb, d.B, d.H, d.E);
  }
  template <class S>
  static void delta_rnn_forward(const Dims& d, const bool* r, const S* z, const S* kr, const S* vr, const S* br,
                                const S* R0, const S* h0, S* y, S* RT, S* hT, S* vbar, void*) {
    drnn_forward_loop<S>(d, {r, d.B, d.H}, z, square_writes<S>(d, kr, vr, br, vbar), R0, h0, y, RT, hT, vbar);
  }
  template <class S>
  static void delta_rnn_backward(const Dims& d, const bool* r, const S* kr, const S* vr, const S* br, const S* R0,
                                 const S* h0, const S* y, const S* RT, const S* vbar, const S* gy, const S* gRT,
                                 const S* ghT, S* dz, S* dkr, S* dvr, S* dbr, S* dR0, S* dh0, void*) {
    drnn_backward_loop<S>(d, {r, d.B, d.H}, square_writes<S>(d, kr, vr, br, vbar), R0, h0, y, RT, gy, gRT, ghT, dz,
                          dkr, dvr, dbr, dR0, dh0);
  }
  template <class S>
  static void delta_lstm_forward(const Dims& d, const bool* r, const S* z, const S* kr, const S* vr, const S* br,
                                 const S* R0, const S* h0, const S* c0, S* y, S* RT, S* hT, S* cT, S* vbar, S* gates,
                                 S* cs, void*) {
    dlstm_forward_loop<S>(d, {r, d.B, d.H}, z, kr, vr, br, R0, h0, c0, y, RT, hT, cT, vbar, gates, cs);
  }
  template <class S>
  static void delta_lstm_backward(const Dims& d, const bool* r, const S* kr, const S* vr, const S* br, const S* R0,
                                  const S* h0, const S* c0, const S* y, const S* RT, const S* vbar, const S* gates,
                                  const S* cs, const S* gy, const S* gRT, const S* ghT, const S* gcT, S* dz, S* dkr,
                                  S* dvr, S* dbr, S* dR0, S* dh0, S* dc0, void*) {
    dlstm_backward_loop<S>(d, {r, d.B, d.H}, kr, vr, br, R0, h0, c0, y, RT, vbar, gates, cs, gy, gRT, ghT, gcT, dz,
                           dkr, dvr, dbr, dR0, dh0, dc0);
  }
};

}  // namespace
}  // namespace rfwp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rfwp fused CPU kernels of the fast-weight update rules (see cuda_ext/functions.py)";
  rfwp::Bindings<rfwp::CpuImpl>::define(m);
}
