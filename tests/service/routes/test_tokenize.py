"""POST /tokenize and /detokenize (service/routes/tokenize.py): vLLM's shapes, the chat template, errors."""

from __future__ import annotations

import pytest

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_tokenize_a_prompt_and_back(client, tokenizer):
    r = client.post("/tokenize", json={"prompt": "Hello, world!"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode("Hello, world!") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == client.app.state.engine.max_context
    r = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "Hello, world!"}


def test_tokenize_messages_applies_the_chat_template(client, tokenizer):
    body = client.post("/tokenize", json={"messages": CHAT}).json()
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert body["tokens"] == list(expected)
    bare = client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"] and body["tokens"][: bare["count"]] == bare["tokens"]
    # The chat route builds the same prompt: its usage counts exactly these tokens.
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == body["count"]


def test_tokenized_prompt_completes_like_its_text(client):
    ids = client.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    req = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    by_text = client.post("/v1/completions", json={**req, "prompt": "Once upon a time"}).json()
    by_ids = client.post("/v1/completions", json={**req, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"] == by_text["usage"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": []}, "tokens"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {"prompt": ""}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_bad_input_is_400_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    r = client.post("/tokenize", json={"prompt": "x", "model": "gpt-4o"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
