// A CPU emulator of the small CUDA subset the kernels use, so tests can run the kernels' own code on a machine
// without a GPU (compiled by g++ with -DRFWP_EMULATE; see cuda_ext/csrc/emulator.cpp). Each CUDA thread of a
// block is a fiber (ucontext); every warp shuffle and __syncthreads() is a rendezvous of all the block's
// threads, so it checks indexing, the reductions, the backward algebra and that every thread meets the same
// sequence of synchronisation points. That is stricter than CUDA, where a warp-uniform branch may skip a
// shuffle; the kernels keep every shuffle block-uniform. It does not model memory races, timing or the warp
// scheduler: compute-sanitizer on a GPU covers those.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

namespace rfwp_emu {

struct Dim3 {
  unsigned x = 0, y = 1, z = 1;
};

}  // namespace rfwp_emu

inline rfwp_emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace rfwp_emu {

class Block {
 public:
  // Run body() once per thread of a block of `threads`, as fibers that meet at every sync().
  void run(int threads, const std::function<void()>& body) {
    body_ = &body;
    fibers_.assign(threads, Fiber{});
    stacks_.resize(size_t(threads) * kStack);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks_.data() + size_t(t) * kStack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &scheduler_;
      makecontext(&f.ctx, &Block::entry, 0);
    }
    exchange_.assign(threads, 0.f);
    for (;;) {  // one round: every live thread runs to its next sync point (or to its end)
      int alive = 0, finished_now = 0;
      for (int t = 0; t < threads; ++t) {
        if (fibers_[t].done) continue;
        current_ = t;
        threadIdx.x = unsigned(t);
        swapcontext(&scheduler_, &fibers_[t].ctx);
        if (fibers_[t].done) ++finished_now; else ++alive;
      }
      if (alive == 0) break;
      if (finished_now > 0) throw std::runtime_error("emulator: threads of a block diverged at a sync point");
      const long s = fibers_[0].syncs;
      for (const Fiber& f : fibers_)
        if (f.syncs != s) throw std::runtime_error("emulator: threads reached different sync points");
    }
  }
  void sync() {
    Fiber& f = fibers_[current_];
    ++f.syncs;
    swapcontext(&f.ctx, &scheduler_);
  }
  int thread() const { return current_; }
  float shuffle(float v, int src_lane) {
    const int t = current_;
    exchange_[t] = v;
    sync();
    const float r = exchange_[(t & ~31) + (src_lane & 31)];
    sync();  // nobody overwrites its slot before everyone has read
    return r;
  }

 private:
  static constexpr size_t kStack = 64 * 1024;
  struct Fiber {
    ucontext_t ctx;
    bool done = false;
    long syncs = 0;
  };
  static void entry();
  const std::function<void()>* body_ = nullptr;
  std::vector<Fiber> fibers_;
  std::vector<char> stacks_;
  std::vector<float> exchange_;
  ucontext_t scheduler_;
  int current_ = 0;

 public:
  Fiber& current_fiber() { return fibers_[current_]; }
  const std::function<void()>& body() const { return *body_; }
};

inline Block& block() {
  static Block b;
  return b;
}

inline void Block::entry() {
  Block& b = block();
  b.body()();
  b.current_fiber().done = true;  // returns to the scheduler through uc_link
}

inline std::vector<float>& shared_buffer() {
  static std::vector<float> s;
  return s;
}
inline float* shared_memory() { return shared_buffer().data(); }

// Runs kernel(args...) over `grid` blocks of `threads` threads, one block after another.
template <class K>
struct Launch {
  int64_t grid;
  int threads;
  size_t smem;
  K kernel;
  template <class... A>
  void operator()(A... args) const {
    shared_buffer().assign(smem / sizeof(float) + 1, 0.f);
    gridDim.x = unsigned(grid);
    blockDim.x = unsigned(threads);
    const std::function<void()> body = [&] { kernel(args...); };
    for (int64_t b = 0; b < grid; ++b) {
      blockIdx.x = unsigned(b);
      block().run(threads, body);
    }
  }
};

template <class K>
Launch<K> launch(int64_t grid, int threads, size_t smem, K kernel) {
  return Launch<K>{grid, threads, smem, kernel};
}

}  // namespace rfwp_emu

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <class K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

inline void __syncthreads() { rfwp_emu::block().sync(); }
inline float __shfl_sync(unsigned, float v, int src_lane) { return rfwp_emu::block().shuffle(v, src_lane); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  return rfwp_emu::block().shuffle(v, (rfwp_emu::block().thread() & 31) ^ mask);
}

#define RFWP_LAUNCH(grid, threads, smem, stream, ...) ::rfwp_emu::launch(grid, threads, smem, __VA_ARGS__)
