// Fused C++ CPU backend of the fast-weight update rules (sum, delta, RDN, Delta RNN, Delta LSTM), forward and
// backward, templated on the scalar type (float for speed, double to test against the float64 oracle).
//
// The loops mirror the CUDA kernels in ../cuda: one independent chain per (sample, head), the state kept in one
// buffer for the whole unroll, resets applied inside the loop, and the same backward scheme: one pass
// in reverse time that rebuilds W_{t-1} = W_t - k_t u_t^T by subtraction and, where step t reset the state,
// replays the segment before it from the saved writes. Equations: models/ops/reference.py; layouts and
// recursions: docs/kernels.md §1-§3. Every per-step tensor is contiguous [T, B, H, ...], so chain n = b*H + h
// of step t starts at (t*N + n) * width.
//
// Speed (actors call the forward with T = 1 for every env step): the loops are compiled for head sizes 16, 32
// and 64 as constants (with_dims), the passes over a matrix keep their column sums in vector registers
// (column_blocks), and the exps are an inlined polynomial that vectorizes; built with AVX2 and FMA where the
// CPU has them (loader.py). A single step then costs about one read and one write of the state. RDN, whose
// chains also multiply by slow per-head matrices, takes its chains in groups of samples (rdn_forward_loop).
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../binding.h"

// The per-row helpers are forced inline so that, under with_dims below, they see the head size as a constant.
#define RFWP_INLINE inline __attribute__((always_inline))
#define RFWP_INLINE_LAMBDA __attribute__((always_inline))

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

// Passes over the rows of a matrix that make one sum per column (W^T x) keep the sums of a block of columns
// in vector registers for the whole pass: GCC/Clang vector types as wide as the machine's registers (32 bytes
// with AVX, else 16), loaded and stored unaligned through memcpy. Blocks of four vectors give the FMA unit
// four independent chains; leftover columns go one vector, then one column, at a time.
#ifdef __AVX__
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif
template <class S>
struct VectorOf {
  typedef S type __attribute__((vector_size(kVectorBytes)));
};
template <class S>
using Vec = typename VectorOf<S>::type;
template <class S>
constexpr int64_t kLanes = kVectorBytes / sizeof(S);

