"""`audit replay`: retrain the clusters a record says were rebuilt, from the recorded inputs, and
compare with the recorded artifact hashes (invariant 3: same numeric fingerprint => same bits).
On a machine whose numeric fingerprint or device differs from the record's, the bits cannot be
compared: replay says so and why, with its own exit status, never "mismatch" nor "verified".

Content addressing makes the inputs checkable: a cluster's current artifact key is the hash of
its members, config, seed and code, so if the deployed artifact still has the hash the record
states, the workspace still holds exactly the inputs that produced it. The retraining is the
train stage's own per-cluster function (`ClusterTrainer.state`), not a copy of it.
"""

from __future__ import annotations

import tempfile

import torch

from lmeraser.config import Params
from lmeraser.errors import LmeraserError
from lmeraser.inference import ServingModel
from lmeraser.lineage.log import Record
from lmeraser.lineage.records import environment
from lmeraser.models.backbone import preprocess
from lmeraser.pipeline.train import plan
from lmeraser.store import ArtifactStore
from lmeraser.training import load_prompt
from lmeraser.workspace import Workspace

# What of a record's environment the artifact keys include (lmeraser/training.py: key_inputs), and
# what replay compares besides.
KEYED_ENV_KEYS = (
    "torch",
    "timm",
    "peft",
    "training_code",
    "threads",
    "device",
    "device_name",
    "precision",
    "cuda",
    "cudnn",
    "numerics",
    "pins",
    "fingerprint",
)
ENV_KEYS = ("python", "faiss", "numpy", "cpu", *KEYED_ENV_KEYS)
# Replay's exit status when the bits cannot be compared on this machine (1: they differ).
CANNOT_COMPARE = 3


def incomparable(then: dict, now: dict) -> str | None:
    """Why this machine cannot reproduce a record's bits, or None: another numeric fingerprint
    (other CPU kernels, numerics, library versions: lmeraser/fingerprint.py) or another device.
    Records made before fingerprints existed compare as before.

    Args:
        then: the record's `environment` section.
        now: this machine's environment (`lineage.records.environment`).
    """
    if "fingerprint" not in then:
        return None
    if (then.get("device"), then.get("device_name")) != (now.get("device"), now.get("device_name")):
        recorded, here = then.get("device_name") or then.get("device"), now.get("device_name") or now.get("device")
        return f"the record was computed on {recorded}, this machine computes on {here}"
    if then["fingerprint"] != now.get("fingerprint"):
        return (
            f"its numeric fingerprint {str(then['fingerprint'])[:12]} "
            f"({then.get('numerics')} numerics on {then.get('cpu')}) differs from this machine's "
            f"{str(now.get('fingerprint'))[:12]} ({now.get('numerics')} numerics on {now.get('cpu')}), "
            "so the same training gives other bits here"
        )
    return None


def superseded_by(record: Record, later: list[Record], cluster: int) -> int | None:
    """The first later record that changed `cluster` again (its inputs were then erased or changed).

    Args:
        record: the record being replayed.
        later: the records to look in (only those numbered after `record` count).
        cluster: the cluster's number.
    """
    for other in later:
        changed = other.predicate.get("clusters_rebuilt", []) + other.predicate.get("clusters_edited", [])
        if other.number > record.number and any(c["cluster"] == cluster for c in changed):
            return other.number
    return None


