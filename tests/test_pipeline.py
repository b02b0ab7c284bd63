"""The stages as library calls on tiny data: outputs, routing, incremental retraining."""

import numpy as np
import pandas as pd
import pytest

from lmeraser.config import deep_merge as merge
from lmeraser.config import parse_params
from lmeraser.data.splits import remove_samples
from lmeraser.errors import ValidationFailed
from lmeraser.inference import ServingModel
from lmeraser.io import read_json
from lmeraser.store import ArtifactStore
from lmeraser.workspace import PromptIndex, Workspace

from helpers import TINY, build_workspace, run_stages


def test_every_stage_writes_its_outputs(trained_workspace):
    ws, results = trained_workspace
    for name in ("public", "private", "test"):
        assert read_json(ws.validation_ticket(name))["passed"] is True
    assert ws.backbone_weights.exists()
    k = ws.prototypes_meta()["k"]
    assignments = ws.assignments()
    assert assignments["sample_id"].tolist() == ws.split("private").sample_ids
    assert assignments["cluster"].between(0, k - 1).all()
    index = read_json(ws.prompt_index_file)
    assert set(index["clusters"]) == {str(c) for c in assignments["cluster"].unique()}
    assert ArtifactStore(ws.store_dir).keys() == {e["key"] for e in index["clusters"].values()}
    metrics = ws.metrics()
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_test"] == len(ws.split("test"))
    assert "cluster_size_max" in metrics
    baselines = read_json(ws.baselines_report)
    assert 0.0 <= baselines["linear_probe_accuracy"] <= 1.0 and 0.0 <= baselines["single_prompt_accuracy"] <= 1.0
    confusion = pd.read_csv(ws.plots / "confusion.csv")
    assert np.isclose((confusion.actual == confusion.predicted).mean(), metrics["accuracy"])
    assert results["train"]["metrics"]["clusters_trained"] == len(index["clusters"])


def test_routing_uses_nearest_active_prototype(trained_workspace):
    ws, _ = trained_workspace
    model = ServingModel.load(ws)
    test = ws.split("test")
    predictions, routes = model.predict(test.images[:50])
    assert set(routes) <= set(model.active_clusters)
    # Retire one cluster: routing must skip it and send its samples elsewhere.
    retired = int(routes[0])
    model.index = PromptIndex(
        {c: e for c, e in model.index.clusters.items() if int(c) != retired}, model.index.key_inputs
    )
    _, rerouted = model.predict(test.images[:50])
    assert retired not in set(rerouted)


def test_deleting_one_sample_retrains_exactly_its_cluster(tmp_path):
    params = parse_params(TINY)
    ws = build_workspace(tmp_path / "ws", TINY)
    run_stages(params, ws)
    before = read_json(ws.prompt_index_file)["clusters"]
    assignments = ws.assignments()
    victim = assignments.iloc[5]
    remove_samples([victim.sample_id], "private", ws)

    results = run_stages(params, ws, ("validate", "assign", "train"))
    train = results["train"]
    assert train["trained"] == [int(victim.cluster)]
    assert train["reused"] == sorted(int(c) for c in before if int(c) != victim.cluster)
    after = read_json(ws.prompt_index_file)["clusters"]
    changed = {c for c in before if before[c]["sha256"] != after[c]["sha256"]}
    assert changed == {str(victim.cluster)}
    assert len(train["pruned"]) == 1 and not ArtifactStore(ws.store_dir).has(before[str(victim.cluster)]["key"])

    # The rebuilt prompt equals training from scratch on the reduced data (same backbone).
    scratch = Workspace(tmp_path / "scratch")
    scratch.root.mkdir()
    import shutil

    shutil.copytree(ws.data, scratch.data)
    shutil.copytree(ws.backbone_dir, scratch.backbone_dir)
    shutil.copytree(ws.clusters, scratch.clusters)
    run_stages(params, scratch, ("assign", "train"))
    fresh = read_json(scratch.prompt_index_file)["clusters"]
    assert fresh == after
    entry = after[str(victim.cluster)]
    assert (
        ArtifactStore(scratch.store_dir).path(entry["key"]).read_bytes()
        == ArtifactStore(ws.store_dir).path(entry["key"]).read_bytes()
    )


def test_a_cluster_that_loses_all_members_is_retired(tmp_path):
    params = parse_params(TINY)
    ws = build_workspace(tmp_path / "ws", TINY)
    run_stages(params, ws, ("validate", "backbone", "prototypes", "assign", "train"))
    assignments = ws.assignments()
    smallest = assignments["cluster"].value_counts().idxmin()
    remove_samples(assignments.loc[assignments.cluster == smallest, "sample_id"].tolist(), "private", ws)
    train = run_stages(params, ws, ("assign", "train"))["train"]
    index = read_json(ws.prompt_index_file)
    assert str(smallest) not in index["clusters"]
    assert read_json(ws.last_run_file)["retired"] == [int(smallest)]
    assert train["trained"] == []
    model = ServingModel.load(ws)
    _, routes = model.predict(ws.split("test").images)
    assert int(smallest) not in set(routes)


def test_fit_on_private_rebuilds_every_cluster(tmp_path):
    raw = merge(TINY, {"clustering": {"fit_on": "private"}})
    params = parse_params(raw)
    ws = build_workspace(tmp_path / "ws", raw)
    run_stages(params, ws, ("validate", "backbone", "prototypes", "assign", "train"))
    victim = ws.split("private").sample_ids[0]
    remove_samples([victim], "private", ws)
    train = run_stages(params, ws, ("prototypes", "assign", "train"))["train"]
    assert train["reused"] == [] and len(train["trained"]) >= 2


def test_validation_failure_stops_the_stage(tmp_path):
    params = parse_params(TINY)
    ws = build_workspace(tmp_path / "ws", TINY)
    victim = ws.split("private").manifest.iloc[0]
    pd.DataFrame([{"sample_id": victim.sample_id, "content_key": "", "reason": "forget", "label": ""}]).to_csv(
        ws.tombstones_file, index=False
    )
    with pytest.raises(ValidationFailed, match="data docs: .*index.html"):
        run_stages(params, ws, ("validate",))
    assert not ws.validation_ticket("private").exists()


def test_a_change_of_what_every_key_shares_is_said_not_silent(tmp_path, monkeypatch):
    """A new timm (or peft, torch, training code, key format) re-keys the store: the train stage
    says how many artifacts and what changed, then retrains them."""
    import lmeraser.training as training

    params = parse_params(TINY)
    ws = build_workspace(tmp_path / "ws", TINY)
    run_stages(params, ws, ("validate", "backbone", "prototypes", "assign", "train"))
    n = len(read_json(ws.prompt_index_file)["clusters"])
    lines = []
    quiet = run_stages(params, ws, ("train",), log=lines.append)["train"]
    assert quiet["rekeyed"] == 0 and not any("re-keyed" in line for line in lines)
    real = training.library_versions()
    monkeypatch.setattr(training, "library_versions", lambda: {**real, "timm": "9.9.9"})
    lines = []
    train = run_stages(params, ws, ("train",), log=lines.append)["train"]
    assert train["rekeyed"] == n and len(train["trained"]) == n
    message = next(line for line in lines if "re-keyed" in line)
    assert f"re-keyed {n} stored artifact(s)" in message and f"versions.timm {real['timm']} -> 9.9.9" in message
