"""Check before you change (invariant 8): everything an unlearning batch needs to finish, checked
before any data changes.

An exact batch that fails at its last step has already removed the samples, re-versioned the
data, rebuilt and purged; an influence update that cannot sign has already served its update. So
the signing key and the pinned signer, the subject salt, the MLflow store and the workspace's
writable directories are all checked first, and a failure here leaves everything as it was: this
module reads, and writes only probe files it removes at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmeraser.errors import LmeraserError, reason, without_credentials
from lmeraser.workspace import Workspace


def check_signer(ws: Workspace) -> None:
    """The key that will sign can be had, is the pinned signer and is the log's current signer (not
    one a key rotation retired); nothing is created or pinned here (the first record does that).

    Args:
        ws: the workspace whose signing key, pinned signer and lineage log are checked.
    """
    from lmeraser.lineage.keys import key_from_environment, key_id, load_or_create_key, load_public_key
    from lmeraser.lineage.records import lineage_log

    pinned = ws.signer_file
    log = lineage_log(ws)
    exists = key_from_environment() is not None or os.path.lexists(ws.signing_key_file)
    if not exists:
        if os.path.lexists(log.path) or os.path.lexists(pinned) or ws.signing_key_configured:
            # load_or_create_key(create=False) says it in its one sentence.
            load_or_create_key(ws.signing_key_file, create=False)
        _writable(ws.signing_key_file.parent, "the signing key's directory")  # the first record creates it
        return
    key = load_or_create_key(ws.signing_key_file, create=False)
    signer = key_id(key.public_key())
    if os.path.lexists(pinned):
        expected = key_id(load_public_key(pinned))
        if signer != expected:
            raise LmeraserError(
                f"the signing key ({signer}) is not the pinned signer {expected} ({pinned}); restore that key: "
                "records signed by another would not verify."
            )
    if os.path.lexists(log.path):
        # A log that does not verify is never extended (a rolled-back log would reuse record
        # numbers and drop what later records erased from the scan's targets).
        from lmeraser.audit.verify import public_key, verified_records

        if not os.path.lexists(pinned):
            raise LmeraserError(
                f"{pinned}: the pinned signer is missing while {log.path} holds records; restore it from git "
                "(or pin the current key with `lmeraser audit export-key`) before unlearning."
            )
        try:
            verified_records(ws, public_key(ws))
        except LmeraserError as error:
            raise LmeraserError(f"the lineage log does not verify, so no batch may extend it: {error}") from None
        current = key_id(log.chain(key.public_key()).current)
        if current != signer:
            raise LmeraserError(
                f"the signing key {signer} was retired by a key rotation; the log's signer is {current} "
                "(finish an interrupted rotation with `lmeraser audit rotate-key`)."
            )


def check_salt(ws: Workspace) -> None:
    """The subject salt is there and sound, or may be made: it is made only for a workspace that
    has never keyed anything with it (a new salt would void every keyed hash already written).

    Args:
        ws: the workspace whose subject salt is checked.
    """
    from lmeraser import salt

    if not salt.check_salt(ws):
        _writable(ws.subject_salt_file.parent, "the salt's directory")


def check_tracking_store(ws: Workspace) -> None:
    """The MLflow store the rebuild registers the served model in opens and answers (a half-made or
    unreachable store fails here, not after the data changed).

    Args:
        ws: the workspace whose MLflow tracking store is opened.
    """
    from lmeraser import tracking

    try:
        tracking.artifact_locations(ws)
        if ws.mlflow_db.exists() or tracking.tracking_uri(ws) != tracking.default_tracking_uri(ws):
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=tracking.tracking_uri(ws)).search_registered_models(max_results=1)
    except LmeraserError:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow raises many kinds; the batch must not start on any
        raise LmeraserError(
            f"the MLflow tracking store ({without_credentials(tracking.tracking_uri(ws))}) cannot be used "
            f"({reason(error)}); fix or restore it."
        ) from None


def writable_locations(ws: Workspace) -> dict[str, Path]:
    """The directories a batch writes to, by what they are.

    Args:
        ws: the workspace whose directories are listed.
    """
    from lmeraser.versioning import cache_dir

    return {
        "the workspace root (data.dvc, dvc.lock)": ws.root,
        "data/": ws.data,
        "audit/": ws.audit,
        "the batch state directory": ws.batches,
        "artifacts/": ws.artifacts,
        "the DVC cache": cache_dir(ws.root),
    }


def _writable(directory: Path, what: str) -> None:
    """`directory` (or its nearest existing parent) takes a new file: probed by making one."""
    probe_dir = directory
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise LmeraserError(f"{probe_dir}: {what} is not a directory.")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".lmeraser-probe-"):
            pass
    except OSError as error:
        raise LmeraserError(f"{probe_dir}: {what} is not writable ({error.strerror}).") from None


def check_writable(ws: Workspace) -> None:
    """Every directory a batch writes to can be written now (one sentence naming the first that cannot).

    Args:
        ws: the workspace whose directories (`writable_locations`) are probed.
    """
    for what, directory in writable_locations(ws).items():
        _writable(directory, what)


def check_compute(ws: Workspace) -> None:
    """The served prompts were trained with the bits this process computes: same device,
    precision, numerics, pins and numeric fingerprint (lmeraser/fingerprint.py). Elsewhere an
    exact rebuild would re-key and retrain every cluster, not the affected ones, and fail its own
    check after the data had changed.

    Args:
        ws: the workspace whose prompt index states the compute its prompts were trained with (nothing to check before
            the first training).
    """
    if not ws.prompt_index_file.exists() or not ws.backbone_meta_file.exists():
        return
    from lmeraser.compute import Compute
    from lmeraser.fingerprint import identity
    from lmeraser.io import read_json

    trained = read_json(ws.prompt_index_file).get("key_inputs", {}).get("compute")
    if not isinstance(trained, dict) or "fingerprint" not in trained:
        return  # trained before fingerprints existed: the train stage's re-key check says what changed
    here = identity(Compute.of(ws.backbone_meta()))
    differing = sorted(k for k in set(trained) | set(here) if trained.get(k) != here.get(k))
    if differing:
        raise LmeraserError(
            "the served prompts were trained under other numerics than this process computes "
            f"({', '.join(differing)} differ: fingerprint {str(trained.get('fingerprint'))[:12]} "
            f"there, {str(here.get('fingerprint'))[:12]} here), so an exact rebuild would retrain every cluster; "
            "run `dvc repro` here first to retrain them under this machine's numerics, "
            "or unlearn where `lmeraser doctor` shows that fingerprint."
        )


def check_before_change(ws: Workspace, tracking_store: bool = True) -> None:
    """Everything a batch needs to finish, checked before it changes anything.

    Args:
        ws: the workspace.
        tracking_store: also check the MLflow store can be written.

    Raises:
        LmeraserError: one sentence naming the first thing missing, and that nothing changed.
    """
    try:
        check_compute(ws)
        check_writable(ws)
        check_signer(ws)
        check_salt(ws)
        if tracking_store:
            check_tracking_store(ws)
    except LmeraserError as error:
        raise LmeraserError(
            f"{str(error).rstrip()} Nothing was changed; "
            "the pending requests stay queued for the next `lmeraser unlearn`."
        ) from None
