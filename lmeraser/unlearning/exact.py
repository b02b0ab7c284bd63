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

import contextlib
import gc
import hashlib
import json
import time

import numpy as np

from lmeraser import suppression
from lmeraser.config import Params, load_params
from lmeraser.data.splits import add_tombstones, content_hash, refresh_counts, remove_samples, update_sample
from lmeraser.errors import LmeraserError
from lmeraser.failpoints import failpoint
from lmeraser.io import atomic_write_json, sha256_file
from lmeraser.journal import Journal, event
from lmeraser.lineage.records import (
    BeforeAfter,
    ClusterRebuilt,
    DataVersions,
    ExactPredicate,
    RequestSummary,
    code_info,
    deployed_subjects,
    environment,
    lineage_log,
    served_prompts,
    sign_and_append,
    utc,
)
from lmeraser.overlay import Overlay
from lmeraser.request import Request, corrected_image
from lmeraser.salt import Keyer
from lmeraser.stages import GIT_TRACKED_OUTPUTS, SERVING_TARGET, upstream
from lmeraser.unlearning.preflight import check_before_change, check_compute, check_tracking_store
from lmeraser.unlearning.recovery import recover
from lmeraser.unlearning.steps import (
    STEPS,
    Applied,
    BatchState,
    Capture,
    Purged,
    Rebuilt,
    Recorded,
    Sample,
    Verified,
    Versioned,
)
from lmeraser.versioning import commit_paths, data_md5, dvc_add, dvc_repo, file_sha256
from lmeraser.workspace import Workspace

# The steps import what they compute with inside themselves (torch, FAISS, DVC's repo, MLflow, the
# audit): a process that only submits or checks requests (`rebuild_params`, `next_batch_id`) loads
# none of it, and `preload` imports it all once for a long-lived worker.


def rebuild_params(ws: Workspace) -> Params:
    """The params an exact rebuild runs with, refused if they are not the ones `dvc repro` reads.

    The rebuild is `dvc repro`, whose stages read params.yaml; a batch run with another params
    file would record settings that did not produce the artifacts.

    Args:
        ws: the workspace; its params file (`--params`) is read and compared with the one dvc.yaml's stages read.
    """
    params = load_params(ws.params_file)
    pipeline_file = ws.pipeline_params_file
    if ws.params_file.resolve() != pipeline_file.resolve() and params != load_params(pipeline_file):
        raise LmeraserError(
            f"--params {ws.params_file} differs from {pipeline_file}, which dvc.yaml's stages read: "
            f"an exact rebuild runs with {pipeline_file}; copy {ws.params_file} there and run `dvc repro` first."
        )
    return params


