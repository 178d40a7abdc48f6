"""Prometheus metrics. The engine fills plain stats dataclasses once per step; this module turns them into
`smollm_*` metrics, so no Prometheus call sits in the model's hot path. One registry per app, so tests can
build several apps in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.engine.loop import Engine, ModelInfo, StepStats
from service.engine.sequence import FinishReason
from service.schemas import ServingInfo

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_FAST_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
# smollm_model_info's precision labels: the fields of /v1/models' `smollm` object, one list for both.
_PRECISION_LABELS = tuple(ServingInfo.model_fields)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "smollm_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("smollm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("smollm_generation_tokens", "Tokens generated", registry=r)
        # hit / query is the prefix cache's hit rate (vLLM's prefix_cache_hits / prefix_cache_queries).
        self.prefix_hit_tokens = Counter(
            "smollm_prefix_cache_hit_tokens",
            "Prompt tokens whose KV was reused from a free slot or copied from a running request's",
            registry=r,
        )
        self.prefix_query_tokens = Counter(
            "smollm_prefix_cache_query_tokens",
            "Prompt tokens of admitted requests (looked up in the prefix cache)",
            registry=r,
        )
        self.cancelled = Counter("smollm_requests_cancelled", "Requests cancelled by the client", registry=r)
        self.finished = Counter(
            "smollm_request_finish",
            "Requests ended, by finish reason (stop, length, timeout, cancelled, error, ...)",
            ["reason"],
            registry=r,
        )
        self.latency = Histogram(
            "smollm_request_latency_seconds",
            "Generation request latency, arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "smollm_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "smollm_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "smollm_queue_wait_seconds", "Time waiting for a KV cache slot", buckets=_FAST_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "smollm_batch_size", "Sequences per engine step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.running = Gauge("smollm_running_sequences", "Sequences holding a KV cache slot", registry=r)
        self.waiting = Gauge("smollm_waiting_requests", "Requests waiting for a slot", registry=r)
        self.slots_used = Gauge("smollm_kv_cache_slots_used", "KV cache slots in use", registry=r)
        self.slots_total = Gauge("smollm_kv_cache_slots_total", "KV cache slots", registry=r)
        self.tokens_used = Gauge("smollm_kv_cache_tokens_used", "KV cache positions in use", registry=r)
        self.tokens_total = Gauge("smollm_kv_cache_tokens_total", "KV cache positions", registry=r)
        # The checkpoint label is the full path: metrics are for operators (the public /v1/models shows the name).
        self.model_info = Gauge(
            "smollm_model_info",
            "The served checkpoint and how it computes",
            ["checkpoint", "step", *_PRECISION_LABELS],
            registry=r,
        )
        self.precision: dict[str, str] = dict.fromkeys(_PRECISION_LABELS, "")
        self.reload_failures = Counter(
            "smollm_reload_failures", "Checkpoints not swapped in, by reason", ["reason"], registry=r
        )

    def bind(self, engine: Engine, precision: dict[str, str] | None = None) -> None:
        """Follow `engine`: per-step observations, gauges read at scrape time, model info (with `precision`'s
        dtype, device, quant, kv_cache_dtype, cpu_isa and linear_kernels labels) on every swap."""
        self.precision.update(precision or {})
        engine.on_step.append(self.observe_step)
        engine.on_swap.append(self.set_model)
        engine.on_reload_failed.append(lambda reason, _message: self.reload_failures.labels(reason=reason).inc())
        self.running.set_function(lambda: len(engine.scheduler.running))
        self.waiting.set_function(lambda: engine.scheduler.num_waiting)
        self.slots_used.set_function(lambda: engine.cache_manager.usage().slots_used)
        self.slots_total.set_function(lambda: engine.cache_manager.max_slots)
        self.tokens_used.set_function(lambda: engine.cache_manager.usage().tokens_used)
        self.tokens_total.set_function(lambda: engine.cache_manager.usage().tokens_total)
        self.set_model(engine.info)

    def set_model(self, info: ModelInfo) -> None:
        self.model_info.clear()
        self.model_info.labels(checkpoint=info.checkpoint, step=info.step, **self.precision).set(1)

    def observe_step(self, s: StepStats) -> None:
        if s.batch_size:
            self.batch_size.observe(s.batch_size)
        if s.prompt_tokens:
            self.prompt_tokens.inc(s.prompt_tokens)
        if s.generation_tokens:
            self.generation_tokens.inc(s.generation_tokens)
        if s.prefix_query_tokens:
            self.prefix_query_tokens.inc(s.prefix_query_tokens)
            self.prefix_hit_tokens.inc(s.prefix_hit_tokens)
        for v in s.queue_waits:
            self.queue_wait.observe(v)
        for v in s.ttfts:
            self.ttft.observe(v)
        for v in s.inter_token:
            self.itl.observe(v)
        for seq in s.finished:
            self.finished.labels(reason=str(seq.finish_reason)).inc()
            if seq.finish_reason is FinishReason.CANCELLED:
                self.cancelled.inc()
            elif seq.finished_time is not None:
                self.latency.observe(seq.finished_time - seq.arrival_time)
