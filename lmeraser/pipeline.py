"""The pipeline stages as plain functions: read inputs from disk, compute, write outputs atomically.

Prefect flows (flows/) wrap these as tasks and add tracking; the CLI and dvc.yaml call the flows.
Each stage returns a small summary dict (what it did, its metrics) for logging.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lmeraser.clustering import choose_k, cluster_sizes, fit_prototypes, nearest, size_summary
from lmeraser.config import Params
from lmeraser.data.splits import SPLITS, load_split, read_source_info
from lmeraser.errors import LmeraserError, ValidationFailed
from lmeraser.evaluation import accuracy, confusion, linear_probe, per_cluster_accuracy, single_prompt
from lmeraser.inference import ServingModel
from lmeraser.io import atomic_path, atomic_save_npy, atomic_write_json, read_json, sha256_file
from lmeraser.models.backbone import extract_features, load_backbone, load_checkpoint, preprocess, save_backbone, train_backbone
from lmeraser.training import ArtifactStore, artifact_key, cluster_seed, code_version, members_digest, train_prompt


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, relative to one workspace root."""

    root: Path = Path(".")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def validation(self) -> Path:
        return self.artifacts / "validation"

    @property
    def backbone(self) -> Path:
        return self.artifacts / "backbone"

    @property
    def clusters(self) -> Path:
        return self.artifacts / "clusters"

    @property
    def prompts(self) -> Path:
        return self.artifacts / "prompts"

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.prompts / "store")

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"


Log = Callable[[str], None]


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


# -- validate ----------------------------------------------------------------------------------


def run_validate(params: Params, paths: Paths, log: Log = print) -> dict:
    from lmeraser.data.validation import SUITE_NAME, validate_splits

    report = validate_splits(paths.data, paths.reports / "data_docs")
    if not report.success:
        raise ValidationFailed(report.reason())
    # One ticket per split holding only that split's fingerprint: a change to the private split
    # re-runs nothing that depends on the public one.
    for split in SPLITS:
        files = {name: sha256_file(paths.data / split / name) for name in ("manifest.csv", "images.npy")}
        atomic_write_json(paths.validation / f"{split}.json", {"split": split, "suite": SUITE_NAME, "passed": True, "sha256": files})
    log(f"validation passed: {report.statistics['evaluated']} expectations over {report.statistics['rows']} samples")
    return {"metrics": {"expectations": report.statistics["evaluated"], "rows": report.statistics["rows"]}, "docs": str(report.docs_index)}


# -- backbone ----------------------------------------------------------------------------------


def run_backbone(params: Params, paths: Paths, log: Log = print) -> dict:
    info = read_source_info(paths.data)
    public = load_split("public", paths.data)
    cfg = params.backbone
    start = time.perf_counter()
    if cfg.checkpoint:
        model = load_checkpoint(cfg.checkpoint, cfg, info["num_classes"])
        origin = {"origin": "checkpoint", "checkpoint_sha256": sha256_file(cfg.checkpoint)}
        log(f"backbone loaded from {cfg.checkpoint}")
    else:
        # One model, trained once: use every core (recorded, since it changes the float order).
        threads = os.cpu_count() or 1
        torch.set_num_threads(threads)
        model = train_backbone(cfg, public.images, public.labels, info["num_classes"], params.seed, log)
        origin = {"origin": "trained on public split", "n_public": len(public), "threads": threads}
    seconds = time.perf_counter() - start
    meta = save_backbone(model, cfg, info["num_classes"], paths.backbone, {**origin, "seed": params.seed})
    log(f"backbone saved: sha256 {meta['sha256'][:16]}…")
    return {"metrics": {"backbone_seconds": seconds}, "sha256": meta["sha256"]}


# -- clustering --------------------------------------------------------------------------------


def _features(model, split, img_size: int) -> np.ndarray:
    return extract_features(model, preprocess(split.images, img_size))


def run_prototypes(params: Params, paths: Paths, log: Log = print) -> dict:
    model, meta = load_backbone(paths.backbone)
    fit_split = load_split(params.clustering.fit_on, paths.data)
    n_private = len(load_split("private", paths.data).manifest)
    k = choose_k(n_private, len(fit_split), params.clustering)
    if params.clustering.fit_on == "private":
        log("clustering.fit_on=private: prototypes depend on private data, so every deletion rebuilds every cluster")
    prototypes = fit_prototypes(_features(model, fit_split, meta["params"]["img_size"]), k, params.clustering, params.seed, params.runtime.threads)
    atomic_save_npy(paths.clusters / "prototypes.npy", prototypes)
    atomic_write_json(
        paths.clusters / "prototypes.json",
        {"k": k, "fit_on": params.clustering.fit_on, "backbone_sha256": meta["sha256"], "sha256": sha256_file(paths.clusters / "prototypes.npy")},
    )
    log(f"{k} prototypes fitted on {len(fit_split)} {params.clustering.fit_on} samples")
    return {"metrics": {"k": k}}


