"""Pipeline benchmark: wall-clock per stage, peak memory, cluster sizes, clustered vs baselines.

    python bench/pipeline.py --source digits
    python bench/pipeline.py --source fashion-mnist [--subset N]

Runs the same stage functions that the Prefect flows wrap (without Prefect's per-stage process
start-up, reported separately in docs/benchmarks.md), in a scratch workspace under bench/results/work-*.
Prints a table and saves JSON, Markdown and a PNG figure to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
from lmeraser.config import deep_merge as merge  # noqa: E402
from lmeraser.config import load_params, parse_params  # noqa: E402
from lmeraser.data.splits import init_data  # noqa: E402
from lmeraser.pipeline.train import train_in_threads  # noqa: E402
from lmeraser.stages import STAGES  # noqa: E402
from lmeraser.workspace import Workspace  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)

# Each source's params file: the repository's own for digits, a preset under configs/ otherwise.
CONFIGS = {"digits": ROOT / "params.yaml", "fashion-mnist": ROOT / "configs" / "fashion-mnist.yaml"}


def preset(source: str) -> dict:
    """The params of `source` as a plain dict (every key spelled out)."""
    return load_params(CONFIGS[source]).model_dump(mode="json")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(source: str, subset: int | None) -> dict:
    raw = preset(source)
    if subset:
        raw = merge(raw, {"data": {"subset": subset}})
    params = parse_params(raw)
    work = ROOT / "bench" / "results" / f"work-{source}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ws = Workspace(work)
    log = lambda message: print(f"  {message}", flush=True)  # noqa: E731

    timings, memory = {}, {}
    start = time.perf_counter()
    summary = init_data(params.data, params.seed, ws)
    timings["data init"] = time.perf_counter() - start
    memory["data init"] = peak_rss_mb()
    results = {}
    for definition in STAGES:
        stage = definition.name
        print(f"[{stage}]", flush=True)
        start = time.perf_counter()
        # Same concurrency as the Prefect flow's task runner: runtime.workers threads.
        options = {"map_jobs": train_in_threads(params.runtime.workers)} if stage == "train" else {}
        results[stage] = definition.function(params, ws, log, **options)
        timings[stage] = time.perf_counter() - start
        memory[stage] = peak_rss_mb()
    metrics = ws.metrics()
    metrics.update({f"baseline_{k}": v for k, v in json.loads(ws.baselines_report.read_text()).items()})
    sizes = json.loads(ws.cluster_report.read_text())["sizes"]
    return {
        "source": source,
        "subset": subset,
        "counts": summary["counts"],
        "params": raw,
        "seconds": timings,
        "seconds_total": sum(timings.values()),
        "stage_breakdown": {
            k: v
            for stage in ("evaluate", "baselines")
            for k, v in results[stage]["metrics"].items()
            if k.endswith("_seconds")
        },
        "peak_rss_mb": memory,
        "cluster_sizes": sizes,
        "accuracy": {
            "clustered_prompts": metrics["accuracy"],
            "single_prompt": metrics.get("baseline_single_prompt_accuracy"),
            "linear_probe": metrics.get("baseline_linear_probe_accuracy"),
        },
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(result: dict) -> str:
    acc = result["accuracy"]
    sizes = sorted(s for s in result["cluster_sizes"] if s)
    lines = [
        f"### {result['source']}" + (f" (subset {result['subset']})" if result["subset"] else ""),
        "",
        f"{result['counts']['public']} public / {result['counts']['private']} private / {result['counts']['test']} test; "
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}, {result['date']}.",
        "",
        "| stage | wall-clock (s) | peak RSS so far (MB) |",
        "|---|---:|---:|",
        *[f"| {stage} | {sec:.1f} | {result['peak_rss_mb'][stage]:.0f} |" for stage, sec in result["seconds"].items()],
        f"| **total** | **{result['seconds_total']:.1f}** | |",
        "",
        f"Clusters: {len(result['cluster_sizes'])} ({len(result['cluster_sizes']) - len(sizes)} empty); sizes min {sizes[0]}, "
        f"median {sizes[len(sizes) // 2]}, max {sizes[-1]}.",
        "",
        "| model | test accuracy |",
        "|---|---:|",
        f"| clustered prompts (LMEraser) | {acc['clustered_prompts']:.4f} |",
        f"| single prompt + head on all private data | {acc['single_prompt']:.4f} |",
        f"| linear probe on frozen features | {acc['linear_probe']:.4f} |",
        "",
    ]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    stages = list(result["seconds"])
    axes[0].barh(stages, [result["seconds"][s] for s in stages], color="#4c72b0")
    axes[0].set_xlabel("seconds")
    axes[0].set_title("wall-clock per stage")
    axes[0].invert_yaxis()
    axes[1].bar(range(len(result["cluster_sizes"])), result["cluster_sizes"], color="#55a868")
    axes[1].set_xlabel("cluster")
    axes[1].set_ylabel("private samples")
    axes[1].set_title("cluster sizes")
    names = ["clustered\nprompts", "single\nprompt", "linear\nprobe"]
    values = [result["accuracy"][k] for k in ("clustered_prompts", "single_prompt", "linear_probe")]
    axes[2].bar(names, values, color=["#c44e52", "#8172b2", "#937860"])
    axes[2].set_ylim(min(values) - 0.05, 1.0)
    for i, v in enumerate(values):
        axes[2].text(i, v + 0.003, f"{v:.3f}", ha="center")
    axes[2].set_title("test accuracy")
    fig.suptitle(f"lmeraser pipeline: {result['source']} ({result['machine']['cores']} CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--subset", type=int, default=None, help="cap the training pool (public + private)")
    parser.add_argument("--keep-workspace", action="store_true", help="keep bench/results/work-<source>")
    args = parser.parse_args()
    result = run(args.source, args.subset)
    out = ROOT / "bench" / "results"
    stem = f"pipeline-{args.source}" + (f"-{args.subset}" if args.subset else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    figure(result, out / f"{stem}.png")
    if not args.keep_workspace:
        shutil.rmtree(out / f"work-{args.source}", ignore_errors=True)
    print(markdown(result))
    print(f"saved {out / stem}.json, .md, .png")


if __name__ == "__main__":
    main()
