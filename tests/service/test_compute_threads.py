"""Loading runs in a thread whose OpenMP pool is gone when it returns (see service/compute_threads.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from service.compute_threads import run_in_passing_thread, run_in_passing_thread_async

pytestmark = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2+ CPUs and /proc"
)

TORCH_THREADS = 2  # read by conftest's torch_threads fixture: OpenMP only starts pools with two threads or more


def thread_ids() -> set[str]:
    # By id, not by count: threads left by earlier tests may end while these run.
    return set(os.listdir("/proc/self/task"))


def new_threads_settled(before: set[str], timeout: float = 2.0) -> set[str]:
    """Threads started since `before` that are still there once none are or `timeout` passes: the workers of a
    pool that is handed back end asynchronously."""
    deadline = time.monotonic() + timeout
    while (new := thread_ids() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return new


def parallel_kernels() -> float:
    x = torch.randn(512, 512)
    return float((x @ x).sum())  # a matmul this size runs in an OpenMP parallel region


def test_a_long_lived_thread_keeps_its_openmp_workers():
    # The control: the same work in a thread that stays alive leaves more than that thread behind.
    before = thread_ids()
    done, release = threading.Event(), threading.Event()

    def work_then_wait() -> None:
        parallel_kernels()
        done.set()
        release.wait()

    t = threading.Thread(target=work_then_wait)
    t.start()
    done.wait()
    try:
        assert len(thread_ids() - before) >= 2  # the thread and its pool's worker
    finally:
        release.set()
        t.join()


def test_passing_thread_leaves_no_threads_behind():
    parallel_kernels()  # the test thread's own pool exists before the count
    before = thread_ids()
    assert isinstance(run_in_passing_thread(parallel_kernels), float)
    assert new_threads_settled(before) == set()


def test_passing_thread_reraises_in_the_caller():
    def fail() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        run_in_passing_thread(fail)


def test_async_variant_returns_the_value():
    assert asyncio.run(run_in_passing_thread_async(lambda a, b: a + b, 2, 3)) == 5
