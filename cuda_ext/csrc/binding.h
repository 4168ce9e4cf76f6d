// The torch bindings of both compiled backends, written once: `Bindings<Impl>` checks the tensors, allocates
// what the kernels write (filled with NaN when `poison` is set, so tests see anything left unwritten), and
// calls `Impl` on raw pointers: the C++ CPU loops (cpu/rules.cpp) or the CUDA launchers (binding_cuda.cpp).
// Per rule: `<rule>_forward(*inputs, reset, poison, stream)` returns the rule's outputs followed by what its
// backward needs, and `<rule>_backward(*saved inputs, reset, *saved results, *output gradients, poison,
// stream)` returns the gradient of every input (cuda_ext/functions.py). The stream is 0 on the CPU. Which
// results and saved tensors each rule has is declared in models/ops/rules.py (`kernel_results`,
// `kernel_saves`); the argument lists below follow it. Python checks the shapes with readable errors first;
// the checks here only make a wrong call fail instead of reading or writing out of bounds.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace rfwp {

// Sizes of one call: T steps, B samples, H heads, E key size, M value size (E = M = d for recurrent rules).
struct Dims {
  int64_t T, B, H, E, M;
  int64_t N() const { return B * H; }
};

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensors = std::vector<Tensor>;

// Allocates outputs like a given tensor; NaN-filled when poisoned.
struct Alloc {
  bool poison;
  Tensor fill(Tensor t) const {
    return poison ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
  }
  Tensor like(const Tensor& t) const { return fill(at::empty_like(t, at::MemoryFormat::Contiguous)); }
  Tensor shaped(const Tensor& t, at::IntArrayRef shape) const { return fill(at::empty(shape, t.options())); }
};

template <class Impl>
struct Bindings {
  using Arg = std::pair<const Tensor*, int64_t>;  // a tensor and the number of elements it must have

  // Every tensor must have the dtype and device of the first, be contiguous and have the given size.
  static void check(const char* fn, std::initializer_list<Arg> args) {
    const Tensor& first = *args.begin()->first;
    Impl::check_first(fn, first);
    int index = 0;
    for (const auto& [t, numel] : args) {
      TORCH_CHECK(t->defined(), fn, ": tensor argument ", index, " is undefined");
      TORCH_CHECK(t->scalar_type() == first.scalar_type() && t->device() == first.device(), fn,
                  ": tensor argument ", index, " is ", t->scalar_type(), " on ", t->device(), ", expected ",
                  first.scalar_type(), " on ", first.device());
      TORCH_CHECK(t->is_contiguous(), fn, ": tensor argument ", index, " must be contiguous");
      TORCH_CHECK(t->numel() == numel, fn, ": tensor argument ", index, " has ", t->numel(), " elements, expected ",
                  numel);
      ++index;
    }
  }

  static const bool* reset_ptr(const char* fn, const OptTensor& reset, const Dims& d, const Tensor& like) {
    if (!reset.has_value() || !reset->defined()) return nullptr;
    TORCH_CHECK(reset->scalar_type() == at::kBool && reset->device() == like.device() && reset->is_contiguous() &&
                    reset->numel() == d.T * d.B,
                fn, ": reset must be a contiguous bool tensor [T, B] on ", like.device());
    return reset->data_ptr<bool>();
  }

  static Dims dims(const Tensor& k, const Tensor& v) {
    TORCH_CHECK(k.dim() >= 4 && v.dim() >= 4 && k.size(0) >= 1, "rfwp: per-step inputs must be [T >= 1, B, H, ...]");
    return Dims{k.size(0), k.size(1), k.size(2), k.size(-1), v.size(-1)};
  }

  template <class S>
  static S* p(const Tensor& t) {
    return t.data_ptr<S>();
  }
  static void* stream(int64_t s) { return reinterpret_cast<void*>(static_cast<intptr_t>(s)); }

