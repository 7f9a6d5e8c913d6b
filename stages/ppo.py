"""PPO stage: RLHF of the SFT policy against the reward model (TRL no longer has a PPO trainer).

    python -m stages.ppo recipes/tiny.yaml
    accelerate launch --config_file recipes/accelerate/cpu_zero2.yaml --num_processes 2 -m stages.ppo recipes/tiny.yaml

Inputs: `policy` (a causal-LM checkpoint, e.g. `sft.model`), `reward` (a sequence-classification reward
model, e.g. `reward.model`), `prompts` (a dataset with a `prompt` column; its train split is used), and
optionally `value` (default: the reward model, as InstructGPT does) and `reference` (default: the policy's
starting checkpoint). Works on any such folders, so a recipe holding only this stage runs on models
trained elsewhere. Outputs: `model/` (the policy, loads with AutoModelForCausalLM) and `value/`.

The algorithm is pipeline/rl/ppo_trainer.py; this module adds the loop: prompts in a seeded order, metrics to
`train_log.jsonl`/TensorBoard/progress bar, and resumable checkpoints (models, optimizers, KL controller,
RNG and data position) in the stage's work dir — the same checkpoint helpers as every training stage.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline.data import chat as chat_data
from pipeline.data.sources import (
    load_dataset_input,
    model_path,
    require_columns,
    require_model_kind,
    require_same_tokenizer,
)
from pipeline.recipe.ppo_settings import PPOSettings
from pipeline.recipe.stages import PPOStageSettings
from pipeline.rl.ppo_trainer import PPOTrainer, prepare_frozen
from pipeline.rl.rollout import reward_model_scores
from pipeline.runner.artifacts import read_jsonl
from pipeline.runner.stage import StageContext, StageError, stage_main
from pipeline.train.distributed import describe, finish, make_accelerator
from pipeline.train.loop import StepResult, run_loop, write_generation_config
from pipeline.train.models import attn_implementation

log = logging.getLogger("pipeline")


def reward_normalisation(ctx: StageContext, reward_dir: str) -> tuple[float, float]:
    s = ctx.settings
    stats_file = Path(reward_dir) / "reward_stats.json"
    if not s.normalize_rewards:
        return s.reward_mean, s.reward_std
    if not stats_file.is_file():
        raise StageError(f"input reward: {stats_file} is missing; train the reward model with the reward stage, "
                         f"or set stages.ppo.normalize_rewards: false and give reward_mean/reward_std")
    stats = json.loads(stats_file.read_text())
    return float(stats["mean"]), max(float(stats["std"]), 1e-6)


def load_models(ctx: StageContext, attn: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def causal(spec):
        require_model_kind(model_path(spec), "causal-lm", spec)
        return AutoModelForCausalLM.from_pretrained(model_path(spec), dtype=torch.float32, attn_implementation=attn)

    def scalar(spec):
        require_model_kind(model_path(spec), "sequence-classification", spec)
        model = AutoModelForSequenceClassification.from_pretrained(model_path(spec), dtype=torch.float32,
                                                                   attn_implementation=attn)
        if model.config.num_labels != 1:
            raise StageError(f"input {spec.name}: {spec.spec} has {model.config.num_labels} labels; a reward or "
                             f"value model has exactly one")
        return model

    inputs = ctx.inputs
    policy = causal(inputs["policy"])
    reference = causal(inputs.get("reference", inputs["policy"]))
    value = scalar(inputs.get("value", inputs["reward"]))
    reward = scalar(inputs["reward"])
    for m in (policy, reference, value, reward):
        m.config.use_cache = False
    return policy, reference, value, reward


def export(accelerator, trainer, tokenizer, ctx: StageContext) -> None:
    """The policy and the value model as two standalone checkpoints (collective under ZeRO-3)."""
    state = accelerator.get_state_dict(trainer.model)
    if not accelerator.is_main_process:
        return
    unwrapped = trainer.unwrapped
    for output, prefix, module in (("model", "policy.", unwrapped.policy), ("value", "value_model.", unwrapped.value_model)):
        out = ctx.output_dir(output)
        module.config.use_cache = True
        module.save_pretrained(out, state_dict={k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        tokenizer.save_pretrained(out)
    write_generation_config(ctx.output_dir("model"), tokenizer.bos_token_id, tokenizer.pad_token_id,
                            chat_data.stop_token_ids(tokenizer))


def run(ctx: StageContext[PPOStageSettings]) -> None:
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    s = ctx.settings
    data = load_dataset_input(ctx.inputs["prompts"], seed=ctx.seed, columns=s.columns)
    require_columns(data, [s.prompt_column], ctx.inputs["prompts"])
    tokenizer = AutoTokenizer.from_pretrained(model_path(ctx.inputs["policy"]))
    require_same_tokenizer(ctx.inputs, ["reference", "value", "reward"], "policy")
    if tokenizer.chat_template is None:
        raise StageError(f"input policy: the tokenizer of {ctx.inputs['policy'].spec} has no chat template")
    prompts = [chat_data.prompt_ids(tokenizer, p)[-s.max_prompt_length:] for p in data["train"][s.prompt_column]]
    mean, std = reward_normalisation(ctx, model_path(ctx.inputs["reward"]))

    accelerator = make_accelerator(1, ctx.work_dir / "tensorboard", micro_batch_size=s.batch_size)
    accelerator.init_trackers("ppo")
    set_seed(ctx.seed)
    policy, reference, value, reward = load_models(ctx, attn_implementation(ctx.recipe.model.attention))
    algo = {f: getattr(s, f) for f in PPOSettings.__dataclass_fields__}
    algo.update(reward_mean=mean, reward_std=std)
    optim = lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay, eps=1e-5)  # noqa: E731
    trainer = PPOTrainer(policy, reference, value, None, SimpleNamespace(
        pad_token_id=chat_data.pad_id(tokenizer),
        eos_token_id=chat_data.stop_token_ids(tokenizer, policy.generation_config.eos_token_id)),
        PPOSettings(**algo), accelerator, optim(policy.parameters(), s.learning_rate),
        optim(value.parameters(), s.value_learning_rate or s.learning_rate), seed=ctx.seed)
    reward = prepare_frozen(reward, accelerator)
    trainer.reward_fn = lambda ids, mask: reward_model_scores(reward, ids, mask)
    accelerator.register_for_checkpointing(trainer)  # KL controller, counters, sampling RNG

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = s.batch_size * world
    if len(prompts) < global_batch:
        raise StageError(f"input prompts: {len(prompts)} prompts, fewer than one batch of {global_batch}")

    def ppo_step(state, indices, time_fraction) -> StepResult:  # one rollout, then ppo_epochs of updates
        mine = indices[rank * s.batch_size:(rank + 1) * s.batch_size]
        metrics = trainer.step([prompts[int(i)] for i in mine])
        return StepResult(tokens=int(metrics["response_length"] * global_batch),
                          row={**metrics, "elapsed_s": round(time.time() - ctx.run_start, 3)},
                          scalars={f"ppo/{k}": v for k, v in metrics.items()},
                          postfix={"reward": f"{metrics['reward/raw']:.3f}", "kl": f"{metrics['kl']:.3f}",
                                   "len": f"{metrics['response_length']:.1f}"})

    state, summary = run_loop(accelerator, trainer.model, ppo_step, s, ctx.work_dir, seed=ctx.seed,
                              n_examples=len(prompts), global_batch=global_batch, run_start=ctx.run_start,
                              desc="ppo", prefix="ppo/")
    export(accelerator, trainer, tokenizer, ctx)
    if accelerator.is_main_process:
        seconds, first_step = summary["train_seconds"], summary["resumed_from_step"]
        episodes = (state.step - first_step) * global_batch
        rows = read_jsonl(ctx.work_dir / "train_log.jsonl")
        first, last = rows[0], rows[-1]
        ctx.metrics.update(
            steps=state.step, resumed_from_step=first_step, episodes=state.step * global_batch,
            episodes_per_s=round(episodes / seconds, 2) if episodes else None, train_seconds=round(seconds, 2),
            reward_mean=mean, reward_std=std, distributed=describe(accelerator),
            first_reward_raw=first["reward/raw"], final_reward_raw=last["reward/raw"], final_kl=last["kl"],
            final_response_length=last["response_length"], final_eos_rate=last["eos_rate"],
            stopped_by_time_budget=summary["stopped_by_time_budget"],
        )
    finish(accelerator)


if __name__ == "__main__":
    stage_main("ppo", run)
