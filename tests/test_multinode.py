"""Multi-node training on one CPU machine: two "nodes" as two `accelerate launch` calls, and resuming a
checkpoint with another number of processes (docs/multinode.md).

* Two launchers (`--num_machines 2 --machine_rank 0|1`, one process each, DeepSpeed ZeRO-2, gloo) form
  one world of 2, share the run dir as nodes share a filesystem, publish once (global rank 0), and
  export the same model as one launcher with 2 processes.
* A checkpoint written by 2 processes resumes with 1 and one written by 1 resumes with 2 (DeepSpeed
  ZeRO-2/3 through a universal checkpoint; plain DDP as it is): the losses after the resume follow an
  uninterrupted run with the same global batch (2 x 1 micro batch = 1 x 2 accumulated).
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
CONFIGS = ROOT / "recipes" / "accelerate"
TRAIN_SCRIPT = Path(__file__).parent / "multinode_train_script.py"

# loss of each exported model on the same validation blocks, in one process
FIXED_BATCH_LOSS = """
import sys, datasets, torch
from transformers import AutoModelForCausalLM
rows = datasets.load_from_disk(sys.argv[1])["validation"].select(range(8))
ids, pos = torch.tensor(rows["input_ids"]).long(), torch.tensor(rows["position_ids"]).long()
for path in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1], position_ids=pos[:, :-1], use_cache=False).logits
    print(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_packed_data(tmp_path_factory.mktemp("multinode"), n_docs=120, n_val=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(num_processes: int, config: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launch_env(num_processes, config, environ={})}
    env["OMP_NUM_THREADS"] = "1"
    return env


def launch(config: Path, num_processes: int, args: list[str], *, extra: list[str] = (), env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(num_processes), *extra, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or env_for(num_processes, config), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"launch timed out:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:]
    return out


# --- two nodes, one machine ---

@pytest.mark.slow
def test_two_nodes_train_as_one_world_and_match_one_node(data, tmp_path):
    tok_dir, data_dir = data
    settings = {"max_steps": 6, "micro_batch_size": 2, "eval_batches": 2, "eval_every": 3, "save_every": 3}
    recipes = {}
    for name in ("two_nodes", "one_node"):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(pretrain_recipe(tmp_path / name, tok_dir, data_dir, **settings)))
    stage = ["-m", "stages.pretrain"]

    # what a cluster does: the same command on each node, only --machine_rank differs; both use
    # the shipped two-node config (num_machines: 2, main_process_ip: 127.0.0.1)
    config = CONFIGS / "cpu_2nodes_zero2.yaml"
    assert yaml.safe_load(config.read_text())["num_machines"] == 2
    port = str(free_port())
    nodes = [launch(config, 2, [*stage, str(recipes["two_nodes"])],
                    extra=["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                           "--main_process_port", port])
             for rank in (0, 1)]
    one = launch(CONFIGS / "cpu_zero2.yaml", 2, [*stage, str(recipes["one_node"])],
                 extra=["--main_process_port", str(free_port())])
    logs = [finish(p) for p in nodes]  # both "nodes" exit 0
    finish(one)

    manifest = json.loads((tmp_path / "two_nodes" / "pretrain" / "manifest.json").read_text())
    setup = manifest["metrics"]["distributed"]
    assert setup["num_processes"] == 2 and setup["distributed_type"] == "DEEPSPEED" and setup["zero_stage"] == 2
    assert manifest["metrics"]["tokens"] == 6 * 2 * 2 * 32  # steps x micro batch x 2 ranks x block
    # each node saw the world of 2; only global rank 0 (on node 0) published
    for log in logs:
        assert "'num_processes': 2" in log, log[-3000:]
    assert "published" in logs[0] and "published" not in logs[1]

    losses = {}
    for name in ("two_nodes", "one_node"):
        log = tmp_path / name / ".work" / "pretrain" / "train_log.jsonl"
        losses[name] = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert losses["two_nodes"] == pytest.approx(losses["one_node"], rel=1e-6)

    out = subprocess.run([sys.executable, "-c", FIXED_BATCH_LOSS, str(data_dir),
                          str(tmp_path / "two_nodes" / "pretrain" / "model"), str(tmp_path / "one_node" / "pretrain" / "model")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    two, single = map(float, out.stdout.split()[-2:])
    assert two == pytest.approx(single, rel=1e-6, abs=1e-7)
    assert two < 5.0  # it trained (a fresh model scores ~5.7)


# --- another world size on resume ---

def train(config: Path, num_processes: int, work: Path, data_dir: Path, grad_accum: int):
    """One attempt of the training script; returns (train_log losses by step, summary, output)."""
    args = [str(TRAIN_SCRIPT), str(data_dir), str(work), "--grad-accum", str(grad_accum)]
    out = finish(launch(config, num_processes, args, extra=["--main_process_port", str(free_port())]))
    rows = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}, json.loads((work / "summary.json").read_text()), out


@pytest.mark.slow
@pytest.mark.parametrize("config_name, before, after", [
    ("cpu_zero2", 2, 1),  # 2 processes -> 1
    ("cpu_zero3", 1, 2),  # 1 process -> 2
    ("cpu_ddp", 2, 1),    # plain DDP: full states, nothing to convert
])
def test_resume_with_another_world_size_continues_the_loss_curve(config_name, before, after, data, tmp_path):
    config = CONFIGS / f"{config_name}.yaml"
    data_dir, work = data[1], tmp_path / "run"
    accum = {1: 2, 2: 1}  # the same global batch of 4 sequences at either world size
    # uninterrupted, 6 steps at the world size the run starts with (checkpoints at steps 3 and 6)
    straight, summary, _ = train(config, before, work, data_dir, accum[before])
    assert summary["distributed"]["num_processes"] == before and summary["steps"] == 6
    state = json.loads((work / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["world_size"] == before

    # as if the job died between the checkpoints of steps 3 and 6; resumed on the other world size
    import shutil

    shutil.rmtree(work / "checkpoints" / "step-000006")
    resumed, summary, out = train(config, after, work, data_dir, accum[after])
    assert summary["distributed"]["num_processes"] == after
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    assert f"saved by {before} process(es)" in out and f"resuming with {after}" in out, out[-3000:]
    if config_name != "cpu_ddp":
        assert "universal checkpoint" in out
        assert (work / "checkpoints" / "step-000003" / "universal" / "pytorch_model" / "zero").is_dir()
    # the new checkpoint records the new world size
    assert json.loads((work / "checkpoints" / "step-000006" / "trainer_state.json").read_text())["world_size"] == after

    assert sorted(resumed) == list(range(1, 7))  # steps 4-6 of the first attempt were replaced
    for step in (4, 5, 6):  # 4 needs the weights, 5 and 6 the optimizer state (Adam moments, step, decay)
        assert resumed[step] == pytest.approx(straight[step], rel=2e-6), (step, resumed, straight)
