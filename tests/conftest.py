"""Suite-wide collection order: tests marked `long` (half a minute or more each on the 2-core CI machine) run first.

pytest-xdist's worksteal scheduler splits the collected list between the workers in order and lets an idle worker
take the end of another's queue. Left where they fall, one of these long tests can start near the end, and the
other worker then idles until it finishes (on the 2-core CI machine the kill -9 test, ~100 s, started 977 s into
a 1,079 s run). At the front they run while the short tests fill the other worker, and the queues end with short
tests that either worker can take.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the order is kept otherwise
