"""Progress reporting, kept out of the training step: a tqdm bar in a terminal or one log line per logged
step otherwise, `OUT/metrics.jsonl` records, and optional Prometheus gauges. Only rank 0 reports."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.mfu import MfuMeter

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    mfu: float | None
    elapsed_s: float
    eta_s: float
    val_loss: float | None = None


def _per_source(val_by_source: dict[str, float] | None) -> dict[str, float]:
    return {f"val_loss/{name}": loss for name, loss in (val_by_source or {}).items()}


class MetricsFile:
    """Append-only `OUT/metrics.jsonl`, one JSON object per line, flushed per record."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps past the checkpoint (they will be run again)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and _step_of(line) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All parseable records of a metrics file (a torn last line from a crash is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class PrometheusGauges:
    """The trainer's gauges on their own registry and HTTP port, for the Prometheus that scrapes the server."""

    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.step = Gauge("smollm_trainer_step", "Optimizer steps completed", registry=self.registry)
        self.loss = Gauge("smollm_trainer_loss", "Training loss of the last logged step", registry=self.registry)
        self.tokens_per_second = Gauge(
            "smollm_trainer_tokens_per_second", "Training throughput", registry=self.registry
        )
        self.learning_rate = Gauge("smollm_trainer_learning_rate", "Current learning rate", registry=self.registry)
        self.val_loss = Gauge("smollm_trainer_val_loss", "Last validation loss", registry=self.registry)
        self.server, self.thread = start_http_server(port, registry=self.registry)
        log.info("serving trainer metrics on :%d/metrics", port)

    def update(self, r: StepRecord) -> None:
        self.step.set(r.step)
        self.loss.set(r.loss)
        self.tokens_per_second.set(r.tokens_per_s)
        self.learning_rate.set(r.lr)
        if r.val_loss is not None:
            self.val_loss.set(r.val_loss)

    def close(self) -> None:
        self.server.shutdown()


class Progress:
    """Turns per-step timings and logged values into the bar or log lines, metrics records and gauges."""

    def __init__(
        self,
        out_dir: Path,
        start_step: int,
        max_steps: int,
        tokens_per_step: int,
        mfu: MfuMeter,
        metrics_port: int | None = None,
        enabled: bool = True,
        tensorboard: bool = False,
    ) -> None:
        self.enabled = enabled
        self.start_step, self.max_steps = start_step, max_steps
        self.tokens_per_step, self.mfu = tokens_per_step, mfu
        self.t_start = time.perf_counter()
        self.window_seconds = 0.0  # training time since the last log line (eval and checkpoints excluded)
        self.window_steps = 0
        self.train_seconds = 0.0
        self.metrics = MetricsFile(out_dir / METRICS_FILE)
        self.bar = None
        self.gauges = None
        self.tb = None
        self._redirect = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Its own event file per process start: TensorBoard merges them, a resume does not rewrite history.
            self.tb = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
        self.metrics.truncate_after(start_step)
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step")
            # Log records (checkpoints, samples) are printed above the bar instead of through it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        if metrics_port is not None:
            self.gauges = PrometheusGauges(metrics_port)

    def step_timed(self, seconds: float) -> None:
        self.window_seconds += seconds
        self.train_seconds += seconds
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        val_loss: float | None = None,
        val_by_source: dict[str, float] | None = None,
    ) -> float:
        """Report a logged step; returns the tokens/s since the previous one. `val_by_source` (a mixture's
        validation loss per source) is written as `val_loss/<name>`."""
        tokens_per_s = self.tokens_per_step * self.window_steps / self.window_seconds if self.window_seconds else 0.0
        mfu = self.mfu(tokens_per_s)
        elapsed = time.perf_counter() - self.t_start
        done = step - self.start_step
        eta = elapsed / done * (self.max_steps - step) if done else math.inf
        self.window_seconds, self.window_steps = 0.0, 0
        r = StepRecord(step, loss, lr, grad_norm, tokens_per_s, mfu, elapsed, eta, val_loss)
        if not self.enabled:
            return tokens_per_s
        per_source = _per_source(val_by_source)
        self.metrics.write({k: v for k, v in asdict(r).items() if v is not None} | per_source)
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"):
                value = getattr(r, key)
                if value is not None:
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, step)
            for key, value in per_source.items():
                self.tb.add_scalar(key.replace("val_loss", "val/loss", 1), value, step)
            self.tb.flush()
        if self.gauges is not None:
            self.gauges.update(r)
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        val_text = f" val {val_loss:.4f}" if val_loss is not None else ""
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {loss:.4f}{val_text} lr {lr:.2e} gnorm {grad_norm:.3f} {tokens_per_s:,.0f} tok/s MFU {mfu_text}"
            )
        else:
            log.info(
                "step %d/%d | loss %.4f%s | lr %.2e | grad norm %.3f | %s tok/s | MFU %s | elapsed %s | eta %s",
                step,
                self.max_steps,
                loss,
                val_text,
                lr,
                grad_norm,
                f"{tokens_per_s:,.0f}",
                mfu_text,
                format_duration(elapsed),
                format_duration(eta),
            )
        return tokens_per_s

    def log_eval(self, step: int, val_loss: float, val_by_source: dict[str, float] | None = None) -> None:
        """A validation loss measured outside a logged step (step 0: the weights before any update)."""
        if not self.enabled:
            return
        per_source = _per_source(val_by_source)
        self.metrics.write({"step": step, "val_loss": val_loss} | per_source)
        if self.tb is not None:
            self.tb.add_scalar("val/loss", val_loss, step)
            for key, value in per_source.items():
                self.tb.add_scalar(key.replace("val_loss", "val/loss", 1), value, step)
            self.tb.flush()
        log.info("step %d | val %.4f", step, val_loss)

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        if not self.enabled:
            return
        self.metrics.write({"step": step, "samples": samples})
        for s in samples:
            log.info("sample @%d: %r -> %r", step, s["prompt"], s["completion"])

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()
        if self.gauges is not None:
            self.gauges.close()
        if self.tb is not None:
            self.tb.close()
