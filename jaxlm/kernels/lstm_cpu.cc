// The LSTM recurrence for XLA:CPU as two XLA FFI handlers (forward, backward), one direction each.
//
// Why: XLA:CPU runs a scanned loop body as a chain of separate small kernels, and at LM shapes
// ([B, H] x [H, 4H] per step) that per-operation cost, not arithmetic, is what the step pays
// (BENCHMARKS.md). Here a step is one BLAS sgemm plus one vectorised pass over the gates.
// The math is exactly jaxlm/models/lstm.py's fused recurrence (same residuals, same masking
// rules), which the tests compare against; jaxlm/kernels/__init__.py builds and registers it.
//
// Layout: time-major, row-major float32. xz [T,B,4H] (input projection + both biases),
// mask [T,B] (1 = valid step), w_hh [H,4H], states [B,H]. Gate order i, f, g, o.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

namespace {

// Waits for `counter` to reach `target`: spins briefly (a step takes tens of microseconds), then
// yields, so a participant whose partner was descheduled does not burn the core it needs.
inline void WaitFor(const std::atomic<int64_t>& counter, int64_t target) {
  for (int spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5, so the gate pass is one vectorised tanh (libmvec).
inline float Sigmoid(float x) { return 0.5f * std::tanh(0.5f * x) + 0.5f; }

// Runs `work(s, k)` for every step s in [0, S) and chunk k in [0, C); item (s, k) starts only
// after every item of step s-1 has finished. The caller and up to C-1 tasks on XLA's intra-op
// thread pool take items in order from one atomic ticket counter, so nothing waits for a thread
// that has not started: if the pool is busy, the caller does all the work itself. BLAS runs
// single-threaded inside: the parallelism is ours, on XLA's threads, with no second pool
// competing for the cores.
struct Tickets {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Work>
void RunSteps(ffi::ThreadPool& pool, int64_t S, int64_t C, const Work& work) {
  auto tickets = std::make_shared<Tickets>();
  const int64_t total = S * C;
  static std::once_flag blas_serial;  // this OpenBLAS copy serves only this kernel
  std::call_once(blas_serial, [] { scipy_openblas_set_num_threads(1); });
  auto take_items = [tickets, total, C](const Work* w) {
    for (;;) {
      const int64_t id = tickets->next.fetch_add(1, std::memory_order_relaxed);
      if (id >= total) break;
      const int64_t s = id / C;
      WaitFor(tickets->done, s * C);
      (*w)(s, id % C);
      tickets->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A late helper only finds tickets >= total and never touches `work` after we return.
  for (int64_t i = 1; i < C; ++i) pool.Schedule([take_items, &work] { take_items(&work); });
  take_items(&work);
  WaitFor(tickets->done, total);
}

// Chunk k of the hidden units, [begin, end): contiguous, as equal as H allows.
struct Chunk {
  int64_t begin, size;
};
inline Chunk UnitsOf(int64_t k, int64_t C, int64_t H) {
  const int64_t b = k * H / C, e = (k + 1) * H / C;
  return {b, e - b};
}

// The rows of a step still inside their length (mask != 0), in order; returns how many.
inline int64_t ActiveRows(const float* mask_t, int64_t B, int64_t* rows) {
  int64_t na = 0;
  for (int64_t b = 0; b < B; ++b)
    if (mask_t[b] != 0.0f) rows[na++] = b;
  return na;
}

// Threads to use: the pool's, but no chunk narrower than 32 units (smaller sgemms lose more to
// synchronisation than they gain).
inline int64_t NumChunks(ffi::ThreadPool& pool, int64_t H) {
  int64_t c = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), H / 32));
  return std::min<int64_t>(c, 8);
}

ffi::Error CheckShapes(int64_t T, int64_t B, int64_t H, F32& mask, F32& w_hh) {
  auto md = mask.dimensions();
  auto wd = w_hh.dimensions();
  if (md.size() != 2 || md[0] != T || md[1] != B)
    return ffi::Error::InvalidArgument("jaxlm LSTM kernel: mask must be [T, B]");
  if (wd.size() != 2 || wd[0] != H || wd[1] != 4 * H)
    return ffi::Error::InvalidArgument("jaxlm LSTM kernel: w_hh must be [H, 4H]");
  return ffi::Error::Success();
}

// Forward. Outputs ys [T,B,H], final c, h [B,H]; with residual pointers, also what the backward
// needs: h_prev, c_prev [T,B,H] (the carry entering each step), acts [T,B,4H] (gate
// activations), tc [T,B,H] (tanh of the new cell).
//
// Chunk k owns hidden units [u0, u0+n) and all four of their gates, so it runs its own sgemm
// (h [B,H] x its columns of W_hh, repacked contiguously as [H, 4n]) and gate pass without
// waiting for the others; h is double-buffered because every chunk reads all of the previous h.
ffi::Error Forward(ffi::ThreadPool& pool, F32& xz, F32& mask, F32& w_hh, F32& c0, F32& h0,
                   int64_t reverse, float* y, float* c_out, float* h_out, float* h_prev,
                   float* c_prev, float* acts, float* tcs) {
  auto d = xz.dimensions();
  if (d.size() != 3 || d[2] % 4 != 0)
    return ffi::Error::InvalidArgument("jaxlm LSTM kernel: xz must be [T, B, 4H]");
  const int64_t T = d[0], B = d[1], H = d[2] / 4, G = 4 * H;
  if (auto err = CheckShapes(T, B, H, mask, w_hh); err.failure()) return err;
  const float* x = xz.typed_data();
  const float* m = mask.typed_data();
  const float* w = w_hh.typed_data();
  const int64_t C = NumChunks(pool, H);

  std::vector<float> packed(H * G);  // chunk k's block: [H, 4n] at offset H * 4 * u0
  for (int64_t k = 0; k < C; ++k) {
    const Chunk u = UnitsOf(k, C, H);
    float* dst = packed.data() + H * 4 * u.begin;
    for (int64_t r = 0; r < H; ++r)
      for (int64_t q = 0; q < 4; ++q)
        std::memcpy(dst + r * 4 * u.size + q * u.size, w + r * G + q * H + u.begin,
                    sizeof(float) * u.size);
  }
  std::vector<float> h_buf(2 * B * H), z(B * G);  // z: chunk k's [B, 4n] at offset B * 4 * u0
  std::memcpy(h_buf.data(), h0.typed_data(), sizeof(float) * B * H);
  std::memcpy(c_out, c0.typed_data(), sizeof(float) * B * H);
  std::vector<float> no_residual(C * 5 * H);  // acts and tc scratch when not saving
  std::vector<float> h_gather(C * B * H);     // per chunk: the active rows of h
  std::vector<int64_t> active(C * B);         // per chunk: their indices

  auto work = [&](int64_t s, int64_t k) {
    const int64_t t = reverse ? T - 1 - s : s;
    const Chunk u = UnitsOf(k, C, H);
    const int64_t n = u.size, u0 = u.begin;
    const float* h_in = h_buf.data() + (s % 2) * B * H;
    float* h_next = h_buf.data() + ((s + 1) % 2) * B * H;
    // Like PyTorch's packed sequences, only the rows still inside their length are computed:
    // the sgemm runs on those rows gathered (all of them, in place, when none is padding).
    int64_t* rows = active.data() + k * B;
    const int64_t na = ActiveRows(m + t * B, B, rows);
    const float* h_rows = h_in;
    if (na < B) {
      float* gathered = h_gather.data() + k * B * H;
      for (int64_t i = 0; i < na; ++i)
        std::memcpy(gathered + i * H, h_in + rows[i] * H, sizeof(float) * H);
      h_rows = gathered;
    }
    float* zk = z.data() + B * 4 * u0;
    for (int64_t i = 0; i < na; ++i)
      for (int64_t q = 0; q < 4; ++q)
        std::memcpy(zk + i * 4 * n + q * n, x + (t * B + rows[i]) * G + q * H + u0,
                    sizeof(float) * n);
    if (na > 0)
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, na, 4 * n, H, 1.0f, h_rows,
                        H, packed.data() + H * 4 * u0, 4 * n, 1.0f, zk, 4 * n);
    for (int64_t b = 0; b < B; ++b) {  // every row: residual carry, and pass-through if padding
      const int64_t row = t * B + b;
      if (h_prev) {
        std::memcpy(h_prev + row * H + u0, h_in + b * H + u0, sizeof(float) * n);
        std::memcpy(c_prev + row * H + u0, c_out + b * H + u0, sizeof(float) * n);
      }
      if (m[row] != 0.0f) continue;
      std::memcpy(h_next + b * H + u0, h_in + b * H + u0, sizeof(float) * n);
      std::memset(y + row * H + u0, 0, sizeof(float) * n);
      if (acts) {  // unused by the backward (a padded step's dz is 0), but never left undefined
        for (int64_t q = 0; q < 4; ++q)
          std::memset(acts + row * G + q * H + u0, 0, sizeof(float) * n);
        std::memset(tcs + row * H + u0, 0, sizeof(float) * n);
      }
    }
    for (int64_t i = 0; i < na; ++i) {
      const int64_t b = rows[i], row = t * B + b;
      const float* zb = zk + i * 4 * n;
      float* scratch = no_residual.data() + k * 5 * H;
      float* ai = acts ? acts + row * G + u0 : scratch;
      float* af = acts ? ai + H : scratch + H;
      float* ag = acts ? ai + 2 * H : scratch + 2 * H;
      float* ao = acts ? ai + 3 * H : scratch + 3 * H;
      float* tc = tcs ? tcs + row * H + u0 : scratch + 4 * H;
      float* cb = c_out + b * H + u0;
      float* hn = h_next + b * H + u0;
      float* yb = y + row * H + u0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        ai[j] = Sigmoid(zb[j]);
        af[j] = Sigmoid(zb[n + j]);
        ag[j] = std::tanh(zb[2 * n + j]);
        ao[j] = Sigmoid(zb[3 * n + j]);
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        cb[j] = af[j] * cb[j] + ai[j] * ag[j];
        tc[j] = std::tanh(cb[j]);
        hn[j] = ao[j] * tc[j];
        yb[j] = hn[j];
      }
    }
  };
  RunSteps(pool, T, C, work);
  std::memcpy(h_out, h_buf.data() + (T % 2) * B * H, sizeof(float) * B * H);
  return ffi::Error::Success();
}

ffi::Error ForwardTrain(ffi::ThreadPool pool, F32 xz, F32 mask, F32 w_hh, F32 c0, F32 h0,
                        int64_t reverse, F32Out ys, F32Out c_out, F32Out h_out, F32Out h_prev,
                        F32Out c_prev, F32Out acts, F32Out tcs) {
  return Forward(pool, xz, mask, w_hh, c0, h0, reverse, ys->typed_data(), c_out->typed_data(),
                 h_out->typed_data(), h_prev->typed_data(), c_prev->typed_data(),
                 acts->typed_data(), tcs->typed_data());
}

ffi::Error ForwardInfer(ffi::ThreadPool pool, F32 xz, F32 mask, F32 w_hh, F32 c0, F32 h0,
                        int64_t reverse, F32Out ys, F32Out c_out, F32Out h_out) {
  return Forward(pool, xz, mask, w_hh, c0, h0, reverse, ys->typed_data(), c_out->typed_data(),
                 h_out->typed_data(), nullptr, nullptr, nullptr, nullptr);
}

// Backward through the recurrence, in the opposite time order to the forward. Outputs the gate
// pre-activation gradients dz [T,B,4H] (dxz; dW_hh = h_prev^T dz is one matmul over all steps,
// which the caller does) and the initial-state gradients dc0, dh0 [B,H]. A masked step passed
// its carry through unchanged; so does its gradient, and its dz is 0.
//
// Item (s, k): first chunk k's columns of dh from the previous item's step (dz of all units x
// the rows of W_hh for chunk k: needs every chunk's dz, hence the step order), then the gate
// gradients of chunk k at step s. Step T only finishes dh0. As in the forward, only the rows
// inside their length enter the sgemm.
ffi::Error Backward(ffi::ThreadPool pool, F32 w_hh, F32 mask, F32 c_prev, F32 acts, F32 tcs,
                    F32 dys, F32 dc_last, F32 dh_last, int64_t reverse, F32Out dz_out,
                    F32Out dc0, F32Out dh0) {
  auto d = acts.dimensions();
  if (d.size() != 3 || d[2] % 4 != 0)
    return ffi::Error::InvalidArgument("jaxlm LSTM kernel: acts must be [T, B, 4H]");
  const int64_t T = d[0], B = d[1], H = d[2] / 4, G = 4 * H;
  if (auto err = CheckShapes(T, B, H, mask, w_hh); err.failure()) return err;

  const float* m = mask.typed_data();
  const float* w = w_hh.typed_data();
  const float* cp_all = c_prev.typed_data();
  const float* a_all = acts.typed_data();
  const float* tc_all = tcs.typed_data();
  const float* dy_all = dys.typed_data();
  float* dz_all = dz_out->typed_data();
  float* dc = dc0->typed_data();
  float* dh = dh0->typed_data();
  std::memcpy(dc, dc_last.typed_data(), sizeof(float) * B * H);
  std::memcpy(dh, dh_last.typed_data(), sizeof(float) * B * H);
  const int64_t C = NumChunks(pool, H);
  std::vector<float> dh_new(B * H);  // chunk k's [B, n] at offset B * u0
  // A step's dz of its active rows only, packed [na, 4H] for the next item's sgemm when the step
  // has padding; two buffers, because step s+1 writes one while step s's is still being read.
  std::vector<float> dz_packed(2 * B * G);
  std::vector<int64_t> active(C * B);
  auto time_of = [&](int64_t s) { return reverse ? s : T - 1 - s; };

  auto work = [&](int64_t s, int64_t k) {
    const Chunk u = UnitsOf(k, C, H);
    const int64_t n = u.size, u0 = u.begin;
    int64_t* rows = active.data() + k * B;
    if (s > 0) {  // dh of the active rows of the previous step; padding rows keep theirs
      const int64_t tp = time_of(s - 1);
      const int64_t na = ActiveRows(m + tp * B, B, rows);
      const float* dz_rows =
          na == B ? dz_all + tp * B * G : dz_packed.data() + ((s - 1) % 2) * B * G;
      float* out = dh_new.data() + B * u0;
      if (na > 0)
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, na, n, G, 1.0f, dz_rows, G,
                          w + u0 * G, G, 0.0f, out, n);
      for (int64_t i = 0; i < na; ++i)
        std::memcpy(dh + rows[i] * H + u0, out + i * n, sizeof(float) * n);
    }
    if (s == T) return;
    const int64_t t = time_of(s);
    const int64_t na = ActiveRows(m + t * B, B, rows);
    for (int64_t b = 0; b < B; ++b)
      if (m[t * B + b] == 0.0f)
        for (int64_t q = 0; q < 4; ++q)
          std::memset(dz_all + (t * B + b) * G + q * H + u0, 0, sizeof(float) * n);
    for (int64_t r = 0; r < na; ++r) {
      const int64_t b = rows[r], row = t * B + b;
      const float* a = a_all + row * G + u0;
      const float* tc = tc_all + row * H + u0;
      const float* cp = cp_all + row * H + u0;
      const float* dy = dy_all + row * H + u0;
      float* dz = dz_all + row * G + u0;
      float* dcb = dc + b * H + u0;
      const float* dhb = dh + b * H + u0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
        const float dhn = dhb[j] + dy[j];
        const float dcn = dcb[j] + dhn * o * (1.0f - tc[j] * tc[j]);
        dz[j] = dcn * g * i * (1.0f - i);
        dz[H + j] = dcn * cp[j] * f * (1.0f - f);
        dz[2 * H + j] = dcn * i * (1.0f - g * g);
        dz[3 * H + j] = dhn * tc[j] * o * (1.0f - o);
        dcb[j] = dcn * f;
      }
      if (na < B) {
        float* packed = dz_packed.data() + (s % 2) * B * G + r * G + u0;
        for (int64_t q = 0; q < 4; ++q)
          std::memcpy(packed + q * H, dz + q * H, sizeof(float) * n);
      }
    }
  };
  RunSteps(pool, T + 1, C, work);
  return ffi::Error::Success();
}

}  // namespace

