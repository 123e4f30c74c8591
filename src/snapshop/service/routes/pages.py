"""The web page at /, its static files, and the API docs at /docs (served offline)."""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response

from snapshop.service.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                ".html": "text/html", ".png": "image/png"}  # fmt: skip
# The page shows catalog text written by whoever holds the API key: should a bug ever let
# some of it in as markup, the browser still runs no inline script or event handler, loads
# nothing from elsewhere, and no other site can frame the page. The favicon is a data: URL,
# the query photo a blob: URL.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; img-src 'self' data: blob:; "
               "object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")  # fmt: skip
PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY,
                "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}  # fmt: skip


def router() -> APIRouter:
    routes = APIRouter(include_in_schema=False)

    @routes.get("/")
    def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers=PAGE_HEADERS)  # fmt: skip

    @routes.get("/p/{product_id:int}")
    def product_page(product_id: int) -> FileResponse:
        """The same page; its script shows the product and its similar products."""
        return index_page()

    @routes.get("/static/{name}")
    def static_file(name: str) -> FileResponse:
        allowed = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
        if name not in allowed:
            raise ApiError(404, f"no static file {name!r}")
        media = STATIC_TYPES.get(allowed[name].suffix, "application/octet-stream")
        headers = PAGE_HEADERS if media == "text/html" else {"Cache-Control": "no-cache"}
        return FileResponse(allowed[name], media_type=media, headers=headers)

    return routes


def install_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the ``swagger-ui-bundle`` package, not a CDN (closed networks)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    try:
        import swagger_ui_bundle
    except ImportError:  # pragma: no cover - the dependency is declared
        return
    app.mount(
        "/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), "docs-assets"
    )

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="snapshop API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
