"""Where computation runs (lmeraser/compute.py): the device is validated, refused in one sentence
where the machine lacks it, recorded and keyed; bf16 autocast is deterministic and keyed; the
random draws are the same on every device; the deterministic block fixes CUDA's flags too."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmeraser import numerics
from lmeraser.compute import Compute, seeded_uniform_
from lmeraser.config import PromptParams, parse_params
from lmeraser.config import deep_merge as merge
from lmeraser.determinism import deterministic
from lmeraser.errors import ConfigError
from lmeraser.feature_cache import read_all as read_feature_cache
from lmeraser.fingerprint import fingerprint
from lmeraser.fingerprint import identity as fingerprint_identity
from lmeraser.inference import ServingModel
from lmeraser.io import read_json
from lmeraser.models.backbone import extract_features, image_features, load_backbone, preprocess
from lmeraser.stages import stage
from lmeraser.training import train_prompt
from lmeraser.workspace import Workspace

from helpers import TINY, build_workspace, run_stages, tiny_backbone, tiny_data

NO_CUDA = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA; this one has a GPU"
)


def test_the_device_and_precision_are_validated_where_they_are_written():
    for device in ("cpu", "cuda", "cuda:1"):
        assert parse_params({"runtime": {"device": device}}).runtime.device == device
    for device in ("gpu", "cuda:x", "CUDA", "mps", "cuda:"):
        with pytest.raises(ConfigError, match="runtime.device"):
            parse_params({"runtime": {"device": device}})
    assert parse_params({"runtime": {"precision": "bf16"}}).runtime.precision == "bf16"
    with pytest.raises(ConfigError, match="runtime.precision"):
        parse_params({"runtime": {"precision": "fp16"}})


@NO_CUDA
def test_cuda_on_a_machine_without_one_is_one_sentence_and_the_backbone_stage_writes_nothing(tmp_path):
    config = merge(TINY, {"runtime": {"device": "cuda"}})
    ws = build_workspace(tmp_path / "ws", config)
    params = parse_params(config)
    run_stages(params, ws, ("validate",))
    with pytest.raises(
        ConfigError,
        match=r"^runtime\.device is cuda, but torch sees no CUDA device on this machine .*set runtime\.device: cpu",
    ) as refused:
        stage("backbone").function(params, ws, lambda message: None)
    assert "\n" not in str(refused.value)
    assert not ws.backbone_weights.exists() and not ws.backbone_meta_file.exists()


@NO_CUDA
def test_a_workspace_made_on_a_gpu_is_refused_in_one_sentence_where_there_is_none(trained_workspace, tmp_path):
    """Serving, the feature passes and replay of a GPU-made workspace need its device: a CPU
    machine says so instead of computing other bits."""
    source, _ = trained_workspace
    ws = Workspace(tmp_path / "copy")
    shutil.copytree(source.root, ws.root)
    meta = read_json(ws.backbone_meta_file)
    ws.backbone_meta_file.write_text(json.dumps({**meta, "device": "cuda:0"}))
    for load in (lambda: load_backbone(ws), lambda: ServingModel.load(ws)):
        with pytest.raises(
            ConfigError,
            match=(
                r"backbone\.json: the backbone's device is cuda:0, but torch sees no CUDA device "
                r".*run it on a machine with that device"
            ),
        ):
            load()


def test_a_workspace_records_its_compute_and_keys_its_artifacts_by_it(trained_workspace):
    ws, _ = trained_workspace
    meta = read_json(ws.backbone_meta_file)
    # The numerics the workspace asks for (portable, the default), the pins in effect and this
    # machine's numeric fingerprint are part of the compute's identity.
    identity = {
        "device": "cpu",
        "precision": "float32",
        "numerics": "portable",
        "pins": numerics.PINS,
        "fingerprint": fingerprint()["sha256"],
    }
    assert meta["device"] == "cpu" and meta["precision"] == "float32" and meta["origin"]["compute"] == identity
    assert meta["numerics"] == "portable" and meta["fingerprint"] == identity["fingerprint"]
    assert read_json(ws.prompt_index_file)["key_inputs"]["compute"] == identity
    assert read_feature_cache(ws)[0]["compute"] == identity
    assert ws.prototypes_meta()["faiss"] == "cpu"  # faiss-cpu here: no GPU build, no GPU


def test_bf16_is_deterministic_changes_the_bits_and_stays_close():
    backbone, (x, y) = tiny_backbone(), tiny_data(48)
    f32, bf16 = Compute(threads=1), Compute(threads=1, precision="bf16")
    with deterministic(1):
        full = extract_features(backbone, x, compute=f32)
        half = [extract_features(backbone, x, compute=bf16) for _ in range(2)]
    assert half[0].dtype == np.float32 and half[0].tobytes() == half[1].tobytes()
    assert half[0].tobytes() != full.tobytes()
    cosine = (half[0] * full).sum(1) / (np.linalg.norm(half[0], axis=1) * np.linalg.norm(full, axis=1))
    assert cosine.min() > 0.98, cosine.min()
    prompt = PromptParams.of("pad", width=1, epochs=2, batch_size=8, lr=0.05)
    trained = [train_prompt(backbone, x, y, prompt, 4, 7, bf16) for _ in range(2)]
    assert all(torch.equal(trained[0][k], trained[1][k]) and trained[0][k].dtype == torch.float32 for k in trained[0])
    assert not torch.equal(trained[0]["pad.prompt"], train_prompt(backbone, x, y, prompt, 4, 7, f32)["pad.prompt"])


def test_a_bf16_workspace_computes_every_pass_in_bf16(tmp_path, trained_workspace):
    """The precision is recorded with the backbone and every later pass reads it from there."""
    float32, _ = trained_workspace
    config = merge(TINY, {"runtime": {"precision": "bf16"}, "evaluate": {"baselines": False}})
    ws = build_workspace(tmp_path / "ws", config)
    run_stages(parse_params(config), ws, ("validate", "backbone", "prototypes", "assign", "train", "evaluate"))
    meta = ws.backbone_meta()
    assert meta.precision == "bf16" and Compute.of(meta).precision == "bf16"
    assert read_json(ws.prompt_index_file)["key_inputs"]["compute"]["precision"] == "bf16"
    backbone, _ = load_backbone(ws)
    private = ws.split("private")
    identity, contents, cached = read_feature_cache(ws)
    assert identity["compute"]["precision"] == "bf16"
    assert cached.tobytes() == image_features(backbone, meta, private.images).tobytes()
    with deterministic(1):
        assert (
            cached.tobytes() != extract_features(backbone, preprocess(private.images, meta.input)).tobytes()
        )  # float32 differs
    # The tiny pipeline's float32 accuracy (0.23 on digits, a 3-epoch backbone) within a few points.
    assert abs(ws.metrics()["accuracy"] - float32.metrics()["accuracy"]) < 0.05


def test_seeded_draws_are_the_cpu_generators_whatever_the_tensor():
    """Initial prompts draw on the CPU and copy to the device: on the CPU that is exactly the
    in-place draw (so moving the draw changed no CPU bits), and every device gets those values."""
    first, second = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    filled = torch.empty(5, 7)
    seeded_uniform_(filled, 0.5, first)
    assert torch.equal(filled, torch.empty(5, 7).uniform_(-0.5, 0.5, generator=second))
    as_double = torch.empty(5, 7, dtype=torch.float64)
    seeded_uniform_(as_double, 0.5, torch.Generator().manual_seed(3))
    assert as_double.dtype == torch.float64 and as_double.abs().max() <= 0.5


def test_the_deterministic_block_fixes_cudas_flags_and_restores_them():
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with deterministic(1):
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        (
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = saved


def test_a_cuda_block_leaves_attention_to_its_plain_kernel_and_a_cpu_block_keeps_the_fused_one():
    """The fused attention kernels' backward is not deterministic on CUDA; the CPU honours the
    same switches, so a CPU block must not flip them (it would change the CPU's bits)."""
    cuda = torch.backends.cuda
    fused = lambda: (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled())  # noqa: E731
    before = fused()
    assert any(before)
    with deterministic(1):
        assert fused() == before
    with deterministic(1, cuda=True):
        assert fused() == (False, False, False) and cuda.math_sdp_enabled()
    assert fused() == before


def test_the_cpu_is_never_a_faiss_gpu_and_has_no_cuda_identity():
    cpu = Compute("cpu", 2, "bf16")
    identity = fingerprint_identity(cpu)
    assert cpu.faiss_gpu is None and cpu.check() is cpu
    assert identity == {
        "device": "cpu",
        "precision": "bf16",
        "numerics": numerics.state().mode,
        "pins": numerics.pins_in_effect(),
        "fingerprint": fingerprint()["sha256"],
    }


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta parameters take no values
@pytest.mark.parametrize("kind", ["pad", "vpt", "lora"])
def test_every_pass_keeps_its_tensors_on_the_compute_device(kind):
    """The GPU path's commonest bug, a host tensor meeting a device tensor, found without a GPU:
    torch's meta device holds shapes and no data, so each pass runs on it to its first copy back
    to host memory (which meta cannot do) and any tensor left on the CPU stops it sooner, with
    another error."""
    from lmeraser.config import BackboneParams
    from lmeraser.models.backbone import train_backbone
    from lmeraser.training import load_prompt
    from lmeraser.unlearning.influence import Objective, prepare_model

    meta = Compute("meta", 1)
    prompt = {
        "pad": PromptParams.of("pad", width=1, epochs=1, batch_size=8, lr=0.05),
        "vpt": PromptParams.of("vpt", deep=True, epochs=1, batch_size=8, lr=0.05),
        "lora": PromptParams.of("lora", rank=2, epochs=1, batch_size=8, lr=0.01),
    }[kind]
    x, y = tiny_data(20)
    state = train_prompt(tiny_backbone(), x, y, prompt, 4, 3)
    on_meta = tiny_backbone(device="meta")
    no_host_copy = pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor")
    with no_host_copy:  # the whole training loop ran on the device
        train_prompt(on_meta, x, y, prompt, 4, 3, meta)
    with no_host_copy:
        extract_features(on_meta, x, 16, meta)
    with torch.no_grad():
        assert load_prompt(on_meta, prompt, 4, state)(meta.put(x)).device.type == "meta"
    objective = Objective(prepare_model(on_meta, prompt, 4, state, torch.float64), 1e-4)
    xs, ys, theta = x.to("meta", torch.float64), y.to("meta"), objective.theta0
    assert theta.device.type == "meta"
    for result in (
        objective.per_example_grads(theta, xs[:3], ys[:3]),
        objective.gauss_newton(theta, xs)(theta),
        objective.hvp(theta, xs, ys)(theta),
    ):
        assert result.device.type == "meta" and result.shape[-1] == theta.numel()
    if (
        kind == "pad"
    ):  # the backbone's own training: one step's forward, backward and update, then the first loss read back
        images = np.random.default_rng(0).integers(0, 256, (32, 8, 8), dtype=np.uint8)
        params = BackboneParams(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, epochs=1, batch_size=16)
        with pytest.raises(RuntimeError, match="item\\(\\) cannot be called on meta tensors"):
            train_backbone(params, images, np.arange(32) % 4, 4, 0, lambda message: None, compute=meta)
