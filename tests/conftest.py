"""Shared test setup: CPU-only environment, small thread counts, helpers to run the CLI."""

import os
import subprocess
import sys
from pathlib import Path

# One thread per process: tests start several processes on 2 cores, and oversubscribed torch threads
# run many times slower (set before torch is imported; subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Before anything imports triton: kernels run under the interpreter when there is no GPU.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llm-pipeline" / "torch_extensions"))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict as YAML into tmp_path and return its path (run_dir defaults to tmp_path/run)."""
    import yaml

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        data = {"run_dir": str(tmp_path / "run"), **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
