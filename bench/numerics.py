"""Portable against native numerics: what pinning every library to the AVX2 kernels costs.

    python bench/numerics.py --source digits|fashion-mnist [--repeats 3] [--subset N]

Two scratch git + DVC copies of this repository (bench/results/work-numerics-SOURCE-MODE/repo,
built by bench/scratch.py's `build_demo`: `lmeraser data init --source`, `dvc repro`), the same
params but `runtime.numerics` (portable in one, native in the other), with one standing Prefect
server on loopback for both (bench/unlearn.py's). Each step then runs as a fresh `lmeraser`
process in each workspace, interleaved (portable, native; native, portable; ...), every process
started with an environment stripped of every pin of `lmeraser.numerics.PINS` and with
$LMERASER_NUMERICS naming its workspace's mode:

  backbone   `lmeraser stage backbone` (after an untimed `lmeraser stage validate`)
  train      `lmeraser stage train` with an empty prompt store (every cluster trains)
  forget     one exact forget end to end, `lmeraser forget --sample-id ID` (another private
             sample each repeat, the same one in both modes)
  influence  one influence update, `lmeraser forget --method influence --sample-id ID` (its
             queued exact rebuild then runs, untimed for the comparison, with `lmeraser unlearn`)

and records per step every run's wall-clock, the load average before and after it, the median per
mode and the ratio portable / native; the CPU, the library versions, what took effect in each
workspace (`lmeraser doctor --json`) and each mode's numeric fingerprint (backbone.json); whether
each mode is deterministic (the backbone's and the prompt index's sha256 equal over its repeats)
and whether the two modes' results are comparable (test accuracy). Saves
bench/results/numerics-SOURCE.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from lmeraser import numerics  # first: its pins must precede numpy (lmeraser/numerics.py)

# isort: split
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from scratch import BIN, bench_env, build_demo, run, work_root  # noqa: E402
from unlearn import last_record, prefect_server, read, timed_child  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import CONFIGS  # noqa: E402

MODES = numerics.MODES  # ("portable", "native")
STEPS = ("backbone", "train", "forget", "influence")
LIMIT = 1.3  # the rule: portable becomes the default if it costs at most this much
GIT = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "b@b",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "b@b",
}


def mode_env(base: dict, mode: str, work: Path) -> dict:
    """The environment of a process of `mode` in `work`: no pin inherited (this process was pinned
    when it imported lmeraser), the mode named, so the process boots exactly as its workspace
    asks; and the workspace's own copy of the code first on the path (the editable install would
    import this repository's, which others may be editing while the benchmark runs)."""
    env = {k: v for k, v in base.items() if k not in numerics.PINS}
    return {**env, numerics.ENV_MODE: mode, "PYTHONPATH": str(work)}


