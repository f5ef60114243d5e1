// A small fork-join pool on std::thread. No OpenMP: its runtime clashes with
// the one torch ships inside wheels.
#pragma once
#include <cstdint>
#include <functional>

namespace prism {

// Number of threads parallel_for uses (the caller counts as one).
int num_threads();
// The largest thread count set_num_threads accepts.
int max_threads();
// 1 <= n <= max_threads(), else std::invalid_argument (nothing changes).
// Resizes the pool; safe to call between (not during) parallel calls. If the
// OS refuses a thread, throws std::invalid_argument and keeps the old size.
// Fork-safe: a child made by fork() gets a new pool of the same size.
void set_num_threads(int n);

// Runs fn(begin, end) over [0, n) split into chunks of at least `grain`
// items, on the pool plus the calling thread, and returns when all are done.
// A call from inside a pool task, or while another thread holds the pool,
// runs inline on the caller: nested or concurrent calls never deadlock.
// The first exception thrown by fn is rethrown on the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace prism
