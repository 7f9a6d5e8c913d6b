"""Every shipped accelerate config, recipe and the SLURM script, checked against the code (no training).

Configs: accelerate itself accepts them (unknown keys are errors), the ZeRO stage and offload settings
are valid, processes split evenly over machines, multi-node DeepSpeed configs start torchrun on each
node. Recipes: they parse strictly, their launch config exists and agrees with them, and the
arithmetic in their comments (parameters, global batch, tokens, memory) matches the code.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")) + [ROOT / "accelerate_config.yaml"]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SIZED = [ROOT / "recipes" / "gpt2-small.yaml", ROOT / "recipes" / "moe-1b.yaml"]  # with the arithmetic comments
SBATCH = ROOT / "recipes" / "slurm" / "launch.sbatch"

# bytes per parameter for (bf16 weights, bf16 grads, fp32 master + Adam m + v); which of them ZeRO partitions
PARTITIONED_BYTES = {0: 0, 1: 12, 2: 14, 3: 16}


def ids(paths):
    return [p.relative_to(ROOT).as_posix() for p in paths]


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_expected_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"single_gpu.yaml", "gpu8_zero1.yaml", "gpu8_zero2.yaml", "gpu8_zero3.yaml", "gpu8_zero3_offload.yaml",
            "multinode_zero3.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml", "cpu_ddp.yaml", "cpu_2nodes_zero2.yaml",
            "accelerate_config.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=ids(CONFIGS))
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    ClusterConfig.from_yaml_file(str(path))  # what `accelerate launch --config_file` does; rejects unknown keys
    data = yaml.safe_load(path.read_text())
    machines, processes = data["num_machines"], data["num_processes"]
    assert machines >= 1 and processes >= 1 and processes % machines == 0, \
        f"num_processes {processes} does not split over num_machines {machines}"
    assert 0 <= data["machine_rank"] < machines
    assert data["rdzv_backend"] in ("static", "c10d")
    gpu = not path.name.startswith("cpu_")
    assert data["mixed_precision"] == ("bf16" if gpu else "no")  # bf16 autocast on CPU is slow and changes the numbers
    if machines > 1:
        assert "main_process_ip" in data and data.get("main_process_port"), "multi-node: head address and port"

    if data["distributed_type"] != "DEEPSPEED":
        assert "deepspeed_config" not in data
        return
    ds = data["deepspeed_config"]
    launch_args = {a.dest for a in launch_command_parser()._actions}
    assert set(ds) <= launch_args, f"keys accelerate launch does not know: {set(ds) - launch_args}"
    stage = ds["zero_stage"]
    assert stage in (0, 1, 2, 3)
    # batch size, accumulation and clipping come from the recipe (pipeline/train/distributed.py), not from here
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(ds) or path.name.startswith("cpu_")
    for kind in ("optimizer", "param"):
        device = ds.get(f"offload_{kind}_device", "none")
        assert device in ("none", "cpu", "nvme")
        if device == "nvme":
            assert ds.get(f"offload_{kind}_nvme_path"), f"offload_{kind}_device nvme needs offload_{kind}_nvme_path"
    if ds.get("offload_param_device", "none") != "none":
        assert stage == 3, "parameter offload exists only in ZeRO-3"
    if ds.get("offload_optimizer_device", "none") != "none":
        assert stage >= 1
    if stage == 3:
        # the final export gathers the full weights (accelerator.get_state_dict); init partitioned
        assert ds.get("zero3_save_16bit_model") is True and ds.get("zero3_init_flag") is True
    else:
        assert not ds.get("zero3_init_flag")
    if machines > 1 or gpu:
        # pdsh (DeepSpeed's default multi-node launcher) would ssh from node 0 instead of one launch per node
        assert ds.get("deepspeed_multinode_launcher") == "standard"


def test_multinode_config_uses_c10d_and_leaves_the_head_to_the_launch():
    data = yaml.safe_load((ROOT / "recipes/accelerate/multinode_zero3.yaml").read_text())
    assert data["rdzv_backend"] == "c10d" and data["num_machines"] == 2 and data["num_processes"] == 16
    assert data["main_process_ip"] is None  # given by launch.sbatch / the command line, never a stale address
    assert data["deepspeed_config"]["zero_stage"] == 3


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_parses_and_its_launch_agrees_with_its_config(path, monkeypatch):
    from pipeline.recipe.schema import load_recipe

    monkeypatch.chdir(ROOT)  # launch.config_file paths are relative to the repository root
    recipe = load_recipe(path)
    recipe.model.validate()
    for name, settings in recipe.settings.items():
        launch = settings.launch
        if launch.config_file is None:
            continue
        config_path = ROOT / launch.config_file
        assert config_path.is_file(), f"stages.{name}.launch.config_file {launch.config_file} does not exist"
        config = yaml.safe_load(config_path.read_text())
        assert launch.num_processes == config["num_processes"], \
            f"stages.{name}: launch.num_processes {launch.num_processes} != {config['num_processes']} in {launch.config_file}"
        assert launch.num_processes % config["num_machines"] == 0


@pytest.mark.parametrize("path", SIZED, ids=ids(SIZED))
def test_recipe_arithmetic_matches_the_code(path, monkeypatch):
    """The parameter count, global batch, token count and memory in the comments are what the recipe does."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.recipe.schema import load_recipe
    from pipeline.train import models

    monkeypatch.chdir(ROOT)
    text = path.read_text()
    recipe = load_recipe(path)
    s = recipe.settings["pretrain"]
    config = yaml.safe_load((ROOT / s.launch.config_file).read_text())
    vocab = recipe.settings["tokenizer"].vocab_size
    block = recipe.settings["prepare"].block_size
    assert block <= recipe.model.max_seq_len

    cfg = models.build_model_config(recipe.model, vocab, 0, 1, 2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert number(re.search(r"parameters: ([\d,]+)", text).group(1)) == params
    if recipe.model.family == "moe":
        active = number(re.search(r"active per token ([\d,]+)", text).group(1))
        assert active == models.matmul_parameters(cfg)

    m = re.search(r"global batch: (\d+) processes x (\d+) micro batch x (\d+) accumulation = ([\d,]+) sequences "
                  r"x (\d+) tokens = ([\d,]+) tokens/step", text)
    assert m, "the global batch line is missing"
    procs, mbs, accum, seqs, seq_len, tokens_step = (number(g) for g in m.groups())
    assert (procs, mbs, accum, seq_len) == (s.launch.num_processes, s.micro_batch_size, s.grad_accum_steps, block)
    assert seqs == procs * mbs * accum and tokens_step == seqs * seq_len

    m = re.search(r"tokens: ([\d,]+) steps x ([\d,]+) = ([\d.]+)B tokens", text)
    assert m and number(m.group(1)) == s.max_steps and number(m.group(2)) == tokens_step
    assert float(m.group(3)) == pytest.approx(s.max_steps * tokens_step / 1e9, abs=0.01)

    m = re.search(r"model states per GPU \(ZeRO-(\d)\):.*?= ([\d.]+) GB", text, re.S)
    stage, gb = int(m.group(1)), float(m.group(2))
    assert stage == config["deepspeed_config"]["zero_stage"]
    gpus = s.launch.num_processes
    expected = (16 - PARTITIONED_BYTES[stage]) * params + PARTITIONED_BYTES[stage] * params / gpus
    assert gb == pytest.approx(expected / 1e9, abs=0.01)


# --- the SLURM script ---

def fake_slurm(tmp_path: Path) -> dict:
    """Stand-ins for `scontrol`, `srun` (runs its command once per node with SLURM_NODEID set) and a
    python that prints `accelerate launch` commands instead of training (everything else is real)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nnodes=1\nwhile [[ \"$1\" == --* ]]; do case \"$1\" in --nodes=*) nodes=${1#--nodes=};; esac; shift; done\n"
        "for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i \"$@\" || exit $?; done\n")
    (bin_dir / "python").write_text(
        "#!/bin/bash\nif [ \"$1 $2\" = \"-m accelerate.commands.launch\" ]; then shift 2; "
        "echo \"node $SLURM_NODEID: accelerate launch $*\"; exit 0; fi\n"
        f"exec {sys.executable} \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
            "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "8", "PYTHON": str(bin_dir / "python")}


def test_sbatch_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    assert "#SBATCH --ntasks-per-node=1" in SBATCH.read_text()


def test_sbatch_runs_every_stage_in_order_and_training_on_all_nodes(tmp_path):
    recipe = tmp_path / "moe.yaml"
    data = yaml.safe_load((ROOT / "recipes" / "moe-1b.yaml").read_text())
    data["run_dir"] = str(tmp_path / "run")  # nothing done yet
    recipe.write_text(yaml.safe_dump(data))
    out = subprocess.run(["bash", str(SBATCH), str(recipe), "stages.pretrain.max_steps=10"], cwd=ROOT,
                         env={**fake_slurm(tmp_path), "DRY_RUN": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    stages = [line.split()[2] for line in lines if line.startswith("=== stage")]
    assert stages == ["tokenizer", "prepare", "pretrain"]
    assert "head gpu-node-07:29500" in out.stdout
    # the data stages once, on one node; pretrain through accelerate on both nodes
    runs = [line for line in lines if line.startswith("+ srun")]
    assert runs[0].startswith("+ srun --nodes=1 --ntasks=1") and "-m stages.tokenizer" in runs[0]
    assert "stages.pretrain.max_steps=10" in runs[0]
    assert runs[2].startswith("+ srun --nodes=2 --ntasks-per-node=1")
    pretrain = out.stdout.split("=== stage pretrain")[1]  # the per-node command spans lines
    assert "--rdzv_backend c10d" in pretrain and '--machine_rank "$SLURM_NODEID"' in pretrain


def test_sbatch_expands_the_multinode_launch_per_node(tmp_path):
    recipe = tmp_path / "moe.yaml"
    data = yaml.safe_load((ROOT / "recipes" / "moe-1b.yaml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    recipe.write_text(yaml.safe_dump(data))
    env = fake_slurm(tmp_path)
    # run the (fake) srun for real: it prints each node's accelerate command with its variables expanded
    out = subprocess.run(["bash", str(SBATCH), str(recipe), "pretrain", "stages.pretrain.max_steps=10"], cwd=ROOT,
                         env={**env, "SETUP": "/dev/null"}, capture_output=True, text=True, timeout=300)
    nodes = [line for line in out.stdout.splitlines() if line.startswith("node ")]
    assert len(nodes) == 2, out.stdout + out.stderr
    for rank, line in enumerate(nodes):
        assert line.startswith(f"node {rank}: accelerate launch")
        assert "--config_file recipes/accelerate/multinode_zero3.yaml" in line  # the recipe's launch.config_file
        assert "--num_machines 2 --num_processes 16" in line and f"--machine_rank {rank}" in line
        assert "--main_process_ip gpu-node-07 --main_process_port 29500" in line
        assert line.rstrip().endswith(f"-m stages.pretrain {recipe} stages.pretrain.max_steps=10")
    # the stage published nothing (srun was a stand-in): the script says so and fails
    assert out.returncode != 0 and "published no complete outputs" in out.stderr, out.stdout + out.stderr
