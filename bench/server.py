"""Start an inference server as a subprocess on 127.0.0.1, wait until it is ready, and stop it.

Used for our service (`python -m service`, ready at /readyz) and for llama.cpp's `llama-server` (ready at
/health). The server's output goes to a log file whose tail is quoted when it fails to start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server did not start or did not become ready; the message quotes its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ServerProcess:
    """A server command listening on `port`; a context manager that starts it and always stops it."""

    name: str
    cmd: list[str]
    port: int
    ready_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 180.0
    stop_timeout: float = 15.0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s: %s", self.name, " ".join(self.cmd))
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + self.start_timeout
        url = self.base_url + self.ready_path
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    log.info("%s ready on port %d", self.name, self.port)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"{self.name} was not ready at {url} after {self.start_timeout:g} s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit %g s after SIGTERM; killing it", self.name, self.stop_timeout)
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def smollm_server(
    checkpoint: Path,
    dtype: str,
    log_path: Path,
    max_batch_size: int | None = None,
    max_queue: int | None = None,
    quant: str = "none",
) -> ServerProcess:
    """Our service on a free port, serving `checkpoint` in `dtype` with weight-only `quant` (`SMOLLM_QUANT`),
    hot reload off (nothing to watch)."""
    port = free_port()
    env = {"SMOLLM_RELOAD_INTERVAL": "0", "SMOLLM_LOG_LEVEL": "WARNING"}
    if max_batch_size is not None:
        env["SMOLLM_MAX_BATCH_SIZE"] = str(max_batch_size)
    if max_queue is not None:
        env["SMOLLM_MAX_QUEUE"] = str(max_queue)
    cmd = [sys.executable, "-m", "service", "--checkpoint", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    env["SMOLLM_DTYPE"] = dtype
    name = dtype
    if quant != "none":
        env["SMOLLM_QUANT"] = quant
        name = f"{quant}, {dtype}"
    return ServerProcess(f"smollm service ({name})", cmd, port, "/readyz", log_path, env)


def llama_server(
    binary: Path,
    gguf: Path,
    log_path: Path,
    parallel: int = 16,
    threads: int = 2,
    ctx_per_slot: int = 512,
) -> ServerProcess:
    """llama.cpp's server on `gguf` with `parallel` slots of `ctx_per_slot` tokens each (the context is
    split evenly between slots), continuous batching on."""
    port = free_port()
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(parallel),
        "-t",
        str(threads),
        "-c",
        str(parallel * ctx_per_slot),
        "--no-webui",
    ]
    return ServerProcess("llama-server", cmd, port, "/health", log_path)
