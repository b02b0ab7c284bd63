"""The per-request forgetting audit's controls, power and cost (lmeraser/audit/forgetting.py).

    python bench/forgetting.py --source digits [--subset N] [--references 1,2,4,8] [--canaries 8] [--ordinary 8]
                               [--kinds pad,vpt,lora] [--serial-kinds pad] [--out bench/results]

In one run, on a fresh scratch workspace under /tmp (library calls; no DVC or Prefect):
  1. data; `--canaries` private samples are relabelled (y + 3) mod C BEFORE anything trains (the
     mislabelled canaries: a prompt can only fit them by memorising them); then the backbone,
     prototypes and assignment once. `--ordinary` other private samples (not relabelled) are the
     negatives.
  2. for each PEFT kind (prompt.kind pad, vpt, lora; each kind's own section of the params file):
     the train stage, then ONE batch of single-sample forget requests, the canaries and the ordinary
     samples, audited as the product audits it:
       references  `references_before` with the largest R of `--references` (workers =
                   runtime.workers); the audit with a smaller R uses the first R references of each
                   side, which are the very references a run with that R trains (their seeds are
                   `reference_seed(cluster seed, side, index)`): checked bit for bit against a
                   direct run with R = 2;
       before      the served model's scores (`served_scores`); the pre-forget test is the
                   references' alone (IN: fresh IN, OUT: fresh OUT), as `conclude` computes it;
       exact       every affected cluster rebuilt without the batch's samples with its own seed
                   (the exact path's rebuild), served after and reused as an OUT reference;
       influence   every affected cluster's served prompt edited by `influence_edit` (the batch's
                   samples of that cluster removed, as `--method influence` does), served after;
       broken      the served model after = the one before (a build that forgot nothing).
     Reported per R: TPR at 1% FPR of the pre-forget score (p-value, log10 LR) with the ordinary
     samples as negatives, the fraction detectable before (p <= alpha / m), the verdicts after each
     build, and seconds. Cost: the references' wall time (training + scoring) per batch and per
     request against the batch's own rebuild (the affected clusters trained once), with the
     references trained `runtime.workers` at a time and serially (`--serial-kinds`).
  3. latency, per kind: the product's `forget --method influence` in process (`influence_pending`:
     edit, audit, overlay, signed record) for one canary's request, with `audit.references` 0 and
     the params' default, each on a copy of the workspace.
Saves <out>/forgetting-<source>.json and .md; `--render FILE.json [--note TEXT]` rewrites the .md.

The record names the commit and whether the imported lmeraser/ has exactly its files. To measure a
commit while the working tree changes, extract it and point LMERASER_BENCH_CODE at it:
    git archive HEAD lmeraser | tar -x -C /tmp/lmeraser-snap
    LMERASER_BENCH_CODE=/tmp/lmeraser-snap python bench/forgetting.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if os.environ.get("LMERASER_BENCH_CODE"):
    # lmeraser/ from that directory, not the working tree: the editable install's finder goes first.
    sys.meta_path[:] = [
        f
        for f in sys.meta_path
        if "editable" not in type(f).__module__ and "editable" not in getattr(f, "__name__", "")
    ]
    sys.path.insert(0, os.environ["LMERASER_BENCH_CODE"])

import lmeraser  # noqa: E402 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
from lmeraser import numerics  # noqa: E402
from lmeraser.audit import forgetting  # noqa: E402
from lmeraser.config import PromptParams, parse_params  # noqa: E402
from lmeraser.config import deep_merge as merge  # noqa: E402
from lmeraser.data.splits import init_data, update_sample  # noqa: E402
from lmeraser.inference import ServingModel  # noqa: E402
from lmeraser.models.backbone import preprocess  # noqa: E402
from lmeraser.pipeline import train as train_stage  # noqa: E402
from lmeraser.pipeline.train import ClusterJob, plan  # noqa: E402
from lmeraser.request import Request  # noqa: E402
from lmeraser.score_cache import score_test_split  # noqa: E402
from lmeraser.stages import stage  # noqa: E402
from lmeraser.training import cluster_seed  # noqa: E402
from lmeraser.unlearning.influence import influence_edit, prepare_model  # noqa: E402
from lmeraser.workspace import Workspace  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import CONFIGS, preset  # noqa: E402

KINDS = ("pad", "vpt", "lora")
FPR = 0.01
P_FLOOR = 1e-300  # -log10 p of a p-value that underflowed to 0


def code_info() -> dict:
    """The repository's commit, and whether the lmeraser package this process imported (the
    working tree, or a pinned copy elsewhere) has exactly that commit's files: git blob hashes of
    every file under it against `git ls-tree HEAD lmeraser`. Taken when the run starts."""
    import hashlib

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "HEAD").strip()
    committed = {}
    for line in git("ls-tree", "-r", "HEAD", "--", "lmeraser").splitlines():
        meta, path = line.split("\t", 1)
        committed[path] = meta.split()[2]
    package = Path(lmeraser.__file__).resolve().parent
    found = {}
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            data = path.read_bytes()
            found["lmeraser/" + path.relative_to(package).as_posix()] = hashlib.sha1(
                b"blob %d\0" % len(data) + data
            ).hexdigest()
    differs = sorted(name for name in set(found) | set(committed) if found.get(name) != committed.get(name))
    bench = [
        line[3:] for line in git("status", "--porcelain", "--", "bench/forgetting.py").splitlines() if line.strip()
    ]
    return {
        "commit": head,
        "lmeraser_imported_from": str(package),
        "lmeraser_differs_from_commit": differs,
        "uncommitted": bench,
    }


def with_audit(params, references: int, workers: int | None = None):
    update = {"audit": params.audit.model_copy(update={"references": references})}
    if workers is not None:
        update["runtime"] = params.runtime.model_copy(update={"workers": workers})
    return params.model_copy(update=update)


def with_kind(params, kind: str):
    return params.model_copy(update={"prompt": PromptParams(**{**params.prompt.model_dump(), "kind": kind})})


# -- metrics -------------------------------------------------------------------------------------


def tpr_at_fpr(positives: list[float], negatives: list[float], fpr: float = FPR) -> dict:
    """TPR of the rule "score > t" at the smallest t whose FPR on the negatives is at most `fpr`
    (with fewer than 1/fpr negatives: above the largest negative), and the AUC."""
    pos, neg = np.asarray(positives, float), np.sort(np.asarray(negatives, float))[::-1]
    if not len(pos) or not len(neg):
        return {"tpr": None, "auc": None, "threshold": None, "n_pos": len(pos), "n_neg": len(neg)}
    allowed = int(np.floor(fpr * len(neg)))
    t = neg[allowed]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return {
        "tpr": float((pos > t).mean()),
        "auc": float(wins / (len(pos) * len(neg))),
        "threshold": float(t),
        "n_pos": len(pos),
        "n_neg": len(neg),
    }


def counts(samples: list[dict], ids: set[str]) -> dict:
    out = dict.fromkeys(forgetting.VERDICTS, 0)
    for s in samples:
        if s["sample_id"] in ids:
            out[s["verdict"]] += 1
    return out


def subset_state(state: dict, references: int, seeds: dict[str, int]) -> dict:
    """The state a run with `references` per side would have produced: the first `references`
    fresh references of each side (their seeds do not depend on how many there are)."""
    out = {**state, "clusters": {}}
    for cluster, info in state["clusters"].items():
        # As many more OUT than IN references as the full state has (0, or 1 where the audit adds
        # one OUT reference with the cluster's own seed).
        extra = sum(r["name"].startswith("out:") for r in info["fresh"]) - sum(
            r["name"].startswith("in:") for r in info["fresh"]
        )
        keep = {f"in:{forgetting.reference_seed(seeds[cluster], 'in', i)}" for i in range(references)}
        keep |= {
            f"out:{forgetting.reference_seed(seeds[cluster], 'out', i)}" for i in range(references + max(0, extra))
        }
        out["clusters"][cluster] = {**info, "fresh": [r for r in info["fresh"] if r["name"] in keep]}
    out["trained"] = sum(len(info["fresh"]) for info in out["clusters"].values())
    return out


def same_references(a: dict, b: dict) -> bool:
    """The same fresh references (names, digests, every score), whatever they took."""
    strip = lambda info: [{k: v for k, v in r.items() if k != "seconds"} for r in info["fresh"]]  # noqa: E731
    return a["clusters"].keys() == b["clusters"].keys() and all(
        strip(a["clusters"][c]) == strip(b["clusters"][c]) for c in a["clusters"]
    )


def reference_seconds(state: dict) -> float:
    """The sum of every fresh reference's own seconds (train + score) and the pre-forget scoring."""
    return float(
        sum(r["seconds"] for info in state["clusters"].values() for r in info["fresh"])
        + sum(info["pre_forget_exact"]["seconds"] for info in state["clusters"].values())
    )


