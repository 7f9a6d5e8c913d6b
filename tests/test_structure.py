"""Guards for the code's shape: no import cycles, recipes parse without torch, stages declared completely."""

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.recipe.stages import EVALUATIONS, STAGE_TYPES, TRAIN_LOSS

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "datasets", "accelerate", "deepspeed", "triton", "matplotlib")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _pipeline_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / "pipeline").rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The pipeline modules `path` imports anywhere (top level or inside functions)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` imports the submodule, else pkg's own names
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != me}


def test_no_import_cycles_inside_pipeline():
    modules = _pipeline_modules()
    graph = {m: _imports(p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_parsing_and_planning_a_recipe_imports_no_torch():
    code = ("import sys\n"
            "from pipeline.recipe import load_recipe\n"
            "from pipeline.runner import format_plan, plan\n"
            "recipe = load_recipe('recipes/tiny.yaml', ['run_dir=/nonexistent/run'])\n"
            "print(format_plan(recipe, plan(recipe)).splitlines()[0])\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LOADED []" in r.stdout, r.stdout


def test_every_stage_is_declared_once_and_completely():
    modules = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGE_TYPES), "every stages/NAME.py has a @stage_type('NAME') settings class and back"
    for name, cls in STAGE_TYPES.items():
        assert cls.NAME == name
        source = (ROOT / "stages" / f"{name}.py").read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        head = "\n".join(doc.splitlines()[:4])  # a title line, a blank line, then the command
        assert f"python -m stages.{name} recipes/" in head, f"stages/{name}.py: its docstring opens with its command"
        assert f'stage_main("{name}", run)' in source
        assert cls.OUTPUTS, name
        assert set(cls.DEFAULT_INPUTS) <= set(cls.INPUTS) and set(cls.OPTIONAL_INPUTS) <= set(cls.INPUTS), name
        for module in cls.IMPORTS:  # the runner preloads these before forking the stage
            assert importlib.util.find_spec(module) is not None, f"{name}: IMPORTS names no module {module!r}"
        for curve in cls.CURVES:
            assert curve.file in (TRAIN_LOSS, EVALUATIONS), (name, curve)


def test_every_package_has_a_usage_docstring_and_an_explicit_all():
    for init in sorted((ROOT / "pipeline").rglob("__init__.py")):
        name = _module_name(init)
        module = importlib.import_module(name)
        assert module.__doc__ and len(module.__doc__.splitlines()) > 3, f"{name}: no usage docstring"
        assert isinstance(getattr(module, "__all__", None), list), f"{name}: no __all__"
        for item in module.__all__:
            assert hasattr(module, item) or importlib.util.find_spec(f"{name}.{item}"), f"{name}.__all__: {item}?"


def test_preload_stops_on_a_declared_module_that_does_not_exist():
    from pipeline.runner.process import preload

    with pytest.raises(RuntimeError, match="pipeline.no_such_module"):
        preload(("json", "pipeline.no_such_module"), {})
    preload(("json",), {})  # an existing module imports quietly


def test_the_code_passes_the_linter():
    """`ruff check` with the project's settings (pyproject.toml [tool.ruff])."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
