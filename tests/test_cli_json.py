"""`--json` on forget, rectify, unlearn and audit verify|show|scan (replay: tests/test_e2e.py): one
JSON document on stdout, progress on stderr; and --method as a declared choice."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lmeraser.cli import app
from lmeraser.lineage.log import LineageLog
from lmeraser.lineage.records import deployed_subjects, signing_key
from lmeraser.workspace import Workspace


@pytest.fixture
def ws(trained_workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("LMERASER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("LMERASER_SIGNING_KEY_FILE", raising=False)
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def _json(*args):
    done = CliRunner().invoke(app, list(args))
    assert done.exit_code == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout), done


def test_forget_rectify_and_unlearn_answer_in_json(ws):
    ids = ws.split("private").sample_ids
    answer, done = _json("forget", "--root", str(ws.root), "--sample-id", ids[0], "--no-process", "--json")
    assert answer["method"] == "exact" and answer["batch"] is None and answer["influence"] is None
    assert [a["sample_ids"] for a in answer["accepted"]] == [[ids[0]]] and answer["accepted"][0][
        "request_id"
    ].startswith("req-")
    assert "accepted req-" in done.stderr  # progress goes to stderr, not into the document
    answer, _ = _json(
        "rectify", "--root", str(ws.root), "--sample-id", ids[1], "--label", "3", "--no-process", "--json"
    )
    assert answer["accepted"][0]["kind"] == "rectify" and answer["accepted"][0]["label"] == 3
    answer, _ = _json("requests", "--root", str(ws.root), "--json")
    assert [r["state"] for r in answer] == ["received", "received"]


def test_idle_unlearn_answers_in_json_without_a_flow(ws):
    answer, _ = _json("unlearn", "--root", str(ws.root), "--json")
    assert answer == {"batch": None}


def test_audit_verify_show_and_scan_answer_in_json(ws):
    log = LineageLog(ws.lineage_file)
    log.append(
        deployed_subjects(ws), {"batch_id": "b1", "removed_content_keys": [], "clusters_rebuilt": []}, signing_key(ws)
    )
    answer, _ = _json("audit", "verify", "--root", str(ws.root), "--json")
    assert (
        answer["ok"] is True
        and answer["records"] == 1
        and answer["signer"].startswith("ed25519:")
        and answer["deployed_match_record"] == 1
    )
    answer, _ = _json("audit", "show", "--root", str(ws.root), "--json")
    assert [r["number"] for r in answer] == [1] and answer[0]["statement"]["predicate"]["batch_id"] == "b1"
    answer, _ = _json("audit", "scan", "--root", str(ws.root), "--json")
    assert answer["hits"] == [] and answer["erased_samples"] == 0 and answer["files_scanned"]["data"] > 0
    # The validate stage made the salt: the first scan reads everything and keeps its index.
    assert answer["index"]["mode"] == "full" and answer["index"]["reason"] == "no scan index yet"


def test_audit_scan_is_incremental_after_the_first_and_full_on_demand(ws):
    from lmeraser.salt import Keyer

    Keyer(ws)  # the salt the first request makes
    answer, _ = _json("audit", "scan", "--root", str(ws.root), "--json")
    assert answer["index"]["mode"] == "full" and answer["files_read"] == answer["files_scanned"]
    answer, _ = _json("audit", "scan", "--root", str(ws.root), "--json")
    assert answer["index"]["mode"] == "incremental" and sum(answer["files_read"].values()) == 0
    answer, _ = _json("audit", "scan", "--root", str(ws.root), "--full", "--json")
    assert answer["index"] == {
        "mode": "full",
        "reason": "a full scan was asked for",
        "sha256": answer["index"]["sha256"],
    }
    assert answer["files_read"] == answer["files_scanned"]
    done = CliRunner().invoke(app, ["audit", "scan", "--root", str(ws.root)])
    assert done.exit_code == 0 and "read 0 of them, the rest unchanged since the scan index read them" in done.stdout


def test_method_is_a_declared_choice(ws):
    done = CliRunner().invoke(app, ["forget", "--root", str(ws.root), "--sample-id", "x", "--method", "sideways"])
    assert done.exit_code == 2 and "sideways" in done.stderr and "exact" in done.stderr
    helped = CliRunner().invoke(app, ["forget", "--help"], terminal_width=200)
    assert "exact" in helped.stdout and "influence" in helped.stdout
