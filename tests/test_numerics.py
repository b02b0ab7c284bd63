"""Portable numerics (lmeraser/numerics.py) and the numeric fingerprint (lmeraser/fingerprint.py),
with the real libraries (torch, oneDNN, MKL, numpy, faiss, Dask, DVC): every pin takes effect in
every kind of process the pipeline starts (this one, `lmeraser doctor`, a stage under `dvc repro`,
a Dask worker, a CLI batch); a conflicting setting is refused in one sentence; the numerics re-key
every artifact; replay says "cannot compare" across fingerprints; and this machine computes the
committed reference fingerprint (tests/data/numerics-fingerprint.json).

Every subprocess starts with the pins and $LMERASER_NUMERICS stripped from its environment, as from
a user's shell: what it shows is what its own start-up set, not what this process handed down.
(A Dask worker is the exception: it inherits them from the process that starts its cluster, as
the flow's does.)

The reference is remade, under portable numerics, by

    python tests/test_numerics.py --write-reference

only after a deliberate change of library versions (requirements.lock) or of the fingerprint's
computation (fingerprint.FORMAT); never because a machine computes other bits (that is the bug
the reference is there to catch).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmeraser import numerics
from lmeraser.compute import Compute
from lmeraser.config import parse_params
from lmeraser.errors import ConfigError
from lmeraser.fingerprint import fingerprint, software
from lmeraser.io import read_json
from lmeraser.lineage import keys
from lmeraser.lineage.log import LineageLog
from lmeraser.workspace import KEY_FILE_ENV, Workspace

from helpers import BIN, TINY, copy_repo, ran_stages, run_stages

REFERENCE = Path(__file__).parent / "data" / "numerics-fingerprint.json"
REMAKE = "python tests/test_numerics.py --write-reference"
PREFECT_LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| (DEBUG|INFO) +\| ")  # a flow's progress line, not an error


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without the pins, $LMERASER_NUMERICS or a signing key, plus `extra`."""
    strip = {*numerics.PINS, numerics.ENV_MODE, keys.KEY_ENV, KEY_FILE_ENV}
    return {**{k: v for k, v in os.environ.items() if k not in strip}, **extra}


def _lmeraser(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lmeraser"), *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=600
    )


