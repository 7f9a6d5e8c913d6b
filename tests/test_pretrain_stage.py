"""The pretrain stage as a user runs it: `python -m stages.pretrain RECIPE`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import one_thread, pretrain_recipe, write_packed_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_packed_data(tmp_path_factory.mktemp("stage"), n_docs=120, n_val=20)


def scalar_tags(tensorboard_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in tensorboard_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_stage_publishes_a_checkpoint_and_resumes_instead_of_retraining(data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(pretrain_recipe(tmp_path / "run", *data)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_RUN_START": "1000"}
    cmd = [sys.executable, "-m", "stages.pretrain", str(recipe)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "run" / "pretrain"
    assert {p.name for p in (out / "model").iterdir()} == MODEL_FILES
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 0 and metrics["block_size"] == 32
    assert metrics["distributed"]["num_processes"] == 1
    assert {"final_val_loss", "final_val_bpb", "tokens", "tokens_per_s", "parameters"} <= set(metrics)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and rows[0]["elapsed_s"] > 1e9  # counted from PIPELINE_RUN_START
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/val_loss", "val/val_bpb"} <= \
        scalar_tags(out / "tensorboard")

    # the work dir keeps its checkpoints: running again resumes at the end instead of training anew
    from pipeline.runner.stage import stage_main
    from stages.pretrain import run

    stage_main("pretrain", run, argv=[str(recipe)])
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == 6 and metrics["steps"] == 6
    assert metrics["final_val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-6)


def test_moe_stage_logs_router_balance(data, tmp_path):
    from pipeline.runner.stage import stage_main
    from stages.pretrain import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(pretrain_recipe(tmp_path / "run", *data, family="moe", max_steps=4)))
    stage_main("pretrain", run, argv=[str(recipe)])
    out = tmp_path / "run" / "pretrain"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] == 4
    tags = scalar_tags(out / "tensorboard")
    assert {"train/aux_loss", "train/z_loss", "train/expert_load/layer0_max", "train/expert_load/layer1/3"} <= tags


def test_compiled_training_in_a_forked_stage_follows_the_eager_curve_and_exits(data, tmp_path):
    # with 2 threads, `compile: true` leaves torch.compile's worker threads behind; a stage forked from
    # the runner must still exit like a fresh interpreter (threading's exit hooks stop them), not hang
    def run(name, **train):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(pretrain_recipe(tmp_path / name, *data, max_steps=4, **train)))
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=ROOT, capture_output=True,
                              text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "pretrain: forked from the runner" in proc.stdout
        log = tmp_path / name / "pretrain" / "train_log.jsonl"
        return [json.loads(line)["loss"] for line in log.read_text().splitlines()]

    compiled, eager = run("compiled", compile=True), run("eager")
    assert len(compiled) == 4 and compiled == pytest.approx(eager, rel=1e-4)
    assert {p.name for p in (tmp_path / "compiled" / "pretrain" / "model").iterdir()} == MODEL_FILES


def test_continued_pretraining_starts_from_the_checkpoint(data, tmp_path):
    """`inputs.model`: training continues from that checkpoint (its tokenizer by default), not from scratch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(run_dir, **inputs):
        recipe = pretrain_recipe(run_dir, *data)
        recipe["stages"]["pretrain"]["inputs"].update(inputs)
        for key in [k for k, v in inputs.items() if v is None]:
            del recipe["stages"]["pretrain"]["inputs"][key]
        path = run_dir.parent / f"{run_dir.name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        proc = subprocess.run([sys.executable, "-m", "stages.pretrain", str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        losses = [json.loads(line)["loss"] for line in (run_dir / "pretrain" / "train_log.jsonl").read_text().splitlines()] \
            if proc.returncode == 0 else []
        return proc, losses

    scratch, first = run(tmp_path / "scratch")
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    checkpoint = tmp_path / "scratch" / "pretrain" / "model"
    again, second = run(tmp_path / "continued", model=str(checkpoint), tokenizer=None)
    assert again.returncode == 0, again.stderr[-3000:]
    assert second[0] < first[0] - 0.5 and second[0] < first[-1] + 0.3  # it starts where the first run ended
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "continued" / "pretrain" / "model").config.vocab_size == \
        AutoModelForCausalLM.from_pretrained(checkpoint).config.vocab_size

    import shutil

    small = tmp_path / "small"
    shutil.copytree(checkpoint, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 10
    (small / "config.json").write_text(json.dumps(config))
    bad, _ = run(tmp_path / "mismatch", model=str(small))
    assert bad.returncode == 1 and "different models" in bad.stderr and "input model" in bad.stderr
