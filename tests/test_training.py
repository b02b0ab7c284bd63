import threading

import pytest
import torch

from lmeraser.compute import Compute
from lmeraser.config import PromptParams
from lmeraser.errors import LmeraserError
from lmeraser.store import ArtifactStore
from lmeraser.training import artifact_key, cluster_seed, key_inputs, members_digest, train_prompt

from helpers import tiny_backbone, tiny_data

PROMPT = PromptParams.of("pad", width=1, epochs=3, batch_size=8, lr=0.05)


@pytest.fixture(scope="module")
def setup():
    return tiny_backbone(), *tiny_data(40)


def _train_and_store(store, key, setup, params=PROMPT, seed=7, threads=1):
    backbone, x, y = setup
    state = train_prompt(backbone, x, y, params, 4, seed, Compute(threads=threads))
    return store.save(key, state, {"cluster": 0, "seed": seed})


@pytest.mark.parametrize("kind", ["pad", "vpt"])
def test_training_twice_gives_byte_identical_artifacts(tmp_path, setup, kind):
    params = PROMPT if kind == "pad" else PromptParams.of("vpt", deep=True, epochs=3, batch_size=8, lr=0.05)
    a = _train_and_store(ArtifactStore(tmp_path / "a"), "k", setup, params)
    b = _train_and_store(ArtifactStore(tmp_path / "b"), "k", setup, params)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256


def test_training_actually_learns_and_depends_on_seed(setup):
    backbone, x, y = setup
    init = train_prompt(backbone, x, y, PromptParams.of("pad", width=1, epochs=1, batch_size=8, lr=1e-9), 4, 7)
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


def _key(members=("a", "b"), hashes=("h1", "h2"), labels=(0, 1), seed=1, **shared):
    compute = Compute(threads=shared.pop("threads", 1), precision=shared.pop("precision", "float32"))
    shared = {"backbone_sha256": "bb", "prompt": PROMPT, "num_classes": 4, "compute": compute, **shared}
    return artifact_key(key_inputs(**shared), members_digest(members, hashes, labels), seed)


def test_key_covers_every_input():
    key = _key()
    assert _key() == key
    variants = [
        _key(members=("a",), hashes=("h1",), labels=(0,)),
        _key(labels=(0, 2)),
        _key(hashes=("h1", "hX")),
        _key(backbone_sha256="other"),
        _key(prompt=PromptParams.of("pad", width=1, epochs=4, batch_size=8, lr=0.05)),
        _key(seed=2),
        _key(threads=2),
        _key(precision="bf16"),
        _key(extra={"prototypes": "p"}),
    ]
    assert len(set(variants) | {key}) == len(variants) + 1


def test_key_depends_only_on_the_chosen_kinds_settings():
    """Changing LoRA's rank must not re-key (and retrain) a pad prompt; changing the pad's width must."""
    other_kind = PromptParams(kind="pad", pad=PROMPT.pad, lora={"rank": 8, "lr": 0.1}, vpt={"num_tokens": 9})
    assert _key(prompt=other_kind) == _key()
    assert _key(prompt=PromptParams.of("pad", width=2, epochs=3, batch_size=8, lr=0.05)) != _key()


@pytest.mark.parametrize("library", ["torch", "timm", "peft"])
def test_key_includes_the_library_versions_that_change_a_prompt(monkeypatch, library):
    import lmeraser.training as training

    key = _key()
    real = training.library_versions()
    monkeypatch.setattr(training, "library_versions", lambda: {**real, library: real[library] + ".post1"})
    assert _key() != key


def test_training_restores_the_thread_count_and_deterministic_flag(setup):
    backbone, x, y = setup
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    train_prompt(backbone, x, y, PROMPT, 4, 7, Compute(threads=1))
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()


def test_a_thread_joining_a_running_block_gets_the_thread_count_too():
    """Under OpenMP the count is per thread: a cluster training in a second thread while the first
    one trains must run with the configured count, not the default (else its bits differ)."""
    from lmeraser.determinism import deterministic

    seen, inside = {}, threading.Event()
    release = threading.Event()

    def first():
        with deterministic(1):
            inside.set()
            release.wait(timeout=10)

    def second():
        torch.set_num_threads(2)  # what a fresh pool thread may hold
        with deterministic(1):
            seen["second"] = torch.get_num_threads()

    a = threading.Thread(target=first)
    a.start()
    inside.wait(timeout=10)
    b = threading.Thread(target=second)
    b.start()
    b.join(timeout=10)
    release.set()
    a.join()
    assert seen["second"] == 1


def test_a_block_asking_for_another_thread_count_waits_for_the_first(setup):
    """Scoped determinism: concurrent blocks share one process-wide setting, never mix two."""
    from lmeraser.determinism import deterministic

    seen, release = [], threading.Event()

    def first():
        with deterministic(1):
            seen.append(("first", torch.get_num_threads()))
            release.wait(timeout=10)
            seen.append(("first still", torch.get_num_threads()))

    def second():
        with deterministic(2):
            seen.append(("second", torch.get_num_threads()))

    a = threading.Thread(target=first)
    a.start()
    while not seen:
        pass
    b = threading.Thread(target=second)
    b.start()
    b.join(timeout=0.5)
    assert b.is_alive()  # waiting: thread count 1 is in force
    release.set()
    a.join()
    b.join(timeout=10)
    assert seen == [("first", 1), ("first still", 1), ("second", 2)]


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
