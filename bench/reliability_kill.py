"""SIGKILL `lmeraser unlearn` at random moments and at every named failpoint, then resume.

    python bench/reliability_kill.py [--kills 100] [--seed 0] [--params configs/...]

In a scratch git + DVC copy of this repository (bench/results/work-kill/), on the digits demo
(`lmeraser data init` + `dvc repro`), each trial submits one forget request for a random private
sample, starts `lmeraser unlearn`, SIGKILLs its whole process group (the CLI and every child it
started; the workspace's standing Prefect server runs detached in its own session and survives,
as it would a crash of the CLI) at a random moment within one clean run's duration, runs
`lmeraser unlearn` again to completion, and checks:
  - every request submitted so far is `verified` exactly once in the journal, none pending;
  - no leftover: no `.tmp`, `.staging`, `.new` or `.old` under data/, no `.tmp` in audit/, no
    batch state or influence intent file;
  - no half-made MLflow store: no `.mlflow.db.*` temporary beside `mlflow.db`, which exists.
Then the same for every named failpoint (lmeraser/failpoints.py), the influence ones through
`forget --method influence`. The two `mlflow:store-*` points are reached only while a workspace's
MLflow store is created: their trials first move `mlflow.db` out of the workspace (to
bench/results/work-kill/mlflow-before-<trial>.db), so the batch creates a new store and is killed
inside that creation, by whichever process creates it (a `dvc repro` stage dies, and the batch
with it); such a trial counts as killed at the point only when the creator's temporary store is
found afterwards. At the end the lineage log must pass `audit verify` (signatures, chain, head,
pinned signer, deployed artifacts) and `audit scan` must find nothing; the standing Prefect
server is then stopped.
Saves bench/results/reliability-kill.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from scratch import BIN, bench_env, build_demo, run  # noqa: E402

from lmeraser.failpoints import FAILPOINT_ENV, NAMED  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import cpu_model  # noqa: E402


def killed_run(work: Path, args: list[str], env: dict, after: float | None) -> int:
    """Start `lmeraser ARGS` in its own process group; SIGKILL the group `after` seconds in (or
    let a failpoint kill it). Returns the exit status of the CLI process."""
    proc = subprocess.Popen(
        [str(BIN / "lmeraser"), *args],
        cwd=work,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code = proc.wait(timeout=after) if after is not None else proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever it started (Prefect's server) dies with it
    except ProcessLookupError:
        pass
    return code


def problems(work: Path, submitted: list[str]) -> list[str]:
    from lmeraser.journal import Journal
    from lmeraser.workspace import Workspace

    ws = Workspace(work)
    found = []
    verified = Counter(e["request_id"] for e in Journal(ws).events() if e["state"] == "verified")
    found += [f"{rid} verified {verified[rid]} times" for rid in submitted if verified[rid] != 1]
    found += [f"{r.request_id} still pending" for r in Journal(ws).pending()]
    found += [
        f"leftover {p.relative_to(work)}"
        for p in (work / "data").rglob(".*")
        if p.name.endswith((".tmp", ".staging", ".new", ".old"))
    ]
    found += [
        f"leftover {p.relative_to(work)}"
        for p in [*(work / "audit").glob(".*.tmp"), *(work / "audit" / "batches").glob("*")]
    ]
    found += [f"leftover {p.relative_to(work)}" for p in _half_made_stores(work)]
    if not (work / "mlflow.db").is_file():
        found.append("no mlflow.db after the resume")
    return found


def _half_made_stores(work: Path) -> list[Path]:
    """What a process killed while creating the workspace's MLflow store leaves (tracking._create_store)."""
    return sorted(work.glob(".mlflow.db.*"))


def move_store_aside(work: Path, n: int) -> Path:
    """Move the workspace's MLflow store (and its SQLite side files) out of the workspace, so the
    next run creates a new one; where it went."""
    saved = work.parent / f"mlflow-before-{n}.db"
    for suffix in ("", "-journal", "-wal", "-shm"):
        path = work / f"mlflow.db{suffix}"
        if path.exists():
            os.replace(path, saved.with_name(saved.name + suffix))
    return saved


