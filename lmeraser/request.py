"""What a forget or rectify request is: `RequestSpec`, what a person asks (a requests-file line,
a CLI invocation, an HTTP body), and `Request`, the one validated form the journal stores, the
batch processes and the record summarises, from intake to record. A `Request` never holds a raw
subject id (subjects are keyed with the salt at submission) nor pixels (a corrected image is
copied into the workspace, and `input_path` names the copy).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

from lmeraser.config import Bool, Float, Int
from lmeraser.errors import LmeraserError, shown
from lmeraser.io import npy_header, read_input_bytes
from lmeraser.workspace import Workspace, image_channels

# Limits on what a request may carry: far above any real request, far below what could exhaust
# memory or flood a terminal.
MAX_REQUESTS_FILE = 16 << 20
MAX_LINE = 64 << 10
MAX_ID = 256
MAX_IDS = 100_000
MAX_IMAGE_FILE = 16 << 20


def _plain_id(value: str) -> str:
    if any(not c.isprintable() for c in value):
        raise ValueError(f"id {shown(value)} holds a control character")
    return value


Identifier = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID), AfterValidator(_plain_id)]
Digest = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]  # a keyed (HMAC-SHA256) hash, hex


RequestKind = Literal["forget", "rectify"]


class RequestFields(BaseModel):
    """What every form of a request asks: the fields a requests-file line, the CLI's options and
    the HTTP body share."""

    model_config = ConfigDict(extra="forbid")
    kind: RequestKind = "forget"
    sample_ids: list[Identifier] = Field(default=[], max_length=MAX_IDS)
    subjects: list[Identifier] = Field(default=[], max_length=MAX_IDS)
    label: int | None = Field(default=None, ge=0, lt=1 << 31)


class RequestSpec(RequestFields):
    """One line of a requests file, one CLI invocation, or one HTTP request, checked for shape."""

    input: str | None = Field(default=None, max_length=4096)  # path of a corrected image (.npy or .png), rectify only
    allow_backbone_rebuild: bool = False  # from the command line only: a requests file cannot grant it

    @model_validator(mode="after")
    def _shape(self) -> RequestSpec:
        if self.kind == "forget":
            if not self.sample_ids and not self.subjects:
                raise ValueError("a forget request needs sample_ids or subjects")
            if self.label is not None or self.input is not None:
                raise ValueError("label and input belong to rectify requests")
        else:
            if len(self.sample_ids) != 1 or self.subjects:
                raise ValueError("a rectify request names exactly one sample id")
            if (self.label is None) == (self.input is None):
                raise ValueError("a rectify request needs exactly one of label or input")
        return self


class Request(BaseModel):
    """A validated request: what the journal stores (`received`), the batch processes and the
    record summarises. Frozen: no step changes a request; sequences are tuples. Strict: a value of
    another JSON type (a string for a number, a bool for a label) is refused, never coerced."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    request_id: Identifier
    kind: RequestKind
    sample_ids: tuple[Identifier, ...]  # targets still in the data when it was received (acted on)
    already_forgotten: tuple[Identifier, ...] = ()  # targets forgotten before: idempotent no-ops
    subjects_already_forgotten: tuple[Digest, ...] = ()  # keyed hashes of subjects forgotten before: no-ops too
    subject_hashes: tuple[Digest, ...] = ()  # the named subjects, keyed with the salt at submission
    public: Bool = False  # names public samples (an exact batch then rebuilds the backbone)
    label: Annotated[Int, Field(ge=0, lt=1 << 31)] | None = None  # rectify: the corrected label
    input_path: StrictStr | None = None  # rectify: the corrected image's copy in the workspace, relative to its root
    received_at: Annotated[Float, Field(ge=0, le=1e11)]  # seconds since the epoch

    @model_validator(mode="after")
    def _input_in_the_workspace(self) -> Request:
        # The batch deletes this file once the data holds the correction: it can only be the copy
        # intake made, never a path chosen by whoever wrote the journal or the batch file.
        if self.input_path is not None and (
            self.kind != "rectify" or self.input_path != Workspace.corrected_input(self.request_id)
        ):
            raise ValueError(
                f"input_path must be {Workspace.corrected_input(self.request_id)} (a rectify request's copy), "
                f"not {shown(self.input_path)}"
            )
        return self

    def to_json(self) -> dict:
        """The journal's and the batch file's form (lists, as JSON has them)."""
        return self.model_dump(mode="json")

    def only(self, sample_ids: list[str]) -> Request:
        """This request narrowed to some of its targets (an influence edit of one cluster)."""
        return self.model_copy(update={"sample_ids": tuple(sample_ids)})


def load_corrected_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A corrected image (.npy or .png), read once from a regular file of bounded size."""
    raw = read_input_bytes(path, "corrected input", MAX_IMAGE_FILE)
    return decode_corrected_image(raw, shown(path, 200), path.suffix == ".npy", shape)


def decode_corrected_image(raw: bytes, where: str, is_npy: bool, shape: tuple[int, ...]) -> np.ndarray:
    """A corrected image from its bytes (.npy, or PNG and other Pillow formats); its shape and
    dtype are checked from the header before any pixel is decoded; `where` names it in errors."""
    if len(raw) > MAX_IMAGE_FILE:
        raise LmeraserError(f"{where}: larger than {MAX_IMAGE_FILE >> 20} MiB.")
    if is_npy:
        try:
            found, dtype = npy_header(raw)
        except ValueError:
            raise LmeraserError(f"{where}: not a .npy array file (save it with numpy.save).") from None
        if tuple(found) != tuple(shape):
            raise LmeraserError(f"{where}: corrected input has shape {shown(found)}, expected {tuple(shape)}.")
        if dtype.kind not in "iu":
            raise LmeraserError(f"{where}: pixels must be integers in 0..255 (the array holds {shown(dtype)}).")
        try:
            image = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, EOFError, OSError):
            raise LmeraserError(f"{where}: a truncated .npy array file.") from None
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as picture:
                rgb = image_channels(shape) == 3
                if rgb and picture.mode != "RGB":
                    raise LmeraserError(
                        f"{where}: a {shown(picture.mode)} image, but the data is RGB; give an RGB image, "
                        "it is never converted."
                    )
                if not rgb and picture.mode not in ("L", "1"):
                    raise LmeraserError(
                        f"{where}: a {shown(picture.mode)} image, but the data is grey; give a grey (mode L) image, "
                        "it is never converted."
                    )
                if (picture.height, picture.width) != tuple(shape[:2]):
                    raise LmeraserError(
                        f"{where}: corrected input is {picture.height}x{picture.width}, expected {tuple(shape)}."
                    )
                image = np.asarray(picture if rgb else picture.convert("L"))
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError):
            raise LmeraserError(f"{where}: not a readable PNG or other image file.") from None
    if image.shape != tuple(shape):
        raise LmeraserError(f"{where}: corrected input has shape {image.shape}, expected {tuple(shape)}.")
    if image.min() < 0 or image.max() > 255:
        raise LmeraserError(f"{where}: pixels must be integers in 0..255.")
    return image.astype(np.uint8)


def corrected_image(ws: Workspace, request: Request) -> np.ndarray:
    """A rectify request's corrected image, from its copy in the workspace."""
    return load_corrected_image(ws.root / request.input_path, tuple(ws.source_info()["image_shape"]))
