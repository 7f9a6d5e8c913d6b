"""PPO tensor math for RLHF: masked statistics, KL penalties, GAE, clipped losses, KL controllers.

Everything here is a pure function of tensors (no models, no distributed state), so it is tested
against slow loop implementations in tests/test_ppo_core.py.

Shapes: per-token tensors are [B, T] over response positions. `mask` is 1 for real response tokens
(up to and including the first EOS) and 0 for pads and post-EOS tokens; masks are prefixes (a row's
ones come first). Masking uses torch.where, never multiplication, so NaN/inf in masked positions
(e.g. logits of fully padded rows) cannot leak into results.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


# ---------------------------------------------------------------------------
# masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.bool()
    zeroed = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over all of them, or along `dim`)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    # clamp: an all-masked row gives 0 instead of nan
    return masked_sum(x, mask, dim) / count.to(x.dtype).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (unbiased by default, as TRL/OpenAI lm-human-preferences)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(x.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; with shift_mean=False the mean is added back (only rescaled).
    Masked positions come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------
# KL and rewards


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy (Schulman's k1/k3).
    k1 = log p - log q (unbiased, can be negative); k3 = (r - 1) - log r with r = q/p (unbiased, >= 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for an empty row)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * KL_t, plus the sequence score at the last real response token.
    Returns (rewards [B, T], kl [B, T]); both are 0 at masked positions."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(mask.bool(), kl_penalty(logprobs, ref_logprobs, estimator), zero)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    scores = torch.where(mask.sum(-1) > 0, scores.to(rewards.dtype), 0.0)  # an empty response gets no score
    rewards = rewards.index_put((rows, last_token_index(mask)), scores, accumulate=True)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; the episode ends after the last masked-in
    token (the value after it is 0). Returns (advantages, returns), 0 at masked positions.

    Vectorised as a matmul with the upper-triangular matrix of (gamma*lam)^(j-i), so there is no Python
    loop over tokens (T is at most a few thousand, T^2 floats is small)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(m, values, zero)
    rewards = torch.where(m, rewards.to(values.dtype), zero)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    T = rewards.shape[1]
    idx = torch.arange(T, device=values.device)
    offset = idx[None, :] - idx[:, None]  # [i, j] = j - i
    # discount in float64 so (gamma*lam)^k underflows gracefully for long responses
    discount = torch.where(offset >= 0, (gamma * lam) ** offset.clamp(min=0).double(), 0.0).to(values.dtype)
    advantages = deltas @ discount.T  # adv[b, i] = sum_j discount[i, j] * delta[b, j]
    advantages = torch.where(m, advantages, zero)
    returns = torch.where(m, advantages + values, zero)
    return advantages, returns


# ---------------------------------------------------------------------------
# losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped PPO surrogate, averaged over response tokens. Returns (loss, clipfrac, approx_kl) where
    approx_kl = mean 0.5 * (log ratio)^2 (clipfrac and approx_kl are detached)."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2) averaged over response tokens.
    clip_range_value=None disables clipping. Returns (loss, clipfrac)."""
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), dtype=values.dtype, device=values.device)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution over the last dim: logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[target - prediction] / Var[target] over masked entries (1 = perfect value function)."""
    var_targets = masked_var(targets, mask, unbiased=False)
    var_residual = masked_var(targets - predictions, mask, unbiased=False)
    return 1.0 - var_residual / var_targets.clamp(min=1e-8)


# ---------------------------------------------------------------------------
# KL coefficient controllers


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019: moves beta proportionally towards `target` KL,
    with the error clipped to +-20% and the step scaled by n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        # only the coefficient changes: target and horizon come from the settings (part of the fingerprint)
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
