"""Checkpoints are told apart by transformers' auto-class mappings, not by class names (GPT-2's causal LM
is `GPT2LMHeadModel`), and a checkpoint of the wrong kind gets one line naming the input."""

import json
import pydoc_data.topics
import shutil

import pytest
import torch
import yaml
from chat_templates import family_tokenizer
from conftest import run_cli, save_dataset
from safetensors.torch import load_file

from pipeline.data.sources import model_kind
from pipeline.hub.model_card import auto_class_for


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(base_model, tmp_path_factory):
    """Tiny random checkpoints of several real architectures, sharing the base model's chat tokenizer."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    root = tmp_path_factory.mktemp("kinds")
    tok = AutoTokenizer.from_pretrained(base_model)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128))
    reward = LlamaForSequenceClassification.from_pretrained(base_model, num_labels=1)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    return {"llama": base_model, "gpt2": _save(gpt2, tok, root / "gpt2"), "qwen2": _save(qwen2, tok, root / "qwen2"),
            "reward": _save(reward, tok, root / "reward"), "bert": _save(bert, tok, root / "bert")}


def _config(path):
    return json.loads((path / "config.json").read_text())


def test_kind_comes_from_the_transformers_mappings(checkpoints):
    kinds = {name: model_kind(_config(path)) for name, path in checkpoints.items()}
    assert kinds == {"llama": "causal-lm", "gpt2": "causal-lm", "qwen2": "causal-lm",
                     "reward": "sequence-classification", "bert": None}
    assert _config(checkpoints["gpt2"])["architectures"] == ["GPT2LMHeadModel"]  # no "ForCausalLM" in the name
    assert auto_class_for(_config(checkpoints["gpt2"])) == "AutoModelForCausalLM"
    assert auto_class_for(_config(checkpoints["reward"])) == "AutoModelForSequenceClassification"


def test_sft_trains_a_gpt2_checkpoint(checkpoints, tmp_path):
    words = ["alpha", "bravo", "delta", "echo", "kilo", "lima"]
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w} {v}"}, {"role": "assistant", "content": f"{w} {v}"}]}
            for w in words for v in words]
    data = save_dataset(tmp_path / "data", rows, rows[:8])
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "seed": 1, "model": {"attention": "sdpa"},
        "stages": {"sft": {"inputs": {"model": str(checkpoints["gpt2"]), "data": str(data)}, "max_steps": 3,
                           "micro_batch_size": 8, "max_length": 48, "eval_every": 1000, "save_every": 1000,
                           "eval_batches": 1, "sample_prompts": 1, "max_new_tokens": 4}}}))
    out = run_cli("stages.sft", str(recipe), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    trained = tmp_path / "run" / "sft" / "model"
    assert type(AutoModelForCausalLM.from_pretrained(trained)).__name__ == "GPT2LMHeadModel"
    before, after = load_file(checkpoints["gpt2"] / "model.safetensors"), load_file(trained / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("wrong", ["policy", "reward"])
def test_a_checkpoint_of_the_wrong_kind_is_named_in_one_line(checkpoints, tmp_path, wrong):
    prompts = save_dataset(tmp_path / "prompts", [{"prompt": "Say hi."}] * 8, [{"prompt": "Say hi."}] * 2)
    inputs = {"policy": str(checkpoints["llama"]), "reward": str(checkpoints["reward"]), "prompts": str(prompts)}
    inputs[wrong] = str(checkpoints["reward"] if wrong == "policy" else checkpoints["gpt2"])
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {"ppo": {
        "inputs": inputs, "max_steps": 1, "batch_size": 2, "normalize_rewards": False}}}))
    out = run_cli("stages.ppo", str(recipe), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 1
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    if wrong == "policy":
        assert "input policy" in line and "LlamaForSequenceClassification" in line and "causal language model" in line
    else:
        assert "input reward" in line and "GPT2LMHeadModel" in line and "sequence-classification" in line
    assert not (tmp_path / "run" / "ppo").exists()


def test_models_with_different_tokenizers_are_refused(checkpoints, tmp_path):
    """A reward model trained with another tokenizer would score other tokens than the policy writes."""
    other = tmp_path / "reward_other_tokenizer"
    shutil.copytree(checkpoints["reward"], other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    family_tokenizer("chatml", list(pydoc_data.topics.topics.values())[:20]).save_pretrained(other)
    prompts = save_dataset(tmp_path / "prompts", [{"prompt": "Say hi."}] * 8, [{"prompt": "Say hi."}] * 2)
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {"ppo": {
        "inputs": {"policy": str(checkpoints["llama"]), "reward": str(other), "prompts": str(prompts)},
        "max_steps": 1, "batch_size": 2, "normalize_rewards": False}}}))
    out = run_cli("stages.ppo", str(recipe), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 1
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "input reward: its tokenizer" in line and "differs from input policy's" in line


def test_evaluate_on_anyones_prompts(checkpoints, tmp_path):
    """Prompts that are not the task's (TRL's conversational prompt-only rows): no judge, but
    reward-model scores and win rate, KL to the reference, lengths and samples."""
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Name a {thing}."}]}
            for thing in ("colour", "bird", "tree", "river")] * 2
    prompts = save_dataset(tmp_path / "prompts", rows, rows)
    shutil.copytree(checkpoints["llama"], tmp_path / "ppo_model")
    recipe = tmp_path / "evaluate.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"attention": "sdpa"}, "stages": {
        "evaluate": {"inputs": {"prompts": str(prompts), "sft": str(checkpoints["llama"]),
                                "ppo": str(tmp_path / "ppo_model"), "reward": str(checkpoints["reward"])},
                     "n_prompts": 8, "max_new_tokens": 4, "batch_size": 4, "n_samples": 2}}}))
    out = run_cli("stages.evaluate", str(recipe), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = tmp_path / "run" / "evaluate" / "results"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["judge"] is None and not any(k.startswith("judge_") for k in metrics)
    assert set(metrics["reward_model_mean"]) == {"sft", "ppo"}
    assert metrics["win_rate_ppo_vs_sft_reward_model"] == 0.5  # the same weights: every comparison a tie
    assert abs(metrics["kl_ppo_to_sft"]) < 1e-4 and metrics["response_words_sft"] >= 0
    samples = [json.loads(line) for line in (results / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and "judge" not in samples[0]["sft"] and isinstance(samples[1]["prompt"], list)
