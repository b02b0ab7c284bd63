from pathlib import Path

import pytest
import yaml

from lmeraser.config import Params, load_params, parse_params
from lmeraser.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "digits"
    assert params.clustering.fit_on == "public"


def test_params_yaml_spells_out_exactly_the_defaults():
    """One source of defaults: deleting a line of params.yaml must not change a value, and every
    key is spelled out (DVC tracks the file's values and dvc.yaml interpolates some of them)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw == Params().model_dump(mode="json")


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_is_valid_and_complete(preset):
    raw = yaml.safe_load((REPO / "configs" / preset).read_text())
    params = load_params(REPO / "configs" / preset)
    assert raw == params.model_dump(mode="json")  # complete, so `cp configs/X params.yaml && dvc repro` works
    assert params != Params()


def test_presets_carry_what_the_benchmarks_used_to_hard_code():
    fashion = load_params(REPO / "configs" / "fashion-mnist.yaml")
    assert fashion.data.source == "fashion-mnist" and fashion.backbone.img_size == 28 and fashion.prompt.pad.epochs == 10
    assert Params().prompt.lora.lr == 0.005  # LoRA's working learning rate is its own default now


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"prompt": {"pad": {"epochs": 0}}}, "prompt.pad.epochs"),
        ({"prompt": {"lora_rank": 4}}, "prompt.lora_rank"),
        ({"prompt": {"lora": {"rank": 0}}}, "prompt.lora.rank"),
        ({"data": {"public_fraction": 1.5}}, "data.public_fraction"),
        ({"backbone": {"depht": 3}}, "backbone.depht"),
        ({"prompt": {"kind": "adapter"}}, "prompt.kind"),
        ({"backbone": {"img_size": 10, "patch_size": 4}}, "backbone.img_size"),
        ({"clustering": {"min_clusters": 9, "max_clusters": 3}}, "clustering.min_clusters"),
        ({"runtime": {"threads": 0}}, "runtime.threads"),
        ({"backbone": {"model": "vit_tiny_patch16_224", "embed_dim": 64}}, "backbone.embed_dim describes the built-in ViT"),
        ({"backbone": {"checkpoint": "w.safetensors"}}, "backbone.checkpoint is set but backbone.train is scratch"),
        ({"backbone": {"train": "frozen"}}, "backbone.train frozen needs backbone.checkpoint"),
        ({"backbone": {"train": "finetune"}}, "backbone.train finetune needs backbone.checkpoint"),
        ({"data": {"image_size": 2}}, "data.image_size"),
    ],
)
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_a_timm_model_takes_none_of_the_built_in_architecture_keys():
    named = parse_params({"backbone": {"model": "vit_tiny_patch16_224", "checkpoint": "w.safetensors", "train": "frozen", "img_size": 32}})
    assert named.backbone.patch_size is None and named.backbone.embed_dim is None
    built_in = parse_params({"backbone": {"img_size": 8, "patch_size": 4}})
    assert built_in.backbone.model is None and built_in.backbone.embed_dim == 64 and built_in.backbone.train == "scratch"
    # The spelled-out preset form (every key, null where a timm model fixes it) is the same params.
    spelled = parse_params(
        {"backbone": {"model": "vit_tiny_patch16_224", "checkpoint": "w.safetensors", "train": "frozen", "img_size": 32, "patch_size": None}}
    )
    assert spelled == named
