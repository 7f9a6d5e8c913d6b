"""Reward-model stage: a scalar head on the SFT model, trained with the Bradley–Terry loss.

    python -m stages.reward recipes/tiny.yaml
    accelerate launch --config_file recipes/accelerate/cpu_zero2.yaml --num_processes 2 -m stages.reward recipes/tiny.yaml

Inputs: `model` (the SFT checkpoint) and `data` (pairs, K-wise rankings or ratings; see
pipeline/data/preferences.py). Output `model/`: an `AutoModelForSequenceClassification` checkpoint with one
label, whose score is read at the last non-pad token of `prompt + response + <|end|>` (the layout PPO
rollouts have), plus `reward_stats.json`: mean and std of its scores on held-out responses, which PPO
uses to normalise rewards.

Our shared loop, not TRL's RewardTrainer: K-wise rankings train all K·(K−1)/2 pairs of a prompt
together, one forward per response (RewardTrainer takes chosen/rejected pairs only), and every stage
keeps one resume/publish contract.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F

from pipeline.data import chat as chat_data
from pipeline.data.preferences import FORMAT_COLUMNS, detect_format, to_groups
from pipeline.data.sources import load_dataset_input, model_path, require_columns
from pipeline.recipe.stages import RewardSettings
from pipeline.runner.stage import StageContext, StageError, stage_main
from pipeline.train.distributed import describe, finish, make_accelerator
from pipeline.train.loop import export_model, sharded_sums, train
from pipeline.train.models import add_lora, attn_implementation, parameter_counts

log = logging.getLogger("pipeline")


def encode_groups(groups: list[dict], tokenizer, max_length: int) -> list[dict]:
    return [{"ids": [chat_data.encode_scored(tokenizer, g["prompt"], r, max_length) for r in g["responses"]],
             "pairs": g["pairs"]} for g in groups]


def collate_groups(groups: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """All responses of the groups in one right-padded batch, and the pairs as indices into it.

    `pair_weight` makes each group count once, whatever its number of pairs (InstructGPT).
    """
    seqs, better, worse, margin, weight = [], [], [], [], []
    for g in groups:
        base = len(seqs)
        seqs += g["ids"]
        for i, j, m in g["pairs"]:
            better.append(base + i)
            worse.append(base + j)
            margin.append(m)
            weight.append(1.0 / (len(g["pairs"]) * len(groups)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    return {"input_ids": ids, "better": torch.tensor(better), "worse": torch.tensor(worse),
            "margin": torch.tensor(margin, dtype=torch.float32), "pair_weight": torch.tensor(weight)}


def scores(model, input_ids: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence, read at the last non-pad token (right padding, causal attention)."""
    return model(input_ids=input_ids, use_cache=False).logits.squeeze(-1).float()


def bradley_terry_loss(model, batch: dict, use_margin: bool) -> tuple[torch.Tensor, dict]:
    r = scores(model, batch["input_ids"])
    diff = r[batch["better"]] - r[batch["worse"]]
    if use_margin:
        diff = diff - batch["margin"]
    loss = -(F.logsigmoid(diff) * batch["pair_weight"]).sum()
    accuracy = ((diff > 0).float() * batch["pair_weight"]).sum()
    return loss, {"accuracy": accuracy.detach(), "reward_mean": r.mean().detach()}


def make_reward_evaluator(accelerator, groups: list[dict], pad_id: int, micro_batch_size: int, max_batches: int | None):
    """Held-out pairwise accuracy (every pair counts once) and the mean/std of all held-out scores."""

    def batch_sums(model, idx: list[int]) -> torch.Tensor:  # correct, pairs, s, s², n, loss
        batch = {k: v.to(accelerator.device) for k, v in collate_groups([groups[i] for i in idx], pad_id).items()}
        r = scores(model, batch["input_ids"]).double()
        diff = r[batch["better"]] - r[batch["worse"]]
        return torch.stack([(diff > 0).double().sum(), torch.tensor(float(diff.numel()), device=r.device),
                            r.sum(), (r * r).sum(), torch.tensor(float(r.numel()), device=r.device),
                            -F.logsigmoid(diff).sum()])

    run = sharded_sums(accelerator, len(groups), micro_batch_size, max_batches, 6, batch_sums)

    def evaluate(model) -> dict[str, float]:
        sums = run(model)
        mean = sums[2] / sums[4]
        std = (sums[3] / sums[4] - mean * mean).clamp(min=0).sqrt()
        return {"val_accuracy": float(sums[0] / sums[1]), "val_loss": float(sums[5] / sums[1]),
                "reward_mean": float(mean), "reward_std": float(std)}

    return evaluate


