"""Exact batches inside the service: one at a time, under the same `unlearn` lock as the CLI.

A batch starts once the oldest pending request has waited `service.batch_window_s` (requests that
arrive together share one rebuild) or `service.max_batch` requests are pending, and takes at most
`max_batch` of them. An interrupted batch (the service was killed mid-batch) is finished first, at
start-up, exactly as `lmeraser unlearn` would finish it. A failed batch is logged, shown by
`/v1/health`, and tried again after the window: the requests stay pending, nothing is lost.

The worker pays the batch's imports and numeric fingerprint once, at start (`warm_up`), and tracks
a batch's MLflow runs when no request is pending (`run_tracking`), so neither sits between a
request and its signed record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lmeraser.config import ServiceParams
from lmeraser.errors import shown
from lmeraser.journal import Journal
from lmeraser.tracking import backlog_file
from lmeraser.workspace import Workspace

RETRY_AFTER_S = 5.0  # the least wait before a failed batch is tried again
RunBatch = Callable[[int], dict | None]  # max_requests -> the batch summary, or None when idle
RunScan = Callable[[], dict]  # a full scan -> its summary
RunTracking = Callable[[], dict]  # track the backlog -> {"tracked": [...], "waiting": [...]}
TRACKING_RETRY_S = 60.0  # a tracking server that failed is tried again after this


def full_scan(ws: Workspace) -> RunScan:
    """`lmeraser audit scan --full` in the worker, under the `unlearn` lock (a batch half-way
    through its purge would show hits that its own verification is about to clear)."""

    def run() -> dict:
        from lmeraser.audit.scan import scan, scan_targets

        with ws.lock("unlearn"):
            targets = scan_targets(ws)
            report = scan(
                ws, targets.sample_keys, targets.artifact_hashes, reference_digests=targets.reference_digests, full=True
            )
        return {**report.summary(), "locations_with_hits": sorted({h.location for h in report.hits})}

    return run


def last_full_scan(ws: Workspace) -> float:
    """When the scan index says every file was last read (0: never). Only schedules a scan: the
    scan itself authenticates the index before trusting a byte of it."""
    import json

    try:
        return float(json.loads(ws.scan_index_file.read_bytes())["body"]["full_scan_at"] or 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def warm_up(ws: Workspace) -> Callable[[], None]:
    def run() -> None:
        from lmeraser.unlearning.exact import preload

        preload(ws)

    return run


class BatchWorker:
    def __init__(
        self,
        ws: Workspace,
        params: ServiceParams,
        run_batch: RunBatch,
        log: Callable[[str], None] = print,
        poll_s: float = 0.5,
        run_scan: RunScan | None = None,
        run_tracking: RunTracking | None = None,
        warm_up: Callable[[], None] | None = None,
    ):
        self.ws, self.params, self.run_batch, self.log, self.poll_s = ws, params, run_batch, log, poll_s
        self.run_scan = run_scan if run_scan is not None else full_scan(ws)
        self.run_tracking, self.warm_up = run_tracking, warm_up
        self.last_tracking: dict | None = None  # what the worker's latest tracking did
        self.warm = warm_up is None  # the warm-up has finished (or there is none)
        self._tracking_failed_at = 0.0
        self.last_full_scan: dict | None = None  # the summary of this worker's latest full scan
        self._full_scan_at = last_full_scan(ws)
        self.batches = 0  # batches this worker completed
        self.busy = False
        self.last_batch: dict | None = None
        self.last_error: str | None = None
        self._failed_at = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by the API when a request arrives
        self._thread: threading.Thread | None = None

    def interrupted(self) -> bool:
        """A batch (or influence update) a killed process left half-done."""
        return bool(self.ws.batch_files()) or self.ws.influence_intent_file.exists()

    def due(self, now: float) -> bool:
        """Whether a batch should start now."""
        if now - self._failed_at < max(self.params.batch_window_s, RETRY_AFTER_S):
            return False  # after a failure, wait before trying again
        if self.interrupted():
            return True
        count, oldest = self._pending()
        return count > 0 and (count >= self.params.max_batch or now - oldest >= self.params.batch_window_s)

    def _pending(self) -> tuple[int, float]:
        """How many requests are pending and when the oldest arrived (the journal caches its
        parse: this runs every `poll_s`, and reads the file again only when it changed)."""
        pending = Journal(self.ws).pending()
        return len(pending), min((r.received_at for r in pending), default=0.0)

    def run_once(self) -> dict | None:
        """One batch now (at most `max_batch` requests); its summary, or None when idle."""
        self.busy = True
        try:
            result = self.run_batch(self.params.max_batch)
        except Exception as error:  # the service stays up; the requests stay pending
            self.last_error = shown(str(error), 500)
            self._failed_at = time.time()
            self.log(f"worker: batch failed: {self.last_error}")
            return None
        finally:
            self.busy = False
        self.last_error = None
        if result is not None:
            self.batches += 1
            self.last_batch = {
                "batch_id": result.get("batch_id"),
                "record": result.get("record"),
                "rebuilt": result.get("rebuilt"),
                "finished_at": time.time(),
            }
            self.log(
                f"worker: batch {result.get('batch_id')} done: record {result.get('record')}, "
                f"rebuilt clusters {result.get('rebuilt')}"
            )
        return result

    def full_scan_due(self, now: float) -> bool:
        """Idle, and the last full scan is `service.full_scan_every_s` old (0: never)."""
        every = self.params.full_scan_every_s
        return every > 0 and now - self._full_scan_at >= every

    def scan_once(self) -> dict | None:
        """A full scan now: every file of every store read again; hits are logged and shown by
        `/v1/health` (the batch that would have made them is long signed: a person must look)."""
        self.busy = True
        started = time.time()
        try:
            summary = self.run_scan()
        except Exception as error:  # shown, tried again after the interval
            self.last_full_scan = {"started_at": started, "error": shown(str(error), 500)}
            self.log(f"worker: full scan failed: {self.last_full_scan['error']}")
            return None
        finally:
            self.busy = False
            self._full_scan_at = started
        self.last_full_scan = {"started_at": started, "finished_at": time.time(), **summary}
        files = sum(summary["files_read"].values())
        if summary["hits"]:
            where = ", ".join(summary["locations_with_hits"])
            self.log(
                f"worker: full scan: {summary['hits']} hit(s): forgotten data survives in {where}; "
                "run `lmeraser audit scan`"
            )
        else:
            self.log(f"worker: full scan: read {files} files, 0 hits")
        return self.last_full_scan

    def tracking_due(self, now: float) -> bool:
        """Runs wait in the tracking backlog, no batch is half-done, and the last try (if it
        failed) is `TRACKING_RETRY_S` old."""
        return (
            self.run_tracking is not None
            and now - self._tracking_failed_at >= TRACKING_RETRY_S
            and backlog_file(self.ws).exists()
            and not self.interrupted()
        )

    def track_once(self) -> dict:
        """Track the backlog now; what did not track waits for the next try (never raises)."""
        self.busy = True
        try:
            try:
                result = self.run_tracking()
            except Exception as error:  # noqa: BLE001 - tracking never stops the worker
                result = {"tracked": [], "waiting": ["backlog"], "error": shown(str(error), 300)}
                self.log(f"worker: tracking failed: {result['error']}")
            if result.get("waiting"):
                self._tracking_failed_at = time.time()
            self.last_tracking = {"finished_at": time.time(), **result}
            return self.last_tracking
        finally:
            self.busy = False

    def _loop(self) -> None:
        if self.warm_up is not None:
            try:
                self.warm_up()
            except Exception as error:  # noqa: BLE001 - the first batch then pays it, or fails with its own sentence
                self.log(f"worker: warm-up failed ({shown(str(error), 300)}); the first batch imports what it needs")
            self.warm = True
        while not self._stop.is_set():
            try:
                now = time.time()
                if self.due(now):
                    self.run_once()
                    continue  # more may be pending (max_batch): look again at once
                if self.tracking_due(now):
                    self.track_once()
                    continue  # a request may have arrived meanwhile
                if not self.interrupted() and self.full_scan_due(now):
                    self.scan_once()
                    continue
            except Exception as error:  # a journal it cannot read: shown, retried
                self.last_error = shown(str(error), 500)
                self._failed_at = time.time()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def wake(self) -> None:
        """Look at the journal now (a request arrived), not at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lmeraser-batch-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the batch in progress (a batch is never abandoned half-way by a clean stop)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict:
        return {
            "running": bool(self._thread and self._thread.is_alive()),
            "busy": self.busy,
            "warm": self.warm,
            "batches": self.batches,
            "last_batch": self.last_batch,
            "last_error": self.last_error,
            "batch_window_s": self.params.batch_window_s,
            "max_batch": self.params.max_batch,
            "full_scan_every_s": self.params.full_scan_every_s,
            "last_full_scan": self.last_full_scan,
            "last_tracking": self.last_tracking,
        }
