"""A user with a timm ViT weights file and a folder of RGB images runs the whole product: data
init, the pipeline, a forget and an RGB rectification, audit verify/replay/scan (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lmeraser.workspace import Workspace

from helpers import copy_repo, dvc, random_timm_checkpoint, repro_in_process, warm_ok

CLASSES = ("red", "green", "blue")


def _image_folder(root: Path, per_class: int = 36, size: int = 16) -> Path:
    """RGB PNGs whose dominant channel is the class, with noise; subjects.csv names an owner."""
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            image[..., label] += rng.integers(120, 166, dtype=np.uint8)
            Image.fromarray(image, "RGB").save(root / name / f"{i:03d}.png")
            rows.append({"file": f"{name}/{i:03d}.png", "subject_id": f"person-{i % 15}"})
    pd.DataFrame(rows).to_csv(root / "subjects.csv", index=False)
    return root


def build_rgb_repo(base: Path, **runtime) -> tuple[Path, Path]:
    """A git + DVC copy of this repository on a generated RGB image folder and a timm `test_vit`
    weights file (the architecture at its 160 px, used frozen at 32 px), after `data init` and
    `dvc repro evaluate` (the serving path; the baselines are off) as the product's rebuild runs it
    in process (helpers.repro_in_process: the same stage functions, dvc.lock recorded through
    DVC's API; the stage processes of `dvc repro` itself are the TINY template's subject);
    `runtime` overrides settings of the runtime section. Returns the root and the weights file."""
    folder = _image_folder(base / "images")
    weights = random_timm_checkpoint(base / "test_vit.safetensors")
    params = {
        "seed": 0,
        "data": {"source": f"folder:{folder}", "public_fraction": 0.5, "test_fraction": 0.2, "n_subjects": 15},
        "backbone": {
            "model": "test_vit",
            "checkpoint": str(weights),
            "train": "frozen",
            "img_size": 32,
            "batch_size": 64,
            "threads": 1,
        },
        "clustering": {"target_cluster_size": 25, "min_clusters": 2, "max_clusters": 3, "niter": 10},
        "prompt": {"kind": "pad", "pad": {"width": 2, "epochs": 3, "batch_size": 16, "lr": 0.05}},
        "evaluate": {"baselines": False, "batch_size": 64},
        "runtime": {"threads": 1, "workers": 2, "tracking": "wait", **runtime},
    }
    root = copy_repo(base / "repo", params)
    warm_ok("data", "init", cwd=root)
    repro_in_process(root, "evaluate")
    return root, weights


@pytest.fixture(scope="module")
def rgb_repo(tmp_path_factory):
    return build_rgb_repo(tmp_path_factory.mktemp("rgb"))


def test_a_timm_checkpoint_and_an_rgb_folder_run_end_to_end(rgb_repo, tmp_path):
    root, weights = rgb_repo
    ws = Workspace(root)
    info = ws.source_info()
    assert info["image_shape"] == [16, 16, 3] and info["num_classes"] == 3
    backbone = json.loads(ws.backbone_meta_file.read_text())
    assert backbone["origin"]["architecture"] == "test_vit" and backbone["origin"]["train"] == "frozen"
    assert backbone["origin"]["adapted"] == {"classifier": "dropped (another class count)"}
    assert backbone["input"] == {"in_chans": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    # Used as is: the frozen backbone's blocks are the checkpoint's, resampled to 32 px.
    from safetensors.torch import load_file

    saved, given = load_file(str(ws.backbone_weights)), load_file(str(weights))
    assert torch.equal(saved["blocks.0.attn.qkv.weight"], given["blocks.0.attn.qkv.weight"])
    assert (
        saved["pos_embed"].shape[1] == 1 + (32 // 16) ** 2 and given["pos_embed"].shape[1] == 1 + (160 // 16) ** 2
    )  # test_vit is 160 px
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.6, metrics  # three colours, a frozen random ViT, pad prompts: well above chance

    # One batch: forget a sample and correct another's pixels with an RGB PNG.
    private = ws.split("private")
    gone, fixed = private.sample_ids[0], private.sample_ids[1]
    corrected = tmp_path / "fixed.png"
    Image.fromarray(255 - private.images[1], "RGB").save(corrected)
    warm_ok("forget", "--sample-id", gone, "--no-process", cwd=root)
    done = warm_ok("rectify", "--sample-id", fixed, "--input", str(corrected), cwd=root)  # one batch: both requests
    assert "lineage record 1" in done.stdout
    after = ws.split("private")
    assert gone not in after.sample_ids
    assert np.array_equal(after.images[after.sample_ids.index(fixed)], 255 - private.images[1])
    warm_ok("audit", "verify", cwd=root)
    replay = json.loads(warm_ok("audit", "replay", "--record", "1", "--json", cwd=root).stdout)
    assert replay["clusters"] and all(c["match"] for c in replay["clusters"]), replay
    from lmeraser.lineage.log import LineageLog

    environment = LineageLog(ws.lineage_file).read_unverified()[0].predicate["environment"]  # verified above
    assert (
        environment["device"] == "cpu" and environment["precision"] == "float32"
    )  # where it ran, in the signed record
    assert "0 hits" in warm_ok("audit", "scan", cwd=root).stdout
    status = dvc("status", "evaluate", cwd=root).stdout
    assert "up to date" in status, status
