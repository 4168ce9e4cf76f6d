// Device building blocks shared by the fast-weight kernels. No PyTorch headers: every .cu file compiles with
// plain `nvcc -c` (CI checks that on a machine without a GPU).
//
// Layout (docs/kernels.md §1): one thread block per chain (sample b, head h), n = b*H + h. The fast-weight
// matrix W[e][m] (key-major, E x M) lives in registers for the whole unroll: warp w owns the value columns
// m = w + j*nwarps (j < CPW) and lane l the key rows e = l + 32*r (r < RPL). Column m of W evolves on its own
// given the step's inputs, so the chain of a delta-rule step (W^T k, the write, W^T q) is a few warp-shuffle
// reductions with no block barrier. Sums over columns (W x: the gradients of keys and queries, and everything
// that feeds a recurrence) are per-warp partials in shared memory added in a fixed warp order after a barrier;
// no float atomics anywhere, so results are bitwise reproducible. Rows >= E and columns >= M hold zeros, so
// any head size up to 64 works. Every per-step tensor is contiguous [T, B, H, ...].
#pragma once

#ifdef RFWP_EMULATE
#include "emulator.h"
#else
#include <cuda_runtime.h>
// kernel<<<grid, threads, smem, stream>>>, written RFWP_LAUNCH(grid, threads, smem, stream, kernel)(args...)
// so that the emulator can run the same launch on the CPU.
#define RFWP_LAUNCH(grid, threads, smem, stream, ...) __VA_ARGS__<<<grid, threads, smem, stream>>>
#endif

#include <cstdint>
#include <type_traits>

