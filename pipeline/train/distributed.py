"""All distributed wiring in one place: the Accelerator, launch environment, teardown.

Which backend runs is decided by the accelerate config the stage was launched with
(`accelerate launch --config_file recipes/accelerate/cpu_zero2.yaml ...` or the root
`accelerate_config.yaml` for 8 GPUs), never by model or training code. This module only adapts the
pieces that must agree with the recipe:

* CPU: gloo process group (without it every DeepSpeed rank thinks it is alone), fp32, and a
  heap that keeps freed memory (`keep_freed_memory`).
* CUDA: bf16 unless the accelerate config names another mixed precision.
* DeepSpeed: micro batch size, gradient accumulation and gradient clipping come from the recipe;
  a different explicit value in the accelerate config is overridden with a warning, so the loss
  curve of a recipe does not depend on which hardware config launched it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pipeline.recipe.stages import is_deepspeed_config

log = logging.getLogger(__name__)

TORCH_EXTENSIONS_CACHE = Path("~/.cache/llm-pipeline/torch_extensions")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _launched_distributed() -> bool:
    # under a launcher (torchrun/accelerate/deepspeed set WORLD_SIZE) gloo must be forced; a plain
    # `python` process given a backend would wait for a process group nobody starts
    return "WORLD_SIZE" in os.environ or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of handing it back to the kernel.

    With the defaults, each step's activations and logits (MBs each) are served by fresh mmaps or
    a heap that is trimmed when they are freed, so every step page-faults its memory in again
    (a 2 x 160 Llama on 1536 tokens: ~4,000 faults and ~5% of each step in the pipeline, 12-20% in
    a bare process). The cost is that the process's resident size stays at its peak. Blocks above 32 MB (glibc's
    own ceiling for the threshold) are still mmapped. Returns whether it applied (not glibc:
    nothing happens).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024))


def make_accelerator(
    grad_accum_steps: int,
    log_dir: Path | None,
    *,
    micro_batch_size: int = 1,
    grad_clip: float | None = None,
):
    """An `Accelerator` set up for this machine and the recipe's batch shape.

    `log_dir` enables TensorBoard (runs under `log_dir/<project>`); None disables tracking.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if _cuda():
        # the accelerate config (ACCELERATE_MIXED_PRECISION) wins; bf16 otherwise
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION") or "bf16"
    else:
        keep_freed_memory()
        if _launched_distributed():
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        mixed = "no"  # bf16 autocast on CPU is slow and changes the numbers tests compare
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=grad_accum_steps,
        kwargs_handlers=handlers,
        log_with="tensorboard" if log_dir is not None else None,
        project_dir=str(log_dir) if log_dir is not None else None,
    )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and accelerator.state.deepspeed_plugin is None:
        # e.g. ACCELERATE_USE_CPU=true turns a DeepSpeed launch into plain DDP without a word
        raise RuntimeError(f"launched with a DeepSpeed accelerate config but running {accelerator.distributed_type}: "
                           f"unset ACCELERATE_USE_CPU (it is only for plain DDP on CPU)")
    # ACCELERATE_GRADIENT_ACCUMULATION_STEPS from a launch config would beat the constructor argument
    accelerator.gradient_accumulation_steps = grad_accum_steps
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        wanted = {"gradient_accumulation_steps": grad_accum_steps, "train_micro_batch_size_per_gpu": micro_batch_size}
        if grad_clip is not None:
            wanted["gradient_clipping"] = grad_clip
        for key, value in wanted.items():
            old = ds.get(key, "auto")
            if old not in ("auto", value) and accelerator.is_main_process:
                log.warning("deepspeed %s=%s from the accelerate config overridden by the recipe: %s", key, old, value)
            ds[key] = value
        ds["train_batch_size"] = micro_batch_size * grad_accum_steps * accelerator.num_processes
        plugin.gradient_accumulation_steps = grad_accum_steps
        if grad_clip is not None:
            plugin.gradient_clipping = grad_clip
    return accelerator