template <class S>
RFWP_INLINE Vec<S> load(const S* p) {
  Vec<S> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class S>
RFWP_INLINE void store(S* p, Vec<S> v) {
  std::memcpy(p, &v, sizeof v);
}

// vectors(m0, K) for blocks of K = 4, then K = 1 vectors starting at column m0; column(m) for the rest.
template <class S, class FV, class FS>
RFWP_INLINE void column_blocks(int64_t M, FV&& vectors, FS&& column) {
  constexpr int64_t L = kLanes<S>;
  int64_t m0 = 0;
  for (; m0 + 4 * L <= M; m0 += 4 * L) vectors(m0, std::integral_constant<int64_t, 4>{});
  for (; m0 + L <= M; m0 += L) vectors(m0, std::integral_constant<int64_t, 1>{});
  for (; m0 < M; ++m0) column(m0);
}

// Vector sums over rows: with fewer than 8 vectors summed at once, the rows are split in two interleaved
// halves (even and odd e, added at the end) so that the FMA unit has 8 independent chains to work on.
constexpr int64_t row_sets(int64_t vectors) { return vectors <= 4 ? 2 : 1; }

// row(e, set) for every row e, dealt to the Sets interleaved sets (set = e mod Sets; leftover rows to set 0).
// read_many and step both go through here, so their sums over the rows are taken in the same order.
template <int64_t Sets, class F>
RFWP_INLINE void rows_in_sets(int64_t E, F&& row) {
  int64_t e = 0;
  for (; e + Sets <= E; e += Sets)
    for (int64_t set = 0; set < Sets; ++set) row(e + set, set);
  for (; e < E; ++e) row(e, 0);
}

// y_i[m] = sum_e W_i[e][m] x[e] for P matrices W_i read by the same x (W^T x: a read). Reading several
// matrices in one pass also gives the FMA unit more independent chains (RDN's R_q, R_k, R_v).
template <class S, size_t P>
RFWP_INLINE void read_many(const std::array<const S*, P>& W, const S* __restrict__ x,
                           const std::array<S*, P>& y, int64_t E, int64_t M) {
  constexpr int64_t L = kLanes<S>;
  column_blocks<S>(
      M,
      [&](int64_t m0, auto vectors) RFWP_INLINE_LAMBDA {
        constexpr int64_t K = decltype(vectors)::value, Sets = row_sets(P * K);
        Vec<S> sum[Sets][P][K] = {};
        rows_in_sets<Sets>(E, [&](int64_t e, int64_t set) RFWP_INLINE_LAMBDA {
          for (size_t i = 0; i < P; ++i)
            for (int64_t j = 0; j < K; ++j) sum[set][i][j] += x[e] * load(W[i] + e * M + m0 + j * L);
        });
        for (size_t i = 0; i < P; ++i)
          for (int64_t j = 0; j < K; ++j) {
            for (int64_t set = 1; set < Sets; ++set) sum[0][i][j] += sum[set][i][j];
            store(y[i] + m0 + j * L, sum[0][i][j]);
          }
      },
      [&](int64_t m) RFWP_INLINE_LAMBDA {
        for (size_t i = 0; i < P; ++i) {
          S sum = 0;
          for (int64_t e = 0; e < E; ++e) sum += x[e] * W[i][e * M + m];
          y[i][m] = sum;
        }
      });
}

template <class S>
RFWP_INLINE void read(const S* __restrict__ W, const S* __restrict__ x, S* __restrict__ y, int64_t E, int64_t M) {
  read_many<S, 1>({W}, x, {y}, E, M);
}

// The sum of a vector's lanes, halves added pairwise (a fixed order, so results stay reproducible).
template <class S>
RFWP_INLINE S lane_sum(Vec<S> v) {
  S s[kLanes<S>];
  std::memcpy(s, &v, sizeof v);
  for (int64_t width = kLanes<S> / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) s[l] += s[l + width];
  return s[0];
}

// The lane sums of L = kLanes vectors r_0 .. r_{L-1} as one vector (lane i: the sum of r_i's lanes), by the
// usual transpose-and-add: pairs of vectors are merged, adding neighbouring blocks of w lanes, for w = 1, 2,
// .., L/2. Lane i of merge<w>(x, y) sums lanes base and base + w of x (blocks of 2w lanes whose first half
// comes from x) or of y (second half), base = the start of its 2w-block plus i mod w.
constexpr int64_t merge_index(int64_t i, int64_t w, int64_t L, bool high) {
  return (i / (2 * w)) * (2 * w) + i % w + (high ? w : 0) + ((i / w) % 2 ? L : 0);
}
template <class S, int64_t w, size_t... I>
RFWP_INLINE Vec<S> merge(Vec<S> x, Vec<S> y, std::index_sequence<I...>) {
  constexpr int64_t L = sizeof...(I);
#ifdef __clang__
  return __builtin_shufflevector(x, y, merge_index(I, w, L, false)...) +
         __builtin_shufflevector(x, y, merge_index(I, w, L, true)...);
#else  // GCC before 12 has only __builtin_shuffle, with the lane indices as an integer vector
  using Lane = std::conditional_t<sizeof(S) == 4, int32_t, int64_t>;
  typedef Lane Index __attribute__((vector_size(kVectorBytes)));
  constexpr Index low = {static_cast<Lane>(merge_index(I, w, L, false))...};
  constexpr Index high = {static_cast<Lane>(merge_index(I, w, L, true))...};
  return __builtin_shuffle(x, y, low) + __builtin_shuffle(x, y, high);
#endif
}
template <class S, int64_t w = 1>
RFWP_INLINE Vec<S> lane_sums(Vec<S>* r) {  // r: kLanes<S> vectors, overwritten
  constexpr int64_t L = kLanes<S>;
  if constexpr (w < L) {
    for (int64_t j = 0; j < L / (2 * w); ++j)
      r[j] = merge<S, w>(r[2 * j], r[2 * j + 1], std::make_index_sequence<L>{});
    return lane_sums<S, 2 * w>(r);
  } else {
    return r[0];
  }
}

// y[e] (+)= sum_m W[e][m] x[m]  (W x: a gradient flowing back into keys or queries). Rows go in blocks of
// kLanes: each row's products are summed in one vector register, and the block's sums are added across lanes
// together (lane_sums); leftover rows are summed one at a time. Every row's order is fixed by E and M.
template <class S>
RFWP_INLINE void apply(const S* __restrict__ W, const S* __restrict__ x, S* __restrict__ y, int64_t E, int64_t M,
                       bool accumulate = false) {
  constexpr int64_t L = kLanes<S>;
  const int64_t vectors = M / L;
  const auto tail = [&](int64_t e) RFWP_INLINE_LAMBDA {  // the columns after the last full vector
    S s = 0;
    for (int64_t m = vectors * L; m < M; ++m) s += W[e * M + m] * x[m];
    return s;
  };
  int64_t e = 0;
  for (; vectors > 0 && e + L <= E; e += L) {
    Vec<S> sum[L] = {};
    for (int64_t j = 0; j < vectors; ++j) {
      const Vec<S> xj = load(x + j * L);
      for (int64_t r = 0; r < L; ++r) sum[r] += load(W + (e + r) * M + j * L) * xj;
    }
    Vec<S> s = lane_sums<S>(sum);
    for (int64_t r = 0; r < L; ++r) s[r] += tail(e + r);
    store(y + e, accumulate ? load(y + e) + s : s);
  }
  for (; e < E; ++e) {
    Vec<S> sum = {};
    for (int64_t j = 0; j < vectors; ++j) sum += load(W + e * M + j * L) * load(x + j * L);
    const S s = lane_sum<S>(sum) + tail(e);
    y[e] = accumulate ? y[e] + s : s;
  }
}

// W += a b^T (sign = 1) or W -= a b^T (sign = -1)
template <class S>
RFWP_INLINE void add_outer(S* __restrict__ W, const S* __restrict__ a, const S* __restrict__ b, int64_t E, int64_t M,
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
// float64 tests compare to rounding). The loop vectorizes only with -fno-trapping-math (loader.py), which lets
// the clamp's compares become vector selects.
RFWP_INLINE void exp_array(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] < -87.3f ? -87.3f : x[i] > 88.3f ? 88.3f : x[i];  // (std::min/max would not vectorize)
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

// x_r <- softmax(x_r) for `rows` vectors x_r of size d stored one after the other in x. Each phase (max, exp,
// sum, scale) runs over all rows before the next, so that the rows' short dependency chains overlap.
template <class S>
RFWP_INLINE void softmax_rows(S* x, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    S* xr = x + r * d;
    S m = xr[0];
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < d; ++i) m = xr[i] > m ? xr[i] : m;  // (std::max would not vectorize)
    for (int64_t i = 0; i < d; ++i) xr[i] -= m;
  }
  exp_array(x, rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    S* xr = x + r * d;
    S sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += xr[i];
    const S inverse = S(1) / sum;
    for (int64_t i = 0; i < d; ++i) xr[i] *= inverse;
  }
}

