"""Stop-string matching on streamed text, linear in the text: one Knuth-Morris-Pratt automaton per stop string.

Each automaton's state is the length of the longest prefix of its stop string that ends the text seen so far, so
a new character costs amortised O(1) per stop string, whatever the lengths, and the text that must be held back
(it could still start a stop string) is the largest state: nothing is searched again.
"""

from __future__ import annotations


def _failure(pattern: str) -> list[int]:
    """fail[i]: length of the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class StopStrings:
    """Feeds text to every stop string's automaton; reports the earliest-starting complete stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = stops
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)

    @property
    def held(self) -> int:
        """Characters at the end of the text fed so far that could still begin a stop string."""
        return max(self._state, default=0)

    def feed(self, text: str, offset: int) -> int:
        """Feed `text`, which starts at character `offset` of the whole text; returns where the earliest-starting
        stop string that ends inside `text` begins (an index into the whole text), or -1 when none does."""
        hit = -1
        for j, (stop, fail) in enumerate(zip(self.stops, self._fail, strict=True)):
            k, n = self._state[j], len(stop)
            for i, ch in enumerate(text):
                while k and ch != stop[k]:
                    k = fail[k - 1]
                if ch == stop[k]:
                    k += 1
                if k == n:
                    start = offset + i + 1 - n  # the first end of this stop string is its earliest start
                    if hit < 0 or start < hit:
                        hit = start
                    k = fail[k - 1]
                    break
            self._state[j] = k
        return hit
