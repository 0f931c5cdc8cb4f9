// The kernels' one parallel construct: parallel_for over a persistent pool of our own threads,
// free of torch, so the same sources build into torch's extension and into a library that runs
// without torch (each binary has its own pool: the symbols are hidden).
//
// Built to keep going when other processes share the cores. A decode step runs ~150 short
// regions; with a fork/join team that splits a range into one fixed piece per thread and spins at
// the end, one descheduled thread stalls the region and its siblings burn their time slices
// waiting for it. Here instead:
//   - the range is cut into more chunks than threads, and every participant (the calling thread
//     included, which starts at once) claims chunks from one atomic counter: a worker that wakes
//     late finds no work left, and the caller waits only for chunks already claimed;
//   - waiting is short spinning, then sleeping on a futex (workers between regions, the caller
//     for a claimed chunk still running), so a waiting thread gives its core back;
//   - the chunks are contiguous pieces of [begin, end), each run as f(b0, b1): the kernels'
//     results do not depend on where a range is cut.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <climits>
#else
#include <condition_variable>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llama_engine {

// Threads a parallel region may use: set_threads(n) (the library's caller, once, for every
// thread that calls in), else OpenMP's default for the calling thread (torch sets that one:
// torch.set_num_threads), else the hardware's.
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> n{0};
  return n;
}
inline void set_threads(int n) { thread_setting().store(n > 0 ? n : 0); }

inline int max_threads() {
  const int set = thread_setting().load(std::memory_order_relaxed);
  if (set > 0) return set;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

namespace pool_detail {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A 32-bit word one thread sleeps on until another changes it (a futex on Linux).
struct WaitWord {
  std::atomic<uint32_t> value{0};
  std::atomic<uint32_t> sleepers{0};
#if !defined(__linux__)
  std::mutex mu;
  std::condition_variable cv;
#endif

  // Blocks while value == seen (may return early; the caller re-checks).
  void sleep_while(uint32_t seen) {
    sleepers.fetch_add(1);  // seq_cst, paired with wake()'s load: no lost wake-up
#if defined(__linux__)
    if (value.load() == seen)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&value), FUTEX_WAIT_PRIVATE, seen, nullptr,
              nullptr, 0);
#else
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return value.load() != seen; });
    }
#endif
    sleepers.fetch_sub(1);
  }
  void set(uint32_t v) {
    value.store(v);  // seq_cst
    if (sleepers.load() == 0) return;
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&value), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
            nullptr, 0);
#else
    std::lock_guard<std::mutex> lock(mu);
    cv.notify_all();
#endif
  }
};

// How long a thread spins before it sleeps: LLAMA_ENGINE_SPIN_US (microseconds), default 100:
// longer than the gaps between a step's regions, far shorter than a scheduler's time slice.
inline std::chrono::nanoseconds spin_budget() {
  static const std::chrono::nanoseconds budget = [] {
    const char* s = std::getenv("LLAMA_ENGINE_SPIN_US");
    const long us = s != nullptr && *s != '\0' ? std::strtol(s, nullptr, 10) : 100;
    return std::chrono::nanoseconds(std::max(0L, us) * 1000);
  }();
  return budget;
}

// Spins until done() or the budget runs out; returns done()'s last answer.
template <class Done>
bool spin_until(const Done& done) {
  const auto budget = spin_budget();
  if (budget.count() == 0) return done();
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() - start > budget) return done();
  }
}

// Whether this thread is inside a region (a pool worker always is): nested calls run serially.
inline bool& in_region() {
  static thread_local bool inside = false;
  return inside;
}

