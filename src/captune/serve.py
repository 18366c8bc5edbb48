"""`captune serve`: a web page and a JSON HTTP API over a Captioner, with requests batched on the model.

Routes: `GET /` (the page), `POST /v1/caption` (multipart, one or more `images` fields), `GET|HEAD /health`,
`GET /stats` (batching counters), `GET /openapi.json`. Every rejected upload gets a 4xx with `{"error": "..."}`.
The page sends each file in a request of its own, so one bad file costs its own caption only. Every request is
logged in one line (method, path, status, seconds, client).
FastAPI's /docs is off: Swagger UI loads its scripts from a CDN and the server must work offline.
"""

from __future__ import annotations

import io
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, ImageOps
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import __version__
from .batching import BatchQueue
from .model import load_captune_settings
from .serve_page import PAGE
from .speed import int8_quantized

log = logging.getLogger("captune")

# Formats PIL may decode for uploads. Restricting them keeps exotic decoders (EPS via Ghostscript, ...) unreachable.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Part content types accepted besides image/*: what curl and some browsers send for files they cannot classify.
GENERIC_TYPES = ("", "application/octet-stream")
MAX_BEAMS, MAX_TOKENS = 8, 128
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may carry and how requests are batched."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 16
    max_batch_size: int = 16
    batch_wait_s: float = 0.005

    def __post_init__(self):
        if min(self.max_upload_bytes, self.max_pixels, self.max_images, self.max_batch_size) < 1:
            raise ValueError(f"every limit must be >= 1: {self}")
        if not 0 <= self.batch_wait_s <= 1:
            raise ValueError(f"batch wait must be between 0 and 1000 ms, got {self.batch_wait_s * 1000} ms")