def replay(ws: Workspace, params: Params, record: Record, later: list[Record], log=print) -> dict:
    """Per cluster the record rebuilt: replayed (and whether the bits match), or skipped with the
    reason. `ok` only when nothing mismatched and at least one cluster was actually checked.

    Args:
        ws: the workspace holding the data version and artifacts to retrain from.
        params: the checked params.
        record: the exact record to replay.
        later: the records after it (a cluster a later record rebuilt again is skipped).
        log: where progress lines go.
    """
    if record.is_rotation:
        raise LmeraserError(f"record {record.number} is a key rotation, not a training run: nothing to replay.")
    if record.predicate.get("method") == "influence":
        raise LmeraserError(
            f"record {record.number} is an approximate influence update, not a training run; "
            "replay the exact record that supersedes it (`lmeraser audit show` lists them)."
        )
    now = environment(params.prompt.kind, ws, params.runtime.threads)
    then = record.predicate["environment"]
    differences = {k: (then.get(k), now.get(k)) for k in ENV_KEYS if then.get(k) != now.get(k)}
    reason = incomparable(then, now)
    if reason:
        return {
            "record": record.number,
            "environment_differences": differences,
            "comparable": False,
            "reason": reason,
            "clusters": [],
            "ok": False,
        }
    asked = record.predicate["clusters_rebuilt"]
    if not asked:
        return {
            "record": record.number,
            "environment_differences": differences,
            "comparable": True,
            "clusters": [],
            "replayed": 0,
            "matched": 0,
            "skipped": 0,
            "ok": False,
        }
    training = plan(params, ws)
    trainer, jobs = training.trainer, {job.cluster: job for job in training.jobs}
    current = ServingModel.load(ws)
    results = []
    for entry in asked:
        cluster, expected = entry["cluster"], entry["prompt_sha256_after"]
        deployed = current.index.clusters.get(str(cluster))
        if expected is None and deployed is None:
            results.append({"cluster": cluster, "status": "checked: still retired, as recorded", "match": True})
            log(f"cluster {cluster}: still retired, as recorded")
            continue
        if deployed is None or deployed.sha256 != expected:
            later_number = superseded_by(record, later, cluster)
            reason = (
                f"superseded by record {later_number}, whose inputs were later changed or erased"
                if later_number
                else "no longer deployed"
            )
            results.append({"cluster": cluster, "status": f"skipped ({reason})", "match": None})
            log(f"cluster {cluster}: skipped ({reason})")
            continue
        job = jobs[cluster]
        if job.key != deployed.key:
            keyed = [k for k in differences if k in KEYED_ENV_KEYS]
            cause = (
                f"this machine differs in {', '.join(keyed)}, which the key includes"
                if keyed
                else f"data or params changed since record {record.number}"
            )
            raise LmeraserError(
                f"cluster {cluster}: the workspace's inputs no longer hash to the deployed artifact key; {cause}."
            )
        state = trainer.state(job)
        with tempfile.TemporaryDirectory() as tmp:
            stored = ArtifactStore(tmp).save(
                job.key, state, {"cluster": cluster, "n_members": len(job.rows), "seed": job.seed}
            )
        result = {"cluster": cluster, "status": "replayed", "sha256": stored.sha256, "match": stored.sha256 == expected}
        if differences:
            # Another machine or versions: bits may differ legitimately; compare behaviour instead.
            x = preprocess(ws.split("test").images, current.input_spec)
            recorded = load_prompt(
                trainer.backbone, params.prompt, trainer.num_classes, current.store.load(deployed.key)
            )
            replayed = load_prompt(trainer.backbone, params.prompt, trainer.num_classes, state)
            agreement = _agreement(recorded, replayed, x, trainer.compute)
            result["prediction_agreement"] = agreement
            result["match"] = result["match"] or agreement >= 0.99
        log(f"cluster {cluster}: replayed, sha256 {'matches' if result['sha256'] == expected else 'differs'}")
        results.append(result)
    matched = sum(1 for r in results if r["match"] is True)
    return {
        "record": record.number,
        "environment_differences": differences,
        "comparable": True,
        "clusters": results,
        "replayed": sum(1 for r in results if r["status"] == "replayed"),
        "matched": matched,
        "skipped": sum(1 for r in results if r["match"] is None),
        "ok": matched > 0 and all(r["match"] is not False for r in results),
    }


@torch.no_grad()
def _agreement(
    recorded: torch.nn.Module, replayed: torch.nn.Module, x: torch.Tensor, compute, batch_size: int = 256
) -> float:
    """The share of `x` (preprocessed, in host memory) both models predict alike, batch by batch
    on the compute's device."""
    same = 0
    for start in range(0, len(x), batch_size):
        batch = compute.put(x[start : start + batch_size])
        with compute.autocast():
            same += int((recorded(batch).argmax(1) == replayed(batch).argmax(1)).sum())
    return same / max(1, len(x))
