"""Next-token sampling, vectorised over a batch whose rows each have their own settings.

Every sampled row draws exactly one uniform number per step from its own generator and inverts the CDF of
its filtered distribution, so a seeded request produces the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1 means off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def make_generator(self) -> torch.Generator:
        """The row's private random stream: seeded when asked, otherwise from fresh entropy."""
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Token ids (B,) from fp32 logits (B, vocab); row b follows params[b] and draws from generators[b]."""
    B, V = logits.shape
    greedy_rows = [p.greedy for p in params]
    argmax = logits.argmax(dim=-1)
    if all(greedy_rows):
        return argmax
    device = logits.device
    temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy_rows, strict=True)], device=device)
    scaled = logits / temps.unsqueeze(1)
    sampled_params = [p for p, g in zip(params, greedy_rows, strict=True) if not g]
    col_index = None  # (B, N) vocab id of each candidate column, when candidates are reordered
    if all(p.top_k > 0 for p in sampled_params):
        # Only the top max-k candidates can ever be picked: work on those (already sorted).
        k_max = min(V, max(p.top_k for p in sampled_params))
        vals, col_index = torch.topk(scaled, k_max, dim=-1)
    elif any(p.top_p < 1 or p.top_k > 0 for p in sampled_params):
        vals, col_index = torch.sort(scaled, dim=-1, descending=True)
    else:
        vals = scaled  # plain temperature sampling: the CDF can be taken in vocab order
    N = vals.shape[1]
    if col_index is not None:
        cols = torch.arange(N, device=device)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else N for p in params], device=device)
        vals = vals.masked_fill(cols.unsqueeze(0) >= top_k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    if col_index is not None and any(p.top_p < 1 for p in sampled_params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p.unsqueeze(1), 0.0)
    cdf = probs.cumsum(dim=-1)
    # One uniform per sampled row from its own generator (host-side draws: B scalars, no device sync).
    u = torch.tensor(
        [0.0 if g else float(torch.rand((), generator=gen)) for g, gen in zip(greedy_rows, generators, strict=True)],
        device=device,
    )
    choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # Rounding can push the draw past the last allowed candidate; clamp to it.
    last_allowed = (N - 1) - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    choice = torch.minimum(choice, last_allowed)
    tokens = col_index.gather(1, choice.unsqueeze(1)).squeeze(1) if col_index is not None else choice
    greedy_mask = torch.tensor(greedy_rows, device=device)
    return torch.where(greedy_mask, argmax, tokens)
