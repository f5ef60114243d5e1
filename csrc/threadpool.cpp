#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <pthread.h>

namespace prism {
namespace {

constexpr int kMaxThreads = 1024;

thread_local bool in_pool_task = false;

class Pool {
 public:
  int size() {
    std::lock_guard<std::mutex> g(run_mutex_);
    return size_unlocked();
  }
  // Without the lock: for the fork child, where run_mutex_ may be held by a
  // thread that no longer exists.
  int size_unlocked() const { return static_cast<int>(workers_.size()) + 1; }

  // Resizes to n threads (caller included). On failure (the OS refuses a
  // thread) the pool goes back to its previous size and the error propagates.
  void resize(int n) {
    std::lock_guard<std::mutex> g(run_mutex_);
    const int previous = static_cast<int>(workers_.size()) + 1;
    stop_workers();
    try {
      start_workers(n);
    } catch (...) {
      stop_workers();
      try {
        start_workers(previous);
      } catch (...) {  // best effort: a smaller pool still computes correctly
      }
      throw;
    }
  }

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::defer_lock);
    if (in_pool_task || n <= grain || !run_lock.try_lock() || workers_.empty()) {
      fn(0, n);
      return;
    }
    const int64_t threads = static_cast<int64_t>(workers_.size()) + 1;
    // A few chunks per thread balance uneven work without much overhead.
    const int64_t chunk = std::max(grain, (n + threads * 4 - 1) / (threads * 4));
    Job job;
    {
      std::lock_guard<std::mutex> g(m_);
      job = Job{&fn, n, chunk, static_cast<uint32_t>(++generation_)};
      job_ = job;
      done_.store(0);
      error_ = nullptr;
      next_.store(static_cast<uint64_t>(job.tag) << 32);
    }
    cv_.notify_all();
    work(job);
    // Wait only for chunks a worker has claimed and not finished: a worker
    // that has not woken up yet finds no chunk left and does nothing, so a
    // busy machine's late wake-ups never hold the caller.
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return done_.load() == n; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // One parallel_for call; tag is its generation (mod 2^32), which also tags
  // the chunk counter so a worker that wakes late cannot claim a chunk of a
  // later call with this one's function.
  struct Job {
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    int64_t n = 0, chunk = 1;
    uint32_t tag = 0;
  };

  // next_ = tag << 32 | index of the next chunk (chunks per call <= 4 * threads).
  bool claim(const Job& job, int64_t* begin) {
    uint64_t cur = next_.load();
    for (;;) {
      if (static_cast<uint32_t>(cur >> 32) != job.tag) return false;
      const int64_t b = static_cast<int64_t>(cur & 0xffffffffu) * job.chunk;
      if (b >= job.n) return false;
      if (next_.compare_exchange_weak(cur, cur + 1)) {
        *begin = b;
        return true;
      }
    }
  }

  void work(const Job& job) {
    const bool was_in_task = in_pool_task;
    in_pool_task = true;
    int64_t begin = 0;
    while (claim(job, &begin)) {
      const int64_t end = std::min(job.n, begin + job.chunk);
      try {
        (*job.fn)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> g(m_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(end - begin) + (end - begin) == job.n) {
        std::lock_guard<std::mutex> g(m_);
        done_cv_.notify_all();
      }
    }
    in_pool_task = was_in_task;
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      work(job);
    }
  }

  void start_workers(int n) {
    // A new worker must start from the current generation, read here and not
    // in the thread: a job posted before the thread first runs would otherwise
    // count as already seen, and run() would wait for that worker forever.
    uint64_t generation = 0;
    {
      std::lock_guard<std::mutex> lk(m_);
      generation = generation_;
    }
    workers_.reserve(static_cast<size_t>(n > 1 ? n - 1 : 0));
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, generation] { worker_loop(generation); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
  }

  std::mutex run_mutex_;  // one parallel_for at a time
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  Job job_;                       // the latest call (guarded by m_)
  std::atomic<uint64_t> next_{0};  // see claim()
  std::atomic<int64_t> done_{0};   // items of the current call finished
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// The pool lives behind a pointer so a child made by fork() can drop the
// parent's: its threads do not exist in the child, and waiting for them would
// hang for ever. The child makes a new pool of the same size on first use.
// The old object is leaked, never destroyed: its mutexes may have been held by
// a thread that is gone, and its std::thread members are still "joinable".
std::mutex g_pool_mutex;  // guards creation; held across fork (see below)
std::atomic<Pool*> g_pool{nullptr};
int g_pool_size = 0;  // size the next pool starts with (0: hardware threads)

void before_fork() { g_pool_mutex.lock(); }
void after_fork_parent() { g_pool_mutex.unlock(); }
void after_fork_child() {
  // This thread held g_pool_mutex through fork (before_fork), so nothing else
  // touches the pool state here; the child is single-threaded anyway.
  Pool* old = g_pool.load();
  if (old) g_pool_size = old->size_unlocked();
  g_pool.store(nullptr);
  g_pool_mutex.unlock();
}

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  std::lock_guard<std::mutex> g(g_pool_mutex);
  p = g_pool.load();
  if (p) return *p;
  static const bool registered = pthread_atfork(before_fork, after_fork_parent, after_fork_child) == 0;
  (void)registered;  // without it fork still works until a kernel runs in the child
  p = new Pool();
  int n = g_pool_size;
  if (n < 1) {
    const unsigned hw = std::thread::hardware_concurrency();
    n = hw == 0 ? 1 : static_cast<int>(std::min<unsigned>(hw, kMaxThreads));
  }
  try {
    p->resize(n);
  } catch (...) {  // too many threads for the OS: run on the caller alone
  }
  g_pool.store(p, std::memory_order_release);
  return *p;
}

}  // namespace

int max_threads() { return kMaxThreads; }

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  // Checked before anything changes: a huge n would otherwise start threads
  // until the OS refuses, leaving a pool thousands of threads strong.
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("n: thread count must be in [1, " + std::to_string(kMaxThreads) + "], got " +
                                std::to_string(n));
  try {
    pool().resize(n);
  } catch (const std::system_error& e) {
    throw std::invalid_argument("n: could not start " + std::to_string(n) + " threads (" + e.what() +
                                "); the thread count is unchanged");
  }
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(n, grain, fn);
}

}  // namespace prism
