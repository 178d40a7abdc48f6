"""The chaos run in small: every fault injected at least once under streaming load, and nothing hangs, leaks
or serves a token sampled from non-finite logits."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.reliability.chaos import FAULTS
from tests.reliability.harness import REPO


def test_chaos_run_has_no_hang_no_nan_no_leak(tmp_path):
    out = tmp_path / "chaos.json"
    # 7 faults at one every 1.5 s: each is injected at least once in 15 s.
    cmd = [
        sys.executable,
        "-m",
        "tests.reliability.chaos",
        "--minutes",
        "0.3",
        "--clients",
        "4",
        "--fault-every",
        "1.5",
        "--seed",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["hung"] == 0
    assert figures["nan_tokens_served"] == 0
    assert figures["leaked_slots"] == 0
    assert figures["completed"] > 0
    assert set(FAULTS) <= set(figures["faults_injected"]), figures["faults_injected"]
    assert not any(k.startswith("inject_failed") for k in figures["faults_injected"]), figures["faults_injected"]
    # A slow body and a 1 MiB prompt get an answer (408 and 400), not silence.
    assert not any(k.endswith("_status_none") for k in figures["faults_injected"]), figures["faults_injected"]
    assert figures["healthz_failures"] == 0
