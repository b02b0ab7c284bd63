"""The cached test-split scores (lmeraser/score_cache.py) are bit-identical to a full pass, and a
pass re-scores exactly the clusters whose artifact or routed rows changed."""

from __future__ import annotations

import json
import shutil

import numpy as np

from lmeraser.config import load_params
from lmeraser.inference import ServingModel
from lmeraser.pipeline import evaluate
from lmeraser.score_cache import nonmember_losses, score_test_split
from lmeraser.workspace import Workspace


def _full_pass(ws: Workspace, batch_size: int):
    return ServingModel.load(ws).logits(ws.split("test").images, batch_size)


def test_cached_scores_are_bit_identical_and_only_changed_clusters_are_rescored(trained_workspace, tmp_path):
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    batch_size = 16  # several batches per cluster: the batching must match a full pass
    full, routes = _full_pass(ws, batch_size)
    logits, cached_routes, info = score_test_split(ws, ServingModel.load(ws), batch_size)
    assert not info["features_cached"] and sorted(info["rescored"]) == sorted(set(routes.tolist()))
    assert np.array_equal(cached_routes, routes) and logits.tobytes() == full.tobytes()
    logits, _, info = score_test_split(ws, ServingModel.load(ws), batch_size)
    assert info["features_cached"] and info["rescored"] == [] and logits.tobytes() == full.tobytes()

    # A rebuilt cluster (here: cluster a now serves cluster b's prompt): only it is re-scored.
    index = json.loads(ws.prompt_index_file.read_text())
    counts = np.bincount(routes)
    a, b = (int(c) for c in np.argsort(counts)[::-1][:2])
    index["clusters"][str(a)] = dict(index["clusters"][str(b)])
    ws.prompt_index_file.write_text(json.dumps(index))
    full, routes = _full_pass(ws, batch_size)
    logits, _, info = score_test_split(ws, ServingModel.load(ws), batch_size)
    assert info["rescored"] == [a] and logits.tobytes() == full.tobytes()

    # A retired cluster: its rows move to other clusters, and exactly those are re-scored.
    del index["clusters"][str(b)]
    ws.prompt_index_file.write_text(json.dumps(index))
    before = routes
    full, routes = _full_pass(ws, batch_size)
    logits, _, info = score_test_split(ws, ServingModel.load(ws), batch_size)
    assert sorted(info["rescored"]) == sorted(set(routes[before == b].tolist())) and logits.tobytes() == full.tobytes()
    labels = ws.split("test").labels
    assert (
        nonmember_losses(ws, ServingModel.load(ws), batch_size).tobytes()
        == ServingModel.load(ws).losses(ws.split("test").images, labels, batch_size).tobytes()
    )

    # Made for another batch size (other bits): not used; a damaged cache file: ignored, rewritten.
    _, _, info = score_test_split(ws, ServingModel.load(ws), 8)
    assert not info["features_cached"]
    ws.score_cache_file.write_bytes(b"garbage")
    logits, _, info = score_test_split(ws, ServingModel.load(ws), batch_size)
    assert not info["features_cached"] and logits.tobytes() == full.tobytes()


def test_evaluate_with_the_cache_writes_the_metrics_of_a_from_scratch_evaluation(trained_workspace, tmp_path):
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    params = load_params(ws.params_file)
    ws.score_cache_file.unlink(missing_ok=True)
    evaluate.run(params, ws, lambda m: None)
    outputs = [ws.metrics_file, ws.confusion_report, ws.plots / "confusion.csv", ws.plots / "per_cluster_accuracy.csv"]
    scratch = [p.read_bytes() for p in outputs]
    lines = []
    evaluate.run(params, ws, lines.append)
    assert [p.read_bytes() for p in outputs] == scratch
    assert any("0 of" in line and "re-scored" in line for line in lines)  # nothing changed: nothing scored again
