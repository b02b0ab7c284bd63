"""The influence method (`--method influence`): answer forget and rectify requests in about a
second, honestly approximate.

For every cluster a batch of requests touches, the influence update (influence.py) edits the
PEFT parameters the cluster serves now; the result is stored in the serving overlay
(`artifacts/prompts/approximate/`), marked approximate, and a signed lineage record states the
method, the damping λ, the CG residual and iterations. data/ is not touched here: the request stays
pending in the journal, and the next exact batch (`lmeraser unlearn`) changes the data, rebuilds
the clusters exactly, retires the overlays and writes a record that supersedes this one.

Requests stack: a cluster that already serves an overlay is edited again from that overlay, on
its members as the earlier edits left them.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lmeraser.code_identity import code_version
from lmeraser.config import Params, load_params
from lmeraser.errors import LmeraserError, shown
from lmeraser.failpoints import failpoint
from lmeraser.inference import ServingModel
from lmeraser.io import atomic_write_json, sha256_json
from lmeraser.journal import Journal, event
from lmeraser.lineage.records import InfluencePredicate, RequestSummary, code_info, environment, sign_and_append, utc
from lmeraser.models.backbone import preprocess
from lmeraser.overlay import Overlay
from lmeraser.request import Request, corrected_image
from lmeraser.training import cluster_seed
from lmeraser.unlearning.influence import edited_rows, influence_edit, prepare_model, rows_like
from lmeraser.unlearning.recovery import recover, recover_influence
from lmeraser.versioning import data_md5
from lmeraser.workspace import InputSpec, Workspace


def check_influence(requests: list[Request], ws: Workspace) -> dict[str, int]:
    """Refuse, before anything is written, what the influence method cannot do.

    Args:
        requests: the requests to update for (none may name a public sample).
        ws: the workspace (trained prompts and up-to-date assignments are needed).

    Returns:
        The cluster of every private sample.
    """
    for request in requests:
        if request.public:
            raise LmeraserError(
                f"request {request.request_id} names public samples: the influence method edits only private clusters' "
                "prompts, not the backbone; use --method exact --allow-backbone-rebuild."
            )
    if not ws.prompt_index_file.exists():
        raise LmeraserError(f"{ws.prompt_index_file}: no trained prompts to edit; run `dvc repro` first.")
    private_ids = ws.manifest("private")["sample_id"].tolist()
    assignments = ws.assignments()
    if assignments["sample_id"].tolist() != private_ids:
        raise LmeraserError(f"{ws.assignments_file} is out of date with data/private; run `dvc repro` first.")
    cluster_of = dict(zip(private_ids, assignments["cluster"].astype(int)))
    targets = {s for r in requests for s in r.sample_ids}
    missing = sorted(targets - set(cluster_of))
    if missing:
        raise LmeraserError(f"sample id {shown(missing[0])} is not in data/private; it cannot be edited by influence.")
    trained = ws.prompt_index().clusters
    untrained = sorted({cluster_of[s] for s in targets} - {int(c) for c in trained})
    if untrained:
        raise LmeraserError(f"cluster {untrained[0]} has no trained prompt; run `dvc repro` first.")
    return cluster_of


class _ClusterData:
    """A cluster's members as the serving prompt was trained on them: exact members with the
    edits of earlier influence requests applied."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sample_ids: list[str], spec: InputSpec, ws: Workspace):
        self.x, self.y = x.clone(), y.clone()
        self.present = torch.ones(len(y), dtype=torch.bool)
        self.row = {sid: i for i, sid in enumerate(sample_ids)}
        self.spec, self.ws = spec, ws

    def apply(self, request: Request) -> None:
        """Apply one request's edits to the rows it names in this cluster."""
        for row in (self.row[s] for s in request.sample_ids if s in self.row):
            if request.kind == "forget":
                self.present[row] = False
            elif request.label is not None:
                self.y[row] = request.label
            else:
                image = corrected_image(self.ws, request)
                self.x[row] = preprocess(image[None], self.spec)[0]

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x.clone(), self.y.clone(), self.present.clone()


