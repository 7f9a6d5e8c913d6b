"""PPO rollouts: left-padded KV-cached sampling, and batched recomputation of logprobs / values / scores.

The sampling loop is written by hand with a DynamicCache: on tiny models `model.generate` costs
several ms of Python per call, and a hand loop lets us stop as soon as every row has hit EOS (or,
under ZeRO-3, as soon as every row on every rank has, since each forward is then a collective).

Sequence layout used everywhere: [query (left-padded, width P) | response (right-padded, width R)].
Position ids are cumsum(attention_mask) - 1 (clamped at 0), so a prompt's tokens get the same positions
whether or not it was padded to a longer neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.rl.ppo_core import entropy_from_logits


@dataclass
class Rollout:
    query: torch.Tensor  # [B, P] left-padded prompt ids
    query_mask: torch.Tensor  # [B, P] 1 for prompt tokens, 0 for left pads
    response: torch.Tensor  # [B, R] sampled ids; pad_token_id after the first EOS
    response_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS, 0 after
    ended_with_eos: torch.Tensor  # [B] bool: the response contains an EOS
    sample_logprobs: torch.Tensor  # [B, R] log softmax(logits / T) of the sampled tokens, from the KV-cached pass (0 where masked)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


# ---------------------------------------------------------------------------
# padding helpers


def left_pad(sequences: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length id sequences into left-padded (input_ids, attention_mask)."""
    rows = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from_eos(response: torch.Tensor, eos_token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R], ended_with_eos [B]): mask is 1 up to and including the first EOS."""
    if eos_token_ids is None or eos_token_ids.numel() == 0:
        return torch.ones_like(response), torch.zeros(response.shape[0], dtype=torch.bool, device=response.device)
    is_eos = torch.isin(response, eos_token_ids).long()
    eos_before = is_eos.cumsum(1) - is_eos  # number of EOS strictly before each position
    return (eos_before == 0).long(), is_eos.any(1)


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence, *, max_new_tokens: int, batch_size: int = 1,
                     num_return_sequences: int = 1, max_prompt_tokens: int | None = None, device=None,
                     **sampling) -> list[list[str]]:
    """`num_return_sequences` answers per chat prompt with transformers' `generate` (greedy unless
    `sampling` says do_sample=True), through the tokenizer's chat template, left-padded batches of
    `batch_size`, stopping at the end of the turn. `max_prompt_tokens` keeps the end of longer prompts
    (the assistant header). With batch_size=1 every rank runs the same steps (ZeRO-3 safe)."""
    from pipeline.data import chat

    device = device if device is not None else model.device
    stop = chat.stop_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        seqs = [chat.prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
        if max_prompt_tokens:
            seqs = [s[-max_prompt_tokens:] for s in seqs]
        ids, mask = left_pad(seqs, chat.pad_id(tokenizer), device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   num_return_sequences=num_return_sequences, eos_token_id=stop,
                                   pad_token_id=chat.pad_id(tokenizer), **sampling)
        texts = [chat.response_text(tokenizer, row[ids.shape[1]:].tolist()) for row in generated]
        out += [texts[j:j + num_return_sequences] for j in range(0, len(texts), num_return_sequences)]
    return out


# ---------------------------------------------------------------------------
# sampling


@torch.no_grad()
def generate_responses(
    model,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    sync_ranks: bool = False,
) -> Rollout:
    """Sample up to max_new_tokens per left-padded prompt with temperature (and optional top-k).

    `model` is a plain (unwrapped) causal LM. With sync_ranks=True (ZeRO-3: every forward gathers
    parameters collectively) the loop runs until every row on every rank has finished.
    Note: with top_k the recomputed logprobs (full softmax at T) are not those of the sampling
    distribution; PPO's ratio then is off-policy. Leave top_k=None for PPO.
    """
    from transformers import DynamicCache

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for PPO sampling, got {temperature}")
    device = query.device
    B = query.shape[0]
    eos = _eos_tensor(eos_token_id, device)
    sync = sync_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    P = query.shape[1]
    query_mask = query_mask.long()
    # preallocated [query mask | ones]: each decode step passes a view, no per-step concatenation
    full_mask = torch.cat([query_mask, query_mask.new_ones(B, max_new_tokens)], dim=1)
    next_position = query_mask.sum(-1, keepdim=True)  # [B, 1]
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=query,
        attention_mask=query_mask,
        position_ids=position_ids_from_mask(query_mask),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    tokens, logprobs = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float() / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        log_probs = torch.log_softmax(logits, dim=-1)
        token = torch.multinomial(log_probs.exp(), 1, generator=generator)  # [B, 1]
        token = torch.where(finished[:, None], torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logprobs.append(log_probs.gather(1, token))
        if eos is not None:
            finished = finished | (token == eos).any(-1)
        if step == max_new_tokens - 1:
            break
        # one sync per token, as in HF generate; under ZeRO-3 all ranks must agree to stop
        done = finished.all()
        if sync:
            flag = (~done).to(torch.float32)
            dist.all_reduce(flag)
            done = flag == 0
        if bool(done):
            break
        out = model(
            input_ids=token,
            attention_mask=full_mask[:, : P + step + 1],
            position_ids=next_position + step,
            past_key_values=out.past_key_values,
            use_cache=True,
        )

    response = torch.cat(tokens, dim=1)
    response_mask, ended = response_mask_from_eos(response, eos)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, pad_token_id))
    sample_logprobs = torch.where(response_mask.bool(), torch.cat(logprobs, dim=1), 0.0)
    return Rollout(query, query_mask, response, response_mask, ended, sample_logprobs)


# ---------------------------------------------------------------------------
# batched recomputation (one forward for the whole batch)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int, temperature: float) -> torch.Tensor:
    """Float32 logits / temperature predicting each response token: [B, S - response_start, V]."""
    n = input_ids.shape[1] - response_start
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=n + 1,  # positions response_start-1 .. S-1; the last one predicts nothing
    )
    return out.logits[:, :-1, :].float() / temperature


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at tokens, without materialising the full log-softmax."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def batched_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprobs [B, R] of input_ids[:, response_start:] under log softmax(logits / T),
    the SAME tempered distribution the sampler drew from. With return_entropy also the per-token
    entropy of that distribution (computed without gradient)."""
    logits = response_logits(model, input_ids, attention_mask, response_start, temperature)
    logprobs = logprobs_of(logits, input_ids[:, response_start:])
    if not return_entropy:
        return logprobs
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return logprobs, entropy


def _backbone_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def response_values(value_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int) -> torch.Tensor:
    """Per-token values [B, R] from a sequence-classification model (num_labels=1): its backbone's
    hidden state at the position before each response token, through its `score` head."""
    hidden = _backbone_hidden(value_model, input_ids, attention_mask)[:, response_start - 1 : -1]
    return value_model.score(hidden).squeeze(-1).float()


@torch.no_grad()
def reward_model_scores(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores [B] of a sequence-classification reward model read at the last attended token (found
    from attention_mask, so it works when pad_token_id == eos_token_id, unlike the model's own pooling)."""
    hidden = _backbone_hidden(reward_model, input_ids, attention_mask)
    last = attention_mask.shape[1] - 1 - attention_mask.long().flip(1).argmax(1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return reward_model.score(hidden[rows, last]).squeeze(-1).float()
