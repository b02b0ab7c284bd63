"""The stages as library calls on tiny data: outputs, routing, incremental retraining."""

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, build_workspace, merge, run_stages
from lmeraser import pipeline
from lmeraser.config import parse_params
from lmeraser.data.splits import load_split, remove_samples
from lmeraser.errors import ValidationFailed
from lmeraser.inference import ServingModel
from lmeraser.io import read_json


def test_every_stage_writes_its_outputs(trained_workspace):
    paths, results = trained_workspace
    for name in ("public", "private", "test"):
        assert read_json(paths.validation / f"{name}.json")["passed"] is True
    assert (paths.backbone / "backbone.safetensors").exists()
    k = read_json(paths.clusters / "prototypes.json")["k"]
    assignments = pd.read_csv(paths.clusters / "assignments.csv", dtype={"sample_id": str})
    assert assignments["sample_id"].tolist() == load_split("private", paths.data).sample_ids
    assert assignments["cluster"].between(0, k - 1).all()
    index = read_json(paths.prompts / "index.json")
    assert set(index["clusters"]) == {str(c) for c in assignments["cluster"].unique()}
    assert paths.store.keys() == {e["key"] for e in index["clusters"].values()}
    metrics = read_json(paths.metrics)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_test"] == len(load_split("test", paths.data))
    assert "cluster_size_max" in metrics
    baselines = read_json(paths.reports / "baselines.json")
    assert 0.0 <= baselines["linear_probe_accuracy"] <= 1.0 and 0.0 <= baselines["single_prompt_accuracy"] <= 1.0
    confusion = pd.read_csv(paths.reports / "plots" / "confusion.csv")
    assert np.isclose((confusion.actual == confusion.predicted).mean(), metrics["accuracy"])
    assert results["train"]["metrics"]["clusters_trained"] == len(index["clusters"])


def test_routing_uses_nearest_active_prototype(trained_workspace):
    paths, _ = trained_workspace
    model = ServingModel.load(paths.artifacts)
    test = load_split("test", paths.data)
    predictions, routes = model.predict(test.images[:50])
    assert set(routes) <= set(model.active_clusters)
    # Retire one cluster: routing must skip it and send its samples elsewhere.
    retired = int(routes[0])
    model.index = {**model.index, "clusters": {c: e for c, e in model.index["clusters"].items() if int(c) != retired}}
    _, rerouted = model.predict(test.images[:50])
    assert retired not in set(rerouted)


def test_deleting_one_sample_retrains_exactly_its_cluster(tmp_path):
    params = parse_params(TINY)
    paths = build_workspace(tmp_path / "ws", TINY)
    run_stages(params, paths)
    before = read_json(paths.prompts / "index.json")["clusters"]
    assignments = pd.read_csv(paths.clusters / "assignments.csv", dtype={"sample_id": str})
    victim = assignments.iloc[5]
    remove_samples([victim.sample_id], "private", paths.data)

    results = run_stages(params, paths, ("validate", "assign", "train"))
    train = results["train"]
    assert train["trained"] == [int(victim.cluster)]
    assert train["reused"] == sorted(int(c) for c in before if int(c) != victim.cluster)
    after = read_json(paths.prompts / "index.json")["clusters"]
    changed = {c for c in before if before[c]["sha256"] != after[c]["sha256"]}
    assert changed == {str(victim.cluster)}
    assert len(train["pruned"]) == 1 and not paths.store.has(before[str(victim.cluster)]["key"])

    # The rebuilt prompt equals training from scratch on the reduced data (same backbone).
    scratch = pipeline.Paths(tmp_path / "scratch")
    scratch.root.mkdir()
    import shutil
    shutil.copytree(paths.data, scratch.data)
    shutil.copytree(paths.backbone, scratch.backbone)
    shutil.copytree(paths.clusters, scratch.clusters)
    run_stages(params, scratch, ("assign", "train"))
    fresh = read_json(scratch.prompts / "index.json")["clusters"]
    assert fresh == after
    entry = after[str(victim.cluster)]
    assert scratch.store.path(entry["key"]).read_bytes() == paths.store.path(entry["key"]).read_bytes()


def test_a_cluster_that_loses_all_members_is_retired(tmp_path):
    params = parse_params(TINY)
    paths = build_workspace(tmp_path / "ws", TINY)
    run_stages(params, paths, ("validate", "backbone", "prototypes", "assign", "train"))
    assignments = pd.read_csv(paths.clusters / "assignments.csv", dtype={"sample_id": str})
    smallest = assignments["cluster"].value_counts().idxmin()
    remove_samples(assignments.loc[assignments.cluster == smallest, "sample_id"].tolist(), "private", paths.data)
    train = run_stages(params, paths, ("assign", "train"))["train"]
    index = read_json(paths.prompts / "index.json")
    assert str(smallest) not in index["clusters"]
    assert index["last_run"]["retired"] == [int(smallest)]
    assert train["trained"] == []
    model = ServingModel.load(paths.artifacts)
    _, routes = model.predict(load_split("test", paths.data).images)
    assert int(smallest) not in set(routes)


def test_fit_on_private_rebuilds_every_cluster(tmp_path):
    raw = merge(TINY, {"clustering": {"fit_on": "private"}})
    params = parse_params(raw)
    paths = build_workspace(tmp_path / "ws", raw)
    run_stages(params, paths, ("validate", "backbone", "prototypes", "assign", "train"))
    victim = load_split("private", paths.data).sample_ids[0]
    remove_samples([victim], "private", paths.data)
    train = run_stages(params, paths, ("prototypes", "assign", "train"))["train"]
    assert train["reused"] == [] and len(train["trained"]) >= 2


def test_validation_failure_stops_the_stage(tmp_path):
    params = parse_params(TINY)
    paths = build_workspace(tmp_path / "ws", TINY)
    victim = load_split("private", paths.data).manifest.iloc[0]
    pd.DataFrame([{"sample_id": victim.sample_id, "content_hash": victim.content_hash}]).to_csv(paths.data / "tombstones.csv", index=False)
    with pytest.raises(ValidationFailed, match="data docs: .*index.html"):
        pipeline.run_validate(params, paths, lambda m: None)
    assert not (paths.validation / "private.json").exists()
