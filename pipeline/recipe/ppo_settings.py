"""PPO's algorithm settings, apart from the trainer so that recipes parse without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.recipe.config import ConfigError, require_at_least

KLEstimator = Literal["k1", "k3"]


@dataclass
class PPOSettings:
    temperature: float = 0.7
    """sampling temperature; every logprob (policy, ref) is computed at this temperature"""
    max_new_tokens: int = 64
    """response length cap"""
    top_k: int | None = None
    """optional top-k sampling; None = off (PPO assumes the full tempered distribution)"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """minibatches per epoch (the rollout batch is split into this many)"""
    clip_range: float = 0.2
    """policy ratio clip epsilon"""
    clip_range_value: float | None = 0.2
    """value clip around the old values; None = unclipped value loss"""
    vf_coef: float = 0.1
    """weight of the value loss in the combined loss"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    kl_estimator: KLEstimator = "k1"
    """per-token KL estimator in the reward: k1 (the log ratio) or k3"""
    kl_coef: float = 0.05
    """KL penalty coefficient (initial value when adaptive)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards target_kl (Ziegler et al.)"""
    target_kl: float = 6.0
    """adaptive KL target: summed per-sequence KL"""
    kl_horizon: float = 10000.0
    """adaptive KL horizon, in episodes"""
    whiten_rewards: bool = False
    """rescale per-token rewards to unit variance (no mean shift)"""
    reward_clip: float | None = None
    """clip normalised scores to [-reward_clip, reward_clip]; None = no clipping"""
    missing_eos_penalty: float | None = None
    """subtracted from the normalised score of responses without EOS"""
    reward_mean: float = 0.0
    """reward-model score mean (on SFT samples) for normalisation"""
    reward_std: float = 1.0
    """reward-model score std: score_normalised = (score - mean) / std"""
    max_grad_norm: float | None = 1.0
    """gradient clipping per model; None = off"""

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator: must be 'k1' or 'k3', got {self.kl_estimator!r}")
        require_at_least(self, ("num_minibatches", "ppo_epochs", "max_new_tokens"))
        if self.reward_std <= 0:
            raise ConfigError(f"reward_std: must be > 0, got {self.reward_std}")
