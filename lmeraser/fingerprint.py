"""The numeric fingerprint: the sha256 of a fixed small computation that runs every kernel family
the pipeline uses, with the product's own functions, on fixed data.

Two processes with equal fingerprints compute the same bits on the pipeline's work (the claim
`lmeraser audit replay` relies on); different fingerprints mean another CPU's kernels, other
numerics (lmeraser/numerics.py), other library versions or another device. Each family has its
own digest, so when a machine's fingerprint differs from the committed reference
(tests/data/numerics-fingerprint.json) the test names the kernels that differ.

Families: a timm ViT's forward (patch-embedding convolution, matmul, softmax, layer norm, GELU,
fused attention) and its features, its backward and one AdamW step, one step of each PEFT kind
(a pad border, prompt tokens, LoRA as peft computes it), faiss k-means and search, and the influence
path's forward-over-reverse Hessian-vector product and vmapped Jacobian (torch.func). Everything
runs with one intra-op thread under the deterministic scope, in float32, on the workspace's
device (faiss on the CPU); under a second on a 2-core CPU once the libraries are loaded, and
computed once per process.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from lmeraser import numerics
from lmeraser.compute import Compute, seeded_uniform_

FORMAT = 2  # bumped when the computation changes (the reference must then be made again)
_SEED = 20261204


@functools.cache
def fingerprint(device: str = "cpu") -> dict:
    """{"sha256": the whole computation's digest, "families": {family: digest}} on `device`,
    under the numerics this process runs."""
    compute = Compute(device=device, threads=1)
    families = {name: _digest(outputs) for name, outputs in _families(compute)}
    whole = hashlib.sha256(f"format {FORMAT}\n".encode())
    for name, digest in families.items():
        whole.update(f"{name} {digest}\n".encode())
    return {"format": FORMAT, "sha256": whole.hexdigest(), "families": families}


def identity(compute: Compute) -> dict:
    """What of the computation's place changes its bits (artifact keys, records, caches): the
    device, the precision, the numerics asked for, the pins in effect and the numeric
    fingerprint this process computes."""
    compute.require_numerics()
    out = {
        "device": compute.device,
        "precision": compute.precision,
        "numerics": compute.numerics or numerics.state().mode,
        "pins": numerics.pins_in_effect(),
        "fingerprint": fingerprint(compute.device)["sha256"],
    }
    if compute.is_cuda:
        out.update(
            device_name=torch.cuda.get_device_name(compute.cuda_index),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return out


def software() -> dict[str, str]:
    """The versions of Python and of every library whose kernels the fingerprint runs."""
    import platform
    from importlib.metadata import version

    import faiss

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": version("timm"),
        "peft": version("peft"),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


def _digest(outputs: list) -> str:
    digest = hashlib.sha256()
    for value in outputs:
        array = (
            value.detach().cpu().contiguous().numpy()
            if isinstance(value, torch.Tensor)
            else np.ascontiguousarray(value)
        )
        digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
    return digest.hexdigest()[:16]


def _families(compute):
    """(family, outputs) in a fixed order. Only library kernels (torch, timm, faiss; LoRA as peft runs it) and
    the compute scope: the pipeline's own code has its own version in every artifact key, so a
    change to it re-keys artifacts without changing what this says about the machine."""
    import faiss
    from timm.models.vision_transformer import VisionTransformer

    generator = torch.Generator().manual_seed(_SEED)
    classes = 10
    model = VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=classes, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0
    )
    for parameter in model.parameters():
        seeded_uniform_(parameter.data, 0.3, generator)
    x = torch.rand((16, 1, 16, 16), generator=generator) * 2 - 1
    y = torch.arange(16) % classes
    with compute.scope():
        model = model.to(compute.torch_device)
        x, y = compute.put(x), compute.put(y)
        model.eval()
        with torch.no_grad():
            yield "vit_forward", [model(x), model.forward_head(model.forward_features(x), pre_logits=True)]
        model.train()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        yield "vit_backward", [loss, *(p.grad for p in model.parameters())]
        compute.adamw(model.parameters(), lr=1e-3, weight_decay=0.05).step()
        yield "adamw_step", list(model.parameters())
        model.eval().requires_grad_(False)
        for kind in ("pad", "vpt", "lora"):
            trainable, forward = _peft(kind, model, generator, compute)
            optimizer = compute.adamw(trainable, lr=0.02, weight_decay=1e-4)
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            yield f"peft_{kind}_step", [loss, *trainable]
    points = torch.randn((300, 20), generator=generator).numpy()
    faiss.omp_set_num_threads(1)
    kmeans = faiss.Kmeans(20, 4, niter=5, seed=3, verbose=False, min_points_per_centroid=1)
    kmeans.train(points)
    index = faiss.IndexFlatL2(20)
    index.add(kmeans.centroids)
    distances, nearest = index.search(points, 2)
    yield "faiss_kmeans_search", [kmeans.centroids, distances, nearest]
    with compute.scope():
        yield "influence_hvp", _curvature_products(model, x, y, generator, compute)


def _peft(kind: str, backbone, generator: torch.Generator, compute):
    """One PEFT module of `kind` and a head on the frozen backbone, as lmeraser/models/peft
    builds them: (trainable parameters, forward)."""
    head = torch.nn.Linear(backbone.embed_dim, 10)
    for parameter in head.parameters():  # from the generator: never the global RNG
        seeded_uniform_(parameter.data, 0.2, generator)
    head = head.to(compute.torch_device)
    if kind == "pad":  # a learnable pixel border added to the image
        prompt = torch.nn.Parameter(compute.put(torch.randn((1, 1, 16, 16), generator=generator) * 0.1))
        mask = compute.put(torch.ones((1, 1, 16, 16)))
        mask[..., 2:-2, 2:-2] = 0
        return [prompt, *head.parameters()], lambda x: head(
            backbone.forward_head(backbone.forward_features(x + prompt * mask), pre_logits=True)
        )
    if kind == "vpt":  # learnable tokens after the class token
        tokens = torch.nn.Parameter(compute.put(torch.randn((1, 2, backbone.embed_dim), generator=generator) * 0.1))

        def forward(x):
            seq = backbone._pos_embed(backbone.patch_embed(x))
            seq = torch.cat([seq[:, :1], tokens.expand(len(x), -1, -1), seq[:, 1:]], dim=1)
            return head(backbone.norm(backbone.blocks(seq))[:, 0])

        return [tokens, *head.parameters()], forward
    adapted = with_lora(backbone)
    lora = [p for name, p in adapted.named_parameters() if "lora_" in name]
    for parameter in lora:
        seeded_uniform_(parameter.data, 0.2, generator)
        parameter.requires_grad_(True)
    return [*lora, *head.parameters()], lambda x: head(
        adapted.forward_head(adapted.forward_features(x), pre_logits=True)
    )


LORA_TARGETS, LORA_RANK, LORA_ALPHA = ("blocks.0.attn.qkv", "blocks.1.mlp.fc1"), 2, 4.0


class LoraLinear(torch.nn.Module):
    """What peft's LoRA `Linear` computes with dropout 0 and one adapter, `base(x) + B(A(x)) * alpha / r`,
    op for op, written here so that a process that never trains LoRA never imports peft (1.5 to
    3 s of every stage's and every CLI command's start-up). tests/test_numerics.py checks it against
    peft's own layer, bit for bit, so a peft whose LoRA computes otherwise is caught there."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def with_lora(backbone: torch.nn.Module) -> torch.nn.Module:
    """A copy of `backbone` with a `LoraLinear` around each of `LORA_TARGETS` (what peft's
    `inject_adapter_in_model` makes of them)."""
    adapted = copy.deepcopy(backbone)
    for name in LORA_TARGETS:
        parent, _, leaf = name.rpartition(".")
        module = adapted.get_submodule(parent)
        setattr(module, leaf, LoraLinear(getattr(module, leaf), LORA_RANK, LORA_ALPHA))
    return adapted


def _curvature_products(backbone, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, compute) -> list:
    """The influence path's kernels (lmeraser/unlearning/influence.py): a forward-over-reverse
    Hessian-vector product and a vmapped per-sample Jacobian of a head's loss on an
    unfused-attention copy of the backbone (forward-mode AD needs the unfused path)."""
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    backbone = copy.deepcopy(backbone).eval()
    for module in backbone.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    theta = {
        name: p.detach() for name, p in backbone.named_parameters() if name.startswith(("head.", "blocks.1.mlp.fc2."))
    }
    direction = {name: compute.put(torch.randn(p.shape, generator=generator)) for name, p in theta.items()}

    def loss(params):
        return F.cross_entropy(functional_call(backbone, params, (x,)), y)

    with warnings.catch_warnings():  # torch's forward-mode decompositions load through a deprecated torch.jit.script
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        hvp = jvp(grad(loss), (theta,), (direction,))[1]
    jacobian = vmap(jacrev(lambda params, xi: functional_call(backbone, params, (xi[None],))[0]), in_dims=(None, 0))(
        theta, x
    )
    return [*(hvp[name] for name in sorted(hvp)), *(jacobian[name] for name in sorted(jacobian))]
