"""Portable numerics: the same float bits on every x86-64 CPU, or the CPU's own fastest kernels.

torch, MKL, oneDNN, numpy and faiss each pick their kernels by the CPU's features when they load
(AVX-512 on one machine, AVX2 on another), so the same training on two CPUs gives different bits,
and an erasure's proof (rebuild the cluster, get the served prompt bit for bit) would hold only on
a machine like the one that made it. `runtime.numerics`:

- `portable` (the default) pins every library to the kernels all x86-64 CPUs with AVX2 and FMA
  share, before any of them is imported: ATen's dispatch to AVX2, oneDNN's ISA to AVX2, MKL's
  conditional numerical reproducibility to COMPATIBLE (on AMD CPUs MKL does not honour an AVX2
  branch) with its dynamic threading off, numpy's dispatched loops to X86_V3 (AVX2), faiss's
  dynamic dispatch to its generic code, and faiss's distance computations off OpenBLAS (whose
  kernel is chosen per CPU, by OPENBLAS_CORETYPE where a machine sets it: never overridden here);
  thread counts are the configured ones, set in every compute block (lmeraser/determinism.py).
- `native` leaves every library to choose: faster on some CPUs, bits tied to the CPU.

Either way the numeric fingerprint (lmeraser/fingerprint.py) of what a process actually computes
is recorded with the backbone, in every artifact key and every lineage record: two machines with
equal fingerprints compute the same bits; replay on a machine with another one says it cannot
compare, never "mismatch".

The pins are read by the libraries when they load, so `boot()` runs when the `lmeraser` package
is imported (lmeraser/__init__.py), before torch, numpy or faiss; it reads the mode from
$LMERASER_NUMERICS, else from the params file the `lmeraser` command is given (`--params`,
`--root`), else ./params.yaml, else the default. `require()` then checks, with torch loaded,
that every pin took effect, and refuses in one sentence where one did not. This module imports
nothing heavy at module level.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmeraser.errors import ConfigError

MODES = ("portable", "native")
# Decided by a measurement (bench/numerics.py, docs/benchmarks.md): portable costs at most 1.3x.
DEFAULT = "portable"
ENV_MODE = "LMERASER_NUMERICS"

# What `portable` sets, and why each: every one is checked by `require()` or `lmeraser doctor`.
PINS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own kernels: the AVX2 build, not AVX-512
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (the patch-embedding convolution, some matmuls)
    "DNNL_MAX_CPU_ISA": "AVX2",  # the same, under oneDNN's older name
    "MKL_CBWR": "COMPATIBLE",  # MKL's BLAS: the code path every x86-64 CPU runs alike
    "MKL_DYNAMIC": "FALSE",  # MKL uses the thread count asked for, never fewer
    "OMP_DYNAMIC": "FALSE",  # nor does OpenMP
    "NPY_ENABLE_CPU_FEATURES": "X86_V3",  # numpy's dispatched loops: AVX2 at most
    "FAISS_SIMD_LEVEL": "NONE",  # faiss >= 1.12 (dynamic dispatch): its generic code
    "FAISS_OPT_LEVEL": "generic",  # older faiss: the loader's generic library
}
_LIBRARIES = ("torch", "numpy", "faiss")
_NUMPY_DISABLE = "NPY_DISABLE_CPU_FEATURES"  # numpy's other variable: it may not be set beside ours
_REQUIRED_CPU_FLAGS = ("avx2", "fma")  # what the AVX2 kernels every pin selects need


@dataclass
class BootState:
    """What `boot()` found and did in this process."""

    mode: str
    source: str  # where the mode came from, for messages
    conflicts: dict[str, str] = field(default_factory=dict)  # pin -> the user's other value
    late: list[str] = field(default_factory=list)  # libraries loaded before the pins were set
    unsupported: str | None = None  # why this CPU cannot run portable numerics


_state: BootState | None = None


def boot(argv: list[str] | None = None) -> BootState:
    """Set the pins of the requested mode before torch, numpy or faiss load (once per process).
    Never raises: what is wrong is kept for `require()`, which says it in one sentence."""
    global _state
    if _state is not None:
        return _state
    mode, source = requested_mode(sys.argv if argv is None else argv)
    state = BootState(mode, source)
    if mode == "portable":
        state.unsupported = unsupported_cpu()
        if state.unsupported is None:
            missing = [var for var in PINS if var not in os.environ]
            state.late = [lib for lib in _LIBRARIES if lib in sys.modules] if missing else []
            if os.environ.get(_NUMPY_DISABLE) is not None:
                # numpy refuses to start with both its variables set: the user's is the conflict.
                state.conflicts[_NUMPY_DISABLE] = os.environ[_NUMPY_DISABLE]
            for var, value in PINS.items():
                have = os.environ.get(var)
                if have is None:
                    if var == "NPY_ENABLE_CPU_FEATURES" and _NUMPY_DISABLE in state.conflicts:
                        continue
                    os.environ[var] = value
                elif have != value:  # exactly: torch and MKL read these case-sensitively, oneDNN rejects spaces
                    state.conflicts[var] = have
    _state = state
    return state


def requested_mode(argv: list[str]) -> tuple[str, str]:
    """The mode this process asks for, and from where: $LMERASER_NUMERICS, else the params file
    of the `lmeraser` command line, else ./params.yaml, else the default. A value that is not a
    mode is returned as is, for `require()` to name."""
    if os.environ.get(ENV_MODE):
        return os.environ[ENV_MODE].strip(), f"${ENV_MODE}"
    params = _params_file(argv)
    mode = _mode_in(params)
    if mode is not None:
        return mode, f"{params} runtime.numerics"
    return DEFAULT, "the default"


def _params_file(argv: list[str]) -> Path:
    """The params file an `lmeraser` command line names (`--params`, else `--root`/params.yaml),
    else ./params.yaml."""
    options: dict[str, str] = {}
    program = Path(argv[0]) if argv else Path()
    if program.name == "lmeraser" or program.parts[-2:] in (("lmeraser", "cli.py"), ("lmeraser", "__main__.py")):
        for i, arg in enumerate(argv[1:], start=1):
            for name in ("--params", "--root"):  # the last one wins, as on the command line
                if arg == name and i + 1 < len(argv):
                    options[name] = argv[i + 1]
                elif arg.startswith(name + "="):
                    options[name] = arg.split("=", 1)[1]
    if "--params" in options:
        return Path(options["--params"])
    return Path(options.get("--root", ".")) / "params.yaml"


def _mode_in(params: Path) -> str | None:
    """runtime.numerics of a params file, if it is readable and says; the full validation of the
    file (lmeraser/config.py) reports anything else."""
    try:
        if not params.is_file():
            return None
        import yaml

        raw = yaml.safe_load(params.read_text(encoding="utf-8"))
        value = raw.get("runtime", {}).get("numerics") if isinstance(raw, dict) else None
    except Exception:  # noqa: BLE001 (any unreadable file: config validation says why, later)
        return None
    return str(value) if value is not None else None


def unsupported_cpu() -> str | None:
    """Why this machine cannot run portable numerics, or None."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"portable numerics cover x86-64 CPUs only, and this machine is {machine or 'of unknown architecture'}"
    flags = cpu_flags()
    if flags:  # unreadable /proc/cpuinfo: the capability check after torch loads decides
        lacking = [flag.upper() for flag in _REQUIRED_CPU_FLAGS if flag not in flags]
        if lacking:
            return f"portable numerics pin every library to AVX2 kernels, and this CPU lacks {', '.join(lacking)}"
    return None


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The CPU as the OS names it, with its vendor, family, model and stepping (a virtual
    machine's model name is often only "AMD EPYC" or "Intel Xeon Processor")."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    detail = [fields[k] for k in ("vendor_id",) if k in fields] + [
        f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields
    ]
    return f"{name} ({', '.join(detail)})" if detail else name