def snapshot_code(source: str, reuse: bool) -> tuple[Path, dict]:
    """One copy of lmeraser/ for both workspaces, and what it is: the repository's
    commit, the files that differed from it, a digest of the copy (`reuse`: the copy made before)."""
    code = ROOT / "bench" / "results" / f"work-numerics-{source}-code"
    if reuse and (code / "code.json").is_file():
        return code, json.loads((code / "code.json").read_text())
    shutil.rmtree(code, ignore_errors=True)
    digest = hashlib.sha256()
    for package in ("lmeraser",):
        shutil.copytree(ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
    for path in sorted(code.rglob("*.py")):
        digest.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
    head = run(["git", "rev-parse", "HEAD"], ROOT).stdout.strip()
    dirty = run(["git", "status", "--porcelain", "--", "lmeraser"], ROOT).stdout.split("\n")
    info = {"commit": head, "uncommitted": [line[3:] for line in dirty if line.strip()], "sha256": digest.hexdigest()}
    (code / "code.json").write_text(json.dumps(info))
    return code, info


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timed(args: list[str], work: Path, env: dict) -> dict:
    """One fresh process to completion: wall-clock, peak RSS, the load average around it, and the
    CPU seconds it and the processes it waited for used (user + system: what a busy machine
    stretches least; this process's other children are reaped outside the window)."""
    before, usage = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, peak_mb, stdout = timed_child(args, work, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak_mb,
        "load_before": list(before),
        "load_after": list(os.getloadavg()),
        "stdout": stdout,
    }


def build(source: str, mode: str, subset: int | None, base: dict, code: Path, reuse: bool) -> tuple[Path, float]:
    """The workspace of `mode` after `dvc repro`, committed; its root and the build's seconds.
    `reuse`: the one an interrupted run built, if nothing but the stages ran in it since."""

    def edit(values: dict) -> None:
        values["runtime"]["numerics"] = mode
        if subset:
            values["data"]["subset"] = subset

    name = f"numerics-{source}-{mode}"
    env = mode_env(base, mode, work_root(name))
    record = work_root(name).parent / "build.json"
    if reuse and record.is_file():
        saved = json.loads(record.read_text())
        last = run(["git", "log", "-1", "--format=%s"], work_root(name)).stdout.strip()
        if saved["subset"] != subset or last != "pipeline":
            raise SystemExit(
                f"{work_root(name)}: built with another subset, or changed since (last commit: {last}); run without --reuse"
            )
        return work_root(name), saved["seconds"]
    start = time.perf_counter()
    work = build_demo(name, env, params=CONFIGS[source], edit=edit, source=source, code_from=code)
    seconds = time.perf_counter() - start
    imported = run([sys.executable, "-c", "import lmeraser; print(lmeraser.__file__)"], Path("/"), env).stdout.strip()
    if Path(imported).resolve() != (work / "lmeraser" / "__init__.py").resolve():
        raise SystemExit(f"{mode}: the workspace's processes would import {imported}, not the workspace's own code")
    commit(work, base, "pipeline")
    record.write_text(json.dumps({"seconds": seconds, "subset": subset}))
    return work, seconds


def commit(work: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", message, "--allow-empty"], work, env)


def order(repeat: int) -> tuple[str, ...]:
    """Which mode goes first alternates per repeat."""
    return MODES if repeat % 2 == 0 else MODES[::-1]


def private_ids(work: Path) -> list[str]:
    from lmeraser.workspace import Workspace

    return Workspace(work).manifest("private")["sample_id"].tolist()


def measure(source: str, repeats: int, subset: int | None, reuse: bool = False) -> dict:
    lm = str(BIN / "lmeraser")
    home = ROOT / "bench" / "results" / f"work-numerics-{source}-prefect"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    server, url = prefect_server(home)
    base = {k: v for k, v in bench_env(**GIT).items() if k != "PREFECT_API_URL"}
    base.update({"PREFECT_API_URL": url, "PREFECT_HOME": str(home)})
    code, code_info = snapshot_code(source, reuse)
    runs: dict[str, dict[str, list[dict]]] = {step: {mode: [] for mode in MODES} for step in STEPS}
    extra: dict[str, dict[str, list[dict]]] = {"unlearn_after_influence": {mode: [] for mode in MODES}}
    try:
        works, build_seconds = {}, {}
        for mode in MODES:
            print(f"[build {mode}: data init --source {source}, dvc repro]", flush=True)
            works[mode], build_seconds[mode] = build(source, mode, subset, base, code, reuse)
        envs = {mode: mode_env(base, mode, works[mode]) for mode in MODES}
        doctor = {mode: json.loads(run([lm, "doctor", "--json"], works[mode], envs[mode]).stdout) for mode in MODES}
        for mode in MODES:
            if not doctor[mode]["ok"]:
                raise SystemExit(f"{mode}: lmeraser doctor: {doctor[mode]['problem']}")
        first = {mode: built_state(works[mode]) for mode in MODES}

        def step(name: str, repeat: int, mode: str, args: list[str], prepare=None, after=None, **info) -> None:
            work = works[mode]
            if prepare:
                prepare(work, mode)
            result = timed(args, work, envs[mode])
            result.update({"repeat": repeat, "first": order(repeat)[0] == mode, **info})
            if after:
                result.update(after(work, result))
            result.pop("stdout")
            runs[name][mode].append(result)
            (home / "progress.json").write_text(json.dumps(runs, indent=1))  # what an interrupted run measured
            print(
                f"  {name} {mode} #{repeat + 1}: {result['seconds']:.1f}s (load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f})",
                flush=True,
            )

        print("[backbone stage]", flush=True)
        for r in range(repeats):
            for mode in order(r):
                step(
                    "backbone",
                    r,
                    mode,
                    [lm, "stage", "backbone"],
                    prepare=lambda work, mode: run([lm, "stage", "validate"], work, envs[mode]),
                    after=lambda work, _: {"backbone_sha256": read(work, "artifacts/backbone/backbone.json")["sha256"]},
                )

        print("[train stage, empty prompt store]", flush=True)

        def empty_store(work: Path, _mode: str) -> None:
            store = work / "artifacts" / "prompts" / "store"
            shutil.rmtree(store, ignore_errors=True)
            store.mkdir(parents=True)

        def trained(work: Path, _result: dict) -> dict:
            index = work / "artifacts" / "prompts" / "index.json"
            clusters = json.loads(index.read_text())["clusters"]
            last = read(work, "artifacts/prompts/last_run.json")
            return {
                "index_sha256": sha256(index),
                "prompt_sha256": {c: e["sha256"] for c, e in sorted(clusters.items(), key=lambda kv: int(kv[0]))},
                "clusters_trained": len(last["trained"]),
                "clusters_reused": len(last["reused"]),
            }

        for r in range(repeats):
            for mode in order(r):
                step("train", r, mode, [lm, "stage", "train"], prepare=empty_store, after=trained)

        # The stages rewrote what `dvc repro` made: whatever changed is committed (DVC, then git)
        # before the forgets, as a deployment would have it.
        for mode in MODES:
            run([str(BIN / "dvc"), "repro"], works[mode], envs[mode])
            commit(works[mode], base, "stages re-run")
        after_stages = {mode: built_state(works[mode]) for mode in MODES}

        ids = private_ids(works[MODES[0]])
        if ids != private_ids(works[MODES[1]]):
            raise SystemExit("the two workspaces hold different private splits")
        rng = np.random.default_rng(0)
        victims = [ids[i] for i in rng.choice(len(ids), size=2 * repeats, replace=False)]

        def forgot(work: Path, _result: dict) -> dict:
            record = last_record(work)
            return {
                "clusters_rebuilt": [c["cluster"] for c in record["clusters_rebuilt"]],
                "accuracy_before": record["accuracy"]["before"],
                "accuracy_after": record["accuracy"]["after"],
                "steps": record["seconds"],
            }

        print("[one exact forget, `lmeraser forget --sample-id`]", flush=True)
        for r in range(repeats):
            for mode in order(r):
                step("forget", r, mode, [lm, "forget", "--sample-id", victims[r]], after=forgot, sample_id=victims[r])

        def influenced(work: Path, result: dict) -> dict:
            answer = json.loads(result["stdout"])["influence"]
            record = last_record(work)
            return {
                "clusters_edited": answer["clusters"] if answer else [],
                "update_seconds": answer["seconds"] if answer else None,
                "steps": record["seconds"],
                "edits": [
                    {k: c.get(k) for k in ("cluster", "damping", "cg_iterations", "cg_relative_residual")}
                    for c in record["clusters_edited"]
                ],
            }

        print(
            "[one influence update, `lmeraser forget --method influence`; its exact rebuild after it, untimed]",
            flush=True,
        )
        for r in range(repeats):
            for mode in order(r):
                victim = victims[repeats + r]
                step(
                    "influence",
                    r,
                    mode,
                    [lm, "forget", "--method", "influence", "--sample-id", victim, "--json"],
                    after=influenced,
                    sample_id=victim,
                )
                rebuild = timed([lm, "unlearn"], works[mode], envs[mode])
                rebuild.pop("stdout")
                extra["unlearn_after_influence"][mode].append({**rebuild, "repeat": r, **forgot(works[mode], rebuild)})
        final = {mode: {"metrics_accuracy": read(works[mode], "metrics.json")["accuracy"]} for mode in MODES}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    return {
        "source": source,
        "subset": subset,
        "repeats": repeats,
        "victims": {"forget": victims[:repeats], "influence": victims[repeats:]},
        "code": code_info,
        "runs": runs,
        "extra": extra,
        "summary": summarise(runs),
        "determinism": determinism(runs, first),
        "build_seconds": build_seconds,
        "built": first,
        "after_stages": after_stages,
        "final": final,
        "doctor": doctor,
        "machine": {"cpu": numerics.cpu_name(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))},
        "threads": threads(works[MODES[0]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def built_state(work: Path) -> dict:
    """What a workspace's pipeline produced: its backbone (fingerprint), clusters and accuracy."""
    backbone = read(work, "artifacts/backbone/backbone.json")
    clusters = read(work, "artifacts/prompts/index.json")["clusters"]
    return {
        "backbone_sha256": backbone["sha256"],
        "fingerprint": backbone.get("fingerprint"),
        "n_private": sum(e["n_members"] for e in clusters.values()),
        "n_clusters": len(clusters),
        "index_sha256": sha256(work / "artifacts" / "prompts" / "index.json"),
        "prompt_sha256": {c: e["sha256"] for c, e in sorted(clusters.items(), key=lambda kv: int(kv[0]))},
        "test_accuracy": read(work, "metrics.json")["accuracy"],
    }


def threads(work: Path) -> dict:
    """The workspace's configured thread counts (every step runs with them)."""
    import yaml

    p = yaml.safe_load((work / "params.yaml").read_text())
    return {
        "backbone.threads": p["backbone"]["threads"],
        "runtime.threads": p["runtime"]["threads"],
        "runtime.workers": p["runtime"]["workers"],
        "influence.threads": p["influence"]["threads"],
    }


def summarise(runs: dict) -> dict:
    """Per step: each mode's median wall-clock and CPU seconds, and portable / native of each;
    overall: the steps' medians summed (weighted by their cost) and the per-step ratios'
    geometric mean."""
    out = {}
    for step, by_mode in runs.items():
        out[step] = {}
        for key, name in (("seconds", "median"), ("cpu_seconds", "cpu_median")):
            if not all(key in r for mode in MODES for r in by_mode[mode]):
                continue  # (results saved before CPU time was measured)
            medians = {mode: statistics.median(r[key] for r in by_mode[mode]) for mode in MODES}
            out[step][name] = medians
            out[step]["ratio" if key == "seconds" else "cpu_ratio"] = medians["portable"] / medians["native"]
    out["overall"] = {}
    for name, ratio in (("median", "ratio"), ("cpu_median", "cpu_ratio")):
        if not all(name in out[step] for step in runs):
            continue
        total = {mode: sum(out[step][name][mode] for step in runs) for mode in MODES}
        out["overall"][name] = total
        out["overall"][ratio] = total["portable"] / total["native"]
        out["overall"][f"geometric_mean_{ratio}"] = float(np.exp(np.mean([np.log(out[step][ratio]) for step in runs])))
    return out


def determinism(runs: dict, built: dict) -> dict:
    """Per mode: one backbone and one prompt index over its repeats and the `dvc repro` that built
    the workspace; and across the modes."""
    out = {}
    for mode in MODES:
        backbones = {r["backbone_sha256"] for r in runs["backbone"][mode]}
        indexes = {r["index_sha256"] for r in runs["train"][mode]}
        out[mode] = {
            "backbone": len(backbones) == 1,
            "train_index": len(indexes) == 1,
            "same_as_build": backbones == {built[mode]["backbone_sha256"]} and indexes == {built[mode]["index_sha256"]},
            "backbones": sorted(backbones),
            "indexes": sorted(indexes),
        }
    p, n = (runs["train"][mode][0]["prompt_sha256"] for mode in MODES)
    out["across_modes"] = {
        "backbone_identical": out["portable"]["backbones"] == out["native"]["backbones"],
        "prompts_identical": sum(p[c] == n.get(c) for c in p),
        "prompts": len(p),
    }
    return out


NAMES = {
    "backbone": "backbone stage (`lmeraser stage backbone`)",
    "train": "train stage, empty store (`lmeraser stage train`)",
    "forget": "one exact forget (`lmeraser forget --sample-id`)",
    "influence": "one influence update (`lmeraser forget --method influence`)",
}


def markdown(r: dict) -> str:
    s, m, d, built = r["summary"], r["machine"], r["determinism"], r["built"]
    versions = ", ".join(f"{k} {v}" for k, v in r["doctor"]["portable"]["versions"].items())
    t = r["threads"]
    loads = [
        x
        for step in r["runs"].values()
        for mode in step.values()
        for one in mode
        for x in (one["load_before"][0], one["load_after"][0])
    ]
    subset = (
        f", training pool capped at {r['subset']} (`data.subset`, stratified: each mode's runs within about 15 minutes on this machine)"
        if r["subset"]
        else ""
    )
    o = s["overall"]
    cpu = "cpu_ratio" in o
    lines = [
        f"### numerics: {r['source']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, {r['date']}; {versions}. {built['portable']['n_private']} private samples in "
        f"{built['portable']['n_clusters']} clusters{subset}. Threads as configured: backbone {t['backbone.threads']}, "
        f"{t['runtime.workers']} clusters at a time on {t['runtime.threads']} each, influence {t['influence.threads']}. "
        f"{r['repeats']} runs per mode and step, interleaved (the mode that goes first alternates per repeat), each a fresh "
        f"`lmeraser` process with a standing Prefect server; 1-minute load average {min(loads):.2f}–{max(loads):.2f} around the runs "
        "(the machine was shared with other work).",
        "",
        "| step | portable runs (s) | native runs (s) | portable median (s) | native median (s) | portable / native |"
        + (" CPU s, median portable / native | CPU portable / native |" if cpu else ""),
        "|---|---|---|---:|---:|---:|" + ("---:|---:|" if cpu else ""),
    ]
    for step in STEPS:
        runs = {mode: ", ".join(f"{x['seconds']:.1f}" for x in r["runs"][step][mode]) for mode in MODES}
        over = f" (> {LIMIT}×)" if s[step]["ratio"] > LIMIT else ""
        lines.append(
            f"| {NAMES[step]} | {runs['portable']} | {runs['native']} | {s[step]['median']['portable']:.1f} | "
            f"{s[step]['median']['native']:.1f} | {s[step]['ratio']:.2f}×{over} |"
            + (
                f" {s[step]['cpu_median']['portable']:.1f} / {s[step]['cpu_median']['native']:.1f} | {s[step]['cpu_ratio']:.2f}× |"
                if cpu
                else ""
            )
        )
    lines.append(
        f"| **the four steps (sum of medians)** | | | **{o['median']['portable']:.1f}** | **{o['median']['native']:.1f}** | **{o['ratio']:.2f}×** |"
        + (
            f" **{o['cpu_median']['portable']:.1f} / {o['cpu_median']['native']:.1f}** | **{o['cpu_ratio']:.2f}×** |"
            if cpu
            else ""
        )
    )
    above = ", ".join(f"{step} {s[step]['ratio']:.2f}×" for step in STEPS if s[step]["ratio"] > LIMIT) or "none"
    verdict = "at most" if o["ratio"] <= LIMIT else "more than"
    same = lambda ok: "identical" if ok else "DIFFERENT"  # noqa: E731
    forget_acc = {mode: ", ".join(f"{x['accuracy_after']:.4f}" for x in r["runs"]["forget"][mode]) for mode in MODES}
    influence = {
        mode: statistics.median(
            x["update_seconds"] for x in r["runs"]["influence"][mode] if x["update_seconds"] is not None
        )
        for mode in MODES
    }
    effects = {mode: "; ".join(f"{e['what']} {e['value']}" for e in r["doctor"][mode]["effects"]) for mode in MODES}
    lines += [
        "",
        f"By the {LIMIT}× rule: portable costs {o['ratio']:.2f}× native over the four steps ({verdict} {LIMIT}×; geometric mean of the "
        f"per-step ratios {o['geometric_mean_ratio']:.2f}×"
        + (f"; in CPU time {o['cpu_ratio']:.2f}×" if cpu else "")
        + f"); steps above {LIMIT}×: {above}.",
        "",
        f"Determinism (sha256 over each mode's repeats and its `dvc repro` build): portable backbone {same(d['portable']['backbone'])}, "
        f"prompt index {same(d['portable']['train_index'])}, same as the build: {'yes' if d['portable']['same_as_build'] else 'NO'}; "
        f"native backbone {same(d['native']['backbone'])}, prompt index {same(d['native']['train_index'])}, same as the build: "
        f"{'yes' if d['native']['same_as_build'] else 'NO'}. Across the modes: backbone {same(d['across_modes']['backbone_identical'])}, "
        f"{d['across_modes']['prompts_identical']} of {d['across_modes']['prompts']} prompt artifacts identical.",
        "",
        f"Results comparable: test accuracy after `dvc repro` portable {built['portable']['test_accuracy']:.4f}, native "
        f"{built['native']['test_accuracy']:.4f}; after each exact forget portable {forget_acc['portable']}, native {forget_acc['native']}. "
        f"Influence update inside the process (median, without start-up): portable {influence['portable']:.2f}s, native {influence['native']:.2f}s. "
        f"Build (`data init` + `dvc repro`, one after the other, not interleaved): portable {r['build_seconds']['portable']:.0f}s, "
        f"native {r['build_seconds']['native']:.0f}s.",
        "",
        f"Numeric fingerprints (backbone.json): portable `{(built['portable']['fingerprint'] or '?')[:16]}`, native "
        f"`{(built['native']['fingerprint'] or '?')[:16]}`. What took effect (`lmeraser doctor`), portable: {effects['portable']}; "
        f"native: {effects['native']}.",
        "",
        f"Code: {r['code']['commit'][:12]}"
        + (f" with uncommitted changes to {', '.join(r['code']['uncommitted'])}" if r["code"]["uncommitted"] else "")
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode and step (at least 2)")
    parser.add_argument("--subset", type=int, default=None, help="cap on the training pool (data.subset)")
    parser.add_argument("--out", default=None, help="results name (default: numerics-SOURCE)")
    parser.add_argument("--keep-workspace", action="store_true")
    parser.add_argument(
        "--reuse", action="store_true", help="the workspaces an interrupted run built (if only the stages ran in them)"
    )
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    # A SIGTERM ends the run through its `finally` (the Prefect server is stopped).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = measure(args.source, args.repeats, args.subset, args.reuse)
    out = ROOT / "bench" / "results"
    name = args.out or f"numerics-{args.source}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    if not args.keep_workspace:
        for path in out.glob(f"work-numerics-{args.source}-*"):
            shutil.rmtree(path, ignore_errors=True)
    print(markdown(result))
    print(f"saved {out}/{name}.json and .md")


if __name__ == "__main__":
    main()
