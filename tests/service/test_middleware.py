"""The ASGI middleware (service/middleware.py): the body limit and API-key auth."""

from __future__ import annotations


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
