"""Exact unlearning of a batch of requests: unlearning = change the data + re-run the pipeline.

A batch takes every pending request and runs these steps, each idempotent, each persisting its
result in `audit/batches/<batch_id>.json` before the next begins; a run killed at any point
resumes where it stopped, and every request is finished exactly once:

  capture  the state before: data version, prompt hashes, accuracy, membership-inference scores
  apply    remove / correct the samples in data/, add tombstones; journal `applied`
  version  `dvc add data`: the new data version (data.dvc md5 before/after)
  rebuild  `dvc repro`: only clusters whose members changed retrain (content-addressed keys)
  purge    delete superseded prompt artifacts everywhere, `dvc gc` the cache and the remote
  verify   scan every store by content hash; check the rebuilt clusters are exactly the planned
           ones; membership inference on the forgotten samples after unlearning
  record   sign and append the lineage record; journal `verified`
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lmeraser.config import load_params
from lmeraser.data.splits import add_tombstones, load_split, read_source_info, remove_samples, update_sample
from lmeraser.overlay import Overlay
from lmeraser.io import atomic_write_json, read_json, sha256_file, sha256_json
from lmeraser.unlearning.requests import AUDIT_DIR, Journal, load_corrected_image
from lmeraser.versioning import data_md5, dvc, file_sha256, git_commit

STEPS = ("capture", "apply", "version", "rebuild", "purge", "verify", "record")
FAILPOINT_ENV = "LMERASER_KILL_AFTER_STEP"  # crash testing: SIGKILL this process after the named step


def failpoint(name: str) -> None:
    """Crash testing: SIGKILL ourselves at the named point if $LMERASER_KILL_AFTER_STEP says so."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def environment() -> dict:
    import faiss
    import timm
    import torch

    from lmeraser.training import code_version

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "faiss": faiss.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "cpu": cpu, "cores": os.cpu_count(), "training_code": code_version(),
    }


def request_summary(request: dict) -> dict:
    """A request as a lineage record states it: ids, kind and keyed subject hashes, never raw subjects."""
    return {
        "request_id": request["request_id"], "kind": request["kind"], "subject_hashes": request["subject_hashes"],
        "already_forgotten": request["already_forgotten"], **({"label": request["label"]} if request["label"] is not None else {}),
        **({"input": "corrected image"} if request["input_path"] else {}),
    }


def code_info(root: Path, params) -> dict:
    return {"git_commit": git_commit(root), "params_sha256": sha256_json(params.model_dump()), "seed": params.seed}


def _index(root: Path) -> dict:
    path = root / "artifacts" / "prompts" / "index.json"
    return read_json(path) if path.exists() else {"clusters": {}}


def deployed_subjects(root: Path) -> dict[str, str]:
    """The serving artifacts a record vouches for (in-toto subjects): name -> sha256."""
    artifacts = root / "artifacts"
    subjects = {
        "artifacts/backbone/backbone.safetensors": sha256_file(artifacts / "backbone" / "backbone.safetensors"),
        "artifacts/clusters/prototypes.npy": sha256_file(artifacts / "clusters" / "prototypes.npy"),
        "artifacts/prompts/index.json": sha256_file(artifacts / "prompts" / "index.json"),
    }
    overlay = Overlay(artifacts)
    for path, entry in overlay.served(_index(root)).values():
        subjects[f"artifacts/prompts/{path}"] = entry["sha256"]
    if overlay.path.exists():
        subjects["artifacts/prompts/approximate/overlay.json"] = sha256_file(overlay.path)
    return subjects


def served_prompts(root: Path) -> dict[str, str]:
    """cluster -> sha256 of the prompt it serves (its influence overlay, if any, else exact)."""
    return {c: entry["sha256"] for c, (_, entry) in Overlay(root / "artifacts").served(_index(root)).items()}