namespace rfwp {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxDim = 64;

struct Shape {  // one call: T steps, B samples, H heads, E key size, M value size
  int64_t T, B, H, E, M;
  __host__ __device__ int64_t N() const { return B * H; }
};

// The block's dynamic shared memory.
__device__ __forceinline__ float* shared_memory() {
#ifdef RFWP_EMULATE
  return rfwp_emu::shared_memory();
#else
  extern __shared__ float rfwp_shared[];
  return rfwp_shared;
#endif
}

__device__ __forceinline__ bool is_reset(const uint8_t* reset, const Shape& s, int64_t t, int64_t n) {
  return reset != nullptr && reset[t * s.B + n / s.H] != 0;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Butterfly reductions: every lane ends with the result. The K values reduce side by side (independent
// shuffles in flight instead of K dependent chains).
template <int K>
__device__ __forceinline__ void warp_sum(float (&x)[K]) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int j = 0; j < K; ++j) x[j] += __shfl_xor_sync(kFull, x[j], o);
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  float a[1] = {x};
  warp_sum<1>(a);
  return a[0];
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

// The part of one chain's state held by this thread, and the operations on it.
template <int RPL, int CPW>
struct Tile {
  using Mat = float[RPL][CPW];
  using Rows = float[RPL];
  using Cols = float[CPW];

  int lane, warp, nwarps, E, M;

  __device__ Tile(int64_t E_, int64_t M_)
      : lane(threadIdx.x & 31), warp(threadIdx.x >> 5), nwarps(blockDim.x >> 5), E(int(E_)), M(int(M_)) {}

  __device__ int row(int r) const { return lane + 32 * r; }
  __device__ int col(int j) const { return warp + j * nwarps; }
  __device__ bool has_row(int r) const { return row(r) < E; }
  __device__ bool has_col(int j) const { return col(j) < M; }

  __device__ void zero(Mat& A) const {
#pragma unroll
    for (int r = 0; r < RPL; ++r)
#pragma unroll
      for (int j = 0; j < CPW; ++j) A[r][j] = 0.f;
  }
  __device__ void load(Mat& A, const float* p) const {  // p: one E x M matrix
#pragma unroll
    for (int r = 0; r < RPL; ++r)
#pragma unroll
      for (int j = 0; j < CPW; ++j) A[r][j] = has_row(r) && has_col(j) ? p[row(r) * M + col(j)] : 0.f;
  }
  __device__ void store(const Mat& A, float* p) const {
#pragma unroll
    for (int r = 0; r < RPL; ++r)
#pragma unroll
      for (int j = 0; j < CPW; ++j)
        if (has_row(r) && has_col(j)) p[row(r) * M + col(j)] = A[r][j];
  }
  // Zeros instead where `zero` (p is read anyway: a load then a select keeps the register use of the kernels).
  __device__ void rows(Rows& x, const float* p, bool zero = false) const {
#pragma unroll
    for (int r = 0; r < RPL; ++r) {
      const float v = has_row(r) ? p[row(r)] : 0.f;
      x[r] = zero ? 0.f : v;
    }
  }
  __device__ void cols(Cols& x, const float* p) const {  // a broadcast load: all lanes read one address
#pragma unroll
    for (int j = 0; j < CPW; ++j) x[j] = has_col(j) ? p[col(j)] : 0.f;
  }
  __device__ void store_rows(const Rows& x, float* p) const {  // by warp 0 (every warp holds all rows)
    if (warp != 0) return;
#pragma unroll
    for (int r = 0; r < RPL; ++r)
      if (has_row(r)) p[row(r)] = x[r];
  }
  __device__ void store_cols(const Cols& x, float* p) const {  // by lane 0 (all lanes hold the same value)
    if (lane != 0) return;
#pragma unroll
    for (int j = 0; j < CPW; ++j)
      if (has_col(j)) p[col(j)] = x[j];
  }

  // y[j] = sum_e A[e][m_j] x[e] (A^T x), complete in every lane.
  __device__ void read(const Mat& A, const Rows& x, Cols& y) const {
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
      y[j] = 0.f;
#pragma unroll
      for (int r = 0; r < RPL; ++r) y[j] += A[r][j] * x[r];
    }
    warp_sum<CPW>(y);
  }
  // y = A^T x + the columns at p (an input of the step), complete in every lane.
  __device__ void read_add(const Mat& A, const Rows& x, const float* p, Cols& y) const {
    Cols z;
    read(A, x, y);
    cols(z, p);
#pragma unroll
    for (int j = 0; j < CPW; ++j) y[j] += z[j];
  }
  // y[r] (+)= sum over this warp's columns of A[e_r][m_j] x[j]: this warp's share of A x.
  __device__ void apply_part(const Mat& A, const Cols& x, Rows& y, bool accumulate = false) const {
#pragma unroll
    for (int r = 0; r < RPL; ++r) {
      float s = accumulate ? y[r] : 0.f;
#pragma unroll
      for (int j = 0; j < CPW; ++j) s += A[r][j] * x[j];
      y[r] = s;
    }
  }
  // A += sign * a b^T
  __device__ void add_outer(Mat& A, const Rows& a, const Cols& b, float sign = 1.f) const {
#pragma unroll
    for (int r = 0; r < RPL; ++r) {
      const float ar = sign * a[r];
#pragma unroll
      for (int j = 0; j < CPW; ++j) A[r][j] += ar * b[j];
    }
  }
  // The value of row m of a row vector (held by lane m % 32 in slot m / 32), in every lane.
  __device__ float row_value(const Rows& x, int m) const {
    float out = 0.f;
#pragma unroll
    for (int r = 0; r < RPL; ++r) {
      const float v = __shfl_sync(kFull, x[r], m & 31);
      if ((m >> 5) == r) out = v;
    }
    return out;
  }
  __device__ void rows_to_cols(const Rows& x, Cols& y) const {
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
      const float v = row_value(x, col(j));  // shuffles outside the branch: every warp runs the same ones
      y[j] = has_col(j) ? v : 0.f;
    }
  }
  // y = softmax(x) over the E rows; every warp computes it (no barrier).
  __device__ void softmax_rows(const Rows& x, Rows& y) const {
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < RPL; ++r)
      if (has_row(r)) mx = fmaxf(mx, x[r]);
    mx = warp_max(mx);
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < RPL; ++r) s += (y[r] = has_row(r) ? expf(x[r] - mx) : 0.f);
    s = warp_sum(s);
#pragma unroll
    for (int r = 0; r < RPL; ++r) y[r] /= s;
  }
  // y = softmax of the rows at p, or of zeros where `zero` (the recurrent rules' s = softmax(y_{t-1})).
  __device__ void softmax_of(const float* p, bool zero, Rows& y) const {
    Rows x;
    rows(x, p, zero);
    softmax_rows(x, y);
  }
  // dx = y ⊙ (dy - <dy, y>) over the rows, for y = softmax(x); zeros where `zero` (x was replaced by zeros
  // after a reset, so the state before it gets no gradient).
  __device__ void softmax_backward_rows(const Rows& y, const Rows& dy, Rows& dx, bool zero = false) const {
    float dot = 0.f;
#pragma unroll
    for (int r = 0; r < RPL; ++r) dot += dy[r] * y[r];
    dot = warp_sum(dot);
#pragma unroll
    for (int r = 0; r < RPL; ++r) dx[r] = zero ? 0.f : y[r] * (dy[r] - dot);
  }
  // Cross-warp sums of row partials in a shared buffer [nwarps][stride]: put() before a barrier, sum() after
  // it, adding the warps in a fixed order.
  __device__ void put_rows(float* buf, int stride, const Rows& x) const {
#pragma unroll
    for (int r = 0; r < RPL; ++r)
      if (has_row(r)) buf[warp * stride + row(r)] = x[r];
  }
  __device__ void sum_rows(const float* buf, int stride, Rows& x) const {
#pragma unroll
    for (int r = 0; r < RPL; ++r) {
      float s = 0.f;
      if (has_row(r))
        for (int w = 0; w < nwarps; ++w) s += buf[w * stride + row(r)];
      x[r] = s;
    }
  }
  __device__ void put_scalar(float* buf, int stride, float x) const {
    if (lane == 0) buf[warp * stride] = x;
  }
  __device__ float sum_scalar(const float* buf, int stride) const {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += buf[w * stride];
    return s;
  }
};

