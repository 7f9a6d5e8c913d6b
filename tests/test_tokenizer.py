"""The tokenizer stage: byte-level BPE that round-trips any text and carries a chat template."""

import json

import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("tok")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"), "stages": {"tokenizer": {
        "inputs": {"corpus": "builtin:stdlib"}, "vocab_size": 600, "max_train_chars": 300_000}}}))
    out = run_cli("stages.tokenizer", str(recipe))
    assert out.returncode == 0, out.stderr
    return tmp / "run" / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir / "tokenizer")


SAMPLES = [
    "Hello, world!",
    "中文分词测试：你好，世界。",
    "emoji 🤖🚀 and flags 🇫🇷 and ZWJ 👩‍💻",
    "def f(x):\n\treturn x ** 2  # code\n",
    "   leading, trailing and   runs of    spaces   \n\n\n\t\t",
    "",
    "\u0000\u00ff\ufffd mixed \r\n line endings",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_vocabulary_special_tokens_and_manifest(tokenizer, tokenizer_dir):
    assert len(tokenizer) == 600
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>" and tokenizer.pad_token == "<|pad|>"
    for token in ("<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    manifest = json.loads((tokenizer_dir / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["stage"] == "tokenizer"
    assert manifest["metrics"]["vocab_size"] == 600
    assert 1.5 < manifest["metrics"]["bytes_per_token_validation"] < 8
    assert manifest["metrics"]["train_seconds"] > 0
    assert manifest["outputs"] == ["tokenizer"]
    assert {"torch", "transformers", "tokenizers"} <= set(manifest["versions"])


def test_chat_template_two_turns_and_assistant_mask(tokenizer):
    conversation = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "hi again"},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert text == ("<|user|>\nSay hi.<|end|>\n<|assistant|>\nhi<|end|>\n"
                    "<|user|>\nAgain?<|end|>\n<|assistant|>\nhi again<|end|>\n")
    prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nSay hi.<|end|>\n<|assistant|>\n"
    out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert assistant == "hi<|end|>hi again<|end|>"
