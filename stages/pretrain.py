"""Pretraining stage: a causal LM from scratch (or continued from a checkpoint) on packed blocks.

    python -m stages.pretrain recipes/tiny.yaml                                   # CPU, one process
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 accelerate launch --config_file recipes/accelerate/cpu_zero2.yaml \
        --num_processes 2 -m stages.pretrain recipes/tiny.yaml                     # CPU, DeepSpeed ZeRO-2
    accelerate launch --config_file accelerate_config.yaml -m stages.pretrain RECIPE.yaml   # 8 GPUs, ZeRO-2, bf16

Inputs: `data` (a `datasets` folder with train/validation splits of packed blocks, see
pipeline/data/packing.py) and `tokenizer`; with `model` (any causal-LM checkpoint) training continues
from it instead of a new model of the recipe's `model` section, and `tokenizer` defaults to its own. Output `model/`: a Hugging Face checkpoint (config,
safetensors, generation config, tokenizer) that loads with `AutoModelForCausalLM.from_pretrained`.
Next to it (copied by pipeline.runner.stage): `metrics.jsonl` (validation loss and bits per byte over
training), `train_log.jsonl` (per-step loss, lr, grad norm) and `tensorboard/`. Checkpoints for
automatic resume live in the stage's work dir; rerunning after a crash continues from the latest.
"""

from __future__ import annotations

import logging

from pipeline.data import packing
from pipeline.data.sources import load_tokenizer_input, model_path, require_model_kind
from pipeline.recipe.config import ConfigError
from pipeline.recipe.stages import PretrainSettings
from pipeline.runner.stage import StageContext, StageError, stage_main
from pipeline.train import distributed, models
from pipeline.train import loop as training

log = logging.getLogger("pipeline")


def load_blocks(path, max_positions: int, where: str):
    """The packed dataset, checked against the model before anything trains."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise StageError(f"input data: {path} is not a saved datasets folder ({e})") from None
    for split in ("train", "validation"):
        if split not in data:
            raise StageError(f"input data: {path} has no {split} split (it has {', '.join(data)})")
        missing = {"input_ids", "position_ids"} - set(data[split].column_names)
        if missing:
            raise StageError(f"input data: split {split} lacks {', '.join(sorted(missing))}: "
                             f"produce it with the prepare stage (pipeline.data.packing.pack_documents)")
        if len(data[split]) == 0:
            raise StageError(f"input data: split {split} has no blocks")
    block_size = len(data["train"][0]["input_ids"]) - 1
    if block_size > max_positions:
        raise ConfigError(f"{where}: {max_positions} positions are fewer than the data's block size "
                          f"{block_size}; lower stages.prepare.block_size" + (" or raise model.max_seq_len"
                                                                             if where.startswith("model.") else ""))
    return data, block_size


def run(ctx: StageContext[PretrainSettings]) -> None:
    import torch
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    s, model_settings = ctx.settings, ctx.recipe.model
    start = ctx.inputs.get("model")  # continued pretraining
    if start is not None:
        from transformers import AutoConfig, AutoTokenizer

        source = model_path(start)
        require_model_kind(source, "causal-lm", start)
        config = AutoConfig.from_pretrained(source)
        tokenizer = (load_tokenizer_input(ctx.inputs["tokenizer"]) if "tokenizer" in ctx.inputs
                     else AutoTokenizer.from_pretrained(source))
        if len(tokenizer) > config.vocab_size:
            raise StageError(f"input model: {start.spec} has {config.vocab_size} embeddings, fewer than the "
                             f"tokenizer's {len(tokenizer)} tokens: they belong to different models")
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        data, block_size = load_blocks(ctx.inputs["data"].path, positions or 1 << 30, f"input model ({start.spec})")
    else:
        tokenizer = load_tokenizer_input(ctx.inputs["tokenizer"])
        data, block_size = load_blocks(ctx.inputs["data"].path, model_settings.max_seq_len, "model.max_seq_len")
    vocab_size = len(tokenizer)
    top = max(max(row) for row in data["train"][: min(64, len(data["train"]))]["input_ids"])
    if top >= vocab_size:
        raise StageError(f"input data: token id {top} >= tokenizer vocabulary {vocab_size}: "
                         f"the dataset was packed with another tokenizer")
    train_data = data["train"].with_format("numpy")
    if s.shift_blocks:
        train_data = packing.ShiftedBlocks(train_data, ctx.seed)
    val_data = data["validation"].with_format("numpy")

    accelerator = distributed.make_accelerator(s.grad_accum_steps, ctx.work_dir / "tensorboard",
                                               micro_batch_size=s.micro_batch_size, grad_clip=s.grad_clip)
    setup = distributed.describe(accelerator)
    log.info("pretraining on %s", setup)
    set_seed(ctx.seed)
    if start is not None:
        model = AutoModelForCausalLM.from_pretrained(model_path(start), dtype=torch.float32,
                                                     attn_implementation=models.attn_implementation(model_settings.attention))
        model.config.use_cache = False
        loss_settings = None  # a MoE checkpoint's own router loss coefficient
    else:
        model = models.build_model(model_settings, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id)
        loss_settings = model_settings
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions
    try:
        flops = models.flops_per_token(model.config, block_size)
    except (AttributeError, TypeError):  # an architecture whose config names its sizes otherwise: no MFU
        flops = None
    accelerator.init_trackers("pretrain")
    evaluate = training.make_lm_evaluator(accelerator, val_data, packing.collate_blocks, s.micro_batch_size,
                                          s.eval_batches, packing.token_byte_lengths(tokenizer))
    model, summary = training.train(
        accelerator, model, train_data, packing.collate_blocks,
        lambda m, batch: models.causal_lm_loss(m, batch, loss_settings),
        s, ctx.work_dir, seed=ctx.seed, run_start=ctx.run_start, evaluate=evaluate,
        flops_per_token=flops,
        peak_flops=models.peak_flops(accelerator.device),
    )
    out = ctx.output_dir("model") if accelerator.is_main_process else None
    training.export_model(accelerator, model, out, tokenizer)
    if accelerator.is_main_process:
        ctx.metrics.update(summary)
        ctx.metrics.update({"parameters": n_params, "block_size": block_size, "distributed": setup})
    distributed.finish(accelerator)


if __name__ == "__main__":
    stage_main("pretrain", run)
