"""Influence-function unlearning against the exact rebuild of the cluster, per PEFT kind.

    python bench/influence.py --source digits|fashion-mnist [--clusters 2] [--requests 3]

In one run (library calls; no DVC or Prefect, whose fixed costs bench/unlearn.py measures):
  1. data, the public backbone, the prototypes and the assignment, once (the params file of the
     source: params.yaml or configs/fashion-mnist.yaml);
  2. for each PEFT kind (pad, vpt, lora): the prompts of `--clusters` clusters (the most mixed
     ones by label entropy, and the largest), then for each edit kind (removal, query modification, response correction)
     `--requests` single-sample requests per cluster, each answered both ways:
       influence  `influence_edit` with params.yaml's `influence` settings,
       exact      retraining the cluster's prompt on the edited members (what the exact batch does),
     and compared: time per request, test-prediction agreement with the exact rebuild (and, for
     reference, the unchanged model's agreement), accuracy on retained / forgotten / test samples,
     the loss-threshold membership-inference AUC of the forgotten samples against held-out test
     samples, and the peak memory of the influence step;
  3. response correction as in the paper: flip 10%, 20% and 40% of the most mixed cluster's labels,
     train on them, correct them by influence (one step, and with 2 Newton steps), and compare test
     accuracy with the noisy model and with a retrain on the clean labels.
Test samples are those the router sends to the cluster. Saves bench/results/influence-<source>.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
from lmeraser.clustering import nearest  # noqa: E402
from lmeraser.compute import Compute  # noqa: E402
from lmeraser.config import PromptParams, parse_params  # noqa: E402
from lmeraser.data.splits import init_data  # noqa: E402
from lmeraser.evaluation import membership_inference  # noqa: E402
from lmeraser.models.backbone import extract_features, load_backbone, preprocess  # noqa: E402
from lmeraser.stages import stage  # noqa: E402
from lmeraser.training import cluster_seed, load_prompt, train_prompt  # noqa: E402
from lmeraser.unlearning.influence import influence_edit, prepare_model  # noqa: E402
from lmeraser.workspace import Workspace  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import CONFIGS, cpu_model, preset  # noqa: E402

KINDS = ("pad", "vpt", "lora")
EDITS = ("removal", "query", "response")
FLIP_RATES = (0.1, 0.2, 0.4)


class PeakMemory:
    """Peak resident memory above the starting point while the block runs (5 ms sampling)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.mb = (self.peak - self.start) / 2**20


def predict(model, x) -> np.ndarray:
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def losses(model, x, y) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none").numpy()


def edit_request(
    kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    row: int,
    rng: np.random.Generator,
    num_classes: int,
    donor: torch.Tensor,
):
    """The edited members for one single-sample request on `row`."""
    x_new, y_new, present = x.clone(), y.clone(), torch.ones(len(y), dtype=torch.bool)
    if kind == "removal":
        present[row] = False
    elif kind == "response":
        y_new[row] = int((int(y[row]) + rng.integers(1, num_classes)) % num_classes)
    else:  # query: the input replaced by another image of the same class (a corrected scan)
        x_new[row] = donor
    return x_new, y_new, present


