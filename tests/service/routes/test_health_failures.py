"""/healthz follows the engine (service/routes/health.py): 503 with a reason when its thread died or it stalls with
work pending; generation answers 503 then."""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model.sampling import SamplingParams
from service.engine import Engine, Sequence
from service.engine.loop import ModelInfo
from service.routes import health
from tests.service.conftest import tiny_model


class Die(BaseException):
    """Escapes the loop's `except Exception`."""


def die():
    raise Die()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_fails_when_the_engine_stalls_or_dies(tokenizer):
    app = FastAPI()
    app.include_router(health.router)
    with TestClient(app) as client:
        app.state.engine = None  # still loading: the process answers
        assert client.get("/healthz").json() == {"status": "ok"}
        engine = Engine(
            tiny_model(0),
            tokenizer,
            max_batch_size=1,
            max_context=64,
            max_queue=4,
            prefill_chunk=64,
            info=ModelInfo("tiny"),
            stall_timeout=0.05,
        )
        app.state.engine = engine
        assert client.get("/healthz").status_code == 200
        time.sleep(0.1)
        assert client.get("/healthz").status_code == 200  # idle is not stalled
        engine.submit(Sequence([1, 2], 3, SamplingParams(temperature=0.0)))  # nobody runs the steps
        r = client.get("/healthz")
        assert r.status_code == 503 and "no step" in r.json()["reason"]
        engine.step()
        assert client.get("/healthz").status_code == 200  # a step was made
        engine.step = die  # the next step kills the thread
        engine.submit(Sequence([1, 2], 3, SamplingParams(temperature=0.0)))
        engine.start()
        engine._thread.join(5)
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["reason"] == "engine thread died"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_generation_answers_503_when_the_engine_is_not_running(make_client):
    with make_client() as client:
        engine = client.app.state.engine
        assert client.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        engine.step = die  # the next step kills the engine thread
        r = client.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "died" in r.json()["error"]["message"]  # the request in flight
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "thread died" in r.json()["error"]["message"]  # refused up front
        assert client.get("/healthz").status_code == 503