// The writes into one fast-weight matrix as the forward saved them: step i = t*N + n wrote k_i u_i^T with
// u_i = beta_i (v_i - vbar_i), or u_i = v_i for the sum rule (vbar == nullptr). k is [T, N, kstride], v and
// vbar [T, N, vstride], beta [T, N, bstride]; `offset`/`boffset` select the matrix's slot (a Delta LSTM gate).
struct Writes {
  const float *k, *v, *vbar, *beta;
  int64_t kstride, vstride, offset, bstride, boffset;
  __device__ const float* k_at(int64_t i) const { return k + i * kstride + offset; }
  __device__ const float* v_at(int64_t i) const { return v + i * vstride + offset; }
  __device__ const float* vbar_at(int64_t i) const { return vbar + i * vstride + offset; }
  __device__ float beta_at(int64_t i) const { return beta[i * bstride + boffset]; }
  __device__ bool is_sum() const { return vbar == nullptr; }
};

// The inputs of one write (step i), loaded ahead of their use so that a kernel can issue the loads of step
// t+1 before computing step t. vbar is loaded only by the backward and the replay (the forward computes it).
template <int RPL, int CPW>
struct WriteIn {
  float k[RPL], v[CPW], vbar[CPW], beta;

  __device__ void load(const Tile<RPL, CPW>& tl, const Writes& w, int64_t i, bool with_vbar) {
    tl.rows(k, w.k_at(i));
    tl.cols(v, w.v_at(i));
    beta = w.is_sum() ? 1.f : w.beta_at(i);
    if (with_vbar && !w.is_sum()) tl.cols(vbar, w.vbar_at(i));
  }
  // u = beta (v - vbar), or v for the sum rule: the forward and the replay share this, so a replayed W is
  // bitwise the forward's.
  __device__ void u(bool sum, float (&out)[CPW]) const {
#pragma unroll
    for (int j = 0; j < CPW; ++j) out[j] = sum ? v[j] : beta * (v[j] - vbar[j]);
  }
};

// The delta-rule write of a step: vbar = W^T k (stored), W += k (beta (v - vbar))^T. It computes u as
// WriteIn::u does, so the backward's replay rebuilds the forward's W bitwise.
template <int RPL, int CPW>
__device__ __forceinline__ void write_delta(const Tile<RPL, CPW>& tl, float (&W)[RPL][CPW], const float (&k)[RPL],
                                            const float (&v)[CPW], float beta, float* vbar_out) {
  float vbar[CPW], u[CPW];
  tl.read(W, k, vbar);
  tl.store_cols(vbar, vbar_out);
#pragma unroll
  for (int j = 0; j < CPW; ++j) u[j] = beta * (v[j] - vbar[j]);
  tl.add_outer(W, k, u);
}

// The forward write of a step into W (already reset if the step resets); stores vbar for a delta rule. (The
// steps of write_delta, kept inline here: routing this through write_delta changes the register allocation of
// the linear kernels.)
template <int RPL, int CPW>
__device__ __forceinline__ void write_forward(const Tile<RPL, CPW>& tl, float (&W)[RPL][CPW], const Writes& w,
                                              WriteIn<RPL, CPW>& in, float* vbar_out) {
  float u[CPW];
  if (!w.is_sum()) {
    tl.read(W, in.k, in.vbar);
    tl.store_cols(in.vbar, vbar_out);
  }
  in.u(w.is_sum(), u);
  tl.add_outer(W, in.k, u);
}