# -- one PEFT kind -------------------------------------------------------------------------------


def run_kind(
    ws: Workspace, params, kind: str, canaries: list[str], ordinary: list[str], references: list[int], serial: bool, log
) -> dict:
    load_start = list(os.getloadavg())
    params = with_kind(params, kind)
    workers = params.runtime.workers
    private = ws.split("private")
    row = {sid: i for i, sid in enumerate(private.sample_ids)}
    clusters_of = ws.assignments()["cluster"].to_numpy()
    cluster_of = {sid: int(clusters_of[i]) for i, sid in enumerate(private.sample_ids)}

    t0 = time.perf_counter()
    train_stage.run(params, ws, lambda m: None, train_stage.train_in_threads(workers))
    train_seconds = time.perf_counter() - t0
    model = ServingModel.load(ws)
    batch_size = params.evaluate.batch_size
    logits, routes, _ = score_test_split(ws, model, batch_size)
    accuracy = float((logits.argmax(1) == ws.split("test").labels).mean())
    log(
        f"[{kind}] train stage {train_seconds:.1f}s ({len(model.index.clusters)} clusters), test accuracy {accuracy:.4f}"
    )

    requests = [
        Request(kind="forget", request_id=f"r{i:03d}", sample_ids=(s,), received_at=0.0)
        for i, s in enumerate(canaries + ordinary)
    ]
    r_max = max(references)
    direct = {}
    # The largest R with the configured workers; for the serial kinds also R = 2 (the default) with
    # the configured workers and with one, timed directly and checked against the largest R's prefix.
    runs = [(r_max, workers)] + ([(2, workers), (2, 1)] if serial else [])
    for r, w in dict.fromkeys(runs):
        t = time.perf_counter()
        state = forgetting.references_before(ws, with_audit(params, r, w), requests, routes, lambda m: None)
        wall = time.perf_counter() - t
        direct[(r, w)] = {"state": state, "wall": wall}
        log(f"[{kind}] references R={r} workers={w}: {state['trained']} trained in {wall:.1f}s")
    state = direct[(r_max, workers)]["state"]
    seeds = {c: model.index.clusters[c].seed for c in state["clusters"]}
    checks = {
        f"R={r} workers={w} equals the first {r} of R={r_max}": same_references(
            d["state"], subset_state(state, r, seeds)
        )
        for (r, w), d in direct.items()
        if r != r_max
    }
    for (r, w), d in direct.items():
        if r == r_max and w != workers:
            checks[f"R={r} workers={w} equals workers={workers}"] = same_references(d["state"], state)
    if not all(checks.values()):
        log(f"[{kind}] WARNING: references differ: {checks}")

    audited = [s for ids in state["chosen"].values() for s in ids]
    rows = [row[s] for s in audited]
    before = {
        "scores": forgetting.served_scores(model, private.images[rows], private.labels[rows], audited, batch_size),
        "digests": forgetting.served_digests(model, state["clusters"]),
    }
    forgotten = {s for r in requests for s in r.sample_ids}
    affected = sorted(state["clusters"], key=int)

    # exact: the affected clusters rebuilt once, without the batch's samples, with their own seeds
    trainer = plan(params, ws).trainer

    def rebuild(cluster: str):
        members = np.flatnonzero(clusters_of == int(cluster))
        keep = np.array([i for i in members if private.sample_ids[i] not in forgotten])
        return trainer.state(ClusterJob(int(cluster), keep, "", seeds[cluster]))

    rebuild_wall = {}
    for w in sorted({workers, *([1] if serial else [])}, reverse=True):
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=w) as pool:
            rebuilt_states = dict(zip(affected, pool.map(rebuild, affected)))
        rebuild_wall[w] = time.perf_counter() - t
    log(
        f"[{kind}] exact rebuild of {len(affected)} clusters: "
        + ", ".join(f"{s:.1f}s with {w} worker(s)" for w, s in rebuild_wall.items())
    )
    rebuilt, after_exact = {}, {"scores": {}, "digests": {}}
    for cluster, info in state["clusters"].items():
        tr = [row[s] for s in info["targets"]]
        # scored on the cluster's population too, as the exact path scores its rebuilt prompt
        population = forgetting.population_inputs(ws, info)
        rebuilt[cluster] = forgetting.prompt_scores(
            model, "rebuilt", rebuilt_states[cluster], private.images[tr], private.labels[tr], batch_size, population
        )
        after_exact["scores"].update(zip(info["targets"], rebuilt[cluster].targets))
        after_exact["digests"][cluster] = rebuilt[cluster].digest

    # influence: each affected cluster's served prompt edited (the batch's samples removed)
    ip = params.influence
    after_influence, influence_seconds = {"scores": {}, "digests": {}}, {}
    spec = model.input_spec
    for cluster, info in state["clusters"].items():
        t = time.perf_counter()
        members = np.flatnonzero(clusters_of == int(cluster))
        x, y = preprocess(private.images[members], spec), torch.from_numpy(private.labels[members])
        present = torch.tensor([private.sample_ids[i] not in forgotten for i in members])
        cm = prepare_model(
            model.backbone, model.prompt_params, model.index.num_classes, model.state(cluster), getattr(torch, ip.dtype)
        )
        theta, objective, _ = influence_edit(
            cm,
            x,
            y,
            x,
            y,
            present,
            ip,
            model.prompt_params.adapter.weight_decay,
            cluster_seed(params.seed, int(cluster)),
            ip.threads,
        )
        edited = objective.state(theta)
        influence_seconds[cluster] = time.perf_counter() - t
        tr = [row[s] for s in info["targets"]]
        scored = forgetting.prompt_scores(
            model, "served after", edited, private.images[tr], private.labels[tr], batch_size
        )
        after_influence["scores"].update(zip(info["targets"], scored.targets))
        after_influence["digests"][cluster] = scored.digest

    canary_set, ordinary_set = set(canaries), set(ordinary)
    canary_clusters = {cluster_of[s] for s in canaries}
    ordinary_shared = {s for s in ordinary if cluster_of[s] in canary_clusters}
    per_r = {}
    for r in sorted(references):
        sub = subset_state(state, r, seeds)
        p = with_audit(params, r)
        pre = forgetting.conclude(sub, p, before, None)
        exact = forgetting.conclude(sub, p, before, after_exact, rebuilt)
        influence = forgetting.conclude(sub, p, before, after_influence)
        broken = forgetting.conclude(sub, p, before, before)
        threshold = pre["threshold"]
        by_id = {s["sample_id"]: s["before"] for s in pre["samples"]}
        # No p-value (no spread to test against): ranked as p = 1 and never detectable; no LR: lowest.
        neglog = lambda ids, by_id=by_id: [
            -np.log10(max(by_id[s]["p_value"] if by_id[s]["p_value"] is not None else 1.0, P_FLOOR)) for s in ids
        ]  # noqa: E731
        llr = lambda ids, by_id=by_id: [
            v if (v := by_id[s]["log10_likelihood_ratio"]) is not None else -np.inf for s in ids
        ]  # noqa: E731
        detect = lambda ids, by_id=by_id, t=threshold: sum(
            1 for s in ids if by_id[s]["p_value"] is not None and by_id[s]["p_value"] <= t
        )  # noqa: E731
        untested = sum(1 for s in canaries + ordinary if by_id[s]["p_value"] is None)
        direct_wall = direct.get((r, workers), {}).get("wall")
        per_r[str(r)] = {
            "threshold_p": threshold,
            "tpr_at_1pct_fpr_p_value": tpr_at_fpr(neglog(canaries), neglog(ordinary)),
            "tpr_at_1pct_fpr_log10_lr": tpr_at_fpr(llr(canaries), llr(ordinary)),
            "detectable_before": {
                "canaries": detect(canaries),
                "ordinary": detect(ordinary),
                "ordinary_sharing_a_canary_cluster": detect(ordinary_shared),
            },
            "exact": {
                "canaries": counts(exact["samples"], canary_set),
                "ordinary": counts(exact["samples"], ordinary_set),
            },
            "influence": {
                "canaries": counts(influence["samples"], canary_set),
                "ordinary": counts(influence["samples"], ordinary_set),
            },
            "broken": {
                "canaries": counts(broken["samples"], canary_set),
                "ordinary": counts(broken["samples"], ordinary_set),
            },
            "untested_before": untested,
            "references_trained": sub["trained"],
            "reference_seconds_sum": reference_seconds(sub),
            "references_wall_seconds": direct_wall,
            "samples": {
                name: [
                    {
                        "sample_id": s["sample_id"],
                        "group": "canary" if s["sample_id"] in canary_set else "ordinary",
                        "cluster": cluster_of[s["sample_id"]],
                        "verdict": s["verdict"],
                        **{
                            when: None
                            if s[when] is None
                            else {k: s[when].get(k) for k in ("score", "p_value", "log10_likelihood_ratio", "dof")}
                            for when in ("before", "after")
                        },
                    }
                    for s in result["samples"]
                ]
                for name, result in (("pre", pre), ("exact", exact), ("influence", influence), ("broken", broken))
            },
        }
        e, i, b = per_r[str(r)]["exact"], per_r[str(r)]["influence"], per_r[str(r)]["broken"]
        log(
            f"[{kind}] R={r}: TPR@1%FPR p {per_r[str(r)]['tpr_at_1pct_fpr_p_value']['tpr']}, LR {per_r[str(r)]['tpr_at_1pct_fpr_log10_lr']['tpr']}; "
            f"detectable before {per_r[str(r)]['detectable_before']}; exact {e}; influence {i}; broken {b}"
        )
    latency = influence_latency(ws, params, canaries[0], sorted({0, params.audit.references}), log)
    n_requests = len(requests)
    cost = {
        "requests": n_requests,
        "affected_clusters": len(affected),
        "rebuild_wall_seconds": {str(w): s for w, s in rebuild_wall.items()},
        "references_wall_seconds": {f"R={r} workers={w}": d["wall"] for (r, w), d in direct.items()},
        "influence_seconds": influence_seconds,
        "influence_request_seconds": latency,
    }
    return {
        "kind": kind,
        "lr": params.prompt.adapter.lr,
        "epochs": params.prompt.adapter.epochs,
        "train_stage_seconds": train_seconds,
        "test_accuracy": accuracy,
        "clusters": {str(c): int((clusters_of == c).sum()) for c in np.unique(clusters_of)},
        "canary_clusters": sorted(canary_clusters),
        "ordinary_sharing_a_canary_cluster": len(ordinary_shared),
        "checks": checks,
        "per_references": per_r,
        "cost": cost,
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
    }


