"""`python -m trainer.plot OUT`: draw OUT/loss.png (training and validation loss) from OUT/metrics.jsonl.

matplotlib is an optional extra (`pip install 'smollm[plot]'`); without it the command says so."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from trainer.progress import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

PLOT_FILE = "loss.png"


def plot_loss(out_dir: Path) -> Path:
    """Write `out_dir/loss.png`; raises FileNotFoundError without metrics, ImportError without matplotlib."""
    metrics = out_dir / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: not found (is {out_dir} a trainer output directory?)")
    # A bare Figure draws with Agg into files (no display in a container) without importing pyplot.
    from matplotlib.figure import Figure

    records = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(out_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    target = out_dir / PLOT_FILE
    tmp = out_dir / f".{PLOT_FILE}.tmp.png"
    fig.savefig(tmp, dpi=100)
    tmp.replace(target)
    return target


def plot_if_available(out_dir: Path) -> Path | None:
    """Draw the plot at the end of training when matplotlib is installed; never fails the job."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info("matplotlib is not installed: no %s (pip install 'smollm[plot]')", PLOT_FILE)
        return None
    try:
        path = plot_loss(out_dir)
    except (OSError, ValueError) as e:
        log.warning("could not draw %s: %s", PLOT_FILE, e)
        return None
    log.info("loss curve: %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.plot", description="Draw OUT/loss.png.")
    parser.add_argument("out", type=Path, help="trainer output directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "error: matplotlib is not installed; run `pip install 'smollm[plot]'` (or `pip install matplotlib`)",
            file=sys.stderr,
        )
        return 1
    try:
        path = plot_loss(args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
