"""The viewer's ASGI application (Starlette): pages, the JSON API under ``/api/`` and tiles.

Routes (``NAME`` is a slide's folder name in ``OUT``, percent-encoded):

Pages
    ``/`` slide list, ``/slides/NAME`` slide page, ``/cohort`` cohort page.
API (JSON unless stated)
    ``/api/slides``, ``/api/slides/NAME``, ``/api/slides/NAME/summary``,
    ``/api/slides/NAME/tissue`` (GeoJSON), ``/api/slides/NAME/nuclei?bbox=x0,y0,x1,y1&limit=N``
    (GeoJSON), ``/api/slides/NAME/thumbnail.jpeg``, ``/api/slides/NAME/overlay.png``,
    ``/api/slides/NAME/tissue_mask.png``, ``/api/cohort/options``, ``/api/cohort?...``,
    ``/api/cohort.csv?...``.
Tiles (DeepZoom)
    ``/api/slides/NAME/slide.dzi`` + ``slide_files/Z/COL_ROW.jpeg`` (the slide) and
    ``/api/slides/NAME/nuclei.dzi`` + ``nuclei_files/Z/COL_ROW.png`` (nuclei, transparent).

Blocking work (slide reading, encoding, database queries) runs in Starlette's thread pool. A
request for something that does not exist gets 404, an unreadable slide a one-line message
(404 when its file is missing or cannot be opened, 500 when its data is corrupt), never a
traceback. Every answer carries a Content-Security-Policy that allows only this server.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import jinja2
import orjson
from isal import isal_zlib
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from slidestream._version import __version__
from slidestream.errors import ConfigError, SlideOpenError, SlidestreamError

from ._cohort import CohortRequest, cohort_csv, cohort_options, run_cohort_query
from ._config import ViewerConfig
from ._dzi import dzi_xml
from ._service import NotFoundError, ViewerService

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_CSP: Final = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
_GZIP_MIN_BYTES: Final = 2048
_TILE_CACHE_CONTROL: Final = "private, max-age=3600"


def _static_dir() -> Path:
    return Path(str(resources.files("slidestream.viewer").joinpath("static")))


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("slidestream.viewer", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["path_quote"] = lambda value: quote(str(value), safe="")
    env.filters["num"] = _format_number
    return env


def _format_number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "–"
    if abs(number) >= 1000:
        return f"{number:,.0f}"
    return f"{number:.{digits}g}"


class _SecurityHeaders:
    """Adds the Content-Security-Policy and ``nosniff`` to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"content-security-policy", _CSP.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _json(request: Request, data: Any, *, status: int = 200) -> Response:
    """JSON (orjson), gzip-compressed when large and the client accepts it."""
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    return _maybe_gzip(request, body, "application/json", status=status)


def _maybe_gzip(request: Request, body: bytes, media_type: str, *, status: int = 200) -> Response:
    headers = {"vary": "accept-encoding"}
    if len(body) >= _GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", ""):
        body = isal_zlib.compress(body, 1, wbits=31)
        headers["content-encoding"] = "gzip"
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _error_status(exc: Exception) -> int:
    return 404 if isinstance(exc, NotFoundError | SlideOpenError) else 500


