"""Stock chat models as users bring them: templates without `{% generation %}` markers, no pad token, an
end of turn that is not eos, no template at all; SFT data as plain text or prompt/completion."""

import json
import pydoc_data.topics

import pytest
import torch
import yaml
from chat_templates import CHATML, FAMILIES, family_tokenizer
from conftest import run_cli, save_dataset

from pipeline.data import chat
from pipeline.errors import ConfigError
from pipeline.recipe.config import from_dict
from pipeline.recipe.stages import SFTSettings

TEXTS = list(pydoc_data.topics.topics.values())[:30]
CONVERSATION = [{"role": "user", "content": "Copy: red fox"}, {"role": "assistant", "content": "red fox"},
                {"role": "user", "content": "Again: blue cat"}, {"role": "assistant", "content": "blue cat"}]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_is_on_assistant_turns_only_without_generation_markers(family):
    tok = family_tokenizer(family, TEXTS)
    end_of_turn = FAMILIES[family][3]
    enc = chat.encode_conversation(tok, CONVERSATION, 512)
    assert enc["input_ids"] == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    labeled = [t for t in enc["labels"] if t != chat.IGNORE_INDEX]
    assert tok.decode(labeled) == f"red fox{end_of_turn}blue cat{end_of_turn}"
    # every labeled token is in an assistant answer, no prompt or header token is
    assert all(label in (t, chat.IGNORE_INDEX) for t, label in zip(enc["input_ids"], enc["labels"]))
    prompt_only = chat.prompt_ids(tok, "Copy: red fox")
    assert all(label == chat.IGNORE_INDEX for label in enc["labels"][:len(prompt_only)])
    # generation stops at the end of the turn, then at eos
    assert chat.stop_token_ids(tok)[0] == tok.convert_tokens_to_ids(end_of_turn)
    assert tok.eos_token_id in chat.stop_token_ids(tok)
    response = tok.encode("red fox", add_special_tokens=False) + [tok.convert_tokens_to_ids(end_of_turn)] + [5, 6]
    assert chat.response_text(tok, response) == "red fox"


def test_a_missing_pad_token_is_filled_and_a_reward_model_never_pads_with_a_stop_token():
    mistral = family_tokenizer("mistral", TEXTS)  # eos is its end of turn, no unk token, no pad
    assert chat.ensure_pad_token(mistral) is True
    assert mistral.pad_token == "<|pad|>" and mistral.pad_token_id not in chat.stop_token_ids(mistral)
    chatml = family_tokenizer("chatml", TEXTS)
    chatml.add_special_tokens({"unk_token": "<unk>"})
    assert chat.ensure_pad_token(chatml) is False and chatml.pad_token == "<unk>"
    assert chat.ensure_pad_token(chatml) is False  # already has one
    qwen_like = family_tokenizer("chatml", TEXTS)
    qwen_like.pad_token = qwen_like.eos_token  # as Qwen ships: pad = eos
    assert chat.ensure_pad_token(qwen_like) is False and qwen_like.pad_token == qwen_like.eos_token  # fine for SFT
    assert chat.ensure_pad_token(qwen_like, scored=True) is True and qwen_like.pad_token == "<|pad|>"


def test_text_and_prompt_completion_rows():
    tok = family_tokenizer("chatml", TEXTS)
    enc = chat.encode_text(tok, "plain text for language modelling", 64)
    assert enc["labels"] == enc["input_ids"] and enc["input_ids"][-1] == tok.eos_token_id
    plain = chat.row_messages({"p": "Hi", "c": "Hello"}, "messages", "p", "c")
    assert plain == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    conversational = chat.row_messages({"p": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                        "c": [{"role": "assistant", "content": "Hello"}]}, "messages", "p", "c")
    assert [m["role"] for m in conversational] == ["system", "user", "assistant"]


def test_chat_template_setting_takes_jinja_or_a_file(tmp_path):
    inputs = {"model": str(tmp_path), "data": str(tmp_path)}
    assert from_dict(SFTSettings, {"inputs": inputs, "chat_template": CHATML}).chat_template == CHATML
    (tmp_path / "chatml.jinja").write_text(CHATML)
    assert from_dict(SFTSettings, {"inputs": inputs, "chat_template": str(tmp_path / "chatml.jinja")}).chat_template == CHATML
    with pytest.raises(ConfigError, match="stages.sft.chat_template: 'nope.jinja' is neither"):
        from_dict(SFTSettings, {"inputs": inputs, "chat_template": "nope.jinja"}, "stages.sft")


def _checkpoint(family, path, with_template):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = family_tokenizer(family, TEXTS, with_template=with_template)
    torch.manual_seed(0)
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if family == "chatml" else (MistralForCausalLM, MistralConfig)
    model = cls(cfg(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def _recipe(tmp_path, stage, model, data, **settings):
    path = tmp_path / f"{stage}.yaml"
    section = {"inputs": {"model": str(model), "data": str(data)}, "max_steps": 3, "micro_batch_size": 4,
               "learning_rate": 3e-3, "max_length": 64, "eval_every": 1000, "save_every": 1000, "eval_batches": 1,
               **settings}
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seed": 1, "model": {"attention": "sdpa"},
                                    "stages": {stage: section}}))
    return path


