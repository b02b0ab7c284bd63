"""train: one prompt + head per non-empty cluster, content-addressed (invariants 3 and 4).

Every cluster whose key is already in the store is reused; the rest train (through `map_jobs`,
which the Prefect flow replaces with mapped tasks). The index names what each cluster serves;
`last_run.json` says what this run trained, reused and retired.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmeraser.compute import Compute
from lmeraser.config import Params, PromptParams
from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_write_json, sha256_file
from lmeraser.models.backbone import load_backbone, preprocess
from lmeraser.progress import track
from lmeraser.store import ArtifactStore
from lmeraser.training import artifact_key, cluster_seed, key_inputs, members_digest, train_prompt
from lmeraser.workspace import InputSpec, PromptEntry, PromptIndex, SplitPixels, Workspace

Log = Callable[[str], None]


@dataclass(frozen=True)
class ClusterJob:
    cluster: int
    rows: np.ndarray  # rows of the private split, sorted by sample id
    key: str
    seed: int


@dataclass
class ClusterTrainer:
    """What every cluster's training shares: the frozen backbone and the private split (its uint8
    images, read per cluster from the shards that hold its members and preprocessed when it
    trains, so neither the split's pixels nor a 224 px backbone's float tensors are held whole;
    reading and preprocessing are per image, so the bits are the same)."""

    prompt: PromptParams
    compute: Compute  # the backbone's device and precision, runtime.threads
    store: ArtifactStore
    backbone: torch.nn.Module
    num_classes: int
    images: np.ndarray | SplitPixels  # rows of the private split by manifest row
    y: torch.Tensor
    spec: InputSpec

    def state(self, job: ClusterJob) -> dict[str, torch.Tensor]:
        """The trained prompt of one cluster: pure in (members, config, seed); replay calls this."""
        x = preprocess(self.images[job.rows], self.spec)
        return train_prompt(
            self.backbone, x, self.y[torch.from_numpy(job.rows)], self.prompt, self.num_classes, job.seed, self.compute
        )

    def train(self, job: ClusterJob) -> dict:
        """Train one cluster and store its artifact."""
        start = time.perf_counter()
        stored = self.store.save(
            job.key, self.state(job), {"cluster": job.cluster, "n_members": len(job.rows), "seed": job.seed}
        )
        return {
            "cluster": job.cluster,
            "entry": PromptEntry(job.key, stored.sha256, len(job.rows), job.seed),
            "seconds": time.perf_counter() - start,
        }


@dataclass
class TrainingPlan:
    trainer: ClusterTrainer
    jobs: list[ClusterJob]
    key_inputs: dict


def plan(params: Params, ws: Workspace) -> TrainingPlan:
    """Every non-empty cluster's job and artifact key, from the current data and assignments."""
    backbone, meta = load_backbone(ws)
    private = ws.manifest("private")  # pixels are read per cluster, from the shards that hold its members
    sample_ids = private["sample_id"].tolist()
    assignments = ws.assignments()
    if assignments["sample_id"].tolist() != sample_ids:
        raise LmeraserError(f"{ws.assignments_file} is out of date with data/private; re-run the assign stage.")
    extra = {}
    prototypes_meta = ws.prototypes_meta()
    if prototypes_meta["fit_on"] == "private":
        # Prototypes then depend on private data: any deletion must rebuild every cluster.
        extra["prototypes"] = prototypes_meta["sha256"]
    compute = Compute.of(meta).with_threads(params.runtime.threads)
    shared = key_inputs(
        backbone_sha256=meta.sha256, prompt=params.prompt, num_classes=meta.num_classes, compute=compute, extra=extra
    )
    trainer = ClusterTrainer(
        params.prompt,
        compute,
        ArtifactStore(ws.store_dir),
        backbone,
        meta.num_classes,
        SplitPixels(ws, "private", sample_ids),
        torch.from_numpy(private["label"].to_numpy(dtype=np.int64, copy=True)),
        meta.input,
    )
    jobs = []
    clusters = assignments["cluster"].to_numpy()
    for cluster in np.unique(clusters):
        rows = np.flatnonzero(clusters == cluster)  # the manifest is sorted by sample id, so rows are too
        members = private.iloc[rows]
        seed = cluster_seed(params.seed, int(cluster))
        digest = members_digest(
            members["sample_id"].tolist(), members["content_hash"].tolist(), members["label"].tolist()
        )
        jobs.append(ClusterJob(int(cluster), rows, artifact_key(shared, digest, seed), seed))
    return TrainingPlan(trainer, jobs, shared)


def train_serially(trainer: ClusterTrainer, jobs: list[ClusterJob]) -> list[dict]:
    return [trainer.train(job) for job in track(jobs, "training clusters")]


