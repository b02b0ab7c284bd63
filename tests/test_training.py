import threading

import pytest
import torch

from lmeraser.config import BackboneParams, PromptParams
from lmeraser.errors import LmeraserError
from lmeraser.models.backbone import build_vit, freeze
from lmeraser.training import ArtifactStore, artifact_key, cluster_seed, members_digest, train_prompt

PROMPT = PromptParams(kind="pad", pad_width=1, epochs=3, batch_size=8, lr=0.05)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    backbone = freeze(build_vit(BackboneParams(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2), 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    return backbone, x, y


def _train_and_store(store, key, setup, params=PROMPT, seed=7, threads=1):
    backbone, x, y = setup
    state = train_prompt(backbone, x, y, params, 4, seed, threads)
    return store.save(key, state, {"cluster": 0, "seed": seed})


@pytest.mark.parametrize("kind", ["pad", "vpt"])
def test_training_twice_gives_byte_identical_artifacts(tmp_path, setup, kind):
    params = PROMPT.model_copy(update={"kind": kind, "deep": kind == "vpt"})
    a = _train_and_store(ArtifactStore(tmp_path / "a"), "k", setup, params)
    b = _train_and_store(ArtifactStore(tmp_path / "b"), "k", setup, params)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256


def test_training_actually_learns_and_depends_on_seed(setup):
    backbone, x, y = setup
    init = train_prompt(backbone, x, y, PROMPT.model_copy(update={"epochs": 1, "lr": 1e-9}), 4, 7)
    trained = train_prompt(backbone, x, y, PROMPT, 4, 7)
    other_seed = train_prompt(backbone, x, y, PROMPT, 4, 8)
    assert not torch.equal(init["pad.prompt"], trained["pad.prompt"])
    assert not torch.equal(trained["head.weight"], other_seed["head.weight"])


def test_concurrent_training_equals_sequential(tmp_path, setup):
    """Clusters train as concurrent Prefect tasks in threads; that must not change a single bit."""
    backbone, x, y = setup
    sequential = [train_prompt(backbone, x[i::2], y[i::2], PROMPT, 4, 100 + i) for i in range(2)]
    results = [None, None]

    def work(i):
        results[i] = train_prompt(backbone, x[i::2], y[i::2], PROMPT, 4, 100 + i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, conc in zip(sequential, results):
        assert all(torch.equal(seq[k], conc[k]) for k in seq)


def test_empty_cluster_is_refused(setup):
    backbone, x, y = setup
    with pytest.raises(LmeraserError, match="empty cluster"):
        train_prompt(backbone, x[:0], y[:0], PROMPT, 4, 7)


def test_key_covers_every_input():
    ids, hashes, labels = ["a", "b"], ["h1", "h2"], [0, 1]
    base = dict(members=members_digest(ids, hashes, labels), backbone_sha256="bb", prompt=PROMPT, num_classes=4, seed=1, threads=1)
    key = artifact_key(**base)
    assert artifact_key(**base) == key
    variants = [
        dict(members=members_digest(ids[:1], hashes[:1], labels[:1])),
        dict(members=members_digest(ids, hashes, [0, 2])),
        dict(members=members_digest(ids, ["h1", "hX"], labels)),
        dict(backbone_sha256="other"),
        dict(prompt=PROMPT.model_copy(update={"epochs": 4})),
        dict(seed=2),
        dict(threads=2),
        dict(extra={"prototypes": "p"}),
    ]
    assert len({artifact_key(**{**base, **v}) for v in variants} | {key}) == len(variants) + 1


def test_cluster_seed_is_stable_and_distinct():
    assert cluster_seed(0, 3) == cluster_seed(0, 3)
    assert len({cluster_seed(0, k) for k in range(100)}) == 100
    assert cluster_seed(0, 3) != cluster_seed(1, 3)


def test_store_prune_and_missing_artifact(tmp_path, setup):
    store = ArtifactStore(tmp_path / "store")
    _train_and_store(store, "keep", setup)
    _train_and_store(store, "old", setup)
    assert store.prune({"keep"}) == ["old"]
    assert store.keys() == {"keep"}
    with pytest.raises(LmeraserError, match="missing from the store"):
        store.load("old")
    assert not list((tmp_path / "store").glob(".*tmp"))
