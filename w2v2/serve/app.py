"""The HTTP application: OpenAI's audio transcription API, a model list, a health check, the web page.

    POST /v1/audio/transcriptions   multipart: file, model, response_format, timestamp_granularities[],
                                    language, prompt, temperature (the last three are accepted and
                                    ignored: a CTC model has one language and no sampling)
    GET  /v1/models                 the one model served
    GET  /health                    liveness and queue length (no key needed)
    GET  /                          the web page (static files under /static)

Responses follow OpenAI's schema, so that the official ``openai`` client works unchanged with its
``base_url`` pointed here; errors are ``{"error": {"message", "type", "param", "code"}}`` with the
status OpenAI uses (400 bad request, 401 bad key, 413 too large, 429 queue full). The upload is
written to a private temporary file (its client-given name is never used as a path) and removed
whatever happens; the transcription itself is the CLI's (:class:`w2v2.transcribe.Transcriber`),
run by the :class:`~w2v2.serve.batcher.Batcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..writers import WRITERS
from .batcher import Batcher, QueueFull

STATIC = Path(__file__).parent / "static"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
# Fields OpenAI's transcription API defines that a CTC model has no use for: accepted, ignored.
IGNORED_FIELDS = ("language", "prompt", "temperature")
# Our one extension, used by the web page: more formats of the same transcript in a verbose_json answer.
EXTRA_FORMATS_FIELD = "include_formats"
KNOWN_FIELDS = {"file", "model", "response_format", "timestamp_granularities[]", "timestamp_granularities",
                EXTRA_FORMATS_FIELD, *IGNORED_FIELDS}
COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """What ``w2v2 serve``'s flags set; see :func:`create_app`."""

    model_id: str = "w2v2-default"
    api_key: str | None = None
    max_upload_mb: float = 100.0
    retry_after_seconds: int = 5


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_type(status: int) -> str:
    return {401: "authentication_error", 413: "invalid_request_error", 429: "rate_limit_error",
            503: "server_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413, before it is all read
    (a declared Content-Length at once, a chunked body as soon as it passes the limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope, receive, send):
        mb = self.limit / (1 << 20)
        await error_response(413, f"the upload is larger than the server's limit of {mb:g} MB",
                             param="file", code="file_too_large")(scope, receive, send)


def create_app(batcher: Batcher, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The application around a started or startable ``batcher``; the batcher runs from the
    application's start-up to its shutdown, which finishes every queued request first."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.tmp_root = tempfile.mkdtemp(prefix="w2v2-serve-")
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)
            shutil.rmtree(app.state.tmp_root, ignore_errors=True)

    app = FastAPI(title="w2v2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    limit = int(settings.max_upload_mb * (1 << 20))
    app.add_middleware(BodyLimit, limit=limit)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 413:
            return error_response(413, f"the upload is larger than the server's limit of "
                                       f"{settings.max_upload_mb:g} MB", param="file", code="file_too_large")
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.api_key.encode())
        if not ok:
            raise APIError(401, "missing or wrong API key (send: Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "queued": batcher.waiting, "batches": batcher.batches,
                "skipped": batcher.skipped}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(settings.model_id)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        check_key(request)
        if model_id != settings.model_id:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(settings.model_id)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        check_key(request)
        fields = await _read_form(request)
        if fields["model"] not in (None, "", settings.model_id):
            raise APIError(400, f"model {fields['model']!r} is not served here; this server serves "
                                f"{settings.model_id!r}", param="model", code="model_not_found")
        fmt = fields["response_format"]
        fd, path = tempfile.mkstemp(dir=request.app.state.tmp_root, prefix="upload-")
        try:
            upload: UploadFile = fields["file"]
            await _copy_upload(upload, fd)
            fd = -1
            result = await _transcribe(request, batcher, path, settings, _display_name(upload.filename))
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if result is None:  # the client went away: nobody to answer
            return Response(status_code=499)
        return _render(result, fmt, fields)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "w2v2"}


