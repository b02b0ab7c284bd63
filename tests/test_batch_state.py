"""The typed request and batch steps read what the untyped code wrote, and sign the same bytes.

tests/data/ holds files made by the code before the typed `Request` and step results (commit
4d9095f): a batch stopped after its `verify` step (two forgets, one by subject, a label and an
image correction, and a no-op forget of an id erased by an earlier batch), that workspace's
journal, its test salt, and the exact predicate that code built from the batch (its clock and
environment fixed). The new code must resume such a batch and record it identically.
"""

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from lmeraser.config import parse_params
from lmeraser.errors import LmeraserError
from lmeraser.journal import Journal
from lmeraser.request import Request
from lmeraser.unlearning import exact
from lmeraser.unlearning.steps import BatchState, Capture, Purged, Verified
from lmeraser.workspace import Workspace

from helpers import TINY

DATA = Path(__file__).parent / "data"
OLD_BATCH = DATA / "batch-state-v1.json"


def _old_batch() -> dict:
    return json.loads(OLD_BATCH.read_text())


def test_a_batch_file_written_before_the_typed_steps_reads_and_writes_back_unchanged():
    old = _old_batch()
    assert set(old["done"]) == {
        "capture",
        "apply",
        "version",
        "rebuild",
        "purge",
        "verify",
    }  # the file covers every saved step
    state = BatchState.from_json(old)
    assert isinstance(state.done["capture"], Capture) and isinstance(state.done["verify"], Verified)
    assert all(isinstance(r, Request) for r in state.requests)
    assert state.to_json() == old


def test_an_altered_batch_file_is_refused_not_guessed():
    old = _old_batch()
    for broken in (
        {**old, "done": {**old["done"], "rebuild": {**old["done"]["rebuild"], "rebuilt": "all"}}},  # a wrong type
        {
            **old,
            "done": {
                **old["done"],
                "capture": {k: v for k, v in old["done"]["capture"].items() if k != "planned_clusters"},
            },
        },
        {**old, "done": {**old["done"], "audit": {}}},  # a step that does not exist
        {**old, "requests": [{**old["requests"][0], "kind": "erase"}]},
        {**old, "surprise": 1},
    ):
        with pytest.raises((ValueError, ValidationError)):
            BatchState.from_json(broken)


def test_a_batch_file_from_before_content_keys_still_reads():
    """Keys the older batch files lacked (the code read them with .get) are optional."""
    old = _old_batch()
    capture = {
        k: v
        for k, v in old["done"]["capture"].items()
        if k not in ("exact_keys", "supersedes", "outside_change", "forgetting_audit", "exact_prompts")
    }
    state = BatchState.from_json({**old, "done": {"capture": capture}})
    assert state.done["capture"].exact_keys is None and state.done["capture"].supersedes == []


def test_the_purge_result_leaves_out_an_empty_unreachable_list_as_before():
    purged = Purged(
        artifact_files_removed=0,
        feature_cache_rows_removed=0,
        registry={},
        dvc_gc=True,
        remotes_gc=[],
        remotes_failed=[],
        remote_gc=False,
    )
    assert "artifact_stores_unreachable" not in purged.to_json()
    assert purged.model_copy(update={"artifact_stores_unreachable": ["s3://x: down"]}).to_json()[
        "artifact_stores_unreachable"
    ] == ["s3://x: down"]


@pytest.fixture
def old_workspace(tmp_path):
    ws = Workspace(tmp_path)
    ws.subject_salt_file.parent.mkdir(parents=True, mode=0o700)
    shutil.copy(DATA / "subject-salt-v1", ws.subject_salt_file)
    ws.subject_salt_file.chmod(0o600)
    return ws


def test_the_record_of_an_old_batch_is_byte_for_byte_the_record_the_old_code_made(old_workspace, monkeypatch):
    monkeypatch.setattr(exact, "utc", lambda *when: "2026-12-05T00:00:00Z")
    monkeypatch.setattr(exact, "environment", lambda *args: {"fixed": "environment"})
    batch = exact.UnlearnBatch(old_workspace, parse_params(TINY), BatchState.from_json(_old_batch()))
    made = json.dumps(batch.predicate().model_dump(mode="json"), sort_keys=True, indent=1) + "\n"
    assert made == (DATA / "predicate-v1.json").read_text()


def test_the_record_check_is_not_vacuous(old_workspace, monkeypatch):
    """The golden comparison above fails when one signed field changes."""
    monkeypatch.setattr(exact, "utc", lambda *when: "2026-12-05T00:00:00Z")
    monkeypatch.setattr(exact, "environment", lambda *args: {"fixed": "environment"})
    old = _old_batch()
    old["done"]["apply"]["erased_content_keys"] = old["done"]["apply"]["erased_content_keys"][1:]
    batch = exact.UnlearnBatch(old_workspace, parse_params(TINY), BatchState.from_json(old))
    made = json.dumps(batch.predicate().model_dump(mode="json"), sort_keys=True, indent=1) + "\n"
    assert made != (DATA / "predicate-v1.json").read_text()


def test_a_journal_written_before_the_typed_request_reads_as_typed_requests(old_workspace):
    shutil.copy(DATA / "journal-v1.jsonl", old_workspace.journal_file)
    journal = Journal(old_workspace)
    entries = journal.requests()
    pending = journal.pending()
    assert [r.request_id for r in pending] == [r["request_id"] for r in _old_batch()["requests"]]
    assert [r.to_json() for r in pending] == _old_batch()[
        "requests"
    ]  # the batch file and the journal agree, field for field
    assert sum(e.state == "verified" for e in entries.values()) == 1
    assert journal.forgotten_subjects() == set()  # the first batch forgot by id only
    kinds = {r.kind for r in pending}
    assert (
        kinds == {"forget", "rectify"}
        and any(r.subject_hashes for r in pending)
        and any(r.already_forgotten for r in pending)
    )
    # The batch file written then agrees with this journal and with its own name: it resumes.
    from lmeraser.unlearning.exact import _disagreement

    state = BatchState.from_json(_old_batch())
    assert _disagreement(state, state.batch_id, journal) is None
    assert _disagreement(state, "batch-0000000000000000", journal) is not None


def test_a_journal_event_with_a_malformed_request_is_refused(old_workspace):
    lines = (DATA / "journal-v1.jsonl").read_text().splitlines()
    event = json.loads(lines[0])
    event["request"]["sample_ids"] = "s1"  # a string, not a list
    old_workspace.journal_file.parent.mkdir(parents=True, exist_ok=True)
    old_workspace.journal_file.write_text("\n".join([json.dumps(event), *lines[1:]]) + "\n")
    with pytest.raises(LmeraserError, match="line 1: not a journal event"):
        Journal(old_workspace).pending()


def test_requests_are_frozen():
    request = Request.model_validate(_old_batch()["requests"][0])
    with pytest.raises(ValidationError):
        request.kind = "rectify"
    assert request.only(list(request.sample_ids[:1])).sample_ids == request.sample_ids[:1]


def test_the_record_schema_in_the_docs_is_generated_from_the_models_and_holds_a_real_record():
    import jsonschema

    from lmeraser.lineage.records import record_schema

    schema = record_schema()
    assert json.loads((Path(__file__).parents[1] / "docs" / "record-schema.json").read_text()) == schema, (
        "run `lmeraser audit schema --out docs/record-schema.json`"
    )
    predicate = {
        **json.loads((DATA / "predicate-v1.json").read_text()),
        "sequence": 2,
        "previous_record_sha256": "0" * 64,
        "anchored": True,
    }
    jsonschema.validate(predicate, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in predicate.items() if k != "removed_content_keys"}, schema)