class UnlearnBatch:
    def __init__(self, ws: Workspace, params: Params, state: BatchState, log=print):
        self.ws = ws
        self.params = params
        self.state = state
        self.log = log
        self.path = ws.batch_file(state.batch_id)
        self.journal = Journal(ws)
        self._images: dict[str, np.ndarray] = {}  # forgotten pixels, in memory only, never written
        self._verified_here = False  # the verify step ran in this process (not read from the batch file)
        self.after_stage = None  # called with (stage, summary) after each rebuilt stage (tracking)
        self.map_jobs = None  # how the rebuild's clusters train (default: runtime.workers threads)

    @classmethod
    def open(
        cls, ws: Workspace, params: Params, log=print, git_commit: bool = True, max_requests: int | None = None
    ) -> UnlearnBatch | None:
        """Resume an interrupted batch, or start one over the pending requests (the oldest
        `max_requests` of them, or all); None if idle.

        Args:
            ws: the workspace whose batch state directory and journal are read.
            params: the params the batch runs with (`rebuild_params`).
            log: where progress lines go.
            git_commit: for a new batch, commit the versions it makes in the workspace's git repository (a resumed batch
                keeps the choice its batch file holds).
            max_requests: at most this many of the oldest pending requests; None: all.
        """
        batches = ws.batch_files()
        if batches:
            try:
                state = BatchState.from_json(json.loads(batches[0].read_bytes()))
            except (ValueError, RecursionError):  # ValidationError and JSONDecodeError included
                raise LmeraserError(
                    f"{batches[0]}: not a batch state file (it was altered); "
                    "the batch cannot resume until it is restored."
                ) from None
            disagreement = _disagreement(state, batches[0].stem, Journal(ws))
            if disagreement:
                raise LmeraserError(
                    f"{batches[0]}: {disagreement} (the batch file was altered); "
                    "the batch cannot resume until it is restored."
                )
            return cls(ws, params, state, log)
        pending = Journal(ws).pending()[:max_requests]
        if not pending:
            return None
        state = BatchState(batch_id=batch_id(pending), requests=pending, started_at=time.time(), git_commit=git_commit)
        batch = cls(ws, params, state, log)
        batch.save()
        return batch

    def save(self) -> None:
        atomic_write_json(self.path, self.state.to_json())

    @property
    def done(self) -> dict:
        return self.state.done

    # Each finished step's result, typed (a step runs only after the ones before it).
    @property
    def capture(self) -> Capture:
        return self.done["capture"]

    @property
    def applied(self) -> Applied:
        return self.done["apply"]

    @property
    def versioned(self) -> Versioned:
        return self.done["version"]

    @property
    def rebuilt(self) -> Rebuilt:
        return self.done["rebuild"]

    @property
    def purged(self) -> Purged:
        return self.done["purge"]

    @property
    def verified(self) -> Verified:
        return self.done["verify"]

    @property
    def requests(self) -> list[Request]:
        return self.state.requests

    def run(self, step: str):
        """Run one step unless it is done, time it, save its result in the batch file (all but `record`'s: that step
        removes the file) and return the result.

        Args:
            step: the step's name, one of `STEPS`; the steps before it must be done.
        """
        if step in self.done:
            return self.done[step]
        start = time.perf_counter()
        result = getattr(self, f"_{step}")()
        self.state.seconds[step] = time.perf_counter() - start
        self.log(f"step {step} done in {self.state.seconds[step]:.1f}s")
        self.done[step] = result
        self._verified_here |= step == "verify"
        if step != "record":
            self.save()
            failpoint(f"after:{step}")
        return result

    # -- helpers ---------------------------------------------------------------------------

    def _targets(self, kind: str | None = None) -> list[str]:
        """Target sample ids in request order, without repeats."""
        ids = (s for r in self.requests if kind is None or r.kind == kind for s in r.sample_ids)
        return list(dict.fromkeys(ids))

    def _mia(self, images: np.ndarray, labels: np.ndarray) -> dict:
        from lmeraser.evaluation import membership_inference
        from lmeraser.inference import ServingModel
        from lmeraser.score_cache import nonmember_losses

        model = ServingModel.load(self.ws)
        batch_size = self.params.evaluate.batch_size  # the evaluate stage's: they share the cached test scores
        return membership_inference(
            model.losses(images, labels, batch_size), nonmember_losses(self.ws, model, batch_size)
        )

    # -- steps -----------------------------------------------------------------------------

    def _capture(self) -> Capture:
        ws = self.ws
        # The batch must change only what its requests change: a pipeline already out of date with
        # data/, params.yaml or the code (a re-ingestion, an upgrade) would rebuild more than planned
        # and fail the verification after the data changed. Refused here, before anything changes.
        from lmeraser.unlearning.rebuild import stale_stages

        stale = stale_stages(ws, SERVING_TARGET)
        if stale:
            raise LmeraserError(
                "the pipeline is not up to date with data/, params.yaml or the code "
                f"(`dvc status` lists {', '.join(stale)}): run `dvc repro` first, then `lmeraser unlearn`; "
                "this batch changed nothing and its requests stay pending."
            )
        cluster_of = ws.cluster_of()
        targets = self._targets()
        wanted, to_forget = set(targets), set(self._targets("forget"))
        index = ws.prompt_index_or_empty()
        ids = {r.request_id for r in self.requests}
        # Influence records these requests already produced: this exact batch supersedes them.
        entries = self.journal.requests()
        supersedes = sorted({e["record"] for rid in ids for e in entries[rid].history if e["state"] == "approximated"})
        samples = {}
        for split in ("public", "private"):
            manifest = ws.manifest(split)
            found = manifest.loc[manifest["sample_id"].isin(wanted)]
            for sid, chash, label in zip(found["sample_id"], found["content_hash"], found["label"], strict=True):
                samples[sid] = Sample(split=split, content_hash=chash, label=int(label))
            erased = [sid for sid in found["sample_id"] if sid in to_forget]
            if erased:  # read from their shards only
                self._images.update(zip(erased, ws.images_of(split, erased), strict=True))
        # The plan: every cluster whose members this batch changes (a label or image "correction"
        # equal to what is there changes nothing), and every cluster a corrected image will be
        # assigned to (an image correction can move a sample to another cluster).
        # A sample forgotten in this batch is not corrected (its rectify requests change nothing);
        # of several corrections of one sample in a batch, the last of each kind stands.
        final_label, corrected = self._final_corrections(samples, to_forget)
        changing = set(to_forget)
        changing |= {sid for sid, image in corrected.items() if content_hash(image) != samples[sid].content_hash}
        changing |= {sid for sid, label in final_label.items() if label != samples[sid].label}
        moved_to = self._assigned_clusters([image for sid, image in corrected.items() if sid in cluster_of])
        planned = sorted({int(cluster_of[s]) for s in changing if s in cluster_of} | moved_to)
        public = [s for s in targets if s in samples and samples[s].split == "public"]
        forget = [s for s in self._targets("forget") if s in samples]
        mia = None
        if forget:
            images = np.stack([self._images[s] for s in forget])
            mia = self._mia(images, np.array([samples[s].label for s in forget]))
        audit = self._audit_before(samples, bool(public))
        metrics = ws.metrics() if ws.metrics_file.exists() else {}
        outside = outside_change(ws)
        if outside:
            self.log(
                f"the serving path changed since lineage record {outside['since_record']} with no record of its own "
                f"(clusters {[c['cluster'] for c in outside['clusters_changed']]}); "
                "this batch's record names the change"
            )
        self.log(
            f"batch {self.state.batch_id}: {len(self.requests)} request(s), {len(targets)} sample(s), "
            f"planned clusters {planned}"
        )
        return Capture(
            # The code version as the batch found it: a batch started on a clean checkout says so,
            # though its own data.dvc and dvc.lock changes make the tree dirty until they are committed.
            code=code_info(ws, self.params),
            data_md5=data_md5(ws.root),
            dvc_lock_sha256=file_sha256(ws.dvc_lock),
            prompts=served_prompts(ws),
            exact_prompts=index.hashes(),
            exact_keys={c: e.key for c, e in index.clusters.items()},
            supersedes=supersedes,
            accuracy=metrics.get("accuracy"),
            planned_clusters=planned,
            backbone_rebuild=bool(public),
            samples=samples,
            membership_inference=mia,
            n_clusters=len(index.clusters),
            outside_change=outside,
            forgetting_audit=audit,
        )

    def _audit_before(self, samples: dict[str, Sample], backbone_rebuild: bool) -> dict | None:
        """The forgetting audit's references and the served model's scores before the batch
        (lmeraser/audit/forgetting.py), while the samples are still in the data; None when off."""
        from lmeraser.audit import forgetting
        from lmeraser.inference import ServingModel
        from lmeraser.score_cache import score_test_split

        if self.params.audit.references == 0 or backbone_rebuild:
            return None  # a new backbone: references on the old one would not describe the model served after
        if not any(s in samples and samples[s].split == "private" for s in self._targets("forget")):
            return None
        model = ServingModel.load(self.ws)
        batch_size = self.params.evaluate.batch_size
        _, routes, _ = score_test_split(self.ws, model, batch_size)
        state = forgetting.references_before(self.ws, self.params, self.requests, routes, self.log)
        if state is None:
            return None
        audited = [s for ids in state["chosen"].values() for s in ids]
        images, labels = np.stack([self._images[s] for s in audited]), np.array([samples[s].label for s in audited])
        state["before"] = {
            "scores": forgetting.served_scores(model, images, labels, audited, batch_size),
            "digests": forgetting.served_digests(model, state["clusters"]),
        }
        return state

    def _audit_after(self) -> tuple[dict, list[str]]:
        """The forgetting audit's verdicts (the section the record signs) and the problems that
        stop the batch: every sample still detectable in the served model, and every cluster that
        serves neither its expected rebuild nor something the erased pixels (held in memory by the
        process that erased them) can score.

        A cluster that serves exactly its expected rebuild (the OUT reference with its own seed,
        trained at capture without the batch's samples) is scored from that reference, so a batch
        resumed after the erasure is audited as fully as one that ran through."""
        from lmeraser.audit import forgetting
        from lmeraser.inference import ServingModel

        capture, params = self.capture, self.params
        state = capture.forgetting_audit
        key = Keyer(self.ws, create=False).subject
        if state is None:
            reason = (
                "the batch rebuilds the backbone (public samples)"
                if capture.backbone_rebuild and params.audit.references
                else None
            )
            return forgetting.section(None, None, params, key, {}, reason), []
        start = time.perf_counter()
        model = ServingModel.load(self.ws)
        digests = forgetting.served_digests(model, state["clusters"])
        scores, other = forgetting.expected_after(state, digests)
        problems = []
        for cluster in other:
            targets = state["clusters"][cluster]["targets"]
            if all(s in self._images for s in targets):
                images = np.stack([self._images[s] for s in targets])
                labels = np.array([capture.samples[s].label for s in targets])
                scores.update(forgetting.served_scores(model, images, labels, targets, params.evaluate.batch_size))
            else:
                problems.append(
                    f"forgetting audit: cluster {cluster} serves a prompt that is not its retrain without the batch's "
                    f"samples (tensor digest {digests.get(cluster, 'none')[:16]}, "
                    f"expected {state['clusters'][cluster]['rebuild_digest'][:16]}), "
                    "and the erased pixels that could score it are gone (the batch was resumed)"
                )
        result = forgetting.conclude(state, params, state["before"], {"scores": scores, "digests": digests})
        seconds = {"references": state["seconds"], "after": time.perf_counter() - start}
        section = forgetting.section(state, result, params, key, seconds)
        section["served_as_expected_rebuild"] = sorted(int(c) for c in state["clusters"] if c not in other)
        problems += [
            f"forgetting audit: sample {s['sample_id']} of request {', '.join(state['requests_of'][s['sample_id']])} "
            f"is still detectable in the served model after its forget (p = {s['after']['p_value']:.2g}, "
            f"detectable at p <= {result['threshold']:.2g})"
            for s in result["samples"]
            if s["verdict"] == "FAIL"
        ]
        return section, problems

    def _final_corrections(
        self, samples: dict[str, Sample], forgotten: set[str]
    ) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """The label and the image each rectified sample ends the batch with (the last request of
        each kind wins, as the data edits apply them in order); samples this batch forgets and
        samples no longer in the data are left out."""
        labels, images = {}, {}
        for request in self.requests:
            sid = request.sample_ids[0] if request.kind == "rectify" and request.sample_ids else None
            if sid not in samples or sid in forgotten:
                continue
            if request.label is not None:
                labels[sid] = request.label
            elif request.input_path:
                images[sid] = request
        return labels, {
            sid: corrected_image(self.ws, request) for sid, request in images.items()
        }  # each image read once

    def _assigned_clusters(self, images: list[np.ndarray]) -> set[int]:
        """Clusters these (corrected) images will be assigned to (assignment is a pure function of
        backbone, prototypes and image: invariant 2)."""
        if not images:
            return set()
        from lmeraser.clustering import nearest
        from lmeraser.compute import Compute
        from lmeraser.models.backbone import image_features, load_backbone

        backbone, meta = load_backbone(self.ws)
        return {
            int(c)
            for c in nearest(
                image_features(backbone, meta, np.stack(images)), self.ws.prototypes(), gpu=Compute.of(meta).faiss_gpu
            )
        }

    def _hold_pixels(self, samples: dict[str, Sample], forgotten: set[str]) -> None:
        """The pixels of the samples this batch erases, in memory (never written), for the checks
        after the erasure: a batch resumed before its erasure reads them from the data once more."""
        for split in ("public", "private"):
            wanted = [s for s in forgotten if s in samples and samples[s].split == split and s not in self._images]
            present = set(self.ws.manifest(split)["sample_id"]) if wanted else set()
            wanted = [s for s in wanted if s in present]
            if wanted:
                self._images.update(zip(wanted, self.ws.images_of(split, wanted), strict=True))

    def _apply(self) -> Applied:
        ws = self.ws
        samples = self.capture.samples
        keyer = Keyer(ws)
        # What must stay erased or corrected, decided from the state captured before any change,
        # so a re-run after an interruption writes the same rows.
        rows, removed, edits = [], {"public": [], "private": []}, []
        forgotten = set(self._targets("forget"))
        self._hold_pixels(samples, forgotten)
        for request in self.requests:
            if request.kind == "rectify" and request.sample_ids[0] in forgotten:
                continue  # erased in this batch: nothing is left to correct
            if request.kind == "forget":
                for sid in request.sample_ids:
                    info = samples.get(sid)
                    if info is None:
                        continue
                    if sid in removed[info.split]:
                        continue  # named by an earlier request of this batch too: one erasure, one row
                    removed[info.split].append(sid)
                    rows.append({"sample_id": sid, "content_key": keyer.content(info.content_hash), "reason": "forget"})
            elif request.label is not None:
                sid = request.sample_ids[0]
                rows.append({"sample_id": sid, "content_key": "", "reason": "rectify-label", "label": request.label})
                edits.append((sid, {"label": request.label}))
            else:
                sid = request.sample_ids[0]
                rows.append(
                    {
                        "sample_id": sid,
                        "content_key": keyer.content(samples[sid].content_hash),
                        "reason": "rectify-input",
                    }
                )
                edits.append((sid, {"image": corrected_image(ws, request)}))
        # The durable list first, then its copy in data/, then the data: if we are killed in
        # between, re-running finds the rows listed and finishes the edits (each is idempotent).
        suppression.add(ws, rows)
        add_tombstones(rows, ws)
        for sid, change in edits:
            update_sample(sid, samples[sid].split, ws, **change)
        for split, ids in removed.items():
            present = set(ws.manifest(split)["sample_id"])
            todo = [s for s in ids if s in present]
            if todo:
                remove_samples(todo, split, ws)
        refresh_counts(ws)  # idempotent: right after a resume too
        applied_at = time.time()
        self.journal.append([event(r.request_id, "applied", applied_at) for r in self.requests])
        failpoint("apply:journaled")
        self.log(
            f"data updated: removed {sum(len(v) for v in removed.values())} sample(s), {len(rows)} suppression row(s)"
        )
        erased = sorted({r["content_key"] for r in rows if r["content_key"]})
        return Applied(removed=removed, erased_content_keys=erased, suppression_rows=len(rows), applied_at=applied_at)

    def _version(self) -> Versioned:
        dvc_add(self.ws.root, "data")
        md5 = data_md5(self.ws.root)
        self.log(f"data version {self.capture.data_md5} -> {md5}")
        return Versioned(data_md5=md5)

    def _rebuild(self) -> Rebuilt:
        # The serving path only (evaluate and its upstream), in this process and recorded in
        # dvc.lock; the baselines stage is re-measured by the next full `dvc repro`.
        from lmeraser.unlearning.rebuild import reproduce

        ws = self.ws

        # What an earlier try of this step ran (killed after dvc.lock recorded it: nothing is left
        # to run now), then what this one runs; a stage run again replaces its earlier summary.
        ran = {entry["stage"]: entry["summary"] for entry in self.state.stages_ran}

        def after_stage(stage: str, summary: dict) -> None:
            # The overlays this batch makes exact go before the evaluate stage registers the served
            # model: a registered bundle must not carry an influence edit (ids, request details).
            if stage == "train":
                self._retire_overlay()
            ran[stage] = json.loads(json.dumps(summary, default=_json_value))

        def before_record() -> None:
            from lmeraser.unlearning.purge import remove_from_store, superseded_in_store

            self.state.stages_ran = [{"stage": stage, "summary": summary} for stage, summary in ran.items()]
            # The prompts the last record pinned that this rebuild superseded leave the store now,
            # so that dvc.lock records the store once per batch (the purge would write it again).
            # Named in the batch file before they go: a resumed batch still counts them.
            stale = superseded_in_store(ws, set(self._superseded(served_prompts(ws))))
            # What the train stage pruned itself (superseded keys no record pinned) is counted too.
            pruned = (ran.get("train") or {}).get("pruned") or []
            self.state.prompts_removed = sorted(set(self.state.prompts_removed) | set(stale) | set(pruned))
            self.save()
            remove_from_store(ws, stale)

        reproduce(ws, self.params, SERVING_TARGET, self.log, after_stage, self.map_jobs, before_record)
        stages = [definition.name for definition in upstream(SERVING_TARGET) if definition.name in ran]
        # Handed on (the tracking backlog) once dvc.lock records the stages, each under an id of
        # this batch and stage: handed on again after a kill, it replaces itself, and a stage run
        # already in MLflow under that id is not logged twice (lmeraser/tracking.py).
        for stage in stages:
            if self.after_stage is not None:
                self.after_stage(stage, ran[stage], f"{self.state.batch_id}/{stage}")
        failpoint("rebuild:reproduced")
        self._retire_overlay()
        index = ws.prompt_index()
        # What changed, from the content-addressed keys before and after: right even when this
        # step resumes after a crash that came once the stages had run and been recorded (then
        # nothing is left to run, and this process trained nothing).
        before_keys = self.capture.exact_keys
        if before_keys is None:  # a batch captured before keys were kept
            last = ws.last_run() if "train" in stages else {}
            rebuilt, retired = [int(c) for c in last.get("trained", [])], [int(c) for c in last.get("retired", [])]
        else:
            rebuilt = sorted(int(c) for c, e in index.clusters.items() if before_keys.get(c) != e.key)
            retired = sorted(int(c) for c in before_keys if c not in index.clusters)
        after = served_prompts(ws)
        seeds = {c: e.seed for c, e in index.clusters.items()}
        self.log(f"rebuilt clusters {rebuilt} ({len(after) - len(rebuilt)} untouched); stages run: {', '.join(stages)}")
        return Rebuilt(
            stages=stages,
            rebuilt=rebuilt,
            retired=retired,
            prompts=after,
            seeds=seeds,
            accuracy=ws.metrics().get("accuracy"),
            dvc_lock_sha256=file_sha256(ws.dvc_lock),
            superseded=self._superseded(after),
        )

    def _superseded(self, served: dict[str, str]) -> list[str]:
        """The served prompts that changed, and the exact prompts influence overlays stood in for
        (sha256), against what each cluster serves now."""
        before = set(self.capture.prompts.values()) | set(self.capture.exact_prompts.values())
        return sorted(before - set(served.values()))

    def _retire_overlay(self) -> None:
        """Drop the influence overlays this batch makes exact (and any gone stale), with their files."""
        overlay = Overlay(self.ws)
        ids = {r.request_id for r in self.requests}
        active = overlay.active(self.ws.prompt_index())
        keep = {c: e for c, e in active.items() if not {edit["request_id"] for edit in e["edits"]} <= ids}
        if overlay.path.exists():
            overlay.write(keep)
        removed = overlay.store.prune({e["key"] for e in keep.values()})
        if removed:
            self.log(f"retired {len(removed)} influence overlay(s): their clusters are now exact")

    def _purge(self) -> Purged:
        from lmeraser.unlearning.purge import purge

        return Purged(
            **purge(
                self.ws,
                set(self.rebuilt.superseded),
                self.log,
                set(self.applied.erased_content_keys),
                removed_by_rebuild=len(self.state.prompts_removed),
            )
        )

    def _verify(self) -> Verified:
        from lmeraser.audit.forgetting import in_digests
        from lmeraser.audit.scan import scan

        capture, rebuild = self.capture, self.rebuilt
        references = set(in_digests(capture.forgetting_audit))
        report = scan(
            self.ws, set(self.applied.erased_content_keys), set(rebuild.superseded), reference_digests=references
        )
        hits = report.hits
        changed = rebuild.changed
        forget = [s for s in self._targets("forget") if s in capture.samples]
        if forget and all(s in self._images for s in forget):
            mia_after = self._mia(
                np.stack([self._images[s] for s in forget]), np.array([capture.samples[s].label for s in forget])
            )
        elif forget:
            mia_after = {
                "skipped": (
                    "the process was interrupted after the samples were erased; their pixels no longer exist to score"
                )
            }
        else:
            mia_after = None
        # Exactly the planned clusters changed (a backbone rebuild changes every one).
        as_planned = capture.backbone_rebuild or changed == capture.planned_clusters
        audit, audit_problems = self._audit_after()
        result = Verified(
            scan={**report.summary(), "examples": [h.__dict__ for h in hits[:5]]},
            clusters_as_planned=as_planned,
            planned_clusters=capture.planned_clusters,
            changed_clusters=changed,
            membership_inference={"before": capture.membership_inference, "after": mia_after},
            forgetting_audit=audit,
        )
        self.log(f"verification: scan hits {len(hits)}, clusters as planned {as_planned}")
        # An erasure record must never vouch for an erasure a check contradicts: stop here, sign
        # nothing, keep the requests pending; `lmeraser unlearn` resumes at this step.
        self._refuse_to_sign(self._unsigned_claims(result) + audit_problems + self._check_state())
        return result

    def _unsigned_claims(self, verified: Verified) -> list[str]:
        """What in the verification and the purge no record may be signed over."""
        problems = []
        if verified.scan.get("hits") != 0:
            where = sorted(
                {str(hit.get("location")) for hit in verified.scan.get("examples", []) if isinstance(hit, dict)}
            )
            problems.append(
                f"{verified.scan.get('hits')} scan hit(s): forgotten data survives "
                f"in {', '.join(where) or 'an unnamed location'}"
            )
        if not verified.clusters_as_planned:
            problems.append(
                f"the changed clusters {verified.changed_clusters} are not the planned {verified.planned_clusters}"
            )
        if (verified.forgetting_audit or {}).get("verdicts", {}).get("FAIL"):
            problems.append("the forgetting audit found a sample still detectable")
        if self.purged.remotes_failed:
            problems.append(f"the purge failed for DVC remote(s) {self.purged.remotes_failed}")
        if self.purged.artifact_stores_unreachable:
            problems.append(
                f"the purge could not reach MLflow artifact store(s) {self.purged.artifact_stores_unreachable}"
            )
        return problems

    def _refuse_to_sign(self, problems: list[str]) -> None:
        # An erasure record must never vouch for an erasure a check contradicts: stop here, sign
        # nothing, keep the requests pending; `lmeraser unlearn` resumes at the step that stopped.
        if problems:
            raise LmeraserError(
                f"verification failed: {'; '.join(dict.fromkeys(problems))}. Nothing was signed and the requests stay "
                f"pending (batch {self.state.batch_id}); fix it and run `lmeraser unlearn` again."
            )

    def _check_state(self) -> list[str]:
        """Every claim the record will make, checked against the data and the served bits, not
        against this batch's bookkeeping: a bookkeeping bug fails the batch instead of signing a
        false record. Returns what does not hold."""
        ws, capture, rebuild = self.ws, self.capture, self.rebuilt
        problems = []
        manifests = {split: ws.manifest(split) for split in ("public", "private", "test")}
        rows = {
            sid: (split, i) for split, frame in manifests.items() for i, sid in enumerate(frame["sample_id"].tolist())
        }
        keyer = Keyer(ws, create=False)
        present = {h for frame in manifests.values() for h in frame["content_hash"].tolist()}
        keyed_present: set[str] = set()

        def content_present(sid: str, key: str) -> bool:
            """Whether data/ holds the content keyed `key` (sample `sid`'s, erased): from the
            content hash the batch captured, when it keys to `key`, without keying every row."""
            sample = capture.samples.get(sid)
            if sample is not None and keyer.content(sample.content_hash) == key:
                return sample.content_hash in present
            if not keyed_present:  # erased by an earlier batch: every row's content keyed, once
                keyed_present.update(keyer.content(h) for h in present)
            return key in keyed_present

        listed = suppression.read(ws)
        erased_key = dict(
            zip(
                listed.loc[listed["reason"] == "forget", "sample_id"],
                listed.loc[listed["reason"] == "forget", "content_key"],
            )
        )
        forgotten_now = set(self._targets("forget"))  # a sample rectified and forgotten in one batch is gone
        for request in self.requests:
            rid = request.request_id
            if request.kind == "forget":
                for sid in request.sample_ids:
                    if sid in rows:
                        problems.append(f"request {rid}: sample {sid} is still in data/{rows[sid][0]}")
                    elif sid in erased_key and content_present(sid, erased_key[sid]):
                        problems.append(
                            f"request {rid}: the content of sample {sid} is still in data/ under another id"
                        )
                for sid in request.already_forgotten:
                    # "Already forgotten" is a claim about the data: no split holds the id or its content.
                    if sid in rows:
                        problems.append(
                            f"request {rid}: sample {sid}, said to be forgotten already, is in data/{rows[sid][0]}"
                        )
                    elif sid not in erased_key:
                        problems.append(
                            f"request {rid}: sample {sid}, said to be forgotten already, "
                            f"has no erasure in {ws.suppression_file.name}"
                        )
                    elif content_present(sid, erased_key[sid]):
                        problems.append(
                            f"request {rid}: the content of sample {sid}, said to be forgotten already, is in data/"
                        )
            elif (
                request.sample_ids and request.sample_ids[0] not in forgotten_now and request.sample_ids[0] not in rows
            ):
                problems.append(f"request {rid}: rectified sample {request.sample_ids[0]} is not in data/")
        # Each rectified sample holds the label and image its last correction of each kind gave.
        final_label, final_image = self._final_corrections(capture.samples, forgotten_now)
        for sid, label in final_label.items():
            if sid in rows:
                split, i = rows[sid]
                held_label = int(manifests[split].iloc[i]["label"])
                if held_label != label:
                    problems.append(f"sample {sid} has label {held_label} in data/{split}, not the corrected {label}")
        for sid, image in final_image.items():
            if sid in rows:
                split, i = rows[sid]
                held = content_hash(ws.images_of(split, [sid])[0])  # from its shard only
                if held != manifests[split].iloc[i]["content_hash"] or held != content_hash(image):
                    problems.append(f"sample {sid} in data/{split} does not hold its corrected image")
        # The served bits: every served prompt's file hashes to what the record will say, and the
        # clusters the record calls untouched serve exactly what they served before.
        for cluster, (path, sha) in Overlay(ws).served(ws.prompt_index_or_empty()).items():
            if not (ws.root / path).is_file() or sha256_file(ws.root / path) != sha:
                problems.append(f"cluster {cluster}'s served prompt {path} does not hash to its index entry")
        # What the record will name as each cluster's prompt after the batch is what it serves now.
        served_now = {c: sha for c, (_, sha) in Overlay(ws).served(ws.prompt_index_or_empty()).items()}
        for cluster in sorted(set(served_now) | set(rebuild.prompts), key=int):
            if served_now.get(cluster) != rebuild.prompts.get(cluster):
                problems.append(
                    f"cluster {cluster} serves {str(served_now.get(cluster))[:16]}, not the prompt its rebuild made "
                    f"({str(rebuild.prompts.get(cluster))[:16]}) that the record would name"
                )
        changed = set(rebuild.changed)
        for cluster, sha in rebuild.prompts.items():
            if int(cluster) not in changed and capture.prompts.get(cluster) != sha:
                problems.append(f"cluster {cluster} is counted untouched but its served prompt changed")
        return problems

    def _record(self) -> Recorded:
        log = lineage_log(self.ws)
        existing = [r for r in log.read_unverified() if r.predicate.get("batch_id") == self.state.batch_id]
        if existing:
            record = existing[0]
        else:
            if not self._verified_here:
                # A verification read back from the batch file is not trusted to say what the record
                # signs: its claims are checked against the data and the served bits once more.
                self._refuse_to_sign(self._unsigned_claims(self.verified) + self._check_state())
            record = sign_and_append(self.ws, self.predicate())
            failpoint("record:appended")
        # Resumed after the journal was told (and before the batch file went), this appends nothing.
        self.journal.append([event(r.request_id, "verified", record=record.number) for r in self.requests])
        failpoint("record:journaled")
        # The copies of corrected images go with their requests: the data now holds them.
        for request in self.requests:
            if request.input_path:
                (self.ws.root / request.input_path).unlink(missing_ok=True)
        self.log(f"lineage record {record.number} ({record.line_sha256[:16]}…) appended to {log.path}")
        commit = self._commit(record.number) if self.state.git_commit else None
        self.path.unlink(missing_ok=True)
        return Recorded(record=record.number, sha256=record.line_sha256, commit=commit)

    def _commit(self, number: int) -> str | None:
        """Commit the versions this batch made (data.dvc, dvc.lock, DVC's metrics and plots, the
        params, the journal, the lineage log and the suppression list), so the next record starts
        from a clean tree and the repository names the data version each record vouches for."""
        ws = self.ws
        tracked = [ws.root / path for path in GIT_TRACKED_OUTPUTS]
        log = lineage_log(ws)
        paths = [
            ws.data_dvc,
            ws.dvc_lock,
            ws.pipeline_params_file,
            *tracked,
            ws.journal_file,
            log.path,
            log.head_path,
            ws.signer_file,
            ws.suppression_file,
        ]
        try:
            commit = commit_paths(ws.root, paths, f"lmeraser: lineage record {number} ({self.state.batch_id})")
        except LmeraserError as error:
            self.log(f"{error} Commit data.dvc, dvc.lock and audit/ yourself.")
            return None
        if commit:
            self.log(f"committed the new data version and record {number} as {commit[:12]}")
        return commit

    def _references_purged(self) -> dict:
        """The audit's IN references are copies of the subjects' data in another form: held in
        memory only and dropped once scored; their digests let `audit scan` find one written anywhere."""
        from lmeraser.audit.forgetting import in_digests

        state = self.capture.forgetting_audit
        if not state:
            return {}
        return {
            "audit_references": {
                "trained": state["trained"],
                "held": "in memory only; each dropped as soon as it was scored (never written)",
                "in_reference_digests": in_digests(state),
            }
        }

    def predicate(self) -> ExactPredicate:
        params, capture, rebuild, verified = self.params, self.capture, self.rebuilt, self.verified
        before, after = capture.prompts, rebuild.prompts
        now = utc()
        keyer = Keyer(self.ws, create=False)
        return ExactPredicate(
            batch_id=self.state.batch_id,
            recorded_at=now,
            supersedes=capture.supersedes,
            requests=[RequestSummary.of(r, self.applied.applied_at, now, keyer.subject) for r in self.requests],
            removed_content_keys=self.applied.erased_content_keys,
            samples_affected=len(capture.samples),
            backbone_rebuild=capture.backbone_rebuild,
            planned_clusters=capture.planned_clusters,
            clusters_rebuilt=[
                ClusterRebuilt(
                    cluster=c,
                    prompt_sha256_before=before.get(str(c)),
                    prompt_sha256_after=after.get(str(c)),
                    seed=rebuild.seeds.get(str(c)),
                )
                for c in rebuild.changed
            ],
            clusters_untouched=sum(1 for c, h in after.items() if before.get(c) == h),
            data=DataVersions(
                data_dvc_md5_before=capture.data_md5,
                data_dvc_md5_after=self.versioned.data_md5,
                dvc_lock_sha256_before=capture.dvc_lock_sha256,
                dvc_lock_sha256_after=rebuild.dvc_lock_sha256,
            ),
            code=capture.code,
            environment=environment(params.prompt.kind, self.ws, params.runtime.threads),
            seconds=dict(self.state.seconds),
            accuracy=BeforeAfter(before=capture.accuracy, after=rebuild.accuracy),
            stages_run=rebuild.stages,
            purge={**self.purged.to_json(), **self._references_purged()},
            verification={k: v for k, v in verified.to_json().items() if k != "forgetting_audit"},
            forgetting_audit=verified.forgetting_audit,
            served_prompts=after,
            outside_change=capture.outside_change,
            salt_fingerprint=keyer.fingerprint(),
        )


