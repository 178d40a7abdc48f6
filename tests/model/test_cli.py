import subprocess
import sys
import time

import pytest

from model.bundled import bundled_gguf_path
from model.checkpoint import load_model
from model.generate import generate_tokens
from model.gguf import convert_gguf
from model.tokenizer import load_tokenizer


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_generate_streams_greedy_continuation(tiny_checkpoint):
    proc = _run(
        "-m",
        "model.generate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
        "--dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    model, tok = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    expected = tok.decode(list(generate_tokens(model, ids, 12, stop_ids=(2,))), skip_special_tokens=True)
    assert proc.stdout == expected + "\n"


def test_generate_rejects_bad_arguments(tiny_checkpoint, tmp_path):
    bad = _run("-m", "model.generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--top-p", "0")
    assert bad.returncode == 2 and "top_p" in bad.stderr
    missing = _run("-m", "model.generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x")
    assert missing.returncode == 2 and "none" in missing.stderr and "Traceback" not in missing.stderr


def test_convert_cli_error_names_the_file(tmp_path):
    proc = _run("-m", "model.convert", "--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2 and "missing.gguf" in proc.stderr and "Traceback" not in proc.stderr
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    proc = _run("-m", "model.convert", "--out", str(tmp_path / "out"), "--gguf", str(garbage))
    assert proc.returncode == 2 and "garbage.gguf" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_convert_bf16_is_fast_and_loadable(tmp_path):
    start = time.perf_counter()
    out = convert_gguf(bundled_gguf_path(), tmp_path / "bf16", dtype=__import__("torch").bfloat16)
    elapsed = time.perf_counter() - start
    model = load_model(out)
    assert model.config.n_layer == 30 and model.config.block_size == 8192
    assert elapsed < 120  # generous bound on a loaded 2-core machine; the README reports the measured time