template <class S>
RFWP_INLINE void softmax(const S* x, S* y, int64_t d) {
  std::copy(x, x + d, y);
  softmax_rows(y, 1, d);
}

// y = sigmoid(x) (in place if y = x) and a = tanh(x) (a and x apart) over arrays, through exp_array.
template <class S>
RFWP_INLINE void sigmoid_array(const S* x, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = -x[i];
  exp_array(y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = S(1) / (S(1) + y[i]);
}
inline void tanh_array(const double* x, double* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = std::tanh(x[i]);
}
// float: (1 - e) / (1 + e) with e = exp(-2|x|), and the odd Taylor series below |x| = 1/8 (where 1 - e cancels).
RFWP_INLINE void tanh_array(const float* x, float* a, int64_t n) {
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
RFWP_INLINE void softmax_backward(const S* y, const S* dy, S* dx, int64_t d) {
  S dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < d; ++i) dot += dy[i] * y[i];
  for (int64_t i = 0; i < d; ++i) dx[i] = y[i] * (dy[i] - dot);
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
  // M: the value size, passed by callers that know it at compile time.
  RFWP_INLINE void u(int64_t t, int64_t n, S* out, int64_t M) const {
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
// then Wout = Wsrc + k_t u_t^T and y = Wout^T q_t together, each element of Wout read into y as it is written.
// Wsrc is the state before step t: the input state (so the output is written once, no copy first), Wout itself
// (in place, later steps), or nullptr (the zero state after a reset). Wout rows equal the replay's add_outer
// bitwise, and y accumulates over e in read()'s order.
template <class S>
RFWP_INLINE void step(const S* Wsrc, S* Wout, int64_t t, int64_t n, const Writes<S>& w, int64_t E, int64_t M,
                      S* vbar_out, S* u, const S* q, S* y) {
  const S* k = w.k.at(t, n);
  if (!w.is_sum()) {
    if (Wsrc != nullptr)
      read(Wsrc, k, vbar_out, E, M);
    else
      std::fill(vbar_out, vbar_out + M, S(0));
  }
  w.u(t, n, u, M);
  constexpr int64_t L = kLanes<S>;
  const auto pass = [&](auto from_zero) RFWP_INLINE_LAMBDA {
    constexpr bool kZero = decltype(from_zero)::value;
    column_blocks<S>(
        M,
        [&](int64_t m0, auto vectors) RFWP_INLINE_LAMBDA {
          constexpr int64_t K = decltype(vectors)::value, Sets = row_sets(K);
          Vec<S> uj[K], sum[Sets][K] = {};
          for (int64_t j = 0; j < K; ++j) uj[j] = load(u + m0 + j * L);
          rows_in_sets<Sets>(E, [&](int64_t e, int64_t set) RFWP_INLINE_LAMBDA {
            const S ke = k[e], qe = q[e];
            for (int64_t j = 0; j < K; ++j) {
              const int64_t at = e * M + m0 + j * L;
              const Vec<S> x = (kZero ? Vec<S>{} : load(Wsrc + at)) + ke * uj[j];
              store(Wout + at, x);
              sum[set][j] += qe * x;
            }
          });
          for (int64_t j = 0; j < K; ++j) {
            for (int64_t set = 1; set < Sets; ++set) sum[0][j] += sum[set][j];
            store(y + m0 + j * L, sum[0][j]);
          }
        },
        [&](int64_t m) RFWP_INLINE_LAMBDA {
          S sum = 0;
          for (int64_t e = 0; e < E; ++e) {
            const S x = (kZero ? S(0) : Wsrc[e * M + m]) + k[e] * u[m];
            Wout[e * M + m] = x;
            sum += q[e] * x;
          }
          y[m] = sum;
        });
  };
  if (Wsrc == nullptr)
    pass(std::true_type{});
  else
    pass(std::false_type{});
}

// W <- the state right after step t, replayed from the start of its segment: from zero after a reset, from W0
// for the first segment. Used by the backward where step t+1 reset the state, so subtraction cannot recover it.
template <class S>
void replay(S* W, const S* W0, int64_t t, int64_t n, const Resets& R, const Writes<S>& w, S* u) {
  int64_t s = R.segment_start(t, n);
  load_or_zero(W, W0, w.E * w.M, R.at(s, n));
  for (; s <= t; ++s) {
    w.u(s, n, u, w.M);
    add_outer(W, w.k.at(s, n), u, w.E, w.M);
  }
}

// Backward of the write of step t (docs/kernels.md §3). On entry W = W_t and G = dL/dW_t including the
// reads of step t; writes dk_t, dv_t and (delta rule) dbeta_t; on exit W = W_{t-1} and G = dL/dW_{t-1}.
// At a reset step the earlier state influenced nothing: G <- 0 and W is replayed.
// E, M: the sizes, passed by callers that know them at compile time.
template <class S>
RFWP_INLINE void write_backward(S* W, S* G, const S* W0, int64_t t, int64_t n, const Resets& R, const Writes<S>& w,
                                int64_t E, int64_t M, S* dk, S* dv, S* dbeta, S* u, S* du) {
  const S* k = w.k.at(t, n);
  w.u(t, n, u, M);
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

// Run body(n, scratch) for every chain n in parallel; `work` is the rough cost of one chain. `scratch` points to
// `scratch_size` elements that body may use as it likes, allocated once per range of chains (a single step at
// B256 is a thousand short chains, where an allocation per chain would cost as much as the arithmetic).
template <class S, class F>
void for_chains(int64_t N, int64_t work, int64_t scratch_size, F body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<S> scratch(scratch_size);
    for (int64_t n = begin; n < end; ++n) body(n, scratch.data());
  });
}

// Consecutive arrays cut from a scratch buffer.
template <class S>
struct Carve {
  S* p;
  S* take(int64_t count) {
    S* r = p;
    p += count;
    return r;
  }
  S* copy(const S* src, int64_t count) {
    std::copy(src, src + count, p);
    return take(count);
  }
};

// Calls f(E, M) with the key and value sizes as compile-time constants when they are equal and common
// (16, 32, 64), so that the inlined per-row loops unroll and keep their sums in registers; else as values.
template <class F>
void with_dims(int64_t E, int64_t M, F&& f) {
  using Sixteen = std::integral_constant<int64_t, 16>;
  using ThirtyTwo = std::integral_constant<int64_t, 32>;
  using SixtyFour = std::integral_constant<int64_t, 64>;
  if (E == M && E == 16) return f(Sixteen{}, Sixteen{});
  if (E == M && E == 32) return f(ThirtyTwo{}, ThirtyTwo{});
  if (E == M && E == 64) return f(SixtyFour{}, SixtyFour{});
  f(E, M);
}

// ---- sum rule and delta rule (one code path: the sum rule is a write without vbar) ------------------------

template <class S>
void linear_forward_loop(const Dims& d, const Resets& R, const S* q, const Writes<S>& w, const S* W0, S* y, S* WT,
                    S* vbar) {
  const int64_t N = d.N();
  with_dims(d.E, d.M, [&](auto E_, auto M_) {
    const int64_t E = E_, M = M_;
    for_chains<S>(N, d.T * E * M * 3, M, [&](int64_t n, S* u) {
      S* W = WT + n * E * M;  // the state evolves in the output buffer
      for (int64_t t = 0; t < d.T; ++t) {
        const S* src = R.at(t, n) ? nullptr : t == 0 ? W0 + n * E * M : W;
        step(src, W, t, n, w, E, M, vbar ? vbar + (t * N + n) * M : nullptr, u, q + (t * N + n) * E,
             y + (t * N + n) * M);
      }
    });
  });
}

template <class S>
void linear_backward_loop(const Dims& d, const Resets& R, const S* q, const Writes<S>& w, const S* W0, const S* WT,
                     const S* gy, const S* gWT, S* dq, S* dk, S* dv, S* dbeta, S* dW0) {
  const int64_t N = d.N();
  with_dims(d.E, d.M, [&](auto E_, auto M_) {
    const int64_t E = E_, M = M_;
    for_chains<S>(N, d.T * E * M * 7, E * M + 2 * M, [&](int64_t n, S* scratch) {
      Carve<S> c{scratch};
      S *W = c.copy(WT + n * E * M, E * M), *u = c.take(M), *du = c.take(M);
      S* G = dW0 + n * E * M;  // dL/dW_t evolves in the output buffer and ends as dL/dW0
      std::copy(gWT + n * E * M, gWT + (n + 1) * E * M, G);
      for (int64_t t = d.T - 1; t >= 0; --t) {
        const int64_t i = t * N + n;
        const S* g = gy + i * M;
        apply(W, g, dq + i * E, E, M);     // dq_t = W_t g_t
        add_outer(G, q + i * E, g, E, M);  // y_t = W_t^T q_t
        write_backward(W, G, W0 + n * E * M, t, n, R, w, E, M, dk + i * E, dv + i * M, dbeta ? dbeta + i : nullptr,
                       u, du);
      }
    });
  });
}

// ---- RDN (docs/kernels.md §2, §3) ----------------------------------------------------------------------------

template <class S>
struct RdnSlow {  // the slow recurrent weights of one head
  const S *Rq, *Rk, *Rv, *rb;
};

template <class S>
RdnSlow<S> rdn_head(const S* Rq, const S* Rk, const S* Rv, const S* rb, int64_t h, int64_t d) {
  return {Rq + h * d * d, Rk + h * d * d, Rv + h * d * d, rb + h * d};
}

constexpr int64_t kRdnGroup = 8;  // samples per group of chains in the forward and backward loops

template <class S>
void rdn_forward_loop(const Dims& D, const Resets& R, const S* qx, const S* kx, const S* vx, const S* bx, const S* Rq,
                 const S* Rk, const S* Rv, const S* rb, const S* W0, const S* h0, S* y, S* WT, S* hT, S* qs,
                 S* ks, S* vs, S* vbar, S* betas) {
  const int64_t N = D.N(), H = D.H;
  const Writes<S> w{{ks, N, D.E, 0}, {vs, N, D.E, 0}, {vbar, N, D.E, 0}, {betas, N, 1, 0}, D.E, D.E};
  // The chains go in groups of up to G = kRdnGroup samples with all their heads (consecutive in memory, so the
  // fast weights stream through in order). Each phase of a step (tanh, the slow products, the softmaxes, the
  // sigmoid) runs for the whole group before the next, so that the chains' short dependency chains overlap,
  // and the slow products go head by head, so that Rq, Rk, Rv of a head (12 KB at d = 32) are read from L1 by
  // every sample of the group in a row.
  constexpr int64_t G = kRdnGroup;
  with_dims(D.E, D.E, [&](auto size, auto) {
    const int64_t d = size;
    for_chains<S>((D.B + G - 1) / G, D.T * G * H * d * d * 6, G * H * (3 * d + 1) + d, [&](int64_t j, S* scratch) {
      const int64_t n0 = j * G * H, C = std::min(G, D.B - j * G) * H;  // chains n0 + c for c < C
      Carve<S> cut{scratch};
      // chain c's tanh(h) at a + c d, logits of q and k at l + 2 c d (consecutive) and beta at beta[c]
      S *a = cut.take(G * H * d), *l = cut.take(2 * G * H * d), *beta = cut.take(G * H), *u = cut.take(d);
      std::copy(h0 + n0 * d, h0 + (n0 + C) * d, hT + n0 * d);  // the state evolves in the output buffers
      for (int64_t t = 0; t < D.T; ++t) {
        for (int64_t c = 0; c < C; ++c) {
          S* h = hT + (n0 + c) * d;
          if (R.at(t, n0 + c)) std::fill(h, h + d, S(0));
          std::copy(h, h + d, l + c * d);  // l is free until the products below
        }
        tanh_array(l, a, C * d);
        for (int64_t head = 0; head < H; ++head) {
          const RdnSlow<S> P = rdn_head(Rq, Rk, Rv, rb, head, d);
          for (int64_t c = head; c < C; c += H) {
            const int64_t i = t * N + n0 + c;
            S *lq = l + 2 * c * d, *lk = lq + d, *lv = vs + i * d;
            const S* ac = a + c * d;
            read_many<S, 3>({P.Rq, P.Rk, P.Rv}, ac, {lq, lk, lv}, d, d);
            S ab = 0;
#pragma omp simd reduction(+ : ab)
            for (int64_t e = 0; e < d; ++e) ab += ac[e] * P.rb[e];
            beta[c] = bx[i] + ab;
            for (int64_t m = 0; m < d; ++m) {
              lq[m] += qx[i * d + m];
              lk[m] += kx[i * d + m];
              lv[m] += vx[i * d + m];
            }
          }
        }
        softmax_rows(l, 2 * C, d);
        sigmoid_array(beta, beta, C);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t n = n0 + c, i = t * N + n;
          S *W = WT + n * d * d, *h = hT + n * d;
          std::copy(l + 2 * c * d, l + (2 * c + 1) * d, qs + i * d);
          std::copy(l + (2 * c + 1) * d, l + (2 * c + 2) * d, ks + i * d);
          betas[i] = beta[c];
          const S* src = R.at(t, n) ? nullptr : t == 0 ? W0 + n * d * d : W;
          step(src, W, t, n, w, d, d, vbar + i * d, u, qs + i * d, y + i * d);
          std::copy(y + i * d, y + (i + 1) * d, h);
        }
      }
    });
  });
}

// The backward goes through the chains in items of up to kRdnGroup samples of one head, one chain after the
// other, and sums the item's gradients of the slow weights in its own slot of dRq_p, dRk_p, dRv_p [P, H, d, d]
// and drb_p [P, H, d] (P = rdn_partials(B) groups of samples); the caller sums the slots in a fixed order.
// The items do not depend on the thread count, so the gradients are the same bitwise on any machine.
inline int64_t rdn_partials(int64_t B) { return (B + kRdnGroup - 1) / kRdnGroup; }

template <class S>
void rdn_backward_loop(const Dims& D, const Resets& R, const S* Rq, const S* Rk, const S* Rv, const S* rb, const S* W0,
                  const S* h0, const S* y, const S* WT, const S* qs, const S* ks, const S* vs, const S* vbar,
                  const S* betas, const S* gy, const S* gWT, const S* ghT, S* dqx, S* dkx, S* dvx, S* dbx,
                  S* dRq_p, S* dRk_p, S* dRv_p, S* drb_p, S* dW0, S* dh0) {
  const int64_t N = D.N(), H = D.H, items = rdn_partials(D.B) * H;
  const Writes<S> w{{ks, N, D.E, 0}, {vs, N, D.E, 0}, {vbar, N, D.E, 0}, {betas, N, 1, 0}, D.E, D.E};
  with_dims(D.E, D.E, [&](auto size, auto) {
    const int64_t d = size;
    for_chains<S>(items, kRdnGroup * D.T * d * d * 14, 2 * d * d + 7 * d, [&](int64_t item, S* scratch) {
      const int64_t head = item % H, b0 = item / H * kRdnGroup, samples = std::min(kRdnGroup, D.B - b0);
      const RdnSlow<S> P = rdn_head(Rq, Rk, Rv, rb, head, d);
      S *dRq = dRq_p + item * d * d, *dRk = dRk_p + item * d * d, *dRv = dRv_p + item * d * d, *drb = drb_p + item * d;
      std::fill(dRq, dRq + d * d, S(0)), std::fill(dRk, dRk + d * d, S(0)), std::fill(dRv, dRv + d * d, S(0));
      std::fill(drb, drb + d, S(0));
      for (int64_t n = b0 * H + head; n < (b0 + samples) * H; n += H) {
        Carve<S> c{scratch};
        S *W = c.copy(WT + n * d * d, d * d), *G = c.copy(gWT + n * d * d, d * d), *delta = c.copy(ghT + n * d, d);
        S *a = c.take(d), *dq = c.take(d), *dk = c.take(d), *u = c.take(d), *du = c.take(d), *da = c.take(d);
        for (int64_t t = D.T - 1; t >= 0; --t) {
          const int64_t i = t * N + n;
          const bool reset = R.at(t, n);
          if (reset)
            std::fill(a, a + d, S(0));
          else
            tanh_array(t > 0 ? y + (i - N) * d : h0 + n * d, a, d);  // as the forward computed it
          for (int64_t e = 0; e < d; ++e) delta[e] += gy[i * d + e];
          apply(W, delta, dq, d, d);  // dq = W_t delta
          softmax_backward(qs + i * d, dq, dqx + i * d, d);
          add_outer(G, qs + i * d, delta, d, d);
          S db;
          write_backward(W, G, W0 + n * d * d, t, n, R, w, d, d, dk, dvx + i * d, &db, u, du);
          const S b = betas[i];
          dbx[i] = b * (S(1) - b) * db;
          softmax_backward(ks + i * d, dk, dkx + i * d, d);
          apply(P.Rq, dqx + i * d, da, d, d);
          apply(P.Rk, dkx + i * d, da, d, d, true);
          apply(P.Rv, dvx + i * d, da, d, d, true);
          add_outer(dRq, a, dqx + i * d, d, d);
          add_outer(dRk, a, dkx + i * d, d, d);
          add_outer(dRv, a, dvx + i * d, d, d);
          for (int64_t e = 0; e < d; ++e) {
            drb[e] += a[e] * dbx[i];
            // a = tanh(h_{t-1}); after a reset h_{t-1} was replaced by zeros and gets no gradient
            delta[e] = reset ? S(0) : (S(1) - a[e] * a[e]) * (da[e] + P.rb[e] * dbx[i]);
          }
        }
        std::copy(G, G + d * d, dW0 + n * d * d);
        std::copy(delta, delta + d, dh0 + n * d);
      }
    });
  });
}

// out[h] = sum_p part[p, h] in the order p = 0, 1, ... (deterministic), for part [P, H, size].
template <class S>
void sum_partials(const S* part, S* out, int64_t P, int64_t H, int64_t size) {
  const int64_t n = H * size;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    std::copy(part + begin, part + end, out + begin);
    for (int64_t i = 1; i < P; ++i) {
      const S* slot = part + i * n;
      for (int64_t j = begin; j < end; ++j) out[j] += slot[j];
    }
  });
}

