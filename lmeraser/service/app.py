"""The HTTP API: versioned under /v1, JSON in and out, one clear error per bad field.

Every endpoint but `/v1/health` needs the bearer token (401 otherwise, before anything else is
looked at, so unknown paths cannot be probed). A POST needs a Content-Length no larger than
`service.max_body_mib`, and the body actually read is held to that limit too (413 as soon as it
is passed, whatever the headers said, chunked or not). Fields are typed strictly: a label is an
integer (not `true`, not 3.0), pixels are integers 0..255 (a float is refused, never truncated).
The access log names the path only: a query string (which may carry a secret) is never logged.
Requests go through the same validation and journal as the CLI (`unlearning.intake.submit`); a
corrected image comes as a multipart upload (bytes, checked and copied into the workspace), never
as a path, so no request reads or writes outside the workspace.

  POST /v1/requests          submit (an influence request is answered after its update is served)
  GET  /v1/requests[/{id}]   state history, covering records, deadline
  GET  /v1/records[/{n}]     record summaries; one DSSE envelope as stored
  GET  /v1/verify            signatures, chain, signed head, signer, deployed artifacts
  POST /v1/predict           labels and the cluster that served each image
  GET  /v1/health            liveness and the batch worker's state (no token)
  GET  /v1/openapi.json      the API's OpenAPI schema
"""

from __future__ import annotations

import io
import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmeraser import __version__
from lmeraser.config import load_params
from lmeraser.errors import LmeraserError, shown
from lmeraser.io import npy_header
from lmeraser.request import RequestFields, RequestSpec
from lmeraser.service.auth import authorized
from lmeraser.service.worker import BatchWorker
from lmeraser.workspace import Workspace

MAX_PREDICT = 4096  # images per /v1/predict call
UPLOAD_NAME = "(uploaded image)"  # what a rectify request's `input` says when its image was uploaded


class _Fail(Exception):
    """An HTTP error with one sentence."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class RequestBody(RequestFields):
    """One request, as JSON: the CLI's fields, a strict integer label, and the method (a corrected
    image comes only as a multipart upload)."""

    label: Annotated[int, Strict(), Field(ge=0, lt=1 << 31)] | None = None
    method: Literal["exact", "influence"] = "exact"


class BatchBody(BaseModel):
    """Several requests accepted or refused together (like a requests file)."""

    model_config = ConfigDict(extra="forbid")
    requests: list[dict] = Field(min_length=1, max_length=10_000)
    method: Literal["exact", "influence"] = "exact"


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": shown(message, 2000), **extra}, status_code=status, headers=headers)


def _field_error(error: ValidationError, prefix: str = "") -> _Fail:
    """The first bad field of a body, named (e.g. `requests[2].label`)."""
    first = error.errors()[0]
    parts = [f"[{p}]" if isinstance(p, int) else p for p in first["loc"]]
    field = (prefix + ".".join(str(p) for p in parts).replace(".[", "[")).rstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field" + (
            " (a corrected image is sent as a multipart upload named 'image')" if field.endswith("input") else ""
        )
    return _Fail(422, f"{shown(field) or 'body'}: {message}.", field=shown(field))


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _json(raw: bytes, what: str):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise _Fail(400, f"{what}: not valid JSON.") from None


def _specs(body, has_image: bool) -> tuple[list[RequestSpec], str]:
    """The validated requests of a body and their method."""
    if not isinstance(body, dict):
        raise _Fail(422, "body: a JSON object is expected (one request, or {'requests': [...]}).")
    try:
        if "requests" in body:
            batch = BatchBody.model_validate(body)
            items, method, prefix = batch.requests, batch.method, "requests"
        else:
            single = RequestBody.model_validate(body)
            items, method, prefix = [single.model_dump(exclude={"method"})], single.method, ""
    except ValidationError as error:
        raise _field_error(error) from None
    if has_image and (len(items) != 1 or items[0].get("kind") != "rectify"):
        raise _Fail(422, "image: an uploaded image belongs to a single rectify request.")
    specs = []
    for number, item in enumerate(items):
        where = f"{prefix}[{number}]." if prefix else ""
        forbidden = (
            sorted({"input", "allow_backbone_rebuild", "method"} & item.keys())
            if isinstance(item, dict) and prefix
            else []
        )
        if forbidden:
            bad = forbidden[0]
            raise _Fail(
                422,
                f"{where}{bad}: unknown field (one method for the whole body; images as a multipart upload; "
                "no backbone rebuilds over HTTP).",
                field=f"{where}{bad}",
            )
        fields = dict(item) if isinstance(item, dict) else item
        if isinstance(fields, dict) and fields.get("label") is not None and type(fields["label"]) is not int:
            raise _Fail(
                422,
                f"{where}label: an integer is expected, not {shown(json.dumps(fields['label']))}.",
                field=f"{where}label",
            )
        if has_image and isinstance(fields, dict):
            fields["input"] = UPLOAD_NAME
        try:
            specs.append(RequestSpec.model_validate(fields))
        except ValidationError as error:
            raise _field_error(error, where) from None
    return specs, method


class _ServedModel:
    """The serving model, kept loaded; reloaded when a batch or an influence update changed what
    is served (the backbone, prototypes, prompt index or overlay files)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._lock = threading.Lock()
        self._key = None
        self._model = None

    def _fingerprint(self) -> tuple:
        out = []
        for path in (
            self.ws.backbone_weights,
            self.ws.prototypes_file,
            self.ws.prompt_index_file,
            self.ws.overlay_file,
        ):
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def _current(self, force: bool = False):
        from lmeraser.inference import ServingModel

        key = self._fingerprint()
        if force or key != self._key or self._model is None:
            self._model, self._key = ServingModel.load(self.ws), key
        return self._model

    def predict(self, images: np.ndarray) -> dict:
        with self._lock:
            try:
                model = self._current()
                labels, routes = model.predict(images)
            except (FileNotFoundError, KeyError):  # a batch swapped the prompts mid-call: load them again
                model = self._current(force=True)
                labels, routes = model.predict(images)
            approximate = {int(c) for c in model.overlay}
        return {
            "labels": [int(v) for v in labels],
            "clusters": [int(v) for v in routes],
            "served": {
                str(c): ("approximate" if c in approximate else "exact") for c in sorted({int(v) for v in routes})
            },
        }

    def warm(self) -> None:
        with self._lock:
            try:
                self._current()
            except LmeraserError:
                pass  # nothing trained yet: /v1/predict says so when asked


