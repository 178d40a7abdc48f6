"""Next-token sampling, vectorised over a batch whose rows each have their own settings.

Every sampled row draws exactly one uniform number per step from its own generator and inverts the CDF of
its filtered distribution, so a seeded request produces the same tokens whatever else shares its batch.

One step, for each row, in this order (as vLLM v1 does):
1. `allowed`: the row's allowed-token mask (structured output) sets every other logit to -inf, greedy rows too.
2. `min_tokens`: the row's end ids (its `TokenHistory.end_ids` and `stop_token_ids`) are masked until that many
   tokens were generated, unless that would leave the row nothing to pick (a finished grammar may only end).
3. `logit_bias` is added.
4. `repetition_penalty` (vLLM/HF): a logit of a token seen in the prompt or the output is divided by the
   penalty if positive, multiplied by it if negative. Then `presence_penalty` and `frequency_penalty` (OpenAI):
   logit[t] -= presence * (count[t] > 0) + frequency * count[t], counts over generated tokens only.
5. Temperature (greedy rows keep temperature 1; temperatures below `GREEDY_BELOW` are greedy, since dividing by
   1e-40 overflows to inf and a NaN softmax).
6. Log-probabilities, for rows that ask (`logprobs` not None): the log-softmax of the logits after steps 1-5,
   i.e. the distribution the token is sampled from *before* top-k, top-p and min-p filtering (vLLM's
   documented default). For greedy rows that is the temperature-1 distribution after masks and penalties.
7. top-k, top-p, min-p filtering, then one uniform draw (sampled rows) or argmax (greedy rows).

Penalties and `min_tokens` need per-sequence history: the engine creates one `TokenHistory(params, prompt_ids,
end_ids)` per sequence and passes them in `histories`; `sample` records each token it picks for a row in that
row's history (an O(1) update), so the engine never recounts. A batch of greedy rows with no penalty, bias, mask,
min_tokens or logprobs costs a bare argmax.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Temperatures below this are greedy: logits / 1e-40 overflow to inf and the softmax is NaN. Below 1e-5 the
# distribution is one-hot to fp32 precision for any logit gap over ~1e-3 anyway.
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1 means off
    seed: int | None = None
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely one's; 0 means off
    presence_penalty: float = 0.0  # OpenAI, -2..2
    frequency_penalty: float = 0.0  # OpenAI, -2..2
    repetition_penalty: float = 1.0  # vLLM/HF, > 0; 1 means off
    # token id -> bias in -100..100, added to the logit; left out of the hash (a dict is not hashable)
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)
    min_tokens: int = 0  # end ids masked until this many tokens were generated
    stop_token_ids: tuple[int, ...] = ()  # the engine stops on these; the sampler masks them under min_tokens
    logprobs: int | None = None  # None: none; n in 0..MAX_LOGPROBS: the chosen token's and the top n
    _bias_ids: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _bias_values: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not (self.repetition_penalty > 0 and self.repetition_penalty < float("inf")):
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        stop_ids = tuple(self.stop_token_ids)
        if any(not isinstance(t, int) or t < 0 for t in stop_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {list(stop_ids)}")
        object.__setattr__(self, "stop_token_ids", stop_ids)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.logit_bias:
            ids, values = [], []
            for token, bias in self.logit_bias.items():
                if not isinstance(token, int) or token < 0:
                    raise ValueError(f"logit_bias: keys must be non-negative token ids, got {token!r}")
                if not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias: bias for token {token} must be in [-100, 100], got {bias}")
                ids.append(token)
                values.append(float(bias))
            # Built once here so a step adds a row's bias with one indexed add, not a loop over the dict.
            object.__setattr__(self, "_bias_ids", torch.tensor(ids, dtype=torch.long))
            object.__setattr__(self, "_bias_values", torch.tensor(values, dtype=torch.float32))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Whether the row needs token counts (presence, frequency or repetition penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_history(self) -> bool:
        """Whether `sample` needs a `TokenHistory` for this row (penalties or min_tokens)."""
        return self.penalised or self.min_tokens > 0

    def make_generator(self) -> torch.Generator:
        """The row's private random stream: seeded when asked, otherwise from fresh entropy."""
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


