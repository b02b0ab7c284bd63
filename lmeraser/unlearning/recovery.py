"""What a killed `unlearn` or influence update left behind, finished or undone before the next one.

Run under the `unlearn` lock at the start of every exact batch and influence update:
  - data/: an interrupted directory swap rolls forward or back; temporary files of dead writers go
    (io.recover_directory), so nothing stale is ever versioned or pushed;
  - audit/: temporary files of dead writers go;
  - DVC's own lock-info file, `dvc.lock` and `*.dvc`, if a killed dvc process left one torn (DVC
    writes them in place): the lock-info file goes, the others come back from git HEAD;
  - the influence update: its intent file (written before the overlay changes) says what to do.
    If its record was appended, the journal is told (the record then stands, and the next exact
    batch supersedes it); if not, the overlay is restored as it was and the files the update
    wrote are deleted, so the requests are simply applied again.
"""

from __future__ import annotations

import json

from lmeraser.data.splits import recover_data
from lmeraser.errors import LmeraserError
from lmeraser.io import remove_stale_temp_files
from lmeraser.journal import Journal, event
from lmeraser.lineage.records import lineage_log
from lmeraser.overlay import Overlay
from lmeraser.versioning import repair_dvc_files, repair_dvc_rwlock
from lmeraser.workspace import Workspace


def recover(ws: Workspace, log=print) -> list[str]:
    """Finish or undo what a killed process left (a half-swapped data directory, DVC's locks and
    files, temporary files, an influence update's intent), before the next batch or update.

    Args:
        ws: the workspace, under its `unlearn` lock.
        log: where each repair is reported.

    Returns:
        One line per repair made.
    """
    done = recover_data(ws)
    done += repair_dvc_rwlock(ws.root)
    done += repair_dvc_files(ws.root)
    for directory in (ws.audit, ws.batches):
        done += [f"removed the temporary file {ws.relative(p)}" for p in remove_stale_temp_files(directory)]
    done += recover_influence(ws)
    for line in done:
        log(f"recovery: {line}")
    return done


def recover_influence(ws: Workspace) -> list[str]:
    """Finish or undo an influence update its intent file says was interrupted (see the module's
    docstring); one line per repair.

    Args:
        ws: the workspace, under its `unlearn` lock (its influence intent file, overlay and lineage log).
    """
    path = ws.influence_intent_file
    if not path.exists():
        return []
    try:
        intent = json.loads(path.read_bytes())
        batch_id, request_ids, before = intent["batch_id"], intent["request_ids"], intent["overlay_before"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise LmeraserError(
            f"{path}: not an influence intent file (it was altered); restore it, or the overlay, from a backup."
        ) from None
    overlay = Overlay(ws)
    records = [r for r in lineage_log(ws).read_unverified() if r.predicate.get("batch_id") == batch_id]
    if records:
        number = records[0].number
        Journal(ws).append([event(rid, "approximated", record=number) for rid in request_ids])
        path.unlink()
        return [f"influence update {batch_id}: record {number} was appended; the journal now says so"]
    if before is None:
        overlay.path.unlink(missing_ok=True)
    else:
        overlay.write(before)
    removed = overlay.store.prune({e["key"] for e in (before or {}).values()})
    path.unlink()
    return [
        f"influence update {batch_id} was interrupted before its record: overlay restored, "
        f"{len(removed)} file(s) it wrote deleted"
    ]
