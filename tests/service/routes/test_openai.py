"""The OpenAI-compatible routes (service/routes/openai.py): shapes, streaming, errors."""

from __future__ import annotations

import json

import pytest
import torch

from model.sampling import SamplingParams
from service.engine import Sequence
from service.generation import MAX_CHARS_PER_TOKEN
from tests.service.conftest import parse_sse, slow_down, wait_until


def test_models(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert "/" not in models["data"][0]["root"]  # the checkpoint's name, never the server's filesystem path
    assert models["data"][0]["smollm"] == {
        "dtype": "float32",
        "device": "cpu",
        "quant": "none",
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
    }
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"CompletionResponse", "ChatCompletionResponse", "ModelList"} <= set(schemas)


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
    req = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
    }
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
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
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
        ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", b'{"prompt": ["\\ud800"]}', "prompt"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
            "messages.0.content",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages.0.role"),
    ],
)
def test_unencodable_input_is_422_not_500(client, path, raw, field):
    # Non-finite numbers and lone surrogates: the 422 must still be valid JSON naming the field.
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"].startswith(field) and field in err["message"]


def test_openai_errors_and_defaults(client):
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    assert client.post("/v1/completions", json={"prompt": [10**7]}).status_code == 422
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_completion_tokens": 3,
            "user": "someone",
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_request_timeout(make_client):
    with make_client(request_timeout=0.3) as c:
        slow_down(c.app.state.engine, 0.01)
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        assert r.json()["choices"][0]["finish_reason"] == "abort"  # cut short after its first tokens
        assert c.app.state.engine.idle()


def test_queue_timeout_is_an_error_on_the_openai_routes(make_client):
    with make_client(max_batch_size=1, request_timeout=0.3) as c:
        engine = c.app.state.engine
        slow_down(engine, 0.01)
        holder = Sequence(prompt_ids=[1, 2, 3], max_tokens=1900, params=SamplingParams(temperature=0), ignore_eos=True)
        engine.submit(holder)
        assert wait_until(lambda: holder in engine.scheduler.running)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 504, r.text
        events = parse_sse(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True}).text)
        assert "error" in json.loads(events[0][1]) and events[-1][1] == "[DONE]"
        engine.cancel(holder)
        assert wait_until(engine.idle)


def test_messages_too_long_for_the_context_are_refused_before_tokenizing(client):
    limit = client.app.state.engine.max_context * MAX_CHARS_PER_TOKEN
    half = "x" * (limit // 2 + 1)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": half}] * 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/completions", json={"prompt": "x" * (limit + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
