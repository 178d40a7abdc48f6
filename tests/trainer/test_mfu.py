"""Honest MFU and the precision it is measured in: every rank's tokens over every rank's peak, the peak from the
datasheet of a known GPU or measured in the compute dtype, never above 100%; `dtype: auto` picks fp32 where bf16
would be emulated."""

import logging
from pathlib import Path

import pytest
import torch

from model.device import CpuCapability
from trainer import mfu as mfu_module
from trainer.config import load_config
from trainer.loop import compute_dtype, prepare, run
from trainer.mfu import MfuMeter, device_peak
from trainer.progress import METRICS_FILE, Progress, read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
AVX2 = CpuCapability(isa="AVX2", native_bf16=False)
AMX = CpuCapability(isa="AVX512", native_bf16=True)
CUDA = torch.device("cuda", 0)


def _no_measure(device, dtype):
    raise AssertionError("a known device must not be measured")


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA L4", torch.bfloat16, 121.0),
        ("NVIDIA L40S", torch.bfloat16, 362.1),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),
    ],
)
def test_known_gpus_use_the_datasheet_peak_of_the_compute_dtype(name, dtype, tflops):
    peak = device_peak(CUDA, dtype, device_name=lambda d: name, measure=_no_measure)
    assert peak.flops == pytest.approx(tflops * 1e12) and "datasheet" in peak.source


def test_unknown_devices_are_measured_in_the_compute_dtype():
    seen = []

    def measure(device, dtype):
        seen.append((device.type, dtype))
        return 5e13

    assert device_peak(CUDA, torch.bfloat16, device_name=lambda d: "Some Future GPU", measure=measure).flops == 5e13
    assert device_peak(torch.device("cpu"), torch.float32, measure=measure).flops == 5e13
    assert seen == [("cuda", torch.bfloat16), ("cpu", torch.float32)]
    assert device_peak(CUDA, torch.bfloat16, configured_tflops=2.0, measure=_no_measure).flops == 2e12


def test_mfu_divides_by_every_ranks_peak_and_never_exceeds_100_percent(caplog):
    per_token = 1e9
    one = MfuMeter(per_token, peak_flops=1e12, world_size=1)
    two = MfuMeter(per_token, peak_flops=1e12, world_size=2)
    assert one(400.0) == pytest.approx(0.4)
    assert two(400.0) == pytest.approx(0.2)  # 400 tokens/s over both ranks: each device does half
    assert MfuMeter(per_token, None)(400.0) is None
    with caplog.at_level(logging.WARNING, logger="trainer.mfu"):
        assert one(3000.0) == 1.0 and one(5000.0) == 1.0
    assert len([r for r in caplog.records if "peak is too low" in r.message]) == 1  # warned once


def test_progress_reports_the_clamped_mfu(tmp_path):
    progress = Progress(tmp_path, 0, 10, tokens_per_step=1000, mfu=MfuMeter(1e9, peak_flops=1e9, world_size=2))
    progress.step_timed(1.0)
    progress.log_step(1, loss=2.0, lr=1e-3, grad_norm=1.0)
    progress.close()
    (record,) = read_metrics(tmp_path / METRICS_FILE)
    assert record["mfu"] == 1.0  # 1000 tok/s x 1e9 / (2 x 1e9) = 500 -> clamped


@pytest.mark.parametrize("config", ["demo", "tiny", None])
def test_no_config_a_test_runs_trains_in_emulated_bf16(config):
    cfg = load_config(CONFIGS / f"{config}.yaml" if config else None)
    cpu = torch.device("cpu")
    assert compute_dtype(cfg, cpu, lambda: AVX2) == torch.float32
    assert compute_dtype(cfg, cpu, lambda: AMX) in (torch.bfloat16, torch.float32)
    if cfg.dtype == "auto":
        assert compute_dtype(cfg, cpu, lambda: AMX) == torch.bfloat16


def test_the_trainer_measures_its_peak_in_the_precision_it_computes(make_config, tmp_path, monkeypatch):
    seen = []

    def measure(device, dtype):
        seen.append(dtype)
        return 1e6  # far below what even the tiny model reaches: MFU must still read at most 100%

    monkeypatch.setattr(mfu_module, "measure_matmul_flops", measure)
    cfg = make_config("dtype=auto", "peak_tflops=null", "max_steps=2", "checkpoint_every=2")
    out = tmp_path / "out"
    run(prepare(cfg), out)
    assert seen == [compute_dtype(cfg, torch.device("cpu"))]
    assert [r["mfu"] for r in read_metrics(out / METRICS_FILE)] == [1.0, 1.0]
