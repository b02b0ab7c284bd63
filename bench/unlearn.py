"""Unlearning benchmark: what a forget request costs against retraining.

    python bench/unlearn.py --source digits|fashion-mnist [--batch 100] [--audit-references R] [--subset N]
    python bench/unlearn.py --source fashion-mnist --audit-references 0 --scaling 7500 15000 30000 60000

In one run, in a scratch git + DVC copy of this repository (bench/results/work-unlearn-*), with
one standing Prefect server on loopback (as in production):
  1. the full pipeline from scratch (`dvc repro`: backbone + prototypes + every prompt + evaluation),
     then the scheduled full scan a deployment runs (`lmeraser audit scan --full`, timed apart: it
     keeps the scan index every forget below starts from)
  2. retraining all prompts from scratch (the train stage with an empty artifact store)
  3. one forget end to end in this process (the library: submit + process_pending)
  4. one forget through the CLI as a fresh process (`lmeraser forget --sample-id`), with the
     standing Prefect server and without one (as on a fresh clone after `make demo`)
  5. `lmeraser unlearn` with nothing pending
  6. a batch of N random forget requests (`lmeraser forget --file`)
  7. one forget through a warm `lmeraser serve` (its worker keeps its imports; window 0): the
     round trip from the HTTP submit to the journal's `verified`
`--audit-references` sets `audit.references` (the forgetting audit's reference prompts, trained at
capture: 0 turns it off); `--subset` caps the training pool (`data.subset`) for the scaling run;
`--set KEY=VALUE` overrides any param (e.g. `--set backbone.epochs=1 --set prompt.pad.epochs=2`
measures a forget's overhead at large sizes in minutes: its accuracy and its ratios to the
pipeline are then not the preset's, and the results name the overrides).
and for each forget the affected clusters retrained alone (the physical limit of an exact forget),
the overhead ratio (end to end / that), samples retrained, accuracy before/after, peak RSS, the
cache sizes and whether `dvc status` is clean afterwards.
Saves JSON and Markdown to bench/results/unlearn-<source>.*.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import CONFIGS, cpu_model, preset  # noqa: E402

BIN = Path(sys.executable).parent


def sh(args: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done


def workspace(source: str, overrides: dict, name: str) -> Path:
    from lmeraser.config import deep_merge

    work = ROOT / "bench" / "results" / f"work-unlearn-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("dvc.yaml", "data.dvc", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy2(ROOT / name, work / name)
    for name in ("lmeraser", ".dvc"):
        shutil.copytree(
            ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local")
        )
    (work / "params.yaml").write_text(yaml.safe_dump(deep_merge(preset(source), overrides), sort_keys=False))
    git = {
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "b@b",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=work, check=True, env={**os.environ, **git})
    return work


def prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("prefect server did not start")


def read(work: Path, name: str) -> dict:
    return json.loads((work / name).read_text())


def members(work: Path) -> dict[int, int]:
    return {int(c): e["n_members"] for c, e in read(work, "artifacts/prompts/index.json")["clusters"].items()}


def last_record(work: Path) -> dict:
    line = (work / "audit" / "lineage.jsonl").read_bytes().strip().split(b"\n")[-1]
    import base64

    return json.loads(base64.b64decode(json.loads(line)["payload"]))["predicate"]


IN_PROCESS = """
import json, sys, time
from pathlib import Path
from lmeraser.unlearning.exact import preload, process_pending
from lmeraser.request import RequestSpec
from lmeraser.unlearning.intake import submit
from lmeraser.workspace import Workspace
ws = Workspace(Path(sys.argv[1]))
preload(ws)  # what a batch imports lazily, and the fingerprint: paid once by a long-lived process
start = time.perf_counter()
submit([RequestSpec(sample_ids=[sys.argv[2]])], ws)
process_pending(ws, lambda message: None, git_commit=True)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def timed_child(args: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """Run a command to completion: (wall seconds, the peak RSS in MB of it and the processes it
    waited for, stdout). Its own rusage comes from wait4 (output goes to files, not pipes)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, stdout


def retrain_alone(work: Path, clusters: list[int] | None = None) -> tuple[float, dict[int, str]]:
    """Seconds to train `clusters` (their current members; None: every cluster) into a scratch
    store, on runtime.workers threads as the pipeline does: the physical limit of an exact forget
    that rebuilds them; and the sha256 of each artifact trained."""
    from lmeraser.config import load_params
    from lmeraser.pipeline.train import plan, train_in_threads
    from lmeraser.store import ArtifactStore
    from lmeraser.workspace import Workspace

    params = load_params(work / "params.yaml")
    training = plan(params, Workspace(work))
    scratch = work / "bench-retrain-store"
    shutil.rmtree(scratch, ignore_errors=True)
    training.trainer.store = ArtifactStore(scratch)
    jobs = [job for job in training.jobs if clusters is None or job.cluster in set(clusters)]
    start = time.perf_counter()
    results = train_in_threads(params.runtime.workers)(training.trainer, jobs)
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds, {r["cluster"]: r["entry"].sha256 for r in results}


def outcome(
    work: Path, seconds: float, sizes: dict[int, int], peak_mb: float | None = None, load: float | None = None
) -> dict:
    """One forget (or batch) from its lineage record, with its affected clusters retrained alone."""
    record = last_record(work)
    after = members(work)
    rebuilt = [c["cluster"] for c in record["clusters_rebuilt"] if c["prompt_sha256_after"]]
    alone = retrain_alone(work, rebuilt)[0] if rebuilt else 0.0
    return {
        "seconds": seconds,
        "steps": record["seconds"],
        "clusters_rebuilt": [c["cluster"] for c in record["clusters_rebuilt"]],
        "samples_retrained": sum(after.get(c, 0) for c in rebuilt),
        "retrain_alone_seconds": alone,
        "overhead_ratio": seconds / alone if alone else None,
        "accuracy_before": record["accuracy"]["before"],
        "accuracy_after": record["accuracy"]["after"],
        "scan_hits": record["verification"]["scan"]["hits"],
        "mia": record["verification"]["membership_inference"],
        "peak_rss_mb": peak_mb,
        "load_average_before": load,  # 1-minute: above ~0.5 on an idle machine, something shared the cores
    }


def warm_service(work: Path, env: dict, victims: list[str], sizes: dict[int, int]) -> dict:
    """One forget at a time through a warm `lmeraser serve`: submit over HTTP, wait for `verified`."""
    from service import TOKEN, Service, wait_verified

    from helpers import free_port

    service = Service(work, {**env, "LMERASER_API_TOKEN": TOKEN}, free_port(), log_path=work / "serve.log")
    t_start = time.perf_counter()
    service.start()
    rounds = []
    try:
        with service.client() as client:
            while not client.get("/v1/health").json()["worker"]["warm"]:  # its imports and fingerprint
                time.sleep(0.2)
            started = time.perf_counter() - t_start  # up and warm
            for sid in victims:
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                answer = client.post("/v1/requests", json={"kind": "forget", "sample_ids": [sid]})
                if answer.status_code != 201:
                    raise SystemExit(f"service refused {sid}: {answer.status_code} {answer.text[:300]}")
                wait_verified(work, {answer.json()["requests"][0]["request_id"]}, timeout=1800)
                seconds = time.perf_counter() - t0
                # Once idle the worker tracks the batch's MLflow runs (~10 s of CPU): waited for
                # before the clusters are retrained alone, so nothing shares the cores with that
                # figure (measured alongside the tracking before 2026-12-06's fix, it ran slower
                # and flattered the round's ratio).
                backlog = work / "audit" / "batches" / "tracking-backlog.json"
                while backlog.exists() or client.get("/v1/health").json()["worker"]["busy"]:
                    time.sleep(0.2)
                rounds.append(outcome(work, seconds, sizes, load=load))
    finally:
        service.stop()
    return {"start_seconds": started, "rounds": rounds}


def run(source: str, batch: int, overrides: dict, name: str, scaling: bool = False) -> dict:
    """Every operation of the module docstring; with `scaling`, only 1-3 and 7 (the scaling run's
    columns: the full pipeline, all prompts, one forget in process and through a warm service)."""
    work = workspace(source, overrides, name)
    server, url = prefect_server(work / ".prefect-home")
    git = {
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "b@b",
    }
    base = {
        **os.environ,
        **git,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    base.pop("PREFECT_API_URL", None)
    env = {**base, "PREFECT_API_URL": url, "PREFECT_HOME": str(work / ".prefect-home")}
    cli_bin = str(BIN / "lmeraser")
    try:
        print("[data init]", flush=True)
        sh([cli_bin, "data", "init", "--source", source], work, env)
        print("[full pipeline from scratch: dvc repro]", flush=True)
        full_seconds, _ = sh([str(BIN / "dvc"), "repro"], work, env)
        sh(["git", "add", "-A"], work, env)
        sh(["git", "commit", "-qm", "pipeline"], work, env)
        sizes = members(work)
        n_private = sum(sizes.values())
        accuracy_before = read(work, "metrics.json")["accuracy"]
        # A deployment's scheduled full scan (`lmeraser serve` runs one every service.full_scan_every_s):
        # it reads every store once and keeps the index every batch's scan then starts from. Timed
        # apart, as the one-off it is, so that the forgets below are the steady state.
        # The remote as a deployment keeps it: pushed after `dvc repro` (every purge pushes too).
        # Left empty, the first forget's purge pushes every object and its scan reads them all
        # (measured at 30,000 private samples: 6.4 s of verification against 0.9 s after).
        print("[dvc push]", flush=True)
        push_seconds, _ = sh([str(BIN / "dvc"), "push"], work, env)
        print("[the scheduled full scan: lmeraser audit scan --full]", flush=True)
        full_scan_seconds, _ = sh([cli_bin, "audit", "scan", "--full"], work, env)

        print("[all prompts from scratch]", flush=True)
        from lmeraser.config import load_params
        from lmeraser.pipeline.train import train_in_threads
        from lmeraser.stages import stage
        from lmeraser.workspace import Workspace

        params = load_params(work / "params.yaml")
        scratch = Workspace(work / "bench-scratch")
        for part in ("data", "artifacts/backbone", "artifacts/clusters"):
            shutil.copytree(work / part, scratch.root / part)
        start = time.perf_counter()
        stage("train").function(params, scratch, lambda m: None, map_jobs=train_in_threads(params.runtime.workers))
        all_prompts_seconds = time.perf_counter() - start
        shutil.rmtree(scratch.root)

        rng = np.random.default_rng(0)
        private = Workspace(work).manifest("private")["sample_id"].tolist()
        victims = [private[i] for i in rng.choice(len(private), size=5, replace=False)]

        print(f"[one forget in process: {victims[0]}]", flush=True)
        # A fresh Python process that imports the library first, then times submit + the batch
        # (no subprocess per stage): its wall time excludes the imports, its peak RSS is its own.
        load = os.getloadavg()[0]
        _, peak, out = timed_child([sys.executable, "-c", IN_PROCESS, str(work), victims[0]], work, env)
        in_process = outcome(work, json.loads(out.strip().splitlines()[-1])["seconds"], sizes, peak, load)

        def measured(warm: dict, **more) -> dict:
            """The run's figures; `more`: the full run's other operations."""
            status = subprocess.run(
                [str(BIN / "dvc"), "status", "evaluate"], cwd=work, env=env, capture_output=True, text=True
            ).stdout.strip()
            return {
                "source": source,
                "n_private": n_private,
                "n_clusters": len(sizes),
                "full_pipeline_seconds": full_seconds,
                "all_prompts_seconds": all_prompts_seconds,
                "push_seconds": push_seconds,
                "full_scan_seconds": full_scan_seconds,
                "one_in_process": in_process,
                "warm_service": warm,
                **more,
                "params_overrides": overrides,
                "accuracy_full_pipeline": accuracy_before,
                "dvc_status_serving_path": status,
                "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                "date": time.strftime("%Y-%m-%d"),
            }

        if scaling:
            print(f"[two forgets through a warm service: {victims[3:]}]", flush=True)
            return measured(warm_service(work, env, victims[3:], sizes))

        def after_command(seconds: float, peak: float, environment: dict) -> dict:
            """A CLI forget's figures. Its MLflow runs are tracked by the background tracker it
            left (runtime.tracking: background): `lmeraser track` waits for it, timed apart and
            before the clusters are retrained alone, so nothing else shares the cores then."""
            tracking_seconds, _ = sh([cli_bin, "track"], work, environment)
            return {**outcome(work, seconds, sizes, peak), "tracking_after_seconds": tracking_seconds}

        print(f"[one forget through the CLI, standing Prefect server: {victims[1]}]", flush=True)
        seconds, peak, _ = timed_child([cli_bin, "forget", "--sample-id", victims[1]], work, env)
        cli = after_command(seconds, peak, env)

        print(f"[one forget through the CLI, no Prefect server (as after `make demo`): {victims[2]}]", flush=True)
        seconds, peak, _ = timed_child([cli_bin, "forget", "--sample-id", victims[2]], work, base)
        cli_cold = after_command(seconds, peak, base)
        idle_seconds, _, _ = timed_child([cli_bin, "unlearn"], work, base)

        print(f"[two forgets through a warm service: {victims[3:]}]", flush=True)
        warm = warm_service(work, env, victims[3:], sizes)

        print(f"[batch of {batch} forget requests]", flush=True)
        remaining = [p for p in private if p not in victims]
        chosen = [remaining[i] for i in rng.choice(len(remaining), size=min(batch, len(remaining)), replace=False)]
        requests = work / "requests.jsonl"
        requests.write_text("".join(json.dumps({"sample_ids": [sid]}) + "\n" for sid in chosen))
        seconds, peak, _ = timed_child([cli_bin, "forget", "--file", str(requests)], work, env)
        many = {**after_command(seconds, peak, env), "requests": len(chosen)}
        verify_seconds, _ = sh([cli_bin, "audit", "verify"], work, env)
        cache = {p.name: p.stat().st_size for p in (work / "artifacts" / "cache").iterdir()}
        return measured(
            warm,
            one_cli=cli,
            one_cli_no_server=cli_cold,
            idle_unlearn_seconds=idle_seconds,
            batch=many,
            audit_verify_seconds=verify_seconds,
            cache_bytes=cache,
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def markdown(r: dict) -> str:
    one, cli, cold, many = r["one_in_process"], r["one_cli"], r["one_cli_no_server"], r["batch"]

    def row(name: str, o: dict) -> str:
        ratio = f"{o['overhead_ratio']:.1f}×" if o["overhead_ratio"] else "–"
        peak = f"{o['peak_rss_mb']:.0f}" if o["peak_rss_mb"] else "–"
        return (
            f"| {name} | {o['seconds']:.1f} | {o['retrain_alone_seconds']:.1f} | {ratio} | {o['samples_retrained']} ({len(o['clusters_rebuilt'])} clusters) "
            f"| {o['accuracy_before']:.4f} → {o['accuracy_after']:.4f} | {peak} |"
        )

    cache_mb = sum(r["cache_bytes"].values()) / 2**20
    lines = [
        f"### unlearning: {r['source']}",
        "",
        f"{r['n_private']} private samples in {r['n_clusters']} clusters; {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['date']}"
        + (
            f"; params changed from the preset: {json.dumps(r['params_overrides'])}"
            if r.get("params_overrides")
            else ""
        )
        + ".",
        "",
        "| operation | wall-clock (s) | its clusters retrained alone (s) | overhead ratio | samples retrained | accuracy before → after | peak RSS (MB) |",
        "|---|---:|---:|---:|---|---|---:|",
        f"| full pipeline from scratch (`dvc repro`) | {r['full_pipeline_seconds']:.1f} | | | {r['n_private']} (+ backbone) | – → {r['accuracy_full_pipeline']:.4f} | |",
        f"| all prompts from scratch (train stage) | {r['all_prompts_seconds']:.1f} | | | {r['n_private']} | | |",
        f"| the scheduled full scan (`lmeraser audit scan --full`: keeps the index the forgets below start from) | {r['full_scan_seconds']:.1f} | | | | | |",
        row("one forget, in process (library)", one),
        row("one forget, `lmeraser forget` (standing Prefect server)", cli),
        row("one forget, `lmeraser forget` (no Prefect server)", cold),
        *[
            row(f"one forget through a warm `lmeraser serve` ({i + 1})", o)
            for i, o in enumerate(r.get("warm_service", {}).get("rounds", []))
        ],
        row(f"batch of {many['requests']} forgets, `lmeraser forget --file`", many),
        f"| `lmeraser unlearn` with nothing pending | {r['idle_unlearn_seconds']:.1f} | | | | | |",
        "",
        "Steps (s): in process "
        + ", ".join(f"{k} {v:.1f}" for k, v in one["steps"].items())
        + "; CLI "
        + ", ".join(f"{k} {v:.1f}" for k, v in cli["steps"].items())
        + "".join(
            f"; warm service ({i + 1}) " + ", ".join(f"{k} {v:.1f}" for k, v in o["steps"].items())
            for i, o in enumerate(r.get("warm_service", {}).get("rounds", []))
        )
        + ".",
        "The rebuild runs in the batch's process (validate, assign, train, evaluate through the stage registry, then `dvc commit`).",
        *(
            [
                "MLflow tracking after each `lmeraser forget` returned (runtime.tracking: background; "
                "`lmeraser track` waited for the background tracker, not in the wall-clock above): "
                + ", ".join(f"{o['tracking_after_seconds']:.1f} s" for o in (cli, cold, many))
                + " (standing server, no server, batch)."
            ]
            if "tracking_after_seconds" in cli
            else []
        ),
        "",
        f"Ratios: full pipeline / one forget in process = {r['full_pipeline_seconds'] / one['seconds']:.0f}×, through the CLI = {r['full_pipeline_seconds'] / cli['seconds']:.0f}×; "
        f"all prompts / one forget in process = {r['all_prompts_seconds'] / one['seconds']:.1f}×. "
        f"Feature and score caches: {cache_mb:.1f} MB. Scan hits after: {one['scan_hits']}, {cli['scan_hits']}, {cold['scan_hits']}, {many['scan_hits']} (batch). "
        f"`dvc status evaluate` after: {'clean' if 'up to date' in r['dvc_status_serving_path'] else r['dvc_status_serving_path']}.",
        "",
    ]
    if isinstance(many["mia"].get("after"), dict) and "auc" in many["mia"]["after"]:
        lines.append(
            f"Membership inference on the forgotten samples vs test (loss threshold), batch: AUC {many['mia']['before']['auc']:.3f} before → {many['mia']['after']['auc']:.3f} after."
        )
        lines.append("")
    return "\n".join(lines)


def scaling_markdown(points: list[dict]) -> str:
    """The scaling run: one forget's overhead (wall-clock minus its cluster retrained alone) against
    the private set's size, in process and through a warm service."""

    def over(o: dict) -> float:
        return o["seconds"] - o["retrain_alone_seconds"]

    first = points[0]
    lines = [
        f"### unlearning cost against the data size: {first['source']} (scaling run)",
        "",
        f"{first['machine']['cpu']}, {first['machine']['cores']} cores, {first['date']}; cluster size ~{first['n_private'] // first['n_clusters']}; "
        f"params changed from the preset: {json.dumps({k: v for k, v in first['params_overrides'].items() if k != 'data'})}. "
        "Overhead = the forget's wall-clock minus its affected cluster retrained alone; the load average (1 min) before each forget shows whether anything shared the cores. "
        "The scheduled full scan ran once after the pipeline and a `dvc push` (as `lmeraser serve` runs one on its schedule): every forget's scan starts from its index.",
        "",
        "| private samples | clusters | full pipeline (s) | all prompts (s) | scheduled full scan (s) | one forget in process (s) | its cluster alone (s) | overhead (s) | "
        "warm service (s) | its cluster alone (s) | overhead (s) | full pipeline / forget | all prompts / forget | load before |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        one = p["one_in_process"]
        rounds = p["warm_service"]["rounds"]
        warm = min(rounds, key=over)
        loads = [one.get("load_average_before"), *[r.get("load_average_before") for r in rounds]]
        lines.append(
            f"| {p['n_private']} | {p['n_clusters']} | {p['full_pipeline_seconds']:.0f} | {p['all_prompts_seconds']:.1f} | "
            f"{p['full_scan_seconds']:.1f} | {one['seconds']:.1f} | "
            f"{one['retrain_alone_seconds']:.1f} | {over(one):.1f} | {warm['seconds']:.1f} | {warm['retrain_alone_seconds']:.1f} | {over(warm):.1f} | "
            f"{p['full_pipeline_seconds'] / one['seconds']:.0f}× | {p['all_prompts_seconds'] / one['seconds']:.1f}× | "
            + ", ".join(f"{x:.1f}" for x in loads if x is not None)
            + " |"
        )
    small, large = points[0], points[-1]
    lines += [
        "",
        f"Overhead at {large['n_private']} / at {small['n_private']} private samples: in process "
        f"{over(large['one_in_process']) / over(small['one_in_process']):.2f}×, warm service "
        f"{min(map(over, large['warm_service']['rounds'])) / min(map(over, small['warm_service']['rounds'])):.2f}× (target ≤ 1.2×: flat in the data size). "
        "The warm service's row is the cheaper of its two rounds (each round's figures are in the JSON).",
        "",
        "Steps (s), in process: "
        + "; ".join(
            f"{p['n_private']}: " + ", ".join(f"{k} {v:.1f}" for k, v in p["one_in_process"]["steps"].items())
            for p in points
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def dotted_override(item: str) -> dict:
    """`a.b=VALUE` as {"a": {"b": VALUE}} (VALUE read as YAML: 1, 0.5, false, null, text)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SystemExit(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. backbone.epochs=1")
    override: dict = {}
    node = override
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return override


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--keep-workspace", action="store_true")
    parser.add_argument(
        "--audit-references",
        type=int,
        default=None,
        help="audit.references (default: the preset's; 0: no forgetting audit)",
    )
    parser.add_argument(
        "--subset", type=int, default=None, help="data.subset: cap on the training pool (the scaling run)"
    )
    parser.add_argument("--name", default=None, help="results name (default: unlearn-<source>)")
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="evaluate.baselines: false (the full pipeline then excludes the two comparison models)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override (YAML value), e.g. backbone.epochs=1; repeatable. The results name them: "
        "shorter training changes accuracy and the ratios to the pipeline, not the overhead of a forget",
    )
    parser.add_argument(
        "--scaling",
        type=int,
        nargs="+",
        default=None,
        metavar="SUBSET",
        help="the scaling run: one point per data.subset (private = about half), smallest first",
    )
    args = parser.parse_args()
    from lmeraser.config import deep_merge

    overrides = {"service": {"batch_window_s": 0}}  # the warm service starts a batch at once
    if args.audit_references is not None:
        overrides["audit"] = {"references": args.audit_references}
    if args.subset is not None:
        overrides["data"] = {"subset": args.subset}
    if args.no_baselines:
        overrides["evaluate"] = {"baselines": False}
    for item in args.set:
        overrides = deep_merge(overrides, dotted_override(item))
    out = ROOT / "bench" / "results"
    if args.scaling:
        points = []
        name = args.name or f"scaling-{args.source}"
        for subset in sorted(args.scaling):
            print(f"[scaling point: data.subset {subset}]", flush=True)
            points.append(
                run(
                    args.source,
                    0,
                    deep_merge(overrides, {"data": {"subset": subset}}),
                    f"{name}-{subset}",
                    scaling=True,
                )
            )
            (out / f"unlearn-{name}.json").write_text(json.dumps(points, indent=2) + "\n")  # each point as it ends
            if not args.keep_workspace:
                shutil.rmtree(out / f"work-unlearn-{name}-{subset}", ignore_errors=True)
        (out / f"unlearn-{name}.md").write_text(scaling_markdown(points))
        print(scaling_markdown(points))
        return
    name = args.name or args.source
    result = run(args.source, args.batch, overrides, name)
    (out / f"unlearn-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"unlearn-{name}.md").write_text(markdown(result))
    if not args.keep_workspace:
        shutil.rmtree(out / f"work-unlearn-{name}", ignore_errors=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
