"""LLM pipeline: tokenizer -> pretraining -> SFT -> reward model -> PPO.

Packages, by concern (each package's docstring says how to use it):

    recipe/    recipe YAML -> typed settings (strict, no torch): schema, shared settings, stage settings
    runner/    plan and run a recipe: stage processes, fingerprints and atomic publishing, the report
    data/      corpora, dataset inputs, packing, chat rendering, preference formats, contamination
    train/     the shared training loop, optimizers, model building, distributed wiring
    rl/        reinforcement learning from a reward model (PPO)
    hub/       pushing artifacts to a model hub, model and dataset cards
    labeling/  the labeling page and its store: people rank or rate samples, exported as datasets
    task/      the default task (edit a sentence under constraints) and its programmatic judge

Command line: `python -m pipeline --help`. The stages themselves live in the top-level `stages/` package.
"""

__all__ = ["data", "hub", "labeling", "recipe", "rl", "runner", "task", "train"]
