"""Typed settings shared by several stages: the model shape and the training loop.

Plain dataclasses with defaults; `pipeline.recipe.config` fills them from recipe YAML strictly. Each field's
meaning is the docstring under it. `validate()` raises `ConfigError` with the offending key; the key path
prefix is added by the caller. No heavy imports here: `plan` must stay fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.recipe.config import ConfigError, require_at_least

# name -> (layers, d_model, heads, kv_heads, ffn); small enough names that recipes read well.
MODEL_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "nano": (2, 64, 4, 2, 192),
    "tiny": (4, 128, 4, 2, 384),
    "small": (6, 256, 8, 4, 768),
    "gpt2-small": (12, 768, 12, 12, 2048),
    "1b": (16, 2048, 16, 8, 5632),
}


@dataclass
class ModelSettings:
    family: Literal["dense", "moe"] = "dense"
    """dense: transformers Llama (RoPE, RMSNorm, SwiGLU, GQA); moe: transformers Qwen3-MoE (softmax top-k)"""
    size: str = "tiny"
    """a preset from MODEL_SIZES; the fields below override single dimensions when set"""
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    """SwiGLU hidden width (per expert for moe)"""
    max_seq_len: int = 1024
    """maximum positions the model supports; the pretraining block size must not exceed it"""
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    n_experts: int = 8
    """moe only: experts per layer"""
    top_k: int = 2
    """moe only: experts each token is routed to"""
    aux_loss_coef: float = 0.01
    """moe only: weight of the load-balancing loss (Switch/Mixtral style)"""
    z_loss_coef: float = 0.001
    """moe only: weight of the router z-loss (ST-MoE), computed from the router logits"""
    attention: Literal["auto", "triton", "sdpa", "eager"] = "auto"
    """auto: our Triton flash-attention on CUDA, PyTorch SDPA on CPU"""
    init_std: float = 0.02
    residual_init: Literal["normal", "zero"] = "normal"
    """zero: attention output and MLP down projections start at zero, so every block starts as the identity
    (modded-nanogpt's init); normal: N(0, init_std) like every other matrix"""

    def validate(self) -> None:
        if self.size not in MODEL_SIZES:
            raise ConfigError(f"size: unknown model size {self.size!r}; choose one of {', '.join(MODEL_SIZES)}")
        layers, d_model, heads, kv_heads, _ = self.dims()
        require_at_least(self, ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "n_experts",
                                "top_k"))
        if d_model % heads:
            raise ConfigError(f"d_model: {d_model} is not divisible by n_heads={heads}")
        if heads % kv_heads:
            raise ConfigError(f"n_kv_heads: n_heads={heads} is not a multiple of n_kv_heads={kv_heads}")
        if self.family == "moe" and self.top_k > self.n_experts:
            raise ConfigError(f"top_k: {self.top_k} exceeds n_experts={self.n_experts}")

    def dims(self) -> tuple[int, int, int, int, int]:
        """(layers, d_model, heads, kv_heads, ffn) after applying overrides to the preset."""
        layers, d_model, heads, kv_heads, ffn = MODEL_SIZES[self.size]
        return (
            self.n_layers or layers,
            self.d_model or d_model,
            self.n_heads or heads,
            self.n_kv_heads or kv_heads,
            self.ffn_dim or ffn,
        )


def muon_under_deepspeed(config: str = "DeepSpeed ZeRO") -> ConfigError:
    """The one error for `optimizer: muon` with DeepSpeed (recipe parse and run time raise it)."""
    return ConfigError(f"optimizer: muon needs whole weight matrices, which {config} flattens and partitions; "
                       f"use optimizer: adamw with DeepSpeed, or a DDP/single-process config")


@dataclass
class TrainSettings:
    max_steps: int = 100
    """optimizer steps"""
    max_train_seconds: float | None = None
    """a wall-clock budget for the training loop (resumed runs continue it): training stops at max_steps or when
    the budget is spent, whichever comes first, and the schedule follows whichever is further along (a cluster
    job's time limit; a time-to-quality benchmark). The steps taken then depend on the machine's speed, so the
    loss curve is not reproducible"""
    micro_batch_size: int = 8
    """sequences per process per forward"""
    grad_accum_steps: int = 1
    learning_rate: float = 3e-4
    embedding_lr_scale: float = 1.0
    """the input embedding's learning rate as a multiple of learning_rate (AdamW either way): a lookup table's rows
    see few, small gradients; with untied embeddings a larger rate trains them faster"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """muon: torch's Muon for hidden weight matrices (update RMS matched to AdamW, same lr and schedule), AdamW for
    embeddings, head, norms; not with DeepSpeed (ZeRO flattens the matrices)"""
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1
    """the schedule decays to learning_rate * min_lr_ratio"""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine decay; wsd: warmup, stable, linear decay over the last decay_fraction"""
    warmup_steps: int = 10
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    """steps between validation evaluations (and a final one at the end)"""
    eval_batches: int | None = 8
    """validation micro batches per evaluation (per process); null: the whole validation split"""
    save_every: int = 50
    """steps between resumable checkpoints (accelerate save_state)"""
    keep_checkpoints: int = 2
    log_every: int = 10
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile the model (GPU)"""

    def validate(self) -> None:
        require_at_least(self, ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_every", "eval_batches",
                                "save_every", "keep_checkpoints", "log_every"))
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: must be positive, got {self.learning_rate}")
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise ConfigError(f"max_train_seconds: must be positive, got {self.max_train_seconds}")
        if self.embedding_lr_scale <= 0:
            raise ConfigError(f"embedding_lr_scale: must be positive, got {self.embedding_lr_scale}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum: must be in [0, 1), got {self.muon_momentum}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip: must be >= 0, got {self.grad_clip}")


REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class PushSettings:
    """`stages.NAME.push:` in a recipe: push the stage's outputs after it succeeds."""

    repo: str
    """hub repo ORG/NAME; a dataset output goes to the dataset repo of that name"""
    private: bool = False
    """create the repo private (an existing repo keeps its visibility)"""
    revision: str | None = None
    """branch to push to (created from main when missing); none: main"""
    license: str = "apache-2.0"
    """the card's license"""
    outputs: list[str] | None = None
    """which of the stage's outputs to push; none: its primary one (model, else dataset, else tokenizer). When two
    pushed outputs need the same kind of repo, the later ones go to REPO-OUTPUT."""

    def validate(self) -> None:
        if not REPO_ID.match(self.repo):
            raise ConfigError(f"repo: {self.repo!r} is not a hub repo name like ORG/NAME")
        if self.outputs is not None and not self.outputs:
            raise ConfigError("outputs: list at least one output, or leave it out for the primary one")


@dataclass
class LoraSettings:
    """`lora:` on the SFT or reward stage: train low-rank updates of the linear layers (PEFT's LoRA)
    instead of every weight; the embeddings and norms stay frozen (a reward model's score head trains)."""

    r: int = 16
    """rank of the update matrices"""
    alpha: float = 32.0
    """the update is scaled by alpha / r"""
    dropout: float = 0.05
    """dropout on the LoRA branch's input"""
    target_modules: list[str] | None = None
    """names of the modules to adapt; none: every linear layer of the blocks (PEFT's "all-linear")"""
    save: Literal["merged", "adapter"] = "merged"
    """merged: a plain checkpoint with the update folded in (loads with from_pretrained, no PEFT needed);
    adapter: PEFT's adapter files, whose config names the base checkpoint"""

    def validate(self) -> None:
        require_at_least(self, ("r",))
        if self.alpha <= 0:
            raise ConfigError(f"alpha: must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
