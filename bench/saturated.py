"""The product on a saturated CPU: more busy processes than cores while it runs.

    python bench/saturated.py [--spinners 6] [--reps 2] [--spin-limit 3600]

Starts `--spinners` processes that spin (`while True: pass`, each bounded to `--spin-limit`
seconds and killed at the end), then, in a fresh scratch git + DVC copy of this repository with the
tests' TINY parameters (bench/results/work-saturated/repo) and without PREFECT_API_URL, as a
user on a busy shared machine would run it:
  1. `lmeraser data init` + `dvc repro` (the first stage starts the workspace's standing Prefect
     server; the other six stage processes reuse it);
  2. `lmeraser forget --sample-id X` (an exact batch: rebuild, purge, signed record);
  3. a resume: `lmeraser forget --no-process`, then `lmeraser unlearn` killed at the
     `after:apply` failpoint (LMERASER_FAILPOINT, a SIGKILL mid-batch), then `lmeraser unlearn`,
     which must finish the batch;
  4. what the shared server saves per process: `lmeraser stage validate` (one flow process) timed
     `--reps` times each with the standing server, with Prefect's temporary server
     (LMERASER_PREFECT_SERVER=temporary, its start-up timeout scaled as the standing server's), and
     once with the temporary server and Prefect's default 20 s start-up timeout (the behaviour
     before issue 21).
Every step must complete (except the last row, which shows what happened before). Prints a
Markdown table; saves bench/results/saturated.{json,md}, naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from scratch import BIN, bench_env  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import cpu_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def spinners(n: int, limit: float) -> list[subprocess.Popen]:
    code = f"import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"
    return [
        subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def timed(args: list[str], cwd: Path, env: dict, timeout: float = 3600) -> dict:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        code, out, errs = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        code, out, errs = "timeout", str(expired.stdout or ""), str(expired.stderr or "")
    seconds = time.perf_counter() - t0
    last = [line for line in errs.strip().splitlines() if line.strip()][-1:] or [""]
    return {
        "seconds": round(seconds, 1),
        "exit": code,
        "load1": round(os.getloadavg()[0], 1),
        "stderr_lines": len(errs.splitlines()),
        "last_stderr": last[0][:300],
        "stdout_tail": out[-300:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spinners", type=int, default=6, help="busy processes (default 6: three per core on 2 cores)")
    parser.add_argument("--reps", type=int, default=2, help="timed flow processes per server kind")
    parser.add_argument(
        "--spin-limit", type=float, default=3600, help="each spinner stops by itself after this many seconds"
    )
    args = parser.parse_args()

    from helpers import TINY, copy_repo

    env = {
        k: v
        for k, v in bench_env().items()
        if k not in ("PREFECT_API_URL", "LMERASER_FAILPOINT", "LMERASER_PREFECT_SERVER")
    }
    work = RESULTS / "work-saturated" / "repo"
    if work.exists():
        subprocess.run(
            [str(BIN / "lmeraser"), "prefect", "stop", "--root", str(work)], env=env, capture_output=True, timeout=300
        )
    import shutil

    shutil.rmtree(work.parent, ignore_errors=True)
    copy_repo(work, TINY)
    lm = str(BIN / "lmeraser")
    rows: list[dict] = []
    load_before = os.getloadavg()[0]
    spin = spinners(args.spinners, args.spin_limit)
    started = time.perf_counter()

    def step(name: str, command: list[str], must_pass: bool = True, **extra: str) -> dict:
        result = {"step": name, **timed(command, work, {**env, **extra}), "must_pass": must_pass}
        rows.append(result)
        print(
            f"{name}: {result['seconds']} s, exit {result['exit']}, load {result['load1']} {result['last_stderr'][:160]}",
            flush=True,
        )
        return result

    try:
        time.sleep(10)  # the spinners reach full load
        step("lmeraser data init", [lm, "data", "init"])
        step("dvc repro (7 stage processes, one standing server)", [str(BIN / "dvc"), "repro"])
        state = json.loads((work / ".lmeraser" / "prefect" / "state.json").read_text())
        from lmeraser.workspace import Workspace

        samples = Workspace(work).manifest("private")["sample_id"].tolist()
        step("lmeraser forget --sample-id (exact batch)", [lm, "forget", "--sample-id", samples[0]])
        step("lmeraser forget --no-process (second request)", [lm, "forget", "--sample-id", samples[1], "--no-process"])
        killed = step(
            "lmeraser unlearn killed at after:apply", [lm, "unlearn"], must_pass=False, LMERASER_FAILPOINT="after:apply"
        )
        resumed = step("lmeraser unlearn (resume)", [lm, "unlearn"])
        from lmeraser.journal import Journal

        journal = Journal(Workspace(work))
        verified = sorted({e["request_id"] for e in journal.events() if e["state"] == "verified"})
        pending = [r.request_id for r in journal.pending()]
        step("lmeraser audit verify", [lm, "audit", "verify"])
        # One flow process, alternating kinds so load drifts hit both alike.
        for rep in range(args.reps):
            step(f"flow process, standing server (rep {rep + 1})", [lm, "stage", "validate"])
            step(
                f"flow process, temporary server (rep {rep + 1})",
                [lm, "stage", "validate"],
                LMERASER_PREFECT_SERVER="temporary",
            )
        step(
            "flow process, temporary server, Prefect's 20 s start-up timeout (before)",
            [lm, "stage", "validate"],
            must_pass=False,
            LMERASER_PREFECT_SERVER="temporary",
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="20",
        )
        same_server = json.loads((work / ".lmeraser" / "prefect" / "state.json").read_text())["pid"] == state["pid"]
    finally:
        stop(spin)
        subprocess.run([lm, "prefect", "stop", "--root", str(work)], env=env, capture_output=True, timeout=300)
    total = time.perf_counter() - started

    standing = [r["seconds"] for r in rows if r["step"].startswith("flow process, standing")]
    temporary = [r["seconds"] for r in rows if r["step"].startswith("flow process, temporary server (rep")]
    failures = [r["step"] for r in rows if r["must_pass"] and r["exit"] != 0]
    resume_ok = killed["exit"] == -signal.SIGKILL and resumed["exit"] == 0 and not pending and len(verified) == 2
    summary = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "spinners": args.spinners,
        "load1_before": round(load_before, 1),
        "params": {k: TINY[k] for k in ("data", "backbone", "prompt")},
        "rows": rows,
        "one_server_for_everything": same_server,
        "resume_ok": resume_ok,
        "verified_requests": verified,
        "standing_mean_s": round(statistics.mean(standing), 1),
        "temporary_mean_s": round(statistics.mean(temporary), 1),
        "saved_per_process_s": round(statistics.mean(temporary) - statistics.mean(standing), 1),
        "total_s": round(total, 1),
        "failures": failures,
        "ok": not failures and resume_ok,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "saturated.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = render(summary)
    (RESULTS / "saturated.md").write_text(md)
    print(md)
    if not summary["ok"]:
        sys.exit(1)


def render(s: dict) -> str:
    lines = [
        f"Saturated CPU: {s['spinners']} spinning processes on {s['cores']} cores ({s['cpu']}), load average before {s['load1_before']}; "
        f"TINY parameters (tests/conftest.py); Python {s['python']}.",
        "",
        "| step | seconds | exit | load (1 min) at its end | last line on stderr |",
        "|---|---:|---:|---:|---|",
    ]
    for r in s["rows"]:
        last = r["last_stderr"].replace("|", "\\|")[:120]
        lines.append(f"| {r['step']} | {r['seconds']} | {r['exit']} | {r['load1']} | {last} |")
    lines += [
        "",
        f"- every step completed: {'yes' if not s['failures'] else 'NO: ' + ', '.join(s['failures'])}; the killed batch resumed and "
        f"finished: {'yes' if s['resume_ok'] else 'NO'} ({len(s['verified_requests'])} request(s) verified); one standing server served "
        f"every process: {'yes' if s['one_server_for_everything'] else 'no'}",
        f"- one flow process (`lmeraser stage validate`): {s['standing_mean_s']} s with the standing server, {s['temporary_mean_s']} s with a "
        f"temporary one: the shared server saves {s['saved_per_process_s']} s per process",
        f"- total {s['total_s']} s",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
