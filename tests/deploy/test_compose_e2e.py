"""docker-compose.yml end to end, without a Docker engine: the containers' own commands run natively, in the
order compose starts them, with the environment compose gives them. Only what a container runtime would
provide is mapped: the `checkpoints` volume becomes a temp directory, ports become free loopback ports,
`python` is this interpreter, and the host's embedded-model cache stands in for the image's /opt/smollm.

The trainer (tiny config) writes checkpoints into the "volume" while the server, following it, serves
/v1/generate (JSON and SSE) and /metrics, and hot-reloads the checkpoints as they land. The tiny trainer may
train faster than the server starts, so once its metrics have been scraped it is held (SIGSTOP) until the
server is ready: at least one checkpoint then lands while the server runs, on any machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from deploy_files import ROOT, dockerfile_instructions, load_compose, service_command, service_environment
from prometheus_client.parser import text_string_to_metric_families

from model.device import cpu_capability

# The tiny trainer config, shortened: a handful of steps with a checkpoint every few, so several checkpoints
# land while the server runs. (The trainer's CLI takes key=value overrides after its flags.)
TRAIN_CONFIG = "tiny"
TRAIN_OVERRIDES = ["max_steps=12", "checkpoint_every=4", "sample_every=0"]
SERVER_READY_TIMEOUT = 180  # seconds: the embedded 135M model loads first when no checkpoint exists yet
TRAINER_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_order(services: dict) -> list[str]:
    """Compose's start order for the services of a plain `docker compose up` (no profile): dependencies
    first."""
    default = {name for name, s in services.items() if not s.get("profiles")}
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        assert name not in seen, f"depends_on cycle through {name}"
        if name in order:
            return
        for dep in services[name].get("depends_on") or {}:
            visit(dep, (*seen, name))
        order.append(name)

    for name in sorted(default):
        visit(name)
    return order


def _mounts(service: dict, volumes: dict[str, Path]) -> dict[str, Path]:
    """container path -> host directory, for the named volumes a service mounts."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *_ = v.split(":")
        else:
            source, target = v["source"], v["target"]
        out[target] = volumes[source]
    return out


def _native(value: str, mounts: dict[str, Path]) -> str:
    """A container path under a mount, as the host path the 'volume' lives at."""
    for target, host in mounts.items():
        if value == target or value.startswith(target + "/"):
            return str(host) + value[len(target) :]
    return value


@contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _signal(proc, signal.SIGCONT)  # a held trainer must be able to act on the SIGTERM
            # What `docker compose down` does: SIGTERM, then SIGKILL after the grace period.
            _signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """To the process and any children it started (its own session: a container's process tree)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _host_env() -> dict[str, str]:
    """The host environment minus every SMOLLM_ variable (only compose's may reach the processes). The cores
    are shared by both processes, as in compose."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SMOLLM_") or k == "SMOLLM_CACHE_DIR"}


