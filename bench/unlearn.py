"""Unlearning benchmark: what a forget request costs against retraining.

    python bench/unlearn.py --source digits|fashion-mnist [--batch 100]

In one run, in a scratch git + DVC copy of this repository (bench/results/work-unlearn-*), with
one standing Prefect server on loopback (as in production):
  1. the full pipeline from scratch (`dvc repro`: backbone + prototypes + every prompt + evaluation)
  2. retraining all prompts from scratch (the train stage with an empty artifact store)
  3. one forget request end to end (`lmeraser forget --sample-id`), with its step breakdown
  4. a batch of N random forget requests (`lmeraser forget --file`)
and reports wall-clock, samples retrained, ratios and accuracy before/after.
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

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


from pipeline import CONFIGS, cpu_model, preset  # noqa: E402

BIN = Path(sys.executable).parent


def sh(args: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done


def workspace(source: str) -> Path:
    work = ROOT / "bench" / "results" / f"work-unlearn-{source}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("dvc.yaml", "data.dvc", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy2(ROOT / name, work / name)
    for name in ("lmeraser", "flows", ".dvc"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local"))
    (work / "params.yaml").write_text(yaml.safe_dump(preset(source), sort_keys=False))
    git = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@b"}
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


def run(source: str, batch: int) -> dict:
    work = workspace(source)
    server, url = prefect_server(work / ".prefect-home")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(work / ".prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    try:
        print("[data init]", flush=True)
        sh([str(BIN / "lmeraser"), "data", "init", "--source", source], work, env)
        print("[full pipeline from scratch: dvc repro]", flush=True)
        full_seconds, _ = sh([str(BIN / "dvc"), "repro"], work, env)
        sizes = members(work)
        n_private = sum(sizes.values())
        accuracy_before = read(work, "metrics.json")["accuracy"]

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
        private = [line.split(",")[0] for line in (work / "data" / "private" / "manifest.csv").read_text().splitlines()[1:]]
        victim = private[int(rng.integers(len(private)))]
        print(f"[one forget request: {victim}]", flush=True)
        one_seconds, out = sh([str(BIN / "lmeraser"), "forget", "--sample-id", victim], work, env)
        one = last_record(work)
        one_retrained = sum(sizes[c["cluster"]] - 1 for c in one["clusters_rebuilt"] if c["prompt_sha256_after"])

        print(f"[batch of {batch} forget requests]", flush=True)
        remaining = [p for p in private if p != victim]
        chosen = [remaining[i] for i in rng.choice(len(remaining), size=min(batch, len(remaining)), replace=False)]
        requests = work / "requests.jsonl"
        requests.write_text("".join(json.dumps({"sample_ids": [sid]}) + "\n" for sid in chosen))
        batch_seconds, _ = sh([str(BIN / "lmeraser"), "forget", "--file", str(requests)], work, env)
        many = last_record(work)
        after = members(work)
        batch_retrained = sum(after.get(c["cluster"], 0) for c in many["clusters_rebuilt"])
        verify_seconds, _ = sh([str(BIN / "lmeraser"), "audit", "verify"], work, env)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    train_seconds_one = one["seconds"]
    return {
        "source": source,
        "n_private": n_private,
        "n_clusters": len(sizes),
        "full_pipeline_seconds": full_seconds,
        "all_prompts_seconds": all_prompts_seconds,
        "one_request": {
            "seconds": one_seconds,
            "steps": train_seconds_one,
            "clusters_rebuilt": [c["cluster"] for c in one["clusters_rebuilt"]],
            "samples_retrained": one_retrained,
            "accuracy_before": one["accuracy"]["before"],
            "accuracy_after": one["accuracy"]["after"],
            "scan_hits": one["verification"]["scan"]["hits"],
            "mia": one["verification"]["membership_inference"],
        },
        "batch": {
            "requests": len(chosen),
            "seconds": batch_seconds,
            "steps": many["seconds"],
            "clusters_rebuilt": len(many["clusters_rebuilt"]),
            "samples_retrained": batch_retrained,
            "accuracy_before": many["accuracy"]["before"],
            "accuracy_after": many["accuracy"]["after"],
            "scan_hits": many["verification"]["scan"]["hits"],
            "mia": many["verification"]["membership_inference"],
        },
        "accuracy_full_pipeline": accuracy_before,
        "audit_verify_seconds": verify_seconds,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(r: dict) -> str:
    one, many = r["one_request"], r["batch"]
    steps = one["steps"]
    lines = [
        f"### unlearning: {r['source']}",
        "",
        f"{r['n_private']} private samples in {r['n_clusters']} clusters; {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['date']}.",
        "",
        "| operation | wall-clock (s) | samples retrained | accuracy before → after |",
        "|---|---:|---:|---|",
        f"| full pipeline from scratch (`dvc repro`) | {r['full_pipeline_seconds']:.1f} | {r['n_private']} (+ backbone) | – → {r['accuracy_full_pipeline']:.4f} |",
        f"| all prompts from scratch (train stage) | {r['all_prompts_seconds']:.1f} | {r['n_private']} | |",
        f"| one forget request, end to end | {one['seconds']:.1f} | {one['samples_retrained']} | {one['accuracy_before']:.4f} → {one['accuracy_after']:.4f} |",
        f"| batch of {many['requests']} forget requests, end to end | {many['seconds']:.1f} | {many['samples_retrained']} ({many['clusters_rebuilt']} clusters) | {many['accuracy_before']:.4f} → {many['accuracy_after']:.4f} |",
        "",
        "One request, by step (s): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()) + ".",
        "`rebuild` is `dvc repro evaluate`: validate, assign, train (one cluster), evaluate, each a CLI process running a Prefect flow.",
        "",
        f"Ratios for one request: full pipeline / end to end = {r['full_pipeline_seconds'] / one['seconds']:.1f}×; "
        f"all prompts / end to end = {r['all_prompts_seconds'] / one['seconds']:.1f}×; "
        f"samples retrained, all prompts / one request = {r['n_private'] / max(1, one['samples_retrained']):.0f}×. "
        f"Scan hits after: {one['scan_hits']} (one), {many['scan_hits']} (batch).",
        "",
    ]
    mia = one["mia"]
    if mia.get("before") and isinstance(mia.get("after"), dict) and "auc" in mia["after"]:
        lines.append(
            f"Membership inference on the forgotten sample(s) vs test (loss threshold), batch: AUC {many['mia']['before']['auc']:.3f} before → {many['mia']['after']['auc']:.3f} after."
        )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--keep-workspace", action="store_true")
    args = parser.parse_args()
    result = run(args.source, args.batch)
    out = ROOT / "bench" / "results"
    (out / f"unlearn-{args.source}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"unlearn-{args.source}.md").write_text(markdown(result))
    if not args.keep_workspace:
        shutil.rmtree(out / f"work-unlearn-{args.source}", ignore_errors=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
