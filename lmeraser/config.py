"""Typed, validated configuration read from params.yaml.

`params.yaml` is the single source of truth: DVC tracks its sections as stage params, and
every stage reads it through `load_params`, so a typo or an out-of-range value stops the run
with one sentence naming the key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from lmeraser.errors import ConfigError, LmeraserError, shown

# Numbers as written, never coerced: an integer key refuses `true`, `2.5` and "3"; a real-valued key
# takes an integer or a float but refuses a bool, a string and anything not finite (`.inf`, `1e400`).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: str = "digits"
    # Fraction of the training pool that is public (trains the backbone and the prototypes);
    # the rest is private (clustered, prompt-tuned, erasable).
    public_fraction: Float = Field(0.5, gt=0.0, lt=1.0)
    # Only used when the source ships no test split (digits): carved out before the pool split.
    test_fraction: Float = Field(0.2, gt=0.0, lt=1.0)
    n_subjects: Int = Field(100, ge=1)
    # Cap on the training pool (stratified, seeded); null = everything.
    subset: Int | None = Field(None, ge=10)
    # Resize every image to image_size x image_size at ingestion (Pillow, bilinear); null = keep
    # the source's size (a folder of differently sized images needs it).
    image_size: Int | None = Field(None, ge=4, le=1024)
    # Samples per shard of a split's files (data/<split>/<shard>/): an erasure rewrites, re-hashes
    # and re-scans the shards that held the sample, not the split. Fixed when the data is written.
    shard_size: Int = Field(512, ge=1, le=10_000_000)


# The built-in small ViT's architecture (what the digits and Fashion-MNIST demos train from
# scratch); a timm model named by `backbone.model` has its own and takes none of these.
BUILTIN_ARCHITECTURE = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}


class BackboneParams(_Section):
    # A timm ViT-family architecture (e.g. vit_tiny_patch16_224, vit_base_patch16_224,
    # deit_small_patch16_224), built with pretrained=False: its weights come from `checkpoint` or
    # from training. null: the built-in small ViT described by patch_size..mlp_ratio.
    model: str | None = Field(None, min_length=1, max_length=200)
    checkpoint: str | None = None  # a local weights file (safetensors, or torch read weights-only)
    # scratch: train on the public split from random weights; finetune: load `checkpoint`, then
    # train on the public split; frozen: use `checkpoint` as is (LMEraser's setting).
    train: Literal["scratch", "finetune", "frozen"] = "scratch"
    img_size: Int = Field(16, ge=4, le=1024)
    patch_size: Int | None = Field(None, ge=1)
    embed_dim: Int | None = Field(None, ge=8)
    depth: Int | None = Field(None, ge=1, le=48)
    num_heads: Int | None = Field(None, ge=1)
    mlp_ratio: Float | None = Field(None, gt=0.0)
    epochs: Int = Field(100, ge=0)  # scratch and finetune
    batch_size: Int = Field(64, ge=1)  # training, and every whole-split pass over the backbone
    lr: Float = Field(2e-3, gt=0.0)
    weight_decay: Float = Field(0.05, ge=0.0)
    # Torch threads for training the backbone and for every whole-split pass over it (features,
    # evaluation, membership inference). Recorded in backbone.json: it changes the float order.
    threads: Int = Field(2, ge=1, le=256)

    @model_validator(mode="before")
    @classmethod
    def _builtin_defaults(cls, raw):
        if isinstance(raw, dict) and raw.get("model") is None:
            raw = {**raw, **{key: value for key, value in BUILTIN_ARCHITECTURE.items() if raw.get(key) is None}}
        return raw

    @model_validator(mode="after")
    def _shapes(self) -> BackboneParams:
        if self.model is not None:
            given = [key for key in BUILTIN_ARCHITECTURE if getattr(self, key) is not None]
            if given:
                raise ValueError(
                    f"backbone.{given[0]} describes the built-in ViT; "
                    f"backbone.model {self.model} has its own architecture: remove it"
                )
        else:
            if self.img_size % self.patch_size:
                raise ValueError(
                    f"backbone.img_size ({self.img_size}) must be a multiple of backbone.patch_size ({self.patch_size})"
                )
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"backbone.embed_dim ({self.embed_dim}) must be a multiple of backbone.num_heads ({self.num_heads})"
                )
        if self.train == "scratch" and self.checkpoint:
            raise ValueError(
                "backbone.checkpoint is set but backbone.train is scratch; "
                "set train to frozen (use it as is) or finetune"
            )
        if self.train != "scratch" and not self.checkpoint:
            raise ValueError(
                f"backbone.train {self.train} needs backbone.checkpoint (a local weights file); nothing is downloaded"
            )
        return self


class ClusteringParams(_Section):
    # K = clamp(round(n_private / target_cluster_size), min_clusters, max_clusters).
    target_cluster_size: Int = Field(60, ge=1)
    min_clusters: Int = Field(2, ge=1)
    max_clusters: Int = Field(64, ge=1)
    niter: Int = Field(25, ge=1)
    # "public" keeps invariant 1 (a deletion never moves a prototype); "private" is allowed but
    # then every deletion rebuilds every cluster.
    fit_on: Literal["public", "private"] = "public"

    @model_validator(mode="after")
    def _bounds(self) -> ClusteringParams:
        if self.min_clusters > self.max_clusters:
            raise ValueError(
                f"clustering.min_clusters ({self.min_clusters}) must not exceed clustering.max_clusters "
                f"({self.max_clusters})"
            )
        return self


class _AdapterParams(_Section):
    """What every PEFT kind trains with; each kind has its own values, since what works differs."""

    epochs: Int = Field(30, ge=1)
    batch_size: Int = Field(32, ge=1)
    lr: Float = Field(0.02, gt=0.0)
    weight_decay: Float = Field(1e-4, ge=0.0)


class PadParams(_AdapterParams):
    """A learnable pixel border added to the image (visual prompting, as in LMEraser)."""

    width: Int = Field(2, ge=1)


class VptParams(_AdapterParams):
    """Learnable tokens after the class token (Visual Prompt Tuning), shallow or deep."""

    num_tokens: Int = Field(4, ge=1)
    deep: Bool = False


class LoraParams(_AdapterParams):
    """LoRA adapters (through `peft`) on the frozen backbone's linear layers named by `targets`."""

    rank: Int = Field(4, ge=1)
    alpha: Float = Field(8.0, gt=0.0)
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    # At 0.02 LoRA on digits was seed-sensitive (0.958-0.986 test accuracy over five seeds).
    lr: Float = Field(0.005, gt=0.0)


