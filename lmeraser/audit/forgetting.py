"""The per-request forgetting audit: is the forgotten sample still detectable in the served model?

A loss threshold over the population cannot tell "forgotten" from "never memorised". This audit is
a per-example likelihood-ratio test with reference models (LiRA, Carlini et al. 2022; U-LiRA,
Hayes et al. 2024), affordable here because a reference is one cluster's prompt and head:

  references  per affected cluster and batch, `audit.references` prompt+head pairs trained WITH the
              batch's forgotten samples (IN: the cluster's members before the batch) and as many
              WITHOUT them (OUT: after), by the product's own trainer with their own seeds. The
              pre-forget exact prompt is one more IN reference and the rebuilt prompt one more OUT
              reference (a model is never a reference for its own test).
  score       a sample's logit-scaled confidence, log p_y - log(1 - p_y), from the logits in float64.
  fit         Gaussians over the IN and OUT scores: per-sample means; a fixed (pooled) variance,
              since a per-sample variance needs tens of references. The population is the
              cluster's other members (IN for every model) and the test samples routed to it (OUT
              for every model), each scored under its label and under a wrong one, by every
              reference and the pre-forget exact prompt; its spread is pooled within the IN and
              the OUT side (they differ as whole models), over the entries whose mean on the
              fitted side is nearest the sample's (a score's variance depends on its level), and
              floored by the sample's own spread when it has two scores or more on that side. A
              tested score is compared with the predictive variance sigma^2 (1 + 1/n) of a new
              draw.
  test        p = P(OUT score >= s), the one-sided p-value of a served model's score s; and the
              likelihood ratio N(s; IN) / N(s; OUT), the power. A sample is detectable when p is
              at most alpha / m, m the samples audited in the batch (Bonferroni: a correct exact
              batch fails by chance at most alpha of the time).
  verdict     FAIL (detectable after), forgotten (detectable before, not after), not-memorised
              (not detectable before: the audit adds no evidence), not-audited (no score after).

The references are copies of the subjects' data in another form: they live in memory only, are
dropped as soon as they are scored, and their tensor digests are recorded so that `audit scan`
finds one that was written anywhere. Everything here is plain Python, torch and numpy.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from lmeraser.request import Request

VERDICTS = ("forgotten", "not-memorised", "FAIL", "not-audited")
POPULATION = 64  # population rows per side and cluster for the pooled variances
_MIN_VARIANCE = 1e-4  # a floor: identical scores must not make every difference "significant"


# -- scores --------------------------------------------------------------------------------------


def logit_confidence(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """log p_y - log(1 - p_y) per row, computed stably in float64 as z_y - logsumexp(z_j, j != y):
    unlike the cross-entropy, it does not saturate on confidently fit samples.

    Args:
        logits: class logits, (n, classes).
        labels: each row's class, (n,).
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(y) == 0:
        return np.zeros(0)
    own = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    return (own - torch.logsumexp(others, 1)).numpy()


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict's tensors (names, dtypes, shapes, bytes), whatever file holds them.

    Args:
        state: tensors by name (a prompt state dict, or a safetensors file's contents), on any device.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def reference_seed(cluster_seed: int, side: str, index: int) -> int:
    """Reference `index` of `side` (in/out) of a cluster. OUT reference 0 is the cluster's own
    seed: it is the retrain without the batch's samples, bit for bit what a correct rebuild serves
    (invariant 3), so the served prompt after the batch can be checked against it by digest.

    Args:
        cluster_seed: the cluster's own training seed (its prompt index entry's).
        side: "in" or "out".
        index: the reference's number on that side, from 0.
    """
    if side == "out" and index == 0:
        return cluster_seed
    return (
        int.from_bytes(hashlib.sha256(f"audit:{cluster_seed}:{side}:{index}".encode()).digest()[:4], "big") & 0x7FFFFFFF
    )


def chosen_samples(
    requests: list[Request], eligible: Callable[[str], bool], limit: int, seed: int
) -> dict[str, list[str]]:
    """request id -> the forget request's samples to audit: at most `limit`, the first in a fixed
    seeded order (the same on every run), among the `eligible` ones.

    Args:
        requests: the batch's requests; only forget requests are audited.
        eligible: whether a sample id can be audited (`references_before`: a private sample still in the data).
        limit: at most this many samples per request (`audit.max_samples_per_request`).
        seed: fixes the order the samples are drawn in (the params' seed).
    """
    chosen, taken = {}, set()
    for request in requests:
        if request.kind != "forget":
            continue
        # A sample named by several requests is audited once, under the first (it is one test).
        ids = [s for s in dict.fromkeys(request.sample_ids) if eligible(s) and s not in taken]
        ids.sort(key=lambda s: hashlib.sha256(f"{seed}:{request.request_id}:{s}".encode()).hexdigest())
        if ids:
            chosen[request.request_id] = sorted(ids[:limit])
            taken |= set(chosen[request.request_id])
    return chosen


# -- references ----------------------------------------------------------------------------------


@dataclass
class ClusterCase:
    """What one affected cluster's references need: rows of the private split (sorted by id) the
    IN and OUT references train on, the audited targets' inputs and labels, and the population rows
    for the pooled variances (members that stay: IN for every reference; test samples routed to the
    cluster: OUT for every reference)."""

    cluster: int
    seed: int  # the cluster's own seed; references derive theirs from it
    in_rows: np.ndarray
    out_rows: np.ndarray
    targets: list[str]
    target_x: torch.Tensor
    target_y: np.ndarray
    members_x: torch.Tensor
    members_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray


@dataclass
class Scored:
    """A model's scores on one case: its targets, its member population and its test population."""

    name: str  # "in:<seed>", "out:<seed>", "pre-forget exact", "rebuilt", "served before", "served after"
    digest: str
    targets: list[float]
    members: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Scorer:
    """Trains references with a workspace's trainer (lmeraser.pipeline.train.ClusterTrainer: the
    backbone, the private split, the prompt settings, the compute) and scores prompt states."""

    def __init__(self, trainer, batch_size: int = 256):
        self.trainer = trainer
        self.batch_size = batch_size

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """The backbone's inputs for raw images (`preprocess` with the trainer's input spec).

        Args:
            images: uint8 images, (n, height, width) or (n, height, width, channels).
        """
        from lmeraser.models.backbone import preprocess

        return preprocess(images, self.trainer.spec)

    @torch.no_grad()
    def _confidence(self, model, x: torch.Tensor, y: np.ndarray) -> list[float]:
        compute = self.trainer.compute
        out = []
        for start in range(0, len(x), self.batch_size):
            with compute.autocast():
                out.append(model(compute.put(x[start : start + self.batch_size])).float().cpu().numpy())
        logits = np.concatenate(out) if out else np.zeros((0, self.trainer.num_classes), np.float32)
        return [float(v) for v in logit_confidence(logits, y)]

    def _population(self, model, x: torch.Tensor, y: np.ndarray) -> list[float]:
        """Scores of the population rows under their label and under a wrong one ((y + 1) mod C):
        the variance of a score depends on its level (a confidently right sample's differs from a
        mislabelled one's), so the population must span both levels."""
        wrong = (np.asarray(y) + 1) % self.trainer.num_classes
        return self._confidence(model, x, y) + self._confidence(model, x, wrong)

    def score(self, name: str, state: dict[str, torch.Tensor], case: ClusterCase, population: bool = True) -> Scored:
        """One prompt state's scores on a case's targets and, with `population`, on its population under each label and
        a wrong one.

        Args:
            name: what the model is (`Scored.name`: "in:<seed>", "pre-forget exact", ...).
            state: the prompt state dict, loaded on the trainer's backbone.
            case: the cluster whose targets and population are scored.
            population: also score the member and test population (for the pooled variances).
        """
        from lmeraser.training import load_prompt

        start = time.perf_counter()
        t = self.trainer
        with t.compute.scope():
            model = load_prompt(t.backbone, t.prompt, t.num_classes, state)
            targets = self._confidence(model, case.target_x, case.target_y)
            members = self._population(model, case.members_x, case.members_y) if population else []
            test = self._population(model, case.test_x, case.test_y) if population else []
        return Scored(name, tensor_digest(state), targets, members, test, time.perf_counter() - start)

    def reference(self, case: ClusterCase, side: str, index: int) -> Scored:
        """Train one reference, score it, drop it: only its scores and digest leave this call.

        Args:
            case: the cluster the reference is trained for.
            side: "in" (trained on `case.in_rows`) or "out" (on `case.out_rows`).
            index: the reference's number on that side, from 0 (`reference_seed`).
        """
        from lmeraser.pipeline.train import ClusterJob

        start = time.perf_counter()
        seed = reference_seed(case.seed, side, index)
        rows = case.in_rows if side == "in" else case.out_rows
        state = self.trainer.state(ClusterJob(case.cluster, rows, "", seed))
        scored = self.score(f"{side}:{seed}", state, case)
        del state
        scored.seconds = time.perf_counter() - start
        return scored


def train_references(
    scorer: Scorer, cases: list[ClusterCase], references: int, workers: int
) -> dict[int, list[Scored]]:
    """Every case's fresh references, `workers` at a time: `references` IN, and `references` + 1 OUT
    (the first with the cluster's own seed: the expected rebuild); cluster -> scored references.

    Args:
        scorer: trains and scores the references.
        cases: the affected clusters.
        references: IN references per cluster (`audit.references`).
        workers: references trained at once (`runtime.workers`; at least 1).
    """
    jobs = [
        (case, side, i)
        for case in cases
        for side, count in (("in", references), ("out", references + 1))
        for i in range(count)
    ]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda job: scorer.reference(*job), jobs))
    out: dict[int, list[Scored]] = {case.cluster: [] for case in cases}
    for (case, _, _), scored in zip(jobs, results):
        out[case.cluster].append(scored)
    return out