// ---- Delta RNN v2, recurrent part (docs/kernels.md §2, §3) --------------------------------------------------

template <class S>
void drnn_forward_loop(const Dims& D, const Resets& R, const S* z, const Writes<S>& w, const S* R0, const S* h0, S* y,
                  S* RT, S* hT, S* vbar) {
  const int64_t N = D.N();
  with_dims(D.E, D.E, [&](auto size, auto) {
    const int64_t d = size;
    for_chains<S>(N, D.T * d * d * 4, 2 * d, [&](int64_t n, S* scratch) {
      S *Rm = RT + n * d * d, *h = hT + n * d;  // the state evolves in the output buffers
      std::copy(h0 + n * d, h0 + (n + 1) * d, h);
      S *s = scratch, *u = scratch + d;
      for (int64_t t = 0; t < D.T; ++t) {
        const int64_t i = t * N + n;
        const bool reset = R.at(t, n);
        if (reset) std::fill(h, h + d, S(0));
        softmax(h, s, d);
        step(reset ? nullptr : t == 0 ? R0 + n * d * d : Rm, Rm, t, n, w, d, d, vbar + i * d, u, s, h);
        for (int64_t m = 0; m < d; ++m) y[i * d + m] = (h[m] += z[i * d + m]);
      }
    });
  });
}

