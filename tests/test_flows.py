"""The Prefect flows themselves: train_pipeline end to end, and the cron deployment."""

from conftest import TINY, build_workspace, lmeraser_cli
from lmeraser.io import read_json


def test_train_pipeline_runs_every_stage_in_order(tmp_path):
    build_workspace(tmp_path, TINY)
    done = lmeraser_cli("pipeline", "--root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in ("artifacts/validation/private.json", "artifacts/backbone/backbone.json", "artifacts/clusters/prototypes.npy",
                 "artifacts/clusters/assignments.csv", "artifacts/prompts/index.json", "metrics.json", "reports/baselines.json"):
        assert (tmp_path / path).exists(), path
    first = read_json(tmp_path / "artifacts" / "prompts" / "index.json")
    assert first["last_run"]["reused"] == []
    # A second scheduled run retrains nothing: every prompt's content key is unchanged.
    assert lmeraser_cli("pipeline", "--root", str(tmp_path), cwd=tmp_path).returncode == 0
    second = read_json(tmp_path / "artifacts" / "prompts" / "index.json")
    assert second["last_run"]["trained"] == [] and second["clusters"] == first["clusters"]


def test_cron_deployment_carries_the_schedule(tmp_path):
    from flows.serve import build_deployment

    deployment = build_deployment("15 2 * * 1", "weekly", str(tmp_path))
    assert deployment.name == "weekly"
    assert deployment.schedules[0].schedule.cron == "15 2 * * 1"
    assert deployment.parameters == {"root": str(tmp_path.resolve())}
