"""Divergence is caught where it starts: a step whose loss or gradient norm is not finite updates nothing, a run
of them stops the job, and weights that are not finite are never written as a checkpoint (the server would
hot-load them)."""

from __future__ import annotations

import logging
import math

from torch import nn

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """Training cannot continue: too many non-finite steps in a row, or non-finite weights."""


class NonFiniteGuard:
    """Counts consecutive steps whose update was skipped; raises DivergedError at `max_in_a_row`."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0

    def observe(self, step: int, loss: float, grad_norm: float) -> bool:
        """Record step `step`'s loss and gradient norm (every rank's); returns whether its update was skipped."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        log.warning(
            "step %d: loss %s, gradient norm %s: not finite, the update was skipped (%d in a row)",
            step,
            loss,
            grad_norm,
            self.in_a_row,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise DivergedError(
                f"training diverged: {self.in_a_row} steps in a row up to step {step} had a non-finite loss or "
                f"gradient norm (max_nonfinite_steps={self.max_in_a_row}); lower optim.lr or raise warmup, then "
                "rerun to resume from the last checkpoint"
            )
        return True


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None when all are finite."""
    for name, p in model.named_parameters():
        if not p.detach().isfinite().all():  # host sync per tensor: only at checkpoint time
            return name
    return None
