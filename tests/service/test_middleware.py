"""The ASGI middleware (service/middleware.py) and the server's connection limits: body size and read time,
API-key auth (a key or a key file), uvicorn's concurrency limit."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.service.conftest import LiveServer, slow_down, tiny_settings, wait_until


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


def test_a_body_sent_too_slowly_gets_408(tiny_checkpoint):
    with LiveServer(tiny_settings(tiny_checkpoint, body_read_timeout=0.5)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"pro'
            )  # then nothing: a slowloris client
            start = time.monotonic()
            answer = b""
            while chunk := s.recv(4096):  # the server closes the connection after its answer
                answer += chunk
            elapsed = time.monotonic() - start
            while chunk := s.recv(4096):  # the server closes the connection after the answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"not received within 0.5 s" in answer
        assert elapsed < 3
        ok = httpx.post(server.url + "/v1/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


def test_connections_beyond_the_concurrency_limit_get_503(tiny_checkpoint):
    with LiveServer(tiny_settings(tiny_checkpoint, limit_concurrency=2)) as server:
        slow_down(server.engine)
        req = {"prompt": "Hi", "max_tokens": 1900, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/v1/generate", json=req) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("event:"))
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 503
        assert wait_until(server.engine.idle, timeout=10)
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def test_api_key_from_a_file(make_client, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("from-a-secret\n")
    with make_client(api_key_file=str(key_file)) as c:
        req = {"prompt": "x", "max_tokens": 2}
        assert c.post("/v1/generate", json=req).status_code == 401
        ok = c.post("/v1/generate", json=req, headers={"Authorization": "Bearer from-a-secret"})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, {}, "cannot read"),
        ("  \n", {}, "is empty"),
        ("k", {"api_key": "other"}, "not both"),
    ],
)
def test_a_bad_api_key_file_is_a_clear_error(tmp_path, content, extra, message):
    key_file = tmp_path / "api-key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ValidationError, match=f"api_key_file.*{message}"):
        Settings(api_key_file=str(key_file), **extra)
