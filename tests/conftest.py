"""Shared test setup: CPU-only environment, small thread counts, helpers to run the CLI."""

import os
import subprocess
import sys
from pathlib import Path

# One thread per process: tests start several processes on 2 cores, and oversubscribed torch threads
# run many times slower (set before torch is imported; subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never talk to the public hub; huggingface_hub reads this once, at import, whichever test imports it.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

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


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny Llama checkpoint with our chat tokenizer: what a pretraining stage would hand over."""
    import pydoc_data.topics

    from pipeline.recipe.settings import ModelSettings
    from pipeline.train.models import build_model
    from stages.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("base") / "model"
    tokenizer = train_tokenizer(list(pydoc_data.topics.topics.values())[:40], 400, 2)
    torch.manual_seed(0)
    settings = ModelSettings(size="nano", max_seq_len=256, attention="sdpa")
    model = build_model(settings, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_dataset(path: Path, train: list[dict], validation: list[dict]) -> Path:
    """A `datasets` folder with train and validation splits."""
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "validation": datasets.Dataset.from_list(validation)}).save_to_disk(str(path))
    return path
