"""`python -m service` as a real process: flags, start-up errors and the SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import uvicorn

from service.__main__ import DrainingServer
from service.middleware import InFlight
from tests.service.conftest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def spawn(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_drains_running_streams_and_exits_0(tiny_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Flags override the environment: the port comes from the flag, the dtype from SMOLLM_DTYPE.
    proc = spawn(
        "--checkpoint",
        str(tiny_checkpoint),
        "--port",
        str(port),
        "--threads",
        "1",
        SMOLLM_PORT="1",
        SMOLLM_DTYPE="float32",
        SMOLLM_SHUTDOWN_GRACE="60",
        SMOLLM_RELOAD_INTERVAL="0",
    )
    try:
        wait_ready(url)
        req = {"prompt": "Hi", "temperature": 0, "max_tokens": 1800, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/generate", json=req) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: token"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(url + "/readyz").status_code == 503
            assert httpx.get(url + "/healthz").status_code == 200
            refused = httpx.post(url + "/v1/generate", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503
            rest = list(lines)
        done = [json.loads(line[5:]) for line in rest if line.startswith("data:") and "finish_reason" in line]
        assert done and done[-1]["finish_reason"] == "length" and done[-1]["usage"]["completion_tokens"] == 1800
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_settings_fail_clearly(tmp_path):
    proc = spawn("--max-batch-size", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "max_batch_size" in out
    (tmp_path / "weights").write_text("x")
    proc = spawn("--checkpoint", str(tmp_path / "weights"), "--port", str(free_port()))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "is a file" in out and "Traceback" not in out


def test_bad_api_key_file_fails_clearly(tmp_path):
    proc = spawn("--api-key-file", str(tmp_path / "missing"), "--port", str(free_port()))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "api_key_file" in out and "cannot read" in out and "Traceback" not in out


class _IdleEngine:
    def wait_idle(self, timeout: float) -> bool:
        return True


def test_the_drain_lets_the_last_events_out_before_exiting():
    in_flight = InFlight()
    in_flight.count = 1  # a stream whose final event the engine delivered but the handler has not written yet
    app = SimpleNamespace(state=SimpleNamespace(engine=_IdleEngine(), in_flight=in_flight, draining=False))
    server = DrainingServer(uvicorn.Config(app=None), app, grace=1)
    drain = threading.Thread(target=server._drain_then_exit)
    drain.start()
    time.sleep(0.5)
    assert not server.should_exit  # uvicorn would close the stream now and cut its last events
    in_flight.count = 0
    drain.join(timeout=5)
    assert server.should_exit


def test_starting_the_server_does_not_import_the_compiler(tiny_checkpoint):
    # torch.compile's modules (dynamo, inductor) took ~4 s of every server start when a dependency imported them at
    # module level (llguidance.torch), and ~2 s more when loading a checkpoint initialised an embedding on the meta
    # device; only SMOLLM_COMPILE=decode needs them, and it imports them when it compiles.
    code = (
        "import sys, pathlib, service.__main__, service.app\n"
        "from service.loading import make_loader\n"
        "from tests.service.conftest import tiny_settings\n"
        f"path = pathlib.Path({str(tiny_checkpoint)!r})\n"
        "make_loader(tiny_settings(path))(path)\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
