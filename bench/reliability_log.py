"""Tamper detection of the lineage log: N random mutations, each checked as `audit verify` checks.

    python bench/reliability_log.py [--mutations 1000] [--records 6] [--seed 0]

Builds a log of R records signed by a pinned key (as `lmeraser` writes it: hash chain, signed head,
pinned signer), then applies each mutation to a fresh copy and runs the verification `audit verify`
runs (signatures with the pinned key, chain, head, stated signer). A mutation is detected when the
verification raises LmeraserError; anything else raised is a traceback. Mutations: byte flips (any
value, non-UTF-8 included), byte deletions and insertions, record swaps, duplications, deletions,
truncations at a random byte, removal of trailing records, and the whole log and head re-signed
with another key.

Then the trust-anchor attacks (issue 21), each on a fresh workspace with a journal (and, where the
attack needs one, a git history), in several variants, each checked as `audit verify` checks,
in its own process bounded by a 60 s timeout and a 2 GiB address-space cap (a hang or an
out-of-memory counts as a failure):
  symlink-pin       the pinned key made a symbolic link to another key (outside the workspace, an
                    untracked or a committed file inside it) and the log and head re-signed with it
  new-key-committed a new key pinned, the log re-signed with it and committed, with no rotation
  forged-rotation   a key-rotation record the current signer did not sign (by the new key alone,
                    by two intruder keys, a genuine rotation edited, a second rotation by the
                    intruder after a genuine one), head and pin following it
  rollback          lineage.jsonl + lineage.head.json restored to an earlier version while the
                    journal names later records (and with git: journal rolled back too, committed)
  anchor-not-file   the head, the pin, the journal or the log a FIFO, a directory, a link to
                    /dev/zero or a sparse file over its size limit
Saves bench/results/reliability-log.{json,md}.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from lmeraser.audit.verify import public_key, verified_records  # noqa: E402
from lmeraser.errors import LmeraserError  # noqa: E402
from lmeraser.lineage import keys  # noqa: E402
from lmeraser.lineage.keys import key_id  # noqa: E402
from lmeraser.lineage.log import LineageLog  # noqa: E402
from lmeraser.lineage.records import signing_key  # noqa: E402
from lmeraser.workspace import Workspace  # noqa: E402

import common  # noqa: E402, F401 (the repository and tests/helpers.py on sys.path)
from pipeline import cpu_model  # noqa: E402

KINDS = (
    "flip",
    "delete-byte",
    "insert-byte",
    "swap",
    "duplicate",
    "delete-record",
    "truncate",
    "remove-trailing",
    "re-sign",
)


def build(root: Path, records: int) -> Workspace:
    ws = Workspace(root)
    log = LineageLog(ws.lineage_file)
    key = signing_key(ws)  # made, 0600, and pinned in audit/lineage-public-key.pem
    for i in range(records):
        log.append(
            {"artifacts/prompts/index.json": f"{i:064x}"},
            {"batch_id": f"batch-{i}", "requests": [f"req-{i}"], "signer": key_id(key.public_key())},
            key,
        )
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
                kept = {
                    k: v
                    for k, v in record.predicate.items()
                    if k not in ("sequence", "previous_record_sha256", "anchored")
                }
                forged.append(record.subjects, kept, intruder)
            return forged.path.read_bytes(), forged.head_path.read_bytes()
    return b"".join(line + b"\n" for line in lines), head


# -- trust-anchor attacks (issue 21) ----------------------------------------------------------------

GIT = [
    "git",
    "-c",
    "user.name=bench",
    "-c",
    "user.email=bench@example.invalid",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "init.defaultBranch=main",
]
AUDIT_FILES = ("audit/lineage.jsonl", "audit/lineage.head.json", "audit/lineage-public-key.pem", "audit/journal.jsonl")


def _git(root: Path, *args: str) -> str:
    import subprocess

    return subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True, text=True).stdout


def _commit(root: Path, message: str, *extra: str) -> None:
    _git(root, "add", "--", *[name for name in (*AUDIT_FILES, *extra) if os.path.lexists(root / name)])
    _git(root, "commit", "-qm", message)


def _batch(ws: Workspace, request_id: str) -> None:
    """One signed record listing `request_id`, journaled `received` then `verified`, as a batch does."""
    from lmeraser.journal import Journal, received
    from lmeraser.lineage.records import lineage_log
    from lmeraser.request import Request

    record = lineage_log(ws).append(
        {"artifacts/prompts/index.json": os.urandom(32).hex()},
        {"requests": [{"request_id": request_id}]},
        signing_key(ws),
    )
    Journal(ws).append(
        [received(Request(request_id=request_id, kind="forget", sample_ids=(), received_at=time.time()))]
    )
    Journal(ws).append([{"request_id": request_id, "state": "verified", "time": time.time(), "record": record.number}])


def _fresh(root: Path, records: int, git: bool) -> Workspace:
    keys._taken = None
    ws = Workspace(root)
    for i in range(1, records + 1):
        _batch(ws, f"r{i}")
        if git:
            if i == 1:
                _git(root, "init", "-q")
            _commit(root, f"record {i}")
    return ws


def _re_sign(ws: Workspace, intruder: Ed25519PrivateKey) -> None:
    """Every record and the head re-signed with the intruder's key (each stating it as signer)."""
    log = LineageLog(ws.lineage_file)
    forged = LineageLog(ws.root / ".forged" / "lineage.jsonl")
    forged.path.parent.mkdir(exist_ok=True)
    for record in log.read_unverified():
        body = {
            k: v
            for k, v in record.predicate.items()
            if k not in ("sequence", "previous_record_sha256", "anchored", "signer")
        }
        forged.append(record.subjects, {**body, "signer": keys.key_id(intruder.public_key())}, intruder)
    os.replace(forged.path, log.path)
    os.replace(forged.head_path, log.head_path)


