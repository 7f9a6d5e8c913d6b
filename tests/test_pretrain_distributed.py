"""The pretrain stage under `accelerate launch` with 2 CPU processes: DeepSpeed ZeRO-2/3 and plain DDP.

Asserts the run really was distributed (accelerate silently falls back to one process in some
setups), that data parallelism with the same global batch follows the single-process loss curve,
and that the exported checkpoint loads in a separate process and reproduces the final val loss.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import pretrain_recipe, write_packed_data  # noqa: E402

from pipeline.train.distributed import launch_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"max_steps": 6, "micro_batch_size": 2, "eval_batches": 2, "eval_every": 3, "save_every": 3}

# what the exported model scores on the blocks the stage evaluated (eval_batches * mbs * 2 ranks)
VAL_LOSS = """
import sys, datasets, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
rows = datasets.load_from_disk(sys.argv[2])["validation"].select(range(8))
ids, pos = torch.tensor(rows["input_ids"]).long(), torch.tensor(rows["position_ids"]).long()
with torch.no_grad():
    logits = model(input_ids=ids[:, :-1], position_ids=pos[:, :-1], use_cache=False).logits
print(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return write_packed_data(root, n_docs=120, n_val=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(tmp_path, data, name, launcher: list[str], num_processes: int, config=None, **train):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(pretrain_recipe(tmp_path / name, *data, **{**TRAIN, **train})))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launch_env(num_processes, config, environ={})}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", *launcher, "stages.pretrain", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((tmp_path / name / "pretrain" / "manifest.json").read_text())
    log = tmp_path / name / ".work" / "pretrain" / "train_log.jsonl"
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    return manifest, losses


def accelerate_launch(config: str) -> list[str]:
    return ["accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m"]


@pytest.mark.slow
@pytest.mark.parametrize("config_name, kind, stage", [("cpu_zero2", "DEEPSPEED", 2), ("cpu_zero3", "DEEPSPEED", 3),
                                                      ("cpu_ddp", "MULTI_CPU", None)])
def test_two_processes_train_and_export(config_name, kind, stage, data, tmp_path):
    config = str(ROOT / f"recipes/accelerate/{config_name}.yaml")
    manifest, losses = run_stage(tmp_path, data, "ds", accelerate_launch(config), 2, config)
    metrics = manifest["metrics"]
    setup = metrics["distributed"]
    assert setup["num_processes"] == 2 and setup["distributed_type"] == kind and setup["zero_stage"] == stage
    assert metrics["steps"] == 6 and metrics["tokens"] == 6 * 2 * 2 * 32  # steps * mbs * ranks * block
    model_dir = tmp_path / "ds" / "pretrain" / "model"
    assert (model_dir / "model.safetensors").exists()

    # the same global batch on one process (2 micro batches accumulated) follows the same curve
    if stage == 2:
        _, single = run_stage(tmp_path, data, "single", [], 1, grad_accum_steps=2)
        assert single == pytest.approx(losses, rel=1e-4)

    out = subprocess.run([sys.executable, "-c", VAL_LOSS, str(model_dir), str(data[1])], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(metrics["final_val_loss"], rel=1e-4)


@pytest.mark.slow
def test_muon_under_ddp_follows_the_single_process_curve(data, tmp_path):
    # Muon orthogonalises whole gradient matrices: after DDP's all-reduce every rank must apply the
    # update of the global batch, exactly as one process accumulating the same 2 micro batches
    config = str(ROOT / "recipes/accelerate/cpu_ddp.yaml")
    manifest, losses = run_stage(tmp_path, data, "ddp", accelerate_launch(config), 2, config, optimizer="muon",
                                 learning_rate=0.02)
    assert manifest["metrics"]["distributed"]["num_processes"] == 2
    _, single = run_stage(tmp_path, data, "single", [], 1, grad_accum_steps=2, optimizer="muon", learning_rate=0.02)
    _, adamw = run_stage(tmp_path, data, "adamw", [], 1, grad_accum_steps=2, learning_rate=0.02)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert single == pytest.approx(losses, rel=1e-4)
    assert adamw[1:] != pytest.approx(losses[1:], rel=1e-3)  # the optimizer really was Muon