  static Tensors sum_rule_forward(Tensor q, Tensor k, Tensor v, Tensor W0, OptTensor reset, bool poison,
                                  int64_t st) {
    const Dims d = dims(k, v);
    const int64_t TN = d.T * d.N(), NEM = d.N() * d.E * d.M;
    check(__func__, {{&q, TN * d.E}, {&k, TN * d.E}, {&v, TN * d.M}, {&W0, NEM}});
    const bool* r = reset_ptr(__func__, reset, d, q);
    const Alloc a{poison};
    Tensor y = a.like(v), WT = a.like(W0);
    Impl::dispatch(q.scalar_type(), [&](auto s) {
      using S = decltype(s);
      S* none = nullptr;  // the sum rule has no beta and saves no vbar
      Impl::linear_forward(d, r, p<S>(q), p<S>(k), p<S>(v), none, p<S>(W0), p<S>(y), p<S>(WT), none, stream(st));
    });
    return {y, WT};
  }

  static Tensors sum_rule_backward(Tensor q, Tensor k, Tensor v, Tensor W0, OptTensor reset, Tensor WT, Tensor gy,
                                   Tensor gWT, bool poison, int64_t st) {
    const Dims d = dims(k, v);
    const int64_t TN = d.T * d.N(), NEM = d.N() * d.E * d.M;
    check(__func__, {{&q, TN * d.E}, {&k, TN * d.E}, {&v, TN * d.M}, {&W0, NEM}, {&WT, NEM}, {&gy, TN * d.M},
                     {&gWT, NEM}});
    const bool* r = reset_ptr(__func__, reset, d, q);
    const Alloc a{poison};
    Tensor dq = a.like(q), dk = a.like(k), dv = a.like(v), dW0 = a.like(W0);
    Impl::dispatch(q.scalar_type(), [&](auto s) {
      using S = decltype(s);
      S* none = nullptr;
      Impl::linear_backward(d, r, p<S>(q), p<S>(k), p<S>(v), none, p<S>(W0), p<S>(WT), none, p<S>(gy), p<S>(gWT),
                            p<S>(dq), p<S>(dk), p<S>(dv), none, p<S>(dW0), stream(st));
    });
    return {dq, dk, dv, dW0};
  }