def _start(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "lmeraser"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _python(code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _portable() -> dict:
    """What every artifact key, backbone and record made under portable numerics on this machine says."""
    return {"numerics": "portable", "pins": numerics.PINS, "fingerprint": fingerprint()["sha256"]}


def _one_sentence(stderr: str) -> str:
    """The only line on stderr (a flow's progress lines aside)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not PREFECT_LOG.match(line)]
    assert len(lines) == 1, stderr
    return lines[0]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _untrained_copy(trained: Workspace, root: Path, numerics_mode: str = "portable") -> Workspace:
    """The trained workspace's data and validation (what the backbone stage reads), with
    `runtime.numerics` as asked, and nothing computed from them."""
    shutil.copytree(trained.data, root / "data")
    shutil.copytree(trained.root / "artifacts" / "validation", root / "artifacts" / "validation")
    values = yaml.safe_load(trained.params_file.read_text())
    values["runtime"]["numerics"] = numerics_mode
    (root / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return Workspace(root)


@pytest.fixture
def fresh_boot(monkeypatch):
    """Run `numerics.boot()` again in this process (restored afterwards): what a new process would do."""
    monkeypatch.setattr(numerics, "_state", None)
    monkeypatch.setattr(numerics, "_verified", set())


# -- 1. every pin takes effect in every kind of process -------------------------------------------


def test_every_pin_takes_effect_in_this_process_and_in_its_probe_child():
    """conftest imports lmeraser first, from the repository root (params.yaml: portable): every pin
    was set before torch, numpy and faiss loaded, and each library runs what it pins, here and in
    the probe child that runs oneDNN and MKL with their verbose logs on."""
    state = numerics.state()
    assert (state.mode, state.conflicts, state.late, state.unsupported) == ("portable", {}, [], None)
    numerics.require("portable")
    assert numerics.pins_in_effect() == numerics.PINS
    rows = numerics.effects()
    expected = {
        "torch CPU capability (ATen dispatch)",
        "numpy dispatched loops",
        "faiss SIMD level",
        "oneDNN ISA (probe)",
        "MKL CNR mode (probe)",
    }
    if numerics._mkl() is not None:  # torch's MKL exports its service functions (it does here)
        expected |= {"MKL conditional-reproducibility branch", "MKL dynamic threading"}
    assert {row["what"] for row in rows} == expected
    assert [row for row in rows if row["value"] != row["portable"]] == []


def test_a_check_without_kernels_leaves_torch_and_faiss_to_the_first_computation(monkeypatch):
    """`stage validate` checks the pins without importing torch or faiss (kernels=False): their
    checks do not run, and the mode is not marked verified, so the first computation with them
    (lmeraser/compute.py) still runs every check."""
    ran = []
    monkeypatch.setattr(numerics, "_verified", set())
    for name in ("_torch_capability", "_mkl_branch", "_numpy_dispatch", "_faiss_generic"):
        monkeypatch.setattr(numerics, name, lambda name=name: ran.append(name))
    numerics.require("portable", kernels=False)
    assert ran == ["_numpy_dispatch"] and "portable" not in numerics._verified
    numerics.require("portable")
    assert ran[1:] == ["_torch_capability", "_mkl_branch", "_numpy_dispatch", "_faiss_generic"]
    assert "portable" in numerics._verified


@pytest.fixture(scope="module")
def commands(trained_workspace, tmp_path_factory):
    """Three independent `lmeraser` processes, run at once: `doctor --json` in the trained
    workspace, `doctor` there with ATEN_CPU_CAPABILITY=avx512, and `stage backbone` with
    MKL_CBWR=AUTO in a copy holding only the data and its validation; with the files each
    workspace held before and after."""
    trained = trained_workspace[0]
    untrained = _untrained_copy(trained, tmp_path_factory.mktemp("numerics-stage") / "ws")
    before = {"trained": _files(trained.root), "untrained": _files(untrained.root)}
    started = {
        "doctor": _start(["doctor", "--json"], trained.root, _env()),
        "doctor with a conflict": _start(["doctor"], trained.root, _env(ATEN_CPU_CAPABILITY="avx512")),
        "stage with a conflict": _start(["stage", "backbone"], untrained.root, _env(MKL_CBWR="AUTO")),
    }
    done = {name: _finish(process) for name, process in started.items()}
    after = {"trained": _files(trained.root), "untrained": _files(untrained.root)}
    return done, before, after, untrained


def test_doctor_in_a_workspace_finds_every_pin_in_effect_and_this_process_s_fingerprint(commands):
    done, before, after, _ = commands
    doctor = done["doctor"]
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["ok"] is True and report["problem"] is None and report["numerics"] == "portable"
    assert report["process_started_with"] == {
        "mode": "portable",
        "from": "params.yaml runtime.numerics",
    }  # its own boot set them
    assert report["pins"] == numerics.PINS
    assert len(report["effects"]) >= 5 and [row for row in report["effects"] if row["value"] != row["portable"]] == []
    assert (
        report["fingerprint"] == fingerprint()
        and report["versions"] == software()
        and report["cpu"] == numerics.cpu_name()
    )
    assert after["trained"] == before["trained"]  # a diagnosis writes nothing


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory, trained_workspace):
    """A git + DVC copy of this repository (TINY params) with the data and its validation, where
    the backbone stage has not run."""
    root = copy_repo(tmp_path_factory.mktemp("numerics-dvc") / "repo", TINY)
    shutil.copytree(trained_workspace[0].data, root / "data", dirs_exist_ok=True)
    shutil.copytree(trained_workspace[0].root / "artifacts" / "validation", root / "artifacts" / "validation")
    return root


def test_a_stage_under_dvc_repro_pins_itself_and_records_this_process_s_fingerprint(dvc_repo):
    """`dvc repro` (its environment without a pin) runs `lmeraser stage backbone`, whose start-up
    reads params.yaml and pins every library; backbone.json records it."""
    done = subprocess.run(
        [str(BIN / "dvc"), "repro", "--single-item", "backbone"],
        cwd=dvc_repo,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ran_stages(done.stdout) == ["backbone"]
    meta = read_json(dvc_repo / "artifacts" / "backbone" / "backbone.json")
    assert meta["numerics"] == "portable" and meta["fingerprint"] == fingerprint()["sha256"]
    assert meta["origin"]["compute"] == {"device": "cpu", "precision": "float32", **_portable()}


def test_a_dask_worker_runs_with_the_pins_and_the_fingerprint_of_this_process():
    """What lmeraser/flows/stages.py's DaskTaskRunner starts: a local cluster of worker processes."""
    import torch
    from distributed import Client, LocalCluster

    def probe() -> dict:  # defined here: shipped to the worker by value
        import os

        from lmeraser import numerics

        problem = None
        try:
            numerics.require("portable")
        except Exception as error:  # noqa: BLE001 (reported, and compared below)
            problem = str(error)
        import torch

        from lmeraser.fingerprint import fingerprint

        return {
            "pid": os.getpid(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "pins": {var: os.environ.get(var) for var in numerics.PINS},
            "fingerprint": fingerprint()["sha256"],
            "problem": problem,
        }

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        seen = client.submit(probe, pure=False).result(timeout=300)
    assert seen.pop("pid") != os.getpid()
    assert seen == {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "pins": numerics.PINS,
        "fingerprint": fingerprint()["sha256"],
        "problem": None,
    }
    assert seen["capability"] == "AVX2"


def test_a_record_written_by_a_cli_batch_carries_the_pins_and_the_fingerprint(trained_workspace, tmp_path):
    """The service runs its batches in a thread of its own `lmeraser serve` process, started like
    any `lmeraser` command; no test starts one cheaply (test_e2e.py does, on its DVC repository),
    so this checks the record of a batch the CLI runs in its own process: an influence update
    (`lmeraser forget --method influence`), which signs a record at once, started from another
    directory with --root."""
    root = tmp_path / "ws"
    shutil.copytree(trained_workspace[0].root, root)
    victim = Workspace(root).split("private").sample_ids[0]
    done = _lmeraser("forget", "--root", str(root), "--sample-id", victim, "--method", "influence", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [record] = LineageLog(root / "audit" / "lineage.jsonl").read_unverified()
    environment = record.predicate["environment"]
    assert record.predicate["method"] == "influence"
    assert {k: environment[k] for k in ("numerics", "pins", "fingerprint")} == _portable()
    assert environment["cpu"] == numerics.cpu_name() and environment["device"] == "cpu"


# -- 2. a conflicting setting is refused in one sentence ------------------------------------------


def test_doctor_refuses_a_conflicting_pin_in_one_sentence(commands):
    done, before, after, _ = commands
    refused = done["doctor with a conflict"]
    assert refused.returncode == 1
    assert _one_sentence(refused.stderr) == (
        "error: ATEN_CPU_CAPABILITY is set to 'avx512' in the environment, but portable numerics need 'avx2' "
        f"(the run would not be portable); unset it or {numerics.NATIVE_FIX}."
    )
    assert after["trained"] == before["trained"]


def test_a_stage_refuses_a_conflicting_pin_in_one_sentence_and_writes_nothing(commands):
    done, before, after, ws = commands
    refused = done["stage with a conflict"]
    assert refused.returncode == 1
    sentence = _one_sentence(refused.stderr)  # its flow's progress lines aside
    assert sentence.startswith(
        "error: MKL_CBWR is set to 'AUTO' in the environment, but portable numerics need 'COMPATIBLE'"
    ), sentence
    assert "Traceback" not in refused.stdout + refused.stderr
    assert not ws.backbone_meta_file.exists() and after["untrained"] == before["untrained"]


@pytest.mark.parametrize("var", sorted(numerics.PINS))
def test_each_pin_set_otherwise_by_the_user_is_a_conflict_named_in_one_sentence(var, fresh_boot, monkeypatch):
    monkeypatch.setenv(var, "user-value")
    state = numerics.boot(["pytest"])
    assert state.conflicts == {var: "user-value"} and os.environ[var] == "user-value"  # never overwritten
    with pytest.raises(ConfigError) as refused:
        Compute(numerics="portable").check()
    message = str(refused.value)
    assert message.startswith(
        f"{var} is set to 'user-value' in the environment, but portable numerics need '{numerics.PINS[var]}'"
    )
    assert message.count(". ") == 0 and message.endswith(".")
    # Another spelling is a conflict too: torch and MKL read these case-sensitively and oneDNN
    # rejects spaces, so " avx2 " or "AVX2" would silently leave a library unpinned.
    for spelling in (f" {numerics.PINS[var]} ", numerics.PINS[var].swapcase()):
        monkeypatch.setenv(var, spelling)
        numerics._state = None
        assert numerics.boot(["pytest"]).conflicts == {var: spelling}
    monkeypatch.setenv(var, numerics.PINS[var])  # the user's own setting, the pinned value: no conflict
    numerics._state = None
    assert numerics.boot(["pytest"]).conflicts == {}
    numerics.require("portable")


def test_torch_imported_before_lmeraser_is_refused_unless_the_pins_were_set_first(tmp_path):
    code = (
        "import sys\nimport torch\nimport lmeraser\nfrom lmeraser import numerics\n"
        "try:\n    numerics.require('portable')\n"
        "except Exception as error:\n    print(error, file=sys.stderr)\n    raise SystemExit(1)\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    late = _python(code, tmp_path, _env(LMERASER_NUMERICS="portable"))
    assert late.returncode == 1
    assert _one_sentence(late.stderr).startswith(
        "torch was imported before lmeraser, so its kernels could not be pinned; import lmeraser first"
    )
    # The way out it names: the pins set by hand (`lmeraser doctor --env`) before torch loads.
    by_hand = dict(line.removeprefix("export ").split("=", 1) for line in numerics.doctor_env().splitlines())
    assert by_hand == {**numerics.PINS, numerics.ENV_MODE: "portable"}
    pinned = _python(code, tmp_path, _env(**by_hand))
    assert pinned.returncode == 0 and pinned.stdout.strip() == "AVX2", pinned.stderr


def test_a_cpu_that_is_not_x86_64_is_refused_for_portable_and_accepted_for_native(fresh_boot, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    for var in numerics.PINS:  # a process started there from a user's shell: no pin set
        monkeypatch.delenv(var, raising=False)
    assert numerics.unsupported_cpu() == "portable numerics cover x86-64 CPUs only, and this machine is aarch64"
    assert numerics.boot(["pytest"]).unsupported == numerics.unsupported_cpu()
    with pytest.raises(
        ConfigError,
        match=r"^portable numerics cover x86-64 CPUs only, and this machine is aarch64; set runtime.numerics: native",
    ):
        numerics.require("portable")
    numerics.require("native")


def test_native_numerics_accept_the_user_s_own_pin(tmp_path):
    code = (
        "import json\nimport lmeraser, torch\nfrom lmeraser import numerics\nfrom lmeraser.compute import Compute\n"
        "Compute(numerics='native').check()\n"
        "try:\n    numerics.require('portable')\n    refusal = None\n"
        "except Exception as error:\n    refusal = str(error)\n"
        "print(json.dumps({'mode': numerics.state().mode, 'pins': numerics.pins_in_effect(), "
        "'capability': torch.backends.cpu.get_cpu_capability(), 'portable': refusal}))\n"
    )
    done = _python(code, tmp_path, _env(LMERASER_NUMERICS="native", ATEN_CPU_CAPABILITY="default"))
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (
        seen["mode"] == "native"
        and seen["pins"] == {"ATEN_CPU_CAPABILITY": "default"}
        and seen["capability"] == "DEFAULT"
    )
    # Its libraries loaded unpinned: it cannot compute for a portable workspace.
    assert seen["portable"].startswith(
        "the workspace runs portable numerics (runtime.numerics; its backbone.json once built), "
        "but this process started with native numerics (from $LMERASER_NUMERICS)"
    )


# -- 3. a prompt keyed under native is not reused under portable ----------------------------------


def test_the_numerics_are_part_of_every_artifact_key(tiny_params, monkeypatch):
    from lmeraser.training import artifact_key, key_inputs

    # This process runs portable, so a native computation is refused here (tested below); the
    # label alone must already change the key.
    monkeypatch.setattr(numerics, "_verified", set(numerics.MODES))
    shared = {
        mode: key_inputs(
            backbone_sha256="ab" * 32, prompt=tiny_params.prompt, num_classes=10, compute=Compute(numerics=mode)
        )
        for mode in numerics.MODES
    }
    assert [name for name in shared["native"] if shared["native"][name] != shared["portable"][name]] == ["compute"]
    assert shared["native"]["compute"]["numerics"] == "native"
    assert {k: shared["portable"]["compute"][k] for k in ("numerics", "pins", "fingerprint")} == _portable()
    assert artifact_key(shared["native"], "members", 7) != artifact_key(shared["portable"], "members", 7)


def test_prompts_trained_under_native_numerics_are_retrained_under_portable(trained_workspace, tmp_path):
    """A workspace whose params say native, trained by a process started without a pin, then
    switched to portable and trained again: every cluster re-keyed and retrained, none reused."""
    ws = _untrained_copy(trained_workspace[0], tmp_path / "ws", "native")
    stages = ("backbone", "prototypes", "assign", "train")
    code = (
        "import json\nimport lmeraser, torch\nfrom lmeraser import numerics\nfrom lmeraser.config import load_params\n"
        "from lmeraser.stages import stage\nfrom lmeraser.workspace import Workspace\n"
        "ws = Workspace('.')\nparams = load_params(ws.params_file)\n"
        f"for name in {stages!r}:\n    stage(name).function(params, ws, lambda message: None)\n"
        "print(json.dumps({'mode': numerics.state().mode, 'pins': numerics.pins_in_effect(), "
        "'capability': torch.backends.cpu.get_cpu_capability()}))\n"
    )
    native = _python(code, ws.root, _env(LMERASER_NUMERICS="native"))
    assert native.returncode == 0, native.stderr[-3000:]
    process = json.loads(native.stdout.splitlines()[-1])
    assert process["mode"] == "native" and process["pins"] == {}
    meta, index = read_json(ws.backbone_meta_file), ws.prompt_index()
    assert (
        meta["numerics"] == "native"
        and index.key_inputs["compute"]["numerics"] == "native"
        and index.key_inputs["compute"]["pins"] == {}
    )
    assert index.key_inputs["compute"]["fingerprint"] == meta["fingerprint"]
    # This CPU's own kernels compute other bits than the pinned ones (here torch runs
    # process["capability"] unpinned, and MKL its own branch).
    assert meta["fingerprint"] != fingerprint()["sha256"], (
        f"native numerics ({process['capability']}) computed the portable fingerprint"
    )

    values = yaml.safe_load(ws.params_file.read_text())
    values["runtime"]["numerics"] = "portable"
    ws.params_file.write_text(yaml.safe_dump(values, sort_keys=False))
    said: list[str] = []
    results = run_stages(parse_params(values), ws, stages, said.append)
    after = ws.prompt_index()
    assert results["train"]["reused"] == [] and results["train"]["trained"] == sorted(int(c) for c in after.clusters)
    assert results["train"]["rekeyed"] == len(index.clusters)
    assert not {e.key for e in index.clusters.values()} & {e.key for e in after.clusters.values()}
    assert any(line.startswith("re-keyed") and "compute.numerics native -> portable" in line for line in said), said
    assert (
        read_json(ws.backbone_meta_file)["fingerprint"]
        == after.key_inputs["compute"]["fingerprint"]
        == fingerprint()["sha256"]
    )
    assert {k: after.key_inputs["compute"][k] for k in ("numerics", "pins", "fingerprint")} == _portable()


# -- 4. replay across fingerprints cannot compare ------------------------------------------------


@pytest.fixture
def signed(trained_workspace, tmp_path, monkeypatch):
    """A copy of the trained workspace whose trusted signer is a test key, with one exact record
    (signed by it) of a cluster's rebuild, its environment this process's, as a batch writes it."""
    from lmeraser.config import load_params
    from lmeraser.lineage.records import deployed_subjects, environment, lineage_log, signing_key

    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setattr(keys, "_taken", None)
    root = tmp_path / "ws"
    shutil.copytree(trained_workspace[0].root, root)
    ws = Workspace(root)
    test_key = Ed25519PrivateKey.generate()
    keys.write_private_key(ws.signing_key_file, test_key)
    params = load_params(ws.params_file)
    cluster, entry = sorted(ws.prompt_index().clusters.items())[0]
    predicate = {
        "batch_id": "batch-numerics",
        "method": "exact",
        "requests": [],
        "clusters_rebuilt": [
            {
                "cluster": int(cluster),
                "prompt_sha256_before": None,
                "prompt_sha256_after": entry.sha256,
                "seed": entry.seed,
            }
        ],
        "environment": environment(params.prompt.kind, ws, params.runtime.threads),
        "signer": keys.key_id(test_key.public_key()),
    }
    lineage_log(ws).append(deployed_subjects(ws), predicate, signing_key(ws))  # pins the test key as the signer
    assert keys.key_id(keys.load_public_key(ws.signer_file)) == predicate["signer"]
    return ws, test_key


def _re_sign(ws: Workspace, key: Ed25519PrivateKey, **environment) -> None:
    """Rewrite every record's environment with `environment` and sign the log and its head again
    with `key` (the workspace's trusted signer): the log verifies, and says what we wrote."""
    log = LineageLog(ws.lineage_file)
    forged = LineageLog(ws.root / "forged.jsonl")
    for record in log.read_unverified():
        body = {
            k: v for k, v in record.predicate.items() if k not in ("sequence", "previous_record_sha256", "anchored")
        }
        forged.append(record.subjects, {**body, "environment": {**body["environment"], **environment}}, key)
    os.replace(forged.path, log.path)
    os.replace(forged.head_path, log.head_path)


def _no_verdict(text: str) -> None:
    assert not re.search(r"mismatch|verified|\bOK\b|reproduces", text, re.IGNORECASE), text


def test_replay_on_another_fingerprint_or_device_cannot_compare(signed):
    from typer.testing import CliRunner

    from lmeraser.audit.replay import CANNOT_COMPARE
    from lmeraser.audit.verify import public_key, verified_records
    from lmeraser.cli import app

    ws, key = signed
    ours = fingerprint()["sha256"]
    store = _files(ws.store_dir)
    # The record as written replays (this process: the same fingerprint).
    control = CliRunner().invoke(app, ["audit", "replay", "--record", "1", "--root", str(ws.root)])
    assert control.exit_code == 0 and "OK: record 1: replayed 1, matched 1" in control.stdout, (
        control.stdout,
        control.stderr,
    )

    theirs = "5eed" * 16
    _re_sign(ws, key, fingerprint=theirs, cpu="Intel(R) Xeon(R) Platinum 8480+")
    assert (
        verified_records(ws, public_key(ws))[0].predicate["environment"]["fingerprint"] == theirs
    )  # the verifier accepts it
    done = _lmeraser("audit", "replay", "--record", "1", "--root", str(ws.root), cwd=ws.root)
    assert done.returncode == CANNOT_COMPARE == 3, done.stdout + done.stderr
    sentence = _one_sentence(done.stderr)
    assert sentence == (
        f"error: record 1: cannot compare bits on this machine: its numeric fingerprint {theirs[:12]} "
        f"(portable numerics on Intel(R) Xeon(R) Platinum 8480+) differs from this machine's {ours[:12]} "
        f"(portable numerics on {numerics.cpu_name()}), so the same training gives other bits here; "
        "replay it where the fingerprint matches (`lmeraser doctor`)."
    )
    _no_verdict(done.stdout + done.stderr)

    _re_sign(ws, key, fingerprint=ours, device="cuda:0", device_name="NVIDIA H200")
    moved = CliRunner().invoke(app, ["audit", "replay", "--record", "1", "--root", str(ws.root)])
    assert moved.exit_code == CANNOT_COMPARE
    assert (
        "cannot compare bits on this machine: the record was computed on NVIDIA H200, this machine computes on cpu;"
        in _one_sentence(moved.stderr)
    )
    _no_verdict(moved.stdout + moved.stderr)
    assert _files(ws.store_dir) == store  # replay trains into a scratch store only


_OPTIMIZER_STEPS = """
import hashlib, sys, torch
from lmeraser.compute import Compute
torch.set_num_threads(1)
params = [torch.nn.Parameter(torch.rand(n, generator=torch.Generator().manual_seed(n)) - 0.5) for n in (1000, 37, 4097)]
for i, p in enumerate(params):
    p.grad = (torch.rand(p.shape, generator=torch.Generator().manual_seed(10 + i)) - 0.5) * 1e-2
optimizer = Compute().adamw(params, lr=1e-3, weight_decay=0.05)
for _ in range(3):
    optimizer.step()
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest())
"""


def test_the_optimizer_step_does_not_depend_on_mkl_s_code_path():
    """MKL picks its code path by CPU (MKL_CBWR names one); torch's per-tensor AdamW takes its
    square root there, so its bits differed between an Intel Xeon and an AMD EPYC under the same
    pins. The optimizer every trainer uses (Compute.adamw) must give the same bits whatever path
    MKL runs: here the paths of several CPUs are forced on one. Replacing it with torch's default
    AdamW makes this fail on an Intel Xeon (measured: COMPATIBLE and AVX2 differ)."""
    digests = {}
    for branch in ("COMPATIBLE", "AVX2", "AUTO", "SSE4_2"):
        env = _env(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR=branch, LMERASER_NUMERICS="native")
        done = subprocess.run(
            [sys.executable, "-c", _OPTIMIZER_STEPS], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        digests[branch] = done.stdout.strip()
    assert len(set(digests.values())) == 1, digests


# -- 5. the committed reference fingerprint ------------------------------------------------------


def reference_document() -> dict:
    """What tests/data/numerics-fingerprint.json holds: this process's fingerprint, made under
    portable numerics, with the CPU and the library versions it was made with."""
    numerics.require("portable")
    if numerics.state().mode != "portable":
        raise ConfigError("the reference fingerprint is made under portable numerics only.")
    made = fingerprint()
    return {
        "format": made["format"],
        "sha256": made["sha256"],
        "families": made["families"],
        "numerics": "portable",
        "cpu": numerics.cpu_name(),
        "made": datetime.date.today().isoformat(),
        "versions": software(),
    }


def difference(reference: dict, now: dict, cpu: str, versions: dict) -> str | None:
    """Why `now` (a fingerprint) is not the reference's, for the reader who must fix it; None if equal."""
    if now["sha256"] == reference["sha256"]:
        return None
    if now["format"] != reference["format"]:
        return (
            f"the fingerprint's computation changed (format {reference['format']} -> {now['format']}); "
            f"remake the reference: {REMAKE}."
        )
    differ = [
        family
        for family in sorted(set(now["families"]) | set(reference["families"]))
        if now["families"].get(family) != reference["families"].get(family)
    ]
    same = [family for family in now["families"] if family not in differ]
    message = (
        f"this machine's numeric fingerprint {now['sha256'][:12]} (CPU: {cpu}) "
        f"is not the reference's {reference['sha256'][:12]} (CPU: {reference['cpu']}, made {reference['made']}); "
        f"the families that differ: {', '.join(differ)} (equal: {', '.join(same) or 'none'}). "
        "Portable numerics must compute the same bits on every x86-64 CPU: find the kernel "
        "of those families that runs differently on this CPU and pin it (lmeraser/numerics.py), or fix it; "
        "do not re-record the reference."
    )
    names = sorted(set(versions) | set(reference["versions"]))
    changed = [
        f"{name} {reference['versions'].get(name)} -> {versions.get(name)}"
        for name in names
        if reference["versions"].get(name) != versions.get(name)
    ]
    if changed:
        message += (
            f" The library versions also differ from the reference's ({'; '.join(changed)}), "
            "which can change the bits by itself: after a deliberate upgrade (requirements.lock), "
            f"remake it on a machine whose other families agree: {REMAKE}."
        )
    return message


def test_this_machine_computes_the_committed_reference_fingerprint():
    reference = read_json(REFERENCE)
    assert (
        set(reference) == {"format", "sha256", "families", "numerics", "cpu", "made", "versions"}
        and reference["numerics"] == "portable"
    )
    numerics.require("portable")
    problem = difference(reference, fingerprint(), numerics.cpu_name(), software())
    if problem:
        pytest.fail(problem, pytrace=False)


def test_a_differing_fingerprint_names_both_cpus_the_families_and_the_versions():
    now, reference = fingerprint(), read_json(REFERENCE)
    other = {
        **reference,
        "sha256": "0" * 64,
        "cpu": "Intel(R) Xeon(R) Platinum 8480+",
        "families": {**now["families"], "vit_forward": "0" * 16, "faiss_kmeans_search": "1" * 16},
        "versions": {**software(), "torch": "2.0.0"},
    }
    message = difference(other, now, numerics.cpu_name(), software())
    assert f"(CPU: {numerics.cpu_name()})" in message and "(CPU: Intel(R) Xeon(R) Platinum 8480+" in message
    assert "the families that differ: faiss_kmeans_search, vit_forward (equal: vit_backward, adamw_step," in message
    assert "do not re-record the reference" in message
    assert f"The library versions also differ from the reference's (torch 2.0.0 -> {software()['torch']})" in message
    assert "library versions" not in difference({**other, "versions": software()}, now, "x", software())
    assert "format 0 -> " in difference({**other, "format": 0}, now, "x", software())


# -- 6. where the mode comes from ----------------------------------------------------------------


def _params_saying(directory: Path, mode: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "runtime": {"numerics": mode}}))
    return directory / "params.yaml"


def test_the_mode_comes_from_the_environment_then_the_command_line_s_params_then_the_current_directory(
    tmp_path, monkeypatch
):
    command = str(BIN / "lmeraser")
    native, portable = _params_saying(tmp_path / "native", "native"), _params_saying(tmp_path / "portable", "portable")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv(numerics.ENV_MODE, raising=False)
    requested = numerics.requested_mode
    assert requested([command, "doctor"]) == ("portable", "the default")
    assert requested([command, "stage", "train", "--root", str(native.parent)]) == (
        "native",
        f"{native} runtime.numerics",
    )
    assert requested([command, "stage", "train", f"--root={native.parent}"]) == ("native", f"{native} runtime.numerics")
    assert requested([command, "unlearn", "--root", str(portable.parent), "--params", str(native)]) == (
        "native",
        f"{native} runtime.numerics",
    )
    assert requested([command, "unlearn", f"--params={native}", "--root", str(portable.parent)]) == (
        "native",
        f"{native} runtime.numerics",
    )
    assert requested([command, "doctor", "--root"]) == ("portable", "the default")  # an option without its value
    assert requested(["python", "--root", str(native.parent)]) == (
        "portable",
        "the default",
    )  # not an lmeraser command line
    _params_saying(elsewhere, "native")
    assert requested(["python"]) == ("native", "params.yaml runtime.numerics")
    assert requested([command, "stage", "train", "--root", str(portable.parent)]) == (
        "portable",
        f"{portable} runtime.numerics",
    )
    (elsewhere / "params.yaml").write_text("runtime: [unreadable")
    assert requested([command]) == ("portable", "the default")  # config validation says why, later
    monkeypatch.setenv(numerics.ENV_MODE, " native ")
    assert requested([command, "--root", str(portable.parent)]) == ("native", "$LMERASER_NUMERICS")


def test_a_mode_that_is_not_one_is_refused_in_a_sentence_naming_it(fresh_boot, monkeypatch):
    with pytest.raises(ConfigError, match=r"^runtime.numerics is 'fast'; it must be portable or native.$"):
        numerics.require("fast")
    monkeypatch.setenv(numerics.ENV_MODE, "fast")
    state = numerics.boot(["pytest"])
    assert (state.mode, state.source) == ("fast", "$LMERASER_NUMERICS")
    with pytest.raises(
        ConfigError,
        match=r"^LMERASER_NUMERICS is 'fast'; it must be portable or native \(or unset, to follow the workspace\)\.$",
    ):
        Compute(numerics="portable").check()


if __name__ == "__main__":  # python tests/test_numerics.py --write-reference
    if sys.argv[1:] != ["--write-reference"]:
        raise SystemExit(f"usage: {REMAKE}")
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(reference_document(), indent=2) + "\n")
    print(f"wrote {REFERENCE}")


# -- what a stranger found (kept as tests) ----------------------------------------------------------


def _journal(ws: Workspace) -> bytes | None:
    path = ws.root / "audit" / "requests.jsonl"
    return path.read_bytes() if path.exists() else None


def test_a_pinned_process_is_refused_on_a_native_workspace_before_anything_is_journaled(trained_workspace, tmp_path):
    """A shell with LMERASER_NUMERICS=portable (or the pins of `doctor --env`) on a native
    workspace would compute portable bits under a native label and rebuild every cluster."""
    ws = _untrained_copy(trained_workspace[0], tmp_path / "ws", "native")
    sample = str(ws.split("private").manifest["sample_id"].iloc[0])
    before = _files(ws.root)
    for env in (_env(LMERASER_NUMERICS="portable"), _env(LMERASER_NUMERICS="native", **numerics.PINS)):
        refused = _lmeraser("forget", "--sample-id", sample, "--root", str(ws.root), cwd=tmp_path, env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        sentence = _one_sentence(refused.stderr)
        assert sentence.startswith("error: the workspace runs native numerics") and "portable" in sentence
        assert _files(ws.root) == before and _journal(ws) is None  # nothing journaled, nothing written


def test_an_idle_unlearn_imports_no_kernels_and_a_pending_one_is_refused_under_other_numerics(
    trained_workspace, tmp_path
):
    """`lmeraser unlearn` on a schedule with nothing to do computes nothing: it neither checks the
    kernels' pins (which imports torch and faiss, 1.5 s) nor refuses; with a request pending, the
    same process is refused in one sentence before the batch starts, and nothing changes."""
    from lmeraser.journal import Journal

    from helpers import received_event

    ws = _untrained_copy(trained_workspace[0], tmp_path / "ws", "native")
    probe = (
        "import sys; from lmeraser import cli; code = cli.run(sys.argv[1:]); "
        "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules)); sys.exit(code)"
    )
    env = _env(LMERASER_NUMERICS="portable")  # not what the workspace runs
    idle = subprocess.run(
        [sys.executable, "-c", probe, "unlearn", "--root", str(ws.root)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert idle.returncode == 0 and idle.stdout.splitlines() == ["no pending requests", "[]"], idle.stdout + idle.stderr
    Journal(ws).append([received_event("req-pending", sample_ids=(str(ws.manifest("private")["sample_id"][0]),))])
    before = _files(ws.root)
    refused = _lmeraser("unlearn", "--root", str(ws.root), cwd=tmp_path, env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert _one_sentence(refused.stderr).startswith("error: the workspace runs native numerics")
    assert _files(ws.root) == before and [r.request_id for r in Journal(ws).pending()] == ["req-pending"]


def test_params_switched_since_the_backbone_was_built_say_run_dvc_repro(trained_workspace, tmp_path):
    source = trained_workspace[0]
    shutil.copytree(source.root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    values = yaml.safe_load(ws.params_file.read_text())
    values["runtime"]["numerics"] = "native"
    ws.params_file.write_text(yaml.safe_dump(values, sort_keys=False))
    journal = _journal(ws)
    refused = _lmeraser(
        "forget",
        "--sample-id",
        str(ws.split("private").manifest["sample_id"].iloc[0]),
        "--root",
        str(ws.root),
        cwd=tmp_path,
        env=_env(LMERASER_NUMERICS="native"),
    )
    assert refused.returncode == 1
    assert re.fullmatch(
        r"error: runtime\.numerics is native, but the backbone \(.*backbone\.json\) was built under portable numerics; "
        r"run `dvc repro` .*",
        _one_sentence(refused.stderr),
    )
    assert _journal(ws) == journal
    # An idle `unlearn` says so too (this check reads backbone.json only; a stranger found it skipped).
    idle = _lmeraser("unlearn", "--root", str(ws.root), cwd=tmp_path, env=_env(LMERASER_NUMERICS="native"))
    assert idle.returncode == 1 and "was built under portable numerics" in _one_sentence(idle.stderr)


def test_numpy_s_own_variable_is_a_conflict_in_one_sentence_not_a_traceback(tmp_path):
    env = _env(NPY_DISABLE_CPU_FEATURES="AVX512F")
    version = _lmeraser("--version", cwd=tmp_path, env=env)
    assert version.returncode == 0 and "Traceback" not in version.stderr  # numpy starts: only ours is left unset
    refused = _lmeraser("doctor", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert _one_sentence(refused.stderr).startswith(
        "error: NPY_DISABLE_CPU_FEATURES is set to 'AVX512F' in the environment"
    )


def test_a_mode_variable_that_is_not_a_mode_is_refused_even_for_a_native_workspace(fresh_boot, monkeypatch):
    monkeypatch.setenv(numerics.ENV_MODE, "garbage")
    numerics.boot(["pytest"])
    for mode in numerics.MODES:
        with pytest.raises(ConfigError, match=r"^LMERASER_NUMERICS is 'garbage'; it must be portable or native"):
            numerics.require(mode)


def test_the_last_root_or_params_on_the_command_line_wins_as_for_the_cli(tmp_path, monkeypatch):
    monkeypatch.delenv(numerics.ENV_MODE, raising=False)
    for name, mode in (("a", "portable"), ("b", "native")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump({"runtime": {"numerics": mode}}))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert numerics.requested_mode(["/venv/bin/lmeraser", "doctor", "--root", a, "--root", b])[0] == "native"
    assert numerics.requested_mode(["/venv/bin/lmeraser", "doctor", f"--root={b}", "--root", a])[0] == "portable"
    # `python -m lmeraser.cli` reads the same options.
    assert numerics.requested_mode(["/src/lmeraser/cli.py", "doctor", "--root", b])[0] == "native"


def test_an_exact_batch_is_refused_before_any_change_where_the_served_prompts_were_trained_under_other_bits(
    trained_workspace, tmp_path
):
    """Another CPU, numerics or pins: the batch would re-key and retrain every cluster and fail
    its own check after the data had changed. The preflight says so first."""
    from lmeraser.errors import LmeraserError
    from lmeraser.unlearning.preflight import check_before_change, check_compute

    shutil.copytree(trained_workspace[0].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    check_compute(ws)  # as trained: the same bits here
    index = read_json(ws.prompt_index_file)
    index["key_inputs"]["compute"]["fingerprint"] = "0" * 64
    ws.prompt_index_file.write_text(json.dumps(index))
    before = _files(ws.root)
    with pytest.raises(
        LmeraserError,
        match=r"^the served prompts were trained under other numerics than this process computes \(fingerprint differ",
    ):
        check_before_change(ws)
    assert _files(ws.root) == before


def test_the_fingerprint_s_lora_computes_what_peft_s_lora_computes_bit_for_bit():
    """The fingerprint's LoRA family runs peft's LoRA computation without importing peft; if a
    peft release computed its layer otherwise, the fingerprint would no longer describe it."""
    import copy

    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from lmeraser.compute import seeded_uniform_
    from lmeraser.fingerprint import LORA_ALPHA, LORA_RANK, LORA_TARGETS, with_lora

    from helpers import tiny_backbone

    backbone = tiny_backbone(depth=2)
    x = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    y = torch.arange(6) % 4

    def one_step(adapted):
        lora = [p for name, p in adapted.named_parameters() if "lora_" in name]
        generator = torch.Generator().manual_seed(7)
        for parameter in lora:
            seeded_uniform_(parameter.data, 0.2, generator)
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(lora, lr=0.02)
        loss = torch.nn.functional.cross_entropy(adapted(x), y)
        loss.backward()
        grads = [p.grad.clone() for p in lora]
        optimizer.step()
        return [name for name, p in adapted.named_parameters() if "lora_" in name], [loss, *grads, *lora]

    theirs = copy.deepcopy(backbone)
    inject_adapter_in_model(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS)), theirs
    )
    their_names, their_values = one_step(theirs)
    our_names, our_values = one_step(with_lora(backbone))
    assert [n.replace(".default", "") for n in their_names] == our_names  # same parameters, same order
    assert len(our_values) == 1 + 2 * len(our_names) and len(our_names) == 2 * len(LORA_TARGETS)
    for mine, peft_s in zip(our_values, their_values, strict=True):
        assert mine.shape == peft_s.shape and torch.equal(mine, peft_s)
