"""Suite-wide settings: OpenMP threads that sleep when idle, and tests marked `long` (half a minute or more each on
the 2-core CI machine) first.

OMP_WAIT_POLICY=PASSIVE, for every process the suite starts (set before pytest-xdist starts its workers, and
inherited by the servers, trainers and torchrun jobs they start): two test workers each running torch on the 2
cores, GNU OpenMP's threads spin at every barrier and take the cores from the other process. Two tiny trainers of 60
steps side by side took 72-75 s with the default policy and 38-40 s with PASSIVE, alone 23.5 against 25.4-26.6 s
(AVX2 EPYC, 2 vCPUs). Results do not depend on it: it only decides whether a waiting thread spins or sleeps.

pytest-xdist's worksteal scheduler splits the collected list between the workers in order and lets an idle worker
take the end of another's queue. Left where they fall, one of these long tests can start near the end, and the
other worker then idles until it finishes (on the 2-core CI machine the kill -9 test, ~100 s, started 977 s into
a 1,079 s run). At the front they run while the short tests fill the other worker, and the queues end with short
tests that either worker can take.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the order is kept otherwise
