"""The HTTP API for IDE plugins (FastAPI).

    POST /search   {"query": "...", "k": 10, "path": "src/**/*.py", "language": "python"}
                   -> {"hits": [{"path", "start_line", "end_line", "symbol", "kind", "language",
                                 "snippet", "score"}], "snapshot": "...", "took_ms": ...}
    POST /reindex  {"full": false, "wait": false} -> re-index the repository (changed files only)
    GET  /health   status, index size, reindex state (no authentication)
    GET  /openapi.json, /docs

With a token configured, /search and /reindex need exactly one `Authorization: Bearer <token>`
header (compared in constant time); an empty token is refused when the app is created. Bad input
gets a 4xx answer naming the problem: an empty or over-long query, k outside 1..max_k, an unknown language,
a path glob reaching outside the repository, a body over the size limit. Hits come from the index
only: no request makes the server read a file.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal, get_type_hints

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, create_model

from mbert_retrieval.code.chunking import LANGUAGES
from mbert_retrieval.code.index import CodeHit
from mbert_retrieval.server.service import CodeSearchService, ReindexRunning

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_k: int = 100
    max_query_chars: int = 2000
    max_body_bytes: int = 64 * 1024
    snippet_lines: int = 40


class SearchRequest(BaseModel):
    query: str = Field(description="Natural-language or code query")
    k: int = Field(10, description="Number of hits (1 to the server's max_k, 100 by default)")
    path: str | None = Field(
        None, description="Glob over repository-relative paths, .gitignore style: '*.py', 'src/**/io/*'"
    )
    language: str | None = Field(None, description=f"One of: {', '.join(LANGUAGES)}")
    mode: Literal["hybrid", "dense", "bm25"] | None = Field(
        None, description="Ranking (default: the index's)"
    )
    rerank: bool | None = Field(None, description="Rerank with the server's reranker (default: when loaded)")


def _hit_model() -> type[BaseModel]:
    """A hit as the API answers it: a `CodeHit`'s fields, its text cut to a snippet."""
    fields = {name: (kind, ...) for name, kind in get_type_hints(CodeHit).items() if name != "text"}
    return create_model("SearchHit", **fields, snippet=(str, ...))


SearchHit = _hit_model()


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    snapshot: str
    took_ms: float


class ReindexRequest(BaseModel):
    full: bool = Field(False, description="Re-encode every file, not only the changed ones")
    wait: bool = Field(False, description="Answer when the reindex is done instead of at once")


class ReindexResponse(BaseModel):
    status: Literal["started", "completed", "failed"]
    snapshot: str
    report: dict | None = None
    error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"]
    snapshot: str
    files: int
    chunks: int
    model: str
    reindexing: bool
    reindexes_completed: int
    last_reindex_error: str | None


def create_app(
    service: CodeSearchService, *, token: str | None = None, limits: Limits | None = None
) -> FastAPI:
    limits = limits or Limits()
    if token is not None and not token.strip():
        raise ValueError("the token is empty: give a non-empty token, or None to serve without one")
    app = FastAPI(title="mbert-retrieval code search", version="1", description=__doc__)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    authorized = [Depends(bearer_token_check(token))]

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, err: ValueError):
        return JSONResponse(status_code=422, content={"detail": str(err)})

    @app.post("/search", response_model=SearchResponse, dependencies=authorized)
    def search(request: SearchRequest) -> SearchResponse:
        check_search_request(request, limits)
        started = time.perf_counter()
        index, hits = service.search(
            request.query,
            request.k,
            path=request.path,
            language=request.language,
            mode=request.mode,
            rerank=request.rerank,
        )
        return SearchResponse(
            hits=[SearchHit(**h.record(limits.snippet_lines)) for h in hits],
            snapshot=index.snapshot,
            took_ms=1000 * (time.perf_counter() - started),
        )

    @app.post("/reindex", response_model=ReindexResponse, dependencies=authorized)
    def reindex(request: ReindexRequest | None = None) -> JSONResponse:
        request = request or ReindexRequest()
        try:
            service.reindex(full=request.full, wait=request.wait)
        except ReindexRunning as err:
            raise HTTPException(status_code=409, detail=str(err)) from None
        state = service.state
        if not request.wait:
            return _json(202, ReindexResponse(status="started", snapshot=service.index.snapshot))
        if state.last_error is not None:
            return _json(
                500, ReindexResponse(status="failed", snapshot=service.index.snapshot, error=state.last_error)
            )
        report = state.last_report.__dict__ if state.last_report else None
        return _json(200, ReindexResponse(status="completed", snapshot=service.index.snapshot, report=report))

    @app.get("/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        index = service.index
        return HealthResponse(
            status="ok",
            snapshot=index.snapshot,
            files=len(index.files),
            chunks=len(index),
            model=service.model_name,
            reindexing=service.state.running,
            reindexes_completed=service.state.completed,
            last_reindex_error=service.state.last_error,
        )

    return app


def check_search_request(request: SearchRequest, limits: Limits) -> None:
    """The checks whose limits are the server's settings; each failure names the field."""
    if not 1 <= request.k <= limits.max_k:
        raise ValueError(f"k must be between 1 and {limits.max_k}, got {request.k}")
    if not request.query.strip():
        raise ValueError("query must not be empty")
    if len(request.query) > limits.max_query_chars:
        raise ValueError(f"query is longer than {limits.max_query_chars} characters")
    for name in ("query", "path", "language"):
        value = getattr(request, name)
        if value is not None and not _is_valid_unicode(value):
            raise ValueError(f"{name} is not valid Unicode text (it holds a lone surrogate)")
    if request.language is not None and request.language not in LANGUAGES:
        raise ValueError(f"unknown language {request.language!r}; known: {', '.join(LANGUAGES)}")


def bearer_token_check(token: str | None):
    """A dependency that accepts every request without a token, else only one `Bearer <token>` header."""

    def check(request: Request) -> None:
        if token is None:
            return
        headers = request.headers.getlist("authorization")
        if len(headers) > 1:  # proxies and servers disagree on which one counts: accept neither
            raise HTTPException(status_code=400, detail="more than one Authorization header")
        scheme, _, given = (headers[0] if headers else "").partition(" ")
        given = given.strip().encode("latin-1")  # the raw header bytes (ASGI decodes them as latin-1)
        if scheme.lower() != "bearer" or not given or not hmac.compare_digest(given, token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


class BodySizeLimit:
    """ASGI middleware answering 413 to request bodies over `max_bytes` (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_json(send, 413, f"request body over the {self.max_bytes}-byte limit")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI turns this into the response
                raise HTTPException(
                    status_code=413, detail=f"request body over the {self.max_bytes}-byte limit"
                )
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json(status: int, body: BaseModel) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump())
