"""POST /v1/generate (service/routes/generate.py): JSON and SSE answers, bounds, errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from model.sampling import SamplingParams
from service.engine import Sequence
from service.generation import MAX_CHARS_PER_TOKEN
from tests.service.conftest import metric_value, parse_sse, slow_down, wait_until

GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}  # a fixed length, whatever the random model says


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
        ("/v1/generate", {"prompt": "x", "seed": 2**63}, "seed"),
        ("/v1/generate", {"prompt": "x", "seed": -1}, "seed"),
        ("/v1/generate", {"prompt": "x", "stop": ["y" * 257]}, "stop"),
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


def test_stop_strings(client):
    base = client.post("/v1/generate", json={"prompt": "The", "temperature": 0, "max_tokens": 30}).json()["text"]
    stop = base[8:12]
    assert stop.strip(), base
    cut = base[: base.find(stop)]
    r = client.post("/v1/generate", json={"prompt": "The", "temperature": 0, "max_tokens": 30, "stop": [stop]})
    assert r.json()["text"] == cut and r.json()["finish_reason"] == "stop"
    events = parse_sse(
        client.post(
            "/v1/generate", json={"prompt": "The", "temperature": 0, "max_tokens": 30, "stop": stop, "stream": True}
        ).text
    )
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


def test_request_timeout_ends_the_request(make_client):
    with make_client(request_timeout=0.3) as c:
        slow_down(c.app.state.engine, 0.01)
        r = c.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        assert r.status_code == 200
        body = r.json()
        assert body["finish_reason"] == "timeout" and 0 < body["usage"]["completion_tokens"] < 1000
        assert c.app.state.engine.idle()


# ---- fail-safe (issue 12)


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(make_client, monkeypatch):
    with make_client() as c:
        engine = c.app.state.engine
        calls = []
        encode = engine.tokenizer.encode
        monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
        limit = engine.max_context * MAX_CHARS_PER_TOKEN
        r = c.post("/v1/generate", json={"prompt": "x" * (limit + 1)})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prompt" and f"{limit + 1} characters" in err["message"]
        assert calls == []
        r = c.post("/v1/generate", json={"prompt": "x" * (limit + 1), "chat": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_the_character_bound_never_refuses_a_prompt_that_fits(tokenizer):
    # context x MAX_CHARS_PER_TOKEN characters need more than `context` tokens only if no token is longer.
    longest = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    assert longest <= MAX_CHARS_PER_TOKEN


def test_health_answers_while_a_long_prompt_is_tokenized(make_client, monkeypatch):
    with make_client() as c:
        engine = c.app.state.engine
        encode = engine.tokenizer.encode
        started = threading.Event()

        def slow_encode(*args, **kwargs):  # a long prompt: the real tokenizer releases the GIL as sleep does
            started.set()
            time.sleep(1.5)
            return encode(*args, **kwargs)

        monkeypatch.setattr(engine.tokenizer, "encode", slow_encode)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/v1/generate", json={"prompt": "Hi", "max_tokens": 2})
            assert started.wait(10)
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            latency = time.monotonic() - t0
            assert pending.result(timeout=30).status_code == 200
        assert latency < 0.5, f"/healthz took {latency:.2f} s while a prompt was tokenized"


def _hold_the_only_slot(engine) -> Sequence:
    """A sequence without a deadline submitted straight to the engine: it keeps the one slot busy."""
    seq = Sequence(prompt_ids=[1, 2, 3], max_tokens=1900, params=SamplingParams(temperature=0), ignore_eos=True)
    engine.submit(seq)
    assert wait_until(lambda: seq in engine.scheduler.running)
    return seq


def test_a_request_that_times_out_in_the_queue_is_an_error_not_an_empty_answer(make_client):
    with make_client(max_batch_size=1, request_timeout=0.3) as c:
        engine = c.app.state.engine
        slow_down(engine, 0.01)
        holder = _hold_the_only_slot(engine)
        before = c.get("/metrics").text
        r = c.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 504, r.text
        assert "before its first token" in r.json()["error"]["message"]
        events = parse_sse(c.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 4, "stream": True}).text)
        assert [e for e, _ in events] == ["error"]
        assert json.loads(events[0][1])["status"] == 504
        after = c.get("/metrics").text
        engine.cancel(holder)
        assert wait_until(engine.idle)
    name, label = "smollm_request_finish_total", 'reason="timeout"'
    assert metric_value(after, name, label) == metric_value(before, name, label) + 2


def test_requests_are_counted_by_finish_reason(client):
    before = client.get("/metrics").text
    client.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    after = client.get("/metrics").text
    name, label = "smollm_request_finish_total", 'reason="length"'
    assert metric_value(after, name, label) == metric_value(before, name, label) + 1


def test_a_dead_engine_answers_503_instead_of_queueing(make_client):
    with make_client() as c:
        c.app.state.engine.stop()
        r = c.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        assert c.get("/readyz").status_code == 503


def test_a_stream_whose_client_stops_reading_is_dropped_and_cancelled(make_client):
    with make_client(sse_send_timeout=0.3) as c:
        engine = c.app.state.engine
        slow_down(engine, 0.002)
        before = c.get("/metrics").text
        body = json.dumps({"prompt": "Hi", "max_tokens": 1900, "ignore_eos": True, "stream": True}).encode()

        async def stalled_client() -> float:
            asked = False

            async def receive():
                nonlocal asked
                if not asked:
                    asked = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()  # it never says goodbye: it just stops reading

            chunks = 0

            async def send(message):
                nonlocal chunks
                if message["type"] == "http.response.body":
                    chunks += 1
                    if chunks > 2:
                        await asyncio.Event().wait()  # the socket buffers are full: this send never completes

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/generate",
                "raw_path": b"/v1/generate",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                "client": ("127.0.0.1", 9),
                "server": ("testserver", 80),
            }
            start = time.monotonic()
            await asyncio.wait_for(c.app(scope, receive, send), 10)
            return time.monotonic() - start

        elapsed = c.portal.call(stalled_client)
        assert elapsed < 5
        assert wait_until(engine.idle, timeout=5)
        after = c.get("/metrics").text
    name = "smollm_requests_cancelled_total"
    assert metric_value(after, name) == metric_value(before, name) + 1
