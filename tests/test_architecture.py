"""The structure the code stands on: dvc.yaml agrees with the stage registry (code deps included),
and the layers import only downwards."""

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from lmeraser.stages import NEUTRAL_MODULES, STAGE_NAMES, STAGES, interpolate, stage

REPO = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every lmeraser module `path` imports, at module level or inside functions (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lmeraser"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmeraser":
            for alias in node.names:  # `from lmeraser import training` imports the module lmeraser.training
                sub = f"{node.module}.{alias.name}"
                out.add(sub if _module_file(sub) else node.module)
    return out


def _closure(module: str) -> set[str]:
    """Files of every lmeraser module loading `module` executes (its packages' __init__ too)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            path = _module_file(prefix)
            if path is not None and (rel := path.relative_to(REPO).as_posix()) not in seen:
                seen.add(rel)
                todo.extend(_imports(path))
    return seen


def _docstring_only(rel: str) -> bool:
    body = ast.parse((REPO / rel).read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def test_dvc_yaml_declares_exactly_the_registry():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == list(STAGE_NAMES)
    for definition in STAGES:
        assert declared[definition.name] == definition.dvc_entry(), definition.name


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_code_deps_cover_every_library_module_the_stage_imports(name):
    """A change to any module a stage's code runs must re-run the stage (invariant 4), except the
    registry's named neutral modules, which compute nothing."""
    definition = stage(name)
    for dep in definition.code:
        assert (REPO / dep).exists(), dep
    uncovered = sorted(
        rel
        for rel in _closure(definition.module)
        if rel not in NEUTRAL_MODULES
        and not _docstring_only(rel)
        and not any(rel == dep or rel.startswith(dep.rstrip("/") + "/") for dep in definition.code)
    )
    assert uncovered == [], f"{name}: add to its code deps in lmeraser/stages.py and dvc.yaml"


def test_the_coverage_check_can_fail():
    """The closure really follows lazy and `from package import module` imports."""
    closure = _closure("lmeraser.pipeline.evaluate")
    assert {
        "lmeraser/overlay.py",
        "lmeraser/clustering.py",
        "lmeraser/models/peft/lora.py",
        "lmeraser/store.py",
    } <= closure
    assert "lmeraser/__init__.py" in _closure("lmeraser.training")


def test_every_stage_names_the_params_it_reads_and_they_exist():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for definition in STAGES:
        values = definition.param_values(params)
        assert len(values) == len(definition.params)
    assert interpolate("prompt.${prompt.kind}", params) == "prompt.pad"


# Each package, and what it must never import (directly or through anything it imports). Read
# from the bottom: the workspace knows nothing of lmeraser; the models, the data and the lineage
# log know no pipeline; the library knows no entry point; the service knows no orchestration.
ENTRY_POINTS = ("lmeraser.cli", "lmeraser.flows", "lmeraser.service")
LOWER_THAN = {
    "lmeraser.workspace": ("lmeraser.",),
    "lmeraser.models": (
        "lmeraser.data",
        "lmeraser.pipeline",
        "lmeraser.unlearning",
        "lmeraser.audit",
        "lmeraser.lineage",
        "lmeraser.tracking",
        *ENTRY_POINTS,
    ),
    "lmeraser.data": (
        "lmeraser.models",
        "lmeraser.pipeline",
        "lmeraser.unlearning",
        "lmeraser.audit",
        "lmeraser.lineage",
        "lmeraser.tracking",
        *ENTRY_POINTS,
    ),
    "lmeraser.lineage": (
        "lmeraser.unlearning",
        "lmeraser.pipeline",
        "lmeraser.audit",
        "lmeraser.stages",
        *ENTRY_POINTS,
    ),
    "lmeraser.audit": ("lmeraser.unlearning", *ENTRY_POINTS),
    "lmeraser.pipeline": (
        "lmeraser.unlearning",
        "lmeraser.audit",
        "lmeraser.lineage",
        "lmeraser.tracking",
        *ENTRY_POINTS,
    ),
    "lmeraser.unlearning": ENTRY_POINTS,
    "lmeraser.service": ("lmeraser.cli", "lmeraser.flows"),  # handed its batch runner by the CLI
    "lmeraser.flows": ("lmeraser.cli", "lmeraser.service"),
}
PACKAGES = sorted(
    str(path.parent.relative_to(REPO)).replace("/", ".") for path in (REPO / "lmeraser").glob("*/__init__.py")
)


def test_every_package_has_its_place_in_the_layers():
    assert set(PACKAGES) <= set(LOWER_THAN), f"give {sorted(set(PACKAGES) - set(LOWER_THAN))} a rule in LOWER_THAN"


def _package_modules(package: str) -> list[str]:
    path = _module_file(package)
    files = [path] if path.name != "__init__.py" else sorted(path.parent.rglob("*.py"))
    return [".".join(f.relative_to(REPO).with_suffix("").parts) for f in files]


def _reached(modules: list[str]) -> set[str]:
    return {
        ".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__")
        for module in modules
        for rel in _closure(module)
    }