template <class S>
void drnn_backward_loop(const Dims& D, const Resets& R, const Writes<S>& w, const S* R0, const S* h0, const S* y,
                   const S* RT, const S* gy, const S* gRT, const S* ghT, S* dz, S* dkr, S* dvr, S* dbr, S* dR0,
                   S* dh0) {
  const int64_t N = D.N();
  with_dims(D.E, D.E, [&](auto size, auto) {
    const int64_t d = size;
    for_chains<S>(N, D.T * d * d * 8, 2 * d * d + 6 * d, [&](int64_t n, S* scratch) {
      Carve<S> c{scratch};
      S *Rm = c.copy(RT + n * d * d, d * d), *G = c.copy(gRT + n * d * d, d * d), *delta = c.copy(ghT + n * d, d);
      S *hp = c.take(d), *s = c.take(d), *ds = c.take(d), *u = c.take(d), *du = c.take(d);
      for (int64_t t = D.T - 1; t >= 0; --t) {
        const int64_t i = t * N + n;
        const bool reset = R.at(t, n);
        load_or_zero(hp, t > 0 ? y + (i - N) * d : h0 + n * d, d, reset);
        softmax(hp, s, d);
        for (int64_t m = 0; m < d; ++m) dz[i * d + m] = (delta[m] += gy[i * d + m]);
        apply(Rm, delta, ds, d, d);  // ds = R_t delta
        add_outer(G, s, delta, d, d);
        write_backward(Rm, G, R0 + n * d * d, t, n, R, w, d, d, dkr + i * d, dvr + i * d, dbr + i, u, du);
        softmax_backward(s, ds, delta, d);
        if (reset) std::fill(delta, delta + d, S(0));
      }
      std::copy(G, G + d * d, dR0 + n * d * d);
      std::copy(delta, delta + d, dh0 + n * d);
    });
  });
}