def _link_pin(ws: Workspace, target: Path) -> None:
    ws.signer_file.unlink()
    ws.signer_file.symlink_to(target)


def _symlink_pin(where: str, git: bool) -> Callable[[Path], Workspace]:
    def attack(root: Path) -> Workspace:
        ws = _fresh(root / "ws", 3, git)
        intruder = Ed25519PrivateKey.generate()
        if where == "identical copy":  # the genuine key, only reached through a link
            target = root / "copy.pem"
            target.write_bytes(ws.signer_file.read_bytes())
            _link_pin(ws, target)
            return ws
        target = {
            "outside": root / "elsewhere" / "pub.pem",
            "untracked": ws.audit / "spare-key.pem",
            "committed": ws.audit / "backup-key.pem",
        }[where]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(keys.public_pem(intruder))
        if where == "committed":
            _git(ws.root, "add", "audit/backup-key.pem")
            _git(ws.root, "commit", "-qm", "a backup key")
        _link_pin(ws, target)
        _re_sign(ws, intruder)
        if where == "committed":
            _commit(ws.root, "pin through a link")
        return ws

    return attack


def _new_key_committed(how: str) -> Callable[[Path], Workspace]:
    def attack(root: Path) -> Workspace:
        ws = _fresh(root / "ws", 3, True)
        intruder = Ed25519PrivateKey.generate()
        ws.signer_file.write_bytes(keys.public_pem(intruder))
        if how == "pin first, then the log":
            _git(ws.root, "add", "audit/lineage-public-key.pem")
            _git(ws.root, "commit", "-qm", "new key")
        _re_sign(ws, intruder)
        if how != "not committed":
            _commit(ws.root, "re-signed")
        if how == "private key replaced too":
            keys.write_private_key(ws.signing_key_file, intruder)
        return ws

    return attack


def _rotation_line(
    ws: Workspace, old: Ed25519PrivateKey, new: Ed25519PrivateKey, signers: list[Ed25519PrivateKey]
) -> bytes:
    """A key-rotation record from `old` to `new` appended at the end of the log, signed by `signers`."""
    import hashlib

    from lmeraser.io import canonical_json
    from lmeraser.lineage.dsse import sign, statement
    from lmeraser.lineage.log import ROTATION_TYPE

    lines = ws.lineage_file.read_bytes().splitlines()
    last = LineageLog(ws.lineage_file).read_unverified()[-1]
    predicate = {
        "method": "key-rotation",
        "old_signer": keys.key_id(old.public_key()),
        "new_signer": keys.key_id(new.public_key()),
        "old_public_key": keys.public_pem(old).decode(),
        "new_public_key": keys.public_pem(new).decode(),
        "signer": keys.key_id(old.public_key()),
        "sequence": len(lines) + 1,
        "previous_record_sha256": hashlib.sha256(lines[-1]).hexdigest(),
        "anchored": True,
    }
    envelope = sign(statement(last.subjects, predicate, ROTATION_TYPE), signers[0])
    for extra in signers[1:]:
        envelope["signatures"] += sign(statement(last.subjects, predicate, ROTATION_TYPE), extra)["signatures"]
    return canonical_json(envelope)


