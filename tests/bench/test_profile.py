from __future__ import annotations

from bench.profile import summarize_collapsed


def test_summarize_collapsed_stacks(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (1): smollm-engine;Engine.step (loop.py:1);Linear.forward (linear.py:134) 60\n"
        "thread (1): smollm-engine;Engine.step (loop.py:1);Attention.forward (attention.py:53) 20\n"
        "thread (2): MainThread;EpollSelector.select (selectors.py:468) 20\n"
        "garbage line\n"
    )
    text = summarize_collapsed(raw, top=2)
    assert " 80.0%  thread (1): smollm-engine" in text
    assert " 20.0%  thread (2): MainThread" in text
    assert " 60.0%  [smollm-engine] Linear.forward (linear.py:134)" in text
    assert "EpollSelector" not in text.split("self time")[1].split("\n", 3)[-1]  # only the top 2 frames