def influence_pending(ws: Workspace, log=print) -> dict | None:
    """Apply the influence update for every request submitted with `--method influence` and not
    yet applied; sign one record. None when there is nothing to do.

    Args:
        ws: the workspace.
        log: where progress lines go.

    Returns:
        The record's number and sha256, the clusters edited with their solver reports, the
        request ids, the forgetting audit and the seconds; None when idle.
    """
    journal = Journal(ws)
    with ws.lock("unlearn"):
        recover(ws, log)
        requests = journal.awaiting_influence()
        open_batches = ws.batch_files()
        if requests and open_batches:
            # Under this lock no batch runs: this one stopped (killed, or a check failed), maybe
            # after its rebuild. An influence record would sign its unverified prompts as served.
            raise LmeraserError(
                f"exact batch {open_batches[0].stem} stopped before its record ({ws.relative(open_batches[0])}); "
                "the served prompts are not verified, so no influence update is signed over them: "
                "finish it with `lmeraser unlearn` first "
                "(the influence request stays pending for the exact batch after it)."
            )
        if not requests:
            log("no requests awaiting an influence update")
            return None
        return _update(ws, load_params(ws.params_file), requests, journal, log)


def _update(ws: Workspace, params: Params, requests: list[Request], journal: Journal, log) -> dict | None:
    from lmeraser.unlearning.preflight import check_signer

    start = time.perf_counter()
    cluster_of = check_influence(requests, ws)
    # The update is served only with its signed record: a key that cannot sign refuses it now.
    check_signer(ws)
    model = ServingModel.load(ws)
    overlay, entries = Overlay(ws), model.overlay  # the active overlay entries, read once
    private = ws.split("private")
    assignments = ws.assignments()
    clusters = sorted({cluster_of[s] for r in requests for s in r.sample_ids})
    if not clusters:
        log("nothing to edit: every target was already forgotten (the exact batch records the no-op)")
        return None
    spec = model.input_spec
    ip = params.influence
    dtype = getattr(torch, ip.dtype)
    load_seconds = time.perf_counter() - start

    # The intent before the first edited prompt file is written, so a kill from here on (the
    # audit's references take a while) is finished or undone, with the files it wrote, by
    # recovery.recover_influence; an error is undone at once.
    batch_id = influence_batch_id(requests)
    with _intent(ws, overlay, batch_id, requests):
        edited, reports, states = dict(entries), [], {}
        for cluster in clusters:
            c = str(cluster)
            t0 = time.perf_counter()
            rows = np.flatnonzero(assignments["cluster"].to_numpy() == cluster)
            data = _ClusterData(
                preprocess(private.images[rows], spec),
                torch.from_numpy(private.labels[rows]),
                [private.sample_ids[i] for i in rows],
                spec,
                ws,
            )
            previous = entries.get(c)
            earlier = [Request.model_validate(edit) for edit in (previous or {}).get("edits", [])]
            for edit in earlier:
                data.apply(edit)
            # What the serving prompt was fitted on (rows earlier edits removed are dropped), and the
            # same rows after this batch's edits.
            x, y, present = data.snapshot()
            new_edits = [r.only([s for s in r.sample_ids if cluster_of.get(s) == cluster]) for r in requests]
            new_edits = [e for e in new_edits if e.sample_ids]
            for edit in new_edits:
                data.apply(edit)
            x, y, x_new, y_new, present_new = (
                x[present],
                y[present],
                data.x[present],
                data.y[present],
                data.present[present],
            )
            base = model.index.clusters[c]
            served_sha256 = previous["sha256"] if previous else base.sha256
            cluster_model = prepare_model(
                model.backbone, model.prompt_params, model.index.num_classes, model.state(c), dtype
            )
            theta, objective, report = influence_edit(
                cluster_model,
                x,
                y,
                x_new,
                y_new,
                present_new,
                ip,
                model.prompt_params.adapter.weight_decay,
                cluster_seed(params.seed, cluster),
                params.influence.threads,
            )
            state = objective.state(theta)
            states[c] = state
            losses = _edited_losses(objective, theta, x, y, x_new, y_new, present_new)
            confidence = _edited_confidence(objective, theta, x, y, x_new, y_new, present_new)
            edits = [*earlier, *new_edits]
            key = sha256_json(
                {
                    "base": base.key,
                    "edits": [e.request_id for e in edits],
                    "influence": ip.model_dump(),
                    "code": code_version(model.prompt_params.kind),
                }
            )
            stored = overlay.store.save(key, state, {"cluster": cluster, "base_key": base.key, "method": "influence"})
            edited[c] = {
                "key": key,
                "sha256": stored.sha256,
                "base_key": base.key,
                "base_sha256": base.sha256,
                "n_members": int(data.present.sum()),
                "seed": base.seed,
                "approximate": True,
                "edits": [e.to_json() for e in edits],
            }
            reports.append(
                {
                    "cluster": cluster,
                    "prompt_sha256_before": served_sha256,
                    "prompt_sha256_after": stored.sha256,
                    "exact_prompt_sha256": base.sha256,
                    "stacked_on_earlier_influence": previous is not None,
                    "edited_sample_loss": losses,
                    "edited_sample_confidence": confidence,
                    **report.to_json(),
                    "seconds_total": time.perf_counter() - t0,
                }
            )
            corrected = losses["corrected"]
            log(
                f"cluster {cluster}: influence update ({report.hessian}, λ={report.damping:.3g}, "
                f"CG {report.cg_iterations} it, residual {report.cg_relative_residual:.1e}) in {report.seconds:.2f}s; "
                f"loss of the edited samples as they were {losses['original']['before']:.3g} "
                f"-> {losses['original']['after']:.3g} (logit confidence {confidence['original']['before']:.3g} "
                f"-> {confidence['original']['after']:.3g})"
                + (
                    f", as corrected {corrected['before']:.3g} -> {corrected['after']:.3g}"
                    if corrected["before"] is not None
                    else ""
                )
            )
        failpoint("influence:edited")
        audit = _audit(ws, params, requests, model, states, log)
        overlay.write(edited)
        failpoint("influence:overlay-written")
        record = _record(
            ws, params, batch_id, requests, reports, {"load": load_seconds, "total": time.perf_counter() - start}, audit
        )
    failpoint("influence:record-appended")
    journal.append([event(r.request_id, "approximated", record=record.number) for r in requests])
    ws.influence_intent_file.unlink()
    log(
        f"lineage record {record.number} (method influence, approximate); "
        "the exact rebuild stays queued for `lmeraser unlearn`"
    )
    return {
        "record": record.number,
        "sha256": record.line_sha256,
        "clusters": clusters,
        "reports": reports,
        "requests": [r.request_id for r in requests],
        "forgetting_audit": audit,
        "seconds": time.perf_counter() - start,
    }