# -- the test ------------------------------------------------------------------------------------


NEAREST = 16  # population entries the variance at a score level is pooled over


def _population(in_models: list[Scored], out_models: list[Scored]) -> np.ndarray:
    """(entries, 3): each population entry's (a member or a routed test sample, under its label or
    a wrong one) mean over the IN-side models, mean over the OUT-side models, and variance pooled
    within the two sides. Every model is IN for the members that stay and OUT for the test samples,
    so all of them measure the seed-to-seed spread; the sides are centred apart because they differ
    as whole models (the OUT ones lack the batch's samples)."""
    groups = [np.array([r.members + r.test for r in models], float) for models in (in_models, out_models)]
    groups = [g for g in groups if g.ndim == 2 and g.shape[1]]
    dof = sum(len(g) - 1 for g in groups)
    if not groups or dof <= 0:
        return np.zeros((0, 3))
    width = groups[0].shape[1]
    squares = sum(((g - g.mean(0)) ** 2).sum(0) for g in groups)
    means = [
        np.array([r.members + r.test for r in models], float).mean(0) if models else np.full(width, np.nan)
        for models in (in_models, out_models)
    ]
    return np.stack([means[0], means[1], squares / dof], 1)


def _fit(scores: list[float], population: np.ndarray, side: int) -> dict:
    """A Gaussian over one side's scores (side 0: IN, 1: OUT): their mean; a fixed variance pooled
    over the NEAREST population entries whose mean on that side is closest to theirs (a score's
    variance depends on its level), floored by the scores' own spread when there are two or more;
    and n."""
    n = len(scores)
    mean = float(np.mean(scores)) if n else None
    variance = None  # nothing to estimate it from: no test (never a made-up spread)
    if n and len(population):
        level = population[:, side] if not np.isnan(population[:, side]).all() else population[:, 1 - side]
        nearest = np.argsort(np.abs(level - mean), kind="stable")[:NEAREST]
        variance = float(population[nearest, 2].mean())
    if n >= 2:
        variance = max(variance or 0.0, float(np.var(scores, ddof=1)))
    return {"mean": mean, "variance": None if variance is None else max(variance, _MIN_VARIANCE), "n": n}


