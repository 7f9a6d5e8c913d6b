"""LLM pipeline: tokenizer -> pretraining -> SFT -> reward model -> PPO."""
