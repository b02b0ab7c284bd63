"""The Prefect flows themselves: train_pipeline end to end, and the cron deployment."""

from lmeraser.io import read_json
from lmeraser.workspace import Workspace

from helpers import TINY, build_workspace, lmeraser_cli


def test_train_pipeline_runs_every_stage_in_order(tmp_path):
    build_workspace(tmp_path, TINY)
    done = lmeraser_cli("pipeline", "--root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in (
        "artifacts/validation/private.json",
        "artifacts/backbone/backbone.json",
        "artifacts/clusters/prototypes.npy",
        "artifacts/clusters/assignments.csv",
        "artifacts/prompts/index.json",
        "metrics.json",
        "reports/baselines.json",
    ):
        assert (tmp_path / path).exists(), path
    first = read_json(tmp_path / "artifacts" / "prompts" / "index.json")
    assert read_json(tmp_path / "artifacts" / "prompts" / "last_run.json")["reused"] == []
    # Flow and task logs reach the terminal (only the temporary server's chatter is quiet).
    assert "trained" in done.stderr and "| INFO" in done.stderr and "Flow run" in done.stderr
    # (A second run reusing every prompt by content key: tests/test_pipeline.py, in process.)
    assert first["clusters"]


def test_cron_deployment_carries_the_schedule(tmp_path):
    from lmeraser.flows.serve import build_deployment

    deployment = build_deployment("15 2 * * 1", "weekly", str(tmp_path))
    assert deployment.name == "weekly"
    assert deployment.schedules[0].schedule.cron == "15 2 * * 1"
    assert deployment.parameters == {"root": str(tmp_path.resolve())}


def test_unlearn_deployment_runs_on_an_interval_or_a_cron(tmp_path):
    from lmeraser.flows.serve import build_unlearn_deployment

    every = build_unlearn_deployment(120, root=str(tmp_path))
    assert every.name == "lmeraser-unlearn" and every.schedules[0].schedule.interval.total_seconds() == 120
    assert every.parameters == {"root": str(tmp_path.resolve())} and "unlearn" in every.tags
    assert (
        build_unlearn_deployment(cron="*/10 * * * *", root=str(tmp_path)).schedules[0].schedule.cron == "*/10 * * * *"
    )
    import pytest

    from lmeraser.flows.serve import main

    with pytest.raises(SystemExit) as refused:
        main(["--unlearn-every", "0"])
    assert refused.value.code == 2


def test_influence_flow_overlays_the_cluster_and_stacks_a_second_request(trained_workspace, tmp_path):
    """`influence-unlearn` on a trained workspace: a removal then a relabel in the same cluster."""
    import shutil

    import numpy as np

    from lmeraser.flows.unlearn import influence_unlearn
    from lmeraser.inference import ServingModel
    from lmeraser.journal import Journal
    from lmeraser.lineage.keys import load_or_create_key
    from lmeraser.lineage.records import lineage_log
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import resolve

    trained, _ = trained_workspace
    root = tmp_path / "ws"
    shutil.copytree(trained.root, root)
    ws = Workspace(root)
    assignments = ws.assignments()
    cluster = int(assignments["cluster"].value_counts().index[0])
    first, second = assignments.loc[assignments.cluster == cluster, "sample_id"].iloc[:2]
    journal = Journal(ws)
    exact = ServingModel.load(ws)
    for spec in (RequestSpec(sample_ids=[first]), RequestSpec(kind="rectify", sample_ids=[second], label=0)):
        journal.submit([resolve(spec, ws)], "influence")
        result = influence_unlearn(root=str(root))
        assert result["clusters"] == [cluster]
        # The update's MLflow run was tracked after its record, and nothing waits.
        assert (
            result["tracking"] == {"tracked": ["unlearn"], "waiting": []}
            and not (root / "audit" / "batches" / "tracking-backlog.json").exists()
        )
    assert journal.awaiting_influence() == [] and len(journal.pending()) == 2  # still queued for the exact batch
    records = lineage_log(ws).verify(load_or_create_key(ws.signing_key_file).public_key())
    assert [r.predicate["method"] for r in records] == ["influence", "influence"]
    edited = records[1].predicate["clusters_edited"][0]
    assert (
        edited["stacked_on_earlier_influence"]
        and edited["prompt_sha256_before"] == records[0].predicate["clusters_edited"][0]["prompt_sha256_after"]
    )
    served = ServingModel.load(ws)
    assert list(served.overlay) == [str(cluster)] and len(served.overlay[str(cluster)]["edits"]) == 2
    assert served.overlay[str(cluster)]["n_members"] == int((assignments.cluster == cluster).sum()) - 1
    # The overlay changes what the cluster serves, and only that cluster.
    x = Workspace(root).split("private").images[:40]
    assert not np.array_equal(served.logits(x)[0], exact.logits(x)[0])
    other = next(c for c in exact.active_clusters if c != cluster)
    assert served.state(other)["head.weight"].equal(exact.state(other)["head.weight"])