def run(source: str, n_clusters: int, n_requests: int, kinds: tuple[str, ...]) -> dict:
    params = parse_params(preset(source))
    work = ROOT / "bench" / "results" / f"work-influence-{source}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ws = Workspace(work)
    quiet = lambda m: None  # noqa: E731
    torch.set_num_threads(params.runtime.threads)
    print("[setup] data, backbone, prototypes, assign", flush=True)
    start = time.perf_counter()
    init_data(params.data, params.seed, ws)
    for name in ("backbone", "prototypes", "assign"):
        stage(name).function(params, ws, quiet)
    setup_seconds = time.perf_counter() - start
    backbone, meta = load_backbone(ws)
    num_classes, spec = meta.num_classes, meta.input
    private, test = ws.split("private"), ws.split("test")
    clusters_of = ws.assignments()["cluster"].to_numpy()
    x_all, y_all = preprocess(private.images, spec), torch.from_numpy(private.labels)
    x_test, y_test = preprocess(test.images, spec), torch.from_numpy(test.labels)
    prototypes = ws.prototypes()
    compute = Compute.of(meta).with_threads(params.runtime.threads)
    routes = nearest(extract_features(backbone, x_test, 256, Compute.of(meta)), prototypes, np.unique(clusters_of))
    sizes = np.bincount(clusters_of)
    chosen = choose_clusters(clusters_of, private.labels, n_clusters)
    dtype = getattr(torch, params.influence.dtype)
    rng = np.random.default_rng(params.seed)

    results = {"kinds": {}}
    for kind in kinds:
        prompt = PromptParams(
            **{**params.prompt.model_dump(), "kind": kind}
        )  # each kind with its own settings (LoRA's lr too)
        print(f"[{kind}] training {len(chosen)} cluster prompts", flush=True)
        per_edit = {edit: [] for edit in EDITS}
        for cluster in chosen:
            rows = np.flatnonzero(clusters_of == cluster)
            x, y = x_all[rows], y_all[rows]
            seed = cluster_seed(params.seed, cluster)
            t0 = time.perf_counter()
            original = train_prompt(backbone, x, y, prompt, num_classes, seed, compute)
            train_seconds = time.perf_counter() - t0
            test_rows = np.flatnonzero(routes == cluster)
            xt, yt = x_test[test_rows], y_test[test_rows]
            for edit in EDITS:
                for row in rng.choice(len(y), size=min(n_requests, len(y)), replace=False):
                    row = int(row)
                    same = np.flatnonzero((y_all == y[row]).numpy())
                    donor = x_all[int(rng.choice(same[~np.isin(same, rows[row])]))]
                    x_new, y_new, present = edit_request(edit, x, y, row, rng, num_classes, donor)
                    with PeakMemory() as memory:
                        t0 = time.perf_counter()
                        model = prepare_model(backbone, prompt, num_classes, original, dtype)
                        theta, objective, report = influence_edit(
                            model,
                            x,
                            y,
                            x_new,
                            y_new,
                            present,
                            params.influence,
                            prompt.adapter.weight_decay,
                            seed,
                            params.influence.threads,
                        )
                        influenced = objective.state(theta)
                        influence_seconds = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    exact = train_prompt(backbone, x_new[present], y_new[present], prompt, num_classes, seed, compute)
                    exact_seconds = time.perf_counter() - t0
                    # Each state's model built once (a LoRA model copies the backbone).
                    models = {
                        name: load_prompt(backbone, prompt, num_classes, s)
                        for name, s in (("original", original), ("influence", influenced), ("exact", exact))
                    }
                    preds = {name: predict(m, xt) for name, m in models.items()}
                    keep = present.clone()
                    keep[row] = False  # retained = members the request did not touch
                    entry = {
                        "cluster": cluster,
                        "row": row,
                        "n_members": len(y),
                        "n_test": len(test_rows),
                        "influence_seconds": influence_seconds,
                        "exact_seconds": exact_seconds,
                        "train_seconds": train_seconds,
                        "influence_peak_mb": memory.mb,
                        "report": report.to_json(),
                        "agreement": {
                            "influence": float((preds["influence"] == preds["exact"]).mean()),
                            "original": float((preds["original"] == preds["exact"]).mean()),
                        },
                        "test_accuracy": {k: float((v == yt.numpy()).mean()) for k, v in preds.items()},
                        "retained_accuracy": {
                            name: float((predict(m, x_new[keep]) == y_new[keep].numpy()).mean())
                            for name, m in models.items()
                        },
                    }
                    if edit == "removal":
                        entry["forgotten_loss"] = {
                            name: float(losses(m, x[row : row + 1], y[row : row + 1])[0]) for name, m in models.items()
                        }
                        entry["forgotten_correct"] = {
                            name: bool(predict(m, x[row : row + 1])[0] == int(y[row])) for name, m in models.items()
                        }
                        entry["heldout_losses"] = {name: losses(m, xt, yt).tolist() for name, m in models.items()}
                    per_edit[edit].append(entry)
                    print(
                        f"  {kind} {edit} cluster {cluster} row {row}: influence {influence_seconds:.2f}s, exact {exact_seconds:.2f}s, "
                        f"agreement {entry['agreement']['influence']:.4f} (unchanged model {entry['agreement']['original']:.4f})",
                        flush=True,
                    )
        results["kinds"][kind] = {
            "edits": {edit: summarise(edit, entries) for edit, entries in per_edit.items()},
            "parameters": per_edit["removal"][0]["report"]["parameters"],
            "lr": prompt.adapter.lr,
        }
        results["kinds"][kind]["correction"] = correction(
            backbone, prompt, params, x_all, y_all, clusters_of, chosen[0], x_test, y_test, routes, num_classes, dtype
        )
    results.update(
        {
            "source": source,
            "params": {"prompt": params.prompt.model_dump(), "influence": params.influence.model_dump()},
            "clusters": {str(c): int(sizes[c]) for c in chosen},
            "requests_per_cluster_and_edit": n_requests,
            "setup_seconds": setup_seconds,
            "machine": {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "threads": params.runtime.threads,
                "influence_threads": params.influence.threads,
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    shutil.rmtree(work, ignore_errors=True)
    return results


def choose_clusters(clusters_of: np.ndarray, labels: np.ndarray, n: int) -> list[int]:
    """The most mixed clusters (highest label entropy, among those at least median size), then the
    largest: mixed clusters are where an edit can change predictions (a one-class cluster agrees
    with anything), the largest is the slowest case. The first one also hosts response correction."""
    sizes = np.bincount(clusters_of)
    entropy = {}
    for c in np.flatnonzero(sizes >= np.median(sizes[sizes > 0])):
        p = np.bincount(labels[clusters_of == c]) / sizes[c]
        entropy[int(c)] = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    mixed = sorted(entropy, key=lambda c: (-entropy[c], c))
    largest = int(np.argmax(sizes))
    chosen = [c for c in mixed if c != largest][: max(n - 1, 0)] + [largest]
    return sorted(chosen, key=lambda c: mixed.index(c) if c in mixed else len(mixed))[:n]


def summarise(edit: str, entries: list[dict]) -> dict:
    out = {
        "requests": len(entries),
        "influence_seconds_median": float(np.median([e["influence_seconds"] for e in entries])),
        "influence_seconds_max": float(np.max([e["influence_seconds"] for e in entries])),
        "exact_seconds_median": float(np.median([e["exact_seconds"] for e in entries])),
        "agreement_influence_mean": float(np.mean([e["agreement"]["influence"] for e in entries])),
        "agreement_influence_min": float(np.min([e["agreement"]["influence"] for e in entries])),
        "agreement_unchanged_mean": float(np.mean([e["agreement"]["original"] for e in entries])),
        "peak_mb_max": float(np.max([e["influence_peak_mb"] for e in entries])),
        "damping_median": float(np.median([e["report"]["damping"] for e in entries])),
        "damping_increases_max": int(np.max([e["report"]["damping_increases"] for e in entries])),
        "cg_iterations_median": float(np.median([e["report"]["cg_iterations"] for e in entries])),
        "cg_residual_max": float(np.max([e["report"]["cg_relative_residual"] for e in entries])),
        **{
            f"{split}_accuracy_{name}": float(np.mean([e[f"{split}_accuracy"][name] for e in entries]))
            for split in ("test", "retained")
            for name in ("original", "influence", "exact")
        },
        "entries": entries,
    }
    if edit == "removal":
        for name in ("original", "influence", "exact"):
            forgotten = [e["forgotten_loss"][name] for e in entries]
            heldout = [loss for e in entries for loss in e["heldout_losses"][name]]
            out[f"mia_auc_{name}"] = membership_inference(np.array(forgotten), np.array(heldout))["auc"]
            out[f"forgotten_accuracy_{name}"] = float(np.mean([e["forgotten_correct"][name] for e in entries]))
            out[f"forgotten_loss_median_{name}"] = float(np.median(forgotten))
        for e in entries:
            e.pop("heldout_losses")
    return out


def correction(
    backbone, prompt, params, x_all, y_all, clusters_of, cluster, x_test, y_test, routes, num_classes, dtype
) -> list[dict]:
    """Flip a fraction of one cluster's labels, train, correct by influence; compare with retraining."""
    rows = np.flatnonzero(clusters_of == cluster)
    x, clean = x_all[rows], y_all[rows]
    test_rows = np.flatnonzero(routes == cluster)
    xt, yt = x_test[test_rows], y_test[test_rows].numpy()
    seed = cluster_seed(params.seed, cluster)
    clean_state = train_prompt(backbone, x, clean, prompt, num_classes, seed, Compute(threads=params.runtime.threads))
    clean_accuracy = float((predict(load_prompt(backbone, prompt, num_classes, clean_state), xt) == yt).mean())
    out = []
    for rate in FLIP_RATES:
        rng = np.random.default_rng(int(rate * 1000) + params.seed)
        flipped = rng.choice(len(clean), size=int(round(rate * len(clean))), replace=False)
        noisy = clean.clone()
        noisy[flipped] = torch.from_numpy(
            (clean.numpy()[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
        )
        noisy_state = train_prompt(
            backbone, x, noisy, prompt, num_classes, seed, Compute(threads=params.runtime.threads)
        )
        row = {
            "flip_rate": rate,
            "n_flipped": len(flipped),
            "n_members": len(clean),
            "n_test": len(test_rows),
            "clean_retrain": clean_accuracy,
            "noisy": float((predict(load_prompt(backbone, prompt, num_classes, noisy_state), xt) == yt).mean()),
        }
        for steps in (0, 2):
            ip = params.influence.model_copy(update={"newton_steps": steps})
            t0 = time.perf_counter()
            model = prepare_model(backbone, prompt, num_classes, noisy_state, dtype)
            theta, objective, report = influence_edit(
                model,
                x,
                noisy,
                x,
                clean,
                torch.ones(len(clean), dtype=torch.bool),
                ip,
                prompt.adapter.weight_decay,
                seed,
                params.influence.threads,
            )
            accuracy = float(
                (predict(load_prompt(backbone, prompt, num_classes, objective.state(theta)), xt) == yt).mean()
            )
            name = "influence" if steps == 0 else f"influence_newton{steps}"
            row[name] = accuracy
            row[f"{name}_seconds"] = time.perf_counter() - t0
            row[f"{name}_damping"] = report.damping
        gap = row["clean_retrain"] - row["noisy"]
        for name in ("influence", "influence_newton2"):
            row[f"{name}_recovery"] = (row[name] - row["noisy"]) / gap if gap > 0 else None
        out.append(row)
        print(
            f"  {prompt.kind} correction {rate:.0%}: noisy {row['noisy']:.4f}, influence {row['influence']:.4f}, "
            f"+2 Newton {row['influence_newton2']:.4f}, clean retrain {clean_accuracy:.4f}",
            flush=True,
        )
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"### {result['source']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['date']}; exact rebuild on {m['threads']} thread(s) "
        f"(`runtime.threads`), influence on {m.get('influence_threads', m['threads'])} (`influence.threads`). "
        f"Clusters (members): {', '.join(f'{c} ({n})' for c, n in result['clusters'].items())}; {result['requests_per_cluster_and_edit']} "
        f"single-sample requests per cluster and edit kind. Influence: {result['params']['influence']['hessian']}, "
        f"{result['params']['influence']['dtype']}, damping ratio {result['params']['influence']['damping_ratio']}, "
        f"{result['params']['influence']['newton_steps']} Newton steps.",
        "",
        "| PEFT | params | edit | influence s (median / max) | exact rebuild s | agreement with exact (mean / min) | unchanged model's agreement | test acc. orig / infl / exact | retained acc. infl / exact | peak MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, k in result["kinds"].items():
        for edit, e in k["edits"].items():
            lines.append(
                f"| {kind} (lr {k['lr']}) | {k['parameters']} | {edit} | {e['influence_seconds_median']:.2f} / {e['influence_seconds_max']:.2f} | {e['exact_seconds_median']:.2f} | "
                f"{e['agreement_influence_mean']:.4f} / {e['agreement_influence_min']:.4f} | {e['agreement_unchanged_mean']:.4f} | "
                f"{e['test_accuracy_original']:.4f} / {e['test_accuracy_influence']:.4f} / {e['test_accuracy_exact']:.4f} | "
                f"{e['retained_accuracy_influence']:.4f} / {e['retained_accuracy_exact']:.4f} | {e['peak_mb_max']:.0f} |"
            )
    lines += [
        "",
        "Removal: forgotten samples (pooled over the requests), membership-inference AUC against held-out test samples routed to the same clusters.",
        "",
        "| PEFT | MIA AUC orig / infl / exact | forgotten acc. orig / infl / exact | forgotten loss (median) orig / infl / exact |",
        "|---|---:|---:|---:|",
    ]
    for kind, k in result["kinds"].items():
        e = k["edits"]["removal"]
        lines.append(
            f"| {kind} | {e['mia_auc_original']:.3f} / {e['mia_auc_influence']:.3f} / {e['mia_auc_exact']:.3f} | "
            f"{e['forgotten_accuracy_original']:.2f} / {e['forgotten_accuracy_influence']:.2f} / {e['forgotten_accuracy_exact']:.2f} | "
            f"{e['forgotten_loss_median_original']:.3g} / {e['forgotten_loss_median_influence']:.3g} / {e['forgotten_loss_median_exact']:.3g} |"
        )
    lines += [
        "",
        "Response correction (cluster "
        + next(iter(result["clusters"]))
        + "; test samples routed to it): recovery = (corrected − noisy) / (clean retrain − noisy).",
        "",
        "| PEFT | flipped | noisy | influence | recovery | influence + 2 Newton | recovery | clean retrain | influence s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, k in result["kinds"].items():
        for r in k["correction"]:
            rec = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(
                f"| {kind} | {r['flip_rate']:.0%} ({r['n_flipped']}) | {r['noisy']:.4f} | {r['influence']:.4f} | {rec(r['influence_recovery'])} | "
                f"{r['influence_newton2']:.4f} | {rec(r['influence_newton2_recovery'])} | {r['clean_retrain']:.4f} | {r['influence_seconds']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(CONFIGS), default="digits")
    parser.add_argument(
        "--clusters", type=int, default=2, help="how many clusters to edit (most mixed, then the largest)"
    )
    parser.add_argument("--requests", type=int, default=3, help="single-sample requests per cluster and edit kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help="PEFT kinds, comma-separated")
    args = parser.parse_args()
    result = run(args.source, args.clusters, args.requests, tuple(args.kinds.split(",")))
    out = ROOT / "bench" / "results"
    (out / f"influence-{args.source}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"influence-{args.source}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"saved {out}/influence-{args.source}.json and .md")


if __name__ == "__main__":
    main()
