"""Which threads run torch kernels: the engine thread for as long as the server lives, and short-lived threads
for loading checkpoints.

PyTorch's CPU kernels run in OpenMP (libgomp) parallel regions. Every thread that opens one keeps its own pool
of worker threads until it exits, and once libgomp manages more threads than there are CPUs it stops letting
idle workers spin between regions: each of the hundreds of small kernels in a decode step then pays for putting
a worker to sleep and waking it up. On the 2-core machine a bf16 decode step of the 135M model took 17 ms with
one thread running kernels and 24 ms once a second, long-lived thread (asyncio's executor, which had loaded the
model) had opened a region. Loading therefore happens in a thread that exits when it is done, which hands its
pool back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_passing_thread(fn: Callable[..., T], *args, name: str = "smollm-load") -> T:
    """`fn(*args)` in a new thread that has exited, OpenMP pool included, by the time this returns."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


async def run_in_passing_thread_async(fn: Callable[..., T], *args, name: str = "smollm-load") -> T:
    # The executor thread only waits for the join; it never runs a kernel itself.
    return await asyncio.to_thread(run_in_passing_thread, fn, *args, name=name)
