"""`python -m service [--checkpoint PATH] [--host H] [--port P] ...`: every flag overrides its SMOLLM_ variable.

SIGTERM drains: readyz turns 503 and new requests are refused, running requests get up to SHUTDOWN_GRACE
seconds to finish; those still running then end with an error (an SSE `error` event, an OpenAI error chunk then
`[DONE]`, or a 503), and the server exits 0. A second SIGTERM (or SIGINT) stops at once.
"""

from __future__ import annotations

import os

# Before torch is imported: oneDNN (and PyTorch's ideep LRU) cache compiled kernels per tensor shape, 1024 of each
# by default; in bf16 that held tens of MiB more with every round of new batch shapes. 32 keeps the resident set
# flat under load (tests/reliability/test_load.py); throughput there moved within its noise. Set them to override.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
os.environ.setdefault("LRU_CACHE_CAPACITY", "32")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from model.checkpoint import is_complete_checkpoint  # noqa: E402
from service.app import create_app  # noqa: E402
from service.checkpoints import resolve_checkpoint  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("service")

ABORT_WAIT = 5.0  # seconds for the engine to end the requests left when the grace period is over
FLUSH_WAIT = 5.0  # seconds at most for the last events / answers to be written before connections close


def parse_args(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m service", description="The smollm inference server.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, help=f"{field.description} (env SMOLLM_{name.upper()})")
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM drains the engine before uvicorn's own shutdown starts."""

    def __init__(self, config: uvicorn.Config, app, grace: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace = grace
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self._draining:
            self._draining = True
            self.app.state.draining = True
            threading.Thread(target=self._drain_then_exit, name="smollm-drain", daemon=True).start()
            return
        # Not recorded as a captured signal: uvicorn would re-raise it at exit and turn exit 0 into -15.
        self.should_exit = True
        if sig == signal.SIGINT and self._draining:
            self.force_exit = True

    def _drain_then_exit(self) -> None:
        engine = getattr(self.app.state, "engine", None)
        log.info("SIGTERM: draining (up to %.0f s)", self.grace)
        if engine is not None and not engine.wait_idle(self.grace):
            # End the rest with an error event (a 503 for non-streaming requests) rather than cutting the
            # connections: every client learns why its answer stopped.
            log.warning("grace period over with requests still running; ending them with an error")
            engine.abort_all(f"server shutting down: the {self.grace:g} s grace period ended before this finished")
            if not engine.wait_idle(ABORT_WAIT):
                log.warning("the engine did not end every request within %.0f s", ABORT_WAIT)
        # The engine has handed over every final event, but the handlers may not have written them yet; once
        # should_exit is set, uvicorn and sse-starlette close the streams, so wait for the responses to end.
        in_flight = getattr(self.app.state, "in_flight", None)
        if in_flight is not None and not in_flight.wait_zero(FLUSH_WAIT):
            log.warning("%d responses still being sent after %.0f s; closing them", in_flight.count, FLUSH_WAIT)
        self.should_exit = True


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    """The server's uvicorn settings: where to listen and how much it accepts at once."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
        limit_concurrency=settings.limit_concurrency,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(**parse_args(argv))
    except ValidationError as e:
        print(f"error: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Cheap checks first, so a wrong path is one clear line instead of a failed start-up.
        resolved = resolve_checkpoint(settings.checkpoint)
        if resolved.path is not None and not is_complete_checkpoint(resolved.path):
            raise ValueError(f"checkpoint: {resolved.path} has config.json but no model weights")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.shutdown_grace)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