def _install(ws: Workspace, lines: list[bytes], head_key: Ed25519PrivateKey) -> None:
    """Write `lines` as the log, a head signed by `head_key` over it, and pin `head_key`."""
    import hashlib

    from lmeraser.lineage.log import Head

    ws.lineage_file.write_bytes(b"".join(line + b"\n" for line in lines))
    LineageLog(ws.lineage_file)._write_head(Head(len(lines), hashlib.sha256(lines[-1]).hexdigest()), head_key)
    ws.signer_file.write_bytes(keys.public_pem(head_key))


def _forged_rotation(how: str, git: bool = False) -> Callable[[Path], Workspace]:
    def attack(root: Path) -> Workspace:
        from lmeraser.lineage.records import rotate_key

        ws = _fresh(root / "ws", 2, git)
        old, intruder = signing_key(ws), Ed25519PrivateKey.generate()
        lines = ws.lineage_file.read_bytes().splitlines()
        if how == "signed by the new key only":
            lines.append(_rotation_line(ws, old, intruder, [intruder]))
        elif how == "signed by two intruder keys":
            lines.append(_rotation_line(ws, old, intruder, [Ed25519PrivateKey.generate(), intruder]))
        elif how == "genuine rotation, new key edited":
            rotate_key(ws, reason="bench")  # a real rotation to a key the workspace made
            keys._taken = None
            from lmeraser.io import canonical_json

            record = json.loads(ws.lineage_file.read_bytes().splitlines()[-1])
            statement_ = json.loads(keys.unb64(record["payload"]))
            statement_["predicate"]["new_public_key"] = keys.public_pem(intruder).decode()
            statement_["predicate"]["new_signer"] = keys.key_id(intruder.public_key())
            record["payload"] = keys.b64(canonical_json(statement_))
            lines = ws.lineage_file.read_bytes().splitlines()[:-1] + [canonical_json(record)]
        elif how == "second rotation by the intruder after a genuine one":
            rotate_key(ws, reason="bench")
            current = signing_key(ws)
            lines = ws.lineage_file.read_bytes().splitlines()
            lines.append(_rotation_line(ws, current, intruder, [intruder]))
        _install(ws, lines, intruder)
        if git:
            _commit(ws.root, "rotation")
        return ws

    return attack


def _rollback(how: str) -> Callable[[Path], Workspace]:
    def attack(root: Path) -> Workspace:
        git = how.startswith("git")
        ws = _fresh(root / "ws", 1, git)
        names = ("audit/lineage.jsonl", "audit/lineage.head.json")
        earlier = {name: (ws.root / name).read_bytes() for name in names}
        first = _git(ws.root, "rev-parse", "HEAD").strip() if git else None
        _batch(ws, "r2")
        if git:
            _commit(ws.root, "record 2")
        _batch(ws, "r3")
        if git:
            _commit(ws.root, "record 3")
        if how == "one record back":
            two = ws.lineage_file.read_bytes().splitlines()[:2]
            ws.lineage_file.write_bytes(b"".join(line + b"\n" for line in two))
            import hashlib

            from lmeraser.lineage.log import Head

            LineageLog(ws.lineage_file)._write_head(Head(2, hashlib.sha256(two[-1]).hexdigest()), signing_key(ws))
        elif how == "two records back (earlier copy)":
            for name, raw in earlier.items():
                (ws.root / name).write_bytes(raw)
        elif how == "rolled back, then extended by the real signer":
            for name, raw in earlier.items():
                (ws.root / name).write_bytes(raw)
            from lmeraser.lineage.records import lineage_log

            lineage_log(ws).append(
                {"artifacts/prompts/index.json": os.urandom(32).hex()},
                {"requests": [{"request_id": "r9"}]},
                signing_key(ws),
            )
        elif how == "git: log, head and journal checked out from an earlier commit, committed":
            _git(ws.root, "checkout", first, "--", *names, "audit/journal.jsonl")
            _git(ws.root, "commit", "-qm", "roll back")
        elif how == "git: log and head rolled back, committed":
            _git(ws.root, "checkout", first, "--", *names)
            _git(ws.root, "commit", "-qm", "roll back")
        return ws

    return attack


