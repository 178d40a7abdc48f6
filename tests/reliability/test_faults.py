"""Server faults: clients that vanish mid-stream, SIGTERM with streams in flight, a request timeout, and hot
reload under load while checkpoints (some of them broken) appear in the watched directory."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.harness import (
    REPO,
    StreamResult,
    check_generate_stream,
    check_openai_stream,
    clean_env,
    gauges_idle,
    parse_metrics,
    stream_request,
    trainer_cmd,
    wait_idle,
)
from trainer.checkpointing import write_latest

LONG = {"prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}


async def _vanishing_client(client: httpx.AsyncClient, rng: random.Random) -> str:
    """One client that hangs up at a random point; returns how it left."""
    plan = rng.choice(["before_answer", "after_events", "after_time"])
    if plan == "before_answer":
        # Cancelled while the request is being sent or is waiting for its answer (maybe still queued).
        try:
            await asyncio.wait_for(stream_request(client, "/v1/generate", LONG), rng.uniform(0.0, 0.3))
        except TimeoutError:
            return plan
        return "finished"  # never expected: 1500 tokens take seconds
    if plan == "after_events":
        r = await stream_request(client, "/v1/generate", LONG, max_events=rng.randint(1, 40))
        return plan if r.status == 200 and r.error is None else f"failed {r.status} {r.error}"
    try:
        await asyncio.wait_for(stream_request(client, "/v1/generate", LONG), rng.uniform(0.05, 1.5))
    except TimeoutError:
        return plan
    return "finished"


def test_200_clients_disconnecting_at_random_points(tiny_checkpoint, start_server, figures):
    clients = 200
    server = start_server(tiny_checkpoint, max_batch_size=8, max_queue=256)
    before = server.metrics()
    rng = random.Random(1234)

    async def run():
        limits = httpx.Limits(max_connections=clients + 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            return await asyncio.wait_for(asyncio.gather(*(_vanishing_client(c, rng) for _ in range(clients))), 120)

    start = time.monotonic()
    how = asyncio.run(run())
    after = wait_idle(server, timeout=20)
    # The server answers normally afterwards.
    normal = asyncio.run(_one_stream(server.url, {"prompt": "Hi", "max_tokens": 20, "temperature": 0, "stream": True}))
    cancelled = after["smollm_requests_cancelled_total"] - before["smollm_requests_cancelled_total"]
    log = server.log()
    figures.update(
        clients=clients,
        seconds=round(time.monotonic() - start, 1),
        ways_of_leaving={k: how.count(k) for k in sorted(set(how))},
        cancelled_counted=cancelled,
        running_after=after["smollm_running_sequences"],
        waiting_after=after["smollm_waiting_requests"],
        leaked_slots=after["smollm_kv_cache_slots_used"],
        kv_tokens_used_after=after["smollm_kv_cache_tokens_used"],
        tracebacks_in_log=log.count("Traceback"),
        rss_mib_after=round(server.rss_kib() / 1024, 1),
    )
    assert all(h in ("before_answer", "after_events", "after_time") for h in how), figures["ways_of_leaving"]
    assert gauges_idle(after), after
    assert after["smollm_kv_cache_tokens_used"] == 0
    # Every client that reached the engine was cancelled (none could finish 1500 tokens); those that read
    # events certainly had.
    assert how.count("after_events") <= cancelled <= clients
    assert check_generate_stream(normal, count_tokens=False) is None, normal.events[-3:]
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]


async def _one_stream(url: str, payload: dict, path: str = "/v1/generate") -> StreamResult:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return await stream_request(c, path, payload)


def test_sigterm_drains_streams_in_flight_and_exits_0(tiny_checkpoint, start_server, figures):
    streams = 6
    server = start_server(tiny_checkpoint, max_batch_size=8, shutdown_grace=60)
    payload = {**LONG, "max_tokens": 1200}

    async def run():
        async with httpx.AsyncClient(
            base_url=server.url, timeout=90, limits=httpx.Limits(max_connections=streams + 8)
        ) as c:
            tasks = [asyncio.ensure_future(stream_request(c, "/v1/generate", payload)) for _ in range(streams)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until every stream holds a slot and tokens flow
                m = parse_metrics((await c.get("/metrics")).text)
                if m["smollm_running_sequences"] == streams and m["smollm_generation_tokens_total"] > streams:
                    break
                await asyncio.sleep(0.02)
            sigterm_at = time.monotonic()
            server.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            ready = await c.get("/readyz")
            refused = await c.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 2})
            still_running = sum(not t.done() for t in tasks)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
            return sigterm_at, ready.status_code, refused.status_code, still_running, results

    sigterm_at, ready_status, refused_status, still_running, results = asyncio.run(run())
    code = server.wait(60)
    exit_after = time.monotonic() - sigterm_at
    problems = [check_generate_stream(r) for r in results]
    figures.update(
        streams=streams,
        readyz_after_sigterm=ready_status,
        new_request_after_sigterm=refused_status,
        streams_in_flight_at_check=still_running,
        streams_completed=sum(p is None for p in problems),
        tokens_per_stream=[r.done["usage"]["completion_tokens"] if r.done else None for r in results],
        exit_code=code,
        seconds_sigterm_to_exit=round(exit_after, 2),
    )
    assert still_running == streams  # the readiness check really happened with streams in flight
    assert ready_status == 503
    assert refused_status == 503
    assert problems == [None] * streams
    assert all(r.done["finish_reason"] == "length" and r.done["usage"]["completion_tokens"] == 1200 for r in results)
    assert code == 0, server.log()[-3000:]


def test_sigterm_grace_expiry_ends_streams_with_an_event_not_a_cut(tiny_checkpoint, start_server, figures):
    # Streams longer than SHUTDOWN_GRACE: the server stops them when the grace ends, but each client must
    # still learn why (an `error` or `done` event), never see its stream cut mid-body.
    grace, streams = 0.5, 3
    server = start_server(tiny_checkpoint, max_batch_size=4, shutdown_grace=grace)
    payload = {**LONG, "max_tokens": 2000}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            tasks = [asyncio.ensure_future(stream_request(c, "/v1/generate", payload)) for _ in range(streams)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                m = parse_metrics((await c.get("/metrics")).text)
                if m["smollm_running_sequences"] == streams:
                    break
                await asyncio.sleep(0.02)
            server.signal(signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    results = asyncio.run(run())
    code = server.wait(30)
    figures.update(
        shutdown_grace_s=grace,
        streams=streams,
        exit_code=code,
        last_events=[r.events[-1][0] if r.events else None for r in results],
        transport_errors=[r.error for r in results if r.error],
        tokens_received=[len(r.token_events) for r in results],
    )
    assert code == 0
    for r in results:
        assert r.error is None, f"stream cut without an event: {r.error}; last events {r.events[-2:]}"
        assert r.events and r.events[-1][0] in ("error", "done"), r.events[-2:]


def test_request_timeout_ends_a_long_sequence_and_frees_its_slot(tiny_checkpoint, start_server, figures):
    timeout = 0.3  # far shorter than 2000 tokens take, even on a machine several times faster
    server = start_server(tiny_checkpoint, max_batch_size=2, request_timeout=timeout)
    payload = {**LONG, "max_tokens": 2000}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            start = time.monotonic()
            # Two streams hold both slots; a third request (not streamed) waits in the queue. Deadlines count
            # from arrival, so all three end with finish_reason "timeout" at about the same time.
            streamed = [stream_request(c, "/v1/generate", payload) for _ in range(2)]
            queued = c.post("/v1/generate", json={**payload, "stream": False})
            *streams, plain = await asyncio.wait_for(asyncio.gather(*streamed, queued), 60)
            return streams, plain, time.monotonic() - start

    streams, plain, elapsed = asyncio.run(run())
    after = wait_idle(server, timeout=10)
    normal = asyncio.run(_one_stream(server.url, {"prompt": "Hi", "max_tokens": 8, "stream": True}))
    figures.update(
        request_timeout_s=timeout,
        seconds_until_all_answered=round(elapsed, 2),
        stream_finish=[r.done["finish_reason"] if r.done else r.events[-1:] for r in streams],
        stream_tokens=[r.done["usage"]["completion_tokens"] if r.done else None for r in streams],
        queued_status=plain.status_code,
        queued_body=plain.text[:300],
        leaked_slots=after["smollm_kv_cache_slots_used"],
    )
    # A request cut short after its first tokens ends with finish_reason "timeout"; one that timed out in the
    # queue before any token is an error (an `error` event with status 504, or a 504), never an empty answer.
    queued = 0
    for r in streams:
        assert r.status == 200, r.events[-3:]
        if r.done is not None:
            assert r.done["finish_reason"] == "timeout"
            assert 0 < r.done["usage"]["completion_tokens"] < 2000
        else:
            errors = [json.loads(d) for e, d in r.events if e == "error"]
            assert errors and errors[-1]["status"] == 504, r.events[-3:]
            queued += 1
    if plain.status_code == 200:
        assert plain.json()["finish_reason"] == "timeout" and plain.json()["usage"]["completion_tokens"] > 0
    else:
        assert plain.status_code == 504 and "before its first token" in plain.json()["error"]["message"], plain.text
        queued += 1
    # Two slots for three requests: at least one ran and was cut short.
    assert queued < 3
    assert elapsed < timeout + 5
    assert gauges_idle(after), after
    assert check_generate_stream(normal, count_tokens=False) is None, normal.events[-3:]


# ---------------------------------------------------------------- hot reload


def _publish(out: Path, step: int, save_tiny, corrupt: str | None = None) -> str:
    """Write OUT/step-NNNNNN atomically and point `latest` at it; `corrupt` breaks it before it appears,
    while it stays complete-looking (every file present)."""
    name = f"step-{step:06d}"
    staging = save_tiny(out / f".{name}.staging", seed=step)
    if corrupt == "truncated_weights":
        weights = staging / "model.safetensors"
        size = weights.stat().st_size
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    elif corrupt == "bad_config":
        (staging / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    os.rename(staging, out / name)
    write_latest(out, name)  # exactly as the trainer updates it
    return name


def test_hot_reload_under_load_skips_broken_checkpoints(tmp_path, save_tiny, start_server, figures):
    out = tmp_path / "run"
    out.mkdir()
    _publish(out, 1, save_tiny)
    server = start_server(out, reload_interval=0.2, max_batch_size=4)
    workers = 6
    stop = asyncio.Event()
    outcomes: list[str | None] = []

    async def run() -> dict:
        seen: dict = {}
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=workers + 8)
        ) as c:
            load = [asyncio.ensure_future(_load_worker(c, i, stop, outcomes)) for i in range(workers)]
            try:
                await asyncio.sleep(1.0)
                for step in (2, 3):
                    await asyncio.to_thread(_publish, out, step, save_tiny)
                    seen[f"step_{step}_served"] = await wait_for(lambda s=step: _is(served_step(c), str(s)))
                for step, corrupt in ((4, "truncated_weights"), (5, "bad_config")):
                    name = await asyncio.to_thread(_publish, out, step, save_tiny, corrupt)
                    seen[f"step_{step}_skip_logged"] = await wait_for(
                        lambda n=name: _async(bool(re.search(rf"skip\w*.*{n}|{n}.*skip", server.log())))
                    )
                    await asyncio.sleep(0.5)  # a few more polls: the broken one must stay skipped
                    seen[f"served_after_step_{step}"] = await served_step(c)
                await asyncio.to_thread(_publish, out, 6, save_tiny)
                seen["step_6_served"] = await wait_for(lambda: _is(served_step(c), "6"))
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*load), 60)
            seen["model_info"] = [
                k for k in parse_metrics((await c.get("/metrics")).text) if k.startswith("smollm_model_info")
            ]
        return seen

    seen = asyncio.run(run())
    failures = [o for o in outcomes if o is not None]
    skip_lines = [line for line in server.log().splitlines() if "skip" in line.lower()]
    figures.update(
        requests=len(outcomes),
        failed_requests=len(failures),
        failure_samples=failures[:5],
        checkpoints_published=6,
        broken=["step-000004 (truncated weights)", "step-000005 (bad config)"],
        skip_log_lines=skip_lines,
        **{k: v for k, v in seen.items() if k != "model_info"},
        model_info_after=seen["model_info"],
    )
    assert failures == []
    assert len(outcomes) >= 20
    assert seen["step_2_served"] and seen["step_3_served"], seen
    assert seen["step_4_skip_logged"] and seen["step_5_skip_logged"], server.log()[-3000:]
    assert seen["served_after_step_4"] == "3" and seen["served_after_step_5"] == "3"
    assert seen["step_6_served"], seen
    assert any('step="6"' in k for k in seen["model_info"]), seen["model_info"]
    shutil.rmtree(out, ignore_errors=True)


async def _load_worker(
    c: httpx.AsyncClient, i: int, stop: asyncio.Event, outcomes: list, max_requests: int = 400
) -> None:
    """Streaming requests one after another (/v1/generate and chat in turn) until `stop`; appends what was
    wrong with each (None when fine). Token counts are checked in test_load; here a failure is a refusal,
    an error event or a stream cut before its end."""
    for n in range(max_requests):
        if stop.is_set():
            return
        if (i + n) % 2:
            r = await stream_request(
                c, "/v1/generate", {"prompt": f"Tell me {n}", "max_tokens": 24, "stream": True, "seed": n}
            )
            outcomes.append(check_generate_stream(r, count_tokens=False))
        else:
            r = await stream_request(
                c,
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": f"Hi {n}"}],
                    "max_tokens": 24,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
            outcomes.append(check_openai_stream(r, count_tokens=False))


async def served_step(c: httpx.AsyncClient) -> str:
    return (await c.get("/readyz")).json().get("step", "")


async def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def _is(coro, expected: str) -> bool:
    return (await coro) == expected


async def _async(value: bool) -> bool:
    return value


@pytest.mark.long
def test_hot_reload_while_the_trainer_writes_checkpoints(tmp_path, start_server, figures):
    # The real trainer writes into the watched directory (keeping only the newest checkpoint, so the server
    # may find one deleted under it) while clients stream.
    out = tmp_path / "run"
    overrides = ["checkpoint_every=2", "keep_last=1"]
    first = subprocess.run(
        trainer_cmd(out, "max_steps=2", *overrides),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    server = start_server(out, reload_interval=0.2, max_batch_size=4)
    workers, final_step = 4, 8
    stop = asyncio.Event()
    outcomes: list[str | None] = []

    async def run() -> tuple[subprocess.CompletedProcess, list[str], bool]:
        steps_seen: list[str] = []
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=workers + 8)
        ) as c:
            load = [asyncio.ensure_future(_load_worker(c, i, stop, outcomes)) for i in range(workers)]
            try:
                training = asyncio.ensure_future(
                    asyncio.to_thread(
                        subprocess.run,
                        trainer_cmd(out, f"max_steps={final_step}", *overrides),
                        cwd=REPO,
                        env=clean_env(),
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                )
                while not training.done():
                    step = await served_step(c)
                    if not steps_seen or steps_seen[-1] != step:
                        steps_seen.append(step)
                    await asyncio.sleep(0.05)
                trained = await training
                final = await wait_for(lambda: _is(served_step(c), str(final_step)))
                steps_seen.append(await served_step(c))
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*load), 60)
        return trained, steps_seen, final

    trained, steps_seen, final = asyncio.run(run())
    failures = [o for o in outcomes if o is not None]
    figures.update(
        requests=len(outcomes),
        failed_requests=len(failures),
        failure_samples=failures[:5],
        trainer_exit=trained.returncode,
        served_steps_in_order=list(dict.fromkeys(steps_seen)),
        final_step_served=final,
        reload_log_lines=[line for line in server.log().splitlines() if "now serving" in line or "skipping" in line],
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert failures == []
    assert len(outcomes) >= 10
    assert final, steps_seen
