"""SFT and reward-model stages as a user runs them, on a tiny base checkpoint built here."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_cli, save_dataset
from safetensors.torch import load_file

from pipeline.data import chat as chat_data
from pipeline.data.preferences import ranking_pairs, to_groups

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TRAIN = {"micro_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 2, "eval_every": 1000, "save_every": 1000,
         "log_every": 5, "eval_batches": 4}


@pytest.fixture(scope="module")
def tokenizer(base_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def write_recipe(tmp_path, stage: str, model: Path, data: Path, **settings) -> Path:
    path = tmp_path / f"{stage}.yaml"
    section = {"inputs": {"model": str(model), "data": str(data)}, **TRAIN, **settings}
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seed": 1,
                                    "model": {"attention": "sdpa"}, "stages": {stage: section}}))
    return path


def sentences(n: int, offset: int = 0) -> list[str]:
    words = ["alpha", "bravo", "delta", "echo", "kilo", "lima", "mike", "oscar", "papa", "tango", "victor", "zulu"]
    return [" ".join(words[(i * 7 + k * 3 + offset) % len(words)] for k in range(3 + i % 4)) for i in range(n)]


# --- SFT ---

def test_label_mask_is_exactly_the_assistant_tokens(tokenizer):
    messages = [{"role": "user", "content": "Copy: red fox"}, {"role": "assistant", "content": "red fox"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "red fox!"}]
    row = chat_data.encode_conversation(tokenizer, messages, 512)
    ids, labels = row["input_ids"], row["labels"]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    trained = [i for i, label in zip(ids, labels) if label != chat_data.IGNORE_INDEX]
    assert all(label in (t, chat_data.IGNORE_INDEX) for t, label in zip(ids, labels))
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    expected = tokenizer.encode("red fox", add_special_tokens=False) + [end] + \
        tokenizer.encode("red fox!", add_special_tokens=False) + [end]
    assert trained == expected
    prompt_len = len(tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"])
    assert set(labels[:prompt_len]) == {chat_data.IGNORE_INDEX}  # user turn and template tokens ignored


def test_packing_restarts_positions_and_keeps_labels(tokenizer):
    rows = [chat_data.encode_conversation(tokenizer, [{"role": "user", "content": s}, {"role": "assistant", "content": s}], 256)
            for s in sentences(6)]
    packed = chat_data.pack_rows(rows, 160)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(r["input_ids"]) for r in rows)
    assert all(len(p["input_ids"]) <= 160 for p in packed) and len(packed) < len(rows)
    first = packed[0]
    restarts = [i for i, pos in enumerate(first["position_ids"]) if pos == 0]
    assert restarts[0] == 0 and len(restarts) >= 2
    assert first["labels"][:restarts[1]] == rows[0]["labels"]


def sft_rows(n, offset=0):
    return [{"messages": [{"role": "user", "content": f"Repeat: {s}"}, {"role": "assistant", "content": s}]}
            for s in sentences(n, offset)]


def test_sft_stage_changes_every_parameter_and_output_generates(base_model, tmp_path):
    data = save_dataset(tmp_path / "sft_data", sft_rows(64), sft_rows(16, 5))
    recipe = write_recipe(tmp_path, "sft", base_model, data, max_steps=6, max_length=64, sample_prompts=2,
                          max_new_tokens=8)
    out = run_cli("stages.sft", str(recipe), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = tmp_path / "run" / "sft" / "model"
    before, after = load_file(base_model / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 6 and len(manifest["metrics"]["samples"]) == 2
    assert manifest["metrics"]["final_val_loss"] > 0

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir)  # this test process is not the stage's
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == chat_data.stop_token_ids(tok)
    ids = torch.tensor([chat_data.prompt_ids(tok, "Repeat: alpha bravo")])
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_missing_column_fails_before_training(base_model, tmp_path):
    data = save_dataset(tmp_path / "bad", [{"conversation": "x"}] * 4, [{"conversation": "y"}] * 2)
    recipe = write_recipe(tmp_path, "sft", base_model, data, max_steps=2)
    out = run_cli("pipeline", "run", str(recipe), env=ONE_THREAD)
    assert out.returncode != 0
    assert "missing column(s) messages" in out.stderr and str(data) in out.stderr
    assert not (tmp_path / "run" / ".work" / "sft" / "checkpoints").exists()
    assert not (tmp_path / "run" / "sft").exists()

    pairs = save_dataset(tmp_path / "pairs", [{"prompt": "p", "chosen": "a", "rejected_": "b"}] * 4,
                         [{"prompt": "p", "chosen": "a", "rejected_": "b"}] * 2)
    recipe = write_recipe(tmp_path, "reward", base_model, pairs, max_steps=2, format="pairs")
    out = run_cli("pipeline", "run", str(recipe), env=ONE_THREAD)
    assert out.returncode != 0 and "missing column(s) rejected" in out.stderr and str(pairs) in out.stderr


# --- reward model ---

def test_ranking_expansion_gives_exactly_the_ordered_pairs():
    assert sorted(ranking_pairs([2, 0, 1])) == [(1, 0), (1, 2), (2, 0)]
    assert len(ranking_pairs([0, 1, 2, 3, 4])) == 10  # K·(K−1)/2
    assert sorted(ranking_pairs([0, 1, 1])) == [(0, 1), (0, 2)]  # a tie gives no pair
    groups, stats = to_groups([{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [3, 0, 2, 1]}], "rankings")
    assert sorted((i, j) for i, j, _ in groups[0]["pairs"]) == sorted(
        [(1, 3), (1, 2), (1, 0), (3, 2), (3, 0), (2, 0)])
    assert stats["pairs"] == 6 and stats["dropped_ties"] == 0


def test_ratings_with_ties_are_dropped_deliberately():
    rows = [{"prompt": "p", "response": r, "rating": x} for r, x in (("a", 1.0), ("b", 0.5), ("c", 0.5), ("d", 0.0))]
    rows += [{"prompt": "q", "response": "e", "rating": 0.3}, {"prompt": "q", "response": "f", "rating": 0.3}]
    groups, stats = to_groups(rows, "ratings")
    assert len(groups) == 1 and stats["dropped_groups"] == 1  # q has only a tie
    assert sorted((i, j) for i, j, _ in groups[0]["pairs"]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert stats["dropped_ties"] == 2  # (b, c) and (e, f)
    groups, _ = to_groups(rows, "ratings", min_rating_gap=0.5)
    assert sorted((i, j) for i, j, _ in groups[0]["pairs"]) == [(0, 3)]


def preference_rows(n, offset=0):
    # learnable: the preferred answer repeats the sentence, the other one shouts it
    return [{"prompt": f"Repeat: {s}", "chosen": s, "rejected": s.upper() + " NO"} for s in sentences(n, offset)]


def test_reward_stage_reaches_high_held_out_accuracy(base_model, tmp_path):
    data = save_dataset(tmp_path / "prefs", preference_rows(96), preference_rows(32, 5))
    recipe = write_recipe(tmp_path, "reward", base_model, data, max_steps=30, max_length=64, eval_every=30)
    out = run_cli("pipeline", "run", str(recipe), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    stage = tmp_path / "run" / "reward"
    metrics = json.loads((stage / "manifest.json").read_text())["metrics"]
    assert metrics["format"] == "pairs" and metrics["final_val_accuracy"] >= 0.9
    stats = json.loads((stage / "model" / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["mean"] == metrics["final_reward_mean"]
    # the same recipe again from scratch: the same model, new score head included
    first = (stage / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "run" / ".work" / "reward")
    again = run_cli("pipeline", "run", str(recipe), "--force", "reward", env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (stage / "model" / "model.safetensors").read_bytes() == first

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(stage / "model")
    tok = AutoTokenizer.from_pretrained(stage / "model")
    assert model.config.num_labels == 1
    good, bad = (torch.tensor([chat_data.encode_scored(tok, "Repeat: kilo lima mike", r, 64)])
                 for r in ("kilo lima mike", "KILO LIMA MIKE NO"))
    assert model(input_ids=good).logits.item() > model(input_ids=bad).logits.item()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_process_zero2(stage, base_model, tmp_path):
    rows = (sft_rows(64), sft_rows(16, 5)) if stage == "sft" else (preference_rows(64), preference_rows(16, 5))
    data = save_dataset(tmp_path / "data", *rows)
    recipe = write_recipe(tmp_path, stage, base_model, data, max_steps=3, max_length=64, micro_batch_size=4,
                          sample_prompts=1, max_new_tokens=4) if stage == "sft" else \
        write_recipe(tmp_path, stage, base_model, data, max_steps=3, max_length=64, micro_batch_size=4)
    env = {**ONE_THREAD, "DS_ACCELERATOR": "cpu"}
    out = run_cli("accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_zero2.yaml"),
                  "--num_processes", "2", "-m", f"stages.{stage}", str(recipe), env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / stage / "manifest.json").read_text())["metrics"]
    assert metrics["distributed"]["num_processes"] == 2
    assert metrics["distributed"]["distributed_type"] == "DEEPSPEED" and metrics["distributed"]["zero_stage"] == 2
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    model = cls.from_pretrained(tmp_path / "run" / stage / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert os.path.exists(tmp_path / "run" / stage / "metrics.jsonl") or stage == "sft"
