"""A timm ViT on RGB images against the built-in grey ViT, on the same images.

    python bench/backbones.py [--pool 3000] [--test 1000] [--img-size 32] [--dask]
        [--device cuda] [--precision bf16] [--base [--base-img-size 224]]

There is no real RGB data set on these machines, so the RGB data is **3-channel Fashion-MNIST**:
a stratified pool of Fashion-MNIST training images and the first test images, each grey image
repeated over three channels, saved as an npz (`npz:` source). The grey configuration reads the
same images as they are. Both train their backbone from scratch on the public half (no pretrained
weights can be downloaded here):

  grey-builtin   the demo's built-in ViT (configs/fashion-mnist.yaml's backbone), grey 28x28
  rgb-vit-tiny   timm's vit_tiny_patch16_224 architecture at --img-size, RGB

For each, in a scratch git + DVC workspace (bench/results/work-backbones-NAME): every stage in
this process through the registry, each timed and then recorded in dvc.lock (`dvc commit`, as the
rebuild does), the per-cluster training times, one exact forget end to end in this process (the
library's submit + process_pending: capture .. record), one influence update (pad prompt), peak
RSS after each step, and the test accuracy of the clustered prompts against the single-prompt and
linear-probe baselines. Saves bench/results/backbones.json and .md.

`--dask` also retrains every cluster of each configuration twice after the pipeline, on the thread
runner and on a local Dask cluster of `runtime.workers` processes (prefect-dask, through the
`train-clusters` flow against a standing Prefect server, the cluster's start included), into
empty stores, and checks the two give byte-identical artifacts. `--device`/`--precision` set `runtime.device`/`runtime.precision` for
every configuration (an accelerator run). `--base` adds timm's `vit_base_patch16_224` at
`--base-img-size` with **random weights** (a seeded, untrained checkpoint used frozen: no
pretrained weights can be downloaded here), the issue's accelerator setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from helpers import random_timm_checkpoint  # noqa: E402
from pipeline import cpu_model, preset  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fashion_npz(pool: int, test: int) -> tuple[Path, Path]:
    """The same images as grey (N, 28, 28) and as 3-channel RGB (N, 28, 28, 3) npz files."""
    from lmeraser.data.sources import load_fashion_mnist

    raw = load_fashion_mnist()
    rng = np.random.default_rng(0)
    keep = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(raw.train_labels == c))[: pool // 10] for c in range(10)])
    )
    x, y = raw.train_images[keep], raw.train_labels[keep]
    xt, yt = raw.test_images[:test], raw.test_labels[:test]
    RESULTS.mkdir(parents=True, exist_ok=True)
    grey, rgb = RESULTS / "fashion-grey.npz", RESULTS / "fashion-rgb.npz"
    np.savez(grey, x_train=x, y_train=y, x_test=xt, y_test=yt)
    np.savez(
        rgb,
        x_train=np.repeat(x[..., None], 3, axis=3),
        y_train=y,
        x_test=np.repeat(xt[..., None], 3, axis=3),
        y_test=yt,
    )
    return grey, rgb


def configurations(grey: Path, rgb: Path, img_size: int, base_img_size: int | None, runtime: dict) -> dict[str, dict]:
    base = preset("fashion-mnist")
    base["runtime"].update(runtime)
    base["data"].update({"n_subjects": 300})
    base["clustering"].update({"target_cluster_size": 150})
    base["prompt"]["pad"].update({"epochs": 5})
    base["evaluate"].update({"batch_size": 128})
    grey_cfg = json.loads(json.dumps(base))
    grey_cfg["data"]["source"] = f"npz:{grey}"
    grey_cfg["backbone"]["epochs"] = 10
    tiny = json.loads(json.dumps(base))
    tiny["data"]["source"] = f"npz:{rgb}"
    tiny["backbone"] = {
        **{k: None for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "checkpoint")},
        **{k: base["backbone"][k] for k in ("batch_size", "lr", "weight_decay", "threads")},
        "model": "vit_tiny_patch16_224",
        "train": "scratch",
        "img_size": img_size,
        "epochs": 10,
    }
    tiny["prompt"]["pad"]["width"] = max(2, img_size // 16)
    out = {"grey-builtin": grey_cfg, "rgb-vit-tiny": tiny}
    if base_img_size:
        vit_base = json.loads(json.dumps(tiny))
        weights = random_timm_checkpoint(RESULTS / "vit_base_random.safetensors", "vit_base_patch16_224")
        vit_base["backbone"].update(
            {"model": "vit_base_patch16_224", "checkpoint": str(weights), "train": "frozen", "img_size": base_img_size}
        )
        vit_base["prompt"]["pad"]["width"] = max(2, round(30 * base_img_size / 224))  # the paper's 30 px at 224
        out["rgb-vit-base-random"] = vit_base
    return out


def threads_against_dask(ws, params) -> dict:
    """Every cluster retrained on the thread runner and on a local Dask cluster, into empty stores;
    wall-clock of each and whether the artifacts are byte-identical. Dask runs against a standing
    Prefect server, as in production: without one, every Dask worker process starts its own
    temporary server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from unlearn import prefect_server

    server, url = prefect_server(RESULTS / "prefect-home-backbones")
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # the Dask workers inherit it
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            return _threads_against_dask(ws, params)
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL")
        else:
            os.environ["PREFECT_API_URL"] = saved
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(RESULTS / "prefect-home-backbones", ignore_errors=True)


