"""Fork safety of the kernels' thread pool: a child made by fork after the
parent used the pool must still compute (the parent's pool threads do not
exist in the child). Every start method, each under a timeout so a regression
fails instead of hanging the suite."""

from __future__ import annotations

import multiprocessing as mp

import pytest

import fork_helpers
from prism_ext import kernels

TIMEOUT = 60


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_children_compute_under_every_start_method(method, restore_threads):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"start method {method} not available on this platform")
    # The parent uses the pool first, with more than one thread, so fork
    # copies a process whose pool threads exist only in the parent.
    kernels.set_num_threads(3)
    expected = [fork_helpers.kernel_work(seed) for seed in range(3)]
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["prism_ext", "fork_helpers"])
    pool = ctx.Pool(2)
    try:
        results = pool.map_async(fork_helpers.threads_and_work, range(3)).get(timeout=TIMEOUT)
    except mp.TimeoutError:
        pytest.fail(f"{method}: child processes hung in a kernel call (thread pool not fork-safe)")
    finally:
        pool.terminate()
        pool.join()
    assert [w for _, w in results] == pytest.approx(expected, rel=1e-5)
    if method == "fork":
        # A forked child keeps the parent's thread count, with a pool of its own.
        assert all(t == 3 for t, _ in results)


def test_fork_while_another_thread_computes(restore_threads):
    """fork() while a second thread is inside a kernel: the child must still
    get a working pool (the parent's lock state must not leak into it)."""
    import threading

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("fork not available on this platform")
    kernels.set_num_threads(2)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            fork_helpers.kernel_work(1)

    t = threading.Thread(target=busy)
    t.start()
    try:
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            try:
                got = pool.apply_async(fork_helpers.kernel_work, (5,)).get(timeout=TIMEOUT)
            except mp.TimeoutError:
                pytest.fail("fork: child hung while the parent was computing on another thread")
    finally:
        stop.set()
        t.join()
    assert got == pytest.approx(fork_helpers.kernel_work(5), rel=1e-5)
