"""`captune serve`: a web page and a JSON HTTP API over a Captioner, with requests batched on the model.

Routes: `GET /` (the page), `POST /v1/caption` (multipart, one or more `images` fields), `GET|HEAD /health`,
`GET /stats` (batching counters), `GET /openapi.json`. Every rejected upload gets a 4xx with `{"error": "..."}`.
The page sends each file in a request of its own, so one bad file costs its own caption only. Every request is
logged in one line (method, path, status, seconds, client).
FastAPI's /docs is off: Swagger UI loads its scripts from a CDN and the server must work offline.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
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
    max_decoding_pixels: int = 0
    """Full-size pixels being decoded at once, across all requests (0 = 2 x max_pixels); more waits, then 503."""
    read_timeout_s: float = 10.0
    """A client must send its request headers, and then each piece of its body, within this many seconds."""
    max_connections: int = 256
    """Open connections; past it a new one gets 503 at once (keeps file descriptors for /health and real users)."""

    def __post_init__(self):
        if min(self.max_upload_bytes, self.max_pixels, self.max_images, self.max_batch_size,
               self.max_connections) < 1 or self.max_decoding_pixels < 0 or self.read_timeout_s <= 0:
            raise ValueError(f"every limit must be >= 1: {self}")
        if self.max_decoding_pixels and self.max_decoding_pixels < self.max_pixels:
            raise ValueError(f"max_decoding_pixels ({self.max_decoding_pixels}) must be >= max_pixels "
                             f"({self.max_pixels}): an image at the limit could never be decoded")

    @property
    def decoding_budget(self) -> int:
        return self.max_decoding_pixels or 2 * self.max_pixels
        if not 0 <= self.batch_wait_s <= 1:
            raise ValueError(f"batch wait must be between 0 and 1000 ms, got {self.batch_wait_s * 1000} ms")


class UploadRejected(Exception):
    """An upload the server refuses: becomes `status` with `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def upload_pixels(data: bytes, content_type: str | None, name: str, max_pixels: int) -> int:
    """Width x height from the header alone (nothing decoded), after the content type, size and pixel checks.

    Raises:
        UploadRejected: as `decode_upload`.
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind in GENERIC_TYPES):
        raise UploadRejected(415, f"{name}: content type {kind} is not an image; send {', '.join(ALLOWED_FORMATS)}")
    if not data:
        raise UploadRejected(400, f"{name}: the file is empty")
    with _opened(data, name) as image:
        if image.width * image.height > max_pixels:
            raise UploadRejected(413, f"{name}: {image.width}x{image.height} is over the {max_pixels}-pixel limit")
        return image.width * image.height


def decode_upload(data: bytes, content_type: str | None, name: str, max_pixels: int,
                  target: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Validate and decode one uploaded file to RGB (EXIF orientation applied), shrunk towards `target`.

    The model sees a `target` x `target` square, so holding a 40M-pixel upload at full size (and the processor's
    float copy of it, 12 bytes a pixel) buys nothing: JPEGs are decoded at a reduced scale (`draft`), other formats
    box-reduced by an integer factor right after decoding, each side kept at >= 2 x target so the processor's
    bicubic resize sees practically the same picture.

    Returns:
        (the RGB image, the upload's own width and height after EXIF orientation).

    Raises:
        UploadRejected: 400 empty or undecodable, 413 too many pixels, 415 not an image content type or format.
    """
    upload_pixels(data, content_type, name, max_pixels)
    with _opened(data, name) as image:
        size = image.size
        if target and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
            image.draft(image.mode, (2 * target, 2 * target))
        image.load()
        factors = (max(1, image.width // (2 * target)), max(1, image.height // (2 * target))) if target else (1, 1)
        if factors != (1, 1):
            if image.mode not in ("L", "RGB", "RGBA", "LA", "I", "F"):
                image = image.convert("RGBA" if "transparency" in image.info or "A" in image.mode else "L")
            image = image.reduce(factors)
        oriented = ImageOps.exif_transpose(image)
        if oriented.size != image.size:  # rotated by 90 degrees: the reported size turns too
            size = size[::-1]
        return oriented.convert("RGB"), size


class _opened:
    """Image.open on bytes with the server's errors; a context manager so the full-size image is dropped early."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.image = data, name, None

    def __enter__(self) -> Image.Image:
        try:
            # open() reads only the header: the pixel limit is checked before anything is decoded. (PIL's own bomb
            # check raises past 2x Image.MAX_IMAGE_PIXELS; warnings.catch_warnings is not thread-safe.)
            self.image = Image.open(io.BytesIO(self.data), formats=ALLOWED_FORMATS)
        except Exception as exc:
            _reject(exc, self.name)
        return self.image

    def __exit__(self, kind, exc, tb):
        if self.image is not None:
            self.image.close()
        if exc is not None and not isinstance(exc, UploadRejected):
            _reject(exc, self.name)
        return False


def _reject(exc: BaseException, name: str) -> None:
    try:
        raise exc
    except Image.DecompressionBombError as exc:
        raise UploadRejected(413, f"{name}: image too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise UploadRejected(415, f"{name}: not a supported image ({', '.join(ALLOWED_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadRejected(400, f"{name}: cannot decode the image ({exc})") from exc


class PixelBudget:
    """Full-size pixels being decoded at once, across requests: a decode waits for room, then gets a 503.

    Each request decodes its images one at a time and each is shrunk right away (`decode_upload`), so this bounds
    the server's decoding memory whatever the number of concurrent requests.
    """

    def __init__(self, total: int, wait_s: float):
        self.total, self.free, self.wait_s = total, total, wait_s
        self.changed = asyncio.Condition()

    async def acquire(self, pixels: int) -> None:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.free >= pixels), self.wait_s)
            except (asyncio.TimeoutError, TimeoutError):
                raise UploadRejected(503, "the server is busy decoding other images; retry in a few seconds") from None
            self.free -= pixels

    async def release(self, pixels: int) -> None:
        async with self.changed:
            self.free += pixels
            self.changed.notify_all()


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
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes, read_timeout_s=limits.read_timeout_s)
    app.add_middleware(AccessLog)  # outermost: also logs the 413s BodyLimit answers itself
    budget = PixelBudget(limits.decoding_budget, wait_s=limits.read_timeout_s)
    target = captioner.processor.image_processor.size["height"]

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
        decoded, sizes = [], []
        for index, upload in enumerate(images):
            name = upload.filename or f"images[{index}]"
            data = await upload.read()
            pixels = upload_pixels(data, upload.content_type, name, limits.max_pixels)
            await budget.acquire(pixels)
            try:
                image, size = await run_in_threadpool(decode_upload, data, upload.content_type, name,
                                                      limits.max_pixels, target)
            finally:
                await budget.release(pixels)
            decoded.append(image)
            sizes.append(size)
        captions = await queue.submit(decoded, options)
        return {
            "captions": [{"filename": upload.filename or "", "caption": text, "width": size[0],
                          "height": size[1]} for upload, size, text in zip(images, sizes, captions)],
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

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 10.0):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

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
            try:
                # A client that stops sending mid-body would hold its connection (and a file descriptor) forever.
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                return await _send_error(send, 408, f"request body not received within {self.read_timeout_s:g} s")
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


def guarded_protocol(read_timeout_s: float, max_connections: int):
    """uvicorn's h11 protocol with a deadline for the request headers and a cap on open connections.

    uvicorn times out idle keep-alive connections only: a client that connects and sends nothing, or half a header
    (slowloris), holds a file descriptor forever, and enough of them make accept() fail with EMFILE (tracebacks in
    the log, /health unreachable). Here a connection past `max_connections` is answered 503 and closed at once, and
    one whose headers are not complete within `read_timeout_s` gets 408 and is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                _close_with(transport, 503, "too many open connections; retry shortly")
                return
            self._header_deadline = self.loop.call_later(read_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                _close_with(self.transport, 408, f"request headers not received within {read_timeout_s:g} s")

        def connection_lost(self, exc) -> None:
            deadline = getattr(self, "_header_deadline", None)
            if deadline is not None:
                deadline.cancel()
            super().connection_lost(exc)

    return Guarded


def _close_with(transport, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
                    f"\r\nconnection: close\r\n\r\n".encode() + body)
    transport.close()


def run_server(captioner, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    limits = limits or ServeLimits()
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: anyone who can reach this machine on port %d can use the model", host, port)
    log.info("serving %s on http://%s:%d (page /, API POST /v1/caption, /health, /stats, /openapi.json)",
             captioner.name, host, port)
    backlog, connections = connection_limits(limits.max_connections)
    uvicorn.run(create_app(captioner, limits), host=host, port=port, log_level="info", access_log=False,
                http=guarded_protocol(limits.read_timeout_s, connections), backlog=backlog,
                timeout_keep_alive=min(5, limits.read_timeout_s))


def connection_limits(wanted: int) -> tuple[int, int]:
    """(listen backlog, connection cap) that fit the process's file-descriptor limit (`ulimit -n`).

    asyncio accepts up to `backlog` connections in one go before any protocol can refuse them, and a refused
    connection's descriptor is only closed on a later turn of the event loop, while the next batch is accepted: the
    descriptors in use can reach the cap plus a few backlogs' worth. Both are sized so that four backlogs over the
    cap stay under the limit, and accept() does not fail with EMFILE (with room for one backlog only, 200 stalled
    clients against `ulimit -n 160` hit EMFILE in about half the runs).
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        in_use = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError):  # not Linux: keep uvicorn's backlog
        return 2048, wanted
    spare = soft - in_use - 16  # headroom: model files, logs, the batching thread
    backlog = max(8, min(128, spare // 8))
    allowed = max(1, min(wanted, spare - 4 * backlog))
    if allowed < wanted:
        log.warning("serving at most %d connections, not %d: this process may open %d files (raise ulimit -n)",
                    allowed, wanted, soft)
    return backlog, allowed