def launch_env(num_processes: int, config_file: str | Path | None,
               environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables to add when launching a stage with `num_processes` processes here.

    `config_file`: the accelerate config used (None: plain DDP via `--multi_gpu`); a non-DeepSpeed
    multi-process launch on a machine without CUDA needs ACCELERATE_USE_CPU=true. Variables already
    present in `environ` (default `os.environ`) are left as they are.
    """
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    if "TORCH_EXTENSIONS_DIR" not in environ:
        # DeepSpeed JIT-compiles ops (shm_comm ~40 s) on first use: compile once per machine
        env["TORCH_EXTENSIONS_DIR"] = str(TORCH_EXTENSIONS_CACHE.expanduser())
    if not _cuda():
        if "DS_ACCELERATOR" not in environ:
            env["DS_ACCELERATOR"] = "cpu"
        if "OMP_NUM_THREADS" not in environ:
            # processes sharing the cores oversubscribe badly otherwise
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, num_processes)))
        deepspeed = config_file is not None and is_deepspeed_config(config_file)
        if num_processes > 1 and not deepspeed and "ACCELERATE_USE_CPU" not in environ:
            env["ACCELERATE_USE_CPU"] = "true"  # plain DDP on CPU (`accelerate launch --multi_gpu`)
    return env


def finish(accelerator) -> None:
    """End a distributed run cleanly: barrier, then destroy the process group.

    Without the explicit destroy about a third of multi-process runs abort at interpreter exit.
    """
    import torch.distributed as dist

    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def uses_deepspeed(accelerator) -> bool:
    """Whether this run's accelerator is DeepSpeed (ZeRO steps its own flat optimizer partitions)."""
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int | None:
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.zero_stage)


def checkpoint_topology(accelerator) -> dict[str, Any]:
    """What a checkpoint's layout depends on: recorded in trainer_state.json, compared on resume."""
    return {"world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator)}


def deepspeed_tags(accelerator) -> list[tuple[str, Any]]:
    """(tag, engine) of every DeepSpeed engine `accelerator.save_state` wrote: `pytorch_model`, `pytorch_model_1`, ...

    Engines without an optimizer (frozen models) are left out: they are rebuilt from their source, not resumed.
    """
    return [("pytorch_model" if i == 0 else f"pytorch_model_{i}", engine)
            for i, engine in enumerate(accelerator._models) if getattr(engine, "optimizer", None) is not None]


def convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed checkpoint folder `src` (one tag of save_state) -> universal checkpoint `dst`.

    Runs `deepspeed.checkpoint.ds_to_universal` in a child process (it forks worker pools, which a
    process holding a process group should not do). Written to `dst.tmp` then renamed, so a crash
    never leaves a half-converted folder that looks complete.
    """
    import shutil
    import subprocess
    import sys

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", "2", "--num_merge_workers", "1",
           "--inject_missing_state"]  # plain (non-Megatron) models carry no universal_checkpoint_info
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {src} to a universal checkpoint failed:\n$ {' '.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # we always load by tag
    tmp.rename(dst)


def load_universal(engine, root: Path, tag: str) -> None:
    """Load universal checkpoint `root/tag` into a DeepSpeed engine of any world size and ZeRO stage.

    DeepSpeed reads the switch from its config (`checkpoint.load_universal`), fixed when the engine
    was built; it is only consulted while loading, so it is turned on for this call alone.
    """
    import torch

    inner = engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO wrapper
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(root), tag, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise RuntimeError(f"DeepSpeed found no universal checkpoint {tag} in {root}")
    # DeepSpeed 0.19's ZeRO-3 universal load gives every param group the hyperparameters of group 0
    # (weight decay on norms and embeddings) and one shared `step` tensor to every state (bumped once
    # per group per step, so Adam's bias correction runs ahead); both change the loss curve
    for group, saved in zip(inner.param_groups, hyper):
        group.update(saved)  # the recipe's values; the lr is set again every step
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def describe(accelerator) -> dict[str, Any]:
    """Facts about the running setup, for manifests and test assertions."""
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "device": str(accelerator.device),
        "mixed_precision": str(accelerator.mixed_precision),
        "zero_stage": zero_stage(accelerator),
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
    }
