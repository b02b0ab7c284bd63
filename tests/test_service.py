"""`lmeraser serve`: the HTTP API on a real uvicorn on loopback, over a copy of a trained workspace.

The exact batch through the service's worker (a real `unlearn` flow in a DVC repository) and the
CLI's `--server` are tested end to end in test_e2e.py, which has that repository.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
import yaml

from lmeraser.config import parse_params
from lmeraser.errors import LmeraserError
from lmeraser.journal import Journal
from lmeraser.service.app import create_app
from lmeraser.service.auth import TOKEN_ENV, api_token, authorized
from lmeraser.service.worker import BatchWorker
from lmeraser.workspace import Workspace

from helpers import free_port, received_event


class Served:
    """A real uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def service(trained_workspace, tmp_path, monkeypatch):
    """The API (no batch worker) over a private copy of the trained workspace."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    source, _ = trained_workspace
    shutil.copytree(source.root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    token = api_token(ws)
    served = Served(create_app(ws, token, log=lambda m: None))
    client = httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    yield ws, client, served
    client.close()
    served.stop()


def _private_ids(ws: Workspace, n: int = 2) -> list[str]:
    return ws.manifest("private")["sample_id"].tolist()[:n]


def test_the_token_is_made_0600_once_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    ws = Workspace(tmp_path)
    with pytest.raises(LmeraserError, match="no API token"):
        api_token(ws, create=False)
    token = api_token(ws)
    assert ws.api_token_file.stat().st_mode & 0o777 == 0o600 and len(token) >= 32
    assert api_token(ws) == token == api_token(ws, create=False)
    ws.api_token_file.chmod(0o644)
    with pytest.raises(LmeraserError, match="readable by others"):
        api_token(ws)
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(LmeraserError, match="at least 16"):
        api_token(ws)
    monkeypatch.setenv(TOKEN_ENV, "x" * 40)
    assert api_token(ws) == "x" * 40
    assert authorized("Bearer " + "x" * 40, "x" * 40) and authorized("bearer " + "x" * 40, "x" * 40)
    assert (
        not authorized("Bearer " + "x" * 39, "x" * 40)
        and not authorized(None, "x" * 40)
        and not authorized("x" * 40, "x" * 40)
    )


def test_every_endpoint_but_health_needs_the_token(service):
    ws, client, served = service
    bare = httpx.Client(base_url=served.url, timeout=60)
    health = bare.get("/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["worker"] is None
    for method, path in [
        ("GET", "/v1/requests"),
        ("GET", "/v1/requests/req-x"),
        ("GET", "/v1/records"),
        ("GET", "/v1/records/1"),
        ("GET", "/v1/verify"),
        ("POST", "/v1/requests"),
        ("POST", "/v1/predict"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/nowhere"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic abc"}):
            answer = bare.request(method, path, headers=headers, json={})
            assert answer.status_code == 401, (method, path, headers)
            assert answer.headers["www-authenticate"] == "Bearer" and "bearer token" in answer.json()["error"]
    schema = client.get("/v1/openapi.json")
    assert schema.status_code == 200 and {
        "/v1/requests",
        "/v1/requests/{request_id}",
        "/v1/predict",
        "/v1/verify",
    } <= set(schema.json()["paths"])
    assert not Journal(ws).events()  # nothing an unauthorised call sent was journaled
    assert client.get("/nowhere").json() == {"error": "no such endpoint: GET /nowhere"}
    assert (
        client.delete("/v1/requests").status_code == 405
        and "not allowed" in client.delete("/v1/requests").json()["error"]
    )
    extra = client.post("/v1/requests", data={"request": "{}", "other": "x"}, files={"image": ("x", b"x")})
    assert extra.status_code == 400 and "error" in extra.json()


def test_a_forget_request_is_journaled_and_its_status_served(service):
    ws, client, _ = service
    ids = _private_ids(ws)
    answer = client.post("/v1/requests", json={"kind": "forget", "sample_ids": ids})
    assert answer.status_code == 201, answer.text
    [request] = answer.json()["requests"]
    assert request["state"] == "received" and request["kind"] == "forget" and request["method"] == "exact"
    assert [r.request_id for r in Journal(ws).pending()] == [request["request_id"]]
    assert list(Journal(ws).pending()[0].sample_ids) == ids
    status = client.get(f"/v1/requests/{request['request_id']}").json()
    assert status["history"][0]["state"] == "received" and status["deadline"] > status["received_at"]
    assert [r["request_id"] for r in client.get("/v1/requests", params={"pending": True}).json()] == [
        request["request_id"]
    ]
    assert client.get("/v1/requests", params={"overdue": True}).json() == []
    missing = client.get("/v1/requests/req-000000000000")
    assert missing.status_code == 404 and "unknown" in missing.json()["error"]


@pytest.mark.parametrize(
    "body, status, names",
    [
        ({"kind": "forget", "sample_ids": ["no-such-id"]}, 422, "no-such-id"),
        ({"kind": "forget", "sample_ids": ["x"], "label": "seven"}, 422, "label"),
        ({"kind": "rectify", "sample_ids": ["x"], "input": "/etc/passwd"}, 422, "input: unknown field"),
        ({"kind": "erase", "sample_ids": ["x"]}, 422, "kind"),
        ({"sample_ids": ["x"], "allow_backbone_rebuild": True}, 422, "allow_backbone_rebuild: unknown field"),
        ({"requests": [{"kind": "forget", "sample_ids": ["PRIVATE"]}, {"kind": "forget"}]}, 422, "requests[1]"),
        (
            {"requests": [{"kind": "forget", "sample_ids": ["PRIVATE"], "input": "/etc/passwd"}]},
            422,
            "requests[0].input",
        ),
        ([1, 2], 422, "JSON object"),
        # Strict types (issue 21): a label is an integer, never a bool or a float.
        ({"kind": "rectify", "sample_ids": ["PRIVATE"], "label": True}, 422, "label: Input should be a valid integer"),
        ({"kind": "rectify", "sample_ids": ["PRIVATE"], "label": 1.0}, 422, "label: Input should be a valid integer"),
        (
            {"requests": [{"kind": "rectify", "sample_ids": ["PRIVATE"], "label": True}]},
            422,
            "requests[0].label: an integer is expected, not true",
        ),
        (
            {"requests": [{"kind": "rectify", "sample_ids": ["PRIVATE"], "label": 2.0}]},
            422,
            "requests[0].label: an integer is expected, not 2.0",
        ),
    ],
)
def test_a_bad_request_gets_one_error_naming_the_field_and_nothing_is_journaled(service, body, status, names):
    ws, client, _ = service
    text = json.dumps(body).replace("PRIVATE", _private_ids(ws, 1)[0])
    answer = client.post("/v1/requests", content=text, headers={"Content-Type": "application/json"})
    assert answer.status_code == status and names in answer.json()["error"], answer.text
    assert not Journal(ws).events()


def test_malformed_oversized_and_unframed_bodies_are_refused(service):
    ws, client, served = service
    assert (
        client.post("/v1/requests", content=b"{not json", headers={"Content-Type": "application/json"}).status_code
        == 400
    )
    assert client.post("/v1/requests", content=b"a=b", headers={"Content-Type": "text/plain"}).status_code == 415
    big = client.post("/v1/requests", content=b"x" * ((16 << 20) + 1), headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "service.max_body_mib" in big.json()["error"]
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)  # chunked: no Content-Length
    connection.request(
        "POST",
        "/v1/requests",
        body=iter([b'{"kind": "forget"}']),
        headers={"Authorization": client.headers["authorization"], "Content-Type": "application/json"},
    )
    assert connection.getresponse().status == 411
    assert not Journal(ws).events()


def _served_with_a_1_mib_limit(trained_workspace, tmp_path, monkeypatch):
    """A copy of the trained workspace served with `service.max_body_mib: 1`; (token, server)."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    params = yaml.safe_load(ws.params_file.read_text())
    params["service"] = {**params.get("service", {}), "max_body_mib": 1}
    ws.params_file.write_text(yaml.safe_dump(parse_params(params).model_dump(mode="json")))
    token = api_token(ws)
    return token, Served(create_app(ws, token, log=lambda m: None))


