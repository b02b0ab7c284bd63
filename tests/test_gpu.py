"""The CUDA path (issue 12): determinism on the GPU, agreement with the CPU, and the whole product
end to end on `runtime.device: cuda`. Every test here needs a CUDA device and is skipped, with the
reason, where there is none (CI has none): a skip is never counted as a pass."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lmeraser.compute import Compute
from lmeraser.config import PromptParams
from lmeraser.determinism import deterministic
from lmeraser.fingerprint import fingerprint
from lmeraser.fingerprint import identity as fingerprint_identity
from lmeraser.models.backbone import extract_features
from lmeraser.training import load_prompt, train_prompt
from lmeraser.unlearning.influence import influence_edit, prepare_model
from lmeraser.workspace import Workspace

from helpers import cli_ok, dvc, tiny_backbone, tiny_data

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none (CI never has one)"
)

CUDA = Compute("cuda", 1)
PROMPTS = {
    "pad": PromptParams.of("pad", width=1, epochs=3, batch_size=8, lr=0.05),
    "vpt": PromptParams.of("vpt", deep=True, epochs=3, batch_size=8, lr=0.05),
    "lora": PromptParams.of("lora", rank=2, epochs=3, batch_size=8, lr=0.01),
}


def test_the_numeric_fingerprint_on_cuda_is_the_same_twice_and_names_the_device():
    """Issue 20: two computations of the fingerprint on the same GPU agree (replay on that GPU
    can compare bits); the compute's identity names the device, so replay elsewhere cannot."""
    fingerprint.cache_clear()
    first = fingerprint("cuda")
    fingerprint.cache_clear()
    second = fingerprint("cuda")
    assert first == second, {f for f in first["families"] if first["families"][f] != second["families"][f]}
    identity = fingerprint_identity(CUDA)
    assert identity["fingerprint"] == first["sha256"] and identity["device_name"] == torch.cuda.get_device_name(0)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_prompt_training_on_cuda_is_bit_for_bit_reproducible(kind, precision):
    compute = Compute("cuda", 1, precision).check()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"]  # set before cuBLAS starts
    backbone, (x, y) = tiny_backbone(2, "cuda"), tiny_data(40)
    runs = [train_prompt(backbone, x, y, PROMPTS[kind], 4, 7, compute) for _ in range(2)]
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert runs[0][name].device.type == "cpu" and torch.equal(runs[0][name], runs[1][name]), name
    # The same draws start it as on the CPU: trained there, it fits its data about as well.
    on_cpu = train_prompt(tiny_backbone(2), x, y, PROMPTS[kind], 4, 7, Compute("cpu", 1, precision))
    gpu_model = load_prompt(backbone, PROMPTS[kind], 4, runs[0])
    cpu_model = load_prompt(tiny_backbone(2), PROMPTS[kind], 4, on_cpu)
    with torch.no_grad():
        gpu_fit = float((gpu_model(x.cuda()).argmax(1).cpu() == y).float().mean())
        cpu_fit = float((cpu_model(x).argmax(1) == y).float().mean())
    assert abs(gpu_fit - cpu_fit) <= 0.15, (gpu_fit, cpu_fit)


def test_features_on_cuda_are_deterministic_batch_independent_and_close_to_the_cpu():
    backbone, (x, _) = tiny_backbone(2, "cuda"), tiny_data(40)
    CUDA.check()
    with deterministic(1, cuda=True):
        full = extract_features(backbone, x, 16, CUDA)
        assert extract_features(backbone, x, 16, CUDA).tobytes() == full.tobytes()
        # What the feature cache and a sample's assignment rely on: at one batch size, a row's
        # bits do not depend on the rows batched with it (a short batch is padded to one shape).
        assert extract_features(backbone, x[3:], 16, CUDA).tobytes() == full[3:].tobytes()
        assert extract_features(backbone, x.flip(0), 16, CUDA).tobytes() == full[::-1].tobytes()
        on_cpu = extract_features(tiny_backbone(2), x)
    assert np.allclose(full, on_cpu, atol=1e-4), np.abs(full - on_cpu).max()


def test_an_influence_update_on_cuda_is_deterministic_and_agrees_with_the_cpu():
    from lmeraser.config import InfluenceParams

    x, y = tiny_data(40)
    prompt = PROMPTS["pad"]
    state = train_prompt(tiny_backbone(2), x, y, prompt, 4, 3)
    present = torch.ones(len(y), dtype=torch.bool)
    present[0] = False
    params = InfluenceParams(dtype="float64")
    CUDA.check()

    def edit(device: str) -> dict:
        model = prepare_model(tiny_backbone(2, device), prompt, 4, state, torch.float64)
        theta, objective, report = influence_edit(
            model, x, y, x, y, present, params, prompt.adapter.weight_decay, seed=5, threads=1
        )
        return objective.state(theta)

    first, second, on_cpu = edit("cuda"), edit("cuda"), edit("cpu")
    for name in first:
        assert first[name].device.type == "cpu" and torch.equal(first[name], second[name]), name
        assert torch.allclose(first[name], on_cpu[name], rtol=1e-4, atol=1e-6), name


def test_a_cuda_workspace_runs_end_to_end_and_replays_bit_for_bit(tmp_path):
    """The issue's e2e (a timm checkpoint, an RGB folder) on runtime.device: cuda."""
    from test_large_models import build_rgb_repo

    root, _ = build_rgb_repo(tmp_path, device="cuda")
    ws = Workspace(root)
    name = torch.cuda.get_device_name(0)
    assert json.loads(ws.backbone_meta_file.read_text())["device"] == "cuda"
    key_inputs = json.loads(ws.prompt_index_file.read_text())["key_inputs"]
    assert key_inputs["compute"]["device"] == "cuda" and key_inputs["compute"]["device_name"] == name
    assert json.loads((root / "metrics.json").read_text())["accuracy"] > 0.6
    import faiss

    faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    assert ws.prototypes_meta()["faiss"] == ("gpu" if faiss_gpu else "cpu")  # faiss-gpu when installed
    # A second repro from scratch on the same GPU gives the same prompts, bit for bit.
    index = json.loads(ws.prompt_index_file.read_text())["clusters"]
    dvc("repro", "--force", "evaluate", cwd=root)
    assert json.loads(ws.prompt_index_file.read_text())["clusters"] == index

    victim = ws.split("private").sample_ids[0]
    assert "lineage record 1" in cli_ok("forget", "--sample-id", victim, cwd=root).stdout
    cli_ok("audit", "verify", cwd=root)
    record = json.loads(cli_ok("audit", "show", "1", cwd=root).stdout)
    environment = record["predicate"]["environment"]
    assert (
        environment["device"] == "cuda" and environment["device_name"] == name and environment["precision"] == "float32"
    )
    replay = json.loads(cli_ok("audit", "replay", "--record", "1", "--json", cwd=root).stdout)
    # Same machine, same versions: no difference to excuse, so a match is equal bytes.
    assert replay["ok"] and not replay["environment_differences"] and replay["matched"] == replay["replayed"] > 0, (
        replay
    )
