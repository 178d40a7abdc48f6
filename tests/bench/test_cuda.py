"""The GPU check (bench/cuda.py): its refusal without CUDA, its budget, and every section end to end on the CPU with
a tiny model, so the code a GPU owner runs once is exercised here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench import cuda
from bench.__main__ import main as bench_main
from model.checkpoint import load_model
from model.tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("entry", ["bench", "bench.cuda"])
def test_without_cuda_exits_2_with_a_message(entry, capsys, tmp_path):
    main = bench_main if entry == "bench" else cuda.main
    argv = ["--device", "cuda", "--out", str(tmp_path)] if entry == "bench" else ["--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device: ") and "torch.cuda.is_available() is False" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_bench_device_cuda_hands_every_other_argument_to_the_gpu_check(monkeypatch, tmp_path):
    seen: list[list[str]] = []
    monkeypatch.setattr(cuda, "main", lambda argv: seen.append(argv) or 0)
    argv = ["--budget", "300", "--device", "cuda", "--random-weights", "--checkpoint", "ck", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    assert seen == [["--budget", "300", "--random-weights", "--checkpoint", "ck", "--out", str(tmp_path)]]


def test_the_gpu_check_needs_no_serving_only_package(tmp_path):
    """A GPU machine has torch and transformers but not llguidance: `python -m bench --device cuda` must get as far
    as looking for the device without it (here, where there is none, exit 2 with the message)."""
    code = (
        "import sys; sys.modules['llguidance'] = None\n"  # None in sys.modules makes `import llguidance` fail
        "from bench.__main__ import main\n"
        f"sys.exit(main(['--device', 'cuda', '--out', {str(tmp_path)!r}]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: no CUDA device: "), proc.stderr


def test_budget_skips_what_does_not_fit():
    now = [0.0]
    budget = cuda.Budget(100.0, clock=lambda: now[0])
    assert budget.fits("a", 50.0)
    now[0] = 70.0
    assert not budget.fits("b", 50.0)
    assert budget.skipped == ["b: skipped, needs ~50 s, 30 s of the 100 s budget left"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32), load_tokenizer(tiny_checkpoint)


def test_parity_matches_itself_and_flags_a_different_model(tiny, tiny_checkpoint):
    model, tokenizer = tiny
    same = cuda.greedy_parity(model, load_model(tiny_checkpoint, torch.float32), tokenizer, max_tokens=4)
    assert same["ok"] and all(r["matching"] == 4 and r["first_divergence"] is None for r in same["prompts"])
    other = load_model(tiny_checkpoint, torch.float32)
    with torch.no_grad():
        other.norm.weight.mul_(-1)  # logits negated, argmax becomes argmin: the first token differs on every prompt
    diff = cuda.greedy_parity(other, model, tokenizer, max_tokens=4)
    assert not diff["ok"] and all(r["first_divergence"] == 0 for r in diff["prompts"])


def test_engine_throughput_levels_and_budget(tiny):
    model, tokenizer = tiny
    out = cuda.engine_throughput(model, tokenizer, [1, 2], max_tokens=4, max_batch_size=2, budget=cuda.Budget(120.0))
    for c in (1, 2):
        assert out[str(c)]["tokens"] == 4 * c and out[str(c)]["tokens_per_s"] > 0
        assert out[str(c)]["ttft_p50_ms"] > 0
    spent = cuda.Budget(1.0, clock=iter([0.0, 0.5, 5.0, 5.0]).__next__)
    skipped = cuda.engine_throughput(model, tokenizer, [1], max_tokens=4, max_batch_size=2, budget=spent)
    assert "skipped" in skipped["1"]


@pytest.fixture
def eager_compiler(monkeypatch):
    """The engine's compiled step through dynamo with the eager backend: the same graph capture and static shapes,
    without inductor's minutes of C++ compilation on this CPU."""
    from service.engine import compiled_decode

    monkeypatch.setattr(compiled_decode, "compile_options", lambda device: {"backend": "eager", "fullgraph": True})


def test_compiled_engine_levels_are_compared_with_the_eager_tokens(tiny, eager_compiler):
    model, tokenizer = tiny
    eager: dict[str, list[list[int]]] = {}
    kw = dict(max_tokens=6, max_batch_size=2, budget=cuda.Budget(300.0))
    cuda.engine_throughput(model, tokenizer, [1, 2], tokens=eager, **kw)
    assert [len(eager[c]) for c in ("1", "2")] == [1, 2] and all(len(t) == 6 for t in eager["2"])
    out = cuda.engine_throughput(model, tokenizer, [1, 2], compile="decode", reference=eager, **kw)
    assert out["1"]["same_tokens_as_eager"] == 1 and out["2"]["same_tokens_as_eager"] == 2
    assert out["2"]["tokens"] == 12 and out["2"]["tokens_per_s"] > 0
    wrong = {"2": [[t + 1 for t in seq] for seq in eager["2"]]}
    out = cuda.engine_throughput(model, tokenizer, [2], compile="decode", reference=wrong, **kw)
    assert out["2"]["same_tokens_as_eager"] == 0