def _anchor(which: str, what: str) -> Callable[[Path], Workspace]:
    def attack(root: Path) -> Workspace:
        ws = _fresh(root / "ws", 2, False)
        path = {
            "head": LineageLog(ws.lineage_file).head_path,
            "pin": ws.signer_file,
            "journal": ws.audit / "journal.jsonl",
            "log": ws.lineage_file,
        }[which]
        path.unlink()
        if what == "FIFO":
            os.mkfifo(path)
        elif what == "directory":
            path.mkdir()
        elif what == "link to /dev/zero":
            path.symlink_to("/dev/zero")
        elif what == "sparse file over its limit":  # 1 GiB, or 1 GiB + 1 byte for the log and journal (limit 1 GiB)
            with open(path, "wb") as handle:
                handle.truncate((1 << 30) + (which in ("journal", "log")))
        return ws

    return attack


def _genuine(how: str) -> Callable[[Path], Workspace]:
    """Controls: logs nobody tampered with, which must still verify."""

    def build_it(root: Path) -> Workspace:
        from lmeraser.lineage.records import rotate_key

        ws = _fresh(root / "ws", 3, how != "three records")
        if how == "a genuine rotation, committed":
            rotate_key(ws, reason="bench")
            _batch(ws, "r4")
            _commit(ws.root, "rotation")
        return ws

    return build_it


CONTROLS: dict[str, Callable[[Path], Workspace]] = {
    "three records": _genuine("three records"),
    "three records, committed": _genuine("three records, committed"),
    "a genuine rotation, committed": _genuine("a genuine rotation, committed"),
}

SCENARIOS: dict[str, dict[str, Callable[[Path], Workspace]]] = {
    "symlink-pin": {
        "to a key outside the workspace, re-signed": _symlink_pin("outside", False),
        "to a key outside, re-signed (git history)": _symlink_pin("outside", True),
        "to an untracked key in audit/, re-signed (git)": _symlink_pin("untracked", True),
        "to a committed key in audit/, re-signed, committed": _symlink_pin("committed", True),
        "to an identical copy of the genuine key": _symlink_pin("identical copy", False),
    },
    "new-key-committed": {
        "pin and re-signed log in one commit": _new_key_committed("one commit"),
        "pin first, then the log": _new_key_committed("pin first, then the log"),
        "and the private key replaced too": _new_key_committed("private key replaced too"),
        "not committed (pin differs from git)": _new_key_committed("not committed"),
    },
    "forged-rotation": {
        "signed by the new key only": _forged_rotation("signed by the new key only"),
        "signed by the new key only, committed": _forged_rotation("signed by the new key only", git=True),
        "signed by two intruder keys": _forged_rotation("signed by two intruder keys"),
        "genuine rotation, new key edited": _forged_rotation("genuine rotation, new key edited"),
        "second rotation by the intruder after a genuine one": _forged_rotation(
            "second rotation by the intruder after a genuine one"
        ),
    },
    "rollback": {
        "one record back, head re-signed": _rollback("one record back"),
        "two records back (earlier log + head)": _rollback("two records back (earlier copy)"),
        "rolled back, then extended by the real signer": _rollback("rolled back, then extended by the real signer"),
        "git: log + head rolled back, committed": _rollback("git: log and head rolled back, committed"),
        "git: log + head + journal rolled back, committed": _rollback(
            "git: log, head and journal checked out from an earlier commit, committed"
        ),
    },
    "anchor-not-file": {
        f"{which} {what}": _anchor(which, what)
        for which in ("head", "pin", "journal", "log")
        for what in ("FIFO", "directory", "link to /dev/zero", "sparse file over its limit")
    },
}

