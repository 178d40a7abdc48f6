"""The OpenAI-compatible routes (service/routes/openai.py): shapes, streaming, errors."""

from __future__ import annotations

import json

import pytest
import torch

from model.sampling import SamplingParams
from service.engine import Sequence
from service.generation import MAX_CHARS_PER_TOKEN
from service.schemas import HINT_FIELDS, UNSUPPORTED_FIELDS
from tests.service.conftest import parse_sse, slow_down, wait_until


def test_models(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert "/" not in models["data"][0]["root"]  # the checkpoint's name, never the server's filesystem path
    assert models["data"][0]["smollm"] == {
        "dtype": "float32",
        "device": "cpu",
        "quant": "none",
        "kv_cache_dtype": "float32",
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        # fp32: packed for oneDNN where torch has it (model/packed_linear.py)
        "linear_kernels": "oneDNN packed" if torch.backends.mkldnn.is_available() else "torch",
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
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 5}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, "best_of"),
        ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
        ("/v1/completions", {"prompt": "x", "stop": "y" * 257}, "stop"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    assert err["type"] == "invalid_request_error" and isinstance(err["code"], str)


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
def test_unencodable_input_is_400_not_500(client, path, raw, field):
    # Lone surrogates: the 400 must still be valid JSON naming the field.
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(field) and field in err["message"]


def test_openai_errors_and_defaults(client):
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    assert client.post("/v1/completions", json={"prompt": [10**7]}).status_code == 400
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
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


# ---- saying no clearly (issue 13 item 8)

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
REFUSED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("parallel_tool_calls", True),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
]
COMPLETION_ONLY = [("suffix", "the end")]
NO_OPS = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "response_format": {"type": "text"},
    "tool_choice": "none",
    "tools": [],
    "logprobs": False,
    "top_logprobs": 0,
    "logit_bias": {},
    "parallel_tool_calls": False,
    "repetition_penalty": 1.0,
    "min_p": 0,
}
HINTS = {"user": "someone", "store": False, "metadata": {"run": "1"}, "service_tier": "auto"}


@pytest.mark.parametrize(("field", "value"), REFUSED)
def test_unimplemented_chat_fields_are_400_naming_the_field(client, field, value):
    r = client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": field,
        "code": "unsupported_parameter",
    }
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize(("field", "value"), COMPLETION_ONLY + [("tools", [{"type": "function"}])])
def test_unimplemented_completion_fields_are_400_naming_the_field(client, field, value):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["code"] == "unsupported_parameter"


def test_defaults_and_hints_are_accepted(client):
    r = client.post("/v1/chat/completions", json={**CHAT, **NO_OPS, **HINTS})
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "echo": False, "best_of": 1, "suffix": None, **HINTS}
    )
    assert r.status_code == 200, r.text


def test_the_refusal_list_is_one_table():
    # The fields refused are exactly the table's keys: implementing one means deleting its entry.
    assert {f for f, _ in REFUSED + COMPLETION_ONLY} <= set(UNSUPPORTED_FIELDS)
    assert not set(HINT_FIELDS) & set(UNSUPPORTED_FIELDS)


def test_unknown_model_is_404_model_not_found(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "not_found_error" and err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-4o" in err["message"]
    served = client.get("/v1/models").json()["data"][0]["id"]
    for name in (served, "smollm", None):
        body = {**CHAT, "model": name} if name else CHAT
        assert client.post("/v1/chat/completions", json=body).status_code == 200, name
    assert client.post("/v1/completions", json={"prompt": "Hi", "model": "nope"}).status_code == 404


def test_openai_error_shape_by_status(make_client):
    with make_client(api_key="k", max_batch_size=1, max_queue=0) as c:
        r = c.post("/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "invalid_api_key"
        # /v1/generate keeps its documented shape: the status as the code.
        r = c.post("/v1/generate", json={"prompt": "Hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        auth = {"Authorization": "Bearer k"}
        r = c.post("/v1/generate", json={"prompt": "x", "temperature": 9}, headers=auth)
        assert r.status_code == 422 and r.json()["error"]["code"] == 422
        engine = c.app.state.engine
        slow_down(engine, 0.01)
        holder = Sequence(prompt_ids=[1, 2, 3], max_tokens=1900, params=SamplingParams(temperature=0), ignore_eos=True)
        engine.submit(holder)
        assert wait_until(lambda: holder in engine.scheduler.running)
        r = c.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "rate_limit_exceeded"
        engine.cancel(holder)
        assert wait_until(engine.idle)
        engine.stop()
        r = c.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "service_unavailable"


def test_prompt_beyond_the_context_is_context_length_exceeded(client):
    r = client.post("/v1/completions", json={"prompt": list(range(1, 2100)), "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "prompt"
