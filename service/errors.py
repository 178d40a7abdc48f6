"""The one error format: every error the server writes, from a route, a validation failure or a middleware, goes
through `error_body`, so clients see one shape whatever layer refused them."""

from __future__ import annotations

import json
import math

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error answer with a status, a message and the request field at fault (`param`), raised anywhere below a
    route and written by the app's handler."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers=None, detail=None) -> JSONResponse:
    body = error_body(status, message, param)
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


async def send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer with an error from ASGI middleware, before any route has run."""
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def json_safe(value):
    """`value` with what strict JSON cannot carry made printable: non-finite floats (NaN, Infinity, 1e400) and
    strings UTF-8 cannot encode (lone surrogates) become strings, so echoing a rejected input never fails."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    messages, params = [], []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        field = "body" if e.get("type") == "json_invalid" else (".".join(loc) or "body")
        params.append(field)
        messages.append(f"{field}: {e.get('msg', 'invalid')}")
    return error_response(
        422, "; ".join(messages), params[0] if params else None, detail=json_safe(jsonable_encoder(errors))
    )


async def http_handler(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(HTTPException, http_handler)
    app.add_exception_handler(StarletteHTTPException, http_handler)