_CHECK = """
import json, sys
from lmeraser.workspace import Workspace
from lmeraser.audit.verify import public_key, verified_records
from lmeraser.errors import LmeraserError
ws = Workspace(sys.argv[1])
try:
    verified_records(ws, public_key(ws))
    print(json.dumps({"verdict": "missed", "message": ""}))
except LmeraserError as error:
    print(json.dumps({"verdict": "detected", "message": str(error)}))
"""


def check_in_process(root: Path, timeout: float = 60, memory: int = 2 << 30) -> dict:
    """`audit verify`'s checks on the workspace at `root`, in a fresh interpreter bounded in time
    and memory: detected / missed / traceback / hang / out-of-memory."""
    import resource
    import subprocess

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {k: v for k, v in os.environ.items() if k not in ("LMERASER_SIGNING_KEY", "LMERASER_SIGNING_KEY_FILE")}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHECK, str(root)],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=cap,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {
            "verdict": "hang",
            "message": f"no answer in {timeout:.0f} s",
            "seconds": round(time.perf_counter() - started, 1),
        }
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode == 0 and done.stdout.strip():
        return {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": seconds}
    last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    verdict = "out-of-memory" if "MemoryError" in done.stderr else "traceback"
    return {"verdict": verdict, "message": last[:300], "seconds": seconds}


def run_scenarios() -> list[dict]:
    results = []
    for kind, variants in {"control (untampered)": CONTROLS, **SCENARIOS}.items():
        for name, attack in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    ws = attack(Path(tmp))
                except Exception:  # noqa: BLE001 - a scenario that cannot be built is a bench bug, shown as such
                    results.append(
                        {
                            "kind": kind,
                            "variant": name,
                            "verdict": "not built",
                            "message": traceback.format_exc(limit=2)[-300:],
                        }
                    )
                    continue
                outcome = check_in_process(ws.root)
            results.append({"kind": kind, "variant": name, **outcome})
            print(
                f"{kind} / {name}: {outcome['verdict']} ({outcome['seconds']} s) {outcome['message'][:160]}", flush=True
            )
    return results


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
    scenarios = run_scenarios()
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
        "trust_anchor_attacks": scenarios,
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
    attacks, failed = scenario_table(scenarios)
    args.out.with_suffix(".md").write_text(
        f"{machine}\n\n{table}\n\nTrust-anchor attacks (each in its own process, 60 s and 2 GiB at most):\n\n{attacks}\n"
    )
    print(table)
    print(attacks)
    print(
        f"{total['detected']}/{counted} detected ({100 * total['detected'] / max(counted, 1):.1f}%), {total['traceback']} traceback(s)"
    )
    if total["missed"] or total["traceback"] or failed:
        sys.exit(1)


def scenario_table(scenarios: list[dict]) -> tuple[str, int]:
    """The summary by class and the rows; and how many attacks were not detected (or controls refused)."""
    rows = [
        "| attack | variants | detected | missed | tracebacks | hangs or out of memory | slowest |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    failed = 0
    for kind in dict.fromkeys(s["kind"] for s in scenarios):
        mine = [s for s in scenarios if s["kind"] == kind]
        c = Counter(s["verdict"] for s in mine)
        slowest = max((s.get("seconds", 0) for s in mine), default=0)
        if kind.startswith("control"):
            failed += len(mine) - c["missed"]
            rows.append(
                f"| {kind}: verify passes | {len(mine)} | {c['missed']} pass | {len(mine) - c['missed']} refused | {c['traceback']} | {c['hang'] + c['out-of-memory']} | {slowest} s |"
            )
            continue
        failed += len(mine) - c["detected"]
        rows.append(
            f"| {kind} | {len(mine)} | {c['detected']} | {c['missed']} | {c['traceback'] + c['not built']} | {c['hang'] + c['out-of-memory']} | {slowest} s |"
        )
    rows += ["", "| attack | variant | verdict | message |", "|---|---|---|---|"]
    shown = {"missed": "verify passes", "detected": "refused"}  # for the controls
    rows += [
        f"| {s['kind']} | {s['variant']} | {shown.get(s['verdict'], s['verdict']) if s['kind'].startswith('control') else s['verdict']} | {s['message'][:150].replace('|', '/')} |"
        for s in scenarios
    ]
    return "\n".join(rows), failed


if __name__ == "__main__":
    main()