def _edited_losses(objective, theta, x, y, x_new, y_new, present) -> dict:
    """Mean cross-entropy, under the prompt before and after the update, of the edited samples as
    they were (should rise: the model lets go of them) and as corrected (should fall)."""
    x, y, x_new, y_new, present = rows_like(objective.theta0, x, y, x_new, y_new, present)
    changed = edited_rows(x, y, x_new, y_new, present)
    corrected = changed & present

    def mean_loss(theta, xs, ys):
        with torch.no_grad():
            return float(F.cross_entropy(objective.logits(theta, xs), ys)) if len(ys) else None

    return {
        "original": {
            "before": mean_loss(objective.theta0, x[changed], y[changed]),
            "after": mean_loss(theta, x[changed], y[changed]),
        },
        "corrected": {
            "before": mean_loss(objective.theta0, x_new[corrected], y_new[corrected]),
            "after": mean_loss(theta, x_new[corrected], y_new[corrected]),
        },
    }


def _edited_confidence(objective, theta, x, y, x_new, y_new, present) -> dict:
    """Mean logit-scaled confidence, log p_y - log(1 - p_y), of the edited samples as they were
    (should fall) and as corrected (should rise), before and after the update: unlike the
    cross-entropy it does not saturate at 0 on confidently fit samples, so a record shows what an
    update did even where the loss reads 0.0 before and after."""
    from lmeraser.audit.forgetting import logit_confidence

    x, y, x_new, y_new, present = rows_like(objective.theta0, x, y, x_new, y_new, present)
    changed = edited_rows(x, y, x_new, y_new, present)
    corrected = changed & present

    def mean_confidence(theta, xs, ys):
        with torch.no_grad():
            return float(logit_confidence(objective.logits(theta, xs).cpu(), ys.cpu()).mean()) if len(ys) else None

    return {
        "original": {
            "before": mean_confidence(objective.theta0, x[changed], y[changed]),
            "after": mean_confidence(theta, x[changed], y[changed]),
        },
        "corrected": {
            "before": mean_confidence(objective.theta0, x_new[corrected], y_new[corrected]),
            "after": mean_confidence(theta, x_new[corrected], y_new[corrected]),
        },
    }


