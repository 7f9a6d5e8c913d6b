"""The README's main job: the default `tiny` recipe end to end, then a re-run that skips everything."""

import json
import time

import pytest
from conftest import run_cli

STAGE_OUTPUTS = {
    "tokenizer": {"tokenizer", "manifest.json"},
    "prepare": {"dataset", "manifest.json"},
    "pretrain": {"model", "manifest.json", "metrics.jsonl", "train_log.jsonl", "tensorboard"},
    "instructions": {"sft", "preferences", "prompts", "manifest.json"},
    "sft": {"model", "manifest.json", "metrics.jsonl", "train_log.jsonl", "tensorboard"},
    "reward": {"model", "manifest.json", "metrics.jsonl", "train_log.jsonl", "tensorboard"},
    "ppo": {"model", "value", "manifest.json", "train_log.jsonl", "tensorboard"},
    "evaluate": {"results", "manifest.json"},
}
PLOTS = {"pretrain_loss.png", "pretrain_val_bpb.png", "sft_loss.png", "sft_val_loss.png", "reward_loss.png",
         "reward_val_accuracy.png", "ppo_reward_raw.png", "ppo_kl.png", "ppo_response_length.png"}


@pytest.mark.slow
def test_default_recipe_end_to_end(tmp_path):
    run_dir = tmp_path / "tiny"
    env = {"OMP_NUM_THREADS": "2"}  # one process at a time here: use both cores
    out = run_cli("pipeline", "run", "recipes/tiny.yaml", f"run_dir={run_dir}", env=env, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    assert {p.name for p in run_dir.iterdir()} == set(STAGE_OUTPUTS) | {".work", "report.md", "plots"}
    for stage, expected in STAGE_OUTPUTS.items():
        assert {p.name for p in (run_dir / stage).iterdir()} == expected, stage
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["complete"] is True and manifest["stage"] == stage
    for stage in ("pretrain", "sft", "ppo"):
        assert (run_dir / stage / "model" / "model.safetensors").is_file()
    assert (run_dir / "reward" / "model" / "reward_stats.json").is_file()
    assert {p.name for p in (run_dir / "plots").iterdir()} == PLOTS
    report = (run_dir / "report.md").read_text()
    for stage in STAGE_OUTPUTS:
        assert f"| {stage} | done" in report
    assert "PPO-vs-SFT win rate (judge)" in report and "Contamination check" in report
    metrics = json.loads((run_dir / "evaluate" / "results" / "metrics.json").read_text())
    assert set(metrics["bits_per_byte"]) == {"pretrain", "sft", "ppo"}
    assert {"judge_sft", "judge_ppo", "win_rate_ppo_vs_sft_judge", "kl_ppo_to_sft", "reward_model_vs_judge"} <= set(metrics)
    assert metrics["bits_per_byte"]["pretrain"] < metrics["bits_per_byte_unigram_baseline"]  # it learned more than frequencies
    assert "unigram baseline" in report

    start = time.time()
    again = run_cli("pipeline", "run", "recipes/tiny.yaml", f"run_dir={run_dir}", env=env)
    assert again.returncode == 0 and time.time() - start < 20
    assert again.stdout.count("up to date") == len(STAGE_OUTPUTS) and "running" not in again.stdout


MOE_SHORT = [  # every stage of recipes/tiny-moe.yaml, a few steps each: the MoE model through SFT, RM, PPO, eval
    "model.size=nano", "stages.tokenizer.max_train_chars=300000",
    "stages.pretrain.max_steps=4", "stages.pretrain.eval_every=2", "stages.pretrain.save_every=2",
    "stages.instructions.sft_train=64", "stages.instructions.sft_eval=16", "stages.instructions.preference_train=64",
    "stages.instructions.preference_eval=16", "stages.instructions.prompts_train=32", "stages.instructions.prompts_eval=8",
    "stages.sft.max_steps=3", "stages.sft.micro_batch_size=8", "stages.sft.eval_every=3", "stages.sft.save_every=3",
    "stages.reward.max_steps=3", "stages.reward.micro_batch_size=8", "stages.reward.eval_every=3",
    "stages.reward.save_every=3",
    "stages.ppo.max_steps=2", "stages.ppo.batch_size=4", "stages.ppo.max_new_tokens=12",
    "stages.evaluate.n_prompts=4", "stages.evaluate.max_new_tokens=12", "stages.evaluate.bpb_batches=2",
]


@pytest.mark.slow
def test_moe_variant_runs_every_stage(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    run_dir = tmp_path / "tiny-moe"
    out = run_cli("pipeline", "run", "recipes/tiny-moe.yaml", f"run_dir={run_dir}", *MOE_SHORT,
                  env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in STAGE_OUTPUTS:
        assert json.loads((run_dir / stage / "manifest.json").read_text())["complete"] is True, stage
    for stage in ("pretrain", "sft", "ppo"):
        config = AutoConfig.from_pretrained(run_dir / stage / "model")
        assert config.model_type == "qwen3_moe" and config.num_experts == 8 and config.num_experts_per_tok == 2
    reward = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "model")
    assert type(reward).__name__ == "Qwen3MoeForSequenceClassification"
    sft, ppo = (load_file(run_dir / s / "model" / "model.safetensors") for s in ("sft", "ppo"))
    experts = [k for k in sft if ".mlp.experts." in k]
    assert experts and any(not sft[k].equal(ppo[k]) for k in experts), "PPO left every expert unchanged"
    metrics = json.loads((run_dir / "evaluate" / "results" / "metrics.json").read_text())
    assert set(metrics["bits_per_byte"]) == {"pretrain", "sft", "ppo"} and "kl_ppo_to_sft" in metrics