def outside_change(ws: Workspace) -> dict | None:
    """What the serving path serves now that the last record did not vouch for (a re-ingestion
    followed by `dvc repro`, an upgrade): its changed subjects and clusters; None when the
    deployed artifacts are the last record's.

    Args:
        ws: the workspace whose lineage log is compared with what it deploys now.
    """
    records = lineage_log(ws).read_unverified()
    if not records:
        return None
    last = records[-1]
    now, then = deployed_subjects(ws), last.subjects
    changed_subjects = sorted(name for name in set(now) | set(then) if now.get(name) != then.get(name))
    if not changed_subjects:
        return None
    served = served_prompts(ws)
    # A key rotation repeats its predecessor's subjects and names no prompts: look past it.
    described = next((r for r in reversed(records) if not r.is_rotation), last)
    recorded = described.predicate.get("served_prompts") or {}
    if recorded:
        clusters = sorted({int(c) for c in set(served) | set(recorded) if served.get(c) != recorded.get(c)})
        before = recorded
    else:  # a record from before records named each cluster's prompt: compare with its subjects
        hashes = set(then.values())
        clusters = sorted(int(c) for c, sha in served.items() if sha not in hashes)
        before = {}
    return {
        "since_record": last.number,
        "subjects_changed": changed_subjects,
        "clusters_changed": [
            {
                "cluster": c,
                "prompt_sha256_before": before.get(str(c)),
                "prompt_sha256_after": served.get(str(c)),
                "seed": None,
            }
            for c in clusters
        ],
    }