@contextlib.contextmanager
def _intent(ws: Workspace, overlay: Overlay, batch_id: str, requests: list[Request]) -> Iterator[None]:
    """The influence intent on disk while the update runs; on an error, undone at once (what a kill
    leaves, the next run's recovery finishes or undoes)."""
    before = overlay.read() if overlay.path.exists() else None
    atomic_write_json(
        ws.influence_intent_file,
        {"batch_id": batch_id, "request_ids": [r.request_id for r in requests], "overlay_before": before},
    )
    try:
        yield
    except Exception:
        recover_influence(ws)
        raise


def influence_batch_id(requests: list[Request]) -> str:
    """An influence update's id: a digest of its requests' ids (what its intent file and record name).

    Args:
        requests: the update's requests, in the journal's order (oldest first).
    """
    return "influence-" + hashlib.sha256(",".join(r.request_id for r in requests).encode()).hexdigest()[:16]


def _audit(
    ws: Workspace, params: Params, requests: list[Request], model: ServingModel, states: dict[str, dict], log
) -> dict:
    """The forgetting audit of the update (lmeraser/audit/forgetting.py): how detectable each
    forgotten sample is in the served prompt before and in the edited one after. A FAIL here is the
    approximate edit's measured residue, recorded; the exact rebuild stays queued either way."""
    from lmeraser.audit import forgetting
    from lmeraser.salt import Keyer
    from lmeraser.score_cache import score_test_split

    key = Keyer(ws).subject
    if params.audit.references == 0:
        return forgetting.section(None, None, params, key, {})
    if not params.audit.influence:
        return forgetting.section(
            None, None, params, key, {}, reason="audit.influence is false: the exact batch that follows is audited"
        )
    start = time.perf_counter()
    batch_size = params.evaluate.batch_size
    _, routes, _ = score_test_split(ws, model, batch_size)
    state = forgetting.references_before(ws, params, requests, routes, log)
    if state is None:
        return forgetting.section(None, None, params, key, {})
    private = ws.split("private")
    row = {sid: i for i, sid in enumerate(private.sample_ids)}
    audited = [s for ids in state["chosen"].values() for s in ids]
    rows = [row[s] for s in audited]
    before = {
        "scores": forgetting.served_scores(model, private.images[rows], private.labels[rows], audited, batch_size),
        "digests": forgetting.served_digests(model, state["clusters"]),
    }
    after = {"scores": {}, "digests": {}}
    for cluster, info in state["clusters"].items():
        targets = [row[s] for s in info["targets"]]
        scored = forgetting.prompt_scores(
            model, "served after", states[cluster], private.images[targets], private.labels[targets], batch_size
        )
        after["scores"].update(zip(info["targets"], scored.targets))
        after["digests"][cluster] = scored.digest
    result = forgetting.conclude(state, params, before, after)
    section = forgetting.section(
        state, result, params, key, {"references": state["seconds"], "total": time.perf_counter() - start}
    )
    section["references"].pop("expected_rebuild", None)  # the edited prompt is tested, not a rebuild
    section["references"]["held"] = "in memory only; each dropped as soon as it was scored (never written)"
    section["references"]["in_reference_digests"] = forgetting.in_digests(state)
    counts = section["verdicts"]
    log(
        f"forgetting audit: {counts['forgotten']} forgotten, {counts['not-memorised']} not memorised, "
        f"{counts['FAIL']} still detectable (FAIL: the edit's residue)"
    )
    return section


def _record(
    ws: Workspace,
    params: Params,
    batch_id: str,
    requests: list[Request],
    reports: list[dict],
    seconds: dict,
    audit: dict | None = None,
):
    from lmeraser.salt import Keyer

    now = utc()
    predicate = InfluencePredicate(
        batch_id=batch_id,
        recorded_at=now,
        # Applied (served) now; completed only when the exact batch supersedes this record.
        requests=[RequestSummary.of(r, time.time(), None, Keyer(ws).subject) for r in requests],
        clusters_edited=reports,
        influence=params.influence.model_dump(mode="json"),
        data={"data_dvc_md5": data_md5(ws.root)},
        code=code_info(ws, params),
        environment=environment(params.prompt.kind, ws, params.influence.threads),
        seconds=seconds,
        forgetting_audit=audit,
    )
    return sign_and_append(ws, predicate)