def state() -> BootState:
    return _state if _state is not None else boot()


def pins_in_effect() -> dict[str, str]:
    """The pinned variables as this process has them (portable: all of them; native: any a user
    set), for records and artifact keys."""
    return {var: os.environ[var] for var in PINS if var in os.environ}


_verified: set[str] = set()


def require(mode: str, kernels: bool = True) -> None:
    """Refuse, in one sentence, to compute under `mode` unless this process runs it: for
    `portable`, every pin set before its library loaded and each one in effect. Without `kernels`,
    torch's and faiss's pins are left for the first computation with them to check (lmeraser/
    compute.py): a process that only reads and hashes does not import them."""
    if mode not in MODES:
        raise ConfigError(f"runtime.numerics is '{mode}'; it must be portable or native.")
    boot_state = state()
    if boot_state.mode not in MODES:
        raise ConfigError(
            f"{ENV_MODE} is '{boot_state.mode}'; it must be portable or native (or unset, to follow the workspace)."
        )
    if mode in _verified:
        return
    if mode == "portable":
        _require_portable(boot_state, kernels)
    else:
        _require_native(boot_state)
    if kernels or mode != "portable":
        _verified.add(mode)


def _require_native(boot_state: BootState) -> None:
    """A native workspace computed by a process that runs the portable pins would get portable
    bits under a native label, and rebuild every cluster it touches: refused."""
    if boot_state.mode == "portable" and boot_state.unsupported is None:
        raise ConfigError(
            "the workspace runs native numerics (runtime.numerics; its backbone.json once built), "
            f"but this process started with portable numerics (from {boot_state.source}); unset {ENV_MODE}, "
            "or run it from the workspace, or run `dvc repro` to rebuild under portable."
        )
    if all(var in os.environ for var in PINS):
        raise ConfigError(
            "the workspace runs native numerics (runtime.numerics; its backbone.json once built), "
            f"but this process's environment carries every portable pin ({', '.join(PINS)}), "
            "so it would compute portable bits; unset them (`lmeraser doctor --env` lists them) "
            "or run `dvc repro` under portable."
        )


