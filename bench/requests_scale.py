"""How long a requests file takes to resolve and journal, by its length (issue 21, item 8).

    python bench/requests_scale.py [--sizes 100 1000 10000] [--repeats 3] [--seed 0]

On the digits demo's data (a scratch git copy of this repository at
bench/results/work-requests-scale/repo after `lmeraser data init`; submitting needs the data and
params, not a trained pipeline), for each size N it writes a requests file of N lines (9 in 10
name one random private sample, 1 in 20 three samples, 1 in 20 a data subject; ids repeat across
lines, as independent requests may) and times, from the same starting state each time (no journal):
  - the CLI: `lmeraser forget --no-process --file F --json` as a process, end to end (start-up,
    parsing, resolution, journaling);
  - the library, in this process: `parse_requests_file`, then `submit` (the lock, the params
    check, one `Resolver` over the manifests, every line resolved, the journal appended).
Each figure is the median of `--repeats` runs; every run must accept all N requests. The CLI row
for 1 request is the fixed cost of a process. Saves bench/results/requests-scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from scratch import BIN, bench_env, run  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import cpu_model  # noqa: E402


def build(env: dict) -> Path:
    from helpers import copy_repo

    work = ROOT / "bench" / "results" / "work-requests-scale" / "repo"
    shutil.rmtree(work.parent, ignore_errors=True)
    copy_repo(work)
    run([str(BIN / "lmeraser"), "data", "init"], work, env)
    return work


def requests_file(path: Path, lines: int, ids: list[str], subjects: list[str], rng: random.Random) -> Path:
    out = []
    for _ in range(lines):
        draw = rng.random()
        if draw < 0.9:
            out.append({"sample_ids": [rng.choice(ids)]})
        elif draw < 0.95:
            out.append({"sample_ids": rng.sample(ids, 3)})
        else:
            out.append({"subjects": [rng.choice(subjects)]})
    path.write_text("".join(json.dumps(line) + "\n" for line in out))
    return path


def reset(work: Path) -> None:
    """Back to the state before any submission: no journal, no copied inputs."""
    shutil.rmtree(work / "audit", ignore_errors=True)


def received(work: Path) -> int:
    from lmeraser.journal import Journal
    from lmeraser.workspace import Workspace

    return sum(e["state"] == "received" for e in Journal(Workspace(work)).events())


def time_cli(work: Path, args: list[str], env: dict, expected: int) -> float:
    reset(work)
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "lmeraser"), "forget", "--root", str(work), "--no-process", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lmeraser forget failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    if len(json.loads(done.stdout)["accepted"]) != expected or received(work) != expected:
        raise SystemExit(f"expected {expected} accepted requests")
    return seconds


def time_library(work: Path, path: Path, expected: int) -> tuple[float, float]:
    from lmeraser.unlearning.intake import parse_requests_file, submit
    from lmeraser.workspace import Workspace

    reset(work)
    ws = Workspace(work)
    started = time.perf_counter()
    specs = parse_requests_file(path, "forget")
    parsed = time.perf_counter()
    resolved = submit(specs, ws)
    done = time.perf_counter()
    if len(resolved) != expected or received(work) != expected:
        raise SystemExit(f"expected {expected} submitted requests")
    return parsed - started, done - parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = bench_env()
    os.environ.update({k: env[k] for k in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")})
    rng = random.Random(args.seed)
    work = build(env)

    from lmeraser.workspace import Workspace

    private = Workspace(work).manifest("private")
    ids, subjects = private["sample_id"].tolist(), sorted(set(private["subject_id"]))
    rows = []
    one = statistics.median(time_cli(work, ["--sample-id", ids[0]], env, 1) for _ in range(args.repeats))
    rows.append(
        {"lines": 1, "file_bytes": None, "cli_s": round(one, 2), "parse_s": None, "submit_s": None, "per_line_ms": None}
    )
    print(f"1 request (--sample-id): CLI {one:.2f} s", flush=True)
    for size in args.sizes:
        path = requests_file(work.parent / f"requests-{size}.jsonl", size, ids, subjects, rng)
        cli = statistics.median(time_cli(work, ["--file", str(path)], env, size) for _ in range(args.repeats))
        library = [time_library(work, path, size) for _ in range(args.repeats)]
        parse = statistics.median(p for p, _ in library)
        resolve = statistics.median(s for _, s in library)
        rows.append(
            {
                "lines": size,
                "file_bytes": path.stat().st_size,
                "cli_s": round(cli, 2),
                "parse_s": round(parse, 3),
                "submit_s": round(resolve, 3),
                "per_line_ms": round(1000 * (parse + resolve) / size, 3),
            }
        )
        print(f"{size} lines: CLI {cli:.2f} s; library parse {parse:.3f} s + submit {resolve:.3f} s", flush=True)
    reset(work)
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    result = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "load_average": os.getloadavg(),
        "repeats": args.repeats,
        "seed": args.seed,
        "rows": rows,
    }
    out = ROOT / "bench" / "results" / "requests-scale"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| lines | file | `lmeraser forget --no-process --file` (process, end to end) | parse (library) | resolve + journal (library) | per line (library) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["file_bytes"] is None:
            table.append(f"| 1 (`--sample-id`) | | {r['cli_s']:.2f} s | | | |")
        else:
            table.append(
                f"| {r['lines']:,} | {r['file_bytes'] / 1024:,.0f} KiB | {r['cli_s']:.2f} s | {r['parse_s']:.3f} s | {r['submit_s']:.3f} s | {r['per_line_ms']:.3f} ms |"
            )
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    header = f"Requests-file resolution on the digits demo's data; {machine}, {result['date']}; median of {args.repeats}; load average at the end {load}."
    out.with_suffix(".md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