using Body = void (*)(const void* f, int64_t b0, int64_t b1);

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers sleep until the process ends
    return *pool;
  }

  // Runs body(f, ...) over [begin, end) in chunks of `chunk` with up to `helpers` workers beside
  // the calling thread. Returns false, having run nothing, when another thread's region holds
  // the pool (the caller then runs its range itself).
  bool run(int64_t begin, int64_t end, int64_t chunk, int helpers, Body body, const void* f) {
    std::unique_lock<std::mutex> lock(owner_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    ensure_workers(helpers);
    // A new generation. First close the counter to every claim (a worker still holding the
    // previous generation's last value could otherwise pair it with the new range's end and
    // chunk and claim a chunk that does not exist: its CAS would still succeed); only then
    // write the range. A worker that reads a new field (acquire) has seen the counter closed.
    const uint32_t gen = ++gen_;
    next_.store(tag_of(gen) | kIndexMask);
    body_.store(body, std::memory_order_release);
    f_.store(f, std::memory_order_release);
    begin_.store(begin, std::memory_order_release);
    end_.store(end - begin, std::memory_order_release);
    chunk_.store(chunk, std::memory_order_release);
    remaining_.store(end - begin, std::memory_order_release);
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    next_.store(tag_of(gen));  // seq_cst: opens the counter, publishing the fields above
    for (int i = 0; i < helpers; ++i) workers_[i]->go.set(gen);
    work(gen);
    // wait for the chunks other threads claimed
    if (remaining_.load(std::memory_order_acquire) != 0 &&
        !spin_until([&] { return remaining_.load(std::memory_order_acquire) == 0; })) {
      for (;;) {
        const uint32_t seen = done_.value.load();
        if (remaining_.load(std::memory_order_acquire) == 0) break;
        done_.sleep_while(seen);
      }
    }
    if (failed_.load(std::memory_order_acquire)) std::rethrow_exception(error_);
    return true;
  }

 private:
  struct alignas(64) Worker {
    WaitWord go;  // the generation to work on
    std::thread thread;
  };

  // next_ holds the generation (high 32 bits) and the next unclaimed offset from begin_ (low
  // 32 bits: parallel_for hands the pool ranges shorter than 2^32)
  static constexpr uint64_t kIndexMask = 0xFFFFFFFFull;
  static uint64_t tag_of(uint32_t gen) { return static_cast<uint64_t>(gen) << 32; }

  // Claims and runs chunks of generation gen until none is left.
  void work(uint32_t gen) {
    const uint64_t tag = tag_of(gen);
    for (;;) {
      uint64_t cur = next_.load(std::memory_order_acquire);
      if ((cur & ~kIndexMask) != tag) return;  // a region of its own has ended
      // read before the claim, which succeeds only if the counter still holds cur: had a new
      // region written any of these, it would have closed the counter first
      const int64_t end = end_.load(std::memory_order_acquire);
      const int64_t chunk = chunk_.load(std::memory_order_acquire);
      const int64_t begin = begin_.load(std::memory_order_acquire);
      const int64_t b0 = static_cast<int64_t>(cur & kIndexMask);
      if (b0 >= end) return;
      const int64_t b1 = std::min(end, b0 + chunk);
      if (!next_.compare_exchange_weak(cur, tag | static_cast<uint64_t>(b1),
                                       std::memory_order_acq_rel, std::memory_order_acquire))
        continue;
      const Body body = body_.load(std::memory_order_relaxed);
      const void* f = f_.load(std::memory_order_relaxed);
      if (!failed_.load(std::memory_order_relaxed)) {
        try {
          body(f, begin + b0, begin + b1);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mu_);
          if (!failed_.load(std::memory_order_relaxed)) {
            error_ = std::current_exception();
            failed_.store(true, std::memory_order_release);
          }
        }
      }
      if (remaining_.fetch_sub(b1 - b0, std::memory_order_acq_rel) == b1 - b0)
        done_.set(gen);  // the region's last chunk: wake its caller if it sleeps
    }
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      w->thread = std::thread([this, w] { loop(w); });
      w->thread.detach();
    }
  }

  void loop(Worker* w) {
    in_region() = true;  // what a worker runs calls parallel_for serially
    uint32_t seen = 0;
    for (;;) {
      uint32_t gen = w->go.value.load(std::memory_order_acquire);
      if (gen == seen) {
        spin_until([&] { return (gen = w->go.value.load(std::memory_order_acquire)) != seen; });
        while (gen == seen) {
          w->go.sleep_while(seen);
          gen = w->go.value.load(std::memory_order_acquire);
        }
      }
      seen = gen;
      work(gen);
    }
  }

  std::mutex owner_;  // held by the thread whose region runs
  std::vector<std::unique_ptr<Worker>> workers_;
  uint32_t gen_ = 0;
  alignas(64) std::atomic<uint64_t> next_{0};
  std::atomic<Body> body_{nullptr};
  std::atomic<const void*> f_{nullptr};
  std::atomic<int64_t> begin_{0}, end_{0}, chunk_{1};  // end_: the range's length
  alignas(64) std::atomic<int64_t> remaining_{0};
  std::atomic<bool> failed_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;
  alignas(64) WaitWord done_;
};

template <class F>
void call_body(const void* f, int64_t b0, int64_t b1) {
  (*static_cast<const F*>(f))(b0, b1);
}

// Chunks per thread (LLAMA_ENGINE_CHUNKS, default 2): enough that a thread which stalls
// mid-region leaves the rest to the others, few enough that each chunk keeps its rows' weights
// together. Measured on 2 cores (bench/contention.py, decode): 4 cost ~7% of quiet speed
// against OpenMP's one piece per thread, 2 none, and 2 kept as much under contention as 4.
inline int64_t chunks_per_thread() {
  static const int64_t n = [] {
    const char* s = std::getenv("LLAMA_ENGINE_CHUNKS");
    return s != nullptr && *s != '\0' ? std::max(1L, std::strtol(s, nullptr, 10)) : 2L;
  }();
  return n;
}

}  // namespace pool_detail

// f(b0, b1) over [begin, end) in contiguous chunks, on up to max_threads() threads with at most
// one thread per `grain` items; chunks are at least `grain` items. Serial when already inside a
// region (ours or OpenMP's: at::parallel_for's contract) or while another thread's region holds
// the pool. An exception thrown by f (a failed allocation) reaches the caller; the chunks not yet
// started then do not run.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  constexpr int64_t kMaxRange = int64_t{1} << 31;  // what the pool's counter holds, with room
  if (end - begin > kMaxRange) {
    for (int64_t b = begin; b < end; b += std::min(kMaxRange, end - b))
      parallel_for(b, b + std::min(kMaxRange, end - b), grain, f);
    return;
  }
  const int64_t range = end - begin;
  grain = std::max<int64_t>(grain, 1);
  const int64_t n = std::min<int64_t>(max_threads(), (range + grain - 1) / grain);
  bool serial = n <= 1 || pool_detail::in_region();
#ifdef _OPENMP
  serial = serial || omp_in_parallel();
#endif
  if (!serial) {
    const int64_t chunk =
        std::max(grain, (range + n * pool_detail::chunks_per_thread() - 1) /
                            (n * pool_detail::chunks_per_thread()));
    pool_detail::in_region() = true;
    struct Leave {
      ~Leave() { pool_detail::in_region() = false; }
    } leave;
    if (!pool_detail::Pool::get().run(begin, end, chunk, static_cast<int>(n - 1),
                                      &pool_detail::call_body<F>, &f))
      f(begin, end);  // another thread's region holds the pool: still a region, run here
    return;
  }
  f(begin, end);
}

}  // namespace llama_engine