def run_assign(params: Params, paths: Paths, log: Log = print) -> dict:
    model, meta = load_backbone(paths.backbone)
    prototypes = np.load(paths.clusters / "prototypes.npy", allow_pickle=False)
    private = load_split("private", paths.data)
    clusters = nearest(_features(model, private, meta["params"]["img_size"]), prototypes)
    _write_csv(paths.clusters / "assignments.csv", pd.DataFrame({"sample_id": private.manifest["sample_id"], "cluster": clusters}))
    sizes = cluster_sizes(clusters, len(prototypes))
    summary = size_summary(sizes)
    atomic_write_json(paths.reports / "clusters.json", {**summary, "sizes": sizes.tolist()})
    _write_csv(paths.reports / "plots" / "cluster_sizes.csv", pd.DataFrame({"cluster": np.arange(len(sizes)), "size": sizes}))
    log(f"assigned {len(private)} private samples to {summary['n_clusters'] - summary['n_empty']} non-empty clusters")
    return {"metrics": summary}


def load_assignments(paths: Paths) -> pd.DataFrame:
    path = paths.clusters / "assignments.csv"
    if not path.exists():
        raise LmeraserError(f"{path}: not found; run the assign stage first.")
    return pd.read_csv(path, dtype={"sample_id": str})


# -- per-cluster training ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterJob:
    cluster: int
    rows: np.ndarray  # rows of the private split, sorted by sample id
    key: str
    seed: int


@dataclass
class TrainContext:
    params: Params
    paths: Paths
    backbone: torch.nn.Module
    backbone_sha256: str
    num_classes: int
    x: torch.Tensor
    y: torch.Tensor
    manifest: pd.DataFrame

    def train(self, job: ClusterJob) -> dict:
        """Train one cluster and store its artifact; pure in (members, config, seed)."""
        start = time.perf_counter()
        rows = torch.from_numpy(job.rows)
        state = train_prompt(self.backbone, self.x[rows], self.y[rows], self.params.prompt, self.num_classes, job.seed, self.params.runtime.threads)
        stored = self.paths.store.save(job.key, state, {"cluster": job.cluster, "n_members": len(job.rows), "seed": job.seed})
        return {"cluster": job.cluster, "key": job.key, "sha256": stored.sha256, "n_members": len(job.rows), "seed": job.seed, "seconds": time.perf_counter() - start}


def plan_training(params: Params, paths: Paths) -> tuple[TrainContext, list[ClusterJob]]:
    backbone, meta = load_backbone(paths.backbone)
    private = load_split("private", paths.data)
    assignments = load_assignments(paths)
    if assignments["sample_id"].tolist() != private.sample_ids:
        raise LmeraserError(f"{paths.clusters / 'assignments.csv'} is out of date with data/private; re-run the assign stage.")
    extra = {}
    prototypes_meta = read_json(paths.clusters / "prototypes.json")
    if prototypes_meta["fit_on"] == "private":
        # Prototypes then depend on private data: any deletion must rebuild every cluster.
        extra["prototypes"] = prototypes_meta["sha256"]
    ctx = TrainContext(
        params, paths, backbone, meta["sha256"], meta["num_classes"],
        preprocess(private.images, meta["params"]["img_size"]), torch.from_numpy(private.labels), private.manifest,
    )
    jobs = []
    clusters = assignments["cluster"].to_numpy()
    for cluster in np.unique(clusters):
        rows = np.flatnonzero(clusters == cluster)  # manifest is sorted by sample id, so rows are too
        members = private.manifest.iloc[rows]
        seed = cluster_seed(params.seed, int(cluster))
        key = artifact_key(
            members=members_digest(members["sample_id"], members["content_hash"], members["label"]),
            backbone_sha256=meta["sha256"], prompt=params.prompt, num_classes=meta["num_classes"],
            seed=seed, threads=params.runtime.threads, extra=extra,
        )
        jobs.append(ClusterJob(int(cluster), rows, key, seed))
    return ctx, jobs