// W <- the state right after step t of chain n, replayed from the start of its segment: zeros after a reset,
// W0 for the first segment. The backward needs this where step t+1 reset the state (subtraction cannot undo a
// reset); it costs at most one extra forward pass over the unroll in total.
template <int RPL, int CPW>
__device__ void replay(const Tile<RPL, CPW>& tl, float (&W)[RPL][CPW], const float* W0, const Writes& w,
                       const uint8_t* reset, const Shape& s, int64_t t, int64_t n) {
  int64_t t0 = t;
  while (t0 > 0 && !is_reset(reset, s, t0, n)) --t0;
  if (is_reset(reset, s, t0, n))
    tl.zero(W);
  else
    tl.load(W, W0);
  for (; t0 <= t; ++t0) {
    WriteIn<RPL, CPW> in;
    float u[CPW];
    in.load(tl, w, t0 * s.N() + n, true);
    in.u(w.is_sum(), u);
    tl.add_outer(W, in.k, u);
  }
}

// Backward of the write of step t (docs/kernels.md §3), whose inputs `in` include the saved vbar. On entry
// W = W_t and G = dL/dW_t including the reads of step t. Sets dv (columns), adds this warp's share of
// dk = G u + W_{t-1} dvbar to `dk`, returns this warp's share of dbeta. On exit W = W_{t-1} and
// G = dL/dW_{t-1} (zero, and W replayed, where step t reset).
template <int RPL, int CPW>
__device__ float write_backward(const Tile<RPL, CPW>& tl, float (&W)[RPL][CPW], float (&G)[RPL][CPW],
                                const float* W0, const Writes& w, const uint8_t* reset, const Shape& s, int64_t t,
                                int64_t n, const WriteIn<RPL, CPW>& in, float (&dv)[CPW], float (&dk)[RPL]) {
  float u[CPW], du[CPW];
  in.u(w.is_sum(), u);
  tl.read(G, in.k, du);           // du = G^T k
  tl.apply_part(G, u, dk, true);  // dk += G u
  float db = 0.f;
#pragma unroll
  for (int j = 0; j < CPW; ++j) {
    dv[j] = in.beta * du[j];
    if (!w.is_sum()) db += du[j] * (in.v[j] - in.vbar[j]);
    du[j] = -in.beta * du[j];  // now dL/dvbar (unused by the sum rule)
  }
  if (is_reset(reset, s, t, n)) {
    tl.zero(G);
    if (t > 0) replay(tl, W, W0, w, reset, s, t - 1, n);
    return db;
  }
  tl.add_outer(W, in.k, u, -1.f);  // W_{t-1}
  if (!w.is_sum()) {
    tl.apply_part(W, du, dk, true);  // dk += W_{t-1} dvbar
    tl.add_outer(G, in.k, du);       // vbar_t = W_{t-1}^T k_t feeds back into W_{t-1}
  }
  return db;
}

// dst[e] = src[e] for e < len, split over the block's threads (no barrier).
__device__ __forceinline__ void block_copy(float* dst, const float* src, int64_t len) {
  for (int e = threadIdx.x; e < len; e += blockDim.x) dst[e] = src[e];
}

inline const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

inline const char* check_head_dim(int64_t d) {
  if (d < 1 || d > kMaxDim) return "rfwp cuda: the recurrent rules' kernels need a head dimension between 1 and 64";
  return nullptr;
}

// Dynamic shared memory above the default 48 KB must be opted into per kernel.
template <class K>
const char* allow_shared_memory(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return nullptr;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <int V>
using Int = std::integral_constant<int, V>;

// Instantiations for the recurrent rules (E = M = d): about 8 warps per chain; RPL = 2 only for d > 32.
template <class F>
void dispatch_recurrent(int64_t d, F&& f) {
  if (d <= 8)
    f(Int<1>{}, Int<1>{});
  else if (d <= 16)
    f(Int<1>{}, Int<2>{});
  else if (d <= 32)
    f(Int<1>{}, Int<4>{});
  else
    f(Int<2>{}, Int<8>{});
}

inline int warps_for(int64_t M, int cpw) { return int((M + cpw - 1) / cpw); }

// The host side of a recurrent rule's launch (E = M = d): checks d, then calls
// launch(Int<RPL>, Int<CPW>, shape, warps, stream) with the instantiation that fits d; returns the launch error.
template <class F>
const char* launch_recurrent(int64_t T, int64_t B, int64_t H, int64_t d, void* stream, F&& launch) {
  if (const char* err = check_head_dim(d)) return err;
  const Shape s{T, B, H, d, d};
  const auto st = static_cast<cudaStream_t>(stream);
  dispatch_recurrent(d, [&](auto R, auto C) { launch(R, C, s, warps_for(d, decltype(C)::value), st); });
  return launch_error();
}

}  // namespace rfwp
