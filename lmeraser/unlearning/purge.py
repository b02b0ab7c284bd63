"""Purge what was trained on, or contains, forgotten samples (invariant 5); `audit scan`
(lmeraser/audit/scan.py) searches the same locations to prove it is gone."""

from __future__ import annotations

from lmeraser.audit.scan import files, storage_roots
from lmeraser.io import sha256_file
from lmeraser.versioning import dvc
from lmeraser.workspace import Workspace


def purge(ws: Workspace, superseded_artifacts: set[str], log=print) -> dict:
    """Delete superseded artifacts from the MLflow roots, then garbage-collect DVC cache and remote.

    The artifact store needs nothing here: the train stage already pruned every superseded key
    (and the scan checks that it did).
    """
    roots = storage_roots(ws)
    removed = []
    if superseded_artifacts:
        for location in ("mlflow artifacts", "mlflow (default root)"):
            for path in files(roots[location]):
                if sha256_file(path) in superseded_artifacts:
                    path.unlink()
                    removed.append(str(path))
    # Push the current version first so the remote keeps what the workspace needs, then drop
    # every cache and remote object that only older data versions reference.
    remote = roots.get("dvc remote")
    if remote is not None:
        dvc(ws.root, "push", "-q")
    dvc(ws.root, "gc", "--workspace", "--force", "-q")
    if remote is not None and remote.exists():
        dvc(ws.root, "gc", "--workspace", "--cloud", "--force", "-q")
    log(f"purged {len(removed)} superseded artifact file(s); DVC cache{' and remote' if remote else ''} garbage-collected")
    return {"artifact_files_removed": len(removed), "dvc_gc": True, "remote_gc": remote is not None}