def run_train(params: Params, paths: Paths, log: Log = print, map_fn: Callable[[Callable, Iterable], Iterable] = map) -> dict:
    """Reuse every artifact whose key is unchanged, train the rest (through `map_fn`), write the index."""
    ctx, jobs = plan_training(params, paths)
    store = paths.store
    previous = read_json(paths.prompts / "index.json")["clusters"] if (paths.prompts / "index.json").exists() else {}
    to_train = [job for job in jobs if not store.has(job.key)]
    reused = [job for job in jobs if store.has(job.key)]
    log(f"{len(jobs)} non-empty clusters: training {len(to_train)}, reusing {len(reused)}")
    start = time.perf_counter()
    trained = {entry["cluster"]: entry for entry in map_fn(ctx.train, to_train)}
    seconds = time.perf_counter() - start
    entries = {}
    for job in jobs:
        if job.cluster in trained:
            entry = trained[job.cluster]
        else:
            entry = {"cluster": job.cluster, "key": job.key, "sha256": sha256_file(store.path(job.key)), "n_members": len(job.rows), "seed": job.seed}
        entries[str(job.cluster)] = {k: entry[k] for k in ("key", "sha256", "n_members", "seed")}
    retired = sorted(set(previous) - set(entries), key=int)
    index = {
        "clusters": dict(sorted(entries.items(), key=lambda kv: int(kv[0]))),
        "backbone_sha256": ctx.backbone_sha256,
        "num_classes": ctx.num_classes,
        "prompt": params.prompt.model_dump(),
        "code_version": code_version(),
        "last_run": {"trained": sorted(trained), "reused": sorted(j.cluster for j in reused), "retired": [int(c) for c in retired]},
    }
    atomic_write_json(paths.prompts / "index.json", index)
    pruned = store.prune({entry["key"] for entry in entries.values()})
    log(f"trained {len(trained)} clusters in {seconds:.1f}s, reused {len(reused)}, retired {len(retired)}, pruned {len(pruned)} superseded artifacts")
    return {
        "metrics": {"clusters_trained": len(trained), "clusters_reused": len(reused), "clusters_retired": len(retired), "train_seconds": seconds},
        "trained": sorted(trained), "reused": sorted(j.cluster for j in reused), "pruned": pruned,
    }


# -- evaluate ----------------------------------------------------------------------------------


def run_evaluate(params: Params, paths: Paths, log: Log = print) -> dict:
    model = ServingModel.load(paths.artifacts)
    test = load_split("test", paths.data)
    labels = test.labels
    start = time.perf_counter()
    predictions, routes = model.predict(test.images, params.evaluate.batch_size)
    infer_seconds = time.perf_counter() - start
    clusters = per_cluster_accuracy(labels, predictions, routes)
    index = model.index["clusters"]
    # Only deterministic values go into metrics.json (it is hashed into dvc.lock); timings go to MLflow.
    metrics = {
        "accuracy": accuracy(labels, predictions),
        "n_test": len(labels),
        "n_private": sum(entry["n_members"] for entry in model.index["clusters"].values()),
        "n_clusters_active": len(index),
    }
    sizes = read_json(paths.reports / "clusters.json")
    metrics.update({f"cluster_{k}": v for k, v in sizes.items() if k != "sizes"})
    atomic_write_json(paths.metrics, metrics)
    plots = paths.reports / "plots"
    _write_csv(plots / "confusion.csv", pd.DataFrame({"actual": labels, "predicted": predictions}))
    _write_csv(
        plots / "per_cluster_accuracy.csv",
        pd.DataFrame(
            [{"cluster": c, "accuracy": v["accuracy"], "n_test": v["n_test"], "n_train": index[str(c)]["n_members"]} for c, v in sorted(clusters.items())]
        ),
    )
    atomic_write_json(paths.reports / "confusion_matrix.json", confusion(labels, predictions, model.index["num_classes"]).tolist())
    log(f"test accuracy {metrics['accuracy']:.4f} over {len(index)} active clusters")
    return {"metrics": {**metrics, "inference_seconds": infer_seconds}}


# -- baselines ---------------------------------------------------------------------------------


def run_baselines(params: Params, paths: Paths, log: Log = print) -> dict:
    """The two reference models, on the same private split: a linear probe on frozen features and
    a single prompt + head trained on all private data (the "no clusters" model).

    A separate stage from evaluate, so that serving an unlearning request (`dvc repro evaluate`)
    does not pay for retraining a whole-dataset baseline; they are re-measured on the next full
    `dvc repro`. Only their metrics are kept, never the models.
    """
    out, seconds = {"enabled": params.evaluate.baselines}, {}
    if params.evaluate.baselines:
        backbone, meta = load_backbone(paths.backbone)
        private, test = load_split("private", paths.data), load_split("test", paths.data)
        img_size = meta["params"]["img_size"]
        start = time.perf_counter()
        probe = linear_probe(backbone, private.images, private.labels, test.images, img_size, params.seed)
        out["linear_probe_accuracy"] = accuracy(test.labels, probe)
        seconds["linear_probe_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        single = single_prompt(
            backbone, private.images, private.labels, test.images, img_size, params.prompt,
            meta["num_classes"], params.seed, params.runtime.threads, params.evaluate.batch_size,
        )
        out["single_prompt_accuracy"] = accuracy(test.labels, single)
        seconds["single_prompt_seconds"] = time.perf_counter() - start
        log(f"baselines: linear probe {out['linear_probe_accuracy']:.4f} | single prompt {out['single_prompt_accuracy']:.4f}")
    atomic_write_json(paths.reports / "baselines.json", out)
    return {"metrics": {**{k: v for k, v in out.items() if k != "enabled"}, **seconds}}
