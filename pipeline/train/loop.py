"""The one training loop: optimizer, schedule, accumulation, eval, logging, checkpoints, resume.

`run_loop` is the skeleton every training stage runs (resume; then per step: the stage's step, record,
evaluate, checkpoint; then the summary). Pretrain, SFT and the reward model call `train`, which builds
the optimizer and the supervised step (`lm_step`) from a `loss_fn(model, batch) -> (loss, aux)`
(pretraining: `pipeline.train.models.causal_lm_loss`); PPO passes its own step (one rollout and its
updates, stages/ppo.py). Everything else lives here:

* AdamW (or Muon for hidden matrices, `optimizer: muon`); weight decay only on matrices (biases,
  norms and embeddings are not decayed); the input embedding may get its own rate (embedding_lr_scale).
* LR schedule `lr_multiplier(step)`: warmup then cosine / warmup-stable-decay / constant. It is a
  pure function of the step, set on the optimizer every step: nothing to checkpoint, identical
  under DDP and DeepSpeed. With `max_train_seconds` it also follows the time spent (rank 0's clock,
  saved with each checkpoint), and training stops when the budget is.
* Data order: a permutation drawn from (seed, epoch); each optimizer step consumes the next
  `micro_batch_size * grad_accum_steps * num_processes` examples; a partial global batch at the end
  of an epoch is skipped. The position (epoch, offset) is saved with every checkpoint, so a
  resumed run sees exactly the batches an uninterrupted run would.
* Checkpoints: `accelerator.save_state` into `work_dir/checkpoints/step-000123.tmp`, then
  `trainer_state.json`, then a rename to `step-000123` (the rename is the commit; a `.tmp` left by a
  crash is deleted on the next start). Keeps the last `keep_checkpoints`. Resume is automatic from
  the latest complete one. Assumes a filesystem shared by all nodes. `trainer_state.json` records
  the world size and ZeRO stage; a checkpoint from another world size (more or fewer nodes) resumes
  through a DeepSpeed universal checkpoint (DDP/single-process states load as they are), see
  `resume_latest` and docs/multinode.md.
* Outputs in `work_dir`: `train_log.jsonl` (one line per optimizer step: loss, lr, grad norm,
  tokens), `metrics.jsonl` (one line per evaluation: step, tokens, the eval metrics, elapsed_s since
  the pipeline run started), TensorBoard events under `work_dir/tensorboard` (from the accelerator).
  Lines for steps after the resumed checkpoint are dropped on resume, so the files always describe
  a single run.
* A non-finite loss (on any rank) or gradient norm raises `NonFiniteLossError` naming the step
  before the optimizer applies it (under DeepSpeed the step runs inside backward, so a bad gradient
  is caught after it); no checkpoint is written after it, so the last good one stays the latest.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from pipeline.data.chat import IGNORE_INDEX
from pipeline.data.packing import read_rows
from pipeline.errors import StageError
from pipeline.recipe.settings import LoraSettings, TrainSettings, muon_under_deepspeed
from pipeline.train import distributed
from pipeline.train.models import merge_lora_state_dict, transposed_modules

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"


class NonFiniteLossError(StageError):
    """The training loss (or a logged metric) became NaN or infinite."""


# --- optimizer and schedule ---

def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions parameters at construction


def build_optimizer(model, settings: TrainSettings, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, or Muon for the hidden weight matrices (settings.optimizer); weight decay only on matrices.

    Embeddings, the output head, biases, norms and >2-D tensors (stacked MoE experts) always go to
    AdamW (Muon orthogonalises whole 2-D updates, which is meaningless for lookup tables and 1-D gains).
    `fused`: torch's fused AdamW kernel (CPU and CUDA); on CPU torch otherwise picks its one-tensor-at-
    a-time loop, 5x slower (2.4 ms against 0.5 ms per step for a 4 x 128 model).
    """
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            embeddings.add(id(module.weight))
    input_embedding = getattr(getattr(model, "get_input_embeddings", lambda: None)(), "weight", None)
    scaled = input_embedding if settings.embedding_lr_scale != 1.0 else None
    matrices, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad or p is scaled:
            continue
        if len(_shape(p)) < 2 or id(p) in embeddings:
            no_decay.append(p)
        elif settings.optimizer == "muon" and len(_shape(p)) == 2:
            matrices.append(p)
        else:
            decay.append(p)
    adamw_groups = [g for g in ({"params": decay, "weight_decay": settings.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if scaled is not None and scaled.requires_grad:  # the loop sets lr = schedule * lr_scale per group
        adamw_groups.append({"params": [scaled], "weight_decay": 0.0, "lr_scale": settings.embedding_lr_scale})
    betas = (settings.beta1, settings.beta2)
    if settings.optimizer == "muon":
        from pipeline.train.muon import MuonWithAdamW

        return MuonWithAdamW(matrices, adamw_groups, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                             betas=betas, momentum=settings.muon_momentum, fused=fused)
    return torch.optim.AdamW(adamw_groups, lr=settings.learning_rate, betas=betas, eps=1e-8, fused=fused or None)


def lr_multiplier(step: int, settings: TrainSettings, time_fraction: float = 0.0) -> float:
    """Factor on learning_rate for optimizer step `step` (0-based).

    `time_fraction`: the share of max_train_seconds already spent; with a time budget the schedule
    runs on whichever of steps and time is further along, so the decay ends when the budget does.
    """
    total, warmup, floor = settings.max_steps, settings.warmup_steps, settings.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if settings.schedule == "constant":
        return 1.0
    if settings.schedule == "cosine":
        progress = max(min(1.0, (step - warmup) / max(1, total - warmup)), min(1.0, time_fraction))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable, then linear decay to floor over the last decay_fraction of the run
    decay_steps = max(1, round(settings.decay_fraction * total))
    decay_start = max(warmup, total - decay_steps)
    progress = 0.0
    if step >= decay_start:
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    if settings.decay_fraction > 0:
        progress = max(progress, min(1.0, (time_fraction - 1 + settings.decay_fraction) / settings.decay_fraction))
    return 1.0 + (floor - 1.0) * progress


# --- data order ---

def _rows(data, indices: list[int], epoch: int = 0) -> list:
    """The examples at `indices`; data that reads differently per epoch (packing.ShiftedBlocks) is asked so."""
    by_epoch = getattr(data, "rows_for_epoch", None)
    return by_epoch(indices, epoch) if by_epoch is not None else read_rows(data, indices)


@dataclass
class TrainerState:
    """Where a run is; saved with every checkpoint (trainer_state.json)."""

    step: int = 0
    """optimizer steps done"""
    epoch: int = 0
    offset: int = 0
    """examples of this epoch's permutation already consumed (globally, all ranks)"""
    tokens: int = 0
    """target tokens trained on so far, all ranks"""
    train_seconds: float = 0.0
    """wall-clock seconds spent in the loop, over all attempts (for max_train_seconds)"""


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def next_global_batch(state: TrainerState, seed: int, n: int, global_batch: int) -> tuple[torch.Tensor, TrainerState]:
    """Indices of the next global batch and the position after it."""
    epoch, offset = state.epoch, state.offset
    if offset + global_batch > n:
        epoch, offset = epoch + 1, 0
    indices = epoch_order(seed, epoch, n)[offset:offset + global_batch]
    return indices, replace(state, epoch=epoch, offset=offset + global_batch)


# --- checkpoints ---

def checkpoint_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "checkpoints"


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(work_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, state: TrainerState, work_dir: Path, keep: int) -> Path:
    root = checkpoint_dir(work_dir)
    final = root / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        saved = {**asdict(state), **distributed.checkpoint_topology(accelerator)}
        (tmp / STATE_FILE).write_text(json.dumps(saved, indent=1))
        if final.exists():  # same step saved by an earlier attempt
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(work_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_latest(accelerator, work_dir: Path) -> TrainerState:
    """Load the latest complete checkpoint (if any) into the prepared objects; drop stale `.tmp` dirs.

    A checkpoint saved at another world size (more or fewer nodes) or ZeRO stage still resumes:
    DeepSpeed's partitioned optimizer states are converted once to a universal checkpoint inside the
    checkpoint folder (`universal/`) and loaded resharded; DDP and single-process states hold full
    tensors and load as they are (only the per-rank RNG files do not match, and nothing here draws
    from them). The data position counts examples, so the batches continue where they stopped.
    """
    root = checkpoint_dir(work_dir)
    if accelerator.is_main_process and root.is_dir():
        for p in root.glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    found = list_checkpoints(work_dir)
    if not found:
        return TrainerState()
    latest = found[-1]
    saved = json.loads((latest / STATE_FILE).read_text())
    state = TrainerState(**{f.name: saved[f.name] for f in fields(TrainerState) if f.name in saved})
    now = distributed.checkpoint_topology(accelerator)
    was = {k: saved.get(k, now[k]) for k in now}  # checkpoints from before the topology was recorded
    if was == now:
        accelerator.load_state(str(latest))
        return state
    say = f"checkpoint {latest.name} was saved by {was['world_size']} process(es) (zero_stage {was['zero_stage']}), " \
          f"resuming with {now['world_size']} (zero_stage {now['zero_stage']}):"
    if (was["zero_stage"] is None) != (now["zero_stage"] is None):
        raise RuntimeError(f"{say} a {'DeepSpeed' if was['zero_stage'] is not None else 'DDP/single-process'} "
                           f"checkpoint cannot be loaded by a {'DeepSpeed' if now['zero_stage'] is not None else 'non-DeepSpeed'} "
                           f"run; resume with the accelerate config it was saved with")
    if now["zero_stage"] is None:
        if accelerator.is_main_process:
            print(f"{say} full model and optimizer states, loaded as they are")
        accelerator.load_state(str(latest))
        return state
    universal = latest / "universal"
    tags = distributed.deepspeed_tags(accelerator)
    if accelerator.is_main_process:
        print(f"{say} loading it as a DeepSpeed universal checkpoint from {universal}")
        for tag, _ in tags:
            if not (universal / tag).is_dir():
                start = time.time()
                distributed.convert_to_universal(latest / tag, universal / tag)
                print(f"converted {latest / tag} to a universal checkpoint in {time.time() - start:.1f} s")
    accelerator.wait_for_everyone()
    for tag, engine in tags:
        distributed.load_universal(engine, universal, tag)
    return state


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines for steps after `max_step` (written by an attempt that died before its next checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    path.write_text("".join(line + "\n" for line in keep))


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


# --- the loop ---

def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scalar_logs(prefix: str, aux: dict) -> dict[str, float]:
    out = {}
    for key, value in aux.items():
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            # e.g. expert_load [layers, experts]: a collapsed router shows as max -> 1, min -> 0
            rows = value.reshape(value.shape[0], -1) if value.dim() > 1 else value[None]
            for i, row in enumerate(rows.cpu()):
                if row.numel() <= 16:
                    out.update({f"{prefix}{key}/layer{i}/{j}": float(x) for j, x in enumerate(row)})
                out[f"{prefix}{key}/layer{i}_max"] = float(row.max())
                out[f"{prefix}{key}/layer{i}_min"] = float(row.min())
        else:
            out[f"{prefix}{key}"] = float(value)
    return out


def default_token_count(batch: dict) -> int:
    """Target tokens in a packed LM batch ([B, T+1] blocks predict T tokens each)."""
    ids = batch["input_ids"]
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return ids.shape[0] * (ids.shape[1] - 1)


@dataclass
class StepResult:
    """What one optimizer step reports to the loop."""

    tokens: int
    """target tokens trained on in this step, all ranks"""
    row: dict
    """its line in train_log.jsonl (the loop puts `step` first)"""
    scalars: dict[str, float]
    """TensorBoard scalars for a logging step (the loop adds tokens, tokens/s and MFU)"""
    postfix: dict[str, str]
    """progress-bar fields (the loop adds tokens/s)"""


Step = Callable[[TrainerState, torch.Tensor, float], StepResult]
"""One optimizer step: (state before it, the global batch's example indices, time fraction) -> result."""


class Loop:
    """The parts of the shared loop; `run_loop` calls them in order (resume, step, record, evaluate,
    checkpoint, summary). `settings` holds max_steps, max_train_seconds, eval_every (optional),
    save_every, keep_checkpoints and log_every: TrainSettings, or PPO's stage settings."""

    def __init__(self, accelerator, settings, work_dir: Path, *, run_start: float | None, evaluate, desc: str,
                 prefix: str, flops_per_token: float | None, peak_flops: float | None):
        self.accelerator, self.settings, self.work_dir = accelerator, settings, Path(work_dir)
        self.run_start = time.time() if run_start is None else run_start
        self.evaluate, self.desc, self.prefix = evaluate, desc, prefix
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.loss_log, self.metrics_log = self.work_dir / "train_log.jsonl", self.work_dir / "metrics.jsonl"
        self.eval_every = getattr(settings, "eval_every", None)
        self.budget = settings.max_train_seconds
        self.last_eval: dict = {}
        self.time_fraction, self.out_of_time = 0.0, False

    def resume(self) -> TrainerState:
        """The latest complete checkpoint's state (or a fresh one); log lines after it are dropped."""
        state = resume_latest(self.accelerator, self.work_dir)
        # accumulate()'s micro-step counter, which load_state restores: our steps always start on a boundary,
        # whatever the accumulation the checkpoint was saved with (another world size)
        self.accelerator.step = 0
        self.start_step = self.last_saved = state.step
        if self.accelerator.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.loss_log, state.step)
            truncate_jsonl(self.metrics_log, state.step)
            if state.step:
                print(f"resumed from checkpoint at step {state.step} (epoch {state.epoch}, offset {state.offset})")
        self.bar = tqdm(total=self.settings.max_steps, initial=state.step, desc=self.desc, dynamic_ncols=True,
                        disable=not self.accelerator.is_local_main_process)
        self.t_session, self.seconds_before, self.tokens_session = time.time(), state.train_seconds, 0
        self.window_t, self.window_tokens = time.time(), 0
        self._update_clock(state)
        return state

    def _update_clock(self, state: TrainerState) -> None:
        """The share of the time budget spent, by rank 0's clock, so that every rank stops at the same step."""
        if not self.budget:
            return
        spent = torch.tensor(state.train_seconds, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            spent = broadcast(spent, from_process=0)
        self.time_fraction = float(spent) / self.budget
        self.out_of_time = self.time_fraction >= 1

    def should_continue(self, state: TrainerState) -> bool:
        return state.step < self.settings.max_steps and not self.out_of_time

    def is_last(self, state: TrainerState) -> bool:
        return state.step == self.settings.max_steps or self.out_of_time

    def record(self, state: TrainerState, result: StepResult) -> TrainerState:
        """Counters and clock after a step, the NaN guard, its log line, scalars and progress bar."""
        state = replace(state, step=state.step + 1, tokens=state.tokens + result.tokens,
                        train_seconds=self.seconds_before + time.time() - self.t_session)
        bad = [k for k, v in result.row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"{', '.join(bad)} not finite at step {state.step}; training stopped, the last "
                                     f"good checkpoint is kept in {checkpoint_dir(self.work_dir)}")
        self._update_clock(state)
        self.tokens_session += result.tokens
        self.window_tokens += result.tokens
        if self.accelerator.is_main_process:
            append_jsonl(self.loss_log, {"step": state.step, **result.row})
        if state.step % self.settings.log_every == 0 or self.is_last(state):
            tok_s = self.window_tokens / max(1e-9, time.time() - self.window_t)
            scalars = {**result.scalars, f"{self.prefix}tokens_per_s": tok_s, f"{self.prefix}tokens": state.tokens}
            if self.flops_per_token and self.peak_flops:
                scalars[f"{self.prefix}mfu"] = self.flops_per_token * tok_s / (self.peak_flops * self.accelerator.num_processes)
            self.accelerator.log(scalars, step=state.step)
            self.bar.set_postfix(**result.postfix, tok_s=f"{tok_s:,.0f}")
            self.window_t, self.window_tokens = time.time(), 0
        self.bar.update(1)
        return state

    def run_evaluation(self, model, state: TrainerState, record: bool = True) -> dict:
        model.eval()
        with torch.no_grad():
            result = self.evaluate(model)
        model.train()
        if record:
            row = {"step": state.step, "tokens": state.tokens, **result,
                   "elapsed_s": round(time.time() - self.run_start, 3)}
            if self.accelerator.is_main_process:
                append_jsonl(self.metrics_log, row)
            self.accelerator.log({f"val/{k}": v for k, v in result.items()}, step=state.step)
        return result

    def maybe_evaluate(self, model, state: TrainerState) -> None:
        if self.evaluate is not None and (state.step % self.eval_every == 0 or self.is_last(state)):
            self.last_eval = self.run_evaluation(model, state)

    def maybe_checkpoint(self, state: TrainerState) -> None:
        if state.step % self.settings.save_every == 0 or self.is_last(state):
            save_checkpoint(self.accelerator, state, self.work_dir, self.settings.keep_checkpoints)
            self.last_saved = state.step

    def summary(self, model, state: TrainerState) -> dict:
        self.bar.close()
        if not self.last_eval and self.evaluate is not None:
            self.last_eval = self.run_evaluation(model, state, record=False)  # resumed at the end: already logged
        seconds = time.time() - self.t_session
        return {
            "steps": state.step,
            "resumed_from_step": self.start_step,
            "tokens": state.tokens,
            "train_seconds": round(seconds, 3),
            "tokens_per_s": round(self.tokens_session / seconds, 1) if seconds > 0 and self.tokens_session else None,
            "last_checkpoint_step": self.last_saved,
            "stopped_by_time_budget": self.out_of_time and state.step < self.settings.max_steps,
            **{f"final_{k}": v for k, v in self.last_eval.items()},
        }


def run_loop(accelerator, model, step: Step, settings, work_dir: Path, *, seed: int, n_examples: int,
             global_batch: int, evaluate: Callable[[Any], dict[str, float]] | None = None,
             run_start: float | None = None, desc: str = "train", prefix: str = "train/",
             flops_per_token: float | None = None, peak_flops: float | None = None) -> tuple[TrainerState, dict]:
    """The training loop every stage shares (pretrain, SFT and reward through `train`, PPO with its own
    step): resume, then steps over seeded global batches until max_steps or the time budget, each
    recorded (NaN guard, logs), evaluated and checkpointed on schedule; returns the state and a summary.
    `evaluate(model)` runs on all ranks (it must do the same forwards on each);"""
    if n_examples < global_batch:
        raise StageError(f"train data has {n_examples} examples, fewer than one global batch of {global_batch}")
    loop = Loop(accelerator, settings, work_dir, run_start=run_start, evaluate=evaluate, desc=desc, prefix=prefix,
                flops_per_token=flops_per_token, peak_flops=peak_flops)
    state = loop.resume()
    while loop.should_continue(state):
        indices, state = next_global_batch(state, seed, n_examples, global_batch)
        result = step(state, indices, loop.time_fraction)
        state = loop.record(state, result)
        loop.maybe_evaluate(model, state)
        loop.maybe_checkpoint(state)
    return state, loop.summary(model, state)


def train(
    accelerator,
    model,
    train_data,
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict]],
    settings: TrainSettings,
    work_dir: Path,
    *,
    seed: int,
    run_start: float | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    count_tokens: Callable[[dict], int] = default_token_count,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
):
    """Train `model` (not yet prepared) with `loss_fn(model, batch) -> (loss, aux)` for settings.max_steps
    optimizer steps (or until max_train_seconds), resuming if possible: the optimizer and accelerator
    set up here, the step below, the rest in `run_loop`. Returns (prepared model, summary dict)."""
    world = accelerator.num_processes
    global_batch = settings.micro_batch_size * settings.grad_accum_steps * world
    if len(train_data) < global_batch:
        raise ValueError(f"train data has {len(train_data)} examples, fewer than one global batch "
                         f"(micro_batch_size*grad_accum_steps*processes = {global_batch})")
    if settings.activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    deepspeed = distributed.uses_deepspeed(accelerator)
    if deepspeed and settings.optimizer == "muon":
        raise muon_under_deepspeed()
    # DeepSpeed steps the optimizer over its own flat partitions: leave it the plain AdamW
    optimizer = build_optimizer(model, settings, fused=not deepspeed and accelerator.device.type in ("cpu", "cuda"))
    model, optimizer = accelerator.prepare(model, optimizer)
    if settings.compile:
        if deepspeed:
            model.compile()
        else:
            model = torch.compile(model)
    model.train()
    step = lm_step(accelerator, model, optimizer, train_data, collate, loss_fn, settings, count_tokens, work_dir)
    _, summary = run_loop(accelerator, model, step, settings, work_dir, seed=seed, n_examples=len(train_data),
                          global_batch=global_batch, evaluate=evaluate, run_start=run_start,
                          flops_per_token=flops_per_token, peak_flops=peak_flops)
    return model, summary


def lm_step(accelerator, model, optimizer, train_data, collate, loss_fn, settings: TrainSettings,
            count_tokens: Callable[[dict], int], work_dir: Path) -> Step:
    """One optimizer step of a supervised loss: the scheduled learning rate, grad_accum_steps micro
    batches (rank-major, so the same examples form a global batch at any world size), the NaN guard
    before the update, clipping, the update."""
    world, rank, mbs = accelerator.num_processes, accelerator.process_index, settings.micro_batch_size

    def step(state: TrainerState, indices: torch.Tensor, time_fraction: float) -> StepResult:
        lr = settings.learning_rate * lr_multiplier(state.step, settings, time_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step_loss = torch.zeros((), device=accelerator.device)
        step_tokens = 0
        aux_sum: dict[str, torch.Tensor] = {}
        grad_norm = None
        for micro in range(settings.grad_accum_steps):
            lo = (micro * world + rank) * mbs
            batch = _to_device(collate(_rows(train_data, indices[lo:lo + mbs].tolist(), state.epoch)),
                               accelerator.device)
            with accelerator.accumulate(model):
                loss, aux = loss_fn(model, batch)
                mean_loss = accelerator.reduce(loss.detach().float(), "mean")
                if not torch.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"loss is {mean_loss.item()} at step {state.step + 1} (micro batch {micro}); training stopped, "
                        f"the last good checkpoint is kept in {checkpoint_dir(work_dir)}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip or float("inf"))
                    if grad_norm is not None and not math.isfinite(float(grad_norm)):  # same on every rank
                        raise NonFiniteLossError(
                            f"gradient norm is {float(grad_norm)} at step {state.step + 1}; training stopped, the last "
                            f"good checkpoint is kept in {checkpoint_dir(work_dir)}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += mean_loss / settings.grad_accum_steps
            step_tokens += count_tokens(batch)
            for k, v in aux.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                aux_sum[k] = aux_sum.get(k, 0) + v / settings.grad_accum_steps
        tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
        loss_value = float(step_loss)
        grad_norm = None if grad_norm is None else float(grad_norm)
        scalars = {"train/loss": loss_value, "train/lr": lr, **_scalar_logs("train/", aux_sum)}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        return StepResult(tokens, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens + tokens},
                          scalars, {"loss": f"{loss_value:.4f}"})

    return step


# --- evaluation for language models ---

def sharded_sums(accelerator, examples: int, micro_batch_size: int, max_batches: int | None, size: int,
                 batch_sums: Callable[[Any, list[int]], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """The evaluation loop every evaluator shares: `run(model)` adds up `batch_sums(model, indices)` (a float64 vector
    of `size` statistics) over this rank's micro batches of the first max_batches*micro_batch_size*
    processes examples (max_batches None: all of them) and sums the result over ranks. Every rank runs
    the same number of forwards (ZeRO-3 gathers parameters collectively): a rank short of data runs
    example 0 with weight 0."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = examples if max_batches is None else min(examples, max_batches * micro_batch_size * world)
    mine = list(range(rank, n, world))
    n_batches = math.ceil(math.ceil(n / world) / micro_batch_size)

    @torch.no_grad()
    def run(model) -> torch.Tensor:
        sums = torch.zeros(size, dtype=torch.float64, device=accelerator.device)
        for b in range(n_batches):
            idx = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
            sums += (1.0 if idx else 0.0) * batch_sums(model, idx or [0])
        return accelerator.reduce(sums, "sum")

    return run


def make_lm_evaluator(accelerator, val_data, collate, micro_batch_size: int, max_batches: int | None,
                      byte_lengths: torch.Tensor | None = None) -> Callable[[Any], dict[str, float]]:
    """`evaluate(model) -> {'val_loss', 'val_bpb'}` over the first max_batches*mbs*processes blocks
    (max_batches None: the whole validation split).

    val_loss: mean CE (nats) per target token. val_bpb: CE summed over targets that stand for text
    (byte length > 0), / ln 2, / their bytes (pipeline.data.packing.token_byte_lengths).
    """
    import torch.nn.functional as F

    if len(val_data) == 0:
        raise ValueError("validation data is empty: not even one block; use a smaller block_size or more text")
    lengths = None if byte_lengths is None else byte_lengths.to(accelerator.device)
    def batch_sums(model, idx: list[int]) -> torch.Tensor:  # ce, tokens, ce on text tokens, bytes
        batch = _to_device(collate(_rows(val_data, idx)), accelerator.device)
        ids = batch["input_ids"]
        out = model(input_ids=ids[:, :-1], position_ids=batch["position_ids"][:, :-1], use_cache=False)
        targets = ids[:, 1:]
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="none").double()
        zero = torch.zeros((), dtype=torch.float64, device=ce.device)
        text, nbytes = zero, zero
        if lengths is not None:
            token_bytes = lengths[targets.flatten()]
            text, nbytes = (ce * (token_bytes > 0)).sum(), token_bytes.sum().double()
        return torch.stack([ce.sum(), torch.tensor(float(ce.numel()), dtype=torch.float64, device=ce.device),
                            text, nbytes])

    run = sharded_sums(accelerator, len(val_data), micro_batch_size, max_batches, 4, batch_sums)

    def evaluate(model) -> dict[str, float]:
        sums = run(model)
        result = {"val_loss": float(sums[0] / sums[1])}
        if lengths is not None:
            result["val_bpb"] = float(sums[2] / math.log(2) / sums[3].clamp(min=1))
        return result

    return evaluate


# --- export ---

def write_generation_config(out_dir: Path, bos_token_id, pad_token_id, eos_token_id) -> None:
    """generation_config.json; a chat model's eos_token_id lists its stop tokens (end of turn, then eos)."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id).save_pretrained(out_dir)


def export_model(accelerator, model, out_dir: Path, tokenizer=None, stop_token_ids: list[int] | None = None,
                 lora: LoraSettings | None = None) -> None:
    """A self-contained Hugging Face checkpoint: config, safetensors weights, generation config (stopping
    at `stop_token_ids` when given, else at the model's eos), tokenizer. A LoRA model is saved merged (a
    plain checkpoint) or as PEFT adapter files, as `lora.save` says.

    Collective: call on every rank (ZeRO-3 gathers the weights; needs zero3_save_16bit_model: true).
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)  # torch.compile
        if lora is not None and lora.save == "adapter":
            unwrapped.save_pretrained(out_dir, state_dict=state_dict)  # PEFT keeps the adapter's tensors
        elif lora is not None:
            base = unwrapped.get_base_model()
            merged = merge_lora_state_dict(state_dict, lora.alpha / lora.r, transposed_modules(unwrapped))
            base.save_pretrained(out_dir, state_dict=merged)
            unwrapped = base
        else:
            unwrapped.save_pretrained(out_dir, state_dict=state_dict)
        cfg = unwrapped.config
        write_generation_config(out_dir, cfg.bos_token_id, cfg.pad_token_id, stop_token_ids or cfg.eos_token_id)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    accelerator.wait_for_everyone()