def _images(raw: bytes, content_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """Images for /v1/predict: a .npy array (application/x-npy) or JSON {"images": [...]}."""
    if content_type == "application/x-npy" or raw[:6] == b"\x93NUMPY":
        try:
            found, dtype = npy_header(raw)
            if (
                dtype.kind not in "iu"
                or len(found) != len(shape) + 1
                or tuple(found[1:]) != shape
                or not 0 < found[0] <= MAX_PREDICT
            ):
                expected = f"an integer array of shape (N, {', '.join(map(str, shape))}) with 1 <= N <= {MAX_PREDICT}"
                raise _Fail(422, f"images: {expected} is expected, not {shown(found)} {shown(dtype)}.", field="images")
            images = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, EOFError, OSError):
            raise _Fail(422, "images: not a .npy array file (save it with numpy.save).", field="images") from None
    else:
        body = _json(raw, "request body")
        if not isinstance(body, dict) or set(body) != {"images"}:
            raise _Fail(422, 'body: {"images": [[...], ...]} is expected (or a .npy file as application/x-npy).')
        try:
            pixels = _pixel_lists(len(shape) + 1).validate_python(body["images"])
        except ValidationError as error:
            first = error.errors()[0]
            where = "".join(f"[{p}]" for p in first["loc"])
            if first["type"] == "list_type":
                expected = f"shape (N, {', '.join(map(str, shape))}) with 1 <= N <= {MAX_PREDICT} is expected"
                raise _Fail(
                    422, f"images{where}: a list is expected here (images of {expected}).", field=f"images{where}"
                ) from None
            found = shown(json.dumps(first["input"]), 40)
            raise _Fail(
                422, f"images{where}: pixels must be integers in 0..255, not {found}.", field=f"images{where}"
            ) from None
        try:
            images = np.asarray(pixels, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise _Fail(
                422, "images: a list of equally shaped arrays of integers is expected.", field="images"
            ) from None
        if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != shape or not 0 < len(images) <= MAX_PREDICT:
            raise _Fail(
                422,
                f"images: shape (N, {', '.join(map(str, shape))}) with 1 <= N <= {MAX_PREDICT} is expected, "
                f"not {images.shape}.",
                field="images",
            )
    if images.min() < 0 or images.max() > 255:
        raise _Fail(422, "images: pixels must be integers in 0..255.", field="images")
    return images.astype(np.uint8)


_PIXEL = Annotated[int, Strict(), Field(ge=0, le=255)]
_PIXEL_LISTS: dict[int, TypeAdapter] = {}


def _pixel_lists(depth: int) -> TypeAdapter:
    """Nested lists `depth` deep of pixels: strict integers 0..255 (no float, bool or string)."""
    if depth not in _PIXEL_LISTS:
        kind = _PIXEL
        for _ in range(depth):
            kind = list[kind]
        _PIXEL_LISTS[depth] = TypeAdapter(kind)
    return _PIXEL_LISTS[depth]


class _BodyLimit:
    """ASGI middleware: a request body is counted as it is read, and reading it past `limit` bytes
    answers 413 at once, whatever Content-Length or Transfer-Encoding claimed."""

    def __init__(self, app, limit: int, mib: int):
        self.app, self.limit, self.mib = app, limit, mib

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.limit:
                    raise _Fail(413, f"request body larger than service.max_body_mib ({self.mib} MiB).")
            return message

        return await self.app(scope, counted, send)


class _PathOnly(logging.Filter):
    """uvicorn's access log with the path only: the query string is dropped (a client may have put
    a token or an id in it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def access_log_config() -> dict:
    """uvicorn's logging configuration with the query string kept out of its access log."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["path_only"] = {"()": _PathOnly}
    config["handlers"]["access"]["filters"] = ["path_only"]
    return config


def create_app(ws: Workspace, token: str, worker: BatchWorker | None = None, log=print) -> FastAPI:
    """The API over workspace `ws`; `worker` (if given) runs while the app does."""
    params = load_params(ws.params_file)
    limit = params.service.max_body_mib << 20
    model = _ServedModel(ws)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(model.warm)
        if worker is not None:
            worker.start()
        yield
        if worker is not None:
            await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="lmeraser", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )
    app.add_middleware(_BodyLimit, limit=limit, mib=params.service.max_body_mib)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/v1/health" and not authorized(request.headers.get("authorization"), token):
            return _error(
                401,
                "missing or wrong bearer token (send 'Authorization: Bearer <token>').",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "a request body needs a Content-Length header.")
            if not length.isdigit() or int(length) > limit:
                return _error(
                    413,
                    f"request body larger than service.max_body_mib ({params.service.max_body_mib} MiB).",
                    headers={"Connection": "close"},
                )
        return await call_next(request)

    @app.exception_handler(_Fail)
    async def _on_fail(request: Request, error: _Fail):
        # A body over the limit is not read further: the connection closes after the answer.
        return _error(
            error.status, error.message, headers={"Connection": "close"} if error.status == 413 else None, **error.extra
        )

    @app.exception_handler(LmeraserError)
    async def _on_refused(request: Request, error: LmeraserError):
        return _error(422, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, error: StarletteHTTPException):
        # Starlette's own refusals (no such path or method, a malformed multipart body) in the same shape.
        message = {
            404: f"no such endpoint: {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(error.status_code)
        return _error(error.status_code, message or f"{error.detail}.")

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, error: Exception):
        log(f"service: {request.method} {request.url.path} failed: {type(error).__name__}: {shown(str(error), 500)}")
        return _error(500, f"internal error ({type(error).__name__}); the service log has the details.")

    @app.get("/v1/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/v1/health")
    def health(request: Request) -> dict:
        """Liveness, the version and whether the worker runs (no token needed); with the token, the
        worker's full state (batches, the last batch, the last error, which may name a sample)."""
        status = worker.status() if worker else None
        if status is not None and not authorized(request.headers.get("authorization"), token):
            status = {"running": status["running"], "busy": status["busy"], "warm": status["warm"]}
        return {"status": "ok", "version": __version__, "worker": status}

    @app.post("/v1/requests", status_code=201)
    async def post_requests(request: Request) -> dict:
        """Submit forget or rectify requests: JSON, or multipart with a `request` JSON field and an
        `image` file (the corrected image of a rectify request, .npy or PNG)."""
        content_type = _content_type(request)
        upload = None
        if content_type == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=1)
            text, image = form.get("request"), form.get("image")
            if not isinstance(text, str):
                raise _Fail(
                    422, "request: the multipart field 'request' (the request as JSON) is missing.", field="request"
                )
            if image is not None:
                if isinstance(image, str):
                    raise _Fail(422, "image: must be a file upload.", field="image")
                upload = await image.read()
            body = _json(text.encode(), "request")
        elif content_type in ("application/json", ""):
            body = _json(await request.body(), "request body")
        else:
            raise _Fail(
                415,
                f"content type {shown(content_type, 80)}: send application/json, or multipart/form-data with an image.",
            )
        specs, method = _specs(body, upload is not None)
        return await run_in_threadpool(_submit, specs, method, upload)

    def _submit(specs: list[RequestSpec], method: str, upload: bytes | None) -> dict:
        from lmeraser.unlearning.intake import submit

        resolved = submit(specs, ws, method, [upload] if upload is not None else None)
        ids = [r.request_id for r in resolved]
        if worker is not None:
            worker.wake()  # it looks at the journal now, not at its next poll
        answer = {"method": method, "influence": None}
        if method == "influence":
            from lmeraser.unlearning.influence_update import influence_pending

            try:
                answer["influence"] = influence_pending(ws, lambda m: None)
            except LmeraserError as error:
                raise _Fail(
                    500, f"accepted {', '.join(ids)}, but the influence update failed: {error}", requests=_statuses(ids)
                ) from None
        answer["requests"] = _statuses(ids)
        return answer

    def _statuses(ids: list[str] | None = None) -> list[dict]:
        from lmeraser.unlearning.status import request_statuses

        statuses = request_statuses(ws, params.requests)
        if ids is not None:
            wanted = set(ids)
            statuses = [s for s in statuses if s.request_id in wanted]
        return [s.to_json() for s in statuses]

    @app.get("/v1/requests")
    def list_requests(pending: bool = False, overdue: bool = False) -> list[dict]:
        """Every request (or only those not verified / past their deadline), in order of receipt."""
        return [
            s
            for s in _statuses()
            if (not pending or s["state"] != "verified") and (not overdue or s["flag"] == "overdue")
        ]

    @app.get("/v1/requests/{request_id}")
    def get_request(request_id: str) -> dict:
        """One request: state history with timestamps, covering records, deadline."""
        found = _statuses([request_id])
        if not found:
            raise _Fail(404, f"request {shown(request_id, 80)} is unknown.")
        return found[0]

    @app.get("/v1/records")
    def list_records() -> list[dict]:
        """A summary of every lineage record (not verified: /v1/verify checks them)."""
        from lmeraser.lineage.records import lineage_log, summary_row

        return [
            {"number": r.number, "line_sha256": r.line_sha256, "summary": summary_row(r)}
            for r in lineage_log(ws).read_unverified()
        ]

    @app.get("/v1/records/{number}")
    def get_record(number: int) -> Response:
        """Record `number`'s DSSE envelope, byte for byte as stored in the log."""
        from lmeraser.lineage.records import lineage_log

        try:
            line = lineage_log(ws).envelope(number)
        except LmeraserError as error:
            raise _Fail(404, str(error)) from None
        return Response(line, media_type="application/json")

    @app.get("/v1/verify")
    def verify_log() -> JSONResponse:
        """What `lmeraser audit verify` checks, against the pinned signer; 409 when a check fails."""
        from lmeraser.audit.verify import public_key, verify
        from lmeraser.lineage.keys import key_id

        try:
            key = public_key(ws, None)
            records = verify(ws, key)
        except LmeraserError as error:
            return JSONResponse({"ok": False, "error": shown(str(error), 2000)}, status_code=409)
        return JSONResponse(
            {"ok": True, "records": len(records), "signer": key_id(key), "deployed_match_record": records[-1].number}
        )

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        """Labels for images (JSON {"images": [...]} or a .npy body), with the cluster that served
        each and whether that cluster serves its exact prompt or an influence overlay."""
        content_type = _content_type(request)
        raw = await request.body()
        shape = tuple(ws.source_info()["image_shape"])
        images = _images(raw, content_type, shape)
        return await run_in_threadpool(model.predict, images)

    return app


def serve(ws: Workspace, host: str, port: int, token: str, worker: BatchWorker | None, log=print) -> None:
    """Run the API, and its batch worker if one is given (the CLI builds it with the flows' batch
    runner: the service itself never imports the orchestration), until interrupted."""
    import uvicorn

    app = create_app(ws, token, worker, log)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True, log_config=access_log_config())