AdapterParams = PadParams | VptParams | LoraParams


class PromptParams(_Section):
    """The per-cluster PEFT module: `kind` chooses one section; only that one matters."""

    kind: Literal["pad", "vpt", "lora"] = "pad"
    pad: PadParams = PadParams()
    vpt: VptParams = VptParams()
    lora: LoraParams = LoraParams()

    @property
    def adapter(self) -> AdapterParams:
        """The chosen kind's settings."""
        return {"pad": self.pad, "vpt": self.vpt, "lora": self.lora}[self.kind]

    def identity(self) -> dict:
        """The chosen kind and its settings, nothing else: what an artifact key depends on."""
        return {"kind": self.kind, self.kind: self.adapter.model_dump(mode="json")}

    @classmethod
    def from_identity(cls, identity: dict) -> PromptParams:
        kind = identity["kind"]
        return cls(kind=kind, **{kind: identity[kind]})

    @classmethod
    def of(cls, kind: str, **settings) -> PromptParams:
        """A prompt section using `kind` with `settings` over that kind's defaults."""
        return cls(kind=kind, **{kind: settings})


class InfluenceParams(_Section):
    """Influence-function unlearning of a cluster's PEFT parameters (lmeraser/unlearning/influence.py)."""

    # gauss_newton: J^T H_out J, positive semi-definite, its Jacobian formed once per request;
    # exact: the true Hessian, matrix-free (forward-over-reverse), may be indefinite.
    hessian: Literal["gauss_newton", "exact"] = "gauss_newton"
    damping: Float | None = Field(None, ge=0.0)  # None: chosen from power iterations
    damping_ratio: Float = Field(1e-3, ge=0.0)  # lambda = ratio * lambda_max (+ |lambda_min| if negative)
    power_iterations: Int = Field(8, ge=1)
    cg_tol: Float = Field(1e-6, gt=0.0)  # stop on ||r|| / ||b||
    cg_max_iter: Int = Field(200, ge=1)
    newton_steps: Int = Field(0, ge=0, le=3)  # damped Newton refinement on the edited objective
    # float32 answers about twice as fast; float64 for small parameter sets and tight tolerances.
    dtype: Literal["float32", "float64"] = "float32"
    hessian_samples: Int = Field(128, ge=1)  # fixed Hessian sample (first of a seeded permutation)
    # Torch threads for the update (a latency path; the result is deterministic for a fixed count,
    # which the record states).
    threads: Int = Field(2, ge=1, le=256)


