"""Against a real uvicorn server: concurrency, client disconnects, a full queue and the `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.service.conftest import LiveServer, metric_value, slow_down, tiny_settings, wait_until


def _generate(url: str, prompt: str, **kw) -> dict:
    r = httpx.post(url + "/v1/generate", json={"prompt": prompt, "temperature": 0, "max_tokens": 16, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_greedy_requests_equal_their_solo_answers(live):
    prompts = [f"Story number {i}: once upon a time" + " and" * i for i in range(10)]
    solo = [_generate(live.url, p)["text"] for p in prompts]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
            rs = await asyncio.gather(
                *(c.post("/v1/generate", json={"prompt": p, "temperature": 0, "max_tokens": 16}) for p in prompts)
            )
        return [r.json()["text"] for r in rs]

    before = httpx.get(live.url + "/metrics").text
    together = asyncio.run(all_at_once())
    after = httpx.get(live.url + "/metrics").text
    assert together == solo
    # 10 requests over 4 slots: steps really were batched.
    steps = metric_value(after, "smollm_batch_size_count") - metric_value(before, "smollm_batch_size_count")
    seqs = metric_value(after, "smollm_batch_size_sum") - metric_value(before, "smollm_batch_size_sum")
    assert seqs / steps > 1.5


def test_disconnect_cancels_and_frees_the_slot(live):
    before = httpx.get(live.url + "/metrics").text
    with httpx.Client(base_url=live.url, timeout=30) as c:
        req = {"prompt": "Hello", "temperature": 0, "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with c.stream("POST", "/v1/generate", json=req) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: token"
            assert len(live.engine.scheduler.running) == 1
        # Leaving the block closes the connection mid-stream.
    cancelled = "smollm_requests_cancelled_total"
    counted = lambda: metric_value(httpx.get(live.url + "/metrics").text, cancelled) > metric_value(before, cancelled)  # noqa: E731
    assert wait_until(lambda: not live.engine.scheduler.running and counted(), timeout=5)
    after = httpx.get(live.url + "/metrics").text
    assert metric_value(after, "smollm_running_sequences") == 0
    assert metric_value(after, "smollm_kv_cache_slots_used") == 0
    assert metric_value(after, cancelled) == metric_value(before, cancelled) + 1
    generated = metric_value(after, "smollm_generation_tokens_total") - metric_value(
        before, "smollm_generation_tokens_total"
    )
    assert generated < 1500  # stopped long before max_tokens


def test_non_streaming_disconnect_cancels(live):
    async def give_up():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            with pytest.raises(httpx.TimeoutException):
                req = {"prompt": "Hi", "temperature": 0, "max_tokens": 2000, "ignore_eos": True}
                await c.post("/v1/generate", json=req, timeout=0.3)

    asyncio.run(give_up())
    assert wait_until(lambda: not live.engine.scheduler.running, timeout=5)


def test_full_queue_is_429_with_retry_after(tiny_checkpoint):
    with LiveServer(tiny_settings(tiny_checkpoint, max_batch_size=1, max_queue=1)) as server:
        slow_down(server.engine)
        long = {"prompt": "Hi", "temperature": 0, "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=30) as c1, httpx.Client(base_url=server.url, timeout=30) as c2:
            with c1.stream("POST", "/v1/generate", json=long) as running:
                lines = running.iter_lines()  # keep a reference: a collected iterator closes the stream
                next(line for line in lines if line.startswith("event:"))
                with c2.stream("POST", "/v1/generate", json=long) as queued:
                    assert queued.status_code == 200
                    assert wait_until(lambda: server.engine.scheduler.num_waiting == 1)
                    r = httpx.post(server.url + "/v1/generate", json={"prompt": "x", "max_tokens": 2})
                    assert r.status_code == 429
                    assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]["message"]
                    metrics = httpx.get(server.url + "/metrics").text
                    assert metric_value(metrics, "smollm_waiting_requests") == 1
                    assert metric_value(metrics, "smollm_requests_total", 'endpoint="/v1/generate",status="429"') == 1
        assert wait_until(lambda: server.engine.idle(), timeout=5)


def test_openai_client(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert models.data[0].id == "tiny"
    fixed = {"extra_body": {"ignore_eos": True}}  # exactly max_tokens, whatever the random model says
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, **fixed)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, seed=1, **fixed
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **fixed,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True, **fixed
        )
    )
    assert streamed == done.choices[0].text
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert bad.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="smollm",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert refused.value.param == "tools" and refused.value.code == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    assert missing.value.code == "model_not_found"


def test_sse_over_the_wire_is_incremental(live):
    # curl -N sees events as they are produced: the first token arrives before the stream is complete.
    with httpx.Client(base_url=live.url, timeout=30) as c:
        req = {"prompt": "Hi", "temperature": 0, "max_tokens": 300, "stream": True, "ignore_eos": True}
        with c.stream("POST", "/v1/generate", json=req) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["index"] >= 0
            assert live.engine.scheduler.running  # still generating when the first token arrived
            rest = "\n".join(lines)
    assert "event: done" in rest
