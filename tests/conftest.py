"""Suite-wide setup for running the tests in parallel (`pytest -n 2`, pytest-xdist, as `make test` does).

Each xdist worker has its own `tmp_path` base and picks free ports itself; what the workers share is the
converted embedded model under the user cache (`model.bundled.default_checkpoint`). Its conversion is atomic
but not locked: two workers converting at once would both write it, and the second rename moves the first
copy aside while the other worker may be reading it. So the controller converts it once before any worker
starts; every later caller (workers, the servers and trainers they start) finds it complete.
"""

from __future__ import annotations

import pytest


def _is_xdist_controller(config: pytest.Config) -> bool:
    numprocesses = getattr(config.option, "numprocesses", None)
    return bool(numprocesses) and not hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if _is_xdist_controller(config) and not config.option.collectonly:
        from model.bundled import default_checkpoint

        default_checkpoint()