class EvaluateParams(_Section):
    baselines: Bool = True
    batch_size: Int = Field(256, ge=1)


class RuntimeParams(_Section):
    # Intra-op threads per training: part of every artifact key, because it changes the bits.
    threads: Int = Field(1, ge=1, le=256)
    # Clusters trained concurrently (Prefect mapped tasks): threads, or Dask worker processes.
    workers: Int = Field(2, ge=1, le=256)
    # threads: clusters train in threads of the stage's process. dask: through prefect-dask's
    # DaskTaskRunner, on a local cluster of `workers` processes or on the cluster at
    # `dask_address`; workers read the backbone and their members from the workspace (a
    # filesystem every worker shares).
    executor: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(None, min_length=1, max_length=500)  # e.g. tcp://scheduler:8786
    # Where every pass over the backbone runs (lmeraser/compute.py): cpu, cuda or cuda:N. Fixed
    # when the backbone stage runs and recorded with it; part of every artifact key and record.
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$")
    # bf16: the backbone's passes under bf16 autocast (big backbones); parameters stay float32.
    precision: Literal["float32", "bf16"] = "float32"
    # portable: every library pinned to the kernels all x86-64 CPUs share, so every machine
    # computes the same bits; native: each CPU's fastest kernels (lmeraser/numerics.py).
    numerics: Literal["portable", "native"] = "portable"
    # After an erasure's record is signed, what `lmeraser forget/rectify/unlearn` does with the
    # MLflow runs of the rebuilt stages and the served model's registration (the tracking
    # backlog): background hands them to a `lmeraser track` process of its own and returns; wait
    # tracks them before returning. Neither touches the record; the backlog survives a kill.
    tracking: Literal["background", "wait"] = "background"

    @model_validator(mode="after")
    def _dask(self) -> RuntimeParams:
        if self.dask_address and self.executor != "dask":
            raise ValueError(
                "runtime.dask_address is set but runtime.executor is threads; "
                "set executor to dask or remove the address"
            )
        return self


class RequestsParams(_Section):
    # GDPR Art. 12(3): answer a request "without undue delay and in any event within one month of
    # receipt"; `lmeraser requests` flags requests due within `warn_days` and overdue ones.
    deadline_months: Int = Field(1, ge=1, le=3)
    warn_days: Int = Field(7, ge=0, le=90)


class ServiceParams(_Section):
    # `lmeraser serve`: its worker starts an exact batch once the oldest pending request has waited
    # `batch_window_s` (so requests arriving together share one rebuild) or `max_batch` are pending;
    # a batch takes at most `max_batch` requests, the rest wait for the next.
    batch_window_s: Float = Field(10.0, ge=0, le=86400)
    max_batch: Int = Field(100, ge=1, le=100_000)
    # The largest request body accepted (a corrected image upload included), in MiB.
    max_body_mib: Int = Field(16, ge=1, le=1024)
    # A batch's scan reads only files new or changed since the scan index read them; the worker
    # also reads every file again (`lmeraser audit scan --full`) when it is idle and the last full
    # scan is this old, in seconds. 0: never (run `audit scan --full` yourself).
    full_scan_every_s: Float = Field(86400.0, ge=0, le=366 * 86400)


