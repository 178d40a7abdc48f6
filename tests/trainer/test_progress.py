import json
import urllib.request

import pytest

from trainer.plot import main as plot_main
from trainer.progress import MetricsFile, PrometheusGauges, StepRecord, read_metrics


def test_prometheus_gauges_have_the_contract_names():
    gauges = PrometheusGauges(port=0)
    try:
        gauges.update(
            StepRecord(
                step=12,
                loss=2.5,
                lr=1e-3,
                grad_norm=0.5,
                tokens_per_s=1000.0,
                mfu=None,
                elapsed_s=1.0,
                eta_s=2.0,
                val_loss=2.75,
            )
        )
        port = gauges.server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        gauges.close()
    for line in [
        "smollm_trainer_step 12.0",
        "smollm_trainer_loss 2.5",
        "smollm_trainer_tokens_per_second 1000.0",
        "smollm_trainer_learning_rate 0.001",
        "smollm_trainer_val_loss 2.75",
    ]:
        assert line in body


def test_metrics_file_truncates_steps_past_a_resume(tmp_path):
    m = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        m.write({"step": step, "loss": float(step)})
    with open(m.path, "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by a crash
    m.truncate_after(3)
    assert [r["step"] for r in read_metrics(m.path)] == [1, 2, 3]


def test_plot_cli_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert plot_main([str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").is_file()
