"""Every error in OpenAI's shape (``engine.serve.openai.ApiError``), and the server keeps serving.

FastAPI's and Starlette's own handlers (422 validation bodies, HTML 404/405, plain-text 500s)
are replaced; an exception no route turned into an ``ApiError`` is a generic 500, logged by
type with a scrubbed message (no traceback: it names files; no local paths).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.serve.openai import ApiError, scrub

log = logging.getLogger("engine.serve")


def guard(app: FastAPI) -> None:
    """Install the handlers and the middleware below on ``app``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif e.status_code == 405:
            err = ApiError(405, f"Method {request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
        else:
            err = ApiError(e.status_code, str(e.detail))
        return JSONResponse(err.body(), status_code=err.status, headers=dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        err = ApiError(400, f"Invalid request: {first.get('msg', 'bad value')}.", param=param, code="invalid_value")
        return JSONResponse(err.body(), status_code=400)

    app.add_middleware(_Guard)


def internal(e: BaseException) -> ApiError:
    """The generic 500 for an unexpected exception, logged by type and a scrubbed message."""
    log.error("internal error: %s: %s", type(e).__name__, scrub(str(e))[:500])
    return ApiError(500, "The server had an error while processing your request.", type="server_error", code="internal_error")


class _Guard:
    """Any exception a route did not turn into an ApiError: a generic 500 in OpenAI's shape;
    a client that went away is logged at INFO (it is no server error).

    Pure ASGI, inside Starlette's ServerErrorMiddleware: that one would answer with plain text
    and re-raise into uvicorn's traceback log.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:  # the client went away (mid-body or mid-response): nobody to answer
            log.info("client went away: %s %s", scope.get("method"), scope.get("path"))
        except Exception as e:
            err = internal(e)
            if not started:
                await JSONResponse(err.body(), status_code=500)(scope, receive, send)