def submit(work: Path, rng: random.Random) -> str:
    """One forget request for a random private sample, submitted as `lmeraser forget --no-process` does."""
    from lmeraser.journal import Journal
    from lmeraser.request import RequestSpec
    from lmeraser.unlearning.intake import resolve
    from lmeraser.workspace import Workspace

    ws = Workspace(work)
    with ws.lock("submit"):
        request = resolve(RequestSpec(sample_ids=[rng.choice(ws.manifest("private")["sample_id"].tolist())]), ws)
        Journal(ws).submit([request])
    return request.request_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100, help="random-moment kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--params", type=Path, default=None, help="params preset for the demo (default: params.yaml, digits)"
    )
    parser.add_argument("--skip-failpoints", action="store_true")
    parser.add_argument("--out", default="reliability-kill", help="results name under bench/results/ (.json and .md)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = bench_env()
    env.pop(FAILPOINT_ENV, None)
    work = build_demo("kill", env, args.params)

    submitted = [submit(work, rng)]
    t0 = time.perf_counter()
    run([str(BIN / "lmeraser"), "unlearn"], work, env)
    clean = time.perf_counter() - t0
    print(f"one clean unlearn: {clean:.1f}s", flush=True)

    trials, started = [], time.perf_counter()
    plan = ([] if args.skip_failpoints else [("failpoint", p) for p in NAMED]) + [("random", None)] * args.kills
    for n, (kind, point) in enumerate(plan, start=1):
        request = None
        influence = point is not None and point.startswith("influence:")
        if not influence:
            request = submit(work, rng)
            submitted.append(request)
        if kind == "random":
            at = rng.uniform(0, clean)
            code = killed_run(work, ["unlearn"], env, at)
        else:
            at = None
            if influence:
                from lmeraser.workspace import Workspace

                sample = rng.choice(Workspace(work).manifest("private")["sample_id"].tolist())
                code = killed_run(
                    work,
                    ["forget", "--sample-id", sample, "--method", "influence"],
                    {**env, FAILPOINT_ENV: point},
                    None,
                )
                submitted.append(next(r["request_id"] for r in reversed(_journal(work)) if r["state"] == "received"))
            else:
                if point.startswith("mlflow:"):
                    move_store_aside(work, n)
                code = killed_run(work, ["unlearn"], {**env, FAILPOINT_ENV: point}, None)
        # A failpoint reached in a child (a `dvc repro` stage creating the MLflow store) kills that
        # child; the creator's temporary store left behind shows the kill happened inside creation.
        hit = code == -signal.SIGKILL or (
            point is not None and point.startswith("mlflow:") and bool(_half_made_stores(work))
        )
        resumed = run([str(BIN / "lmeraser"), "unlearn"], work, env, check=False)
        found = problems(work, submitted)
        if resumed.returncode != 0:
            found.append(f"resume exited {resumed.returncode}: {resumed.stderr.strip().splitlines()[-1:]}")
        if point is not None and point.startswith("mlflow:") and not hit:
            found.append(f"failpoint {point} not reached (exit {code}, no temporary store left)")
        trials.append(
            {
                "trial": n,
                "kind": kind,
                "point": point,
                "killed_at_s": at,
                "killed": hit,
                "exit": code,
                "problems": found,
            }
        )
        how = "killed" if code == -signal.SIGKILL else ("killed in a child" if hit else f"exit {code}")
        print(f"{n}/{len(plan)} {point or f'random {at:.1f}s'}: {how}; {found or 'ok'}", flush=True)
        write_report(args, trials, submitted, clean, started, None, None)

    verify = run([str(BIN / "lmeraser"), "audit", "verify"], work, env, check=False)
    scan = run([str(BIN / "lmeraser"), "audit", "scan"], work, env, check=False)
    run([str(BIN / "lmeraser"), "prefect", "stop", "--root", str(work)], work, env, check=False)
    ok = write_report(
        args,
        trials,
        submitted,
        clean,
        started,
        verify.returncode == 0,
        scan.returncode == 0 and "0 hits" in scan.stdout,
    )
    if not ok:
        sys.exit(1)


def write_report(
    args,
    trials: list[dict],
    submitted: list[str],
    clean: float,
    started: float,
    verify_ok: bool | None,
    scan_ok: bool | None,
) -> bool:
    """Write the figures so far (verify_ok None: the run is still going)."""
    bad = [t for t in trials if t["problems"]]
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
        "complete": verify_ok is not None,
        "seed": args.seed,
        "clean_unlearn_seconds": round(clean, 1),
        "random_kills": sum(t["kind"] == "random" for t in trials),
        "failpoints": [t["point"] for t in trials if t["kind"] == "failpoint"],
        "killed": sum(t["killed"] for t in trials),
        "requests": len(submitted),
        "trials_with_problems": len(bad),
        "audit_verify_ok": verify_ok,
        "audit_scan_ok": scan_ok,
        "seconds": round(time.perf_counter() - started),
        "trials": trials,
    }
    out = ROOT / "bench" / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = {True: "pass", False: "FAIL", None: "(running)"}
    lines = [
        f"SIGKILL of `lmeraser unlearn` on the digits demo; {result['machine']}, {result['date']}; one clean unlearn {result['clean_unlearn_seconds']} s; seed {args.seed}.",
        "",
        "| trials | of which killed | requests | lost or verified twice | leftover files | resume failed | audit verify | audit scan |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
        f"| {len(trials)} ({result['random_kills']} random moments + {len(result['failpoints'])} failpoints) | {result['killed']} | {len(submitted)} | "
        f"{sum(any('verified' in p or 'pending' in p for p in t['problems']) for t in trials)} | "
        f"{sum(any('leftover' in p for p in t['problems']) for t in trials)} | {sum(any('resume' in p for p in t['problems']) for t in trials)} | "
        f"{verdict[verify_ok]} | {verdict[scan_ok]} |",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if verify_ok is not None:
        print("\n".join(lines))
    return not bad and bool(verify_ok) and bool(scan_ok)


def _journal(work: Path) -> list[dict]:
    from lmeraser.journal import Journal
    from lmeraser.workspace import Workspace

    return Journal(Workspace(work)).events()


if __name__ == "__main__":
    main()
