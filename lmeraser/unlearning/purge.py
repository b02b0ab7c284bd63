"""Purge what was trained on, or contains, forgotten samples (invariant 5); `audit scan`
(lmeraser/audit/scan.py) searches the same locations to prove it is gone."""

from __future__ import annotations

from lmeraser.audit.stores import storage_locations
from lmeraser.errors import LmeraserError, reason
from lmeraser.io import atomic_write_json, read_json, sha256_file
from lmeraser.store import ArtifactStore
from lmeraser.versioning import dvc_repo, dvc_step, remotes
from lmeraser.workspace import Workspace


def superseded_in_store(ws: Workspace, superseded_artifacts: set[str]) -> list[str]:
    """The prompt store's keys that no cluster serves and whose file is a superseded artifact (by
    sha256): the prompts the last record pinned (the train stage keeps pinned keys) that a rebuild replaced.

    Args:
        ws: the workspace whose prompt store and index are read.
        superseded_artifacts: sha256 of prompt files no longer served anywhere.
    """
    store, deployed = ArtifactStore(ws.store_dir), {e.key for e in ws.prompt_index_or_empty().clusters.values()}
    return sorted(key for key in store.keys() - deployed if sha256_file(store.path(key)) in superseded_artifacts)


def remove_from_store(ws: Workspace, keys: list[str]) -> list[str]:
    """Delete these keys' files from the prompt store (those already gone are skipped) and unpin
    them; the paths deleted.

    Args:
        ws: the workspace whose prompt store and pins are edited.
        keys: prompt store keys (`superseded_in_store`).
    """
    store, removed = ArtifactStore(ws.store_dir), []
    for key in keys:
        path = store.path(key)
        if path.exists():
            path.unlink()
            removed.append(str(path))
    if keys and ws.pins_file.exists():
        pins = read_json(ws.pins_file)
        atomic_write_json(ws.pins_file, {**pins, "keys": sorted(set(pins["keys"]) - set(keys))})
    return removed


def purge(
    ws: Workspace,
    superseded_artifacts: set[str],
    log=print,
    erased_content_keys: set[str] = frozenset(),
    removed_by_rebuild: int = 0,
) -> dict:
    """Delete superseded artifacts from the prompt store and the MLflow roots and the feature-cache
    rows of erased contents (keyed hashes), then garbage-collect the DVC cache and remote.

    The train stage pruned every superseded key except the ones the previous record pinned (the
    prompts that were deployed and signed); a batch's rebuild deletes those before it records
    dvc.lock, and any left go here, and leave the pins.

    Args:
        ws: the workspace.
        superseded_artifacts: sha256 of prompt files no longer served anywhere.
        log: where progress lines go.
        erased_content_keys: keyed content hashes whose feature-cache rows are dropped.
        removed_by_rebuild: superseded prompt files the batch's rebuild already deleted from the store (counted in
            `artifact_files_removed`).

    Returns:
        What was deleted per store (the record's `purge` section; `remotes_failed` and
        `artifact_stores_unreachable` name what could not be purged).
    """
    from lmeraser import tracking
    from lmeraser.feature_cache import drop_contents

    locations = storage_locations(ws)
    removed, unreachable = [], []
    # The rebuild's assign rewrote the cache without them already; a batch resumed after a crash
    # between the two, or a cache written by another process meanwhile, is covered here.
    features_dropped = 0
    if erased_content_keys:
        from lmeraser.salt import Keyer

        features_dropped = drop_contents(ws, set(erased_content_keys), Keyer(ws, create=False).content)
    # Registered versions that served a superseded prompt go first, through MLflow's own APIs.
    registry = (
        tracking.purge_registry(ws, superseded_artifacts, log)
        if superseded_artifacts
        else {"versions_deleted": [], "not_searched": []}
    )
    if superseded_artifacts:
        stale = superseded_in_store(ws, superseded_artifacts)
        removed += remove_from_store(ws, stale)
        if stale:
            # The store is the train stage's persisted output: record it as it is now, so that
            # `dvc status` stays clean after the batch. (A batch's rebuild removes them before its
            # own record of dvc.lock; this covers a purge resumed or run on its own.)
            from lmeraser.unlearning.rebuild import record_stage

            record_stage(ws, "train")
        # Run artifacts, on this machine or through MLflow's artifact repository (a tracking server).
        for location, store in locations.stores.items():
            if location.startswith("mlflow"):
                try:
                    for rel, _ in store.listing():
                        with store.local(rel) as path:
                            stale_copy = sha256_file(path) in superseded_artifacts
                        if stale_copy:
                            store.delete(rel)
                            removed.append(store.where(rel))
                except Exception as error:  # noqa: BLE001 - the batch's scan then lists it as not searched, or finds the copy
                    unreachable.append(f"{location}: {reason(error)}")
    # Every DVC remote, whatever its type, through DVC itself: push the current version first so
    # the remote keeps what the workspace needs, then drop every object only older versions use.
    # In this process through DVC's Python API (three `dvc` processes cost ~1.5 s of imports).
    from dvc.repo import lock_repo

    collected, failed = [], []
    # One hold of DVC's lock for the three calls: its index (dvc.yaml, dvc.lock, data.dvc) is
    # then read once, not once per call; nothing between them changes those files.
    with dvc_repo(ws.root) as repo, dvc_step(ws.root, "gc --workspace"), lock_repo(repo):
        repo.gc(workspace=True, force=True)
        for name in remotes(ws.root):
            try:
                with dvc_step(ws.root, f"push -r {name}"):
                    repo.push(remote=name)
                with dvc_step(ws.root, f"gc --workspace --cloud -r {name}"):
                    repo.gc(workspace=True, cloud=True, remote=name, force=True)
                collected.append(name)
            except LmeraserError as error:
                failed.append(f"{name}: {error}")
    n_removed = removed_by_rebuild + len(removed)
    log(f"purged {n_removed} superseded artifact file(s); DVC cache and {len(collected)} remote(s) garbage-collected")
    return {
        "artifact_files_removed": n_removed,
        "feature_cache_rows_removed": features_dropped,
        "registry": registry,
        "dvc_gc": True,
        "remotes_gc": collected,
        "remotes_failed": failed,
        "remote_gc": bool(collected),
        **({"artifact_stores_unreachable": unreachable} if unreachable else {}),
    }