def influence_latency(ws: Workspace, params, sample: str, references: list[int], log) -> dict:
    """The product's `forget --method influence` in process (`influence_pending`: edit, audit,
    overlay, signed record) for one single-sample request, on a copy of the workspace per R, so
    the audit's share of an influence answer is measured where users meet it."""
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.influence_update import influence_pending
    from lmeraser.unlearning.intake import submit

    out = {}
    for r in references:
        copy = ws.root.parent / f"{ws.root.name}-latency-{r}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(ws.root, copy)
        try:
            (copy / "params.yaml").write_text(
                yaml.safe_dump(with_audit(params, r).model_dump(mode="json"), sort_keys=False)
            )
            target = Workspace(copy)
            submit([RequestSpec(sample_ids=[sample])], target, method="influence")
            t = time.perf_counter()
            answer = influence_pending(target, lambda m: None)
            wall = time.perf_counter() - t
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        audit = answer["forgetting_audit"]
        out[str(r)] = {
            "wall_seconds": wall,
            "audit_seconds": (audit.get("seconds") or {}).get("total", 0.0),
            "verdicts": audit.get("verdicts"),
        }
        log(
            f"[{params.prompt.kind}] forget --method influence, one request, audit.references={r}: {wall:.1f}s (audit {out[str(r)]['audit_seconds']:.1f}s)"
        )
    return out