def test_decode_step_eager_and_compiled_agree(tiny):
    model, _ = tiny
    out = cuda.decode_step(
        model, [1, 2], kv_len=64, steps=2, budget=cuda.Budget(120.0), compile_options={"backend": "eager"}
    )
    for b in ("1", "2"):
        row = out["sizes"][b]
        assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["same_argmax"], row


def test_a_decode_step_that_fails_to_compile_is_reported_with_its_eager_time(tiny):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("injected compiler failure")

    model, _ = tiny
    out = cuda.decode_step(
        model, [2], kv_len=64, steps=2, budget=cuda.Budget(120.0), compile_options={"backend": broken_backend}
    )
    row = out["sizes"]["2"]
    assert row["eager_ms"] > 0 and "compiled_ms" not in row
    assert row["compiled"].startswith("failed: torch.compile raised"), row


def test_run_check_end_to_end_on_cpu(tiny_checkpoint, tmp_path, eager_compiler):
    results = cuda.run_check(
        tiny_checkpoint,
        torch.device("cpu"),
        dtype="float32",
        budget=cuda.Budget(300.0),
        parity_tokens=4,
        levels=(1, 2),
        compiled_levels=(2,),
        max_tokens=4,
        max_batch_size=2,
        anchor_batches=(1,),
        step_sizes=(1,),
        step_kv_len=64,
        step_steps=2,
        compile_options={"backend": "eager"},
    )
    assert results["environment"]["device"] == "cpu"
    assert results["parity"]["ok"]
    assert set(results["engine"]) == {"1", "2"}
    assert results["engine_compiled"]["2"]["same_tokens_as_eager"] == 2
    assert results["transformers"]["1"]["new_tokens"] == 4
    assert results["decode_step"]["sizes"]["1"]["same_argmax"]
    assert results["skipped"] == []
    text = cuda.format_report(results)
    assert "greedy parity" in text and "| Engine | 2 |" in text and "transformers generate()" in text
    assert "| Engine, SMOLLM_COMPILE=decode | 2 | " in text and "(2/2 sequences = eager)" in text
    json.dumps(results)  # the JSON the CLI writes


def test_main_quick_with_random_weights_writes_json(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    # Only the config and tokenizer travel to a GPU machine: the weights are drawn there.
    source = tmp_path / "source"
    source.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, source / f.name)
    monkeypatch.setattr(cuda, "require_cuda", lambda: torch.device("cpu"))
    out = tmp_path / "results"
    assert cuda.main(["--quick", "--random-weights", "--checkpoint", str(source), "--out", str(out)]) == 0
    [path] = out.glob("*-cuda.json")
    results = json.loads(path.read_text())
    assert results["meta"]["random_weights"] and results["meta"]["dtype"] == "float32"
    assert results["parity"]["ok"] and set(results["engine"]) == {"1", "8"}
    assert "wrote" in capsys.readouterr().out


def test_random_checkpoint_is_seeded(tiny_checkpoint, tmp_path):
    a = load_model(cuda.random_checkpoint(tiny_checkpoint, tmp_path / "a"))
    b = load_model(cuda.random_checkpoint(tiny_checkpoint, tmp_path / "b"))
    original = load_model(tiny_checkpoint)
    assert torch.equal(a.output.weight, b.output.weight)
    assert a.config == original.config


def test_a_failing_section_is_reported_and_the_rest_run(tiny_checkpoint, monkeypatch):
    def broken(*a, **kw):
        raise TimeoutError("4 sequences of 4 tokens not done in 1 s")

    monkeypatch.setattr(cuda, "greedy_parity", broken)
    results = cuda.run_check(
        tiny_checkpoint,
        torch.device("cpu"),
        dtype="float32",
        budget=cuda.Budget(300.0),
        levels=(1,),
        compiled_levels=(),
        max_tokens=4,
        max_batch_size=2,
        anchor_batches=(),
        step_sizes=(),
    )
    assert results["errors"] == {"parity": "TimeoutError: 4 sequences of 4 tokens not done in 1 s"}
    assert "parity" not in results and results["engine"]["1"]["tokens"] == 4
    assert "## errors\n- parity: TimeoutError" in cuda.format_report(results)