NATIVE_FIX = f"set runtime.numerics: native (or {ENV_MODE}=native) to run with this machine's own kernels"


def _require_portable(boot_state: BootState, kernels: bool = True) -> None:
    how = NATIVE_FIX
    if boot_state.mode != "portable":
        raise ConfigError(
            "the workspace runs portable numerics (runtime.numerics; its backbone.json once built), "
            f"but this process started with {boot_state.mode} numerics (from {boot_state.source}), "
            f"so its libraries loaded unpinned; unset {ENV_MODE} or run it from the workspace, or, "
            "if you changed runtime.numerics, run `dvc repro` to rebuild under it."
        )
    if boot_state.unsupported:
        raise ConfigError(f"{boot_state.unsupported}; {how}.")
    if boot_state.conflicts:
        var, have = next(iter(boot_state.conflicts.items()))
        needed = (
            f"portable numerics need '{PINS[var]}'"
            if var in PINS
            else "portable numerics set NPY_ENABLE_CPU_FEATURES, which numpy refuses beside it"
        )
        raise ConfigError(
            f"{var} is set to '{have}' in the environment, but {needed} (the run would not be portable); "
            f"unset it or {how}."
        )
    # torch's oneDNN reads its pin at its first primitive, which no API here can check: torch
    # loaded unpinned is refused; numpy's and faiss's own checks below say whether theirs held.
    if "torch" in boot_state.late:
        raise ConfigError(
            f"torch was imported before lmeraser, so its kernels could not be pinned; import lmeraser first, "
            f"or set the pins yourself (`lmeraser doctor --env`), or {how}."
        )
    changed = [var for var, value in PINS.items() if os.environ.get(var) != value]
    if changed:
        raise ConfigError(
            f"{changed[0]} was changed in this process after lmeraser pinned it to '{PINS[changed[0]]}'; "
            "the run would not be portable."
        )
    for check in (_torch_capability, _mkl_branch, _numpy_dispatch, _faiss_generic) if kernels else (_numpy_dispatch,):
        problem = check()
        if problem:
            late = (
                f" ({', '.join(boot_state.late)} was imported before lmeraser: import lmeraser first)"
                if boot_state.late
                else ""
            )
            raise ConfigError(f"portable numerics did not take effect: {problem}{late}; {how}.")


def _torch_capability() -> str | None:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return None if capability == "AVX2" else f"torch dispatches its CPU kernels to {capability}, not AVX2"


MKL_CBWR_BRANCH, MKL_CBWR_COMPATIBLE = 1, 3  # mkl_cbwr.h


def _mkl_branch() -> str | None:
    """MKL's branch and dynamic threading, read from the MKL torch links (where it exports them)."""
    mkl = _mkl()
    if mkl is None:
        return None
    branch = mkl.mkl_serv_cbwr_get(MKL_CBWR_BRANCH)
    if branch != MKL_CBWR_COMPATIBLE:
        return f"MKL runs conditional-reproducibility branch {branch}, not COMPATIBLE ({MKL_CBWR_COMPATIBLE})"
    if hasattr(mkl, "mkl_serv_get_dynamic") and mkl.mkl_serv_get_dynamic() != 0:
        return "MKL's dynamic threading is on"
    return None