def test_sft_on_a_stock_chatml_model_without_pad_or_template(tmp_path):
    base, tok = _checkpoint("chatml", tmp_path / "qwen2", with_template=False)
    rows = [{"prompt": f"Copy: {w}", "completion": w} for w in ("red fox", "blue cat", "green owl", "gold bee")] * 4
    data = save_dataset(tmp_path / "data", rows, rows[:4])
    no_template = run_cli("stages.sft", str(_recipe(tmp_path, "sft", base, data)), env=ONE_THREAD)
    assert no_template.returncode == 1 and "no chat template; set stages.sft.chat_template" in no_template.stderr

    out = run_cli("stages.sft", str(_recipe(tmp_path, "sft", base, data, chat_template=CHATML, sample_prompts=1,
                                            max_new_tokens=4)), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    trained = tmp_path / "run" / "sft" / "model"
    saved = AutoTokenizer.from_pretrained(trained)
    assert saved.chat_template == CHATML
    model = AutoModelForCausalLM.from_pretrained(trained)
    assert model.get_input_embeddings().weight.shape[0] == len(saved) and model.config.pad_token_id == saved.pad_token_id
    eos = GenerationConfig.from_pretrained(trained).eos_token_id
    assert eos == [saved.convert_tokens_to_ids("<|im_end|>"), saved.eos_token_id]  # the turn's end first
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["samples"][0]["prompt"] == "Copy: red fox"


def test_reward_model_reads_its_score_at_the_same_token_everywhere(tmp_path):
    """Mistral ends a turn with eos and has no pad: the reward stage adds a pad token (pad = eos would make
    the model's own pooling read the token before the final eos), so the trained model scores a right-padded
    batch exactly as PPO and evaluate read it (left-padded, at the last attended token)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.rl.rollout import left_pad, reward_model_scores

    base, _ = _checkpoint("mistral", tmp_path / "mistral", with_template=True)
    rows = [{"prompt": f"Say {w}", "chosen": w, "rejected": f"{w} {w} no"} for w in ("yes", "ok", "fine", "sure")] * 4
    data = save_dataset(tmp_path / "pairs", rows, rows[:4])
    out = run_cli("stages.reward", str(_recipe(tmp_path, "reward", base, data)), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    trained = tmp_path / "run" / "reward" / "model"
    tok = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForSequenceClassification.from_pretrained(trained).eval()
    assert tok.pad_token_id not in chat.stop_token_ids(tok) and model.config.pad_token_id == tok.pad_token_id
    seqs = [chat.encode_scored(tok, "Say yes", r, 64) for r in ("yes", "a much longer answer than that")]
    assert seqs[0][-1] == tok.eos_token_id  # the end of turn is eos
    width = max(map(len, seqs))
    right = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        pooled = model(input_ids=right).logits.squeeze(-1)
        ids, mask = left_pad(seqs, tok.pad_token_id)
        torch.testing.assert_close(reward_model_scores(model, ids, mask), pooled, atol=1e-5, rtol=1e-5)
    assert json.loads((trained / "reward_stats.json").read_text())["std"] >= 0


# --- preference data in TRL's and the Hub's formats ---

def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def test_preference_formats_are_detected_by_their_columns():
    from pipeline.data.preferences import detect_format

    assert detect_format(["prompt", "chosen", "rejected"]) == "pairs"
    assert detect_format(["chosen", "rejected"]) == "pairs"  # implicit prompt
    assert detect_format(["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]) == "pairs"
    assert detect_format(["prompt", "completion", "label"]) == "unpaired"
    assert detect_format(["prompt", "responses", "ranks"]) == "rankings"
    assert detect_format(["prompt", "response", "rating"]) == "ratings"
    assert detect_format(["question", "answer"]) is None


def test_conversational_and_implicit_prompt_pairs_become_the_same_comparison():
    from pipeline.data.preferences import to_groups

    prompt = [_user("Name a colour.")]
    explicit = {"prompt": prompt, "chosen": [_assistant("Blue.")], "rejected": [_assistant("Fish.")]}
    implicit = {"chosen": prompt + [_assistant("Blue.")], "rejected": prompt + [_assistant("Fish.")]}  # HH-RLHF style
    text = {"chosen": "Name a colour. Blue.", "rejected": "Name a colour. Fish."}
    (a,), _ = to_groups([explicit], "pairs")
    (b,), _ = to_groups([implicit], "pairs")
    (c,), _ = to_groups([text], "pairs")
    assert a == b == {"prompt": prompt, "responses": ["Blue.", "Fish."], "pairs": [(0, 1, 0.0)]}
    assert c == {"prompt": "Name a colour.", "responses": ["Blue.", "Fish."], "pairs": [(0, 1, 0.0)]}
    (scored,), _ = to_groups([{**explicit, "score_chosen": 8.5, "score_rejected": 3.0}], "pairs")  # UltraFeedback
    assert scored["pairs"] == [(0, 1, 5.5)]


def test_unpaired_labels_pair_every_desirable_with_every_undesirable_completion():
    from pipeline.data.preferences import to_groups

    rows = [{"prompt": "Q", "completion": c, "label": lab} for c, lab in (("good1", True), ("bad", False), ("good2", True))]
    rows.append({"prompt": "only good", "completion": "x", "label": True})
    groups, stats = to_groups(rows, "unpaired")
    assert groups == [{"prompt": "Q", "responses": ["good1", "bad", "good2"], "pairs": [(0, 1, 1.0), (2, 1, 1.0)]}]
    assert stats["dropped_groups"] == 1 and stats["dropped_ties"] == 1  # good1 ~ good2


def test_reward_stage_on_conversational_implicit_prompt_pairs(tmp_path):
    base, _ = _checkpoint("chatml", tmp_path / "qwen2", with_template=True)
    rows = [{"chosen": [_user(f"Say {w}"), _assistant(w)], "rejected": [_user(f"Say {w}"), _assistant(f"no {w} no")]}
            for w in ("yes", "ok", "fine", "sure")] * 4
    data = save_dataset(tmp_path / "hh", rows, rows[:4])
    out = run_cli("stages.reward", str(_recipe(tmp_path, "reward", base, data)), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "reward" / "manifest.json").read_text())
    assert manifest["metrics"]["format"] == "pairs" and manifest["metrics"]["data"]["train"]["pairs"] == 16


# --- dataset files as people and the Hub lay them out ---

def _spec(path):
    from pipeline.recipe.schema import InputSpec

    return InputSpec("data", str(path), "path", path=path)


def test_split_files_compression_csv_and_hub_snapshot_folders(tmp_path):
    import gzip

    import pandas as pd

    from pipeline.data.sources import load_dataset_input

    rows = lambda tag, n: [{"text": f"{tag} {i}"} for i in range(n)]  # noqa: E731
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for split, n in (("train", 6), ("validation", 2)):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows(split, n))
    data = load_dataset_input(_spec(folder))
    assert (len(data["train"]), len(data["validation"])) == (6, 2) and data["validation"][0]["text"] == "validation 0"

    snapshot = tmp_path / "snapshot" / "data"  # a Hub dataset repo as snapshot_download leaves it
    snapshot.mkdir(parents=True)
    pd.DataFrame(rows("train", 5)).to_parquet(snapshot / "train-00000-of-00001.parquet")
    pd.DataFrame(rows("test", 3)).to_parquet(snapshot / "test-00000-of-00001.parquet")
    data = load_dataset_input(_spec(tmp_path / "snapshot"))
    assert set(data) == {"train", "test", "validation"} and len(data["validation"]) == 3  # test is the held-out split

    pd.DataFrame(rows("csv", 20)).to_csv(tmp_path / "table.csv", index=False)
    data = load_dataset_input(_spec(tmp_path / "table.csv"), validation_fraction=0.25)
    assert (len(data["train"]), len(data["validation"])) == (15, 5)  # no split named: one carved from train

    (folder / "notes.csv").write_text("text\nx\n")
    with pytest.raises(Exception, match="several kinds") as e:
        load_dataset_input(_spec(folder))
    assert "notes.csv" in str(e.value)


def test_a_column_mapping_renames_other_names_and_names_a_missing_column(tmp_path):
    from pipeline.data.sources import load_dataset_input
    from pipeline.errors import StageError

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    folder = save_dataset(tmp_path / "qa", rows, rows[:2])
    data = load_dataset_input(_spec(folder), columns={"question": "prompt", "answer": "completion"})
    assert data["train"].column_names == ["prompt", "completion"] and data["validation"][0]["prompt"] == "q0"
    with pytest.raises(StageError, match="columns: no column query to rename; it has question, answer"):
        load_dataset_input(_spec(folder), columns={"query": "prompt"})


def test_sft_reads_renamed_columns(tmp_path):
    base, _ = _checkpoint("chatml", tmp_path / "qwen2", with_template=True)
    rows = [{"question": f"Copy: {w}", "answer": w} for w in ("red fox", "blue cat", "green owl", "gold bee")] * 4
    data = save_dataset(tmp_path / "qa", rows, rows[:4])
    recipe = _recipe(tmp_path, "sft", base, data, columns={"question": "prompt", "answer": "completion"},
                     sample_prompts=1, max_new_tokens=2)
    out = run_cli("stages.sft", str(recipe), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["metrics"]["samples"]
    assert samples[0]["prompt"] == "Copy: red fox"
