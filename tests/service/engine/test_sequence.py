"""A sequence's text: stop strings held back while they may still match, cut when they do, in linear time."""

from __future__ import annotations

import random
import time

import pytest

from model.sampling import SamplingParams
from service.engine import Sequence

GREEDY = SamplingParams(temperature=0.0)


class QuadraticReference:
    """The previous implementation of Sequence.append_text (find from the last max_stop_len characters, then try
    every prefix length of every stop string): the behaviour the linear one must reproduce."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop, self.text, self.emitted_chars = stop, "", 0
        self.max_stop_len = max((len(s) for s in stop), default=0)

    def append_text(self, delta: str) -> tuple[str, bool]:
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += delta
        hit = min((i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            out = self.text[self.emitted_chars :]
            self.emitted_chars = len(self.text)
            return out, True
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted_chars : safe] if safe > self.emitted_chars else ""
        self.emitted_chars = max(self.emitted_chars, safe)
        return out, False


def test_append_text_holds_back_possible_stop_prefixes():
    seq = Sequence([1], 10, GREEDY, stop=("END", "xyz"))
    assert seq.append_text("hello E") == ("hello ", False)
    assert seq.append_text("N") == ("", False)
    assert seq.append_text("ough") == ("ENough", False)
    assert seq.append_text(" x") == (" ", False)
    assert seq.append_text("yz and more") == ("", True)
    assert seq.text == "hello ENough "
    plain = Sequence([1], 10, GREEDY)
    assert plain.append_text("abc") == ("abc", False)


def test_the_earliest_starting_stop_string_wins_within_one_delta():
    seq = Sequence([1], 10, GREEDY, stop=("bc", "abcd"))
    assert seq.append_text("xxabcdyy") == ("xx", True)
    seq = Sequence([1], 10, GREEDY, stop=("aab",))
    assert seq.append_text("aaa") == ("a", False)  # "aa" could still begin "aab"
    assert seq.append_text("ab") == ("a", True)


@pytest.mark.parametrize("seed", range(40))
def test_same_outputs_as_the_quadratic_version(seed):
    """Random texts over a small alphabet (many partial matches, overlaps, repeats), random stop strings and
    random splits into deltas: every (text, hit) and the final text equal the old implementation's."""
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc "
    stops = tuple({"".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))})
    text = "".join(rng.choices(alphabet, k=200))
    seq, ref = Sequence([1], 10, GREEDY, stop=stops), QuadraticReference(stops)
    pos = 0
    while pos < len(text):
        n = rng.randint(0, 5)  # 0: a token with no text of its own
        delta = text[pos : pos + n]
        pos += n
        got, want = seq.append_text(delta), ref.append_text(delta)
        assert got == want, (stops, text[:pos])
        if want[1]:
            break
    assert seq.text == ref.text
    assert seq.flush_text() == ref.text[ref.emitted_chars :]


def _per_token_seconds(make, stops: tuple[str, ...], n_tokens: int, text_so_far: int) -> float:
    """CPU seconds per 4-character token over the last `n_tokens` of `text_so_far + n_tokens` tokens."""
    obj = make(stops)
    rng = random.Random(0)
    pieces = ["".join(rng.choices("xyzw ", k=4)) for _ in range(text_so_far + n_tokens)]
    for p in pieces[:text_so_far]:
        obj.append_text(p)
    t0 = time.process_time()
    for p in pieces[text_so_far:]:
        obj.append_text(p)
    return (time.process_time() - t0) / n_tokens


def test_stop_string_work_per_token_is_bounded():
    """16 stop strings of 256 characters (the API's limits) that never match but share prefixes with the text:
    the per-token cost must not grow with the stop strings' length squared, nor with the text so far."""
    rng = random.Random(1)
    stops = tuple("x" + "".join(rng.choices("xyzwq", k=255)) for _ in range(16))

    def linear(s):
        return Sequence([1], 10, GREEDY, stop=s)

    new_short = _per_token_seconds(linear, stops, 300, 10)
    new_long = _per_token_seconds(linear, stops, 300, 3000)
    old = _per_token_seconds(QuadraticReference, stops, 300, 10)
    assert new_long < 3 * new_short + 20e-6  # independent of the text so far (up to timer noise)
    assert new_short * 5 < old  # the old way re-tested every prefix of every stop string each token
    assert new_short < 200e-6  # ~16 stops x 4 characters of automaton steps, in Python
