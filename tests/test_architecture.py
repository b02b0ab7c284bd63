"""The structure the code stands on: dvc.yaml agrees with the stage registry (code deps included),
and the layers import only downwards."""

import ast
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
            out |= {alias.name for alias in node.names if alias.name.split(".")[0] in ("lmeraser", "flows")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("lmeraser", "flows"):
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
        if rel not in NEUTRAL_MODULES and not _docstring_only(rel) and not any(rel == dep or rel.startswith(dep.rstrip("/") + "/") for dep in definition.code)
    )
    assert uncovered == [], f"{name}: add to its code deps in lmeraser/stages.py and dvc.yaml"


def test_the_coverage_check_can_fail():
    """The closure really follows lazy and `from package import module` imports."""
    closure = _closure("lmeraser.pipeline.evaluate")
    assert {"lmeraser/overlay.py", "lmeraser/clustering.py", "lmeraser/models/peft/lora.py", "lmeraser/store.py"} <= closure
    assert "lmeraser/__init__.py" in _closure("lmeraser.training")


def test_every_stage_names_the_params_it_reads_and_they_exist():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for definition in STAGES:
        values = definition.param_values(params)
        assert len(values) == len(definition.params)
    assert interpolate("prompt.${prompt.kind}", params) == "prompt.pad"


LOWER_THAN = {
    # package -> modules it must never import (directly or through anything it imports)
    "lmeraser.workspace": ("lmeraser.",),
    "lmeraser.lineage": ("lmeraser.unlearning", "lmeraser.pipeline", "lmeraser.audit", "lmeraser.stages", "lmeraser.cli", "flows"),
    "lmeraser.audit": ("lmeraser.unlearning", "lmeraser.cli", "flows"),
    "lmeraser.pipeline": ("lmeraser.unlearning", "lmeraser.audit", "lmeraser.lineage", "lmeraser.cli", "lmeraser.tracking", "flows"),
}


@pytest.mark.parametrize("package", sorted(LOWER_THAN))
def test_layers_import_only_downwards(package):
    allowed = {"lmeraser.workspace": {"lmeraser.errors", "lmeraser", "lmeraser.numerics"}}.get(package, set())
    files = (
        [_module_file(package)]
        if _module_file(package) and _module_file(package).name != "__init__.py"
        else sorted((REPO / Path(*package.split("."))).glob("*.py"))
    )
    reached = set()
    for path in files:
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        reached |= {".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__") for rel in _closure(module)}
    own = {m for m in reached if m == package or m.startswith(package + ".")}
    bad = sorted(m for m in reached - own - allowed if m.startswith(LOWER_THAN[package]))
    assert bad == [], f"{package} reaches {bad}"


# The pyfunc model file MLflow loads ("models from code"): importing mlflow is its purpose, and
# nothing in the library imports it (tracking hands MLflow its path).
MLFLOW_MODEL_FILE = "lmeraser/serving_pyfunc.py"


def test_the_library_core_never_imports_prefect_or_mlflow_at_module_level():
    offenders = []
    for path in sorted((REPO / "lmeraser").rglob("*.py")):
        if path.relative_to(REPO).as_posix() == MLFLOW_MODEL_FILE:
            continue
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("prefect", "mlflow") for n in names):
                offenders.append(path.relative_to(REPO).as_posix())
    assert offenders == []
