"""The one test on the embedded SmolLM2-135M-Instruct: the served chat answer makes sense."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


@pytest.mark.slow
def test_chat_answer_from_the_embedded_model():
    settings = Settings(checkpoint=None, max_batch_size=2, max_context=512, reload_interval=0)  # bf16 default
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        r = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 30,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert "Paris" in body["choices"][0]["message"]["content"]
        assert body["choices"][0]["finish_reason"] == "stop"  # <|im_end|> ends the turn
        g = client.post(
            "/v1/generate",
            json={"prompt": "What is the capital of France?", "chat": True, "max_tokens": 30, "temperature": 0},
        ).json()
        assert g["text"] == body["choices"][0]["message"]["content"]


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_json_schema_answer_through_the_api_parses_and_validates():
    settings = Settings(checkpoint=None, dtype="float32", max_batch_size=2, max_context=512, reload_interval=0)
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Describe a person called Ada, aged 36, as JSON."}],
                "max_tokens": 60,
                "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
