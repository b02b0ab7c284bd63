from pathlib import Path

import pytest

from lmeraser.config import load_params, parse_params
from lmeraser.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "digits"
    assert params.clustering.fit_on == "public"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"prompt": {"epochs": 0}}, "prompt.epochs"),
        ({"data": {"public_fraction": 1.5}}, "data.public_fraction"),
        ({"backbone": {"depht": 3}}, "backbone.depht"),
        ({"prompt": {"kind": "adapter"}}, "prompt.kind"),
        ({"backbone": {"img_size": 10, "patch_size": 4}}, "backbone.img_size"),
        ({"clustering": {"min_clusters": 9, "max_clusters": 3}}, "clustering.min_clusters"),
        ({"runtime": {"threads": 0}}, "runtime.threads"),
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
