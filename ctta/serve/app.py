"""The HTTP front (FastAPI): routes, JSON errors and request metrics over a `Service`.

    POST /predict    one image as the body (image/jpeg, image/png, image/webp) or several as multipart/form-data;
                     query: classes=NAME (repeated; a subset of the label space), top_k=K, adapt=false
    POST /reset, /pause, /resume, /snapshot      (queued with the predictions: they apply in arrival order)
    GET  /healthz    liveness and the adapter's counters;  GET /readyz  200 when serving, 503 starting or draining
    GET  /classes    the label space;  GET /metrics  Prometheus text format

A refused request answers ``{"error": {"kind": ..., "message": ...}}`` with its 4xx/503 status and never reaches the
model, so the adapted state is unchanged by it.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctta.serve.inputs import content_kind, parse_query, read_body, split_multipart
from ctta.serve.options import ServeError
from ctta.serve.service import Payload, Service

ENDPOINTS = ("/predict", "/reset", "/pause", "/resume", "/snapshot", "/healthz", "/readyz", "/classes", "/metrics")


class _Observe:
    """Pure ASGI middleware: request count by endpoint and status, and latency, for every HTTP request (cheaper
    than Starlette's BaseHTTPMiddleware, which wraps each request in extra tasks)."""

    def __init__(self, app: Any, service: Service):
        self.app, self.metrics = app, service.metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status, t = 500, time.perf_counter()

        async def observed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app serving ``service``; its lifespan starts the batcher and, at shutdown, drains it and writes
    the state. Use it under uvicorn (`ctta.serve.serve`) or FastAPI's TestClient."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # no /docs, /redoc or /openapi.json: the endpoints are documented above, and the docs pages load from a CDN
    app = FastAPI(title="ctta serve", summary="a CLIP that adapts online while it predicts", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Observe, service=service)
    opts, batcher = service.options, service.batcher
    decoding = asyncio.Semaphore(opts.max_decoding)  # with max_request_pixels: a bound on decoding memory

    @app.exception_handler(ServeError)
    async def refused(request: Request, e: ServeError) -> JSONResponse:
        service.metrics.errors.labels(e.kind).inc()
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Routing errors (404 no such endpoint, 405 wrong method) in the same JSON shape as every other refusal."""
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {e.detail}; endpoints: {', '.join(ENDPOINTS)}"
        return await refused(request, ServeError(e.status_code, kind, message))

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        if service.draining:
            raise ServeError(503, "shutting_down", "the server is shutting down; retry after the restart")
        classes, top_k, adapt = parse_query(request.query_params, service.space.classnames, opts.top_k)
        kind = content_kind(request.headers.get("content-type"))
        try:  # a stalled upload gets 408 and never holds a batch open: it counts as arriving only once read
            body = await asyncio.wait_for(read_body(request.stream(), request.headers.get("content-length"),
                                                    opts.max_body_bytes), opts.read_timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(408, "request_timeout", f"the request body did not arrive within "
                             f"{opts.read_timeout_s} s (serve.read_timeout_s)") from None
        batcher.arrive()
        try:
            parts = await split_multipart(request.headers, body, opts) if kind == "multipart" else [("image", body)]
            async with decoding:
                try:
                    images = await asyncio.to_thread(service.decode, parts)
                except ServeError:
                    raise
                except Exception as e:  # not the client's mistake as far as we can tell: a JSON 500 naming it
                    raise ServeError(500, "decode_failed", f"decoding the request failed: {type(e).__name__}: "
                                     f"{e}") from e
            if service.draining:
                raise ServeError(503, "shutting_down", "the server is shutting down; retry after the restart")
            result = batcher.submit(len(parts), (adapt, classes), Payload(images, top_k))
        finally:
            batcher.gone()
        service.metrics.queue.set(batcher.queued_images)
        try:
            return JSONResponse(await result)
        except ServeError:
            raise
        except Exception as e:  # the strategy failed on this batch: say so; the server carries on
            raise ServeError(500, "model_error", f"the model call failed: {type(e).__name__}: {e}") from e

    async def control(fn) -> JSONResponse:
        try:
            return JSONResponse(await batcher.control(fn))
        except ServeError:
            raise
        except Exception as e:  # e.g. a snapshot on a full disk: a JSON 500 naming it; the server carries on
            raise ServeError(500, "internal", f"{fn.__name__} failed: {type(e).__name__}: {e}") from e

    @app.post("/reset")
    async def reset() -> JSONResponse:
        return await control(service.reset)

    @app.post("/pause")
    async def pause() -> JSONResponse:
        return await control(service.pause)

    @app.post("/resume")
    async def resume() -> JSONResponse:
        return await control(service.resume)

    @app.post("/snapshot")
    async def snapshot() -> JSONResponse:
        if service.state_path is None:
            service.snapshot()  # raises the 409 without queueing
        return await control(service.snapshot)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        info = service.info()
        return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = service.ready and not service.draining and batcher.alive
        state = "ready" if ready else "draining" if service.draining else "starting"
        return JSONResponse({"ready": ready, "state": state}, status_code=200 if ready else 503)

    @app.get("/classes")
    async def classes() -> JSONResponse:
        return JSONResponse({"classes": list(service.space.classnames)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return app
