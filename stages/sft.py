"""Supervised fine-tuning stage: chat conversations, loss on assistant tokens only.

    python -m stages.sft recipes/tiny.yaml
    accelerate launch --config_file recipes/accelerate/cpu_zero2.yaml --num_processes 2 -m stages.sft recipes/tiny.yaml

Inputs: `model` (a causal-LM checkpoint folder with its tokenizer, e.g. `pretrain.model`) and `data`
(a dataset with a `messages` column, or prompt/completion columns named by the recipe). Output `model/`:
the fine-tuned checkpoint (safetensors, tokenizer, generation config stopping at the end of a turn).

Our shared loop (pipeline/train/loop.py) instead of TRL's SFTTrainer: TRL's Trainer brings its own
checkpoint layout, resume logic and accelerator set-up, while every stage here shares one contract
(exact resume from `.work/`, atomic publishing, the same DeepSpeed wiring). The data side is
transformers' own: `apply_chat_template(..., return_assistant_tokens_mask=True)`.
"""

from __future__ import annotations

import logging

import torch

from pipeline.data import chat as chat_data
from pipeline.data.sources import load_dataset_input, model_path, require_columns, require_model_kind
from pipeline.recipe.stages import SFTSettings
from pipeline.rl.rollout import generate_answers
from pipeline.runner.stage import StageContext, StageError, stage_main
from pipeline.train.distributed import describe, finish, make_accelerator
from pipeline.train.loop import export_model, sharded_sums, train
from pipeline.train.models import attn_implementation, causal_lm_loss

log = logging.getLogger("pipeline")


def encode_split(part, tokenizer, s) -> list[dict]:
    rows = []
    for row in part:
        messages = chat_data.row_messages(row, s.messages_column, s.prompt_column, s.completion_column)
        encoded = chat_data.encode_conversation(tokenizer, messages, s.max_length)
        if any(label != chat_data.IGNORE_INDEX for label in encoded["labels"][1:]):
            rows.append(encoded)
    return chat_data.pack_rows(rows, s.max_length) if s.packing else rows


def make_masked_evaluator(accelerator, rows: list[dict], collate, micro_batch_size: int, max_batches: int | None):
    """Mean cross-entropy over assistant tokens of the validation conversations."""

    def batch_sums(model, idx: list[int]) -> torch.Tensor:
        batch = {k: v.to(accelerator.device) for k, v in collate([rows[i] for i in idx]).items()}
        _, aux = causal_lm_loss(model, batch)
        count = (batch["labels"][:, 1:] != chat_data.IGNORE_INDEX).sum()
        return torch.stack([aux["ce"].double() * count, count.double()])

    run = sharded_sums(accelerator, len(rows), micro_batch_size, max_batches, 2, batch_sums)

    def evaluate(model) -> dict[str, float]:
        sums = run(model)
        return {"val_loss": float(sums[0] / sums[1].clamp(min=1))}

    return evaluate


def run(ctx: StageContext[SFTSettings]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = ctx.settings
    data = load_dataset_input(ctx.inputs["data"], seed=ctx.seed)
    columns = [s.prompt_column, s.completion_column] if s.prompt_column else [s.messages_column]
    require_columns(data, columns, ctx.inputs["data"])
    source = model_path(ctx.inputs["model"])
    require_model_kind(source, "causal-lm", ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.chat_template is None:
        raise StageError(f"input model: the tokenizer in {source} has no chat template")
    train_rows = encode_split(data["train"], tokenizer, s)
    val_rows = encode_split(data["validation"], tokenizer, s)
    if not train_rows or not val_rows:
        raise StageError(f"input data: no conversation with assistant tokens within max_length={s.max_length}")

    accelerator = make_accelerator(s.grad_accum_steps, ctx.work_dir / "tensorboard",
                                   micro_batch_size=s.micro_batch_size, grad_clip=s.grad_clip)
    accelerator.init_trackers("sft")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                 attn_implementation=attn_implementation(ctx.recipe.model.attention))
    model.config.use_cache = False
    collate = lambda rows: chat_data.right_pad_collate(rows, tokenizer.pad_token_id)  # noqa: E731
    evaluate = make_masked_evaluator(accelerator, val_rows, collate, s.micro_batch_size, s.eval_batches)
    model, summary = train(accelerator, model, train_rows, collate, causal_lm_loss, s, ctx.work_dir,
                           seed=ctx.seed, run_start=ctx.run_start, evaluate=evaluate)
    out_dir = ctx.output_dir("model") if accelerator.is_main_process else None
    export_model(accelerator, model, out_dir, tokenizer, chat_data.stop_token_ids(tokenizer))  # stop at the turn's end

    prompts = [row[s.prompt_column] if s.prompt_column else row[s.messages_column][0]["content"]
               for row in data["validation"].select(range(min(s.sample_prompts, len(data["validation"]))))]
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.config.use_cache = True
    samples = [a[0] for a in generate_answers(unwrapped, tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                                              do_sample=False, device=accelerator.device)]  # greedy
    if accelerator.is_main_process:
        for prompt, response in zip(prompts, samples):
            log.info("sample\n  prompt: %s\n  response: %s", prompt, response)
        ctx.metrics.update(summary, distributed=describe(accelerator), train_conversations=len(train_rows),
                           samples=[{"prompt": p, "response": r} for p, r in zip(prompts, samples)])
    finish(accelerator)


if __name__ == "__main__":
    stage_main("sft", run)