def _test(score: float, fit_in: dict, fit_out: dict, dof: int) -> dict:
    """The p-value of `score` under the OUT fit (one-sided: members score higher) and the log10
    likelihood ratio IN / OUT (one-sided too: at most 0 at or below the OUT mean), both with the
    predictive spread of a new draw, sigma^2 (1 + 1/n), in Student's t with the variance's `dof`
    degrees of freedom (counted in models, the conservative count: with a handful of references the
    variance itself is uncertain, and a normal tail would call genuine OUT scores detectable)."""
    from scipy.stats import t

    if not fit_out["n"] or fit_out["variance"] is None:
        return {"score": score, "p_value": None, "log10_likelihood_ratio": None, "dof": dof}
    scale_out = math.sqrt(fit_out["variance"] * (1 + 1 / fit_out["n"]))
    p = float(t.sf(score, dof, loc=fit_out["mean"], scale=scale_out))
    lr = None
    if fit_in["n"] and fit_in["variance"] is not None:
        scale_in = math.sqrt(fit_in["variance"] * (1 + 1 / fit_in["n"]))
        lr = float(
            (t.logpdf(score, dof, fit_in["mean"], scale_in) - t.logpdf(score, dof, fit_out["mean"], scale_out))
            / math.log(10)
        )
        if score <= fit_out["mean"]:
            # One-sided, like p: a score at or below the OUT mean is no evidence of membership. With
            # a wider IN fit the two-sided ratio would read high far out in the low tail.
            lr = min(lr, 0.0)
    return {"score": score, "p_value": p, "log10_likelihood_ratio": lr, "dof": dof}


