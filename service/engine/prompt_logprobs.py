"""Log-probabilities of a prompt's own tokens (OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`), taken
from the logits the prefill computes anyway at every prompt position.

The logits at position p are the model's distribution of token p + 1, so a prompt of T tokens has T - 1 scored
tokens (1..T-1); token 0 has none. The numbers are the raw model's log-softmax (temperature 1, no penalties, bias
or grammar), as vLLM computes prompt logprobs: the prompt was given, not sampled, so no sampling setting applies.

Every scored position must be computed: the scheduler gives such a sequence no prefix reuse (see
`Scheduler.admit`). A prompt prefilled in several chunks is scored chunk by chunk, each token once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.sampling import TokenLogprobs
from service.engine.sequence import Sequence


@dataclass(frozen=True)
class PromptScoring:
    """One prefill chunk's scored tokens: the rows of the packed prefill row whose logits predict them."""

    seq: Sequence
    rows: list[int]  # indices into the packed prefill row
    targets: list[int]  # the prompt token each row's logits are scored against


def plan(chunks: list[tuple[Sequence, int, int]], last_rows: list[int]) -> list[PromptScoring]:
    """What to score in one prefill step. `chunks` are (sequence, start, end) prompt chunks packed back to back,
    `last_rows[i]` the packed-row index of chunk i's last token."""
    out = []
    for (seq, start, end), last in zip(chunks, last_rows, strict=True):
        done = len(seq.prompt_token_logprobs)  # tokens 1..done are scored already
        first, stop = done, min(end, seq.num_prompt - 1)
        # A chunk that begins after the next unscored position cannot score it (its logits were never computed).
        if seq.prompt_logprobs is None or start > first or first >= stop:
            continue
        positions = range(first, stop)
        rows = [last - (end - 1 - p) for p in positions]
        out.append(PromptScoring(seq, rows, [seq.prompt_ids[p + 1] for p in positions]))
    return out


def collect(logits: torch.Tensor, scored: list[PromptScoring]) -> None:
    """Append each scored token's `TokenLogprobs` to its sequence's `prompt_token_logprobs`. `logits` (N, vocab)
    are the rows of every `scored` entry, in order."""
    if not scored:
        return
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    targets = torch.tensor([t for s in scored for t in s.targets], dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    k = max(s.seq.prompt_logprobs or 0 for s in scored)
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], targets[:, None][:, :0])
    # One host sync for the step's prompt logprobs.
    chosen_l, ids_l, lps_l = chosen.tolist(), top_ids.tolist(), top_lp.tolist()
    i = 0
    for s in scored:
        n = s.seq.prompt_logprobs or 0
        for t in s.targets:
            top = list(zip(ids_l[i][:n], lps_l[i][:n], strict=True))
            s.seq.prompt_token_logprobs.append(TokenLogprobs(t, chosen_l[i], top))
            i += 1
