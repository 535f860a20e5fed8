"""The HTTP API (FastAPI) over a `SearchService`: routes, bearer token, body-size limit, errors as 4xx/503.

The same app runs inside the Ray Serve router and, for a single process, under plain uvicorn.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from retriever.errors import UserError
from retriever.serving.schema import (
    EncodeRequest,
    EncodeResponse,
    ErrorResponse,
    Health,
    ModelsResponse,
    SearchRequest,
    SearchResponse,
)
from retriever.serving.service import SearchService, ServiceUnavailableError, UnknownModelError

Search = Callable[[SearchRequest], Awaitable[SearchResponse]]
_ERROR = {"model": ErrorResponse}
# What each route may answer besides 200, documented in the OpenAPI schema (FastAPI's own 422 body is replaced).
Responses = dict[int | str, dict[str, Any]]
LIMIT_ERRORS: Responses = {413: _ERROR}
AUTH_ERRORS: Responses = {401: _ERROR}
REQUEST_ERRORS: Responses = {400: _ERROR, 404: _ERROR, 422: _ERROR, 503: _ERROR}
BEARER = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


class BodyLimit:
    """ASGI middleware: a request body longer than ``max_bytes`` (declared or streamed) gets 413 before it is
    read whole."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_json(send, 413, f"request body over the limit of {self.max_bytes} bytes")
            return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing (anything else there becomes a 400).
                from fastapi import HTTPException

                raise HTTPException(413, f"request body over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


ROUTES = ("/", "/healthz", "/models", "/search", "/encode", "/docs", "/openapi.json")


class StatusCounter:
    """ASGI middleware: reports (route, status) of every response; unknown paths count as "other"."""

    def __init__(self, app: Any, on_response: Callable[[str, int], None]) -> None:
        self.app = app
        self.on_response = on_response

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope.get("path", "")
        route = route if route in ROUTES else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.on_response(route, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _message(exc: BaseException) -> str:
    """The error's own message; an error raised in a Ray replica arrives wrapped (its text is the remote traceback)
    with the original as ``cause``."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def page_html() -> str:
    return files("retriever.serving").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    service: SearchService,
    token: str | None = None,
    search: Search | None = None,
    on_response: Callable[[str, int], None] | None = None,
) -> FastAPI:
    """The API over ``service``; ``token`` (when set) is required as `Authorization: Bearer <token>` on every route
    but `/`, `/healthz` and the docs; ``search`` replaces the service's own search (the Serve router batches);
    ``on_response`` receives (route, status) of every response (request metrics)."""
    app = FastAPI(
        title="retriever",
        description="Sparse and dense retrieval with decoder-only LLM encoders: search, hybrid fusion, "
        "explanations and encoding.",
        version="1",
    )
    run_search: Search = search or service.search

    # Without a token no route checks one, and the schema names neither the bearer scheme nor a 401 (the check
    # would be a quarter of the app's own time per request).
    guarded: list[Any] = []
    guarded_errors: Responses = dict(LIMIT_ERRORS)
    if token is not None:
        expected = token.encode("utf-8")

        async def authorize(credentials: Credentials) -> None:  # async: no thread hop per request
            given = credentials.credentials if credentials is not None else ""
            # Constant-time comparison: response time must not reveal how much of the token matched.
            if not hmac.compare_digest(given.encode("utf-8"), expected):
                from fastapi import HTTPException

                reason = "missing bearer token" if credentials is None else "wrong bearer token"
                raise HTTPException(
                    401, f"{reason}; send `Authorization: Bearer <token>`", {"WWW-Authenticate": "Bearer"}
                )

        guarded = [Depends(authorize)]
        guarded_errors.update(AUTH_ERRORS)
    request_errors = {**guarded_errors, **REQUEST_ERRORS}

    @app.exception_handler(UnknownModelError)
    async def _unknown_model(request: Request, exc: UnknownModelError) -> JSONResponse:
        return JSONResponse({"detail": _message(exc)}, status_code=404)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": _message(exc)}, status_code=400)

    @app.exception_handler(ServiceUnavailableError)
    async def _unavailable(request: Request, exc: ServiceUnavailableError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html()

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", models=sorted(service.models))

    @app.get("/models", response_model=ModelsResponse, dependencies=guarded, responses=guarded_errors)
    async def models() -> ModelsResponse:
        return ModelsResponse(models=service.catalog())

    @app.post(
        "/search",
        response_model=SearchResponse,
        response_model_exclude_none=True,
        dependencies=guarded,
        responses=request_errors,
    )
    async def search_route(request: SearchRequest) -> SearchResponse:
        started = time.perf_counter()
        response = await run_search(request)
        response.took_ms = round((time.perf_counter() - started) * 1000, 3)
        return response

    @app.post(
        "/encode",
        response_model=EncodeResponse,
        response_model_exclude_none=True,
        dependencies=guarded,
        responses=request_errors,
    )
    async def encode_route(request: EncodeRequest) -> EncodeResponse:
        return await service.encode(request)

    app.add_middleware(BodyLimit, max_bytes=service.settings.limits.max_body_bytes)
    if on_response is not None:
        app.add_middleware(StatusCounter, on_response=on_response)  # added last: outermost, sees the 413s too
    return app