class TokenHistory:
    """What the sampler remembers of one sequence: how many tokens it generated (for `min_tokens`), the ids that
    end it (masked until `min_tokens`), and, when the params have a penalty, per-token output counts and a
    seen-in-prompt-or-output mask over the vocabulary (allocated at the first step, when the vocabulary size and
    device are known). `sample` updates it with each token it picks for the row."""

    def __init__(self, params: SamplingParams, prompt_ids: Iterable[int], end_ids: Iterable[int] = ()) -> None:
        self.penalised = params.penalised
        self.end_ids = tuple(sorted(set(end_ids) | set(params.stop_token_ids)))
        self.num_generated = 0
        self._prompt_ids = list(prompt_ids) if self.penalised else []
        self._output_ids: list[int] = []  # recorded before the tensors exist
        self.counts: torch.Tensor | None = None  # (V,) float32: times each token was generated
        self.seen: torch.Tensor | None = None  # (V,) bool: in the prompt or generated

    def _tensors(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None or self.seen is None:
            counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [t for t in self._prompt_ids + self._output_ids if 0 <= t < vocab]
            if ids:
                seen[torch.tensor(ids, device=device)] = True
            out = torch.tensor([t for t in self._output_ids if 0 <= t < vocab], dtype=torch.long, device=device)
            counts.index_add_(0, out, torch.ones(len(out), device=device))
            self.counts, self.seen = counts, seen
            self._prompt_ids, self._output_ids = [], []
        return self.counts, self.seen

    def record(self, token: int | torch.Tensor) -> None:
        """Count `token` as generated; `sample` calls this for the token it picks (O(1))."""
        self.num_generated += 1
        if self.counts is not None and self.seen is not None:
            self.counts[token] += 1
            self.seen[token] = True
        elif self.penalised:
            self._output_ids.append(int(token))


@dataclass
class TokenLogprobs:
    """One row's log-probabilities: the chosen token's, and the `n` most likely tokens' (best first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SampleOutput:
    """A step's tokens and, when some row asked, log-probabilities (see the module docstring for which)."""

    tokens: torch.Tensor  # (B,) long
    logprobs: torch.Tensor | None = None  # (B,) float32: of tokens[b]; NaN for rows that did not ask
    top_ids: torch.Tensor | None = None  # (B, N) long, N = the most any row asked for, best first
    top_logprobs: torch.Tensor | None = None  # (B, N) float32
    requested: tuple[int | None, ...] = ()  # each row's `logprobs` setting

    def rows(self) -> list[TokenLogprobs | None]:
        """Per-row log-probabilities as Python values (None for rows that did not ask); one host sync."""
        if self.logprobs is None or self.top_ids is None or self.top_logprobs is None:
            return [None] * len(self.tokens)
        tokens, chosen = self.tokens.tolist(), self.logprobs.tolist()  # host sync
        ids, lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [
            None if n is None else TokenLogprobs(tokens[b], chosen[b], list(zip(ids[b][:n], lps[b][:n], strict=True)))
            for b, n in enumerate(self.requested)
        ]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[TokenHistory | None] | None = None,
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Token ids (B,) from fp32 logits (B, vocab); row b follows params[b] and draws from generators[b].

    `histories[b]` is required when params[b].needs_history and is updated with the chosen token;
    `allowed[b]`, a bool (vocab,) tensor or None, restricts row b to its True tokens (ids past its length are
    forbidden)."""
    return sample_with_logprobs(logits, params, generators, histories, allowed).tokens


def sample_with_logprobs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[TokenHistory | None] | None = None,
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> SampleOutput:
    """As `sample`, also returning the log-probabilities of rows whose params ask for them."""
    B, V = logits.shape
    device = logits.device
    greedy_rows = [p.greedy for p in params]
    want_logprobs = [p.logprobs is not None for p in params]
    has_mask = allowed is not None and any(m is not None for m in allowed)
    shaped = has_mask or any(p.needs_history or p.logit_bias for p in params)
    if histories is not None:
        for b, (p, h) in enumerate(zip(params, histories, strict=True)):
            if p.needs_history and h is None:
                raise ValueError(f"row {b}: penalties and min_tokens need a TokenHistory")
    elif any(p.needs_history for p in params):
        raise ValueError("histories: penalties and min_tokens need a TokenHistory per row")

    if not shaped and not any(want_logprobs) and all(greedy_rows):
        tokens = logits.argmax(dim=-1)  # the fast path: nothing to shape, nothing to report
        _record(histories, tokens)
        return SampleOutput(tokens, requested=tuple(p.logprobs for p in params))

    logits = logits.float()
    if shaped:
        logits = _shape_logits(logits.clone(), params, histories, allowed)
    if all(greedy_rows):
        scaled = logits
    else:
        temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy_rows, strict=True)])
        scaled = logits / temps.to(device).unsqueeze(1)
    argmax = scaled.argmax(dim=-1)
    tokens = argmax if all(greedy_rows) else _draw(scaled, params, generators, greedy_rows, argmax)
    out = SampleOutput(tokens, requested=tuple(p.logprobs for p in params))
    if any(want_logprobs):
        _fill_logprobs(out, scaled, params, want_logprobs)
    _record(histories, tokens)
    return out


def _record(histories: Sequence[TokenHistory | None] | None, tokens: torch.Tensor) -> None:
    if histories is None:
        return
    for b, h in enumerate(histories):
        if h is not None:
            h.record(tokens[b])


def _rows_tensor(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _shape_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None] | None,
    allowed: Sequence[torch.Tensor | None] | None,
) -> torch.Tensor:
    """Steps 1-4 of the module docstring, in place on `logits` (B, V), each only on the rows that need it."""
    B, V = logits.shape
    device = logits.device
    if allowed is not None:
        rows = [b for b, m in enumerate(allowed) if m is not None]
        if rows:
            mask = torch.zeros(len(rows), V, dtype=torch.bool, device=device)  # (R, V)
            for i, b in enumerate(rows):
                row_mask = allowed[b]
                assert row_mask is not None
                m = row_mask[:V]
                mask[i, : m.shape[0]] = m
            idx = _rows_tensor(rows, device)
            logits[idx] = logits[idx].masked_fill(~mask, _NEG_INF)

    if histories is not None:
        r_idx, t_idx = [], []
        for b, (p, h) in enumerate(zip(params, histories, strict=True)):
            if p.min_tokens > 0 and h is not None and h.num_generated < p.min_tokens:
                ids = [t for t in h.end_ids if t < V]
                r_idx += [b] * len(ids)
                t_idx += ids
        if r_idx:
            rows = sorted(set(r_idx))
            idx = _rows_tensor(rows, device)
            before = logits[idx]  # (R, V)
            logits[_rows_tensor(r_idx, device), _rows_tensor(t_idx, device)] = _NEG_INF
            # A row left with nothing (a finished grammar allows only its end) may end after all.
            dead = torch.isneginf(logits[idx]).all(dim=-1, keepdim=True)
            logits[idx] = torch.where(dead, before, logits[idx])

    bias_rows = [b for b, p in enumerate(params) if p.logit_bias]
    if bias_rows:
        bias_ids = [_bias_tensor(params[b]._bias_ids) for b in bias_rows]
        bias_row = torch.cat(
            [torch.full((len(ids),), b, dtype=torch.long) for b, ids in zip(bias_rows, bias_ids, strict=True)]
        )
        bias_tok = torch.cat(bias_ids)
        values = torch.cat([_bias_tensor(params[b]._bias_values) for b in bias_rows])
        keep = bias_tok < V  # ids past the vocabulary cannot be picked; their bias is moot
        logits.index_put_(
            (bias_row[keep].to(device), bias_tok[keep].to(device)), values[keep].to(device), accumulate=True
        )

    pen_rows = [b for b, p in enumerate(params) if p.penalised]
    if pen_rows:
        if histories is None:
            raise ValueError("penalties need each row's TokenHistory")
        states = [_history(histories[b])._tensors(V, device) for b in pen_rows]
        counts = torch.stack([c for c, _ in states])  # (R, V)
        seen = torch.stack([s for _, s in states])  # (R, V)
        rep = torch.tensor([params[b].repetition_penalty for b in pen_rows], device=device).unsqueeze(1)
        freq = torch.tensor([params[b].frequency_penalty for b in pen_rows], device=device).unsqueeze(1)
        pres = torch.tensor([params[b].presence_penalty for b in pen_rows], device=device).unsqueeze(1)
        idx = _rows_tensor(pen_rows, device)
        sub = logits[idx]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0)
        logits[idx] = sub
    return logits


def _draw(
    scaled: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    greedy_rows: list[bool],
    argmax: torch.Tensor,
) -> torch.Tensor:
    """Step 7 for a batch with at least one sampled row: filter, then invert each row's CDF at its uniform."""
    device = scaled.device
    # One uniform per sampled row from its own generator (host-side draws: B scalars, no device sync).
    u = [0.0 if g else float(torch.rand((), generator=gen)) for g, gen in zip(greedy_rows, generators, strict=True)]
    # A row's CDF order must not depend on its neighbours, or the same uniform picks another token in a batch:
    # rows with top-k or top-p invert over candidates sorted by logit, the others in vocabulary order.
    sampled = [b for b, g in enumerate(greedy_rows) if not g]
    ranked = [b for b in sampled if params[b].top_k or params[b].top_p < 1]
    plain = [b for b in sampled if not (params[b].top_k or params[b].top_p < 1)]
    tokens = argmax.clone()
    for rows, is_ranked in ((ranked, True), (plain, False)):
        if not rows:
            continue
        sub = scaled if len(rows) == len(params) else scaled[_rows_tensor(rows, device)]
        u_rows = torch.tensor([u[b] for b in rows], device=device)
        picked = _invert_cdf(sub, [params[b] for b in rows], u_rows, is_ranked)
        if len(rows) == len(params):
            return picked
        tokens[_rows_tensor(rows, device)] = picked
    return tokens


def _invert_cdf(scaled: torch.Tensor, params: list[SamplingParams], u: torch.Tensor, ranked: bool) -> torch.Tensor:
    """Token ids (R,) of sampled rows (R, V): filtered by top-k/top-p (when `ranked`) and min-p, each row's CDF
    inverted at u[r]."""
    V = scaled.shape[1]
    device = scaled.device
    col_index = None  # (R, N) vocab id of each candidate column, when candidates are reordered
    if ranked and all(p.top_k > 0 for p in params):
        # Only the top max-k candidates can ever be picked: work on those (already sorted).
        vals, col_index = torch.topk(scaled, min(V, max(p.top_k for p in params)), dim=-1)
    elif ranked:
        vals, col_index = torch.sort(scaled, dim=-1, descending=True)
    else:
        vals = scaled  # plain temperature sampling: the CDF can be taken in vocab order
    N = vals.shape[1]
    if any(p.top_k > 0 for p in params):
        cols = torch.arange(N, device=device)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else N for p in params], device=device)
        vals = vals.masked_fill(cols.unsqueeze(0) >= top_k.unsqueeze(1), _NEG_INF)
    probs = torch.softmax(vals, dim=-1)
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p.unsqueeze(1), 0.0)
    if any(p.min_p > 0 for p in params):
        # Relative to the most likely token, which every filter above keeps, so the order of filters is moot.
        min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # Rounding can push the draw past the last allowed candidate; clamp to it.
    last_allowed = (N - 1) - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    choice = torch.minimum(choice, last_allowed)
    return col_index.gather(1, choice.unsqueeze(1)).squeeze(1) if col_index is not None else choice


