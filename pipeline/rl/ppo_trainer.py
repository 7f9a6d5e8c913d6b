"""PPO for RLHF: one `PPOTrainer.step(prompts)` = rollout, frozen forwards, rewards/advantages, PPO epochs.

Usage (the caller builds the models, optimizers and reward function; the trainer prepares the models):

    trainer = PPOTrainer(policy, ref_policy, value_model, reward_fn, tokenizer, PPOSettings(...),
                         accelerator, policy_optimizer, value_optimizer)
    for prompts in loader:                      # lists of token-id lists, or (input_ids, attention_mask)
        metrics = trainer.step(prompts)

Follows "The N+ implementation details of RLHF with PPO" (Huang et al.) and TRL's old PPOTrainer:
reward at the last response token, per-token KL penalty, GAE, whitened advantages, clipped policy and
value losses, the sampling temperature reused for every logprob, dropout off everywhere.

Policy and value model are wrapped in one module (`PolicyAndValue`) so one forward/backward serves
both and accelerate/DeepSpeed see a single model. Without DeepSpeed each keeps its own optimizer and
its own gradient clipping; under DeepSpeed (one engine, one optimizer) the value optimizer's param
groups are merged into the policy optimizer (same class required; per-group lr etc. are kept) and
clipping is DeepSpeed's `gradient_clipping`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeline.recipe.ppo_settings import PPOSettings  # noqa: F401  (re-exported: the trainer's settings)
from pipeline.rl.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from pipeline.rl.rollout import (
    Rollout,
    batched_logprobs,
    generate_responses,
    left_pad,
    response_values,
)
from pipeline.train.distributed import uses_deepspeed, zero_stage

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PolicyAndValue(nn.Module):
    """Policy LM + value model as one module: forward returns per-token (logprobs, values[, entropy])."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, response_start: int, temperature: float, return_entropy: bool = False):
        lp = batched_logprobs(self.policy, input_ids, attention_mask, response_start, temperature, return_entropy)
        values = response_values(self.value_model, input_ids, attention_mask, response_start)
        if return_entropy:
            return lp[0], values, lp[1]
        return lp, values


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for good (PPO ratios need identical train/eval forwards): nn.Dropout p=0 and float
    `*dropout*` attributes of modules and config (e.g. Llama's attention_dropout) set to 0."""
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)


def prepare_frozen(model: nn.Module, accelerator) -> nn.Module:
    """Reference model: eval, no grad; sharded under ZeRO-3 (as TRL's prepare_deepspeed), else replicated."""
    model.eval()
    model.requires_grad_(False)
    if zero_stage(accelerator) != 3:
        return model.to(accelerator.device)
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


