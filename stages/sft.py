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
from pipeline.train.models import add_lora, attn_implementation, causal_lm_loss, parameter_counts

log = logging.getLogger("pipeline")


def data_format(columns: list[str], s: SFTSettings, spec) -> tuple[str, str | None, str | None]:
    """(format, prompt column, completion column) from the settings or the dataset's column names (TRL's):
    conversational `messages`, `prompt` + `completion`, or language-modeling `text`."""
    if s.prompt_column is not None:
        return "prompt-completion", s.prompt_column, s.completion_column
    if s.messages_column in columns:
        return "messages", None, None
    if {"prompt", "completion"} <= set(columns):
        return "prompt-completion", "prompt", "completion"
    if "text" in columns:
        return "text", None, None
    raise StageError(f"input data ({spec.spec}): missing column(s) {s.messages_column}; its columns "
                     f"{', '.join(columns)} match no SFT format (conversational `{s.messages_column}`, "
                     f"`prompt` + `completion`, or `text`); set stages.sft.messages_column or prompt_column and "
                     f"completion_column for other names")


def first_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"])


def encode_split(part, tokenizer, s, fmt: tuple[str, str | None, str | None]) -> list[dict]:
    kind, prompt_column, completion_column = fmt
    rows = []
    for row in part:
        if kind == "text":
            encoded = chat_data.encode_text(tokenizer, row["text"], s.max_length)
        else:
            messages = chat_data.row_messages(row, s.messages_column, prompt_column, completion_column)
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
    data = load_dataset_input(ctx.inputs["data"], seed=ctx.seed, columns=s.columns)
    fmt = data_format(data["train"].column_names, s, ctx.inputs["data"])
    require_columns(data, {"messages": [s.messages_column], "text": ["text"]}.get(fmt[0], list(fmt[1:])),
                    ctx.inputs["data"])
    source = model_path(ctx.inputs["model"])
    require_model_kind(source, "causal-lm", ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if s.chat_template is not None:
        tokenizer.chat_template = s.chat_template
    if tokenizer.chat_template is None and fmt[0] != "text":
        raise StageError(f"input model: the tokenizer in {source} has no chat template; set stages.sft.chat_template")
    grew = chat_data.ensure_pad_token(tokenizer)
    try:
        train_rows = encode_split(data["train"], tokenizer, s, fmt)
        val_rows = encode_split(data["validation"], tokenizer, s, fmt)
    except chat_data.ChatTemplateError as e:
        raise StageError(f"input model: {e}") from None
    if not train_rows or not val_rows:
        raise StageError(f"input data: no example with tokens to learn within max_length={s.max_length}")

    accelerator = make_accelerator(s.grad_accum_steps, ctx.work_dir / "tensorboard",
                                   micro_batch_size=s.micro_batch_size, grad_clip=s.grad_clip)
    accelerator.init_trackers("sft")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                 attn_implementation=attn_implementation(ctx.recipe.model.attention))
    model.config.use_cache = False
    if grew:  # the tokenizer had no pad token and got one (chat_data.ensure_pad_token)
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if s.lora is not None:
        model = add_lora(model, s.lora, "CAUSAL_LM")
    sizes = parameter_counts(model)
    collate = lambda rows: chat_data.right_pad_collate(rows, tokenizer.pad_token_id)  # noqa: E731
    evaluate = make_masked_evaluator(accelerator, val_rows, collate, s.micro_batch_size, s.eval_batches)
    model, summary = train(accelerator, model, train_rows, collate, causal_lm_loss, s, ctx.work_dir,
                           seed=ctx.seed, run_start=ctx.run_start, evaluate=evaluate)
    out_dir = ctx.output_dir("model") if accelerator.is_main_process else None
    export_model(accelerator, model, out_dir, tokenizer, chat_data.stop_token_ids(tokenizer), lora=s.lora)

    rows = data["validation"].select(range(min(s.sample_prompts if fmt[0] != "text" else 0, len(data["validation"]))))
    prompts = [first_user_text(chat_data.row_messages(row, s.messages_column, *fmt[1:])) for row in rows]
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.config.use_cache = True
    samples = [a[0] for a in generate_answers(unwrapped, tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                                              do_sample=False, device=accelerator.device)]  # greedy
    if accelerator.is_main_process:
        for prompt, response in zip(prompts, samples):
            log.info("sample\n  prompt: %s\n  response: %s", prompt, response)
        ctx.metrics.update(summary, **sizes, distributed=describe(accelerator), train_conversations=len(train_rows),
                           samples=[{"prompt": p, "response": r} for p, r in zip(prompts, samples)])
    finish(accelerator)


if __name__ == "__main__":
    stage_main("sft", run)
