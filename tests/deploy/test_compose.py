"""docker-compose.yml (and the GPU override): valid for Compose itself, and every service, volume, port, path
and variable it names exists on the other side."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from deploy_files import (
    COMPOSE_FILE,
    COMPOSE_GPU_FILE,
    COMPOSE_SFT_FILE,
    ROOT,
    load_compose,
    service_command,
    service_environment,
    trainer_job,
)
from pydantic import ValidationError

from service.settings import Settings

_CLEAN_ENV = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}


def _compose(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: the host's variables must not decide what the files mean.
    return subprocess.run([binary, *args], cwd=ROOT, env=_CLEAN_ENV, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "files",
    [[COMPOSE_FILE], [COMPOSE_FILE, COMPOSE_GPU_FILE], [COMPOSE_FILE, COMPOSE_SFT_FILE]],
    ids=["cpu", "gpu", "sft"],
)
def test_compose_config_is_valid(docker_compose, files):
    args = [a for f in files for a in ("-f", str(f))]
    result = _compose(docker_compose, *args, "--profile", "monitoring", "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_rejects_an_invalid_file(docker_compose, tmp_path):
    # The validity check above means something only if the tool fails on a bad file.
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  server:\n    image: x\n    bogus: 1\n")
    assert _compose(docker_compose, "-f", str(bad), "config", "-q").returncode != 0


def test_our_interpolation_matches_compose(docker_compose, compose):
    """The end-to-end test reads commands and environments with conftest's parser: it must agree with
    Compose's own rendering of the file."""
    result = _compose(docker_compose, "-f", str(COMPOSE_FILE), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)["services"]
    for name in ("trainer", "server"):
        ours = compose["services"][name]
        assert service_command(ours) == rendered[name]["command"]
        theirs = {k: v for k, v in (rendered[name].get("environment") or {}).items() if v is not None}
        assert service_environment(ours) == theirs