async def _read_form(request: Request) -> dict:
    """The multipart fields, checked: exactly one file, known fields only, valid values."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, "send the audio as multipart/form-data with a 'file' field", param="file")
    form = await request.form(max_files=1, max_fields=16)
    unknown = sorted(set(form.keys()) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field(s) {', '.join(unknown)}", param=unknown[0])
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "the 'file' field is missing or not a file", param="file")
    fmt = str(form.get("response_format") or "json")
    if fmt not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                       param="response_format")
    granularities = [str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")]
    bad = [g for g in granularities if g not in GRANULARITIES]
    if bad:
        raise APIError(400, f"timestamp_granularities {bad[0]!r} is not one of {', '.join(GRANULARITIES)}",
                       param="timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format verbose_json",
                       param="timestamp_granularities")
    temperature = form.get("temperature")
    if temperature is not None:
        try:
            float(str(temperature))
        except ValueError:
            raise APIError(400, f"temperature {temperature!r} is not a number", param="temperature") from None
    extra = [f for f in str(form.get(EXTRA_FORMATS_FIELD) or "").split(",") if f]
    bad = [f for f in extra if f not in WRITERS]
    if bad:
        raise APIError(400, f"{EXTRA_FORMATS_FIELD} {bad[0]!r} is not one of {', '.join(WRITERS)}",
                       param=EXTRA_FORMATS_FIELD)
    return {"file": upload, "model": form.get("model"), "response_format": fmt,
            "granularities": set(granularities) or {"segment"}, "extra_formats": extra,
            "language": form.get("language")}


async def _copy_upload(upload: UploadFile, fd: int) -> None:
    with os.fdopen(fd, "wb") as out:
        while block := await upload.read(COPY_BLOCK):
            out.write(block)
    await upload.close()


async def _transcribe(request: Request, batcher: Batcher, path: str, settings: ServeSettings,
                      name: str) -> dict | None:
    """The result dict for the file at ``path``; None when the client disconnected first."""
    from ..audio import AudioError, audio_duration

    try:
        seconds = await asyncio.to_thread(audio_duration, path)
    except AudioError as e:
        raise APIError(400, str(e).replace(path, name), param="file", code="invalid_audio") from None
    try:
        job = batcher.submit(path, seconds or 0.0)
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}); retry later", code="queue_full",
                       headers={"Retry-After": str(settings.retry_after_seconds)}) from None
    waiting = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            break
        if await request.is_disconnected():
            job.cancelled = True
            if not job.future.cancel():  # already running: its temporary file must outlive it
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await waiting
            return None
    try:
        return waiting.result()
    except ValueError as e:  # AudioError and the transcriber's other input errors
        raise APIError(400, str(e).replace(path, name), param="file", code="invalid_audio") from None


def _display_name(filename: str | None) -> str:
    """The client's name for its upload, for messages only (never a path here): its last
    component, printable characters only."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:200]
    return name or "the uploaded file"


def _render(result: dict, fmt: str, fields: dict) -> Response:
    if fmt == "json":
        return JSONResponse({"text": result["text"]})
    if fmt in ("text", "srt", "vtt"):
        writer = WRITERS["txt" if fmt == "text" else fmt]
        return PlainTextResponse(_write(writer, result), media_type="text/plain; charset=utf-8")
    return JSONResponse(verbose_json(result, fields["granularities"], fields["language"],
                                     {f: _write(WRITERS[f], result) for f in fields["extra_formats"]}))


def _write(writer_class, result: dict) -> str:
    buf = io.StringIO()
    writer_class(".").write_result(result, buf)
    return buf.getvalue()


def verbose_json(result: dict, granularities: set[str], language: str | None = None,
                 formats: dict[str, str] | None = None) -> dict:
    """OpenAI's ``verbose_json`` from a result dict: segments (always, with their words as an
    extension) and, when ``word`` is asked for, the flat word list; ``formats`` adds rendered
    outputs under ``w2v2_formats`` (the web page's downloads)."""
    duration = float(result["metadata"]["duration"])
    words = [w for s in result["segments"] for w in s["words"]]
    out = {
        "task": "transcribe",
        "language": language or "unknown",
        "duration": duration,
        "text": result["text"],
        "segments": [{
            "id": i, "seek": 0, "start": s["start"], "end": s["end"], "text": s["text"], "tokens": [],
            "temperature": 0.0, "avg_logprob": _mean_log_confidence(s["words"]), "compression_ratio": 1.0,
            "no_speech_prob": 0.0,
            "words": [{"word": w["word"], "start": w["start"], "end": w["end"], "probability": w["confidence"]}
                      for w in s["words"]],
        } for i, s in enumerate(result["segments"])],
        "usage": {"type": "duration", "seconds": duration},
    }
    if "word" in granularities:
        out["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"]} for w in words]
    if formats:
        out["w2v2_formats"] = formats
    return out


def _mean_log_confidence(words: list[dict]) -> float:
    conf = [max(float(w["confidence"]), 1e-9) for w in words]
    return sum(math.log(c) for c in conf) / len(conf) if conf else 0.0