def judge(
    targets: list[str],
    fresh: list[Scored],
    before: Scored,
    after: Scored | None,
    reused: dict[str, tuple[str, Scored]],
    threshold: float,
) -> list[dict]:
    """Per target: the fits, the tests of the served model before and after, and the verdict.

    `fresh` are the cluster's new references (names "in:..."/"out:..."); `reused` maps a name to
    (side, scores) for the pre-forget exact and rebuilt prompts. A model is left out of the fits
    it is tested against (matched by tensor digest), so a served model never vouches for itself.

    Args:
        targets: the cluster's audited sample ids, in the order of every model's `targets` scores.
        fresh: the cluster's new references.
        before: the served model's scores before the batch.
        after: the served model's scores after it; None: not measured (the verdict is not-audited).
        reused: name -> (side, scores) of the pre-forget exact and rebuilt prompts.
        threshold: the p-value at or below which a score is detectable (alpha / samples audited).
    """
    in_digests = {r.digest for r in fresh if r.name.startswith("in:")} | {
        s.digest for side, s in reused.values() if side == "in"
    }
    with_population = [(r.name.split(":")[0], r) for r in fresh] + [
        (side, m) for side, m in reused.values() if m.members or m.test
    ]
    population_in = [m for side, m in with_population if side == "in"]
    population_out = [m for side, m in with_population if side == "out" and m.digest not in in_digests]
    population = _population(population_in, population_out)
    dof = max(1, max(0, len(population_in) - 1) + max(0, len(population_out) - 1))
    models = [(r.name.split(":")[0], r) for r in fresh] + [
        (side, s)
        for side, s in reused.values()
        if not (side == "out" and s.digest in in_digests)  # a "rebuilt" prompt that is an IN model is no OUT reference
    ]

    def tested(model: Scored | None, i: int) -> dict | None:
        if model is None:
            return None
        others = [(side, m) for side, m in models if m.digest != model.digest]
        fit_in = _fit([m.targets[i] for side, m in others if side == "in"], population, 0)
        fit_out = _fit([m.targets[i] for side, m in others if side == "out"], population, 1)
        return {**_test(model.targets[i], fit_in, fit_out, dof), "fit_in": fit_in, "fit_out": fit_out}

    results = []
    for i, sid in enumerate(targets):
        pre, post = tested(before, i), tested(after, i)
        detectable_before = pre is not None and pre["p_value"] is not None and pre["p_value"] <= threshold
        if post is None or post["p_value"] is None:
            verdict = "not-audited"
        elif post["p_value"] <= threshold:
            verdict = "FAIL"
        elif detectable_before:
            verdict = "forgotten"
        else:
            verdict = "not-memorised"
        results.append({"sample_id": sid, "verdict": verdict, "before": pre, "after": post})
    return results


def summary(samples: list[dict], settings: dict, threshold: float, references: dict, seconds: dict) -> dict:
    """The batch-level section a record signs: parameters, counts, the smallest p-value after.

    Args:
        samples: the per-sample results (`conclude`'s, raw sample ids).
        settings: the audit settings the references were made with (the `audit` section as JSON).
        threshold: the p-value at or below which a score is detectable.
        references: what the record says of the references (clusters, how many trained, which reused).
        seconds: the audit's time by phase, in seconds.
    """
    counts = {v: sum(1 for s in samples if s["verdict"] == v) for v in VERDICTS}
    after = [s["after"]["p_value"] for s in samples if s.get("after") and s["after"]["p_value"] is not None]
    return {
        "statistic": (
            "LiRA-style likelihood ratio with fresh IN/OUT reference prompts per cluster; score log p_y - log(1 - p_y)"
        ),
        "fit": (
            "per-sample means; fixed variance pooled within sides over the population entries nearest in level "
            "(the cluster's members and routed test samples, each under its label and a wrong one), "
            "floored by the sample's own spread"
        ),
        "references_per_side": settings["references"],
        "max_samples_per_request": settings["max_samples_per_request"],
        "alpha": settings["alpha"],
        "samples_audited": len(samples),
        "threshold_p": threshold,
        "verdicts": counts,
        "min_p_value_after": min(after) if after else None,
        "references": references,
        "seconds": seconds,
    }


