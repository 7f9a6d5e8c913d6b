"""The PPO stage as a user runs it: a recipe holding only PPO, on checkpoint folders made elsewhere."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, run_cli, save_dataset


@pytest.fixture(scope="module")
def reward_model(base_model, tmp_path_factory):
    """A sequence-classification reward model on the base backbone, with its score statistics."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("rm") / "model"
    config = AutoConfig.from_pretrained(base_model)
    config.num_labels = 1
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base_model, config=config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "reward_stats.json").write_text(json.dumps({"mean": 0.1, "std": 0.5}))
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": f"Say something about item {i}."} for i in range(64)]
    return save_dataset(tmp_path_factory.mktemp("prompts") / "data", rows, rows[:8])


def ppo_recipe(tmp_path, base_model, reward_model, prompts, **settings):
    section = {"inputs": {"policy": str(base_model), "reward": str(reward_model), "prompts": str(prompts)},
               "max_steps": 4, "batch_size": 4, "max_new_tokens": 8, "ppo_epochs": 2, "save_every": 2,
               "learning_rate": 1e-3, **settings}
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seed": 5, "model": {"attention": "sdpa"},
                                    "stages": {"ppo": section}}))
    return path


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "ppo" / "train_log.jsonl").read_text().splitlines()]


def test_ppo_only_recipe_on_folders(base_model, reward_model, prompts, tmp_path):
    recipe = ppo_recipe(tmp_path, base_model, reward_model, prompts)
    out = run_cli("pipeline", "run", str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    stage = tmp_path / "run" / "ppo"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["outputs"] == ["model", "value"]
    m = manifest["metrics"]
    assert m["steps"] == 4 and m["episodes"] == 16 and (m["reward_mean"], m["reward_std"]) == (0.1, 0.5)
    rows = log_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    expected = {"reward/raw", "reward/normalised", "kl", "entropy", "policy/clipfrac", "policy/approx_kl",
                "value/loss", "value/explained_variance", "response_length", "eos_rate", "kl_coef"}
    assert expected <= set(rows[0])
    assert rows[0]["policy/approx_kl_first"] == 0.0  # logprobs recomputed at the sampling temperature

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(stage / "model")
    value = AutoModelForSequenceClassification.from_pretrained(stage / "value")
    assert value.config.num_labels == 1
    before = load_file(base_model / "model.safetensors")
    after = load_file(stage / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "PPO did not change the policy"
    assert policy(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_resume_after_kill_matches_uninterrupted(base_model, reward_model, prompts, tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    out = run_cli("stages.ppo", str(ppo_recipe(whole, base_model, reward_model, prompts, max_steps=6)))
    assert out.returncode == 0, out.stderr[-3000:]

    killed = tmp_path / "killed"
    killed.mkdir()
    recipe = ppo_recipe(killed, base_model, reward_model, prompts, max_steps=6)
    proc = subprocess.Popen([sys.executable, "-m", "stages.ppo", str(recipe)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / "run" / ".work" / "ppo" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-000002").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "run" / "ppo").exists(), "killed before the end: nothing may be published"
    out = run_cli("stages.ppo", str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((killed / "run" / "ppo" / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] >= 2
    a, b = log_rows(whole / "run"), log_rows(killed / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("reward/raw", "kl", "policy/approx_kl", "value/loss", "response_length", "kl_coef"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)


def test_bad_inputs_fail_before_training(base_model, reward_model, prompts, tmp_path):
    recipe = ppo_recipe(tmp_path, reward_model, reward_model, prompts)
    out = run_cli("stages.ppo", str(recipe))
    assert out.returncode == 1 and "input policy" in out.stderr and "needs a causal language model" in out.stderr
    assert not list((tmp_path / "run").rglob("checkpoints"))
    recipe = ppo_recipe(tmp_path, base_model, reward_model, prompts, prompt_column="question")
    out = run_cli("stages.ppo", str(recipe))
    assert out.returncode == 1 and "missing column(s) question" in out.stderr and str(prompts) in out.stderr
    recipe = ppo_recipe(tmp_path, base_model, reward_model, prompts, temperature=0)
    out = run_cli("stages.ppo", str(recipe))
    assert out.returncode == 2 and "stages.ppo.temperature: must be > 0" in out.stderr


@pytest.mark.slow
def test_two_process_zero2(base_model, reward_model, prompts, tmp_path):
    recipe = ppo_recipe(tmp_path, base_model, reward_model, prompts, max_steps=2)
    out = run_cli("accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_zero2.yaml"),
                  "--num_processes", "2", "-m", "stages.ppo", str(recipe), env={"DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-4000:]
    m = json.loads((tmp_path / "run" / "ppo" / "manifest.json").read_text())["metrics"]
    assert m["distributed"]["num_processes"] == 2 and m["distributed"]["distributed_type"] == "DEEPSPEED"
    assert m["distributed"]["zero_stage"] == 2 and m["episodes"] == 2 * 4 * 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ppo_stops_when_its_time_budget_is_spent_and_saves_the_last_step(base_model, reward_model, prompts, tmp_path):
    """The shared loop's wall-clock budget: PPO stops early, exports, and a re-run resumes at the end."""
    recipe = ppo_recipe(tmp_path, base_model, reward_model, prompts, max_steps=1000, max_train_seconds=1.0)
    out = run_cli("pipeline", "run", str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "ppo" / "manifest.json").read_text())["metrics"]
    assert m["stopped_by_time_budget"] is True and 1 <= m["steps"] < 1000
    steps = [r["step"] for r in log_rows(tmp_path / "run")]
    assert steps == list(range(1, m["steps"] + 1))
    state = json.loads(next((tmp_path / "run" / ".work" / "ppo" / "checkpoints").glob(f"step-{m['steps']:06d}"))
                       .joinpath("trainer_state.json").read_text())
    assert state["train_seconds"] >= 1.0  # the clock is saved with the state (PPO's loop used to drop it)
