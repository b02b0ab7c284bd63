"""Tamper detection of the lineage log: N random mutations, each checked as `audit verify` checks.

    python bench/reliability_log.py [--mutations 1000] [--records 6] [--seed 0]

Builds a log of R records signed by a pinned key (as `lmeraser` writes it: hash chain, signed head,
pinned signer), then applies each mutation to a fresh copy and runs the verification `audit verify`
runs (signatures with the pinned key, chain, head, stated signer). A mutation is detected when the
verification raises LmeraserError; anything else raised is a traceback. Mutations: byte flips (any
value, non-UTF-8 included), byte deletions and insertions, record swaps, duplications, deletions,
truncations at a random byte, removal of trailing records, and the whole log and head re-signed
with another key. Saves bench/results/reliability-log.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from lmeraser.audit.verify import public_key, verified_records  # noqa: E402
from lmeraser.errors import LmeraserError  # noqa: E402
from lmeraser.lineage.keys import key_id  # noqa: E402
from lmeraser.lineage.log import LineageLog  # noqa: E402
from lmeraser.lineage.records import signing_key  # noqa: E402
from lmeraser.workspace import Workspace  # noqa: E402

from pipeline import cpu_model  # noqa: E402

KINDS = ("flip", "delete-byte", "insert-byte", "swap", "duplicate", "delete-record", "truncate", "remove-trailing", "re-sign")


def build(root: Path, records: int) -> Workspace:
    ws = Workspace(root)
    log = LineageLog(ws.lineage_file)
    key = signing_key(ws)  # made, 0600, and pinned in audit/lineage-public-key.pem
    for i in range(records):
        log.append({"artifacts/prompts/index.json": f"{i:064x}"}, {"batch_id": f"batch-{i}", "requests": [f"req-{i}"], "signer": key_id(key.public_key())}, key)
    return ws


def mutate(kind: str, raw: bytes, head: bytes, rng: random.Random, ws: Workspace) -> tuple[bytes, bytes]:
    lines = raw.split(b"\n")[:-1]
    if kind == "flip":
        i = rng.randrange(len(raw))
        value = rng.choice([b for b in range(256) if b != raw[i]])
        return raw[:i] + bytes([value]) + raw[i + 1 :], head
    if kind == "delete-byte":
        i = rng.randrange(len(raw))
        return raw[:i] + raw[i + 1 :], head
    if kind == "insert-byte":
        i = rng.randrange(len(raw) + 1)
        return raw[:i] + bytes([rng.randrange(256)]) + raw[i:], head
    if kind == "swap":
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "duplicate":
        i = rng.randrange(len(lines))
        lines.insert(rng.randrange(len(lines) + 1), lines[i])
    elif kind == "delete-record":
        del lines[rng.randrange(len(lines))]
    elif kind == "truncate":
        return raw[: rng.randrange(len(raw))], head
    elif kind == "remove-trailing":
        lines = lines[: rng.randrange(len(lines))]
    elif kind == "re-sign":
        # An intruder with write access re-signs every record and the head with a key of their own.
        intruder = Ed25519PrivateKey.generate()
        with tempfile.TemporaryDirectory() as scratch:
            forged = LineageLog(Path(scratch) / "lineage.jsonl")
            for record in LineageLog(ws.lineage_file).read_unverified():
                kept = {k: v for k, v in record.predicate.items() if k not in ("sequence", "previous_record_sha256", "anchored")}
                forged.append(record.subjects, kept, intruder)
            return forged.path.read_bytes(), forged.head_path.read_bytes()
    return b"".join(line + b"\n" for line in lines), head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--records", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability-log")
    args = parser.parse_args()
    os.environ.pop("LMERASER_SIGNING_KEY", None)
    os.environ.pop("LMERASER_SIGNING_KEY_FILE", None)
    rng = random.Random(args.seed)
    outcomes: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    tracebacks = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = build(Path(tmp), args.records)
        log = LineageLog(ws.lineage_file)
        raw, head = log.path.read_bytes(), log.head_path.read_bytes()
        assert len(verified_records(ws, public_key(ws))) == args.records
        for n in range(args.mutations):
            kind = KINDS[n % len(KINDS)]
            new_raw, new_head = mutate(kind, raw, head, rng, ws)
            if (new_raw, new_head) == (raw, head):
                outcomes[kind]["unchanged (not counted)"] += 1
                continue
            log.path.write_bytes(new_raw)
            log.head_path.write_bytes(new_head)
            try:
                verified_records(ws, public_key(ws))
                outcomes[kind]["missed"] += 1
            except LmeraserError:
                outcomes[kind]["detected"] += 1
            except Exception:  # noqa: BLE001 - what this measures
                outcomes[kind]["traceback"] += 1
                tracebacks.append({"kind": kind, "traceback": traceback.format_exc(limit=3)})
            finally:
                log.path.write_bytes(raw)
                log.head_path.write_bytes(head)
    total = sum((c for c in outcomes.values()), Counter())
    counted = total["detected"] + total["missed"] + total["traceback"]
    result = {
        "mutations": args.mutations,
        "records": args.records,
        "seed": args.seed,
        "counted": counted,
        "detected": total["detected"],
        "missed": total["missed"],
        "tracebacks": total["traceback"],
        "unchanged": total["unchanged (not counted)"],
        "by_kind": {k: dict(v) for k, v in outcomes.items()},
        "traceback_examples": tracebacks[:3],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = ["| mutation | tried | detected | missed | tracebacks |", "|---|---:|---:|---:|---:|"]
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    for kind, c in outcomes.items():
        tried = c["detected"] + c["missed"] + c["traceback"]
        rows.append(f"| {kind} | {tried} | {c['detected']} | {c['missed']} | {c['traceback']} |")
    rows.append(f"| **all** | {counted} | {total['detected']} | {total['missed']} | {total['traceback']} |")
    table = "\n".join(rows)
    args.out.with_suffix(".md").write_text(f"{machine}\n\n{table}\n")
    print(table)
    print(f"{total['detected']}/{counted} detected ({100 * total['detected'] / max(counted, 1):.1f}%), {total['traceback']} traceback(s)")
    if total["missed"] or total["traceback"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
