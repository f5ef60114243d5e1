#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace prism {
namespace {

thread_local bool in_pool_task = false;

class Pool {
 public:
  ~Pool() { resize(1); }

  int size() {
    std::lock_guard<std::mutex> g(run_mutex_);
    return static_cast<int>(workers_.size()) + 1;
  }

  void resize(int n) {
    std::lock_guard<std::mutex> g(run_mutex_);
    stop_workers();
    // Workers start from the generation current now, read here and not in the
    // new thread: a thread scheduled late would otherwise take the generation
    // of a job posted meanwhile as its starting point and sleep through it,
    // leaving run() waiting forever.
    uint64_t start = 0;
    {
      std::lock_guard<std::mutex> gm(m_);
      start = generation_;
    }
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, start] { worker_loop(start); });
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
    {
      std::lock_guard<std::mutex> g(m_);
      job_ = &fn;
      n_ = n;
      chunk_ = chunk;
      next_.store(0);
      pending_ = static_cast<int>(workers_.size());
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    const bool was_in_task = in_pool_task;
    in_pool_task = true;
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_);
      if (begin >= n_) break;
      try {
        (*job_)(begin, std::min(n_, begin + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> g(m_);
        if (!error_) error_ = std::current_exception();
      }
    }
    in_pool_task = was_in_task;
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work();
      std::lock_guard<std::mutex> g(m_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
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
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter
  // exit can deadlock, and the OS reclaims them anyway.
  static Pool* p = [] {
    auto* q = new Pool();
    const unsigned hw = std::thread::hardware_concurrency();
    q->resize(hw == 0 ? 1 : static_cast<int>(hw));
    return q;
  }();
  return *p;
}

}  // namespace

int num_threads() { return pool().size(); }

void set_num_threads(int n) { pool().resize(std::max(1, n)); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(n, grain, fn);
}

}  // namespace prism