def _disagreement(state: BatchState, name: str, journal: Journal) -> str | None:
    """Where a batch file disagrees with its own name or with the journal (the requests it holds
    must be the ones received, field for field); None when it agrees."""
    if state.batch_id != name or state.batch_id != batch_id(state.requests) or not state.requests:
        return f"its id {state.batch_id} is not the digest of its requests' ids, nor its name {name}"
    entries = journal.requests()
    for request in state.requests:
        entry = entries.get(request.request_id)
        if entry is None or entry.request != request:
            return f"request {request.request_id} is not the request the journal received"
    return None


def batch_id(requests: list[Request]) -> str:
    """A batch's id: a digest of its request ids, so a resumed batch keeps its name.

    Args:
        requests: the batch's requests, in the journal's order (oldest first).
    """
    return "batch-" + hashlib.sha256(",".join(r.request_id for r in requests).encode()).hexdigest()[:16]


def next_batch_id(ws: Workspace, max_requests: int | None = None) -> str | None:
    """The id of the batch `process_pending` would run now (an interrupted one first); None if idle.

    Args:
        ws: the workspace.
        max_requests: at most this many of the oldest pending requests.
    """
    batches = ws.batch_files()
    if batches:
        return batches[0].stem
    pending = Journal(ws).pending()[:max_requests]
    return batch_id(pending) if pending else None