// ---- Delta LSTM v4, recurrent part (docs/kernels.md §2, §3); gates g = (i, u, o) ------------------------------

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
  const int64_t N = D.N();
  const auto w = lstm_writes(kr, vr, br, vbar, N, D.E);
  with_dims(D.E, D.E, [&](auto size, auto) {
    const int64_t d = size, dd = d * d;
    for_chains<S>(N, D.T * dd * 12, 5 * d, [&](int64_t n, S* scratch) {
      S *Rm = RT + n * 3 * dd, *h = hT + n * d, *c = cT + n * d;  // the state evolves in the output buffers
      std::copy(h0 + n * d, h0 + (n + 1) * d, h);
      std::copy(c0 + n * d, c0 + (n + 1) * d, c);
      S *s = scratch, *u = scratch + d, *pre = scratch + 2 * d;
      for (int64_t t = 0; t < D.T; ++t) {
        const int64_t i = t * N + n;
        const bool reset = R.at(t, n);
        if (reset) {
          std::fill(h, h + d, S(0));
          std::fill(c, c + d, S(0));
        }
        softmax(h, s, d);
        const S* src = reset ? nullptr : t == 0 ? R0 + n * 3 * dd : Rm;
        for (int64_t g = 0; g < 3; ++g)
          step(src ? src + g * dd : nullptr, Rm + g * dd, t, n, w[g], d, d, vbar + (i * 3 + g) * d, u, s,
               pre + g * d);
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
  });
}

template <class S>
void dlstm_backward_loop(const Dims& D, const Resets& R, const S* kr, const S* vr, const S* br, const S* R0,
                    const S* h0, const S* c0, const S* y, const S* RT, const S* vbar, const S* gates, const S* cs,
                    const S* gy, const S* gRT, const S* ghT, const S* gcT, S* dz, S* dkr, S* dvr, S* dbr, S* dR0,
                    S* dh0, S* dc0) {
  const int64_t N = D.N();
  const auto w = lstm_writes(kr, vr, br, vbar, N, D.E);
  with_dims(D.E, D.E, [&](auto size, auto) {
    const int64_t d = size, dd = d * d;
    for_chains<S>(N, D.T * dd * 24, 6 * dd + 7 * d, [&](int64_t n, S* scratch) {
      Carve<S> c{scratch};
      S *Rm = c.copy(RT + n * 3 * dd, 3 * dd), *G = c.copy(gRT + n * 3 * dd, 3 * dd);
      S *delta = c.copy(ghT + n * d, d), *dc = c.copy(gcT + n * d, d);
      S *hp = c.take(d), *s = c.take(d), *ds = c.take(d), *u = c.take(d), *du = c.take(d);
      for (int64_t t = D.T - 1; t >= 0; --t) {
        const int64_t i = t * N + n;
        const bool reset = R.at(t, n);
        load_or_zero(hp, t > 0 ? y + (i - N) * d : h0 + n * d, d, reset);
        softmax(hp, s, d);
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
          apply(Rm + g * dd, dpre + g * d, ds, d, d, g > 0);  // ds = sum_g R_g,t dpre_g
          add_outer(G + g * dd, s, dpre + g * d, d, d);
          write_backward(Rm + g * dd, G + g * dd, R0 + n * 3 * dd + g * dd, t, n, R, w[g], d, d,
                         dkr + (i * 3 + g) * d, dvr + (i * 3 + g) * d, dbr + i * 3 + g, u, du);
        }
        softmax_backward(s, ds, delta, d);
        if (reset) std::fill(delta, delta + d, S(0));
      }
      std::copy(G, G + 3 * dd, dR0 + n * 3 * dd);
      std::copy(delta, delta + d, dh0 + n * d);
      std::copy(dc, dc + d, dc0 + n * d);
    });
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
    const int64_t P = rdn_partials(d.B), slots = P * d.H * d.E * d.E, dd = d.E * d.E;
    rdn_backward_loop<S>(d, {r, d.B, d.H}, Rq, Rk, Rv, rb, W0, h0, y, WT, qs, ks, vs, vbar, betas, gy, gWT, ghT,
                         dqx, dkx, dvx, dbx, dR_part, dR_part + slots, dR_part + 2 * slots, drb_part, dW0, dh0);
    sum_partials<S>(dR_part, dRq, P, d.H, dd);
    sum_partials<S>(dR_part + slots, dRk, P, d.H, dd);
    sum_partials<S>(dR_part + 2 * slots, dRv, P, d.H, dd);
    sum_partials<S>(drb_part, drb, P, d.H, d.E);
  }
  // slots of partial gradients of the slow weights that rdn_backward needs (rdn_backward_loop)
  static int64_t rdn_partials(int64_t B) { return rfwp::rdn_partials(B); }
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
