"""POST /v1/generate (service/routes/generate.py): JSON and SSE answers, bounds, errors."""

from __future__ import annotations

import json

import pytest

from tests.service.conftest import parse_sse, slow_down

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
