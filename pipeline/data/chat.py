"""Conversations -> token ids and loss masks, for the SFT, reward, PPO and evaluation stages.

Everything goes through the tokenizer's chat template (`apply_chat_template`), so a checkpoint trained
here is prompted exactly as it was trained, whatever the template (ours, ChatML, Llama 3, Mistral,
Gemma, ...). Loss goes on assistant tokens only: from the template's `{% generation %}` markers when it
has them (stages/tokenizer.py writes them), otherwise from rendering the conversation turn by turn (the
prompt up to each assistant turn with the generation prompt, then with the turn): the characters in
between are the assistant's, its end-of-turn marker included. TRL's `assistant_only_loss` needs the
markers, which stock templates lack; this is why it is written here.

A turn ends at the template's end-of-turn token (found by rendering a turn, not from a list of names:
`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ours `<|end|>`, or eos for Mistral), then at eos.
"""

from __future__ import annotations

import re

import torch

IGNORE_INDEX = -100  # a label no loss is taken on (transformers' and torch's convention)
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
SENTINEL = "\u2063turn\u2063"  # text no template changes, to find what follows an assistant turn


class ChatTemplateError(ValueError):
    """A tokenizer's chat template cannot do what a stage needs (named in the message)."""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it: from the end of
    the prompt rendered with the generation prompt to the end of the conversation rendered up to that turn."""
    full = _render(tokenizer, messages)
    eot = "".join(tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(prompt) and full.startswith(through)):
            raise ChatTemplateError(f"the chat template renders assistant turn {i} differently once later turns "
                                    f"follow, so its tokens cannot be told apart; give it {{% generation %}} markers")
        end = len(through)
        if eot:  # the turn ends with its end-of-turn token; what the template writes after it is not the answer's
            cut = full.rfind(eot, len(prompt), end)
            end = cut + len(eot) if cut >= 0 else end
        spans.append((len(prompt), end))
    return full, spans


def row_messages(row: dict, messages_column: str, prompt_column: str | None, completion_column: str | None) -> list[dict]:
    """A conversation from a `messages` row, or from a prompt and a completion: plain strings (a user and an
    assistant turn) or lists of messages (TRL's conversational prompt-completion)."""
    if prompt_column is None:
        return list(row[messages_column])
    prompt, completion = row[prompt_column], row[completion_column]
    prompt = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    completion = list(completion) if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return prompt + completion


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (= input_ids on assistant tokens, IGNORE_INDEX elsewhere), truncated."""
    if GENERATION_MARKER.search(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        if not tokenizer.is_fast:
            raise ChatTemplateError("assistant-only loss without {% generation %} markers needs a fast tokenizer "
                                    "(character offsets)")
        text, spans = assistant_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(a <= start < b for a, b in spans) and end > start for start, end in enc["offset_mapping"]]
    ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


def encode_text(tokenizer, text: str, max_length: int) -> dict[str, list[int]]:
    """Plain text (a `text` column): loss on every token, as in pretraining."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def pack_rows(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy packing in order: several conversations per row, position ids restarting at each."""
    packed, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        n = len(row["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += row["input_ids"]
        current["labels"] += row["labels"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed


def right_pad_collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: with causal attention no real token attends to a pad, so no mask is needed."""
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0}
    batch = {}
    for key in rows[0]:
        batch[key] = torch.tensor([list(r[key]) + [fill[key]] * (width - len(r[key])) for r in rows], dtype=torch.long)
    if "position_ids" not in batch:  # pads continue the positions; they are never attended to
        batch["position_ids"] = torch.arange(width).expand(len(rows), width).clone()
    return batch


def prompt_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as messages: a string is one user turn; a list of messages (TRL's conversational
    prompt-only format) is taken as it is."""
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt's words (the messages' contents joined), for checks that read text."""
    return " ".join(m["content"] for m in prompt_messages(prompt))


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A prompt rendered for generation (ends with the assistant header)."""
    return list(tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


_END_OF_TURN: dict[tuple, list[int]] = {}


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template puts right after an assistant message's text, if any."""
    key = (id(tokenizer), len(tokenizer), tokenizer.chat_template)
    if key not in _END_OF_TURN:
        found: list[int] = []
        try:
            text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}])
        except Exception:  # noqa: BLE001 - no template, or one that refuses this conversation
            text = ""
        if SENTINEL in text:
            tail = tokenizer(text[text.index(SENTINEL) + len(SENTINEL):], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            found = [t for t in tail if t in special][:1]
        _END_OF_TURN[key] = found
    return _END_OF_TURN[key]


def stop_token_ids(tokenizer, generation_eos: int | list[int] | None = None) -> list[int]:
    """Generation stops at the end of the assistant turn, at eos, and at whatever the checkpoint's
    generation config lists (`generation_eos`, e.g. Llama 3's several end tokens)."""
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    ids = [*end_of_turn_ids(tokenizer), tokenizer.eos_token_id, *extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def ensure_pad_token(tokenizer, scored: bool = False) -> bool:
    """Give a tokenizer without a pad token one (unk when it has one, else a new `<|pad|>`); True when a
    token was added (resize the model's embeddings). `scored` (a reward model): also when pad is a stop
    token. A sequence-classification model reads its score at the last token that is not pad, and a scored
    sequence ends with the end-of-turn token, often eos itself: pad = eos (how Qwen, and many fine-tuning
    recipes, ship) would move the score to the token before it in training but not in PPO and evaluation,
    which read it at the last attended token."""
    stops = set(stop_token_ids(tokenizer))
    if tokenizer.pad_token_id is not None and not (scored and tokenizer.pad_token_id in stops):
        return False
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in stops:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def pad_id(tokenizer) -> int:
    """The id to pad generation inputs with: pad, else eos (masked out by the attention mask either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def response_text(tokenizer, ids: list[int]) -> str:
    """Decoded response without the stop token and anything after it."""
    stops = set(stop_token_ids(tokenizer))
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def encode_scored(tokenizer, prompt: str | list[dict], response: str, max_length: int) -> list[int]:
    """prompt + response as the reward model reads it, exactly the token layout PPO rollouts have:
    the generation prompt, the response tokens, the end-of-turn token (the score is read there)."""
    ids = prompt_ids(tokenizer, prompt) + tokenizer.encode(response, add_special_tokens=False)
    ids.append(stop_token_ids(tokenizer)[0])
    return ids[-max_length:]  # keep the end: the score is read at the last token