class _Handlers:
    """The endpoints, bound to one :class:`ViewerService`."""

    def __init__(self, service: ViewerService) -> None:
        self.service = service
        self.templates = _templates()

    # ------------------------------------------------------------------ helpers
    def page(self, template: str, *, http_status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("has_db", self.service.engine is not None)
        context.setdefault("version", __version__)
        html = self.templates.get_template(template).render(**context)
        return HTMLResponse(html, status_code=http_status)

    def error(self, request: Request, status: int, message: str) -> Response:
        if _is_api(request):
            path = request.url.path
            if path.endswith((".jpeg", ".png", ".dzi")):
                return PlainTextResponse(message, status_code=status)
            return _json(request, {"error": message, "status": status}, status=status)
        return self.page("error.html", http_status=status, status_code=status, message=message)

    def guarded(
        self, fn: Callable[[Request], Response]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a blocking endpoint: thread pool, and errors as clean answers."""
        from starlette.concurrency import run_in_threadpool

        async def endpoint(request: Request) -> Response:
            try:
                return await run_in_threadpool(fn, request)
            except (NotFoundError, SlidestreamError) as exc:
                status = _error_status(exc)
                if status >= 500:
                    logger.error("%s: %s", request.url.path, exc)
                return self.error(request, status, str(exc))
            except OSError as exc:
                logger.error("%s: %s", request.url.path, exc)
                return self.error(request, 500, f"cannot read the results: {exc.strerror or exc}")

        return endpoint

    @staticmethod
    def _name(request: Request) -> str:
        return str(request.path_params["name"])

    @staticmethod
    def _tile_params(request: Request) -> tuple[int, int, int]:
        p = request.path_params
        return int(p["z"]), int(p["col"]), int(p["row"])

    # ------------------------------------------------------------------ pages
    def slides_page(self, request: Request) -> Response:
        rows = [self.service.slide_row(e) for e in self.service.entries()]
        classes = sorted({c for r in rows for c in r["class_fractions"]})
        metadata_keys = sorted({k for r in rows for k in r["metadata"]})
        return self.page(
            "slides.html",
            rows=rows,
            classes=classes,
            metadata_keys=metadata_keys,
            out_dir=str(self.service.catalog.root),
        )

    def slide_page(self, request: Request) -> Response:
        entry = self.service.check_slide(self._name(request))
        return self.page("slide.html", name=entry.name, status=entry.status, reason=entry.reason)

    def cohort_page(self, request: Request) -> Response:
        if self.service.engine is None:
            return self.page(
                "error.html",
                http_status=404,
                status_code=404,
                message=(
                    "no statistics database: start the viewer with --db URL (or keep "
                    "slidestream.db in the output folder)"
                ),
            )
        return self.page("cohort.html")

    # ------------------------------------------------------------------ API
    def api_slides(self, request: Request) -> Response:
        return _json(request, [self.service.slide_row(e) for e in self.service.entries()])

    def api_slide(self, request: Request) -> Response:
        return _json(request, self.service.slide_info(self._name(request)))

    def api_summary(self, request: Request) -> Response:
        path = self.service.result_file(self._name(request), "summary")
        return _maybe_gzip(request, path.read_bytes(), "application/json")

    def api_tissue(self, request: Request) -> Response:
        path = self.service.result_file(self._name(request), "tissue")
        return _maybe_gzip(request, path.read_bytes(), "application/geo+json")

    def api_nuclei(self, request: Request) -> Response:
        raw = request.query_params.get("bbox", "")
        try:
            box = tuple(float(v) for v in raw.split(","))
            if len(box) != 4 or not all(math.isfinite(v) for v in box):
                raise ValueError
        except ValueError:
            return self.error(request, 400, f"bbox={raw!r}: expected bbox=x0,y0,x1,y1 (level-0 px)")
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return self.error(request, 400, f"bbox={raw!r}: expected x0 < x1 and y0 < y1")
        try:
            limit = int(request.query_params.get("limit", "5000"))
        except ValueError:
            return self.error(request, 400, "limit: expected a whole number")
        data = self.service.nuclei_in_box(self._name(request), (x0, y0, x1, y1), limit=limit)
        return _json(request, data)

    def api_thumbnail(self, request: Request) -> Response:
        data = self.service.thumbnail(self._name(request))
        return Response(data, media_type="image/jpeg", headers={"cache-control": "no-cache"})

    def api_result_png(self, kind: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            path = self.service.result_file(self._name(request), kind)
            return FileResponse(path, media_type="image/png")

        return endpoint

    def api_dzi(self, image_format: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            name = self._name(request)
            entry = self.service.entry(name)
            if image_format == "jpeg":
                self.service.readers(entry)  # a missing slide answers here, not per tile
            xml = dzi_xml(self.service.grid(entry), image_format)
            return Response(xml, media_type="application/xml")

        return endpoint

    def slide_tile(self, request: Request) -> Response:
        z, col, row = self._tile_params(request)
        data = self.service.slide_tile(self._name(request), z, col, row)
        return Response(
            data, media_type="image/jpeg", headers={"cache-control": _TILE_CACHE_CONTROL}
        )

    def nuclei_tile(self, request: Request) -> Response:
        z, col, row = self._tile_params(request)
        data = self.service.nuclei_tile(self._name(request), z, col, row)
        return Response(
            data, media_type="image/png", headers={"cache-control": _TILE_CACHE_CONTROL}
        )

    def _engine(self) -> Engine:
        if self.service.engine is None:
            raise NotFoundError("no statistics database: start the viewer with --db URL")
        return self.service.engine

    def api_cohort_options(self, request: Request) -> Response:
        return _json(request, cohort_options(self._engine()))

    def _cohort(self, request: Request) -> dict[str, Any] | Response:
        engine = self._engine()
        try:
            cohort = CohortRequest.from_query(request.query_params.multi_items())
            return run_cohort_query(engine, cohort)
        except ConfigError as exc:
            return self.error(request, 400, str(exc))

    def api_cohort(self, request: Request) -> Response:
        result = self._cohort(request)
        return result if isinstance(result, Response) else _json(request, result)

    def api_cohort_csv(self, request: Request) -> Response:
        result = self._cohort(request)
        if isinstance(result, Response):
            return result
        per_slide = request.query_params.get("per") == "slide"
        name = "cohort-slides.csv" if per_slide else "cohort.csv"
        return Response(
            cohort_csv(result, per_slide=per_slide),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )


def create_app(
    config: ViewerConfig,
    *,
    engine: Engine | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """Build the viewer application.

    Parameters
    ----------
    config
        What to serve (the output folder, cache sizes...).
    engine
        The statistics database, opened read-only (:func:`slidestream.db.connect_read_only`),
        or ``None``: no cohort page, and the slide list shows only ``OUT``.
    allowed_hosts
        ``Host`` header values to answer (DNS-rebinding protection for a local server);
        ``None`` answers any.

    Returns
    -------
    starlette.applications.Starlette
        The ASGI app; ``app.state.service`` is its :class:`ViewerService` (closed on shutdown).
    """
    service = ViewerService(config, engine=engine)
    h = _Handlers(service)
    g = h.guarded
    tile = "{z:int}/{col:int}_{row:int}"
    routes = [
        Route("/", g(h.slides_page)),
        Route("/slides/{name}", g(h.slide_page)),
        Route("/cohort", g(h.cohort_page)),
        Route("/api/slides", g(h.api_slides)),
        Route("/api/slides/{name}", g(h.api_slide)),
        Route("/api/slides/{name}/summary", g(h.api_summary)),
        Route("/api/slides/{name}/tissue", g(h.api_tissue)),
        Route("/api/slides/{name}/nuclei", g(h.api_nuclei)),
        Route("/api/slides/{name}/thumbnail.jpeg", g(h.api_thumbnail)),
        Route("/api/slides/{name}/overlay.png", g(h.api_result_png("overlay"))),
        Route("/api/slides/{name}/tissue_mask.png", g(h.api_result_png("tissue_mask"))),
        Route("/api/slides/{name}/slide.dzi", g(h.api_dzi("jpeg"))),
        Route("/api/slides/{name}/nuclei.dzi", g(h.api_dzi("png"))),
        Route(f"/api/slides/{{name}}/slide_files/{tile}.jpeg", g(h.slide_tile)),
        Route(f"/api/slides/{{name}}/nuclei_files/{tile}.png", g(h.nuclei_tile)),
        Route("/api/cohort/options", g(h.api_cohort_options)),
        Route("/api/cohort", g(h.api_cohort)),
        Route("/api/cohort.csv", g(h.api_cohort_csv)),
        Mount("/static", app=StaticFiles(directory=_static_dir()), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "no such page" if status == 404 else str(getattr(exc, "detail", "error"))
        return h.error(request, status, f"{message}: {request.url.path}")

    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.service = service
    return app