def run(
    params: Params,
    ws: Workspace,
    log: Log = print,
    map_jobs: Callable[[ClusterTrainer, list[ClusterJob]], list[dict]] = train_serially,
) -> dict:
    """Reuse every artifact whose key is unchanged, train the rest, write the index."""
    training = plan(params, ws)
    store = training.trainer.store
    previous = ws.prompt_index_or_empty()
    to_train = [job for job in training.jobs if not store.has(job.key)]
    reused = [job for job in training.jobs if store.has(job.key)]
    rekeyed = _rekeyed(previous, training, store, log)
    log(f"{len(training.jobs)} non-empty clusters: training {len(to_train)}, reusing {len(reused)}")
    start = time.perf_counter()
    trained = (
        {result["cluster"]: result["entry"] for result in map_jobs(training.trainer, to_train)} if to_train else {}
    )
    seconds = time.perf_counter() - start
    entries = {}
    for job in training.jobs:
        entries[str(job.cluster)] = trained.get(job.cluster) or PromptEntry(
            job.key, sha256_file(store.path(job.key)), len(job.rows), job.seed
        )
    retired = sorted(int(c) for c in set(previous.clusters) - set(entries))
    atomic_write_json(ws.prompt_index_file, PromptIndex(entries, training.key_inputs).to_json())
    last_run = {
        "trained": sorted(trained),
        "reused": sorted(j.cluster for j in reused),
        "retired": retired,
        "rekeyed": rekeyed,
    }
    atomic_write_json(ws.last_run_file, last_run)
    # Superseded artifacts go, except the ones the latest lineage record signed: an experiment
    # (`dvc exp run -S ...`) must not delete the deployed, attested prompts. An unlearning batch
    # purges the ones it supersedes itself.
    pruned = store.prune({entry.key for entry in entries.values()} | ws.pinned_keys())
    log(
        f"trained {len(trained)} / reused {len(reused)} clusters in {seconds:.1f}s; retired {len(retired)}, "
        f"pruned {len(pruned)} superseded artifacts"
    )
    return {
        "metrics": {
            "clusters_trained": len(trained),
            "clusters_reused": len(reused),
            "clusters_retired": len(retired),
            "train_seconds": seconds,
        },
        **last_run,
        "pruned": pruned,
    }


def _rekeyed(previous: PromptIndex, training: TrainingPlan, store: ArtifactStore, log: Log) -> int:
    """Say how many stored artifacts a change of what every key shares (code, library versions,
    settings, key format) makes stale, and what changed: never invalidate a store silently."""
    if not previous.clusters or previous.key_inputs == training.key_inputs:
        return 0
    planned = {job.key for job in training.jobs}
    stale = [c for c, e in previous.clusters.items() if e.key not in planned and store.has(e.key)]
    if stale:
        old, new = previous.key_inputs, training.key_inputs
        if old:
            changed = [
                _change(name, old.get(name), new.get(name))
                for name in sorted(set(old) | set(new))
                if old.get(name) != new.get(name)
            ]
        else:
            changed = [f"the index predates key format {new['key_format']}"]
        log(f"re-keyed {len(stale)} stored artifact(s): {'; '.join(changed)}; their clusters retrain")
    return len(stale)


def _change(name: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        return ", ".join(
            f"{name}.{k} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
        )
    if isinstance(old, str) and len(old) > 20:
        return f"{name} changed"
    return f"{name} {old} -> {new}"


def train_from_workspace(root: str, params_file: str, cluster: int, key: str) -> dict:
    """Train one cluster in a process that holds nothing yet (a Dask worker), from the workspace:
    the plan (backbone, private split, jobs) is loaded once per process and version of its
    inputs, so every worker must see the workspace's files (a shared filesystem). `key` is the
    artifact key the caller planned: a workspace that changed since is refused, not trained."""
    ws = Workspace(Path(root), Path(params_file))
    inputs = tuple(
        path.stat().st_mtime_ns
        for path in (
            ws.params_file,
            ws.backbone_weights,
            ws.assignments_file,
            *(directory / "images.npy" for directory in ws.shard_dirs("private")),
        )
    )
    training = _plan(str(ws.root), str(ws.params_file), inputs)
    job = next((job for job in training.jobs if job.cluster == cluster), None)
    if job is None or job.key != key:
        raise LmeraserError(
            f"cluster {cluster}: the workspace at {root} changed since the training was planned (another key); "
            "run the stage again."
        )
    return training.trainer.train(job)


@functools.lru_cache(maxsize=2)
def _plan(root: str, params_file: str, inputs: tuple) -> TrainingPlan:
    from lmeraser.config import load_params

    ws = Workspace(Path(root), Path(params_file))
    return plan(load_params(ws.params_file), ws)


def train_in_threads(workers: int) -> Callable[[ClusterTrainer, list[ClusterJob]], list[dict]]:
    """`map_jobs` that trains `workers` clusters at a time in threads (what the flow's task runner does)."""
    from concurrent.futures import ThreadPoolExecutor

    def map_jobs(trainer: ClusterTrainer, jobs: list[ClusterJob]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(track(pool.map(trainer.train, jobs), "training clusters", total=len(jobs)))

    return map_jobs
