"""evaluate: test accuracy of the served model (routing + each cluster's prompt), per cluster too."""

from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd

from lmeraser.config import Params
from lmeraser.evaluation import accuracy, confusion, per_cluster_accuracy
from lmeraser.inference import ServingModel
from lmeraser.io import atomic_write_csv, atomic_write_json, read_json
from lmeraser.score_cache import score_test_split
from lmeraser.workspace import Workspace


def run(params: Params, ws: Workspace, log: Callable[[str], None] = print) -> dict:
    model = ServingModel.load(ws)
    test = ws.split("test")
    labels = test.labels
    start = time.perf_counter()
    # Only the clusters whose prompt or routed rows changed are scored again (bit-identical to a full pass).
    logits, routes, scored = score_test_split(ws, model, params.evaluate.batch_size, test)
    predictions = logits.argmax(1)
    infer_seconds = time.perf_counter() - start
    log(
        f"scored the test split: {len(scored['rescored'])} of {scored['clusters']} cluster(s) re-scored"
        + ("" if scored["features_cached"] else ", features computed")
        + f" ({infer_seconds:.1f}s)"
    )
    clusters = per_cluster_accuracy(labels, predictions, routes)
    index = model.index.clusters
    # Only deterministic values go into metrics.json (it is hashed into dvc.lock); timings go to MLflow.
    metrics = {
        "accuracy": accuracy(labels, predictions),
        "n_test": len(labels),
        "n_private": sum(entry.n_members for entry in index.values()),
        "n_clusters_active": len(index),
    }
    sizes = read_json(ws.cluster_report)
    metrics.update({f"cluster_{k}": v for k, v in sizes.items() if k != "sizes"})
    atomic_write_json(ws.metrics_file, metrics)
    atomic_write_csv(ws.plots / "confusion.csv", pd.DataFrame({"actual": labels, "predicted": predictions}))
    rows = [
        {"cluster": c, "accuracy": v["accuracy"], "n_test": v["n_test"], "n_train": index[str(c)].n_members}
        for c, v in sorted(clusters.items())
    ]
    atomic_write_csv(ws.plots / "per_cluster_accuracy.csv", pd.DataFrame(rows))
    atomic_write_json(ws.confusion_report, confusion(labels, predictions, model.index.num_classes).tolist())
    log(f"test accuracy {metrics['accuracy']:.4f} over {len(index)} active clusters")
    return {"metrics": {**metrics, "inference_seconds": infer_seconds}}
