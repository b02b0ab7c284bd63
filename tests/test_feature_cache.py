"""The private split's feature cache (lmeraser/feature_cache.py): assignments from it are
byte-identical to a pass from scratch, only new contents are featurised, erased contents leave
it, and `audit scan` finds what it holds."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
import torch

from lmeraser.audit.scan import scan
from lmeraser.config import load_params
from lmeraser.data.splits import content_hash, remove_samples, update_sample
from lmeraser.determinism import deterministic
from lmeraser.feature_cache import drop_contents, read, read_all, shard_file
from lmeraser.models.backbone import extract_features, image_features, load_backbone, preprocess
from lmeraser.pipeline import assign
from lmeraser.salt import Keyer
from lmeraser.workspace import Workspace


def test_a_rows_features_do_not_depend_on_its_batch(trained_workspace):
    """What makes a per-content cache exact: the same bits whatever else is in the batch."""
    ws = trained_workspace[0]
    backbone, meta = load_backbone(ws)
    images = ws.split("private").images
    with deterministic(meta.threads), torch.no_grad():
        x = preprocess(images, meta.input)
        full = extract_features(backbone, x)
        assert extract_features(backbone, x[3:]).tobytes() == full[3:].tobytes()
        assert extract_features(backbone, x.flip(0)).tobytes() == full[::-1].tobytes()
        assert extract_features(backbone, x[:5], batch_size=1).tobytes() == full[:5].tobytes()
    # Preprocessing a batch at a time (what the feature passes and cluster training do, so a
    # 224 px split is never held whole as floats) gives the same bits: it is per image.
    assert image_features(backbone, meta, images, batch_size=7).tobytes() == full.tobytes()
    assert torch.equal(preprocess(images[5:12], meta.input), x[5:12])


def _assign(ws: Workspace) -> tuple[bytes, int]:
    result = assign.run(load_params(ws.params_file), ws, lambda message: None)
    return ws.assignments_file.read_bytes(), result["features_computed"]


def test_assignments_from_the_cache_equal_a_pass_from_scratch(trained_workspace, tmp_path):
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    private = ws.split("private")
    assert read_all(ws)[1] == private.manifest["content_hash"].tolist()  # the stages wrote it
    assert _assign(ws)[1] == 0

    # A forget and an input correction: the removed and the replaced contents leave the cache,
    # only the new content is featurised, and the result equals a pass with no cache at all.
    gone, corrected = private.sample_ids[0], private.sample_ids[1]
    old_content = private.manifest["content_hash"][1]
    remove_samples([gone], "private", ws)
    update_sample(corrected, "private", ws, image=255 - private.images[1])
    cached, computed = _assign(ws)
    assert computed == 1
    contents = read_all(ws)[1]
    assert contents == ws.split("private").manifest["content_hash"].tolist() and old_content not in contents
    shutil.rmtree(ws.feature_cache_dir)
    scratch, computed = _assign(ws)
    assert computed == len(private) - 1 and scratch == cached

    # A cache for another backbone, or a damaged one, is ignored and rewritten.
    for path in ws.feature_cache_dir.iterdir():
        path.write_bytes(b"not a cache")
    assert _assign(ws) == (cached, len(private) - 1)
    meta = ws.backbone_meta_file.read_text()
    ws.backbone_meta_file.write_text(meta.replace('"threads": 1', '"threads": 2'))
    assert _assign(ws)[1] == len(private) - 1


def test_the_purge_drops_erased_contents_and_the_scan_finds_them_in_the_cache(trained_workspace, tmp_path):
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    images = ws.split("private").images
    erased = {Keyer(ws).content(content_hash(images[4]))}
    victim = ws.split("private").sample_ids[4]
    cache = shard_file(ws, ws.shard_dir_of("private", victim))
    # Take the sample out of data/ so that the cache is the only place left that knows it.
    remove_samples([victim], "private", ws)
    hits = scan(ws, erased, set()).hits
    assert [(h.kind, h.path) for h in hits] == [("forgotten sample", str(cache.resolve()))]
    # Renamed, it is still found (scan reads what a file holds, not its name).
    moved = ws.artifacts / "elsewhere.bin"
    shutil.copy2(cache, moved)
    assert len(scan(ws, erased, set()).hits) == 2
    moved.unlink()
    before = len(read(cache)[1])
    key = Keyer(ws).content
    assert drop_contents(ws, erased, key) == 1 and drop_contents(ws, erased, key) == 0
    assert len(read(cache)[1]) == before - 1
    assert scan(ws, erased, set()).hits == []
    assert not np.isin(content_hash(images[4]), read(cache)[1])


def test_the_scan_reads_the_cache_without_importing_torch(trained_workspace, tmp_path):
    """`audit scan` runs for an auditor on any machine: reading a feature cache must not pull in
    torch and timm (they cost seconds per scan)."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from lmeraser.audit.scan import _content_keys; "
        "from lmeraser.salt import Keyer; from lmeraser.workspace import Workspace; "
        "ws = Workspace(Path(sys.argv[1])); "
        "keys = set().union(*(_content_keys(p, Keyer(ws)) for p in ws.feature_cache_dir.iterdir())); "
        "print(len(keys), 'torch' in sys.modules)"
    )
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ws")], capture_output=True, text=True, check=True
    )
    count, torch_imported = done.stdout.split()
    assert int(count) == len(read_all(trained_workspace[0])[1]) > 0 and torch_imported == "False"


