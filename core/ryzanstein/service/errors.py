"""Map errors to OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ryzanstein.errors import RyzansteinError

log = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes user input holding a lone surrogate (valid in
    JSON, not in UTF-8) still encodes instead of failing inside the error handler."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, first_param = [], None
    for error in exc.errors():
        location = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx", {}).get("error", "")
            return f"The request body is not valid JSON: {ctx}".strip(), None
        if not location and error.get("type") in {"model_attributes_type", "dict_type", "missing"}:
            return ("The request body must be a JSON object; send it with 'Content-Type: application/json'.",
                    None)
        param = ".".join(location) or None
        first_param = first_param or param
        value = error.get("input")
        shown = f" (got {value!r})" if param and not isinstance(value, dict | list) else ""
        problems.append(f"{param or 'body'}: {error.get('msg', 'invalid')}{shown}")
    return "Invalid request: " + "; ".join(problems), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RyzansteinError)
    async def _core_error(request: Request, exc: RyzansteinError) -> JSONResponse:
        body = error_body(exc.message, exc.error_type, exc.param, exc.code)
        lines = getattr(exc, "errors", None)  # a dataset's bad lines
        if lines:
            body["error"]["lines"] = [{"line": e.line, "reason": e.reason} for e in lines]
        files = getattr(exc, "files", None)  # code a model would run: what the approval dialog shows
        if files is not None:
            body["error"]["files"] = files
        retry_after = getattr(exc, "retry_after", None)  # 429 and 503 from a full or slow queue say when
        return ErrorResponse(body, exc.status_code,
                             headers={"Retry-After": str(retry_after)} if retry_after else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return ErrorResponse(error_body(message, "invalid_request_error", param, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405) and request.url.path.startswith("/v1/"):  # OpenAI's own wording
            return ErrorResponse(error_body(
                f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos, or "
                "see docs/api.md for the routes this server offers.", "invalid_request_error", None,
                "unknown_url"), 404, headers=exc.headers)
        error_type = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return ErrorResponse(error_body(str(exc.detail), error_type), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return ErrorResponse(error_body(f"Internal error: {type(exc).__name__}: {exc}", "server_error"), 500)