def test_the_body_limit_comes_from_params(trained_workspace, tmp_path, monkeypatch):
    token, served = _served_with_a_1_mib_limit(trained_workspace, tmp_path, monkeypatch)
    try:
        answer = httpx.post(
            served.url + "/v1/predict", content=b"x" * ((1 << 20) + 10), headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 413 and "(1 MiB)" in answer.json()["error"]
    finally:
        served.stop()


def test_a_chunked_body_is_held_to_the_limit_whatever_content_length_says(trained_workspace, tmp_path, monkeypatch):
    """`Content-Length: 10` with `Transfer-Encoding: chunked`: the body actually read is counted,
    and the service answers 413 once it passes the limit, without waiting for (or reading) the rest."""
    import socket

    token, served = _served_with_a_1_mib_limit(trained_workspace, tmp_path, monkeypatch)
    answer = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
            head = (
                "POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            sock.sendall(head.encode())
            chunk = b"%x\r\n" % (64 << 10) + b" " * (64 << 10) + b"\r\n"
            try:
                for _ in range(20):  # 1.25 MiB, and the body is never finished (no last chunk)
                    sock.sendall(chunk)
            except OSError:
                pass  # the service closed the connection after answering: the rest was never read
            try:
                while block := sock.recv(65536):
                    answer += block
            except OSError:
                pass
    finally:
        served.stop()
    status = answer.split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 413 Request Entity Too Large", bytes(answer[:300])
    assert b"service.max_body_mib (1 MiB)" in answer


def test_predict_refuses_pixels_that_are_not_integers(service):
    ws, client, _ = service
    shape = tuple(ws.source_info()["image_shape"])
    image = np.full(shape, 7, dtype=np.int64).tolist()
    assert client.post("/v1/predict", json={"images": [image]}).status_code == 200
    for bad, shown_as in [(7.9, "7.9"), (True, "true"), ("7", '"7"'), (256, "256")]:
        broken = np.full(shape, 7, dtype=np.int64).tolist()
        broken[1][2] = bad
        answer = client.post("/v1/predict", json={"images": [image, broken]})
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["error"] == f"images[1][1][2]: pixels must be integers in 0..255, not {shown_as}.", (
            answer.text
        )
    answer = client.post("/v1/predict", json={"images": [[1, 2, 3]]})
    assert answer.status_code == 422 and "a list is expected here" in answer.json()["error"], answer.text


def test_a_rectify_request_takes_its_image_as_an_upload_copied_into_the_workspace(service):
    ws, client, _ = service
    sid = _private_ids(ws, 1)[0]
    shape = tuple(ws.source_info()["image_shape"])
    image = np.full(shape, 7, dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, image)
    answer = client.post(
        "/v1/requests",
        data={"request": json.dumps({"kind": "rectify", "sample_ids": [sid]})},
        files={"image": ("x.npy", buffer.getvalue())},
    )
    assert answer.status_code == 201, answer.text
    [pending] = Journal(ws).pending()
    copy = ws.root / pending.input_path
    assert np.array_equal(np.load(copy), image) and copy.stat().st_mode & 0o777 == 0o600
    from PIL import Image

    rgb = io.BytesIO()
    Image.new("RGB", shape[::-1]).save(rgb, format="PNG")
    refused = client.post(
        "/v1/requests",
        data={"request": json.dumps({"kind": "rectify", "sample_ids": [sid]})},
        files={"image": ("x.png", rgb.getvalue())},
    )
    assert refused.status_code == 422 and "grey" in refused.json()["error"]
    wrong = client.post(
        "/v1/requests",
        data={"request": json.dumps({"kind": "forget", "sample_ids": [sid]})},
        files={"image": ("x.npy", buffer.getvalue())},
    )
    assert wrong.status_code == 422 and "single rectify request" in wrong.json()["error"]
    assert len(Journal(ws).pending()) == 1


def test_predict_serves_the_model_and_says_which_cluster_answered(service):
    from lmeraser.inference import ServingModel

    ws, client, _ = service
    images = ws.split("test").images[:20]
    expected_labels, expected_routes = ServingModel.load(ws).predict(images)
    for answer in (
        client.post("/v1/predict", json={"images": images.tolist()}),
        client.post("/v1/predict", content=_npy(images), headers={"Content-Type": "application/x-npy"}),
    ):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["labels"] == expected_labels.tolist() and body["clusters"] == expected_routes.tolist()
        assert set(body["served"].values()) == {"exact"} and set(map(int, body["served"])) == set(
            expected_routes.tolist()
        )
    wrong = client.post("/v1/predict", json={"images": images[:, :-1].tolist()})
    assert wrong.status_code == 422 and "shape" in wrong.json()["error"]
    assert client.post("/v1/predict", json={"images": [[[300] * images.shape[2]] * images.shape[1]]}).status_code == 422
    assert (
        client.post(
            "/v1/predict", content=_npy(images.astype(np.float32)), headers={"Content-Type": "application/x-npy"}
        ).status_code
        == 422
    )


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_influence_request_is_answered_after_its_update_is_served_and_signed(service):
    ws, client, _ = service
    sid = _private_ids(ws, 1)[0]
    assert client.get("/v1/records").json() == []
    unverifiable = client.get("/v1/verify")
    assert unverifiable.status_code == 409 and unverifiable.json()["ok"] is False
    answer = client.post("/v1/requests", json={"kind": "forget", "sample_ids": [sid], "method": "influence"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["influence"]["record"] == 1 and body["requests"][0]["state"] == "approximated"
    [record] = client.get("/v1/records").json()
    assert record["number"] == 1 and record["summary"]["method"] == "influence (approximate)"
    envelope = client.get("/v1/records/1")
    assert envelope.content == ws.lineage_file.read_bytes().rstrip(b"\n") and "payload" in envelope.json()
    assert client.get("/v1/records/2").status_code == 404
    verified = client.get("/v1/verify").json()
    assert verified["ok"] is True and verified["records"] == 1
    served = client.post("/v1/predict", json={"images": ws.split("test").images[:50].tolist()}).json()
    assert "approximate" in served["served"].values()  # the overlay is what the edited cluster serves now
    # The record signs the forgetting audit of the update: the sample's verdict under a keyed id,
    # and the edited sample's logit confidence (which does not saturate as the loss does).
    from lmeraser.audit.forgetting import VERDICTS
    from lmeraser.lineage.records import lineage_log

    predicate = lineage_log(ws).read_unverified()[0].predicate
    audit = predicate["forgetting_audit"]
    assert audit["status"] == "audited" and audit["samples_audited"] == 1 and audit["references_per_side"] == 4
    [sample] = audit["samples"]
    assert sample["verdict"] in VERDICTS and sample["sample_key"] != sid and sid not in json.dumps(predicate)
    assert sample["after"]["p_value"] is not None and sample["before"]["fit_in"]["n"] >= 2
    confidence = predicate["clusters_edited"][0]["edited_sample_confidence"]["original"]
    assert confidence["before"] != confidence["after"]


def test_the_worker_starts_a_batch_when_the_window_passed_or_the_batch_is_full(tmp_path):
    """The worker's schedule, with a batch runner that records its calls (the real batch through
    the `unlearn` flow is tested end to end in test_e2e.py)."""
    from lmeraser.config import ServiceParams

    ws = Workspace(tmp_path)
    calls = []
    worker = BatchWorker(
        ws,
        ServiceParams(batch_window_s=60, max_batch=3),
        lambda n: calls.append(n) or {"batch_id": "b", "record": 1, "rebuilt": []},
    )
    assert not worker.due(time.time())
    journal = Journal(ws)
    now = time.time()

    def receive(request_id: str, at: float) -> None:
        journal.append([received_event(request_id, at)])

    receive("req-a", now)
    assert not worker.due(now + 1) and worker.due(now + 61)  # the window
    receive("req-b", now)
    receive("req-c", now)
    assert worker.due(now + 1)  # a full batch does not wait
    assert worker.run_once() is not None and calls == [3] and worker.status()["batches"] == 1
    failing = BatchWorker(
        ws, ServiceParams(batch_window_s=0, max_batch=3), lambda n: (_ for _ in ()).throw(LmeraserError("disk full"))
    )
    assert failing.run_once() is None and failing.status()["last_error"] == "disk full"
    assert not failing.due(time.time()) and failing.due(
        time.time() + 6
    )  # tried again after a pause, not in a tight loop
    ws.batches.mkdir(parents=True, exist_ok=True)
    (ws.batches / "batch-0123.json").write_text("{}")
    assert BatchWorker(ws, ServiceParams(batch_window_s=60, max_batch=100), lambda n: None).due(
        now
    )  # an interrupted batch: at once


def test_the_worker_warms_up_first_and_tracks_the_backlog_only_when_no_request_waits(tmp_path):
    """The service's worker: its warm-up runs once before any batch; a batch's MLflow runs (the
    tracking backlog) are tracked when idle, after pending requests; a failed tracking is tried
    again after TRACKING_RETRY_S, not in a tight loop, and never stops the worker."""
    from lmeraser import tracking
    from lmeraser.config import ServiceParams
    from lmeraser.service.worker import TRACKING_RETRY_S

    ws = Workspace(tmp_path)
    order = []
    outage = {"on": True}

    def run_batch(n: int) -> dict | None:
        if not Journal(ws).pending():
            return None
        order.append("batch")
        Journal(ws).append([{"request_id": "req-a", "state": "verified", "time": time.time(), "record": 1}])
        tracking.defer_run(ws, "unlearn", {"clusters_rebuilt": 1})
        return {"batch_id": "b", "record": 1, "rebuilt": [0]}

    def run_tracking() -> dict:
        order.append("tracking")
        if outage["on"]:
            raise ConnectionError("tracking server down")
        tracking.backlog_file(ws).unlink()
        return {"tracked": ["unlearn"], "waiting": []}

    lines = []
    params = ServiceParams(batch_window_s=0, full_scan_every_s=0)
    worker = BatchWorker(
        ws,
        params,
        run_batch,
        lines.append,
        poll_s=0.05,
        run_tracking=run_tracking,
        warm_up=lambda: order.append("warm-up"),
    )
    assert not worker.status()["warm"] and not worker.tracking_due(time.time())  # nothing waits
    Journal(ws).append([received_event("req-a")])
    worker.start()
    try:
        deadline = time.time() + 30
        while order.count("tracking") < 1 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the worker polls on: a failed tracking must not be retried at once
    finally:
        worker.stop(timeout=30)
    assert order == ["warm-up", "batch", "tracking"] and worker.status()["warm"]
    assert worker.status()["last_tracking"]["waiting"] == ["backlog"] and "tracking server down" in lines[-1]
    now = time.time()
    assert (
        tracking.backlog_file(ws).exists()
        and not worker.tracking_due(now)
        and worker.tracking_due(now + TRACKING_RETRY_S)
    )
    outage["on"] = False
    worker._tracking_failed_at = 0.0  # the retry interval passed
    assert (
        worker.track_once()["tracked"] == ["unlearn"]
        and not tracking.backlog_file(ws).exists()
        and not worker.tracking_due(time.time())
    )


def test_a_request_wakes_the_worker_instead_of_waiting_for_its_poll(tmp_path):
    """The API wakes the worker when it journals a request: a batch starts at once even with a long poll."""
    from lmeraser.config import ServiceParams

    ws = Workspace(tmp_path)
    started = []
    worker = BatchWorker(
        ws,
        ServiceParams(batch_window_s=0, full_scan_every_s=0),
        lambda n: started.append(time.time()) and None,
        poll_s=60,
    )
    worker.start()
    try:
        time.sleep(0.3)  # the worker is now waiting out its 60 s poll
        at = time.time()
        Journal(ws).append([received_event("req-a", at)])
        worker.wake()
        deadline = time.time() + 10
        while not started and time.time() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop(timeout=10)
    assert started and started[0] - at < 5 and not worker.status()["running"]


def test_the_idle_worker_reads_every_store_again_on_its_schedule_and_shows_hits(tmp_path):
    """service.full_scan_every_s: the real full scan (lmeraser/service/worker.full_scan) on a tiny
    workspace, due after the interval (kept in the scan index across restarts); a copy of a
    forgotten image planted in an indexed file is found and shown."""
    import numpy as np

    from lmeraser.config import ServiceParams
    from lmeraser.data.splits import content_hash
    from lmeraser.lineage.log import LineageLog
    from lmeraser.lineage.records import signing_key
    from lmeraser.salt import Keyer

    ws = Workspace(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    ws.data.mkdir(parents=True)
    np.save(ws.data / "images.npy", images[1:])
    erased = Keyer(ws).content(content_hash(images[0]))
    LineageLog(ws.lineage_file).append(
        {"x": "0" * 64}, {"batch_id": "b1", "removed_content_keys": [erased], "clusters_rebuilt": []}, signing_key(ws)
    )
    lines = []
    worker = BatchWorker(ws, ServiceParams(full_scan_every_s=3600), lambda n: None, lines.append)
    now = time.time()
    assert worker.full_scan_due(now)  # never scanned in full
    first = worker.scan_once()
    assert first["hits"] == 0 and first["files_read"]["data"] == 1 and first["index"]["mode"] == "full"
    assert not worker.full_scan_due(now + 60) and worker.full_scan_due(now + 3601)
    # A restarted worker reads the last full scan's time from the index.
    again = BatchWorker(ws, ServiceParams(full_scan_every_s=3600), lambda n: None, lines.append)
    done = first["finished_at"]
    assert not again.full_scan_due(done) and again.full_scan_due(done + 3600)
    assert not BatchWorker(ws, ServiceParams(full_scan_every_s=0), lambda n: None).full_scan_due(
        now + 10**9
    )  # 0: never
    # Someone writes the erased image back into the indexed file, keeping its size and mtime.
    victim = ws.data / "images.npy"
    st = victim.stat()
    with open(victim, "r+b") as handle:
        np.save(handle, np.concatenate([images[:1], images[2:]]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    found = again.scan_once()
    assert (
        found["hits"] == 1
        and found["locations_with_hits"] == ["data"]
        and "1 hit(s): forgotten data survives in data" in lines[-1]
    )
    assert again.status()["last_full_scan"]["hits"] == 1
    broken = BatchWorker(
        ws, ServiceParams(), lambda n: None, lines.append, run_scan=lambda: (_ for _ in ()).throw(OSError("disk gone"))
    )
    assert broken.scan_once() is None and broken.status()["last_full_scan"]["error"] == "disk gone" and not broken.busy


def test_serve_command_without_worker_and_the_cli_refusals_over_http(trained_workspace, tmp_path, monkeypatch):
    """`lmeraser serve --no-worker --host 127.0.0.1` as a real process; `--server` refuses options
    that belong to the service, and an unreachable service is one sentence."""
    import os
    import signal
    import subprocess

    from helpers import BIN, lmeraser_cli

    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    root = tmp_path / "ws"
    monkeypatch.setenv(TOKEN_ENV, "t" * 32)
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "lmeraser"), "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        start_new_session=True,
        stdout=subprocess.PIPE,  # uvicorn's access log
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, (
                    proc.stderr.read() if proc.poll() is not None else "no answer"
                )
                time.sleep(0.3)
        assert health.json()["worker"] is None
        # A token in the query string is refused and never written to the access log (issue 21).
        assert (
            httpx.get(f"http://127.0.0.1:{port}/v1/requests?token=QUERYSECRET0123&sample=s42", timeout=30).status_code
            == 401
        )
        sid = Workspace(root).manifest("private")["sample_id"][0]
        done = lmeraser_cli("forget", "--server", f"http://127.0.0.1:{port}", "--sample-id", sid, cwd=root)
        assert done.returncode == 0 and "accepted req-" in done.stdout and "state received" in done.stdout, done.stderr
        assert [list(r.sample_ids) for r in Journal(Workspace(root)).pending()] == [[sid]]
        other = Workspace(root).manifest("private")["sample_id"][1]
        image = np.zeros(tuple(Workspace(root).source_info()["image_shape"]), dtype=np.uint8)
        np.save(tmp_path / "fixed.npy", image)
        done = lmeraser_cli(
            "rectify",
            "--server",
            f"http://127.0.0.1:{port}",
            "--sample-id",
            other,
            "--input",
            str(tmp_path / "fixed.npy"),
            "--json",
            cwd=root,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["requests"][0]["kind"] == "rectify"
        copy = root / Journal(Workspace(root)).pending()[1].input_path
        assert np.array_equal(np.load(copy), image)  # the image travelled as bytes and was copied in
        refused = lmeraser_cli(
            "forget", "--server", f"http://127.0.0.1:{port}", "--sample-id", sid, "--no-process", cwd=root
        )
        assert refused.returncode == 1 and "--process/--no-process belongs to the service" in refused.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    log = proc.stderr.read() + proc.stdout.read()
    assert "t" * 32 not in log  # the token is never logged
    assert '"GET /v1/requests HTTP/1.1" 401' in log and "QUERYSECRET0123" not in log and "s42" not in log, log[-2000:]
    gone = lmeraser_cli("requests", "--server", f"http://127.0.0.1:{port}", cwd=root)
    assert gone.returncode == 1 and "cannot be reached" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1