// Both forwards take (xz, mask, w_hh, c0, h0; reverse) and return (ys, c, h) first.
static auto ForwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<F32>()  // xz
      .Arg<F32>()  // mask
      .Arg<F32>()  // w_hh
      .Arg<F32>()  // c0
      .Arg<F32>()  // h0
      .Attr<int64_t>("reverse")
      .Ret<F32>()   // ys
      .Ret<F32>()   // c
      .Ret<F32>();  // h
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmLstmForwardTrain, ForwardTrain,
                              ForwardBinding()
                                  .Ret<F32>()    // h_prev
                                  .Ret<F32>()    // c_prev
                                  .Ret<F32>()    // acts
                                  .Ret<F32>());  // tc

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmLstmForwardInfer, ForwardInfer, ForwardBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmLstmBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // w_hh
                                  .Arg<F32>()  // mask
                                  .Arg<F32>()  // c_prev
                                  .Arg<F32>()  // acts
                                  .Arg<F32>()  // tc
                                  .Arg<F32>()  // dys
                                  .Arg<F32>()  // dc_last
                                  .Arg<F32>()  // dh_last
                                  .Attr<int64_t>("reverse")
                                  .Ret<F32>()    // dz
                                  .Ret<F32>()    // dc0
                                  .Ret<F32>());  // dh0