class PPOTrainer:
    def __init__(
        self,
        policy: nn.Module,
        ref_policy: nn.Module,
        value_model: nn.Module,
        reward_fn: RewardFn,
        tokenizer,
        settings: PPOSettings,
        accelerator,
        policy_optimizer: torch.optim.Optimizer,
        value_optimizer: torch.optim.Optimizer,
        seed: int = 0,
    ):
        """Models and optimizers are passed un-prepared; the trainer calls accelerator.prepare.
        `reward_fn(input_ids, attention_mask) -> scores[B]` gets [query | response] with post-EOS tokens
        replaced by pad and masked out (see ppo_rollout.reward_model_scores for a reward-model wrapper).
        `tokenizer` only supplies pad_token_id and eos_token_id (an int, or a list of stop ids).
        Under DeepSpeed the value optimizer's groups join the policy optimizer (self.value_optimizer is
        None) and gradient clipping is the DeepSpeed config's `gradient_clipping`, not max_grad_norm.
        Under ZeRO-3 with zero3_init_flag, models made with a plain constructor after the Accelerator
        exists fail in transformers' weight init: build those before it (from_pretrained is fine)."""
        settings.validate()  # recipes validate at parse; this catches settings built in code
        self.settings = s = settings
        self.accelerator = accelerator
        self.reward_fn = reward_fn
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer needs a pad_token_id or an eos_token_id")

        # dropout off in all models; rollouts run in eval(), updates in train() (only so that gradient
        # checkpointing, which transformers applies in training mode, works; the forwards are identical)
        for m in (policy, value_model, ref_policy):
            disable_dropout(m)
        self.is_deepspeed = uses_deepspeed(accelerator)
        self.sync_generation = zero_stage(accelerator) == 3  # every forward gathers parameters collectively
        wrapper = PolicyAndValue(policy, value_model)
        if self.is_deepspeed:
            if type(policy_optimizer) is not type(value_optimizer):
                raise ValueError("under DeepSpeed the policy and value optimizers are merged and must be of the same class")
            for group in value_optimizer.param_groups:
                policy_optimizer.add_param_group(dict(group))
            # no dataloader goes through prepare, so DeepSpeed cannot infer "auto" batch sizes; ours are
            # set per call anyway (the engine steps on every backward: gradient_accumulation_steps 1)
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds_config["train_micro_batch_size_per_gpu"] = 1
            self.model, self.policy_optimizer = accelerator.prepare(wrapper, policy_optimizer)
            self.value_optimizer = None
        else:
            self.model, self.policy_optimizer, self.value_optimizer = accelerator.prepare(wrapper, policy_optimizer, value_optimizer)
        self.model.eval()
        self.unwrapped: PolicyAndValue = accelerator.unwrap_model(self.model)  # cached: unwrap_model costs ms
        self.ref_policy = prepare_frozen(ref_policy, accelerator)

        if s.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(s.kl_coef)
        seed = seed + accelerator.process_index  # sampling and minibatch shuffling, per process
        device = accelerator.device
        self.sample_generator = torch.Generator(device=device).manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.global_step = 0
        self.episodes = 0  # summed over processes
        self.last_batch: dict | None = None  # tensors of the latest step, for inspection/tests

    # -- helpers -------------------------------------------------------------

    def _backward_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        acc, s = self.accelerator, self.settings
        acc.backward(loss)
        zero = torch.zeros((), device=loss.device)
        grad_norm = zero
        if self.is_deepspeed:
            # the engine clips (config gradient_clipping) and steps inside backward
            self.policy_optimizer.step()
            self.policy_optimizer.zero_grad(set_to_none=True)
            return grad_norm
        if s.max_grad_norm is not None:
            # each model on its own, so large value gradients do not shrink the policy step
            grad_norm = acc.clip_grad_norm_(self.unwrapped.policy.parameters(), s.max_grad_norm)
            acc.clip_grad_norm_(self.unwrapped.value_model.parameters(), s.max_grad_norm)
        for opt in (self.policy_optimizer, self.value_optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else zero

    # -- one PPO iteration ---------------------------------------------------

    def rollout(self, query: torch.Tensor, query_mask: torch.Tensor) -> Rollout:
        s = self.settings
        with torch.no_grad(), self.accelerator.autocast():
            return generate_responses(
                self.unwrapped.policy,
                query,
                query_mask,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                top_k=s.top_k,
                generator=self.sample_generator,
                sync_ranks=self.sync_generation,
            )

    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """One PPO iteration on this process's share of prompts (token ids, left-padded here). Returns metrics
        averaged over processes."""
        s, acc = self.settings, self.accelerator
        query, query_mask = left_pad(prompts, self.pad_token_id, acc.device)
        P = query.shape[1]

        # 1. rollout and frozen forwards, each one batched call
        roll = self.rollout(query, query_mask)
        input_ids, attention_mask, mask = roll.input_ids, roll.attention_mask, roll.response_mask
        with torch.no_grad(), acc.autocast():
            # same module and code path as the training forward, so the first ratio is exactly 1
            old_logprobs, old_values, entropy = self.model(input_ids, attention_mask, P, s.temperature, True)
            ref_logprobs = batched_logprobs(self.ref_policy, input_ids, attention_mask, P, s.temperature)
            raw_scores = self.reward_fn(input_ids, attention_mask).float().reshape(-1).to(old_logprobs.device)

        # 2. rewards, advantages
        with torch.no_grad():
            scores = (raw_scores - s.reward_mean) / s.reward_std
            if s.reward_clip is not None:
                scores = scores.clamp(-s.reward_clip, s.reward_clip)
            if s.missing_eos_penalty is not None:
                scores = torch.where(roll.ended_with_eos, scores, scores - s.missing_eos_penalty)
            kl_coef = self.kl_ctl.value
            rewards, kl = compute_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, s.kl_estimator)
            if s.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
            advantages = masked_whiten(advantages, mask)
            log_ratio_ref = torch.where(mask.bool(), old_logprobs - ref_logprobs, 0.0)

        # 3. PPO epochs over minibatches
        B = input_ids.shape[0]
        n_mb = min(s.num_minibatches, B)
        stats = []  # per minibatch: pg_loss, clipfrac, approx_kl, vf_loss, vf_clipfrac, grad_norm
        self.model.train()
        for _ in range(s.ppo_epochs):
            perm = torch.randperm(B, generator=self.shuffle_generator).to(input_ids.device)
            for idx in torch.tensor_split(perm, n_mb):
                m = mask[idx]
                with acc.autocast():
                    logprobs, values = self.model(input_ids[idx], attention_mask[idx], P, s.temperature)
                    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs[idx], advantages[idx], m, s.clip_range)
                    vf_loss, vf_clipfrac = value_loss(values, old_values[idx], returns[idx], m, s.clip_range_value)
                    loss = pg_loss + s.vf_coef * vf_loss
                grad_norm = self._backward_and_step(loss)
                stats.append(torch.stack([pg_loss.detach(), clipfrac, approx_kl, vf_loss.detach(), vf_clipfrac, grad_norm.float().reshape(())]))
        self.model.eval()
        stats = torch.stack(stats)

        # 4. metrics: one stacked reduce and one host sync
        with torch.no_grad():
            fmask = mask.float()
            metric_tensors = {
                "reward/raw": raw_scores.mean(),
                "reward/normalised": scores.mean(),
                "reward/total": rewards.sum(1).mean(),
                "kl": log_ratio_ref.sum(1).mean(),
                "kl_penalty": kl.sum(1).mean(),
                "entropy": masked_mean(entropy, mask),
                "policy/loss": stats[:, 0].mean(),
                "policy/clipfrac": stats[:, 1].mean(),
                "policy/approx_kl": stats[:, 2].mean(),
                "policy/approx_kl_first": stats[0, 2],  # before any update: ~0 unless logprobs are inconsistent
                "value/loss": stats[:, 3].mean(),
                "value/clipfrac": stats[:, 4].mean(),
                "value/explained_variance": explained_variance(old_values, returns, mask),
                "grad_norm/policy": stats[:, 5].mean(),
                "response_length": fmask.sum(1).mean(),
                "eos_rate": roll.ended_with_eos.float().mean(),
                "batch_size": torch.tensor(float(B), device=mask.device),
            }
            vec = torch.stack([t.float().reshape(()) for t in metric_tensors.values()])
            if acc.num_processes > 1:
                vec = acc.reduce(vec, reduction="mean")
            metrics = dict(zip(metric_tensors, vec.tolist()))

        step_episodes = round(metrics.pop("batch_size") * acc.num_processes)  # summed over processes
        metrics["kl_coef"] = kl_coef
        self.kl_ctl.update(metrics["kl"], step_episodes)
        self.global_step += 1
        self.episodes += step_episodes
        metrics["episodes"] = self.episodes
        self.last_batch = dict(
            rollout=roll, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=old_values,
            scores=scores, rewards=rewards, advantages=advantages, returns=returns,
        )
        return metrics

    # -- checkpoint state (models/optimizers are saved by the caller via accelerator.save_state) --

    def state_dict(self) -> dict:
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "global_step": self.global_step,
            "episodes": self.episodes,
            "sample_generator": self.sample_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.global_step = int(state["global_step"])
        self.episodes = int(state["episodes"])
        if "sample_generator" in state:
            self.sample_generator.set_state(state["sample_generator"])
            self.shuffle_generator.set_state(state["shuffle_generator"])