def _mkl():
    """torch's MKL (linked into libtorch_cpu), if it exports its service functions."""
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        mkl = ctypes.CDLL(str(library))
        mkl.mkl_serv_cbwr_get  # noqa: B018 (probe: AttributeError where not exported)
    except (OSError, AttributeError):
        return None
    return mkl


def _numpy_dispatch() -> str | None:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        return "this numpy exposes no CPU dispatch table (numpy 2 is needed)"
    beyond = [name for name in __cpu_dispatch__ if name != "X86_V3" and __cpu_features__.get(name)]
    return f"numpy dispatches to {', '.join(beyond)}" if beyond else None


def _faiss_generic() -> str | None:
    """faiss's generic code, and its distances off OpenBLAS (which picks a kernel per CPU)."""
    import faiss

    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and config.get_level_name() != "NONE":
        return f"faiss runs its {config.get_level_name()} code, not the generic one"
    # faiss hands distances to OpenBLAS above this many queries: never, under portable.
    faiss.cvar.distance_compute_blas_threshold = 2**31 - 1
    return None


def doctor_env() -> str:
    """Shell lines that set the portable pins (for a Dask worker or a notebook started by hand)."""
    return "\n".join(f"export {var}={value}" for var, value in PINS.items()) + f"\nexport {ENV_MODE}=portable"


# A child process (same environment, so the same pins) runs a convolution and a matmul with
# oneDNN's and MKL's verbose logs on: what they print is what they ran.
_PROBE = """
import lmeraser, torch
torch.set_num_threads(1)
torch.nn.functional.conv2d(torch.ones(1, 3, 16, 16), torch.ones(8, 3, 4, 4), stride=4)
torch.ones(96, 96) @ torch.ones(96, 96)
"""


def effects() -> list[dict]:
    """What took effect in this process and in a probe child, each with the value portable
    numerics need: [{"what", "value", "portable"}]. `value` is what was found."""
    import subprocess

    import torch

    rows = [
        {
            "what": "torch CPU capability (ATen dispatch)",
            "value": torch.backends.cpu.get_cpu_capability(),
            "portable": "AVX2",
        }
    ]
    mkl = _mkl()
    if mkl is not None:
        rows.append(
            {
                "what": "MKL conditional-reproducibility branch",
                "value": str(mkl.mkl_serv_cbwr_get(MKL_CBWR_BRANCH)),
                "portable": str(MKL_CBWR_COMPATIBLE),
            }
        )
        if hasattr(mkl, "mkl_serv_get_dynamic"):
            rows.append(
                {
                    "what": "MKL dynamic threading",
                    "value": "on" if mkl.mkl_serv_get_dynamic() else "off",
                    "portable": "off",
                }
            )
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

        dispatched = " ".join(name for name in __cpu_dispatch__ if __cpu_features__.get(name)) or "baseline only"
    except ImportError:
        dispatched = "unknown"
    rows.append({"what": "numpy dispatched loops", "value": dispatched, "portable": "X86_V3"})
    import faiss

    config = getattr(faiss, "SIMDConfig", None)
    rows.append(
        {
            "what": "faiss SIMD level",
            "value": config.get_level_name() if config is not None else "n/a (no dynamic dispatch)",
            "portable": "NONE",
        }
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
        out = probe.stdout + probe.stderr
    except (OSError, subprocess.TimeoutExpired) as error:
        out = f"probe failed: {error}"
    isa = next(
        (line.split("isa:", 1)[1].strip() for line in out.splitlines() if "onednn_verbose" in line and "isa:" in line),
        "not seen",
    )
    cnr = next(
        (
            part.split(":", 1)[1]
            for line in out.splitlines()
            if line.startswith("MKL_VERBOSE")
            for part in line.split()
            if part.startswith("CNR:")
        ),
        "not seen",
    )
    rows.append({"what": "oneDNN ISA (probe)", "value": isa, "portable": "Intel AVX2"})
    rows.append({"what": "MKL CNR mode (probe)", "value": cnr, "portable": "COMPATIBLE"})
    return rows