def keyed(samples: list[dict], key: Callable[[str], str], requests_of: dict[str, list[str]]) -> list[dict]:
    """Per-sample results as a record holds them: keyed sample ids, the request, rounded numbers.

    Args:
        samples: the per-sample results (`conclude`'s, raw sample ids).
        key: keys a string with the workspace's salt (`Keyer.subject`).
        requests_of: sample id -> the ids of the batch's forget requests that name it.
    """

    def rounded(test: dict | None) -> dict | None:
        if test is None:
            return None
        out = {
            k: (None if v is None else float(f"{v:.6g}"))
            for k, v in test.items()
            if k not in ("fit_in", "fit_out", "dof")
        }
        out["dof"] = test.get("dof")
        for side in ("fit_in", "fit_out"):
            fit = test[side]
            sd = None if fit["variance"] is None else float(f"{math.sqrt(fit['variance']):.6g}")
            out[side] = {"mean": None if fit["mean"] is None else float(f"{fit['mean']:.6g}"), "sd": sd, "n": fit["n"]}
        return out

    return [
        {
            "sample_key": key("sample:" + s["sample_id"]),  # keyed as `audit scan` keys erased ids
            "request_ids": requests_of[s["sample_id"]],  # every request of the batch that names it
            "verdict": s["verdict"],
            **({"reason": s["reason"]} if s.get("reason") else {}),
            "before": rounded(s["before"]),
            "after": rounded(s["after"]),
        }
        for s in samples
    ]


# -- the fleet -----------------------------------------------------------------------------------


def fleet(records: list) -> dict:
    """Across every record's audit: verdict counts per method, and the forget quality: a
    Kolmogorov-Smirnov test of the exact path's post-forget p-values against the uniform (as TOFU
    reports it; a correct unlearning gives uniform p-values, a leaky one piles them near 0).

    Args:
        records: the lineage log's records, in order (key rotations are skipped).
    """
    from scipy.stats import kstest

    out: dict = {"records": 0, "records_without_audit": 0, "methods": {}}
    for record in records:
        p = record.predicate
        if record.is_rotation:
            continue
        audit = p.get("forgetting_audit")
        if not audit or not audit.get("samples"):
            out["records_without_audit"] += 1
            continue
        out["records"] += 1
        method = out["methods"].setdefault(
            p.get("method", "exact"), {"verdicts": dict.fromkeys(VERDICTS, 0), "p_values_after": [], "records": []}
        )
        method["records"].append(record.number)
        for sample in audit["samples"]:
            method["verdicts"][sample["verdict"]] = method["verdicts"].get(sample["verdict"], 0) + 1
            if sample.get("after") and sample["after"].get("p_value") is not None:
                method["p_values_after"].append(sample["after"]["p_value"])
    for method in out["methods"].values():
        values = method["p_values_after"]
        if len(values) >= 2:
            result = kstest(values, "uniform")
            method["forget_quality"] = {
                "ks_statistic": float(result.statistic),
                "ks_p_value": float(result.pvalue),
                "n": len(values),
            }
        else:
            method["forget_quality"] = None
    return out


# -- the audit of a batch ------------------------------------------------------------------------


