import threading
import time
from pathlib import Path

from model import bundled
from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, atomic_directory


def test_processes_starting_together_convert_the_embedded_model_once(tmp_path, monkeypatch):
    conversions = []

    def slow_convert(gguf: Path, target: Path) -> Path:
        conversions.append(target)
        time.sleep(0.5)  # long enough that every caller has found the directory missing meanwhile

        def write(tmp: Path) -> None:
            (tmp / CONFIG_FILE).write_text("{}")
            (tmp / WEIGHTS_FILE).write_bytes(b"")

        return atomic_directory(target, write)

    monkeypatch.setattr(bundled, "convert_gguf", slow_convert)
    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda: tmp_path / "model.gguf")
    target = tmp_path / "cache" / bundled.DEFAULT_NAME
    start = threading.Barrier(3)
    results: list[Path] = []

    def caller() -> None:
        start.wait()
        results.append(bundled.default_checkpoint(target))

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [target] * 3
    assert conversions == [target]  # one conversion; the others waited for it instead of replacing its directory
    assert bundled.default_checkpoint(target) == target and len(conversions) == 1