class UploadRejected(Exception):
    """An upload the server refuses: becomes `status` with `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, content_type: str | None, name: str, max_pixels: int) -> Image.Image:
    """Validate and decode one uploaded file to RGB (EXIF orientation applied).

    Raises:
        UploadRejected: 400 empty or undecodable, 413 too many pixels, 415 not an image content type or format.
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind in GENERIC_TYPES):
        raise UploadRejected(415, f"{name}: content type {kind} is not an image; send {', '.join(ALLOWED_FORMATS)}")
    if not data:
        raise UploadRejected(400, f"{name}: the file is empty")
    try:
        # open() reads only the header: the pixel limit is checked before anything is decoded. (PIL's own bomb check
        # raises past 2x Image.MAX_IMAGE_PIXELS; warnings.catch_warnings is not thread-safe, so no filter games.)
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        if image.width * image.height > max_pixels:
            raise UploadRejected(413, f"{name}: {image.width}x{image.height} is over the {max_pixels}-pixel limit")
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UploadRejected(413, f"{name}: image too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise UploadRejected(415, f"{name}: not a supported image ({', '.join(ALLOWED_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadRejected(400, f"{name}: cannot decode the image ({exc})") from exc


class Caption(BaseModel):
    filename: str
    caption: str
    width: int
    height: int


class CaptionResponse(BaseModel):
    captions: list[Caption]
    options: dict
    model: str
    seconds: float


PAGE_OPTIONS = ("num_beams", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size", "length_penalty")
"""Numeric options the web page shows, prefilled with the model directory's recorded decoding."""
ERROR_SCHEMA = {"content": {"application/json": {"example": {"error": "what was wrong with the request"}}}}


def model_info(captioner) -> dict:
    """What the server runs: the path or id it was loaded from, the model family, the optimizer step its weights
    are from (captune-trained directories record it), int8 or not, and the device."""
    try:
        step = load_captune_settings(captioner.name).get("step")
    except Exception:  # an unreadable captune.json was already reported at load time
        step = None
    config = getattr(captioner.model, "config", None)
    return {"model": captioner.name, "family": getattr(config, "model_type", None), "step": step,
            "int8": int8_quantized(captioner.model), "device": str(captioner.device)}


def create_app(captioner, limits: ServeLimits | None = None) -> FastAPI:
    """The ASGI app serving `captioner` (a `captune.Captioner`)."""
    limits = limits or ServeLimits()
    info = model_info(captioner)
    queue = BatchQueue(lambda images, options: captioner.caption_decoded(images, options, batch_size=len(images)),
                       max_batch_size=limits.max_batch_size, max_wait_s=limits.batch_wait_s)

    @asynccontextmanager
    async def lifespan(app):
        await queue.start()
        yield
        await queue.stop()

    app = FastAPI(title="captune", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Caption images with a fine-tuned BLIP model. POST images to /v1/caption.")
    app.state.queue = queue
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    app.add_middleware(AccessLog)  # outermost: also logs the 413s BodyLimit answers itself

    @app.exception_handler(UploadRejected)
    async def rejected(request: Request, exc: UploadRejected):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = ["{}: {}".format(".".join(str(p) for p in e.get("loc", ())[1:]) or "body", e.get("msg"))
                    for e in exc.errors()]
        return JSONResponse({"error": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        defaults = json.dumps({**{name: getattr(captioner.defaults, name) for name in PAGE_OPTIONS},
                               "max_images": limits.max_images, "max_bytes": limits.max_upload_bytes,
                               "info": info})
        return HTMLResponse(PAGE.replace("__DEFAULTS__", defaults), headers={"Content-Security-Policy": PAGE_CSP})

    # HEAD too: load balancers and `curl -I` probe with it, and FastAPI answers 405 to HEAD on a GET route.
    @app.get("/health")
    async def health():
        return {"status": "ok", **info, "version": __version__}

    app.head("/health", include_in_schema=False)(health)

    @app.get("/stats")
    async def stats():
        return queue.stats()

    @app.post("/v1/caption", response_model=CaptionResponse,
              responses={400: ERROR_SCHEMA, 413: ERROR_SCHEMA, 415: ERROR_SCHEMA, 422: ERROR_SCHEMA})
    async def caption(
        images: list[UploadFile] = File(..., description="one or more image files (JPEG, PNG, WebP, GIF, BMP, TIFF)"),
        num_beams: int | None = Form(None, ge=1, le=MAX_BEAMS, description="beam width, 1 = greedy"),
        max_new_tokens: int | None = Form(None, ge=1, le=MAX_TOKENS, description="longest caption in tokens"),
        min_new_tokens: int | None = Form(None, ge=0, le=MAX_TOKENS, description="shortest caption in tokens"),
        do_sample: bool | None = Form(None, description="nucleus sampling instead of greedy/beam search"),
        top_p: float | None = Form(None, gt=0, le=1, description="nucleus mass when sampling"),
        temperature: float | None = Form(None, gt=0, le=10, description="softmax temperature when sampling"),
        repetition_penalty: float | None = Form(None, ge=1, le=10, description=">1 discourages repeats"),
        no_repeat_ngram_size: int | None = Form(None, ge=0, le=MAX_TOKENS,
                                                description="forbid token n-grams of this size from repeating (0 = off)"),
        length_penalty: float | None = Form(None, ge=-10, le=10, description="beam search: >1 favours longer captions"),
    ):
        """Caption the uploaded images; the reply lists one caption per image, in upload order."""
        started = time.perf_counter()
        if len(images) > limits.max_images:
            raise UploadRejected(413, f"{len(images)} images in one request; the limit is {limits.max_images}")
        overrides = {k: v for k, v in dict(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                              min_new_tokens=min_new_tokens, do_sample=do_sample, top_p=top_p,
                                              temperature=temperature, repetition_penalty=repetition_penalty,
                                              no_repeat_ngram_size=no_repeat_ngram_size,
                                              length_penalty=length_penalty).items()
                     if v is not None}
        try:
            options = captioner.options(**overrides)
        except Exception as exc:  # CaptuneError: e.g. min_new_tokens > max_new_tokens
            raise UploadRejected(422, str(exc)) from exc
        decoded = []
        for index, upload in enumerate(images):
            name = upload.filename or f"images[{index}]"
            data = await upload.read()
            decoded.append(await run_in_threadpool(decode_upload, data, upload.content_type, name, limits.max_pixels))
        captions = await queue.submit(decoded, options)
        return {
            "captions": [{"filename": upload.filename or "", "caption": text, "width": image.width,
                          "height": image.height} for upload, image, text in zip(images, decoded, captions)],
            "options": asdict(options), "model": captioner.name, "seconds": round(time.perf_counter() - started, 4),
        }

    return app


class AccessLog:
    """One log line per request: `METHOD /path STATUS SECONDSs CLIENT` (uvicorn's own access log is off); the
    seconds run to the start of the answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, logged = time.perf_counter(), 0, False

        def write() -> None:
            nonlocal logged
            logged = True
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %.3fs %s", scope["method"], scope["path"], status or "-",
                     time.perf_counter() - started, client[0])

        async def send_logged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                write()  # before the answer leaves (seconds to the first byte): the client never outruns its line
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            if not logged:  # the client left, or the app failed before answering
                write()


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether declared (Content-Length) or streamed (chunked).

    The body is read here, bounded, and replayed to the app: the multipart parser never sees more than the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _send_error(send, 400, "Content-Length is not a number")
            if size > self.max_bytes:
                if size <= DRAIN_FACTOR * self.max_bytes:
                    await _drain(receive, DRAIN_FACTOR * self.max_bytes)
                return await _send_error(send, 413, self._too_big(f"{size} bytes declared"))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive, (DRAIN_FACTOR - 1) * self.max_bytes)
                return await _send_error(send, 413, self._too_big(f"more than {self.max_bytes} bytes sent"))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_big(self, what: str) -> str:
        return f"request body too large ({what}); the limit is {self.max_bytes} bytes (captune serve --max-upload-mb)"


# A body somewhat over the limit is read and dropped before the 413: answering mid-upload makes most HTTP clients
# report a connection reset instead of the answer. Far larger bodies are refused at once (the connection closes).
DRAIN_FACTOR = 4


async def _drain(receive, max_bytes: int) -> None:
    """Read and discard request body messages until the body ends, the client leaves or `max_bytes` were read."""
    read = 0
    while read <= max_bytes:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        read += len(message.get("body", b""))


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def run_server(captioner, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: anyone who can reach this machine on port %d can use the model", host, port)
    log.info("serving %s on http://%s:%d (page /, API POST /v1/caption, /health, /stats, /openapi.json)",
             captioner.name, host, port)
    uvicorn.run(create_app(captioner, limits), host=host, port=port, log_level="info", access_log=False)