def preload(ws: Workspace) -> None:
    """Import what a batch imports lazily (DVC, MLflow, Great Expectations, scikit-learn, the
    stages), open the MLflow store and the DVC repository (read only) and compute this process's
    numeric fingerprint (cached), so that a long-lived process (the service's worker) pays them
    once at start, not inside its first erasure.

    Args:
        ws: the workspace whose served prompts' compute is checked against this process (`check_compute`).
    """
    # Beyond DVC, Great Expectations and MLflow themselves, what a batch's first run imported
    # lazily (measured at 30,000 private samples: 929 modules, most of them networkx and
    # scikit-learn): DVC's stage graph, commit, gc and push with their git bindings, MLflow's SQL
    # store with its migrations, scikit-learn's metrics for the membership-inference figure.
    import dvc.repo  # noqa: F401
    import dvc.repo.commit  # noqa: F401
    import dvc.repo.gc  # noqa: F401
    import dvc.repo.push  # noqa: F401
    import great_expectations  # noqa: F401
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import pygit2  # noqa: F401 - DVC's git operations
    import sklearn.metrics  # noqa: F401

    import lmeraser.pipeline.assign  # noqa: F401
    import lmeraser.pipeline.evaluate  # noqa: F401
    import lmeraser.pipeline.train  # noqa: F401
    import lmeraser.pipeline.validate  # noqa: F401
    import lmeraser.unlearning.purge  # noqa: F401

    check_compute(ws)
    # The MLflow store opened once (its engine and schema check are kept per process), and the DVC
    # repository with its stage graph (networkx) and git bindings (pygit2, dulwich): read only.
    # A warm-up: whatever fails here fails the batch's own preflight or step, in one sentence.
    with contextlib.suppress(Exception):
        check_tracking_store(ws)
    with contextlib.suppress(Exception), dvc_repo(ws.root) as repo:
        _ = repo.index.graph, repo.scm.get_rev()
    # What the imports made lives as long as the process: moved out of the collector's
    # generations, the collections a batch triggers walk the batch's objects only (measured at
    # 30,000 private samples: 1.3 s of collections in one forget without, 0.75 s with).
    gc.freeze()