class AuditParams(_Section):
    """The per-request forgetting audit (lmeraser/audit/forgetting.py, docs/forgetting.md): reference
    prompts trained WITH and WITHOUT the forgotten samples score how detectable each sample is in
    the served model before and after its request."""

    # Fresh reference prompt+head pairs per side (IN: with the batch's samples, OUT: without) per
    # affected cluster per batch; the pre-forget exact prompt and the rebuilt one are reused on top.
    # 0 turns the audit off (records then say "no reference audit").
    references: Int = Field(4, ge=0, le=64)
    # Audited samples per request at most, drawn deterministically from its samples.
    max_samples_per_request: Int = Field(16, ge=1, le=10_000)
    # Family-wise level per batch: a score is "detectable" when its p-value under the OUT fit is at
    # most alpha / (samples audited in the batch) (Bonferroni), so a correct exact batch of m
    # samples fails the audit by chance at most alpha of the time.
    alpha: Float = Field(0.01, gt=0.0, lt=0.5)
    # Audit influence updates too. Their references train on the whole cluster and add to the
    # answer's latency (seconds on digits, a minute or more on clusters of ~500: docs/benchmarks.md);
    # false keeps the influence answer fast, and the exact batch that follows is audited either way.
    influence: Bool = True


class Params(_Section):
    seed: Int = Field(0, ge=0, lt=2**31)
    data: DataParams = DataParams()
    backbone: BackboneParams = BackboneParams()
    clustering: ClusteringParams = ClusteringParams()
    prompt: PromptParams = PromptParams()
    influence: InfluenceParams = InfluenceParams()
    evaluate: EvaluateParams = EvaluateParams()
    runtime: RuntimeParams = RuntimeParams()
    requests: RequestsParams = RequestsParams()
    service: ServiceParams = ServiceParams()
    audit: AuditParams = AuditParams()


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = shown(".".join(str(part) for part in first["loc"]) or "(top level)")
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'."
    if first["type"] == "model_type":  # pydantic names the class here; a user wrote a section
        return (
            f"{source}: key '{key}' should be a section of settings (a mapping), got {shown(repr(first.get('input')))}."
        )
    if "input" in first and first["type"] != "value_error":
        return f"{source}: key '{key}' {message.lower()} (got {shown(repr(first['input']))})."
    return f"{source}: {message.removeprefix('Value error, ')}."


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: no anchors or aliases (a few lines of them expand to
    billions of nodes), no key given twice (the second would silently win), and `1e-3` read as the
    number it is (YAML 1.2; PyYAML's 1.1 rules make it a string)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                f"line {event.start_mark.line + 1}: YAML anchors and aliases (&, *) are not allowed; "
                "write every value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _Refused(f"line {key_node.start_mark.line + 1}: key {shown(repr(key))} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


class _Refused(Exception):
    """A params file construct we refuse; the message is the sentence's tail."""


def _safe_params(text: str):
    """The YAML document in `text`, through _ParamsLoader (a SafeLoader: no Python objects)."""
    loader = _ParamsLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


_parsed: dict[str, tuple[bytes, Params]] = {}  # path -> (digest of its text, its params): the latest only
parses = 0  # params files parsed in this process (a command parses its file once: tests count it)


def load_params(path: str | Path = "params.yaml") -> Params:
    """The checked params of `path`. A file is parsed once per content in a process: the library
    functions a command calls each take the same frozen `Params` without parsing it again."""
    global parses
    from lmeraser.io import read_input_text

    path = Path(path)
    try:
        if not path.exists():
            raise ConfigError(f"{shown(path, 200)}: file not found; run from the repository root or pass --params.")
        text = read_input_text(path, "params file", 1 << 20)
        where, digest = str(path.resolve()), hashlib.sha256(text.encode()).digest()
        if where in _parsed and _parsed[where][0] == digest:
            return _parsed[where][1]
        raw = _safe_params(text)
    except LmeraserError as error:
        raise ConfigError(str(error)) from None
    except _Refused as error:
        raise ConfigError(f"{path}: {error}.") from None
    except (yaml.YAMLError, RecursionError) as error:
        raise ConfigError(f"{path}: not valid YAML ({error.__class__.__name__}).") from None
    except OSError as error:  # a name too long, a /proc file that refuses reads, ...
        raise ConfigError(
            f"{shown(path, 200)}: the params file cannot be read ({error.strerror or error.__class__.__name__})."
        ) from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections.")
    params = parse_params(raw, str(path))
    parses += 1
    _parsed[where] = (digest, params)
    return params


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` laid over it, section by section (for per-source presets)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out