def test_evaluate_registers_a_version_only_when_the_served_model_changed(trained_workspace, tmp_path, monkeypatch):
    """Each evaluation that changes the served bundle is a new pyfunc version under the alias
    `production`; one that serves the same bundle keeps the version it has."""
    import shutil

    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from lmeraser.flows.stages import evaluate
    from lmeraser.inference import ServingModel

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trained, _ = trained_workspace
    root = tmp_path / "ws"
    shutil.copytree(trained.root, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    first = evaluate(root=str(root))["model_version"]
    second = evaluate(root=str(root))["model_version"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert first == second == int(client.get_model_version_by_alias("lmeraser", "production").version)
    assert [int(v.version) for v in client.search_model_versions("name='lmeraser'")] == [first]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    images = Workspace(root).split("test").images[:32]
    predicted = mlflow.pyfunc.load_model("models:/lmeraser@production").predict(images)
    mlflow.set_tracking_uri("")
    assert np.array_equal(predicted, ServingModel.load(Workspace(root)).predict(images)[0])


def test_a_scheduled_retrain_never_brings_back_erased_data(tmp_path):
    """train_pipeline refuses data/ that holds a sample the suppression list erased (an old data
    version restored, say) or whose label it corrected, before any stage runs."""
    from lmeraser import suppression
    from lmeraser.flows.pipeline import train_pipeline
    from lmeraser.salt import Keyer

    ws = build_workspace(tmp_path, TINY)
    private = ws.manifest("private")
    keyer = Keyer(ws)
    assert suppression.violations(ws) == []
    suppression.add(
        ws,
        [
            {
                "sample_id": private.sample_id[0],
                "content_key": keyer.content(private.content_hash[0]),
                "reason": "forget",
            },
            {
                "sample_id": private.sample_id[1],
                "content_key": "",
                "reason": "rectify-label",
                "label": (int(private.label[1]) + 1) % 10,
            },
        ],
    )
    assert suppression.violations(ws) == [
        f"private:{private.sample_id[0]} (erased)",
        f"private:{private.sample_id[1]} (label corrected)",
    ]
    state = train_pipeline(root=str(tmp_path), return_state=True)
    assert state.is_failed() and "data/ holds 2 sample(s) the suppression list erased or corrected" in state.message
    assert not (tmp_path / "artifacts" / "backbone").exists()


def test_a_scheduled_retrain_finishes_pending_requests_first(tmp_path):
    """With a request pending, train_pipeline runs the unlearn batch first and retrains nothing if
    it cannot finish it (here: nothing is trained yet to unlearn from)."""
    from lmeraser.flows.pipeline import train_pipeline
    from lmeraser.journal import Journal
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import resolve

    ws = build_workspace(tmp_path, TINY)
    Journal(ws).submit([resolve(RequestSpec(sample_ids=[ws.manifest("private").sample_id[0]]), ws)])
    state = train_pipeline(root=str(tmp_path), return_state=True)
    assert state.is_failed() and "pending requests must be finished before retraining" in state.message
    assert not (tmp_path / "artifacts" / "backbone").exists() and Journal(ws).pending()


def _flow_run(state):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def _task_runs(flow_run_id) -> list:
    """The task runs of a flow run, once the server has recorded them (from their events)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.time() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if runs or time.time() > deadline:
                return runs
            time.sleep(0.5)


def test_flow_runs_carry_readable_names_and_tags(tmp_path):
    """A stage's run is `<stage>-<UTC time>` tagged `stage:<name>`; an unlearn run is
    `unlearn-<batch id>` (the id the batch gets, so a resumed batch keeps it) tagged `unlearn`."""
    import re

    from lmeraser.flows.stages import run_stage
    from lmeraser.flows.unlearn import NETWORK_STEPS, run_unlearn, step_task
    from lmeraser.journal import Journal
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.exact import next_batch_id
    from lmeraser.unlearning.intake import resolve

    ws = build_workspace(tmp_path, TINY)
    state = run_stage("validate", str(tmp_path), "params.yaml")
    run = _flow_run(state)
    assert (
        state.is_completed()
        and re.fullmatch(r"validate-\d{8}T\d{6}Z", run.name)
        and {"lmeraser", "stage:validate"} <= set(run.tags)
    )
    # Its task runs carry no tags: Prefect asks the server for a concurrency slot per tag of each
    # task run (an API round trip per unlearning step and per trained cluster).
    assert [t.name for t in _task_runs(run.id)] == ["track-validate"]
    assert all(t.tags == [] for t in _task_runs(run.id))
    Journal(ws).submit([resolve(RequestSpec(sample_ids=[ws.manifest("private").sample_id[0]]), ws)])
    expected = next_batch_id(ws)
    assert expected and expected.startswith("batch-")
    state = run_unlearn(str(tmp_path), "params.yaml")  # fails: nothing is trained yet to unlearn from
    run = _flow_run(state)
    assert run.name == f"unlearn-{expected}" and {"lmeraser", "unlearn"} <= set(run.tags)
    # Only the steps that talk to remotes retry (each step is idempotent).
    assert NETWORK_STEPS == {"purge"} and step_task("purge").retries == 2 and step_task("apply").retries == 0


def test_clusters_trained_on_a_local_dask_cluster_are_byte_identical_to_threads(trained_workspace, tmp_path):
    """runtime.executor dask: the train stage's clusters go through prefect-dask's DaskTaskRunner
    on a 2-worker local cluster (separate processes that load the workspace themselves), and give
    the same bytes as the thread runner; a library call without the flow refuses it."""
    import shutil

    import pytest
    import yaml

    from lmeraser.config import load_params
    from lmeraser.errors import ConfigError
    from lmeraser.flows.stages import run_stage
    from lmeraser.store import ArtifactStore
    from lmeraser.unlearning.exact import process_pending

    trained, results = trained_workspace
    root = tmp_path / "ws"
    shutil.copytree(trained.root, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "store"))
    values = yaml.safe_load((root / "params.yaml").read_text())
    values["runtime"].update({"executor": "dask", "workers": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    state = run_stage("train", str(root), "params.yaml")
    assert state.is_completed(), state.message
    ws = Workspace(root)
    assert read_json(ws.last_run_file)["trained"] == sorted(int(c) for c in trained.prompt_index().clusters)
    threads, dask = trained.prompt_index().clusters, ws.prompt_index().clusters
    assert {c: e.sha256 for c, e in dask.items()} == {c: e.sha256 for c, e in threads.items()}
    for entry in dask.values():
        assert (
            ArtifactStore(ws.store_dir).path(entry.key).read_bytes()
            == ArtifactStore(trained.store_dir).path(entry.key).read_bytes()
        )
    assert load_params(ws.params_file).runtime.executor == "dask"
    with pytest.raises(ConfigError, match="runtime.executor dask trains through Prefect's Dask task runner"):
        process_pending(ws, lambda message: None)
