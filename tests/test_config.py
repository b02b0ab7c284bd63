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
    assert (
        fashion.data.source == "fashion-mnist" and fashion.backbone.img_size == 28 and fashion.prompt.pad.epochs == 10
    )
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
        ({"runtime": {"tracking": "later"}}, "runtime.tracking"),
        (
            {"backbone": {"model": "vit_tiny_patch16_224", "embed_dim": 64}},
            "backbone.embed_dim describes the built-in ViT",
        ),
        ({"backbone": {"checkpoint": "w.safetensors"}}, "backbone.checkpoint is set but backbone.train is scratch"),
        ({"backbone": {"train": "frozen"}}, "backbone.train frozen needs backbone.checkpoint"),
        ({"backbone": {"train": "finetune"}}, "backbone.train finetune needs backbone.checkpoint"),
        ({"data": {"image_size": 2}}, "data.image_size"),
        # Strict numbers (issue 21): no bool for an int, no float for an int, nothing infinite.
        ({"backbone": {"epochs": True}}, "backbone.epochs"),
        ({"seed": 1.0}, "seed"),
        ({"backbone": {"lr": float("inf")}}, "backbone.lr"),
        ({"prompt": {"pad": {"lr": float("nan")}}}, "prompt.pad.lr"),
        ({"influence": {"damping": True}}, "influence.damping"),
        ({"prompt": {"pad": {"lr": "0.1"}}}, "prompt.pad.lr"),
        ({"evaluate": {"baselines": 1}}, "evaluate.baselines"),
        ({"audit": {"influence": "yes"}}, "audit.influence"),
        # A section left empty or given a scalar: the user's words, not pydantic's class name.
        ({"audit": None}, "key 'audit' should be a section of settings (a mapping), got None"),
        ({"runtime": 3}, "key 'runtime' should be a section of settings (a mapping), got 3"),
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
    named = parse_params(
        {
            "backbone": {
                "model": "vit_tiny_patch16_224",
                "checkpoint": "w.safetensors",
                "train": "frozen",
                "img_size": 32,
            }
        }
    )
    assert named.backbone.patch_size is None and named.backbone.embed_dim is None
    built_in = parse_params({"backbone": {"img_size": 8, "patch_size": 4}})
    assert (
        built_in.backbone.model is None and built_in.backbone.embed_dim == 64 and built_in.backbone.train == "scratch"
    )
    # The spelled-out preset form (every key, null where a timm model fixes it) is the same params.
    spelled = parse_params(
        {
            "backbone": {
                "model": "vit_tiny_patch16_224",
                "checkpoint": "w.safetensors",
                "train": "frozen",
                "img_size": 32,
                "patch_size": None,
            }
        }
    )
    assert spelled == named


def test_yaml_numbers_read_as_written_and_nothing_else(tmp_path):
    """`1e-3` is a number (YAML 1.2; PyYAML alone reads it as a string), `1e400` is infinite and
    refused, an integer is a valid real; aliases and repeated keys are refused in one sentence."""
    path = tmp_path / "params.yaml"
    path.write_text("backbone:\n  lr: 1e-3\n  weight_decay: 0\nprompt:\n  pad:\n    lr: 2E-2\n")
    params = load_params(path)
    assert params.backbone.lr == 0.001 and params.prompt.pad.lr == 0.02 and params.backbone.weight_decay == 0.0
    for text, needle in [
        ("backbone:\n  lr: 1e400\n", "key 'backbone.lr' input should be a finite number (got inf)"),
        ("backbone:\n  lr: .inf\n", "backbone.lr"),
        ("backbone:\n  epochs: true\n", "key 'backbone.epochs' input should be a valid integer (got True)"),
        ("seed: 1\nseed: 2\n", "line 2: key 'seed' is given twice"),
        ("seed: &s 3\nbackbone:\n  epochs: *s\n", "line 1: YAML anchors and aliases (&, *) are not allowed"),
        ("backbone: &b {epochs: 3}\n", "anchors and aliases"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as refused:
            load_params(path)
        assert needle in str(refused.value) and str(refused.value).startswith(str(path)), refused.value