def _subset(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of `rows`, a fixed seeded choice, in order."""
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def references_before(ws, params, requests: list[Request], test_routes: np.ndarray, log=print) -> dict | None:
    """The part of a batch's audit that needs the data before it changes: the audited samples,
    each affected cluster's fresh references (trained, scored, dropped) and the pre-forget exact
    prompts' scores, with the audit settings they were made with. A JSON-able state (scores and
    digests, no pixels, no weights); None when the audit is off or no forget request names a
    private sample still in the data.

    Args:
        ws: the workspace, before the batch changes its data.
        params: the checked params (the audit settings, seed, evaluation batch size and workers).
        requests: the batch's requests (or the influence update's).
        test_routes: the cluster each test sample is routed to (`score_test_split`).
        log: where progress lines go.
    """
    from lmeraser.pipeline.train import plan
    from lmeraser.store import ArtifactStore

    audit = params.audit
    if audit.references == 0:
        return None
    start = time.perf_counter()
    private = ws.split("private")
    assignments = ws.assignments()
    cluster_of = dict(zip(private.sample_ids, assignments["cluster"].astype(int)))
    row_of = {sid: i for i, sid in enumerate(private.sample_ids)}
    chosen = chosen_samples(requests, lambda s: s in cluster_of, audit.max_samples_per_request, params.seed)
    if not chosen:
        return None
    forgotten = {s for r in requests if r.kind == "forget" for s in r.sample_ids if s in cluster_of}
    request_of = {sid: rid for rid, ids in chosen.items() for sid in ids}
    training = plan(params, ws)
    scorer = Scorer(training.trainer, params.evaluate.batch_size)
    test = ws.split("test")
    clusters = assignments["cluster"].to_numpy()
    index = ws.prompt_index()
    cases, populations, emptied = [], {}, {}
    for cluster in sorted({cluster_of[s] for s in request_of}):
        in_rows = np.flatnonzero(clusters == cluster)
        gone = np.array([row_of[s] for s in forgotten if cluster_of[s] == cluster])
        out_rows = np.setdiff1d(in_rows, gone)
        targets = sorted(s for s in request_of if cluster_of[s] == cluster)
        if not len(out_rows):
            # No model can be trained without them: the cluster is retired and serves no one.
            emptied[str(cluster)] = {
                "targets": targets,
                "reason": f"the batch empties cluster {cluster}: it is retired, no OUT reference exists",
            }
            continue
        target_rows = np.array([row_of[s] for s in targets])
        seed = index.clusters[str(cluster)].seed
        members = _subset(out_rows, POPULATION, seed)
        tests = _subset(np.flatnonzero(test_routes == cluster), POPULATION, seed)
        populations[cluster] = {"members": [private.sample_ids[i] for i in members], "test": [int(i) for i in tests]}
        cases.append(
            ClusterCase(
                cluster,
                seed,
                in_rows,
                out_rows,
                targets,
                scorer.inputs(private.images[target_rows]),
                private.labels[target_rows],
                scorer.inputs(private.images[members]),
                private.labels[members],
                scorer.inputs(test.images[tests]),
                test.labels[tests],
            )
        )
    fresh = train_references(scorer, cases, audit.references, params.runtime.workers) if cases else {}
    store = ArtifactStore(ws.store_dir)
    served = {}
    for case in cases:
        # The pre-forget exact prompt: one more IN reference, at no training cost.
        entry = index.clusters[str(case.cluster)]
        served[case.cluster] = scorer.score("pre-forget exact", store.load(entry.key), case).to_json()
    seconds = time.perf_counter() - start
    trained = sum(len(v) for v in fresh.values())
    log(
        f"forgetting audit: {len(request_of)} sample(s) of {len(chosen)} request(s) "
        f"in cluster(s) {[c.cluster for c in cases]}; {trained} reference(s) trained in {seconds:.1f}s"
    )
    return {
        "audit": audit.model_dump(mode="json"),  # the settings the references were made with: a resumed batch uses them
        "chosen": chosen,
        "requests_of": {
            sid: [r.request_id for r in requests if r.kind == "forget" and sid in r.sample_ids]
            for ids in chosen.values()
            for sid in ids
        },
        "clusters": {
            str(case.cluster): {
                "targets": case.targets,
                "fresh": [r.to_json() for r in fresh[case.cluster]],
                "rebuild_digest": fresh[case.cluster][
                    audit.references
                ].digest,  # OUT reference 0: the cluster's own seed
                "pre_forget_exact": served[case.cluster],
                "population": populations[case.cluster],
            }
            for case in cases
        },
        "emptied": emptied,
        "seconds": seconds,
        "trained": trained,
    }


def expected_after(state: dict, served: dict[str, str]) -> tuple[dict[str, float], list[str]]:
    """The served scores after an exact batch, without the erased pixels, where a cluster serves
    exactly its expected rebuild (the OUT reference with its own seed: a retrain without the
    batch's samples); and the clusters that serve something else (to be scored on the pixels).

    Args:
        state: `references_before`'s state.
        served: cluster -> tensor digest of the prompt it serves now (`served_digests`).
    """
    scores, other = {}, []
    for cluster, info in state["clusters"].items():
        if served.get(cluster) == info["rebuild_digest"]:
            twin = next(r for r in info["fresh"] if r["digest"] == info["rebuild_digest"])
            scores.update(zip(info["targets"], twin["targets"]))
        else:
            other.append(cluster)
    return scores, other


def served_scores(
    model, images: np.ndarray, labels: np.ndarray, sample_ids: list[str], batch_size: int
) -> dict[str, float]:
    """sample id -> its score under what the service serves (routed as any query is).

    Args:
        model: the serving model (`ServingModel`).
        images: the samples' raw images, in `sample_ids` order.
        labels: their labels.
        sample_ids: the ids the scores are returned under.
        batch_size: images per forward pass.
    """
    if not sample_ids:
        return {}
    logits, _ = model.logits(images, batch_size)
    return dict(zip(sample_ids, (float(v) for v in logit_confidence(logits, labels))))


def served_digests(model, clusters) -> dict[str, str]:
    """cluster -> tensor digest of the prompt it serves (a retired cluster: absent).

    Args:
        model: the serving model (`ServingModel`).
        clusters: the cluster numbers, as ints or strings (the keys of the state's `clusters`).
    """
    return {str(c): tensor_digest(model.state(c)) for c in clusters if str(c) in model.index.clusters}


def prompt_scores(
    model,
    name: str,
    state: dict[str, torch.Tensor],
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    population: tuple | None = None,
) -> Scored:
    """One prompt state (on the served backbone) scored on these images, as the service would
    compute its logits; with `population` (member images, labels, test images, labels) also on the
    population, under each label and a wrong one, as `Scorer.score` does.

    Args:
        model: the serving model (`ServingModel`) whose backbone, prompt settings and compute are used.
        name: what the prompt is (`Scored.name`, e.g. "served after").
        state: the prompt state dict to score (e.g. an influence-edited one, never stored).
        images: the targets' raw images.
        labels: their labels.
        batch_size: images per forward pass.
        population: (member images, member labels, test images, test labels) as `population_inputs` returns them; None:
            the targets only.
    """
    from lmeraser.compute import Compute
    from lmeraser.models.backbone import preprocess
    from lmeraser.training import load_prompt

    compute = Compute.of(model.backbone_meta)
    num_classes = model.index.num_classes

    def logits_of(prompt, pixels: np.ndarray) -> np.ndarray:
        x = preprocess(pixels, model.input_spec)
        chunks = [np.zeros((0, num_classes), np.float32)]
        for i in range(0, len(x), batch_size):
            with compute.autocast():
                chunks.append(prompt(compute.put(x[i : i + batch_size])).float().cpu().numpy())
        return np.concatenate(chunks)

    def both_labels(logits: np.ndarray, y: np.ndarray) -> list[float]:
        return [float(v) for v in logit_confidence(logits, y)] + [
            float(v) for v in logit_confidence(logits, (np.asarray(y) + 1) % num_classes)
        ]

    with compute.scope(), torch.no_grad():
        prompt = load_prompt(model.backbone, model.prompt_params, num_classes, state)
        targets = [float(v) for v in logit_confidence(logits_of(prompt, images), labels)]
        members = test = []
        if population is not None:
            members = both_labels(logits_of(prompt, population[0]), population[1])
            test = both_labels(logits_of(prompt, population[2]), population[3])
    return Scored(name, tensor_digest(state), targets, members, test)


def population_inputs(ws, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cluster's population as `references_before` chose it (member ids, test rows), read from
    the data now: the members stay in the data through the batch.

    Args:
        ws: the workspace whose private and test splits are read.
        info: one cluster's entry in `references_before`'s state (`state["clusters"][cluster]`).
    """
    private, test = ws.split("private"), ws.split("test")
    row = {sid: i for i, sid in enumerate(private.sample_ids)}
    members = [row[s] for s in info["population"]["members"] if s in row]
    rows = info["population"]["test"]
    return private.images[members], private.labels[members], test.images[rows], test.labels[rows]


def conclude(state: dict, params, before: dict, after: dict | None, rebuilt: dict[str, Scored] | None = None) -> dict:
    """The verdicts, from the references of `references_before` and the served model's scores
    before and after ({"scores": sample id -> score, "digests": cluster -> digest}; after None: not
    measured); `rebuilt` maps a cluster to another OUT model's target scores. The audit settings
    are the ones the references were made with (the state's), whatever `params` say now. Returns
    {"samples": [...], "threshold": t} with raw sample ids (the caller keys them for the record).

    Args:
        state: `references_before`'s state.
        params: the checked params (their audit settings only where the state has none).
        before: the served model's scores and digests before the batch.
        after: the same after it; None: not measured.
        rebuilt: cluster -> the rebuilt prompt's scores, one more OUT model (left out where it is a fresh reference);
            None: none.
    """
    settings = state.get("audit") or params.audit.model_dump(mode="json")
    audited = {s for ids in state["chosen"].values() for s in ids}
    threshold = settings["alpha"] / max(1, len(audited))
    samples = []
    for cluster, info in state["clusters"].items():
        fresh = [Scored(**r) for r in info["fresh"]]
        targets = info["targets"]
        reused = {"pre-forget exact": ("in", Scored(**info["pre_forget_exact"]))}
        if rebuilt and rebuilt.get(cluster) is not None and rebuilt[cluster].digest not in {r.digest for r in fresh}:
            reused["rebuilt"] = ("out", rebuilt[cluster])
        served_before = Scored(
            "served before", before["digests"].get(cluster, "served before"), [before["scores"][s] for s in targets]
        )
        served_after = None
        if after is not None and all(s in after["scores"] for s in targets):
            served_after = Scored(
                "served after", after["digests"].get(cluster, "served after"), [after["scores"][s] for s in targets]
            )
        samples += judge(targets, fresh, served_before, served_after, reused, threshold)
    for info in (state.get("emptied") or {}).values():
        samples += [
            {"sample_id": s, "verdict": "not-audited", "reason": info["reason"], "before": None, "after": None}
            for s in info["targets"]
        ]
    return {"samples": samples, "threshold": threshold}


def section(
    state: dict | None, result: dict | None, params, key: Callable[[str], str], seconds: dict, reason: str | None = None
) -> dict:
    """What a record signs about the audit: the batch-level summary and the keyed per-sample
    verdicts, or why there was none.

    Args:
        state: `references_before`'s state; None: no audit.
        result: `conclude`'s verdicts; None: no audit.
        params: the checked params (why there was no audit; the audit settings where the state has none).
        key: keys the sample ids for the record (`Keyer.subject`).
        seconds: the audit's time by phase, in seconds.
        reason: why there was no audit, where the params do not say (e.g. a backbone rebuild).
    """
    if state is None or result is None:
        why = reason or (
            "audit.references is 0"
            if params.audit.references == 0
            else "no forget request names a private sample still in the data"
        )
        return {"status": "no reference audit", "reason": why}
    settings = state.get("audit") or params.audit.model_dump(mode="json")
    references = {
        "clusters": sorted(int(c) for c in state["clusters"]),
        "fresh_trained": state["trained"],
        "in_per_cluster": settings["references"],
        "out_per_cluster": settings["references"] + 1,
        "reused": ["pre-forget exact prompt (IN)"],
        "expected_rebuild": "OUT reference 0 has the cluster's own seed: a correct rebuild serves its exact bits",
    }
    return {
        "status": "audited",
        **summary(result["samples"], settings, result["threshold"], references, seconds),
        "samples": keyed(result["samples"], key, state["requests_of"]),
    }


def in_digests(state: dict | None) -> list[str]:
    """Tensor digests of the IN references (trained on the subjects' data): what `audit scan`
    looks for.

    Args:
        state: `references_before`'s state (as a batch's capture holds it); None: no audit.
    """
    if not state:
        return []
    return sorted(
        r["digest"] for info in state["clusters"].values() for r in info["fresh"] if r["name"].startswith("in:")
    )


def request_verdicts(predicate: dict, request_id: str) -> str:
    """One request's audit in a few words, for tables: its verdict counts, or why there is none.

    Args:
        predicate: a lineage record's predicate.
        request_id: the request whose samples are counted.
    """
    audit = predicate.get("forgetting_audit")
    if not audit:
        return "-"
    if audit.get("status") != "audited":
        return audit.get("status", "-")
    counts: dict[str, int] = {}
    for sample in audit.get("samples", []):
        if request_id in sample.get("request_ids", [sample.get("request_id")]):
            counts[sample["verdict"]] = counts.get(sample["verdict"], 0) + 1
    if not counts:
        return "not audited (no private sample)"
    return ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items(), key=lambda kv: VERDICTS.index(kv[0])))


def plot_p_values(summary: dict):
    """A figure of the post-forget p-values per method against the uniform (matplotlib).

    Args:
        summary: `fleet`'s summary of the records' audits.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A log axis: the p-values that matter (a leak) are the tiny ones, which a linear axis hides.
    floor = 1e-12
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, method in sorted(summary["methods"].items()):
        values = np.clip(np.sort(method["p_values_after"]), floor, 1.0)
        if len(values):
            ax.step(
                np.concatenate([[floor], values]),
                np.arange(len(values) + 1) / len(values),
                where="post",
                label=f"{name} (n={len(values)})",
            )
    grid = np.logspace(-12, 0, 200)
    ax.plot(grid, grid, color="grey", lw=0.8, ls="--", label="uniform (forgotten)")
    ax.set_xscale("log")
    ax.set(
        xlabel="post-forget p-value under the OUT references (log; below 1e-12 drawn at 1e-12)",
        ylabel="fraction of audited samples",
    )
    ax.set_title("forgetting audit: p-values after")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    return fig