# -- the run -------------------------------------------------------------------------------------


def run(
    source: str,
    subset: int | None,
    references: list[int],
    n_canaries: int,
    n_ordinary: int,
    kinds: list[str],
    serial_kinds: set[str],
    log,
) -> dict:
    start = time.perf_counter()
    load_start = list(os.getloadavg())
    code = code_info()
    raw = merge(preset(source), {"evaluate": {"baselines": False}})
    if subset:
        raw = merge(raw, {"data": {"subset": subset}})
    params = parse_params(raw)
    work = Path("/tmp") / f"lmeraser-bench-forgetting-{source}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    ws = Workspace(work)
    init_data(params.data, params.seed, ws)
    private = ws.split("private")
    n = len(private.sample_ids)
    num_classes = int(max(private.labels.max(), ws.split("test").labels.max())) + 1
    canaries = [private.sample_ids[i] for i in np.linspace(0, n - 1, n_canaries, dtype=int)]
    for s in canaries:
        i = private.sample_ids.index(s)
        update_sample(s, "private", ws, label=(int(private.labels[i]) + 3) % num_classes)
    chosen = set(canaries)
    ordinary = [
        private.sample_ids[i]
        for i in np.linspace(n // (2 * n_ordinary), n - 1, n_ordinary, dtype=int)
        if private.sample_ids[i] not in chosen
    ]
    t = time.perf_counter()
    for name in ("validate", "backbone", "prototypes", "assign"):
        stage(name).function(params, ws, lambda m: None)
    setup_seconds = time.perf_counter() - t
    log(
        f"[setup] {n} private samples, {len(canaries)} canaries, {len(ordinary)} ordinary; backbone to assign in {setup_seconds:.1f}s"
    )
    result = {
        "source": source,
        "subset": subset,
        "n_private": n,
        "n_test": len(ws.split("test").sample_ids),
        "canaries": canaries,
        "ordinary": ordinary,
        "canary_relabel": "(y + 3) mod C, before training",
        "audit": params.audit.model_dump(),
        "references": references,
        "setup_seconds": setup_seconds,
        "kinds": {},
    }
    for kind in kinds:
        result["kinds"][kind] = run_kind(ws, params, kind, canaries, ordinary, references, kind in serial_kinds, log)
    shutil.rmtree(work, ignore_errors=True)
    result.update(
        {
            "seconds_total": time.perf_counter() - start,
            "machine": {
                "cpu": numerics.cpu_name(),
                "cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)),
                "threads": params.runtime.threads,
                "workers": params.runtime.workers,
                "influence_threads": params.influence.threads,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "nice": os.nice(0),
            },
            "load_average": {"start": load_start, "end": list(os.getloadavg())},
            "code": code,
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    return result


def save_json(path: Path, result: dict) -> None:
    """The result with floats at 6 significant digits, and every object whose members hold at most
    one level of flat objects on one line (the per-sample entries), so the file stays readable."""

    def rounded(value):
        if isinstance(value, float):
            return float(f"{value:.6g}")
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    text = json.dumps(rounded(result), indent=1)
    flat = re.compile(r"\{[^{}\[\]]*\}")
    nested = re.compile(r"\{(?:[^{}\[\]]|\{[^{}\[\]]*\})*\}")
    for pattern in (flat, nested):
        text = pattern.sub(lambda m: " ".join(m.group(0).split()), text)
    path.write_text(text + "\n")


# -- the table -----------------------------------------------------------------------------------


def _v(c: dict) -> str:
    """Verdict counts, short: forgotten / not-memorised / FAIL (not-audited only when there is one)."""
    text = (
        f"{c['forgotten']} / {c['not-memorised']} / **{c['FAIL']}**"
        if c["FAIL"]
        else f"{c['forgotten']} / {c['not-memorised']} / 0"
    )
    return text + (f" (+{c['not-audited']} n/a)" if c["not-audited"] else "")


def _f(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: dict, skipped: list[str]) -> str:
    m, code = result["machine"], result["code"]
    la = lambda pair: f"{pair['start'][0]:.2f} at the start, {pair['end'][0]:.2f} at the end"  # noqa: E731
    a = result["audit"]
    lines = [
        f"### {result['source']}" + (f" (subset {result['subset']})" if result["subset"] else ""),
        "",
        f"{m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, {result['date']}; nice {m['nice']}, "
        f"1-minute load average {la(result['load_average'])}. Code: lmeraser at {code['commit'][:12]}"
        + (
            f" except {', '.join(code['lmeraser_differs_from_commit'])}"
            if code.get("lmeraser_differs_from_commit")
            else " (the imported package's files equal that commit's"
            + (", a pinned copy" if not code.get("lmeraser_imported_from", "").startswith(str(ROOT)) else "")
            + ")"
        )
        + ("; bench/forgetting.py uncommitted" if code["uncommitted"] else "")
        + f". Total {result['seconds_total']:.0f} s.",
        "",
        f"{result['n_private']} private / {result['n_test']} test samples. One batch of {len(result['canaries']) + len(result['ordinary'])} single-sample "
        f"forget requests: {len(result['canaries'])} canaries (private samples relabelled {result['canary_relabel']}) and "
        f"{len(result['ordinary'])} ordinary private samples (the negatives). alpha {a['alpha']}, Bonferroni over the batch: "
        "detectable at p <= alpha / m. Pre-forget test: the fresh references alone (IN and OUT); exact: every affected cluster "
        "rebuilt without the batch with its own seed (served after, and one more OUT reference scored on the population, as the exact path does); influence: the served prompts "
        "edited by `influence_edit` (params' `influence` settings); broken: served after = served before. "
        "Verdicts as forgotten / not-memorised / FAIL. With fewer than 100 negatives, TPR at 1% FPR is the TPR above the "
        "highest-scoring negative (no false positive).",
        "",
    ]
    for kind, k in result["kinds"].items():
        rebuild = k["cost"]["rebuild_wall_seconds"]
        lines += [
            f"#### {kind} (lr {k['lr']}, {k['epochs']} epochs; {len(k['clusters'])} clusters, canaries in {len(k['canary_clusters'])}; "
            f"{k['ordinary_sharing_a_canary_cluster']} ordinary samples share a cluster with a canary; test accuracy {k['test_accuracy']:.4f}; "
            f"1-min load {k['load_average']['start'][0]:.2f} -> {k['load_average']['end'][0]:.2f})",
            "",
            "| R | TPR@1%FPR (p / log LR) | AUC (p / log LR) | detectable before: canaries / ordinary | exact: canaries | exact: ordinary | "
            "influence: canaries | influence: ordinary | broken: canaries caught | references | reference s (sum) | wall s | wall / rebuild |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r, e in k["per_references"].items():
            nc, no = len(result["canaries"]), len(result["ordinary"])
            tp, tl = e["tpr_at_1pct_fpr_p_value"], e["tpr_at_1pct_fpr_log10_lr"]
            wall = e["references_wall_seconds"]
            ratio = "-" if wall is None else f"{wall / rebuild[str(result['machine']['workers'])]:.1f}x"
            lines.append(
                f"| {r} | {_f(tp['tpr'])} / {_f(tl['tpr'])} | {_f(tp['auc'])} / {_f(tl['auc'])} | "
                f"{e['detectable_before']['canaries']}/{nc} / {e['detectable_before']['ordinary']}/{no}"
                + (f" ({e['untested_before']} untested)" if e.get("untested_before") else "")
                + f" | {_v(e['exact']['canaries'])} | "
                f"{_v(e['exact']['ordinary'])} | {_v(e['influence']['canaries'])} | {_v(e['influence']['ordinary'])} | "
                f"{e['broken']['canaries']['FAIL']}/{nc} | {e['references_trained']} | {e['reference_seconds_sum']:.1f} | "
                f"{'-' if wall is None else f'{wall:.1f}'} | {ratio} |"
            )
        c = k["cost"]
        lines += ["", f"Cost ({c['requests']} requests, {c['affected_clusters']} affected clusters):", ""]
        lines += ["| what | workers | wall s | per request s | x the batch's rebuild |", "|---|---:|---:|---:|---:|"]
        for w, s in sorted(rebuild.items(), reverse=True):
            lines.append(f"| exact rebuild of the affected clusters | {w} | {s:.1f} | {s / c['requests']:.2f} | 1.0x |")
        for name, s in c["references_wall_seconds"].items():
            w = name.split("workers=")[1]
            base = rebuild.get(w, rebuild[str(result["machine"]["workers"])])
            lines.append(
                f"| references {name.split(' ')[0]} (train + score) | {w} | {s:.1f} | {s / c['requests']:.2f} | {s / base:.1f}x |"
            )
        latency = c.get("influence_request_seconds") or {}
        if latency:
            lines += [
                "",
                "The product's `forget --method influence` in process, one single-sample request (a canary): edit, audit, overlay, signed record.",
                "",
            ]
            lines += ["| audit.references | wall s | of which the audit s |", "|---:|---:|---:|"]
            lines += [f"| {r} | {v['wall_seconds']:.1f} | {v['audit_seconds']:.1f} |" for r, v in latency.items()]
        checks = "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in k["checks"].items())
        lines += ["", f"Checks: {checks or 'none'}; train stage {k['train_stage_seconds']:.1f} s.", ""]
    if skipped:
        lines += ["Not measured in this run: " + "; ".join(skipped) + ".", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--subset", type=int, default=None, help="cap on the training pool (stratified)")
    parser.add_argument("--references", default="1,2,4,8", help="audit.references values (R), comma-separated")
    parser.add_argument("--canaries", type=int, default=8, help="mislabelled private samples planted before training")
    parser.add_argument(
        "--ordinary", type=int, default=8, help="ordinary private samples audited the same way (the negatives)"
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help="PEFT kinds, comma-separated")
    parser.add_argument(
        "--serial-kinds",
        default="pad",
        help="kinds whose R = 2 references are also run directly, with runtime.workers and serially (workers 1)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--render", type=Path, default=None, help="only rewrite the .md of this saved .json (and its note)"
    )
    parser.add_argument(
        "--note", default=None, help="a sentence for the end of the .md (why something was not measured)"
    )
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        if args.note is not None:
            result["note"] = args.note
        save_json(args.render, result)
        args.render.with_suffix(".md").write_text(markdown(result, result["not_measured"]))
        print(markdown(result, result["not_measured"]))
        return
    references = sorted({int(r) for r in args.references.split(",")})
    kinds = [k for k in args.kinds.split(",") if k]
    serial = {k for k in args.serial_kinds.split(",") if k}
    log = lambda message: print(message, flush=True)  # noqa: E731
    result = run(args.source, args.subset, references, args.canaries, args.ordinary, kinds, serial, log)
    skipped = [f"{k} (not in --kinds)" for k in KINDS if k not in kinds]
    skipped += [f"R={r}" for r in (1, 2, 4, 8) if r not in references]
    skipped += [f"direct R=2 runs (wall time, serial references) for {k}" for k in kinds if k not in serial]
    result["not_measured"] = skipped
    result["note"] = args.note
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / f"forgetting-{args.source}.json", result)
    (args.out / f"forgetting-{args.source}.md").write_text(markdown(result, skipped))
    print(markdown(result, skipped))
    print(f"saved {args.out}/forgetting-{args.source}.json and .md")


if __name__ == "__main__":
    main()
