"""The per-request forgetting audit (lmeraser/audit/forgetting.py): its score, its test and
verdicts, its references (trained in memory, deterministic, never written) and the scan that
finds an IN reference written anywhere."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmeraser.audit import forgetting
from lmeraser.audit.forgetting import Scored, chosen_samples, judge, logit_confidence, tensor_digest
from lmeraser.config import parse_params
from lmeraser.errors import ConfigError

from helpers import TINY


def _request(fields: dict):
    """A journaled request as the batch holds it (rectify requests name a label)."""
    from lmeraser.request import Request

    extra = {"label": 1} if fields["kind"] == "rectify" else {}
    return Request(**{**extra, **fields, "sample_ids": tuple(fields["sample_ids"]), "received_at": 0.0})


def test_logit_confidence_is_the_log_odds_and_does_not_saturate():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [60.0, 0.0, 0.0]])
    labels = np.array([0, 2, 0])
    p = torch.tensor(logits).softmax(1).numpy()
    expected = [math.log(p[0, 0]) - math.log(1 - p[0, 0]), math.log(1 / 3) - math.log(2 / 3)]
    got = logit_confidence(logits, labels)
    assert np.allclose(got[:2], expected)
    # p_y rounds to 1.0 in float64 here (cross-entropy 0.0), yet the score stays finite and exact.
    assert np.isfinite(got[2]) and abs(got[2] - (60.0 - math.log(2))) < 1e-9
    assert float(torch.nn.functional.cross_entropy(torch.tensor(logits[2:]).float(), torch.tensor([0]))) == 0.0


def test_tensor_digest_follows_the_tensors_not_their_order_or_file():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    b = {"b": torch.zeros(3), "w": torch.arange(6.0).reshape(2, 3).clone()}
    assert tensor_digest(a) == tensor_digest(b)
    assert tensor_digest(a) != tensor_digest({**a, "b": torch.tensor([0.0, 0.0, 1e-8])})
    assert tensor_digest(a) != tensor_digest({**a, "w": a["w"].reshape(3, 2)})


def test_the_audited_samples_are_a_fixed_bounded_draw_of_forget_requests():
    requests = [
        _request({"kind": "forget", "request_id": "r1", "sample_ids": [f"s{i}" for i in range(40)]}),
        _request({"kind": "rectify", "request_id": "r2", "sample_ids": ["s1"]}),
        _request({"kind": "forget", "request_id": "r3", "sample_ids": ["public-1"]}),
    ]
    chosen = chosen_samples(requests, lambda s: s.startswith("s"), 16, seed=0)
    assert list(chosen) == ["r1"] and len(chosen["r1"]) == 16  # rectify and ineligible samples are not audited
    assert chosen == chosen_samples(list(reversed(requests)), lambda s: s.startswith("s"), 16, seed=0)
    assert chosen != chosen_samples(requests, lambda s: s.startswith("s"), 16, seed=1)


def _case(rng, in_level: float, out_level: float, sd: float = 1.0, refs: int = 2) -> list[Scored]:
    """Fresh references of one cluster with one target: IN scores near in_level, OUT near
    out_level; every model scores a population of members (IN) and test samples (OUT) at both
    levels, with spread `sd` from model to model."""

    def population(shift: float) -> tuple[list[float], list[float]]:
        base = np.r_[np.full(20, in_level), np.full(20, out_level)] + shift
        return list(base + sd * rng.standard_normal(40)), list(base + sd * rng.standard_normal(40))

    fresh = []
    for side, level, shift in (("in", in_level, 0.0), ("out", out_level, 3.0)):  # the sides differ as whole models
        for i in range(refs):
            members, test = population(shift)
            fresh.append(Scored(f"{side}:{i}", f"{side}{i}", [level + sd * rng.standard_normal()], members, test))
    return fresh


def test_a_broken_build_fails_an_exact_rebuild_is_forgotten_and_an_unmemorised_sample_says_so():
    rng = np.random.default_rng(0)
    fresh = _case(rng, in_level=1.0, out_level=-18.0)
    pre = Scored("pre-forget exact", "served-old", [0.8])
    before = Scored("served before", "served-old", [0.8])  # the served model is the pre-forget exact prompt
    reused = {"pre-forget exact": ("in", pre)}
    threshold = 0.01
    rebuilt = Scored("rebuilt", "rebuilt", [-17.5])
    exact = judge(
        ["x"],
        fresh,
        before,
        Scored("served after", "rebuilt", [-17.5]),
        {**reused, "rebuilt": ("out", rebuilt)},
        threshold,
    )[0]
    assert exact["verdict"] == "forgotten"
    assert exact["before"]["p_value"] < threshold / 4 and exact["before"]["log10_likelihood_ratio"] > 2
    assert exact["before"]["dof"] == 2  # two fresh models a side: the variance is uncertain, the tail is t(2)
    # The served model is left out of the fits it is tested against: the pre-forget prompt is no
    # IN reference for the score of the model it is, the rebuilt prompt no OUT one for its own.
    assert exact["before"]["fit_in"]["n"] == 2 and exact["before"]["fit_out"]["n"] == 3
    assert exact["after"]["fit_in"]["n"] == 3 and exact["after"]["fit_out"]["n"] == 2

    broken = judge(["x"], fresh, before, Scored("served after", "served-old", [0.8]), reused, threshold)[0]
    assert broken["verdict"] == "FAIL" and broken["after"]["p_value"] <= threshold

    # A "rebuilt" prompt that is an IN model (its digest) is no OUT reference.
    sneaky = judge(
        ["x"],
        fresh,
        before,
        Scored("served after", "served-old", [0.8]),
        {**reused, "rebuilt": ("out", pre)},
        threshold,
    )[0]
    assert sneaky["verdict"] == "FAIL" and sneaky["after"]["fit_out"]["n"] == 2

    same = _case(rng, in_level=10.0, out_level=10.0)
    plain = judge(["y"], same, Scored("b", "b", [10.2]), Scored("a", "a", [9.9]), {}, threshold)[0]
    assert plain["verdict"] == "not-memorised"

    unscored = judge(["x"], fresh, before, None, reused, threshold)[0]
    assert unscored["verdict"] == "not-audited" and unscored["after"] is None


def test_the_variance_follows_the_level_of_the_score():
    """A mislabelled sample's OUT scores sit far below the population's and vary more: the variance
    pooled near its level (not over every entry) keeps a genuine OUT score from looking detectable;
    and the shift between the IN and OUT models is not counted as spread."""
    rng = np.random.default_rng(1)

    def population(shift):
        return list(np.r_[15 + 0.3 * rng.standard_normal(40), -16 + 2.5 * rng.standard_normal(40)] + shift)

    fresh = [Scored(f"out:{i}", f"o{i}", [-16.0 + i], population(8.0), population(8.0)) for i in range(2)]
    fresh += [Scored(f"in:{i}", f"i{i}", [1.0], population(0.0), population(0.0)) for i in range(2)]
    result = judge(["c"], fresh, Scored("b", "b", [1.0]), Scored("a", "a", [-12.5]), {}, 0.01 / 16)[0]
    assert (
        2.0 < result["after"]["fit_out"]["variance"] < 12
    )  # the wrong-label entries' spread (2.5²), not the 8-point shift
    assert result["verdict"] != "FAIL"


def test_bad_audit_params_are_one_sentence():
    cases = (
        ({"references": -1}, "audit.references"),
        ({"alpha": 0.7}, "audit.alpha"),
        ({"max_samples_per_request": 0}, "audit.max_samples_per_request"),
    )
    for section, key in cases:
        with pytest.raises(ConfigError) as error:
            parse_params({"audit": section})
        assert key in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="audit.referencs"):
        parse_params({"audit": {"referencs": 2}})


def test_fleet_counts_verdicts_and_tests_the_p_values_against_the_uniform():
    class R:
        def __init__(self, number, predicate, rotation=False):
            self.number, self.predicate, self.is_rotation = number, predicate, rotation

    def audited(p_values, verdict="forgotten", method="exact"):
        samples = [
            {"sample_key": "k", "request_ids": ["r"], "verdict": verdict, "before": None, "after": {"p_value": p}}
            for p in p_values
        ]
        return {"method": method, "forgetting_audit": {"status": "audited", "samples": samples}}

    uniform = list(np.linspace(0.01, 0.99, 40))
    records = [
        R(1, audited(uniform)),
        R(
            2,
            {
                "method": "exact",
                "forgetting_audit": {"status": "no reference audit", "reason": "audit.references is 0"},
            },
        ),
        R(3, audited([1e-9, 1e-8], "FAIL", "influence")),
        R(4, {}, rotation=True),
    ]
    summary = forgetting.fleet(records)
    assert summary["records"] == 2 and summary["records_without_audit"] == 1
    assert summary["methods"]["exact"]["verdicts"]["forgotten"] == 40
    assert summary["methods"]["exact"]["forget_quality"]["ks_p_value"] > 0.5
    assert summary["methods"]["influence"]["verdicts"]["FAIL"] == 2
    leaky = forgetting.fleet([R(1, audited([1e-6] * 30))])
    assert leaky["methods"]["exact"]["forget_quality"]["ks_p_value"] < 1e-6


def test_references_train_in_memory_deterministically_and_a_written_one_is_found(trained_workspace, tmp_path):
    """The audit's references on a real (tiny) workspace: JSON-able state, fresh IN and OUT per
    cluster, the same bits on a second run, nothing written under the workspace; and `scan`
    reports an IN reference that someone wrote into the artifact store."""
    import os

    from safetensors.torch import save_file

    from lmeraser.audit.scan import scan
    from lmeraser.inference import ServingModel
    from lmeraser.pipeline.train import ClusterJob, plan
    from lmeraser.score_cache import score_test_split

    ws, _ = trained_workspace
    params = parse_params({**TINY, "audit": {"references": 1, "max_samples_per_request": 2}})
    private = ws.split("private")
    requests = [_request({"kind": "forget", "request_id": "r1", "sample_ids": private.sample_ids[:3]})]
    model = ServingModel.load(ws)
    _, routes, _ = score_test_split(ws, model, params.evaluate.batch_size)

    def listing():
        return {
            os.path.join(b, n): os.stat(os.path.join(b, n)).st_mtime_ns
            for b, _, names in os.walk(ws.root)
            for n in names
            if "cache" not in b
        }

    files = listing()
    first = forgetting.references_before(ws, params, requests, routes, log=lambda m: None)
    assert listing() == files  # no reference (nor anything else) was written under the workspace
    json.dumps(first)
    assert len(first["chosen"]["r1"]) == 2
    for cluster, info in first["clusters"].items():
        sides = sorted(r["name"].split(":")[0] for r in info["fresh"])
        assert sides == ["in", "out", "out"] and all(len(r["targets"]) == len(info["targets"]) for r in info["fresh"])
        # OUT reference 0 is the expected rebuild: the cluster's own training without the targets.
        twin = next(r for r in info["fresh"] if r["digest"] == info["rebuild_digest"])
        assert twin["name"] == f"out:{ws.prompt_index().clusters[cluster].seed}"
    second = forgetting.references_before(ws, params, requests, routes, log=lambda m: None)
    strip = lambda state: {
        c: [{k: v for k, v in r.items() if k != "seconds"} for r in i["fresh"]] for c, i in state["clusters"].items()
    }  # noqa: E731
    assert strip(first) == strip(second)  # bit-for-bit: same digests, same scores

    # An IN reference written to the artifact store (as a careless cache would) is a scan hit.
    cluster = next(iter(first["clusters"]))
    training = plan(params, ws)
    job = next(j for j in training.jobs if j.cluster == int(cluster))
    seed = forgetting.reference_seed(job.seed, "in", 0)
    leaked = training.trainer.state(ClusterJob(job.cluster, job.rows, "", seed))
    digests = set(forgetting.in_digests(first))
    assert tensor_digest(leaked) in digests
    path = ws.artifacts / "leaked-reference.safetensors"
    save_file(leaked, str(path), metadata={"note": "any metadata"})
    try:
        hits = scan(ws, set(), set(), sample_ids=set(), reference_digests=digests).hits
        assert [(h.kind, h.path) for h in hits] == [("audit IN reference", str(path))]
    finally:
        path.unlink()
    hits = scan(ws, set(), set(), sample_ids=set(), reference_digests=digests).hits
    assert hits == []


def test_no_spread_to_estimate_means_no_test_not_a_made_up_one():
    """One model a side and no population spread: nothing says how far apart two seeds fall, so
    no score is called detectable (a tiny default variance made genuine OUT scores FAIL)."""
    fresh = [
        Scored("in:0", "i0", [1.0], [3.0, 4.0], [5.0, 6.0]),
        Scored("out:0", "o0", [-15.0], [3.5, 4.5], [5.5, 6.5]),
    ]
    result = judge(["x"], fresh, Scored("b", "b", [1.0]), Scored("a", "a", [-14.0]), {}, 0.01)[0]
    assert result["after"]["p_value"] is None and result["verdict"] == "not-audited"
    assert result["before"]["p_value"] is None


def test_a_sample_named_twice_is_one_test_and_the_rebuild_twin_has_the_cluster_seed():
    requests = [
        _request({"kind": "forget", "request_id": "r1", "sample_ids": ["a"]}),
        _request({"kind": "forget", "request_id": "r2", "sample_ids": ["a", "b"]}),
    ]
    chosen = chosen_samples(requests, lambda s: True, 16, seed=0)
    assert chosen == {"r1": ["a"], "r2": ["b"]}  # "a" once: the Bonferroni count is 2, not 3
    assert forgetting.reference_seed(1234, "out", 0) == 1234  # the expected rebuild
    assert len({forgetting.reference_seed(1234, side, i) for side in ("in", "out") for i in range(1, 4)} | {1234}) == 7


def test_a_resumed_batch_is_audited_from_the_expected_rebuild_or_not_at_all():
    state = {
        "clusters": {
            "3": {
                "targets": ["a"],
                "rebuild_digest": "twin",
                "fresh": [{"name": "out:7", "digest": "twin", "targets": [-9.5]}],
            }
        }
    }
    scores, other = forgetting.expected_after(state, {"3": "twin"})
    assert scores == {"a": -9.5} and other == []
    scores, other = forgetting.expected_after(state, {"3": "something else"})
    assert scores == {} and other == ["3"]


def test_output_paths_that_are_not_new_or_regular_files_of_the_right_kind_are_refused(tmp_path):
    import os
    import subprocess

    from helpers import BIN

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    log = tmp_path / "audit" / "lineage.jsonl"
    log.parent.mkdir()
    log.write_text("precious\n")
    for args, needle in (
        (["audit", "forgetting", "--plot", str(fifo)], "not a regular file"),
        (["audit", "forgetting", "--plot", str(log)], "takes a .png file path"),
        (["audit", "forgetting", "--plot", "/dev/null"], "takes a .png file path"),
        (["audit", "report", "--out", str(log)], "takes a .html or .htm file path"),
    ):
        done = subprocess.run(
            [str(BIN / "lmeraser"), *args, "--root", str(tmp_path)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            args,
            done.stderr,
        )
    assert log.read_text() == "precious\n" and fifo.is_fifo()
    empty = subprocess.run(
        [str(BIN / "lmeraser"), "audit", "forgetting", "--root", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 0 and "no lineage records yet" in empty.stdout


def test_the_likelihood_ratio_is_one_sided_like_the_p_value():
    """A score far below the OUT mean is no evidence of membership, even when the IN fit is wider
    (the two-sided Student-t ratio reads high out in the low tail)."""
    from lmeraser.audit.forgetting import _test

    fit_in = {"mean": 5.0, "variance": 9.0, "n": 4}
    fit_out = {"mean": 0.0, "variance": 1.0, "n": 4}
    low = _test(-12.0, fit_in, fit_out, dof=6)
    assert low["p_value"] > 0.99 and low["log10_likelihood_ratio"] == 0.0
    high = _test(6.0, fit_in, fit_out, dof=6)
    assert high["p_value"] < 0.01 and high["log10_likelihood_ratio"] > 1
