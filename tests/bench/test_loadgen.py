from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bench.loadgen import LoadConfig, RequestResult, iter_sse, percentile, run_load_sync, summarize


@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 100])
def test_percentile_matches_numpy(q):
    values = [3.0, 1.0, 7.5, 2.0, 10.0, 4.0, 4.0]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edge_cases():
    assert percentile([], 50) is None
    assert percentile([2.5], 95) == 2.5
    with pytest.raises(ValueError, match="percentile q"):
        percentile([1.0], 101)


def test_summarize_pools_requests():
    ok = RequestResult(start=0.0, end=1.0, token_times=[0.2, 0.3, 0.5], usage_tokens=3, finish_reason="length")
    short = RequestResult(start=1.0, end=1.5, token_times=[1.4], usage_tokens=1, finish_reason="stop")
    failed = RequestResult(start=0.0, end=0.1, error="HTTP 429: busy")
    cut = RequestResult(start=0.0, end=2.0, token_times=[0.1, 0.2], cut_off=True)
    s = summarize([ok, short, failed, cut], wall_s=2.0, concurrency=2)
    assert (s.requests, s.completed, s.errors, s.cut_off) == (4, 2, 1, 1)
    assert s.completion_tokens == 3 + 1 + 0 + 2  # tokens of a cut-off request count, it did produce them
    assert s.tokens_per_s == pytest.approx(3.0)
    assert s.ttft_p50_ms == pytest.approx(np.percentile([200, 400, 100], 50))
    assert s.itl_p50_ms == pytest.approx(np.percentile([100, 200, 100], 50))
    assert s.mean_tokens_per_request == pytest.approx(2.0)
    assert s.finish_reasons == {"length": 1, "stop": 1}
    assert s.error_samples == ["HTTP 429: busy"]


def test_usage_overrides_counted_events():
    # A server may hold back a token's text (incomplete UTF-8) and send fewer events than tokens.
    r = RequestResult(start=0.0, token_times=[0.1, 0.2], usage_tokens=3)
    assert r.completion_tokens == 3
    assert RequestResult(start=0.0, token_times=[0.1, 0.2]).completion_tokens == 2


def test_iter_sse_parses_events_comments_and_multiline_data():
    async def lines():
        for line in [": ping", "event: token", 'data: {"a":', "data: 1}", "", "data: x", "", "", "data:tail"]:
            yield line

    async def collect():
        return [e async for e in iter_sse(lines())]

    assert asyncio.run(collect()) == [("token", '{"a":\n1}'), ("message", "x"), ("message", "tail")]


@pytest.mark.parametrize("url", ["http://example.com:8000", "https://127.0.0.1:1", "http://10.0.0.1:80"])
def test_only_local_urls(url):
    with pytest.raises(ValueError, match="base_url"):
        LoadConfig(base_url=url)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="concurrency"):
        LoadConfig(base_url="http://127.0.0.1:1", concurrency=0)
    with pytest.raises(ValueError, match="max_tokens"):
        LoadConfig(base_url="http://127.0.0.1:1", max_tokens=0)
    assert LoadConfig(base_url="http://127.0.0.1:1", concurrency=16).total_requests == 16
    assert LoadConfig(base_url="http://127.0.0.1:1", concurrency=1).total_requests == 4


@pytest.mark.parametrize("api", ["smollm", "openai"])
def test_measures_the_fake_servers_timing(fake_server, api):
    n_tokens, concurrency, requests = 10, 4, 8
    cfg = LoadConfig(
        base_url=fake_server.url,
        api=api,
        concurrency=concurrency,
        requests=requests,
        max_tokens=n_tokens,
        prompts=("normal",),
    )
    fake_server.reset_peak()
    s = run_load_sync(cfg)
    assert (s.requests, s.completed, s.errors) == (requests, requests, 0)
    assert s.completion_tokens == requests * n_tokens
    assert s.finish_reasons == {"length": requests}
    # 4 requests at a time, never more: what the server saw (a loaded machine stretches the wall time below).
    assert fake_server.peak_in_flight == concurrency
    ttft, itl = fake_server.ttft_s, fake_server.itl_s
    one_request = ttft + (n_tokens - 1) * itl
    # Two rounds of 4 concurrent requests: at least two requests' worth of wall time, tokens/s to match.
    assert 2 * one_request * 0.9 <= s.wall_s
    assert s.tokens_per_s == pytest.approx(s.completion_tokens / s.wall_s)
    assert ttft * 1000 * 0.9 <= s.ttft_p50_ms <= ttft * 1000 * 3
    assert itl * 1000 * 0.8 <= s.itl_p50_ms <= itl * 1000 * 3
    assert s.ttft_p95_ms >= s.ttft_p50_ms and s.itl_p95_ms >= s.itl_p50_ms


@pytest.mark.parametrize("api", ["smollm", "openai"])
def test_counts_failures_without_raising(fake_server, api):
    prompts = ("status-429", "error-event", "cut", "short")
    s = run_load_sync(
        LoadConfig(base_url=fake_server.url, api=api, concurrency=2, requests=4, max_tokens=8, prompts=prompts)
    )
    assert (s.requests, s.errors, s.completed) == (4, 3, 1)
    assert s.finish_reasons == {"stop": 1}
    assert any(e.startswith("HTTP 429") for e in s.error_samples)
    assert any("error" in e for e in s.error_samples if not e.startswith("HTTP"))
    assert any("stream ended" in e for e in s.error_samples)
    assert s.mean_tokens_per_request == 3


def test_time_limit_bounds_the_run(fake_server):
    # Each request takes ~0.05 + 199 * 0.01 s ≈ 2 s; the limit cuts it off and no further request starts.
    cfg = LoadConfig(
        base_url=fake_server.url, concurrency=2, requests=10, max_tokens=200, prompts=("normal",), time_limit=0.5
    )
    t0 = time.perf_counter()
    s = run_load_sync(cfg)
    assert time.perf_counter() - t0 < 1.5
    assert s.requests == 2 and s.cut_off == 2 and s.errors == 0
    assert 0 < s.completion_tokens < 2 * 200


def test_unreachable_server_is_an_error(fake_server):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = run_load_sync(LoadConfig(base_url=f"http://127.0.0.1:{port}", requests=1, request_timeout=5))
    assert s.errors == 1 and s.completion_tokens == 0 and "ConnectError" in s.error_samples[0]


@pytest.mark.parametrize("api", ["smollm", "openai"])
def test_distinct_prompts_share_no_beginning_and_the_fixed_ones_repeat(fake_server, api):
    def sent(distinct: bool) -> list[str]:
        cfg = LoadConfig(
            base_url=fake_server.url,
            api=api,
            concurrency=4,
            requests=6,
            max_tokens=2,
            prompts=("normal", "normal too"),
            distinct_prompts=distinct,
        )
        fake_server.prompts_seen.clear()
        assert run_load_sync(cfg).completed == 6
        return sorted(fake_server.prompts_seen)

    assert sent(False) == ["normal"] * 3 + ["normal too"] * 3
    labelled = sent(True)
    assert labelled == sorted(f"Request 4.{i + 1}: {('normal', 'normal too')[i % 2]}" for i in range(6))
    assert len({p.split(":")[0] for p in labelled}) == 6  # each begins with its own label
