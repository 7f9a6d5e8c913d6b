"""The install a new user gets: Hugging Face's `kernels` next to ours, every test import declared.

Our Triton kernels live in the top-level `kernels/` folder but are imported as `pipeline_kernels`
(docs/kernels.md, "Import name"): `import kernels` must always be Hugging Face's package, which
transformers 5.25+ requires and imports as soon as model code loads, in every way the project runs.
"""

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

# What a stage process does first: transformers' model code (which imports HF `kernels` through its
# hub-kernels integration), then our attention registered under its name.
PROBE = """
import sys, kernels, transformers
from kernels import CUDAProperties
import transformers.integrations.hub_kernels
from transformers import AttentionInterface, LlamaForCausalLM
from pipeline_kernels.transformers_attention import ATTENTION_NAME, attention_forward, register
register()
assert AttentionInterface._global_mapping[ATTENTION_NAME] is attention_forward
import pipeline_kernels.transformers_attention as ta
print("HF", kernels.__file__)
print("OURS", ta.__file__)
"""


def _probe(cwd: Path, *args: str, env: dict | None = None) -> tuple[Path, Path]:
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("HF ", "OURS ")))
    return Path(found["HF"]).resolve(), Path(found["OURS"]).resolve()


@pytest.mark.parametrize("where", ["repo root", "tests folder", "elsewhere"])
def test_hf_kernels_imports_beside_ours(where, tmp_path):
    """`python -m pipeline` / `python -m stages.X` / accelerate launch put the working directory first on
    sys.path; from the repo root that directory holds our `kernels/` folder."""
    cwd = {"repo root": ROOT, "tests folder": ROOT / "tests", "elsewhere": tmp_path}[where]
    hf, ours = _probe(cwd, "-c", PROBE)
    assert ROOT not in hf.parents, f"`import kernels` resolved into our tree: {hf}"
    assert ours == ROOT / "kernels" / "transformers_attention.py"


def test_hf_kernels_imports_in_a_module_run_from_the_repo_root(tmp_path):
    """`python -m MODULE` (how the runner and accelerate start stages), MODULE found beside the repo."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    hf, _ = _probe(ROOT, "-m", "probe_module", env={"PYTHONPATH": str(tmp_path)})
    assert ROOT not in hf.parents


def test_no_distribution_of_ours_claims_the_name_kernels():
    """transformers decides whether HF kernels is installed from the distribution owning the name."""
    owners = importlib.metadata.packages_distributions()
    assert "llm-pipeline" not in owners.get("kernels", [])
    assert owners.get("kernels") == ["kernels"], owners.get("kernels")
    assert "llm-pipeline" in owners["pipeline_kernels"]
    # In this process too (pytest put the repo root and tests/ on sys.path).
    assert ROOT not in Path(importlib.util.find_spec("kernels").origin).resolve().parents


def test_wheel_maps_kernels_folder_to_pipeline_kernels(tmp_path):
    """A non-editable install: the wheel holds every source file, `kernels/*.py` as `pipeline_kernels/`,
    and no top-level `kernels`; importing from the unpacked wheel still leaves `kernels` to HF."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("pipeline", "stages", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llm_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"pipeline", "stages", "pipeline_kernels"}, tops
    expected = {str(p.relative_to(ROOT)).replace("kernels/", "pipeline_kernels/", 1) if p.parts[len(ROOT.parts)] == "kernels"
                else str(p.relative_to(ROOT))
                for folder in ("pipeline", "stages", "kernels") for p in (ROOT / folder).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert expected - names == set(), "files missing from the wheel (list new packages in pyproject.toml)"

    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = f"import sys; sys.path.insert(0, {str(unpacked)!r})\n" + PROBE
    hf, ours = _probe(tmp_path, "-c", probe)
    assert ours == unpacked / "pipeline_kernels" / "transformers_attention.py"
    assert unpacked not in hf.parents and ROOT not in hf.parents


# --------------------------------------------------------------------------- declared test dependencies

def _requirement_closure(dist: str, extras: frozenset = frozenset()) -> set[str]:
    """Normalised names of `dist` and everything its requirements (with `extras`) pull in, as installed."""
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    seen: set[str] = set()
    visited: set[tuple[str, frozenset]] = set()
    todo = [(dist, extras)]
    while todo:
        name, extra = todo.pop()
        if (norm(name), extra) in visited:
            continue
        visited.add((norm(name), extra))
        seen.add(norm(name))
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extra] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                try:
                    importlib.metadata.distribution(req.name)
                except importlib.metadata.PackageNotFoundError:
                    continue  # optional for this platform; pip would have installed it otherwise
                todo.append((req.name, frozenset(req.extras)))
    return seen


def _imported_modules(folder: Path) -> set[str]:
    mods = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods


def test_every_module_the_tests_import_is_installed_by_the_dev_extra():
    """A module that is merely on this machine (hypothesis was, once) must not satisfy a test."""
    closure = _requirement_closure("llm-pipeline", frozenset({"dev"}))
    owners = importlib.metadata.packages_distributions()
    ours = {"pipeline", "stages", "pipeline_kernels", "tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    undeclared = {}
    for mod in sorted(_imported_modules(ROOT / "tests") - ours - set(sys.stdlib_module_names)):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(mod, [])}
        if not dists & closure:
            undeclared[mod] = sorted(dists) or "not installed"
    assert not undeclared, f"imported by tests but not installed by `pip install -e .[dev]`: {undeclared}"