def _threads_against_dask(ws, params) -> dict:
    from unlearn import retrain_alone

    from lmeraser.flows.common import map_jobs_for
    from lmeraser.pipeline.train import plan

    threads_seconds, threads = retrain_alone(ws.root)
    training = plan(params, ws)
    # Dask workers load the plan from the workspace and write to its store: train into an empty
    # one, then put the pipeline's back.
    kept = ws.store_dir.with_name("store.kept")
    ws.store_dir.rename(kept)
    try:
        ws.store_dir.mkdir()
        on_dask = map_jobs_for(
            params.model_copy(update={"runtime": params.runtime.model_copy(update={"executor": "dask"})}),
            str(ws.root),
            "params.yaml",
        )
        start = time.perf_counter()
        dask = {r["cluster"]: r["entry"].sha256 for r in on_dask(training.trainer, training.jobs)}
        dask_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(ws.store_dir, ignore_errors=True)
        kept.rename(ws.store_dir)
    # What part of that is the local cluster itself: start and stop one with nothing to do.
    from distributed import LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=params.runtime.workers, threads_per_worker=1, processes=True, dashboard_address=None):
        pass
    return {
        "threads_seconds": threads_seconds,
        "dask_seconds": dask_seconds,
        "dask_cluster_alone_seconds": time.perf_counter() - start,
        "clusters": len(threads),
        "byte_identical": threads == dask,
    }