def _json_value(value):
    """A stage summary's value in JSON (numpy scalars, paths): saved in the batch file."""
    return value.item() if hasattr(value, "item") else str(value)


def process_pending(
    ws: Workspace,
    log=print,
    run_step=None,
    git_commit: bool = True,
    after_stage=None,
    max_requests: int | None = None,
    map_jobs=None,
) -> dict | None:
    """Process the pending requests as one batch (the oldest `max_requests`, or all), or finish an
    interrupted one.

    Args:
        ws: the workspace (a git + DVC repository whose params file `dvc repro` reads).
        log: where progress lines go.
        run_step: runs one step of the batch (the flow wraps each in a Prefect task); default: in turn.
        git_commit: commit the versions the batch made in the workspace's git repository.
        after_stage: called with (stage, summary, entry id) for each stage the rebuild ran, once dvc.lock records
            them (MLflow tracking; the id is the same when a resumed batch hands a stage on again).
        max_requests: at most this many of the oldest pending requests.
        map_jobs: how the rebuilt clusters train (the flow passes Dask's when runtime.executor is dask).

    Returns:
        The batch id, the record's number, sha256 and commit, the clusters rebuilt and retired, and
        the verification; None when nothing was pending.

    Raises:
        LmeraserError: a check failed; nothing was signed and the requests stay pending.
    """
    from lmeraser.unlearning.rebuild import check_executor

    with ws.lock("unlearn"):
        params = rebuild_params(ws)
        check_executor(params, map_jobs)
        recover(ws, log)
        if next_batch_id(ws, max_requests) is None:
            log("no pending requests")
            return None
        # Everything the batch needs to finish (key, signer, salt, MLflow store, writable
        # directories), checked before it changes anything; checked again on resume.
        check_before_change(ws)
        batch = UnlearnBatch.open(ws, params, log, git_commit, max_requests)
        batch.after_stage = after_stage
        batch.map_jobs = map_jobs
        run = run_step or (lambda b, step: b.run(step))
        for step in STEPS:
            run(batch, step)
        return {
            "batch_id": batch.state.batch_id,
            **batch.done["record"].to_json(),
            "rebuilt": batch.rebuilt.rebuilt,
            "retired": batch.rebuilt.retired,
            "verification": batch.verified.to_json(),
        }