@pytest.fixture(scope="module")
def sharded_template(tmp_path_factory):
    """A TINY workspace whose private split has several shards, up to its assign stage."""
    from lmeraser.config import deep_merge, parse_params

    from helpers import TINY, build_workspace, run_stages

    config = deep_merge(TINY, {"data": {"shard_size": 40}, "evaluate": {"baselines": False}})
    ws = build_workspace(tmp_path_factory.mktemp("sharded") / "ws", config)
    run_stages(parse_params(config), ws, ("validate", "backbone", "prototypes", "assign"))
    return ws.root


@pytest.fixture
def sharded(sharded_template, tmp_path):
    shutil.copytree(sharded_template, tmp_path / "ws", symlinks=True)
    return Workspace(tmp_path / "ws")


def test_the_cache_follows_the_shards_an_erasure_rewrites_one_file_and_reads_one_shard(sharded, monkeypatch):
    """One cache file per shard of the private split: after an erasure, `assign` featurises
    nothing, reads the pixels of no shard, rewrites only the erased sample's cache file (the other
    files keep their identity, so the scan does not read them again), and its assignments equal a
    pass from scratch. Files of shards that are gone, and the one-file cache of before, are removed."""
    ws = sharded
    shards = ws.shard_dirs("private")
    files = {d.name: shard_file(ws, d) for d in shards}
    assert len(shards) > 2 and sorted(p.name for p in ws.feature_cache_dir.iterdir()) == sorted(
        p.name for p in files.values()
    )
    identity = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in files.items()}
    victim = ws.manifest("private")["sample_id"][5]
    home = ws.shard_dir_of("private", victim).name
    remove_samples([victim], "private", ws)
    ws.legacy_feature_cache_file.write_bytes(b"the cache of before")
    (ws.feature_cache_dir / "9999.safetensors").write_bytes(b"a shard that is gone")
    pixels_read = []
    shard_images = Workspace.shard_images
    monkeypatch.setattr(
        Workspace, "shard_images", lambda self, d, *a, **k: pixels_read.append(d) or shard_images(self, d, *a, **k)
    )
    cached, computed = _assign(ws)
    assert computed == 0 and pixels_read == []
    assert victim not in read(files[home])[1]
    changed = {name for name, p in files.items() if (p.stat().st_ino, p.stat().st_mtime_ns) != identity[name]}
    assert changed == {home}
    assert not ws.legacy_feature_cache_file.exists() and not (ws.feature_cache_dir / "9999.safetensors").exists()
    monkeypatch.setattr(Workspace, "shard_images", shard_images)
    shutil.rmtree(ws.feature_cache_dir)
    assert _assign(ws) == (cached, len(ws.manifest("private")))


# -- a stranger's attack on the sharded cache (each case was a bug) -----------------------------


def test_a_fifo_or_a_link_at_a_cache_path_is_never_read_and_is_replaced(sharded, tmp_path):
    """A FIFO at a cache path hung `assign` for good (the read blocked in open, SIGTERM did not
    end it); a link was read as the cache and replaced by the forget, leaving the erased rows in
    its target with the record saying nothing survives. Neither is read now: both are replaced
    by a regular file computed from the data."""
    ws = sharded
    first, second = ws.shard_dirs("private")[:2]
    fifo, link = shard_file(ws, first), shard_file(ws, second)
    outside = tmp_path / "outside.safetensors"
    shutil.copy2(link, outside)
    fifo.unlink()
    os.mkfifo(fifo)
    link.unlink()
    link.symlink_to(outside)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(read(fifo)), daemon=True)
    reader.start()
    reader.join(30)
    assert answer == [None], "reading a FIFO at a cache path blocked"
    assert read(link) is None  # never through a link
    _, computed = _assign(ws)
    assert computed == len(ws.shard_manifest(first)) + len(ws.shard_manifest(second))
    for path in (fifo, link):
        assert path.is_file() and not path.is_symlink() and read(path) is not None
    assert read(outside) is not None  # the link's target is not the product's: left as it was


def test_a_directory_at_a_cache_path_is_one_sentence(sharded):
    """A directory where a cache file belongs gave a traceback (and left a temporary file)."""
    from lmeraser.errors import LmeraserError

    ws = sharded
    path = shard_file(ws, ws.shard_dirs("private")[0])
    path.unlink()
    path.mkdir()
    with pytest.raises(LmeraserError, match="a directory where a feature-cache file belongs; remove it"):
        _assign(ws)
    assert not [p.name for p in ws.feature_cache_dir.iterdir() if p.name.endswith(".tmp")]
