"""The one error format: every error the server writes, from a route, a validation failure or a middleware, goes
through `error_body`, so clients see one shape whatever layer refused them.

`/v1/generate` and the other native routes answer `{"error": {"message", "type", "param", "code": STATUS}}` with
422 for a bad field. The OpenAI routes answer as OpenAI does: 400 for a bad field, `type` by status and a string
`code` (`unsupported_parameter`, `model_not_found`, ...), so OpenAI clients raise their usual exceptions."""

from __future__ import annotations

import json
import math

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# /tokenize and /detokenize answer in OpenAI's error shape too, as vLLM's do.
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"})

# OpenAI's error `type` by HTTP status; anything else at or above 500 is a server_error.
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
# The `code` an OpenAI-route error carries when the raiser named none.
OPENAI_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    404: "not_found",
    408: "timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error answer with a status, a message, the request field at fault (`param`) and, for the OpenAI routes,
    a string `code`; raised anywhere below a route and written by the app's handler."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers
        self.code = code


def is_openai(path: str) -> bool:
    return path in OPENAI_PATHS


def error_body(
    status: int, message: str, param: str | None = None, *, openai: bool = False, code: str | None = None
) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`: on the OpenAI routes `type` follows the status and `code`
    is a string; elsewhere `type` is invalid_request_error and `code` the status."""
    if not openai:
        return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": status}}
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code or OPENAI_CODES.get(status, str(status)),
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    headers=None,
    detail=None,
    *,
    openai: bool = False,
    code: str | None = None,
) -> JSONResponse:
    body = error_body(status, message, param, openai=openai, code=code)
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


async def send_error(scope, send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer with an error from ASGI middleware, before any route has run."""
    body = json.dumps(error_body(status, message, openai=is_openai(scope["path"]))).encode()
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
    detail = json_safe(jsonable_encoder(errors))
    param = params[0] if params else None
    if is_openai(request.url.path):
        kind = str(errors[0].get("type")) if errors else ""
        code = {"missing": "missing_required_parameter", "json_invalid": "invalid_json"}.get(kind, "invalid_value")
        return error_response(400, "; ".join(messages), param, detail=detail, openai=True, code=code)
    return error_response(422, "; ".join(messages), param, detail=detail)


async def http_handler(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(
        exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None), openai=is_openai(request.url.path)
    )


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, exc.param, headers=exc.headers, openai=is_openai(request.url.path), code=exc.code
    )


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler as taking any Exception; each of these is only ever called with its own class.
    app.add_exception_handler(ApiError, api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_handler)  # type: ignore[arg-type]