def run_one(name: str, raw: dict, dask: bool = False) -> dict:
    from lmeraser.config import load_params
    from lmeraser.pipeline.train import train_in_threads
    from lmeraser.request import RequestSpec
    from lmeraser.stages import STAGES
    from lmeraser.unlearning.exact import process_pending
    from lmeraser.unlearning.influence_update import influence_pending
    from lmeraser.unlearning.intake import submit
    from lmeraser.unlearning.rebuild import record_stage
    from lmeraser.workspace import Workspace

    from helpers import copy_repo

    work = RESULTS / f"work-backbones-{name}"
    shutil.rmtree(work, ignore_errors=True)
    root = copy_repo(work, raw)
    ws = Workspace(root)
    params = load_params(ws.params_file)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(BIN / "lmeraser"), "data", "init"], cwd=root, env=env, check=True, capture_output=True)
    seconds, memory, cluster_seconds = {}, {}, []
    for definition in STAGES:
        print(f"[{name}: {definition.name}]", flush=True)
        options = {}
        if definition.name == "train":
            threads = train_in_threads(params.runtime.workers)

            def timed_jobs(trainer, jobs, threads=threads):
                results = threads(trainer, jobs)
                cluster_seconds.extend(r["seconds"] for r in results)
                return results

            options = {"map_jobs": timed_jobs}
        start = time.perf_counter()
        definition.function(params, ws, lambda message: None, **options)
        seconds[definition.name] = time.perf_counter() - start
        memory[definition.name] = peak_mb()
        record_stage(ws, definition.name)
    metrics, baselines = ws.metrics(), json.loads(ws.baselines_report.read_text())
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "pipeline"]):
        subprocess.run(
            cmd,
            cwd=root,
            check=True,
            env={
                **env,
                "GIT_AUTHOR_NAME": "b",
                "GIT_AUTHOR_EMAIL": "b@b",
                "GIT_COMMITTER_NAME": "b",
                "GIT_COMMITTER_EMAIL": "b@b",
            },
        )

    private = ws.split("private").sample_ids
    print(f"[{name}: one exact forget]", flush=True)
    start = time.perf_counter()
    submit([RequestSpec(sample_ids=[private[0]])], ws)
    done = process_pending(ws, lambda message: None, git_commit=True)
    forget_seconds = time.perf_counter() - start
    memory["forget"] = peak_mb()
    print(f"[{name}: one influence update]", flush=True)
    start = time.perf_counter()
    submit([RequestSpec(sample_ids=[private[1]])], ws, method="influence")
    influence_pending(ws, lambda message: None)
    influence_seconds = time.perf_counter() - start
    memory["influence"] = peak_mb()
    executors = None
    if dask:
        print(f"[{name}: every cluster on threads, then on Dask]", flush=True)
        executors = threads_against_dask(ws, load_params(ws.params_file))
    info = ws.source_info()
    return {
        "name": name,
        "image_shape": info["image_shape"],
        "counts": info["counts"],
        "backbone": raw["backbone"],
        "seconds": seconds,
        "peak_rss_mb": memory,
        "clusters": len(cluster_seconds),
        "cluster_train_seconds": {"median": float(np.median(cluster_seconds)), "max": float(np.max(cluster_seconds))},
        "forget_seconds": forget_seconds,
        "forget_steps": json.loads(
            subprocess.run(
                [str(BIN / "lmeraser"), "audit", "show", "1"], cwd=root, env=env, capture_output=True, text=True
            ).stdout
        )["predicate"]["seconds"],
        "forget_rebuilt": done["rebuilt"],
        "influence_seconds": influence_seconds,
        "executors": executors,
        "accuracy": {
            "clustered_prompts": metrics["accuracy"],
            "single_prompt": baselines.get("single_prompt_accuracy"),
            "linear_probe": baselines.get("linear_probe_accuracy"),
        },
    }