class UnlearnBatch:
    def __init__(self, root: Path, state: dict, log=print):
        self.root = root
        self.state = state
        self.log = log
        self.path = root / AUDIT_DIR / "batches" / f"{state['batch_id']}.json"
        self.journal = Journal(root)
        self._images: dict[str, np.ndarray] = {}  # forgotten pixels, in memory only, never written

    @classmethod
    def open(cls, root: Path, log=print) -> UnlearnBatch | None:
        """Resume an interrupted batch, or start one over every pending request; None if idle."""
        batches = sorted((root / AUDIT_DIR / "batches").glob("*.json"))
        if batches:
            return cls(root, read_json(batches[0]), log)
        pending = Journal(root).pending()
        if not pending:
            return None
        ids = [r["request_id"] for r in pending]
        state = {
            "batch_id": "batch-" + hashlib.sha256(",".join(ids).encode()).hexdigest()[:16],
            "requests": pending, "done": {}, "seconds": {}, "started_at": time.time(),
        }
        batch = cls(root, state, log)
        batch.save()
        return batch

    def save(self) -> None:
        atomic_write_json(self.path, self.state)

    @property
    def done(self) -> dict:
        return self.state["done"]

    def run(self, step: str) -> dict:
        if step in self.done:
            return self.done[step]
        start = time.perf_counter()
        result = getattr(self, f"_{step}")()
        self.state["seconds"][step] = time.perf_counter() - start
        self.done[step] = result
        if step != "record":
            self.save()
        failpoint(step)
        return result

    # -- helpers ---------------------------------------------------------------------------

    def _targets(self, kind: str | None = None) -> list[str]:
        """Target sample ids in request order, without repeats."""
        ids = (s for r in self.state["requests"] if kind is None or r["kind"] == kind for s in r["sample_ids"])
        return list(dict.fromkeys(ids))

    def _mia(self, images: np.ndarray, labels: np.ndarray) -> dict:
        from lmeraser.evaluation import membership_inference
        from lmeraser.inference import ServingModel

        model = ServingModel.load(self.root / "artifacts")
        test = load_split("test", self.root / "data")
        return membership_inference(model.losses(images, labels), model.losses(test.images, test.labels))

    # -- steps -----------------------------------------------------------------------------

    def _capture(self) -> dict:
        root = self.root
        assignments = pd.read_csv(root / "artifacts" / "clusters" / "assignments.csv", dtype={"sample_id": str})
        cluster_of = dict(zip(assignments["sample_id"], assignments["cluster"].astype(int)))
        targets = self._targets()
        wanted, to_forget = set(targets), set(self._targets("forget"))
        index = _index(root)
        ids = {r["request_id"] for r in self.state["requests"]}
        # Influence records these requests already produced: this exact batch supersedes them.
        supersedes = sorted({e["record"] for rid, entry in self.journal.requests().items() if rid in ids
                             for e in entry.get("history", []) if e["state"] == "approximated"})
        planned = sorted({int(cluster_of[s]) for s in targets if s in cluster_of})
        samples = {}
        for split in ("public", "private"):
            part = load_split(split, root / "data")
            for row, sid in enumerate(part.sample_ids):
                if sid in wanted:
                    samples[sid] = {"split": split, "content_hash": part.manifest["content_hash"][row], "label": int(part.labels[row])}
                    if sid in to_forget:
                        self._images[sid] = part.images[row]
        public = [s for s in targets if samples.get(s, {}).get("split") == "public"]
        forget = [s for s in self._targets("forget") if s in samples]
        mia = None
        if forget:
            images = np.stack([self._images[s] for s in forget])
            mia = self._mia(images, np.array([samples[s]["label"] for s in forget]))
        metrics = read_json(root / "metrics.json") if (root / "metrics.json").exists() else {}
        self.log(f"batch {self.state['batch_id']}: {len(self.state['requests'])} request(s), {len(targets)} sample(s), planned clusters {planned}")
        return {
            "data_md5": data_md5(root), "dvc_lock_sha256": file_sha256(root / "dvc.lock"),
            "prompts": served_prompts(root), "exact_prompts": {c: e["sha256"] for c, e in index["clusters"].items()},
            "supersedes": supersedes,
            "accuracy": metrics.get("accuracy"), "planned_clusters": planned, "backbone_rebuild": bool(public),
            "samples": samples, "membership_inference": mia, "n_clusters": len(index["clusters"]),
        }

    def _apply(self) -> dict:
        data = self.root / "data"
        samples = self.done["capture"]["samples"]
        tombstones, removed = [], {"public": [], "private": []}
        for request in self.state["requests"]:
            if request["kind"] == "forget":
                for sid in request["sample_ids"]:
                    info = samples.get(sid)
                    if info is None:
                        continue
                    removed[info["split"]].append(sid)
                    tombstones.append({"sample_id": sid, "content_hash": info["content_hash"], "reason": "forget"})
            elif request["label"] is not None:
                update_sample(request["sample_ids"][0], samples[request["sample_ids"][0]]["split"], data, label=request["label"])
            else:
                sid = request["sample_ids"][0]
                image = load_corrected_image(Path(request["input_path"]), tuple(read_source_info(data)["image_shape"]))
                old = update_sample(sid, samples[sid]["split"], data, image=image)
                if old["content_hash"] != samples[sid]["content_hash"]:
                    continue  # already applied before an interruption
                tombstones.append({"sample_id": "", "content_hash": old["content_hash"], "reason": "rectify-input"})
        # Tombstones first: if we are killed between the two, re-running finds the ids tombstoned
        # and still present, and removes them (remove_samples below skips nothing it needs).
        add_tombstones(tombstones, data)
        for split, ids in removed.items():
            present = set(load_split(split, data).sample_ids)
            todo = [s for s in ids if s in present]
            if todo:
                remove_samples(todo, split, data)
        self.journal.append([{"request_id": r["request_id"], "state": "applied", "time": time.time()} for r in self.state["requests"]])
        self.log(f"data updated: removed {sum(len(v) for v in removed.values())} sample(s), {len(tombstones)} tombstone(s)")
        return {"removed": removed, "tombstones": tombstones}

    def _version(self) -> dict:
        dvc(self.root, "add", "-q", "data")
        md5 = data_md5(self.root)
        self.log(f"data version {self.done['capture']['data_md5']} -> {md5}")
        return {"data_md5": md5}

    def _rebuild(self) -> dict:
        # The serving path only (evaluate and its upstream); the baselines stage is re-measured
        # by the next full `dvc repro`.
        done = dvc(self.root, "repro", "evaluate")
        self._retire_overlay()
        index = _index(self.root)
        last = index.get("last_run", {})
        metrics = read_json(self.root / "metrics.json")
        stages = [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]
        before = self.done["capture"]["prompts"]
        rebuilt = [int(c) for c in last.get("trained", [])] if "train" in stages else []
        after = served_prompts(self.root)
        seeds = {c: e["seed"] for c, e in index["clusters"].items()}
        self.log(f"rebuilt clusters {rebuilt} ({len(after) - len(rebuilt)} untouched); stages run: {', '.join(stages)}")
        return {
            "stages": stages, "rebuilt": rebuilt, "retired": [int(c) for c in last.get("retired", [])] if "train" in stages else [],
            "prompts": after, "seeds": seeds, "accuracy": metrics.get("accuracy"), "dvc_lock_sha256": file_sha256(self.root / "dvc.lock"),
            # Served prompts that changed, and the exact prompts that influence overlays stood in for.
            "superseded": sorted((set(before.values()) | set(self.done["capture"].get("exact_prompts", {}).values())) - set(after.values())),
        }

    def _retire_overlay(self) -> None:
        """Drop the influence overlays this batch makes exact (and any gone stale), with their files."""
        overlay = Overlay(self.root / "artifacts")
        ids = {r["request_id"] for r in self.state["requests"]}
        active = overlay.active(_index(self.root))
        keep = {c: e for c, e in active.items() if not {edit["request_id"] for edit in e["edits"]} <= ids}
        if overlay.path.exists():
            overlay.write(keep)
        removed = overlay.store.prune({e["key"] for e in keep.values()})
        if removed:
            self.log(f"retired {len(removed)} influence overlay(s): their clusters are now exact")

    def _purge(self) -> dict:
        from lmeraser.unlearning.purge import purge

        return purge(self.root, set(self.done["rebuild"]["superseded"]), self.log)

    def _verify(self) -> dict:
        from lmeraser.unlearning.purge import scan

        hashes = {t["content_hash"] for t in self.done["apply"]["tombstones"]}
        hits, counts = scan(self.root, hashes, set(self.done["rebuild"]["superseded"]))
        capture, rebuild = self.done["capture"], self.done["rebuild"]
        changed = sorted(set(rebuild["rebuilt"]) | set(rebuild["retired"]))
        forget = [s for s in self._targets("forget") if s in capture["samples"]]
        if forget and all(s in self._images for s in forget):
            mia_after = self._mia(np.stack([self._images[s] for s in forget]), np.array([capture["samples"][s]["label"] for s in forget]))
        elif forget:
            mia_after = {"skipped": "the process was interrupted after the samples were erased; their pixels no longer exist to score"}
        else:
            mia_after = None
        result = {
            "scan": {"hits": len(hits), "files_scanned": counts, "examples": [h.__dict__ for h in hits[:5]]},
            "clusters_as_planned": capture["backbone_rebuild"] or changed == capture["planned_clusters"] or not forget,
            "membership_inference": {"before": capture["membership_inference"], "after": mia_after},
        }
        self.log(f"verification: scan hits {len(hits)}, clusters as planned {result['clusters_as_planned']}")
        return result

    def _record(self) -> dict:
        from lmeraser.lineage.keys import key_id, key_path, load_or_create_key
        from lmeraser.lineage.log import LineageLog

        log = LineageLog(self.root / AUDIT_DIR / "lineage.jsonl")
        existing = [r for r in log.read_unverified() if r.predicate.get("batch_id") == self.state["batch_id"]]
        if existing:
            record = existing[0]
        else:
            key = load_or_create_key(key_path(self.root))
            record = log.append(deployed_subjects(self.root), self.predicate(key_id(key.public_key())), key)
            failpoint("record:appended")
        self.journal.append([{"request_id": r["request_id"], "state": "verified", "time": time.time(), "record": record.number} for r in self.state["requests"]])
        self.path.unlink(missing_ok=True)
        self.log(f"lineage record {record.number} ({record.line_sha256[:16]}…) appended to {log.path}")
        return {"record": record.number, "sha256": record.line_sha256}

    def predicate(self, signer: str) -> dict:
        params = load_params(self.root / "params.yaml")
        capture, rebuild = self.done["capture"], self.done["rebuild"]
        before, after = capture["prompts"], rebuild["prompts"]
        return {
            "batch_id": self.state["batch_id"],
            "method": "exact",
            "supersedes": capture.get("supersedes", []),
            "signer": signer,
            "requests": [request_summary(r) for r in self.state["requests"]],
            "removed_content_hashes": sorted(t["content_hash"] for t in self.done["apply"]["tombstones"]),
            "samples_affected": len(capture["samples"]),
            "backbone_rebuild": capture["backbone_rebuild"],
            "clusters_rebuilt": [
                {"cluster": c, "prompt_sha256_before": before.get(str(c)), "prompt_sha256_after": after.get(str(c)),
                 "seed": rebuild["seeds"].get(str(c))}
                for c in sorted(set(rebuild["rebuilt"]) | set(rebuild["retired"]))
            ],
            "clusters_untouched": sum(1 for c, h in after.items() if before.get(c) == h),
            "data": {"data_dvc_md5_before": capture["data_md5"], "data_dvc_md5_after": self.done["version"]["data_md5"],
                     "dvc_lock_sha256_before": capture["dvc_lock_sha256"], "dvc_lock_sha256_after": rebuild["dvc_lock_sha256"]},
            "code": code_info(self.root, params),
            "environment": {**environment(), "threads": params.runtime.threads},
            "seconds": dict(self.state["seconds"]),
            "accuracy": {"before": capture["accuracy"], "after": rebuild["accuracy"]},
            "stages_run": rebuild["stages"],
            "purge": self.done["purge"],
            "verification": self.done["verify"],
        }


def process_pending(root: Path, log=print, run_step=None) -> dict | None:
    """Process every pending request as one batch (or finish an interrupted one)."""
    journal = Journal(root)
    with journal.lock(".unlearn.lock"):
        batch = UnlearnBatch.open(root, log)
        if batch is None:
            log("no pending requests")
            return None
        run = run_step or (lambda b, step: b.run(step))
        for step in STEPS:
            run(batch, step)
        return {"batch_id": batch.state["batch_id"], **batch.done["record"], "rebuilt": batch.done["rebuild"]["rebuilt"],
                "retired": batch.done["rebuild"]["retired"], "verification": batch.done["verify"]}
