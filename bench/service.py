"""Load, latency and crashes of `lmeraser serve` on the digits demo.

    python bench/service.py [--requests 1000] [--clients 20] [--distinct 500] [--influence 5] [--kills 3]
                            [--params configs/...] [--max-batch 100] [--window 10]

In a scratch git + DVC copy of this repository (bench/results/work-service/), after `lmeraser
data init` + `dvc repro`, starts `lmeraser serve` (a real uvicorn and its batch worker) and:
  1. submits `--requests` forget requests over HTTP from `--clients` concurrent clients (each names
     one private sample, drawn with replacement from `--distinct` of them: repeats are the
     duplicate requests a real portal sends), and waits until the worker verified all of them;
     checks every request was journaled and verified exactly once and counts the batches;
  2. times `--influence` influence forgets through the service (round trip: submit, update,
     record, answer), one at a time;
  3. `--kills` times: submits 20 requests, SIGKILLs the service's process group a random moment
     into the batch, restarts it, and checks the batch resumed: every request verified exactly
     once, nothing pending, `audit verify` and `audit scan` clean at the end.
Saves bench/results/service[-<params stem>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
from scratch import BIN, bench_env, build_demo  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import cpu_model  # noqa: E402

TOKEN = "bench-" + "s" * 40


class Service:
    def __init__(self, work: Path, env: dict, port: int, log_path: Path | None = None):
        self.work, self.env, self.port = work, env, port
        self.log_path = log_path or work.parent / "serve.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [str(BIN / "lmeraser"), "serve", "--port", str(self.port)],
            cwd=self.work,
            env=self.env,
            start_new_session=True,
            stdout=log,
            stderr=log,
        )
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                if self.proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise SystemExit(f"lmeraser serve did not start; see {self.log_path}") from None
                time.sleep(0.2)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=120)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600)


def journal(work: Path) -> list[dict]:
    from lmeraser.journal import Journal
    from lmeraser.workspace import Workspace

    return Journal(Workspace(work)).events()


def wait_verified(work: Path, ids: set[str], timeout: float) -> float:
    t0 = time.perf_counter()
    while True:
        states = {}
        for event in journal(work):
            states[event["request_id"]] = event["state"]
        if all(states.get(i) == "verified" for i in ids):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(
                f"{sum(states.get(i) != 'verified' for i in ids)} request(s) not verified after {timeout:.0f}s"
            )
        time.sleep(0.1)  # the round trip's resolution


def exactly_once(work: Path, ids: set[str], complete: bool = False) -> list[str]:
    """Each of `ids` received and verified exactly once; with `complete`, no other request in the journal."""
    events = journal(work)
    received = Counter(e["request_id"] for e in events if e["state"] == "received")
    verified = Counter(e["request_id"] for e in events if e["state"] == "verified")
    problems = [
        f"{i}: received {received[i]}x, verified {verified[i]}x"
        for i in sorted(ids)
        if received[i] != 1 or verified[i] != 1
    ]
    return problems + (
        [f"{e}: a request nobody submitted is in the journal" for e in set(received) - ids] if complete else []
    )


def exact_records(work: Path) -> int:
    from lmeraser.lineage.log import LineageLog

    return sum(
        r.predicate.get("method") != "influence" for r in LineageLog(work / "audit" / "lineage.jsonl").read_unverified()
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(service: Service, samples: list[str], clients: int) -> tuple[list[str], list[float], list[str]]:
    """Submit one forget request per entry of `samples` from `clients` threads."""
    ids, latencies, errors = [], [], []
    lock = threading.Lock()
    shares = [samples[i::clients] for i in range(clients)]

    def worker(share: list[str]) -> None:
        with service.client() as client:
            for sid in share:
                t0 = time.perf_counter()
                answer = client.post("/v1/requests", json={"kind": "forget", "sample_ids": [sid]})
                elapsed = time.perf_counter() - t0
                with lock:
                    if answer.status_code == 201:
                        ids.append(answer.json()["requests"][0]["request_id"])
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{answer.status_code}: {answer.text[:200]}")

    threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids, latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--distinct", type=int, default=500, help="distinct private samples the requests name")
    parser.add_argument("--influence", type=int, default=5, help="influence forgets to time")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument(
        "--params", type=Path, default=None, help="params preset (default: params.yaml, digits with pad prompts)"
    )
    parser.add_argument("--max-batch", type=int, default=None, help="service.max_batch (default: the params file's)")
    parser.add_argument(
        "--window", type=float, default=None, help="service.batch_window_s (default: the params file's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import yaml

    from lmeraser.workspace import Workspace

    from helpers import free_port

    def service_params(values: dict) -> None:
        values.setdefault("service", {})
        if args.max_batch is not None:
            values["service"]["max_batch"] = args.max_batch
        if args.window is not None:
            values["service"]["batch_window_s"] = args.window

    rng = random.Random(args.seed)
    env = bench_env(LMERASER_API_TOKEN=TOKEN)
    work = build_demo("service", env, args.params, service_params)
    params = yaml.safe_load((work / "params.yaml").read_text())

    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
        "params": str(args.params or "params.yaml"),
        "prompt_kind": params["prompt"]["kind"],
        "service": params["service"],
    }
    service = Service(work, env, free_port())
    result["start_seconds"] = round(service.start(), 1)
    print(f"service up in {result['start_seconds']}s", flush=True)
    private = Workspace(work).manifest("private")["sample_id"].tolist()
    rng.shuffle(private)
    reserve = private[-(args.influence + 1 + 20 * args.kills) :] if args.influence or args.kills else []
    pool = private[: min(args.distinct, len(private) - len(reserve))]
    all_ids: set[str] = set()
    problems: list[str] = []

    if args.requests:
        records_before = exact_records(work)
        samples = [rng.choice(pool) for _ in range(args.requests)]
        t0 = time.perf_counter()
        ids, latencies, errors = load(service, samples, args.clients)
        submitted = time.perf_counter() - t0
        done = wait_verified(work, set(ids), timeout=7200) + submitted
        all_ids |= set(ids)
        problems += errors + exactly_once(work, set(ids))
        result["load"] = {
            "requests": args.requests,
            "clients": args.clients,
            "distinct_samples": len(set(samples)),
            "accepted": len(ids),
            "refused": len(errors),
            "submit_p50_ms": round(1000 * statistics.median(latencies), 1),
            "submit_p99_ms": round(1000 * pct(latencies, 0.99), 1),
            "submit_max_ms": round(1000 * max(latencies), 1),
            "all_submitted_s": round(submitted, 1),
            "all_verified_s": round(done, 1),
            "batches": exact_records(work) - records_before,
        }
        print(f"load: {json.dumps(result['load'])}", flush=True)

    if args.influence:
        times, ids = [], []
        with service.client() as client:
            for sid in reserve[: args.influence]:
                t0 = time.perf_counter()
                answer = client.post(
                    "/v1/requests", json={"kind": "forget", "sample_ids": [sid], "method": "influence"}
                )
                times.append(time.perf_counter() - t0)
                if answer.status_code != 201 or not answer.json()["influence"]:
                    problems.append(f"influence {sid}: {answer.status_code} {answer.text[:200]}")
                else:
                    ids.append(answer.json()["requests"][0]["request_id"])
        # The same through the CLI as a fresh process (`lmeraser forget --server URL --method influence`).
        cli_sid = reserve[args.influence] if len(reserve) > args.influence else None
        cli_s = None
        if cli_sid is not None:
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    str(BIN / "lmeraser"),
                    "forget",
                    "--server",
                    service.url,
                    "--sample-id",
                    cli_sid,
                    "--method",
                    "influence",
                    "--json",
                ],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            cli_s = time.perf_counter() - t0
            if done.returncode != 0:
                problems.append(f"CLI influence: {done.stderr.strip()[-200:]}")
            else:
                ids.append(json.loads(done.stdout)["requests"][0]["request_id"])
        wait_verified(work, set(ids), timeout=1800)  # their exact batch, by the worker
        all_ids |= set(ids)
        result["influence"] = {
            "updates": len(times),
            "round_trip_p50_s": round(statistics.median(times), 3),
            "round_trip_max_s": round(max(times), 3),
            "cli_round_trip_s": round(cli_s, 2) if cli_s is not None else None,
        }
        print(f"influence: {json.dumps(result['influence'])}", flush=True)

    kills = []
    for k in range(args.kills):
        batch = reserve[args.influence + 1 + 20 * k : args.influence + 1 + 20 * (k + 1)]
        with service.client() as client:
            ids = {
                client.post("/v1/requests", json={"kind": "forget", "sample_ids": [sid]}).json()["requests"][0][
                    "request_id"
                ]
                for sid in batch
            }
            deadline = time.time() + 600
            while not client.get("/v1/health").json()["worker"]["busy"]:
                if time.time() > deadline:
                    raise SystemExit("the worker never started the batch")
                time.sleep(0.1)
        at = rng.uniform(0.5, 8)  # a digits batch takes about 25 s: the kill lands inside it
        time.sleep(at)
        half_done = bool(list((work / "audit" / "batches").glob("batch-*.json")))
        service.kill()
        restart = service.start()
        waited = wait_verified(work, ids, timeout=1800)
        found = exactly_once(work, ids)
        all_ids |= ids
        problems += found
        kills.append(
            {
                "killed_after_s": round(at, 1),
                "batch_in_progress": half_done,
                "restart_s": round(restart, 1),
                "verified_after_restart_s": round(waited, 1),
                "problems": found,
            }
        )
        print(f"kill {k + 1}/{args.kills}: {kills[-1]}", flush=True)
    result["kills"] = kills
    service.stop()

    verify = subprocess.run(
        [str(BIN / "lmeraser"), "audit", "verify"], cwd=work, env=env, capture_output=True, text=True
    )
    scan = subprocess.run([str(BIN / "lmeraser"), "audit", "scan"], cwd=work, env=env, capture_output=True, text=True)
    result.update(
        {
            "requests_total": len(all_ids),
            "problems": problems + exactly_once(work, all_ids, complete=True),
            "audit_verify_ok": verify.returncode == 0,
            "audit_scan_ok": scan.returncode == 0 and "0 hits" in scan.stdout,
        }
    )
    stem = "service" + (f"-{args.params.stem}" if args.params else "")
    out = ROOT / "bench" / "results" / stem
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"`lmeraser serve` on the digits demo ({result['params']}, {result['prompt_kind']} prompts); {result['machine']}, {result['date']}; service up in {result['start_seconds']} s.",
        "",
    ]
    if "load" in result:
        ld = result["load"]
        lines += [
            "| requests (clients) | distinct samples | accepted | refused | submit p50 | submit p99 | all submitted | all verified | batches |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {ld['requests']} ({ld['clients']}) | {ld['distinct_samples']} | {ld['accepted']} | {ld['refused']} | {ld['submit_p50_ms']} ms | {ld['submit_p99_ms']} ms | "
            f"{ld['all_submitted_s']} s | {ld['all_verified_s']} s | {ld['batches']} |",
            "",
        ]
    if "influence" in result:
        inf = result["influence"]
        cli = (
            f"; through the CLI (`forget --server`, a fresh process) {inf['cli_round_trip_s']} s"
            if inf["cli_round_trip_s"] is not None
            else ""
        )
        lines += [
            f"Influence forget through the service ({result['prompt_kind']}): round trip p50 {inf['round_trip_p50_s']} s, max {inf['round_trip_max_s']} s over {inf['updates']}{cli}.",
            "",
        ]
    if kills:
        lines += [
            f"SIGKILL during a batch, then restart: {len(kills)} kill(s), {sum(k['batch_in_progress'] for k in kills)} with the batch in progress; "
            f"problems: {sum(bool(k['problems']) for k in kills)}.",
            "",
        ]
    lines += [
        f"Every request journaled and verified exactly once: {'yes' if not result['problems'] else 'NO: ' + '; '.join(result['problems'][:5])}; "
        f"audit verify {'pass' if result['audit_verify_ok'] else 'FAIL'}, audit scan {'pass' if result['audit_scan_ok'] else 'FAIL'}."
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if result["problems"] or not (result["audit_verify_ok"] and result["audit_scan_ok"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
