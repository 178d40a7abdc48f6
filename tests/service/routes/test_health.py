"""/healthz, /readyz, /metrics, the docs and the playground (service/routes/health.py)."""

from __future__ import annotations

from tests.service.conftest import metric_value


def test_health_docs_playground(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    assert "/v1/generate" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    assert "ReadableStream" in html or "getReader" in html
    assert "/v1/generate" in html and "<script src" not in html and "https://" not in html


def test_metrics_count(client):
    before = client.get("/metrics").text
    client.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    client.post("/v1/generate", json={"prompt": "Hi", "temperature": 9})
    after = client.get("/metrics").text
    ok = 'endpoint="/v1/generate",status="200"'
    bad = 'endpoint="/v1/generate",status="422"'
    assert metric_value(after, "smollm_requests_total", ok) == metric_value(before, "smollm_requests_total", ok) + 1
    assert metric_value(after, "smollm_requests_total", bad) == metric_value(before, "smollm_requests_total", bad) + 1
    gen = "smollm_generation_tokens_total"
    assert metric_value(after, gen) == metric_value(before, gen) + 5
    assert metric_value(after, "smollm_prompt_tokens_total") > metric_value(before, "smollm_prompt_tokens_total")
    assert metric_value(after, "smollm_kv_cache_slots_total") == 4
    assert metric_value(after, "smollm_kv_cache_tokens_total") == 4 * 2048
    assert metric_value(after, "smollm_running_sequences") == 0
    assert 'smollm_model_info{checkpoint="' in after
    assert 'cpu_isa="' in after and 'device="cpu",dtype="float32",kv_cache_dtype="float32",' in after
    assert 'linear_kernels="' in after and 'quant="none"' in after
    for name in (
        "smollm_request_latency_seconds",
        "smollm_time_to_first_token_seconds",
        "smollm_inter_token_latency_seconds",
        "smollm_queue_wait_seconds",
        "smollm_batch_size",
    ):
        assert metric_value(after, name + "_count") > 0, name
    assert "smollm_requests_cancelled_total" in after and "smollm_waiting_requests" in after
    assert "smollm_kv_cache_slots_used" in after and "smollm_kv_cache_tokens_used" in after
