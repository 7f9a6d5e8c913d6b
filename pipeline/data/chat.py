"""Conversations -> token ids and loss masks, for the SFT, reward, PPO and evaluation stages.

Everything goes through the tokenizer's chat template (`apply_chat_template`), so a checkpoint trained
here is prompted exactly as it was trained. The assistant-token mask comes from the template's
`{% generation %}` markers (stages/tokenizer.py writes them): loss only on assistant tokens.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a label no loss is taken on (transformers' and torch's convention)
END_OF_TURN = "<|end|>"


def row_messages(row: dict, messages_column: str, prompt_column: str | None, completion_column: str | None) -> list[dict]:
    if prompt_column is not None:
        return [{"role": "user", "content": row[prompt_column]}, {"role": "assistant", "content": row[completion_column]}]
    return list(row[messages_column])


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (= input_ids on assistant tokens, IGNORE_INDEX elsewhere), truncated."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])[:max_length]
    mask = list(out["assistant_masks"])[:max_length]
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


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


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A user prompt rendered for generation (ends with the assistant header)."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                              add_generation_prompt=True, return_dict=True)["input_ids"])


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at the end of the assistant turn (or at a document end)."""
    ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN)] if END_OF_TURN in tokenizer.get_vocab() else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def response_text(tokenizer, ids: list[int]) -> str:
    """Decoded response without the stop token and anything after it."""
    stops = set(stop_token_ids(tokenizer))
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def encode_scored(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """prompt + response as the reward model reads it, exactly the token layout PPO rollouts have:
    the generation prompt, the response tokens, the end-of-turn token (the score is read there)."""
    ids = prompt_ids(tokenizer, prompt) + tokenizer.encode(response, add_special_tokens=False)
    ids.append(stop_token_ids(tokenizer)[0])
    return ids[-max_length:]  # keep the end: the score is read at the last token