def test_services_volumes_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {"trainer", "server", "prometheus", "grafana"}
    # trainer and server start with a plain `docker compose up`; monitoring only with its profile.
    for name in ("trainer", "server"):
        assert "profiles" not in services[name]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]

    declared = set(compose["volumes"])
    used = set()
    for name, service in services.items():
        for dep in service.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source, target, *mode = volume.split(":")
                volume = {"source": source, "target": target, "read_only": mode == ["ro"]}
            source = volume["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"
                used.add(source)
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert used == declared, f"declared but unused volumes: {declared - used}"


def _mounts(service) -> dict[str, dict]:
    out = {}
    for v in service["volumes"]:
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            v = {"source": source, "target": target, "read_only": mode == ["ro"]}
        out[v["target"]] = v
    return out


def test_trainer_is_a_batch_job_writing_the_checkpoint_volume(compose):
    trainer = compose["services"]["trainer"]
    assert trainer["restart"] == "no"
    command = service_command(trainer)
    assert command[:3] == ["python", "-m", "trainer"]
    out = command[command.index("--out") + 1]
    mount = _mounts(trainer)[out]
    assert mount["source"] == "checkpoints" and not mount.get("read_only")


@pytest.mark.parametrize("config_env", [{}, {"TRAIN_CONFIG": "tiny"}], ids=["default", "TRAIN_CONFIG=tiny"])
def test_trainer_command_is_a_valid_job(config_env):
    """The trainer's own CLI parser and config loader accept the container's command."""
    trainer = load_compose(env=config_env)["services"]["trainer"]
    args, config = trainer_job(service_command(trainer))
    assert str(args.config) == f"trainer/configs/{config_env.get('TRAIN_CONFIG', 'demo')}.yaml"
    assert str(args.out) == "/checkpoints"
    # Its metrics port is the one the service exposes to Prometheus.
    assert [str(config.metrics_port)] == trainer["expose"]


def test_server_serves_the_checkpoint_volume_read_only(compose):
    server = compose["services"]["server"]
    assert service_command(server) == ["python", "-m", "service", "--host", "0.0.0.0"]
    env = service_environment(server)
    mount = _mounts(server)[env["SMOLLM_CHECKPOINT"]]
    assert mount["source"] == "checkpoints" and mount["read_only"] is True
    # The trainer writes to the same volume the server follows.
    trainer = compose["services"]["trainer"]
    assert _mounts(trainer)["/checkpoints"]["source"] == mount["source"]
    assert server["depends_on"]["trainer"]["condition"] == "service_started"


def test_server_port_and_healthcheck_agree_with_its_settings(compose):
    server = compose["services"]["server"]
    port = Settings(**{"port": service_environment(server).get("SMOLLM_PORT", 8000)}).port
    published = [p.split(":") for p in server["ports"]]
    assert [(host, int(container)) for host, container in published] == [("8000", port)]
    test = " ".join(server["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in test


@pytest.mark.parametrize(
    "env_files",
    [[COMPOSE_FILE], [COMPOSE_FILE, COMPOSE_GPU_FILE], [COMPOSE_FILE, COMPOSE_SFT_FILE]],
    ids=["cpu", "gpu", "sft"],
)
def test_server_environment_is_valid_settings(env_files, monkeypatch):
    env: dict[str, str] = {}
    for f in env_files:
        env.update(service_environment(load_compose(f)["services"]["server"]))
    fields = {f"SMOLLM_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("SMOLLM_")} - fields
    assert not unknown, f"the server ignores these variables: {unknown}"
    for k in list(os.environ):
        if k.startswith("SMOLLM_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        settings = Settings()
    except ValidationError as e:
        pytest.fail(f"docker-compose server environment is rejected by service.settings: {e}")
    assert settings.checkpoint == "/checkpoints"


def test_gpu_override_reserves_gpus_and_builds_cuda_torch():
    base = load_compose()["services"]
    gpu = load_compose(COMPOSE_GPU_FILE)["services"]
    assert set(gpu) <= set(base)
    for name in ("trainer", "server"):
        service = gpu[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        index = service["build"]["args"]["TORCH_INDEX"]
        assert index != base[name]["build"]["args"]["TORCH_INDEX"] and "/cpu" not in index
        # A separate tag: the CPU and CUDA images can sit side by side.
        assert service["image"] != base[name]["image"]
    assert service_environment(gpu["server"])["SMOLLM_DEVICE"] == "cuda"


@pytest.mark.parametrize("path", [COMPOSE_FILE, COMPOSE_GPU_FILE, COMPOSE_SFT_FILE], ids=["cpu", "gpu", "sft"])
def test_every_variable_has_a_default(path):
    """A plain `docker compose up` needs no variable set: each ${VAR} carries a `:-default`."""
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    variables = re.findall(r"\$\{([^}]*)\}", text)
    assert variables, "expected configurable variables"
    missing = [v for v in variables if ":-" not in v]
    assert not missing, f"{path.name}: variables without a default: {missing}"


def test_sft_override_fine_tunes_into_the_volume_the_server_reloads(docker_compose):
    """`docker compose -f docker-compose.yml -f docker-compose.sft.yml up`: Compose's own merge of the two files
    runs the chat fine-tune as the trainer, writing several checkpoints to the volume the server follows and
    polls; nothing else of the base file changes."""
    override = load_compose(COMPOSE_SFT_FILE)["services"]
    assert set(override) == {"trainer", "server"}
    files = ("-f", str(COMPOSE_FILE), "-f", str(COMPOSE_SFT_FILE))
    result = _compose(docker_compose, *files, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    merged = json.loads(result.stdout)["services"]
    trainer, server = merged["trainer"], merged["server"]
    args, config = trainer_job(trainer["command"])
    assert str(args.config) == "trainer/configs/sft-demo.yaml" and str(args.out) == "/checkpoints"
    assert config.init_from == "bundled" and config.data.format == "chat" and config.data.val_sources
    # Several checkpoints, each with a recorded held-out loss: the server has something to reload (and gate) on.
    assert config.checkpoint_every < config.max_steps and config.eval_every
    trainer_mount = {m["target"]: m for m in trainer["volumes"]}["/checkpoints"]
    server_mount = {m["target"]: m for m in server["volumes"]}["/checkpoints"]
    assert trainer_mount["source"] == server_mount["source"] == "checkpoints" and server_mount["read_only"]
    env = {k.removeprefix("SMOLLM_").lower(): v for k, v in server["environment"].items() if v is not None}
    settings = Settings(**env)
    assert settings.checkpoint == "/checkpoints" and settings.reload_interval > 0
    assert settings.dtype == config.dtype == "float32"
    base = load_compose()["services"]
    for name in ("trainer", "server"):
        assert merged[name]["image"] == base[name]["image"]
    assert merged["server"]["depends_on"]["trainer"]["condition"] == "service_started"


@pytest.mark.parametrize("env", [{"SFT_MAX_STEPS": "10", "SFT_CHECKPOINT_EVERY": "2"}])
def test_sft_override_variables_reach_the_job(env):
    args, config = trainer_job(service_command(load_compose(COMPOSE_SFT_FILE, env)["services"]["trainer"]))
    assert (config.max_steps, config.checkpoint_every) == (10, 2)