@pytest.mark.parametrize("package", sorted(LOWER_THAN))
def test_layers_import_only_downwards(package):
    allowed = {"lmeraser.workspace": {"lmeraser.errors", "lmeraser", "lmeraser.numerics"}}.get(package, set())
    reached = _reached(_package_modules(package))
    own = {m for m in reached if m == package or m.startswith(package + ".")}
    bad = sorted(m for m in reached - own - allowed if m.startswith(LOWER_THAN[package]))
    assert bad == [], f"{package} reaches {bad}"


def _import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the lmeraser modules it imports, at module level or inside functions."""
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / "lmeraser").rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def import_cycles(root: Path) -> list[list[str]]:
    """The import circles among lmeraser's modules (strongly connected components of more than
    one module); a package's __init__ imported by its own modules does not count."""
    graph = _import_graph(root)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_itself_in_a_circle():
    assert import_cycles(REPO) == []


def test_the_cycle_check_finds_a_planted_circle(tmp_path):
    """A scratch copy where lmeraser.workspace imports lmeraser.cli inside a function (the kind of
    circle a function-local import hides) fails the check."""
    shutil.copytree(REPO / "lmeraser", tmp_path / "lmeraser", ignore=shutil.ignore_patterns("__pycache__"))
    workspace = tmp_path / "lmeraser" / "workspace.py"
    workspace.write_text(
        workspace.read_text() + "\n\ndef _planted():\n    from lmeraser.cli import main  # noqa: F401\n"
    )
    cycles = import_cycles(tmp_path)
    assert cycles and any({"lmeraser.workspace", "lmeraser.cli"} <= set(c) for c in cycles)


def test_the_code_identity_lists_every_module_the_training_code_runs():
    """A change to any module a prompt's training runs must re-key the prompts (invariant 4), as
    a stage's code deps must re-run it. Exempt: modules that compute nothing, the other PEFT
    kinds' modules (the registry imports them all; a kind's prompt runs only its own), and the
    numerics and fingerprint modules, whose effect the key holds as values (the pins in effect
    and the numeric fingerprint, in its compute identity)."""
    from lmeraser.code_identity import training_files
    from lmeraser.models.peft import ADAPTERS

    kinds = sorted(ADAPTERS)
    assert kinds == ["lora", "pad", "vpt"]
    for kind in kinds:
        listed = {f"lmeraser/{name}" for name in training_files(kind)}
        assert all((REPO / rel).exists() for rel in listed)
        closure = _closure("lmeraser.training") | _closure(f"lmeraser.models.peft.{kind}")
        others = {f"lmeraser/models/peft/{other}.py" for other in kinds if other != kind}
        exempt = {
            *NEUTRAL_MODULES,
            *others,
            "lmeraser/code_identity.py",
            "lmeraser/numerics.py",
            "lmeraser/fingerprint.py",
        }
        uncovered = sorted(rel for rel in closure - listed - exempt if not _docstring_only(rel))
        assert uncovered == [], f"{kind}: add to TRAINING_CODE in lmeraser/code_identity.py"


# The pyfunc model file MLflow loads ("models from code"): importing mlflow is its purpose, and
# nothing in the library imports it (tracking hands MLflow its path).
MLFLOW_MODEL_FILE = "lmeraser/serving_pyfunc.py"


def test_the_library_core_never_imports_prefect_or_mlflow_at_module_level():
    """Only the flows (the orchestration) import Prefect when loaded; nothing imports MLflow when loaded."""
    offenders = []
    for path in sorted((REPO / "lmeraser").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == MLFLOW_MODEL_FILE:
            continue
        banned = ("mlflow",) if rel.startswith("lmeraser/flows/") else ("prefect", "mlflow")
        for node in ast.parse(path.read_text()).body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] in banned for n in names):
                offenders.append(rel)
    assert offenders == []


def test_only_the_cli_reaches_the_flows():
    """The library is plain Python: the flows wrap it, and only the command line starts them."""
    importers = sorted(
        module
        for module, imported in _import_graph(REPO).items()
        if not module.startswith(("lmeraser.flows", "lmeraser.cli"))
        and any(m.startswith("lmeraser.flows") for m in imported)
    )
    assert importers == []