def _wait_until(
    predicate,
    timeout: float,
    what: str,
    procs: dict[str, subprocess.Popen],
    logs: dict[str, Path],
    running: tuple[str, ...] = ("server",),
):
    """Poll `predicate` until it returns something truthy; fail early when a process in `running` exits
    (or any exits with an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for name, proc in procs.items():
            if proc.poll() is not None and (name in running or proc.returncode != 0):
                pytest.fail(
                    f"the {name} exited ({proc.returncode}) while waiting for {what}:\n{logs[name].read_text()[-4000:]}"
                )
        time.sleep(0.25)
    tails = "\n".join(f"--- {n}:\n{p.read_text()[-3000:]}" for n, p in logs.items())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _readyz(client: httpx.Client) -> dict | None:
    try:
        r = client.get("/readyz")
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _generate_requests(client: httpx.Client) -> float:
    """smollm_requests_total{endpoint="/v1/generate",status="200"} as the server reports it now."""
    samples = _samples(client.get("/metrics").text).get("smollm_requests_total", [])
    return sum(s.value for s in samples if s.labels == {"endpoint": "/v1/generate", "status": "200"})


def _sse_events(client: httpx.Client, body: dict) -> list[tuple[str, dict]]:
    events, event = [], "message"
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line.split(":", 1)[1])))
                event = "message"
    return events


@pytest.mark.slow  # the server starts on the embedded 135M model, as in compose, until a checkpoint lands
@pytest.mark.long
def test_compose_up_trains_serves_and_hot_reloads(tmp_path):
    compose = load_compose(env={"TRAIN_CONFIG": TRAIN_CONFIG})
    services = compose["services"]
    order = _start_order(services)
    assert order == ["trainer", "server"]
    volumes = {name: tmp_path / "volumes" / name for name in compose["volumes"]}
    for path in volumes.values():
        path.mkdir(parents=True)
    logs = {name: tmp_path / f"{name}.log" for name in order}

    # trainer: its compose command, with the volume path mapped and its metrics port made free.
    trainer = services["trainer"]
    trainer_mounts = _mounts(trainer, volumes)
    trainer_port = _free_port()
    trainer_argv = [sys.executable if a == "python" else _native(a, trainer_mounts) for a in service_command(trainer)]
    trainer_argv = [f"metrics_port={trainer_port}" if a.startswith("metrics_port=") else a for a in trainer_argv]
    trainer_argv += TRAIN_OVERRIDES
    trainer_env = {**_host_env(), **service_environment(trainer)}
    out_dir = Path(trainer_argv[trainer_argv.index("--out") + 1])
    assert out_dir == volumes["checkpoints"]

    # server: its compose command and environment; 0.0.0.0 becomes loopback, the port a free one.
    server = services["server"]
    server_mounts = _mounts(server, volumes)
    server_env = {k: _native(v, server_mounts) for k, v in service_environment(server).items()}
    port = _free_port()
    server_env["SMOLLM_PORT"] = str(port)
    server_argv = [sys.executable if a == "python" else a for a in service_command(server)]
    server_argv[server_argv.index("--host") + 1] = "127.0.0.1"
    assert server_env["SMOLLM_CHECKPOINT"] == str(volumes["checkpoints"])
    server_env = {**_host_env(), **server_env}
    # No faster polling than compose configures: the test waits for the reload at the configured pace.
    reload_interval = float(server_env["SMOLLM_RELOAD_INTERVAL"])

    procs: dict[str, subprocess.Popen] = {}
    base = f"http://127.0.0.1:{port}"
    with (
        _process(trainer_argv, trainer_env, logs["trainer"]) as trainer_proc,
        _process(server_argv, server_env, logs["server"]) as server_proc,
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        procs.update(trainer=trainer_proc, server=server_proc)
        # The trainer's metrics endpoint, while it trains (Prometheus' `trainer` target); then hold it.
        trainer_metrics = _wait_until(
            lambda: _scrape(f"http://127.0.0.1:{trainer_port}/metrics"),
            120,
            "the trainer's /metrics",
            procs,
            logs,
            running=("server", "trainer"),
        )
        _signal(trainer_proc, signal.SIGSTOP)
        assert {"smollm_trainer_step", "smollm_trainer_loss", "smollm_trainer_tokens_per_second"} <= set(
            _samples(trainer_metrics)
        )
        first = _wait_until(lambda: _readyz(client), SERVER_READY_TIMEOUT, "the server's /readyz", procs, logs)
        _signal(trainer_proc, signal.SIGCONT)

        # The healthchecks Docker would run inside the container: compose's, then the image's own.
        compose_check = server["healthcheck"]["test"]
        assert compose_check[0] == "CMD"
        _run_check([sys.executable if a == "python" else a.replace(":8000/", f":{port}/") for a in compose_check[1:]])
        image_check = json.loads(
            next(a for op, a in dockerfile_instructions(ROOT / "Dockerfile.serve") if op == "HEALTHCHECK").split(
                "CMD", 1
            )[1]
        )
        _run_check([sys.executable if a == "python" else a for a in image_check], {"SMOLLM_PORT": str(port)})

        r = client.post("/v1/generate", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert isinstance(answer["text"], str) and 1 <= answer["usage"]["completion_tokens"] <= 8

        events = _sse_events(client, {"prompt": "The sky is", "max_tokens": 8, "temperature": 0, "stream": True})
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}, events
        assert events[-1][1]["usage"]["completion_tokens"] == len(kinds) - 1

        # A stream is counted once its response has ended, a moment after the client read its last event.
        samples = _wait_until(
            lambda: _generate_requests(client) >= 2 and _samples(client.get("/metrics").text),
            10,
            "/metrics to count both /v1/generate requests",
            procs,
            logs,
        )
        assert samples["smollm_generation_tokens_total"][0].value >= answer["usage"]["completion_tokens"]
        assert samples["smollm_time_to_first_token_seconds_count"][0].value >= 2

        # The trainer finishes (a batch job: exit 0), and the server ends up on its newest checkpoint.
        _wait_until(lambda: trainer_proc.poll() is not None, TRAINER_TIMEOUT, "the trainer to finish", procs, logs)
        assert trainer_proc.returncode == 0, logs["trainer"].read_text()[-4000:]
        newest = (out_dir / "latest").read_text().strip()
        assert (out_dir / newest / "config.json").is_file()
        newest_step = str(int(newest.removeprefix("step-")))
        final = _wait_until(
            lambda: (s := _readyz(client)) and s["step"] == newest_step and s,
            reload_interval * 4 + 60,
            f"the server to serve {newest}",
            procs,
            logs,
        )
        # It changed model while running: it started on something older (the embedded model or an earlier
        # checkpoint) and reloaded.
        assert first["checkpoint"] != final["checkpoint"], (first, final)
        info = _samples(client.get("/metrics").text)["smollm_model_info"]
        [labels] = [s.labels for s in info]
        assert labels["checkpoint"] == final["checkpoint"] and labels["step"] == newest_step
        # The compose default is `auto`: no emulated bf16 on a CPU without it.
        assert labels["dtype"] == ("bfloat16" if cpu_capability().native_bf16 else "float32"), labels

        r = client.post("/v1/generate", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text

        # `docker compose down`: SIGTERM, and the server drains and exits cleanly.
        server_proc.send_signal(signal.SIGTERM)
        assert server_proc.wait(timeout=60) == 0, logs["server"].read_text()[-4000:]


def _run_check(argv: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"healthcheck {argv} failed: {result.stderr}"


def _scrape(url: str) -> str | None:
    try:
        r = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return r.text if r.status_code == 200 and "smollm_trainer_step" in r.text else None
