"""The durable request journal, `audit/journal.jsonl`: one JSON event per line.

A request is appended as `received` (carrying its `Request`), then moves through `approximated`
(an influence update served), `applied` (the data changed) and `verified` (its exact batch was
recorded). The journal is append-only, fsynced, and guarded by a file lock, so concurrent
commands serialise and no request is lost; a torn last line (a crash mid-append) is ignored and
repaired. Reads are cached by the file's identity: a command that asks the journal many
questions between two appends reads it once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmeraser.config import Float, Int
from lmeraser.errors import LmeraserError
from lmeraser.io import MissingFile, atomic_save_npy, atomic_write_bytes, read_trusted
from lmeraser.request import Identifier, Request
from lmeraser.salt import Keyer
from lmeraser.workspace import Workspace

MAX_JOURNAL = 1 << 30  # about two million requests

State = Literal["received", "approximated", "applied", "verified"]


class JournalEvent(BaseModel):
    """One line of the journal. A `received` event carries the request and the method it was
    submitted with; `approximated` and `verified` name the lineage record that covers it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    request_id: Identifier
    state: State
    time: Annotated[Float, Field(ge=0, le=1e11)]
    method: Literal["exact", "influence"] | None = None
    request: Request | None = None
    record: Annotated[Int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> JournalEvent:
        if (self.state == "received") != (self.request is not None) or (
            self.request is not None and self.request.request_id != self.request_id
        ):
            raise ValueError("a received event, and only one, carries its own request")
        if (self.state in ("approximated", "verified")) != (self.record is not None):
            raise ValueError("approximated and verified events, and only they, name a record")
        if self.method is not None and self.state != "received":
            raise ValueError("only a received event names a method")
        return self


@dataclass(frozen=True)
class JournalEntry:
    """One request's place in the journal: the request as received, its latest state and every
    event it went through (`{"request_id", "state", "time", ...}`, in order)."""

    request: Request | None  # None only for events of a request never received (an altered journal)
    state: str
    history: tuple[dict, ...]

    @property
    def method(self) -> str:
        """How it was submitted: "exact" or "influence"."""
        return self.history[0].get("method", "exact")

    @property
    def records(self) -> list[int]:
        """The lineage records that cover it (influence, then exact)."""
        return sorted({int(e["record"]) for e in self.history if "record" in e})


def event(request_id: str, state: str, at: float | None = None, **extra) -> dict:
    """A journal event at `at` (default: now)."""
    return {"request_id": request_id, "state": state, "time": time.time() if at is None else at, **extra}


@dataclass
class Submission:
    """A request accepted at intake, before it is journaled: the `Request` (without subject
    hashes yet) and what must never be journaled as given: the raw subject ids (keyed at
    submission) and the corrected image's pixels (copied into the workspace)."""

    request: Request
    subjects: list[str]
    image: np.ndarray | None = None  # the corrected image, validated


def received(request: Request, method: str = "exact", at: float | None = None) -> dict:
    """The `received` event of a request submitted with `method` ("exact" or "influence")."""
    return event(request.request_id, "received", at, request=request.to_json(), method=method)


_cache: dict[str, tuple[tuple, tuple[dict, ...], dict[str, JournalEntry]]] = {}
_cache_lock = threading.Lock()
reads = 0  # how many times a journal file was read and parsed (tests count it)


class Journal:
    """`audit/journal.jsonl` of one workspace."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.path = ws.journal_file

    def _repair(self) -> None:
        # A crash mid-append can leave a last line without its newline: drop it (it was never
        # acknowledged to the caller, who sees a failure and may resubmit).
        if os.path.lexists(self.path):
            raw = read_trusted(self.path, "request journal", MAX_JOURNAL)
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(self.path, raw[: raw.rfind(b"\n") + 1])

    def append(self, events: list[dict]) -> None:
        """Append events, skipping any that would repeat a request's current state: a step
        re-run after a crash (between its journal write and its own completion) changes nothing.
        A `received` event must carry a valid `Request` (what the journal cannot read back is
        never written)."""
        for e in events:
            JournalEvent.model_validate(e)  # raises ValidationError: what the journal cannot read back is never written
        with self.ws.lock("journal"):
            self._repair()
            current = {rid: entry.state for rid, entry in self.requests().items()}
            events = [e for e in events if current.get(e["request_id"]) != e["state"]]
            if not events:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.write(b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in events))
                handle.flush()
                os.fsync(handle.fileno())

    def _identity(self) -> tuple | None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)

    def _read(self) -> tuple[tuple[dict, ...], dict[str, JournalEntry]]:
        """The events and the entries, parsed once per version of the file."""
        identity = self._identity()
        with _cache_lock:
            cached = _cache.get(str(self.path))
        if identity is not None and cached is not None and cached[0] == identity:
            return cached[1], cached[2]
        events, requests = self._parse()
        entries: dict[str, dict] = {}
        for e, request in zip(events, requests, strict=True):
            entry = entries.setdefault(e["request_id"], {"request": None, "state": None, "history": []})
            entry["request"] = request or entry["request"]
            entry["state"] = e["state"]
            entry["history"].append(e)
        parsed = {rid: JournalEntry(e["request"], e["state"], tuple(e["history"])) for rid, e in entries.items()}
        if identity is not None and identity == self._identity():  # unchanged while it was read
            with _cache_lock:
                _cache[str(self.path)] = (identity, events, parsed)
        return events, parsed

    def _parse(self) -> tuple[tuple[dict, ...], tuple[Request | None, ...]]:
        """The events, and beside each the request it carries (a `received` event's; else None)."""
        global reads
        try:
            # A regular file, never through a link, bounded: a FIFO or device cannot hang a command.
            raw = read_trusted(self.path, "request journal", MAX_JOURNAL)
        except MissingFile:
            return (), ()
        reads += 1
        *lines, _tail = raw.split(b"\n")  # an unterminated tail is a torn append: ignored
        out, requests = [], []
        for number, line in enumerate(lines, start=1):
            try:
                e = json.loads(line)
                requests.append(JournalEvent.model_validate(e).request)
            except (ValueError, RecursionError, ValidationError):  # JSONDecodeError and UnicodeDecodeError included
                raise LmeraserError(
                    f"{self.path} line {number}: not a journal event (the journal was altered); restore it from git."
                ) from None
            out.append(e)
        return tuple(out), tuple(requests)

    def events(self) -> tuple[dict, ...]:
        """Every event, in order (shared: do not change them)."""
        return self._read()[0]

    def requests(self) -> dict[str, JournalEntry]:
        """request_id -> its entry, in order of first appearance."""
        return self._read()[1]

    def pending(self) -> list[Request]:
        """Received but not yet verified, in arrival order."""
        return [e.request for e in self.requests().values() if e.state != "verified" and e.request is not None]

    def awaiting_influence(self) -> list[Request]:
        """Requests submitted with `--method influence` whose influence update is not applied yet."""
        return [
            e.request
            for e in self.requests().values()
            if e.state == "received" and e.request is not None and e.method == "influence"
        ]

    def forgotten_subjects(self) -> set[str]:
        """Keyed hashes of the subjects of every forget request an exact batch completed."""
        done = [e.request for e in self.requests().values() if e.state == "verified" and e.request is not None]
        return {h for request in done if request.kind == "forget" for h in request.subject_hashes}

    def submit(self, accepted: list[Submission], method: str = "exact") -> list[Request]:
        """Journal the requests as `received`, after keying their subjects and copying each
        corrected image into the workspace (0600; deleted when its exact batch is recorded), so
        nothing outside the workspace is read again. Returns the requests as journaled."""
        keyer = Keyer(self.ws) if any(s.subjects for s in accepted) else None  # the salt is made with the first need
        requests = []
        for submission in accepted:
            request = submission.request
            if keyer:
                request = request.model_copy(
                    update={"subject_hashes": tuple(keyer.subject(s) for s in submission.subjects)}
                )
            if submission.image is not None:
                atomic_save_npy(self.ws.root / request.input_path, submission.image, mode=0o600)
            requests.append(request)
        self.append([received(r, method) for r in requests])
        return requests