def markdown(result: dict) -> str:
    runs = result["runs"]
    names = list(runs)
    head = "| | " + " | ".join(f"`{n}`" for n in names) + " |"
    lines = [
        "### Backbones: a timm ViT on RGB images vs the built-in grey ViT",
        "",
        f"{result['data']}; {result['machine']['cpu']}, {result['machine']['cores']} cores"
        + (f", {result['machine']['gpu']}" if result["machine"].get("gpu") else ", no GPU")
        + f"; runtime.device {result['runtime']['device']}, precision {result['runtime']['precision']}; torch {result['machine']['torch']}, {result['date']}. "
        "Backbones trained from scratch on the public half (no pretrained weights here)"
        + (
            ", except `rgb-vit-base-random`: a seeded, untrained checkpoint used frozen"
            if "rgb-vit-base-random" in runs
            else ""
        )
        + "; one process, library calls.",
        "",
        head,
        "|---|" + "---:|" * len(names),
        "| backbone | "
        + " | ".join(
            f"{r['backbone'].get('model') or 'built-in'} @ {r['backbone']['img_size']} px" for r in runs.values()
        )
        + " |",
        "| images | " + " | ".join("×".join(map(str, r["image_shape"])) for r in runs.values()) + " |",
        *[
            f"| stage `{s}` (s) | " + " | ".join(f"{r['seconds'][s]:.1f}" for r in runs.values()) + " |"
            for s in runs[names[0]]["seconds"]
        ],
        "| clusters | " + " | ".join(str(r["clusters"]) for r in runs.values()) + " |",
        "| per-cluster training, median / max (s) | "
        + " | ".join(
            f"{r['cluster_train_seconds']['median']:.2f} / {r['cluster_train_seconds']['max']:.2f}"
            for r in runs.values()
        )
        + " |",
        "| one exact forget, end to end in process (s) | "
        + " | ".join(f"{r['forget_seconds']:.1f}" for r in runs.values())
        + " |",
        "| one influence update (pad), submit to signed record (s) | "
        + " | ".join(f"{r['influence_seconds']:.2f}" for r in runs.values())
        + " |",
        "| peak RSS (MB) | " + " | ".join(f"{max(r['peak_rss_mb'].values()):.0f}" for r in runs.values()) + " |",
        *(
            [
                "| every cluster retrained: thread runner (s) | "
                + " | ".join(f"{r['executors']['threads_seconds']:.1f}" for r in runs.values())
                + " |",
                "| every cluster retrained: local Dask cluster, its start included, standing Prefect server (s) | "
                + " | ".join(f"{r['executors']['dask_seconds']:.1f}" for r in runs.values())
                + " |",
                "| starting and stopping that Dask cluster alone (s) | "
                + " | ".join(f"{r['executors']['dask_cluster_alone_seconds']:.1f}" for r in runs.values())
                + " |",
                "| Dask artifacts byte-identical to threads | "
                + " | ".join("yes" if r["executors"]["byte_identical"] else "**no**" for r in runs.values())
                + " |",
            ]
            if all(r.get("executors") for r in runs.values())
            else []
        ),
        "| test accuracy: clustered prompts | "
        + " | ".join(f"{r['accuracy']['clustered_prompts']:.4f}" for r in runs.values())
        + " |",
        "| test accuracy: single prompt (baseline) | "
        + " | ".join(f"{r['accuracy']['single_prompt']:.4f}" for r in runs.values())
        + " |",
        "| test accuracy: linear probe (baseline) | "
        + " | ".join(f"{r['accuracy']['linear_probe']:.4f}" for r in runs.values())
        + " |",
        "",
        "Forget steps (s): "
        + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["forget_steps"].items()) for n, r in runs.items())
        + ".",
        *(
            []
            if result["machine"].get("gpu")
            else ["Not measured on this machine (no GPU): the GPU path, and `vit_base_patch16_224` at 224×224 on it."]
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pool", type=int, default=3000, help="Fashion-MNIST training images (half public, half private)"
    )
    parser.add_argument("--test", type=int, default=1000, help="Fashion-MNIST test images")
    parser.add_argument("--img-size", type=int, default=32, help="the timm ViT's input size (a multiple of 16)")
    parser.add_argument(
        "--dask", action="store_true", help="also retrain every cluster on threads and on a local Dask cluster"
    )
    parser.add_argument("--device", default="cpu", help="runtime.device for every configuration (cpu, cuda, cuda:N)")
    parser.add_argument(
        "--precision", default="float32", choices=("float32", "bf16"), help="runtime.precision for every configuration"
    )
    parser.add_argument(
        "--base", action="store_true", help="add vit_base_patch16_224 (random weights, frozen) at --base-img-size"
    )
    parser.add_argument("--base-img-size", type=int, default=224)
    parser.add_argument("--keep-workspace", action="store_true")
    args = parser.parse_args()
    import torch

    for name, value in (
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("DO_NOT_TRACK", "1"),
        ("GX_ANALYTICS_ENABLED", "false"),
    ):
        os.environ.setdefault(name, value)  # as the CLI does: no telemetry attempts (no network here)

    runtime = {"device": args.device, "precision": args.precision}
    grey, rgb = fashion_npz(args.pool, args.test)
    configs = configurations(grey, rgb, args.img_size, args.base_img_size if args.base else None, runtime)
    runs = {name: run_one(name, raw, args.dask) for name, raw in configs.items()}
    gpu = torch.cuda.get_device_name(torch.device(args.device).index or 0) if args.device.startswith("cuda") else None
    result = {
        "data": f"Fashion-MNIST, {args.pool} training images (stratified) and the first {args.test} test images; RGB = each grey image repeated over 3 channels",
        "runs": runs,
        "runtime": runtime,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "gpu": gpu},
        "date": time.strftime("%Y-%m-%d"),
    }
    (RESULTS / "backbones.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "backbones.md").write_text(markdown(result))
    if not args.keep_workspace:
        for name in runs:
            shutil.rmtree(RESULTS / f"work-backbones-{name}", ignore_errors=True)
        grey.unlink(), rgb.unlink()
        (RESULTS / "vit_base_random.safetensors").unlink(missing_ok=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