  static Tensors delta_rule_forward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor W0, OptTensor reset,
                                    bool poison, int64_t st) {
    const Dims d = dims(k, v);
    const int64_t TN = d.T * d.N(), NEM = d.N() * d.E * d.M;
    check(__func__, {{&q, TN * d.E}, {&k, TN * d.E}, {&v, TN * d.M}, {&beta, TN}, {&W0, NEM}});
    const bool* r = reset_ptr(__func__, reset, d, q);
    const Alloc a{poison};
    Tensor y = a.like(v), WT = a.like(W0), vbar = a.like(v);
    Impl::dispatch(q.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::linear_forward(d, r, p<S>(q), p<S>(k), p<S>(v), p<S>(beta), p<S>(W0), p<S>(y), p<S>(WT), p<S>(vbar),
                           stream(st));
    });
    return {y, WT, vbar};
  }

  static Tensors delta_rule_backward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor W0, OptTensor reset,
                                     Tensor WT, Tensor vbar, Tensor gy, Tensor gWT, bool poison, int64_t st) {
    const Dims d = dims(k, v);
    const int64_t TN = d.T * d.N(), NEM = d.N() * d.E * d.M;
    check(__func__, {{&q, TN * d.E}, {&k, TN * d.E}, {&v, TN * d.M}, {&beta, TN}, {&W0, NEM}, {&WT, NEM},
                     {&vbar, TN * d.M}, {&gy, TN * d.M}, {&gWT, NEM}});
    const bool* r = reset_ptr(__func__, reset, d, q);
    const Alloc a{poison};
    Tensor dq = a.like(q), dk = a.like(k), dv = a.like(v), dbeta = a.like(beta), dW0 = a.like(W0);
    Impl::dispatch(q.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::linear_backward(d, r, p<S>(q), p<S>(k), p<S>(v), p<S>(beta), p<S>(W0), p<S>(WT), p<S>(vbar), p<S>(gy),
                            p<S>(gWT), p<S>(dq), p<S>(dk), p<S>(dv), p<S>(dbeta), p<S>(dW0), stream(st));
    });
    return {dq, dk, dv, dbeta, dW0};
  }

  static Tensors rdn_rule_forward(Tensor qx, Tensor kx, Tensor vx, Tensor bx, Tensor Rq, Tensor Rk, Tensor Rv,
                                  Tensor rb, Tensor W0, Tensor h0, OptTensor reset, bool poison, int64_t st) {
    const Dims d = dims(qx, vx);
    const int64_t TN = d.T * d.N(), Td = TN * d.E, Hdd = d.H * d.E * d.E, Ndd = d.N() * d.E * d.E,
                  Nd = d.N() * d.E;
    check(__func__, {{&qx, Td}, {&kx, Td}, {&vx, Td}, {&bx, TN}, {&Rq, Hdd}, {&Rk, Hdd}, {&Rv, Hdd},
                     {&rb, d.H * d.E}, {&W0, Ndd}, {&h0, Nd}});
    const bool* r = reset_ptr(__func__, reset, d, qx);
    const Alloc a{poison};
    Tensor y = a.like(qx), WT = a.like(W0), hT = a.like(h0), qs = a.like(qx), ks = a.like(qx), vs = a.like(qx),
           vbar = a.like(qx), betas = a.like(bx);
    Impl::dispatch(qx.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::rdn_forward(d, r, p<S>(qx), p<S>(kx), p<S>(vx), p<S>(bx), p<S>(Rq), p<S>(Rk), p<S>(Rv), p<S>(rb),
                        p<S>(W0), p<S>(h0), p<S>(y), p<S>(WT), p<S>(hT), p<S>(qs), p<S>(ks), p<S>(vs), p<S>(vbar),
                        p<S>(betas), stream(st));
    });
    return {y, WT, hT, qs, ks, vs, vbar, betas};
  }

  static Tensors rdn_rule_backward(Tensor Rq, Tensor Rk, Tensor Rv, Tensor rb, Tensor W0, Tensor h0,
                                   OptTensor reset, Tensor y, Tensor WT, Tensor qs, Tensor ks, Tensor vs, Tensor vbar,
                                   Tensor betas, Tensor gy, Tensor gWT, Tensor ghT, bool poison, int64_t st) {
    const Dims d = dims(qs, vs);
    const int64_t TN = d.T * d.N(), Td = TN * d.E, Hdd = d.H * d.E * d.E, Ndd = d.N() * d.E * d.E,
                  Nd = d.N() * d.E;
    check(__func__, {{&Rq, Hdd}, {&Rk, Hdd}, {&Rv, Hdd}, {&rb, d.H * d.E}, {&W0, Ndd}, {&h0, Nd}, {&y, Td},
                     {&WT, Ndd}, {&qs, Td}, {&ks, Td}, {&vs, Td}, {&vbar, Td}, {&betas, TN}, {&gy, Td},
                     {&gWT, Ndd}, {&ghT, Nd}});
    const bool* r = reset_ptr(__func__, reset, d, qs);
    const Alloc a{poison};
    Tensor dqx = a.like(qs), dkx = a.like(qs), dvx = a.like(qs), dbx = a.like(betas), dRq = a.like(Rq),
           dRk = a.like(Rk), dRv = a.like(Rv), drb = a.like(rb), dW0 = a.like(W0), dh0 = a.like(h0);
    // partial gradients of the per-head slow weights (per sample on CUDA, per group of samples on the CPU),
    // summed in a fixed order
    const int64_t P = Impl::rdn_partials(d.B);
    Tensor dR_part = a.shaped(Rq, {3, P, d.H, d.E, d.E}), drb_part = a.shaped(rb, {P, d.H, d.E});
    Impl::dispatch(qs.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::rdn_backward(d, r, p<S>(Rq), p<S>(Rk), p<S>(Rv), p<S>(rb), p<S>(W0), p<S>(h0), p<S>(y), p<S>(WT),
                         p<S>(qs), p<S>(ks), p<S>(vs), p<S>(vbar), p<S>(betas), p<S>(gy), p<S>(gWT), p<S>(ghT),
                         p<S>(dqx), p<S>(dkx), p<S>(dvx), p<S>(dbx), p<S>(dRq), p<S>(dRk), p<S>(dRv), p<S>(drb),
                         p<S>(dW0), p<S>(dh0), p<S>(dR_part), p<S>(drb_part), stream(st));
    });
    return {dqx, dkx, dvx, dbx, dRq, dRk, dRv, drb, dW0, dh0};
  }

  static Tensors delta_rnn_rule_forward(Tensor z, Tensor kr, Tensor vr, Tensor br, Tensor R0, Tensor h0,
                                        OptTensor reset, bool poison, int64_t st) {
    const Dims d = dims(z, vr);
    const int64_t TN = d.T * d.N(), Td = TN * d.E, Ndd = d.N() * d.E * d.E, Nd = d.N() * d.E;
    check(__func__, {{&z, Td}, {&kr, Td}, {&vr, Td}, {&br, TN}, {&R0, Ndd}, {&h0, Nd}});
    const bool* r = reset_ptr(__func__, reset, d, z);
    const Alloc a{poison};
    Tensor y = a.like(z), RT = a.like(R0), hT = a.like(h0), vbar = a.like(z);
    Impl::dispatch(z.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::delta_rnn_forward(d, r, p<S>(z), p<S>(kr), p<S>(vr), p<S>(br), p<S>(R0), p<S>(h0), p<S>(y), p<S>(RT),
                              p<S>(hT), p<S>(vbar), stream(st));
    });
    return {y, RT, hT, vbar};
  }

  static Tensors delta_rnn_rule_backward(Tensor kr, Tensor vr, Tensor br, Tensor R0, Tensor h0, OptTensor reset,
                                         Tensor y, Tensor RT, Tensor vbar, Tensor gy, Tensor gRT, Tensor ghT,
                                         bool poison, int64_t st) {
    const Dims d = dims(kr, vr);
    const int64_t TN = d.T * d.N(), Td = TN * d.E, Ndd = d.N() * d.E * d.E, Nd = d.N() * d.E;
    check(__func__, {{&kr, Td}, {&vr, Td}, {&br, TN}, {&R0, Ndd}, {&h0, Nd}, {&y, Td}, {&RT, Ndd}, {&vbar, Td},
                     {&gy, Td}, {&gRT, Ndd}, {&ghT, Nd}});
    const bool* r = reset_ptr(__func__, reset, d, kr);
    const Alloc a{poison};
    Tensor dz = a.like(y), dkr = a.like(kr), dvr = a.like(vr), dbr = a.like(br), dR0 = a.like(R0),
           dh0 = a.like(h0);
    Impl::dispatch(kr.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::delta_rnn_backward(d, r, p<S>(kr), p<S>(vr), p<S>(br), p<S>(R0), p<S>(h0), p<S>(y), p<S>(RT),
                               p<S>(vbar), p<S>(gy), p<S>(gRT), p<S>(ghT), p<S>(dz), p<S>(dkr), p<S>(dvr),
                               p<S>(dbr), p<S>(dR0), p<S>(dh0), stream(st));
    });
    return {dz, dkr, dvr, dbr, dR0, dh0};
  }

  static Tensors delta_lstm_rule_forward(Tensor z, Tensor kr, Tensor vr, Tensor br, Tensor R0, Tensor h0,
                                         Tensor c0, OptTensor reset, bool poison, int64_t st) {
    const Dims d = dims(z, vr);
    const int64_t TN = d.T * d.N(), Td = TN * d.E, N3dd = 3 * d.N() * d.E * d.E, Nd = d.N() * d.E;
    check(__func__, {{&z, 3 * Td}, {&kr, 3 * Td}, {&vr, 3 * Td}, {&br, 3 * TN}, {&R0, N3dd}, {&h0, Nd},
                     {&c0, Nd}});
    const bool* r = reset_ptr(__func__, reset, d, z);
    const Alloc a{poison};
    Tensor y = a.shaped(z, {d.T, d.B, d.H, d.E}), RT = a.like(R0), hT = a.like(h0), cT = a.like(c0),
           vbar = a.like(z), gates = a.like(z), cs = a.like(y);
    Impl::dispatch(z.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::delta_lstm_forward(d, r, p<S>(z), p<S>(kr), p<S>(vr), p<S>(br), p<S>(R0), p<S>(h0), p<S>(c0), p<S>(y),
                               p<S>(RT), p<S>(hT), p<S>(cT), p<S>(vbar), p<S>(gates), p<S>(cs), stream(st));
    });
    return {y, RT, hT, cT, vbar, gates, cs};
  }

  static Tensors delta_lstm_rule_backward(Tensor kr, Tensor vr, Tensor br, Tensor R0, Tensor h0, Tensor c0,
                                          OptTensor reset, Tensor y, Tensor RT, Tensor vbar, Tensor gates, Tensor cs,
                                          Tensor gy, Tensor gRT, Tensor ghT, Tensor gcT, bool poison, int64_t st) {
    const Dims d = dims(kr, vr);
    const int64_t TN = d.T * d.N(), Td = TN * d.E, N3dd = 3 * d.N() * d.E * d.E, Nd = d.N() * d.E;
    check(__func__, {{&kr, 3 * Td}, {&vr, 3 * Td}, {&br, 3 * TN}, {&R0, N3dd}, {&h0, Nd}, {&c0, Nd}, {&y, Td},
                     {&RT, N3dd}, {&vbar, 3 * Td}, {&gates, 3 * Td}, {&cs, Td}, {&gy, Td}, {&gRT, N3dd},
                     {&ghT, Nd}, {&gcT, Nd}});
    const bool* r = reset_ptr(__func__, reset, d, kr);
    const Alloc a{poison};
    Tensor dz = a.like(kr), dkr = a.like(kr), dvr = a.like(vr), dbr = a.like(br), dR0 = a.like(R0),
           dh0 = a.like(h0), dc0 = a.like(c0);
    Impl::dispatch(kr.scalar_type(), [&](auto s) {
      using S = decltype(s);
      Impl::delta_lstm_backward(d, r, p<S>(kr), p<S>(vr), p<S>(br), p<S>(R0), p<S>(h0), p<S>(c0), p<S>(y),
                                p<S>(RT), p<S>(vbar), p<S>(gates), p<S>(cs), p<S>(gy), p<S>(gRT), p<S>(ghT),
                                p<S>(gcT), p<S>(dz), p<S>(dkr), p<S>(dvr), p<S>(dbr), p<S>(dR0), p<S>(dh0),
                                p<S>(dc0), stream(st));
    });
    return {dz, dkr, dvr, dbr, dR0, dh0, dc0};
  }

  static void define(pybind11::module& m) {
    m.def("sum_rule_forward", &sum_rule_forward);
    m.def("sum_rule_backward", &sum_rule_backward);
    m.def("delta_rule_forward", &delta_rule_forward);
    m.def("delta_rule_backward", &delta_rule_backward);
    m.def("rdn_rule_forward", &rdn_rule_forward);
    m.def("rdn_rule_backward", &rdn_rule_backward);
    m.def("delta_rnn_rule_forward", &delta_rnn_rule_forward);
    m.def("delta_rnn_rule_backward", &delta_rnn_rule_backward);
    m.def("delta_lstm_rule_forward", &delta_lstm_rule_forward);
    m.def("delta_lstm_rule_backward", &delta_lstm_rule_backward);
#ifdef RFWP_SOURCE_HASH  // set by setup.py for ahead-of-time builds (cuda_ext/loader.py checks it)
    char hash[17];
    std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(RFWP_SOURCE_HASH));
    m.attr("source_hash") = std::string(hash);
#endif
  }
};

}  // namespace rfwp
