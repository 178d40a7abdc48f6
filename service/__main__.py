"""`python -m service [--checkpoint PATH] [--host H] [--port P] ...`: every flag overrides its SMOLLM_ variable.

SIGTERM drains: readyz turns 503 and new requests are refused, running requests get up to SHUTDOWN_GRACE
seconds to finish, then the server exits 0. A second SIGTERM (or SIGINT) stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import uvicorn
from pydantic import ValidationError

from model.checkpoint import is_complete_checkpoint
from service.app import create_app
from service.checkpoints import resolve_checkpoint
from service.settings import Settings

log = logging.getLogger("service")


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
            log.warning("grace period over with requests still running; stopping anyway")
        self.should_exit = True


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
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, app, settings.shutdown_grace)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
