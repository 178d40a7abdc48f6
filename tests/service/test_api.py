"""The HTTP surface through FastAPI's TestClient: every endpoint, status code and response shape."""

from __future__ import annotations

import json

import pytest

from tests.service.conftest import metric_value, parse_sse, slow_down

GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}  # a fixed length, whatever the random model says


def test_health_models_docs_playground(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert "/" not in models["data"][0]["root"]  # the checkpoint's name, never the server's filesystem path
    assert client.get("/docs").status_code == 200
    assert "/v1/generate" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    assert "ReadableStream" in html or "getReader" in html
    assert "/v1/generate" in html and "<script src" not in html and "https://" not in html


def test_generate_json(client):
    r = client.post("/v1/generate", json={"prompt": "Once upon a time", **GREEDY})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "text", "finish_reason", "usage", "timing"}
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 24
    assert body["usage"]["prompt_tokens"] == 4
    assert body["text"]
    assert 0 <= body["timing"]["ttft_ms"] <= body["timing"]["total_ms"]


def test_stream_event_sequence_equals_json(client):
    req = {"prompt": "Once upon a time", **GREEDY}
    solo = client.post("/v1/generate", json=req).json()
    r = client.post("/v1/generate", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    tokens = [json.loads(d) for _, d in events[:-1]]
    indexes = [t["index"] for t in tokens]
    assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)
    assert "".join(t["text"] for t in tokens) == solo["text"]
    done = json.loads(events[-1][1])
    assert done["finish_reason"] == "length"
    assert done["usage"] == solo["usage"]


def test_completions_stream_done_and_usage(client):
    req = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=req).json()
    assert full["object"] == "text_completion" and full["usage"]["completion_tokens"] == 8
    r = client.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    events = parse_sse(r.text)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == full["usage"]["total_tokens"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full["choices"][0]["text"]


def test_chat_completions(client):
    req = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
           "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/chat/completions", json=req).json()
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"]["role"] == "assistant"
    assert full["usage"]["prompt_tokens"] > 10  # the chat template wrapped the messages
    events = parse_sse(client.post("/v1/chat/completions", json={**req, "stream": True}).text)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/generate", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/generate", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/generate", {"prompt": "x", "top_k": -1}, "top_k"),
        ("/v1/generate", {"prompt": "x", "top_k": 10**6}, "top_k"),
        ("/v1/generate", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/generate", {"prompt": "x", "max_tokens": 5000}, "max_tokens"),
        ("/v1/generate", {"prompt": ""}, "prompt"),
        ("/v1/generate", {"max_tokens": 3}, "prompt"),
        ("/v1/generate", {"prompt": "x", "stop": [""]}, "stop"),
        ("/v1/generate", {"prompt": 5}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/generate", {"prompt": "x", "seed": 2**63}, "seed"),
        ("/v1/generate", {"prompt": "x", "seed": -1}, "seed"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
        ("/v1/generate", {"prompt": "x", "stop": ["y" * 257]}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": "y" * 257}, "stop"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/generate", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
        ("/v1/generate", b'{"prompt": "hi", "top_p": Infinity}', "top_p"),
        ("/v1/generate", b'{"prompt": "hi", "max_tokens": 1e400}', "max_tokens"),
        ("/v1/generate", b'{"prompt": "hi", "seed": 1e400}', "seed"),
        ("/v1/generate", b'{"prompt": "a \\ud800 b"}', "prompt"),
        ("/v1/generate", b'{"prompt": "hi", "stop": ["\\udfff"]}', "stop"),
        ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", b'{"prompt": ["\\ud800"]}', "prompt"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
         "messages.0.content"),
        ("/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages.0.role"),
    ],
)
def test_unencodable_input_is_422_not_500(client, path, raw, field):
    # Non-finite numbers and lone surrogates: the 422 must still be valid JSON naming the field.
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"].startswith(field) and field in err["message"]


def test_invalid_json_is_422(client):
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "body"
    r = client.post("/v1/generate", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_prompt_too_long_is_400(client):
    r = client.post("/v1/generate", json={"prompt": "hello " * 2100})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_body_limit_413(make_client):
    with make_client(max_body_bytes=200) as c:
        assert c.post("/v1/generate", json={"prompt": "x" * 300}).status_code == 413

        def chunks():  # no Content-Length: the limit must hold on the bytes actually received
            yield b'{"prompt": "'
            yield b"x" * 300
            yield b'"}'

        r = c.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/generate", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_api_key(make_client):
    with make_client(api_key="s3cret") as c:
        req = {"prompt": "x", "max_tokens": 2}
        r = c.post("/v1/generate", json=req)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/generate", json=req, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/generate", json=req, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/generate", json=req, headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert c.post("/v1/generate", json=req, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert c.post("/v1/generate", json=req, headers={"Authorization": "s3cret"}).status_code == 401
        for open_path in ("/healthz", "/readyz", "/metrics", "/"):
            assert c.get(open_path).status_code == 200, open_path


def test_stop_strings(client):
    base = client.post("/v1/generate", json={"prompt": "The", "temperature": 0, "max_tokens": 30}).json()["text"]
    stop = base[8:12]
    assert stop.strip(), base
    cut = base[: base.find(stop)]
    r = client.post("/v1/generate", json={"prompt": "The", "temperature": 0, "max_tokens": 30, "stop": [stop]})
    assert r.json()["text"] == cut and r.json()["finish_reason"] == "stop"
    events = parse_sse(client.post("/v1/generate", json={"prompt": "The", "temperature": 0, "max_tokens": 30,
                                                          "stop": stop, "stream": True}).text)
    streamed = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    assert streamed == cut
    assert json.loads(events[-1][1])["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(client):
    req = {"prompt": "Once", "temperature": 1.0, "top_k": 40, "top_p": 0.9, "max_tokens": 20}
    a = client.post("/v1/generate", json={**req, "seed": 7}).json()["text"]
    b = client.post("/v1/generate", json={**req, "seed": 7}).json()["text"]
    c = client.post("/v1/generate", json={**req, "seed": 8}).json()["text"]
    assert a == b
    assert a != c


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
    for name in ("smollm_request_latency_seconds", "smollm_time_to_first_token_seconds",
                 "smollm_inter_token_latency_seconds", "smollm_queue_wait_seconds", "smollm_batch_size"):
        assert metric_value(after, name + "_count") > 0, name
    assert "smollm_requests_cancelled_total" in after and "smollm_waiting_requests" in after
    assert "smollm_kv_cache_slots_used" in after and "smollm_kv_cache_tokens_used" in after


def test_request_timeout_ends_the_request(make_client):
    with make_client(request_timeout=0.3) as c:
        slow_down(c.app.state.engine, 0.01)
        r = c.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        assert r.status_code == 200
        body = r.json()
        assert body["finish_reason"] == "abort" and 0 < body["usage"]["completion_tokens"] < 1000
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert c.app.state.engine.idle()


def test_openai_errors_and_defaults(client):
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    assert client.post("/v1/completions", json={"prompt": [10**7]}).status_code == 422
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_completion_tokens": 3,
        "user": "someone", "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
