"""Reinforcement learning from a reward model: PPO today (TRL dropped its PPOTrainer).

    from pipeline.rl.ppo_trainer import PPOTrainer
    trainer = PPOTrainer(policy, reference, value, reward_fn, tokenizer, settings, accelerator,
                         policy_optimizer, value_optimizer)
    stats = trainer.step(prompt_ids)           # one rollout, then ppo_epochs of clipped updates

Modules: `ppo_core` (the math: KL-penalised rewards, GAE, whitening, clipped losses, KL controllers),
`rollout` (left-padded, KV-cached sampling and the frozen forwards shared with evaluation),
`ppo_trainer` (one PPO iteration over the four models). Settings: `pipeline.recipe.ppo_settings`.
"""

__all__ = ["ppo_core", "ppo_trainer", "rollout"]
