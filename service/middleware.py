"""Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass straight through):
request counting, API-key auth and the body-size limit."""

from __future__ import annotations

import asyncio
import hmac
import time

from service.errors import send_error
from service.metrics import Metrics

OPEN_PATHS = frozenset(
    {
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        "/redoc",
        "/favicon.ico",
    }
)
GENERATION_PATHS = frozenset({"/v1/generate", "/v1/completions", "/v1/chat/completions"})
KNOWN_ENDPOINTS = GENERATION_PATHS | {"/v1/models", "/tokenize", "/detokenize"} | OPEN_PATHS


class InFlight:
    """Generation requests whose response has not been sent to the end yet. SIGTERM's drain waits for zero before
    uvicorn closes connections, so no stream loses its last events."""

    def __init__(self) -> None:
        self.count = 0  # changed on the event loop only; read from the drain thread

    def wait_zero(self, timeout: float, interval: float = 0.01) -> bool:
        """Block (in a thread other than the event loop's) until no response is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.count > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True


class MetricsMiddleware:
    """Counts every HTTP response as smollm_requests_total{endpoint, status}, and generation responses still being
    sent in `in_flight`."""

    def __init__(self, app, metrics: Metrics, in_flight: InFlight) -> None:
        self.app = app
        self.metrics = metrics
        self.in_flight = in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        generation = path in GENERATION_PATHS
        if generation:
            self.in_flight.count += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            if generation:
                self.in_flight.count -= 1
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


class AuthMiddleware:
    """With an API key set, every path but health, metrics, docs and the playground needs
    `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110 11.1); the key is compared in constant time.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
            return await send_error(
                scope,
                send,
                401,
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                {"WWW-Authenticate": "Bearer"},
            )
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over the limit, judged by Content-Length and by the bytes actually received (a chunked
    or lying client cannot get past it); 408 for a body not received within `read_timeout` seconds (a slowloris
    client trickling bytes holds no task and socket for longer). Bodies are small, so they are buffered and
    replayed to the app."""

    def __init__(self, app, max_bytes: int, read_timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"request body over {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_error(scope, send, 400, "invalid Content-Length header")
            if declared > self.max_bytes:
                return await send_error(scope, send, 413, too_big)
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.read_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                message = f"request body not received within {self.read_timeout:g} s"
                return await send_error(scope, send, 408, message, {"Connection": "close"})
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(scope, send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
