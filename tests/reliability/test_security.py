"""Security: the API key on generation endpoints (health and metrics stay open), the key never logged, and no
request field used as a filesystem path."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.reliability.harness import check_generate_stream, stream_request

KEY = "sk-reliability-Zq8v3LkT0pWm"
GENERATION = [
    ("POST", "/v1/generate", {"prompt": "Hi", "max_tokens": 3}),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
    ("GET", "/v1/models", None),
]
OPEN = ["/healthz", "/readyz", "/metrics"]


@pytest.fixture
def keyed_server(tiny_checkpoint, start_server):
    # Debug logging: the most a deployment could log, and still no key in it.
    return start_server(tiny_checkpoint, api_key=KEY, log_level="DEBUG")


def test_api_key_guards_generation_and_is_never_logged(keyed_server, figures):
    server = keyed_server
    seen: dict[str, dict[str, int]] = {}
    bodies = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path, body in GENERATION:
            statuses = {}
            for name, headers in [
                ("none", {}),
                ("wrong", {"Authorization": "Bearer not-the-key"}),
                ("no_scheme", {"Authorization": KEY}),
                ("key_prefix", {"Authorization": f"Bearer {KEY[:-1]}"}),
                ("right", {"Authorization": f"Bearer {KEY}"}),
            ]:
                r = c.request(method, path, json=body, headers=headers)
                statuses[name] = r.status_code
                bodies.append(r.text)
                if r.status_code == 401:
                    assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers
            seen[path] = statuses
        open_statuses = {path: c.get(path).status_code for path in OPEN}
        bodies += [c.get(path).text for path in [*OPEN, "/openapi.json"]]
    streamed = asyncio.run(_stream_with_key(server.url))
    log = server.log()
    figures.update(
        generation_endpoints=seen,
        open_endpoints=open_statuses,
        key_in_log=KEY in log,
        key_in_responses=any(KEY in b for b in bodies),
        log_lines=len(log.splitlines()),
        stream_with_key_ok=check_generate_stream(streamed, count_tokens=False) is None,
    )
    for path, statuses in seen.items():
        assert statuses["none"] == statuses["wrong"] == statuses["no_scheme"] == statuses["key_prefix"] == 401, (
            path,
            statuses,
        )
        assert statuses["right"] == 200, (path, statuses)
    assert open_statuses == dict.fromkeys(OPEN, 200)
    assert check_generate_stream(streamed, count_tokens=False) is None, streamed.events[-3:]
    assert KEY not in log
    assert not any(KEY in b for b in bodies)


async def _stream_with_key(url: str):
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
        return await stream_request(c, "/v1/generate", {"prompt": "Hi", "max_tokens": 5, "stream": True})


def test_no_request_field_is_used_as_a_path(tiny_checkpoint, tmp_path, save_tiny, start_server, figures):
    server = start_server(tiny_checkpoint)
    # A second, valid checkpoint with other weights: if a request could make the server load it, the greedy
    # answer would change.
    other = save_tiny(tmp_path / "other-checkpoint", seed=99)
    greedy = {"max_tokens": 12, "temperature": 0}
    results = {}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = c.get("/readyz").json()
        base_cmpl = c.post("/v1/completions", json={"prompt": "Hello", **greedy}).json()
        base_chat = c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], **greedy}
        ).json()
        for model in ["/etc/passwd", str(other), "../../../../etc/shadow", "file:///etc/passwd"]:
            cmpl = c.post("/v1/completions", json={"model": model, "prompt": "Hello", **greedy})
            chat = c.post(
                "/v1/chat/completions", json={"model": model, **greedy, "messages": [{"role": "user", "content": "Hi"}]}
            )
            results[model] = {"completions": cmpl.status_code, "chat": chat.status_code}
            for r, base in ((cmpl, base_cmpl), (chat, base_chat)):
                assert r.status_code in (200, 400, 404, 422), r.text
                if r.status_code == 200:
                    assert r.json()["choices"] == base["choices"], (model, r.text)
                    assert r.json()["model"] == base["model"]
                assert "root:" not in r.text
        # A prompt that is a path is text to continue, never a file to read.
        passwd = c.post("/v1/generate", json={"prompt": "/etc/passwd", **greedy}).json()
        after = c.get("/readyz").json()
        info = [line for line in c.get("/metrics").text.splitlines() if line.startswith("smollm_model_info")]
    log = server.log()
    figures.update(
        model_field_statuses=results,
        served_before=before.get("checkpoint"),
        served_after=after.get("checkpoint"),
        other_checkpoint_in_log=str(other) in log,
    )
    assert after == before
    assert len(info) == 1 and json.dumps(str(tiny_checkpoint))[1:-1] in info[0]
    assert "root:" not in passwd["text"]
    assert str(other) not in log and "/etc/passwd" not in log