def load_groups(ctx: StageContext):
    s = ctx.settings
    spec = ctx.inputs["data"]
    data = load_dataset_input(spec, seed=ctx.seed, columns=s.columns)
    fmt = s.format
    if fmt == "auto":
        fmt = detect_format(data["train"].column_names)
        if fmt is None:
            raise StageError(f"input data ({spec.spec}): columns {', '.join(data['train'].column_names)} match no "
                             f"preference format; expected one of " +
                             "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMAT_COLUMNS.items()))
    require_columns(data, list(FORMAT_COLUMNS[fmt]), spec)
    out = {}
    for split in ("train", "validation"):
        groups, stats = to_groups(data[split], fmt, s.min_rating_gap)
        if not groups:
            raise StageError(f"input data ({spec.spec}), split {split}: no comparison left ({stats})")
        out[split] = (groups, stats)
    return fmt, out


def run(ctx: StageContext[RewardSettings]) -> None:
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    s = ctx.settings
    fmt, split_groups = load_groups(ctx)
    source = model_path(ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if s.chat_template is not None:
        tokenizer.chat_template = s.chat_template
    if tokenizer.chat_template is None:
        raise StageError(f"input model: the tokenizer in {source} has no chat template; set stages.reward.chat_template")
    # never pad = eos: the model reads its score at the last non-pad token, and a scored sequence ends with
    # the end-of-turn token, often eos itself (chat_data.ensure_pad_token)
    grew = chat_data.ensure_pad_token(tokenizer, scored=True)
    train_groups = encode_groups(split_groups["train"][0], tokenizer, s.max_length)
    val_groups = encode_groups(split_groups["validation"][0], tokenizer, s.max_length)

    accelerator = make_accelerator(s.grad_accum_steps, ctx.work_dir / "tensorboard",
                                   micro_batch_size=s.micro_batch_size, grad_clip=s.grad_clip)
    accelerator.init_trackers("reward")
    config = AutoConfig.from_pretrained(source)
    config.num_labels = 1  # from_config/from_pretrained(num_labels=1) alone raises in transformers 5
    config.pad_token_id = None if grew else tokenizer.pad_token_id  # a new pad id is set after the resize
    config.use_cache = False
    set_seed(ctx.seed)  # the new score head is drawn from the global generator
    model = AutoModelForSequenceClassification.from_pretrained(
        source, config=config, dtype=torch.float32, attn_implementation=attn_implementation(ctx.recipe.model.attention))
    if grew:
        model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    if s.lora is not None:
        model = add_lora(model, s.lora, "SEQ_CLS")
    sizes = parameter_counts(model)
    pad = tokenizer.pad_token_id
    evaluate = make_reward_evaluator(accelerator, val_groups, pad, s.micro_batch_size, s.eval_batches)
    model, summary = train(
        accelerator, model, train_groups, lambda groups: collate_groups(groups, pad),
        lambda m, batch: bradley_terry_loss(m, batch, s.use_margin), s, ctx.work_dir,
        seed=ctx.seed, run_start=ctx.run_start, evaluate=evaluate,
        count_tokens=lambda batch: int((batch["input_ids"] != pad).sum()),
    )
    out_dir = ctx.output_dir("model") if accelerator.is_main_process else None
    export_model(accelerator, model, out_dir, tokenizer, lora=s.lora)
    if accelerator.is_main_process:
        stats = {"mean": summary["final_reward_mean"], "std": summary["final_reward_std"],
                 "measured_on": "all responses of the held-out preference split"}
        (out_dir / "reward_stats.json").write_text(json.dumps(stats, indent=1))
        ctx.metrics.update(summary, **sizes, format=fmt, distributed=describe(accelerator),
                           data={k: v[1] for k, v in split_groups.items()})
        log.info("held-out pairwise accuracy %.3f; scores mean %.3f std %.3f", summary["final_val_accuracy"],
                 stats["mean"], stats["std"])
    finish(accelerator)


if __name__ == "__main__":
    stage_main("reward", run)