def _bias_tensor(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise ValueError("logit_bias rows carry their ids and values")
    return t


def _history(h: TokenHistory | None) -> TokenHistory:
    if h is None:
        raise ValueError("a penalised row needs its TokenHistory")
    return h


def _fill_logprobs(out: SampleOutput, scaled: torch.Tensor, params: Sequence[SamplingParams], want: list[bool]) -> None:
    """Step 6, on the rows that asked only."""
    B = scaled.shape[0]
    device = scaled.device
    rows = [b for b in range(B) if want[b]]
    idx = _rows_tensor(rows, device)
    logp = torch.log_softmax(scaled[idx], dim=-1)  # (R, V)
    n = max(params[b].logprobs or 0 for b in rows)
    top_lp, top_ids = logp.topk(n, dim=-1) if n else (logp[:, :0], torch.zeros(len(rows), 0, dtype=torch.long))
    chosen = logp.gather(1, out.tokens[idx].unsqueeze(1)).squeeze(1)
    out.logprobs = torch.full((B,), float("nan"), device=device)
    out.logprobs[idx] = chosen
    out.top_ids = torch.full((B, n), -1, dtype=torch.long, device=device)
    out.top_ids[idx] = top_ids.to(device)
    out.top_logprobs = torch.full((B, n), float("nan"), device=device)
    out.top_logprobs[idx] = top_lp
