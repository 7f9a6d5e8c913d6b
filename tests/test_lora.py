"""LoRA through PEFT on the SFT and reward stages: only the updates train, the output is a plain merged
checkpoint or PEFT adapter files, our merge of gathered weights equals PEFT's `merge_and_unload`."""

import copy
import json

import pytest
import torch
from conftest import ROOT, run_cli, save_dataset
from safetensors.torch import load_file
from test_sft_reward import ONE_THREAD, preference_rows, sft_rows, write_recipe

from pipeline.recipe.settings import LoraSettings
from pipeline.train.models import add_lora, merge_lora_state_dict, transposed_modules


def _tiny(arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers: PEFT stores their updates transposed (fan_in_fan_out)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_our_merge_of_a_state_dict_equals_peft_merge_and_unload(arch):
    lora = LoraSettings(r=4, alpha=8.0, dropout=0.0)
    model = add_lora(_tiny(arch), lora, "CAUSAL_LM")
    with torch.no_grad():  # PEFT starts B at zero: give the update something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ours = merge_lora_state_dict(model.state_dict(), lora.alpha / lora.r, transposed_modules(model))
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    untouched = _tiny(arch).state_dict()  # the same seed: the weights before any update
    assert any(not torch.allclose(ours[k], untouched[k]) for k in untouched)  # the merge moved them


def test_sft_with_lora_trains_only_the_updates_and_saves_a_plain_checkpoint(base_model, tmp_path):
    data = save_dataset(tmp_path / "data", sft_rows(32), sft_rows(8, 5))
    recipe = write_recipe(tmp_path, "sft", base_model, data, max_steps=4, max_length=64, sample_prompts=1,
                          max_new_tokens=4, lora={"r": 4, "alpha": 8})
    out = run_cli("stages.sft", str(recipe), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = tmp_path / "run" / "sft" / "model"
    assert not (model_dir / "adapter_config.json").exists()
    before, after = load_file(base_model / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert before.keys() == after.keys()  # the base architecture's names: no PEFT wrapper left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # adapted linears only
    assert not any("embed" in k or "norm" in k for k in changed)
    m = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["metrics"]
    assert 0 < m["trainable_share"] < 0.5 and m["trainable_parameters"] < m["parameters"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir)  # loads without PEFT


def test_reward_with_lora_saves_an_adapter_that_peft_loads(base_model, tmp_path):
    data = save_dataset(tmp_path / "data", preference_rows(32), preference_rows(8, 5))
    recipe = write_recipe(tmp_path, "reward", base_model, data, max_steps=4, max_length=64,
                          lora={"r": 4, "save": "adapter"})
    out = run_cli("stages.reward", str(recipe), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = tmp_path / "run" / "reward" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "reward_stats.json"} <= {p.name for p in model_dir.iterdir()}
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model) and config["r"] == 4
    from peft import AutoPeftModelForSequenceClassification

    model = AutoPeftModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 1)


@pytest.mark.slow
def test_lora_under_two_process_zero2(base_model, tmp_path):
    data = save_dataset(tmp_path / "data", sft_rows(32), sft_rows(8, 5))
    recipe = write_recipe(tmp_path, "sft", base_model, data, max_steps=3, max_length=64, micro_batch_size=4,
                          sample_prompts=1, max_new_tokens=4, lora={"r": 4})
    out = run_cli("accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_zero2.yaml"),
                  "--num_processes", "2", "-m", "stages.sft", str(recipe), env={**ONE_THREAD, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-4000:]
    m = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["metrics"]
    assert m["distributed"]["zero_stage"] == 2 and m["distributed"]["num_processes"] == 2 and m["trainable_share"] < 0.5
    before = load_file(base_model / "model.safetensors")
    after = load_file(tmp_path / "run" / "sft" / "model" / "model.safetensors")
    assert set(before) <= set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    if "lm_head.weight" in set(after) - set(before):  # DeepSpeed hands tied weights over as two tensors
        assert torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])
