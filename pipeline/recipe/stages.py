"""Stage settings: one dataclass per stage type, holding its fields and its declaration.

A stage's settings class says what the stage takes (INPUTS), what it publishes (OUTPUTS), how it is
launched (ACCELERATED), whether the recipe's model section is part of its fingerprint (USES_MODEL), its
code version and what it imports (preloaded by the runner). `STAGE_TYPES` maps a recipe's stage key to
its class; the stage's code is the module `stages/<key>.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple, TypeVar

import yaml

from pipeline.data.preferences import FORMAT_COLUMNS, PREFERENCE_FORMATS
from pipeline.recipe.config import ConfigError, require_at_least
from pipeline.recipe.ppo_settings import PPOSettings
from pipeline.recipe.settings import LoraSettings, PushSettings, TrainSettings, muon_under_deepspeed
from pipeline.task.instructions import TASK_VERSION


class Curve(NamedTuple):
    """A curve the run report draws from a published stage's log file."""

    file: str  # metrics.jsonl (evaluations) or train_log.jsonl (training steps)
    x: str
    y: str
    title: str
    ylabel: str


TRAIN_LOSS = "train_log.jsonl"
EVALUATIONS = "metrics.jsonl"

STAGE_TYPES: dict[str, type[StageSettings]] = {}
"""Recipe stage key -> its settings class, filled by `@stage_type`; the stage's code is `stages/<key>.py`."""

S = TypeVar("S", bound="type[StageSettings]")


def stage_type(name: str):
    """Declare a stage: `@stage_type("sft")` on its settings class registers it under its recipe key."""

    def register(cls: S) -> S:
        if name in STAGE_TYPES:
            raise TypeError(f"stage {name!r} is declared twice ({STAGE_TYPES[name].__name__}, {cls.__name__})")
        cls.NAME = name
        STAGE_TYPES[name] = cls
        return cls

    return register


def is_deepspeed_config(config_file: str | Path) -> bool:
    """Whether an accelerate config file selects DeepSpeed."""
    try:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"launch.config_file: cannot read {config_file}: {e}") from None
    return str(data.get("distributed_type", "")).upper() == "DEEPSPEED"


@dataclass
class Launch:
    num_processes: int = 1
    """processes for `accelerate launch` (only for stages that train)"""
    config_file: str | None = None
    """accelerate config file (DeepSpeed ZeRO, multi-node, ...); none: plain single process"""
    extra_args: list[str] = field(default_factory=list)
    """passed to `accelerate launch` as they are (e.g. ["--main_process_port", "29511"])"""

    def validate(self) -> None:
        if self.num_processes < 1:
            raise ConfigError(f"num_processes: must be >= 1, got {self.num_processes}")
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise ConfigError(f"config_file: accelerate config {self.config_file} does not exist")


@dataclass
class StageSettings:
    """Fields every stage has. Subclasses declare their inputs, outputs and whether they train."""

    inputs: dict[str, str] = field(default_factory=dict)
    launch: Launch = field(default_factory=Launch)
    push: PushSettings | None = None
    """upload the outputs to a hub after the stage succeeds (pipeline/hub/push.py; not part of the fingerprint)"""

    INPUTS: ClassVar[dict[str, str]] = {}  # input name -> what it must be (text, tokenizer, dataset, model)
    DEFAULT_INPUTS: ClassVar[dict[str, str]] = {}
    OPTIONAL_INPUTS: ClassVar[tuple[str, ...]] = ()
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    ACCELERATED: ClassVar[bool] = False  # launched with `accelerate launch` (else plain python)
    USES_MODEL: ClassVar[bool] = False  # the recipe's `model` section is part of its fingerprint
    VERSION: ClassVar[str] = "1"  # bump when the stage's outputs change for the same settings
    NAME: ClassVar[str] = ""  # the recipe key, set by @stage_type
    CURVES: ClassVar[tuple[Curve, ...]] = ()  # what the run report plots from the published logs
    # what the stage imports inside `run`: the runner imports it once and forks (pipeline/runner/process.py)
    IMPORTS: ClassVar[tuple[str, ...]] = (
        "datasets", "transformers", "transformers.modeling_utils", "transformers.models.llama.modeling_llama",
        "transformers.models.qwen3_moe.modeling_qwen3_moe", "accelerate", "deepspeed", "torch.utils.tensorboard",
        "pipeline.train.loop", "pipeline.train.models")

    def validate(self) -> None:
        for name in self.inputs:
            if name not in self.INPUTS:
                raise ConfigError(f"inputs.{name}: unknown input; this stage takes {', '.join(self.INPUTS) or 'none'}")
        for name in self.INPUTS:
            if name not in self.inputs and name not in self.OPTIONAL_INPUTS:
                raise ConfigError(f"inputs.{name}: required input is missing ({self.INPUTS[name]})")


@stage_type("tokenizer")
@dataclass
class TokenizerSettings(StageSettings):
    vocab_size: int = 2048
    min_frequency: int = 2
    max_train_chars: int = 5_000_000
    """characters of training text fed to the BPE trainer (a prefix of the shuffled train split)"""
    validation_fraction: float = 0.05
    """held out from sources that have no validation split"""

    INPUTS: ClassVar = {"corpus": "text"}
    DEFAULT_INPUTS: ClassVar = {"corpus": "builtin:stdlib"}
    OUTPUTS: ClassVar = ("tokenizer",)
    IMPORTS: ClassVar = ("datasets", "transformers")

    def validate(self) -> None:
        super().validate()
        if self.vocab_size < 300:
            raise ConfigError(f"vocab_size: must be at least 300 (256 bytes + special tokens), got {self.vocab_size}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction: must be in (0, 1), got {self.validation_fraction}")


@stage_type("prepare")
@dataclass
class PrepareSettings(StageSettings):
    block_size: int = 256
    """tokens per packed training sequence"""
    validation_fraction: float = 0.05
    num_proc: int | None = None
    """worker processes for tokenization; none: all cores"""

    INPUTS: ClassVar = {"corpus": "text", "tokenizer": "tokenizer"}
    DEFAULT_INPUTS: ClassVar = {"corpus": "builtin:stdlib"}
    OUTPUTS: ClassVar = ("dataset",)
    IMPORTS: ClassVar = ("datasets", "transformers")

    def validate(self) -> None:
        super().validate()
        if self.block_size < 2:
            raise ConfigError(f"block_size: must be at least 2, got {self.block_size}")


def validate_training_stage(stage: StageSettings | TrainSettings) -> None:
    """A training stage's own fields, plus what its launch config rules out."""
    StageSettings.validate(stage)
    TrainSettings.validate(stage)
    config = stage.launch.config_file
    if stage.optimizer == "muon" and config is not None and is_deepspeed_config(config):
        raise muon_under_deepspeed(f"DeepSpeed ZeRO ({config})")


@stage_type("pretrain")
@dataclass
class PretrainSettings(StageSettings, TrainSettings):
    shift_blocks: bool = False
    """every epoch after the first reads the packed token stream at a new offset (pipeline.data.packing.
    ShiftedBlocks), so repeated passes over a small corpus see new contexts, not the same blocks"""

    INPUTS: ClassVar = {"data": "dataset", "tokenizer": "tokenizer", "model": "model"}
    OPTIONAL_INPUTS: ClassVar = ("model", "tokenizer")
    # model: continued pretraining from that causal-LM checkpoint (the recipe's model section is not
    # used then); tokenizer: defaults to the model's own
    OUTPUTS: ClassVar = ("model",)
    ACCELERATED: ClassVar = True
    USES_MODEL: ClassVar = True
    CURVES: ClassVar = (Curve(TRAIN_LOSS, "step", "loss", "pretraining loss", "loss (nats/token)"),
                        Curve(EVALUATIONS, "step", "val_bpb", "pretraining validation bits per byte", "bits per byte"))

    def validate(self) -> None:
        validate_training_stage(self)
        if "tokenizer" not in self.inputs and "model" not in self.inputs:
            raise ConfigError("inputs.tokenizer: required input is missing (tokenizer; or give inputs.model to "
                              "continue pretraining a checkpoint with its own tokenizer)")


@stage_type("instructions")
@dataclass
class InstructionsSettings(StageSettings):
    """The default task's data (pipeline/task/instructions.py): demonstrations, preferences, prompts."""

    sft_train: int = 4000
    sft_eval: int = 200
    preference_kind: Literal[PREFERENCE_FORMATS] = "pairs"
    preference_train: int = 4000
    preference_eval: int = 200
    prompts_train: int = 2000
    prompts_eval: int = 200

    OUTPUTS: ClassVar = ("sft", "preferences", "prompts")
    IMPORTS: ClassVar = ("datasets",)
    VERSION: ClassVar = f"1-task{TASK_VERSION}"  # the task's sentences, templates and judge

    def validate(self) -> None:
        super().validate()
        require_at_least(self, ("sft_train", "sft_eval", "preference_train", "preference_eval", "prompts_train",
                                "prompts_eval"))


@dataclass
class ChatTrainSettings(StageSettings, TrainSettings):
    """A training stage that starts from a checkpoint and reads chat-formatted data (SFT, reward)."""

    max_length: int = 256
    """tokens per example; SFT truncates the end, the reward model keeps the end (its score is read there)"""
    chat_template: str | None = None
    """the chat template to use instead of the checkpoint's (Jinja text, or the path of a file holding it, read
    when the recipe is parsed); saved with the trained checkpoint's tokenizer. none: the checkpoint's own"""
    lora: LoraSettings | None = None
    """train LoRA updates (PEFT) instead of every weight, e.g. `lora: {r: 16}`; none: full fine-tuning"""
    columns: dict[str, str] = field(default_factory=dict)
    """rename the data input's columns to the names this stage reads, e.g. {question: prompt}"""

    INPUTS: ClassVar = {"model": "model", "data": "dataset"}
    OUTPUTS: ClassVar = ("model",)
    ACCELERATED: ClassVar = True

    def validate(self) -> None:
        validate_training_stage(self)
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be at least 8, got {self.max_length}")
        self.chat_template = read_chat_template(self.chat_template)


def read_chat_template(value: str | None) -> str | None:
    """A chat_template setting: Jinja text as it is, or the text of the file it names."""
    if value is None or "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"chat_template: {value!r} is neither a Jinja template nor an existing file")
    return path.read_text()


@stage_type("sft")
@dataclass
class SFTSettings(ChatTrainSettings):
    messages_column: str = "messages"
    """a list of {role, content}; rendered with the tokenizer's chat template. A dataset without it but with
    `prompt` and `completion` (strings or lists of messages) or `text` (loss on every token) is read as such"""
    prompt_column: str | None = None
    completion_column: str | None = None
    """instead of messages: build a user/assistant pair from these two columns"""
    packing: bool = False
    """several conversations per row up to max_length, position ids restarting (no attention across them)"""
    sample_prompts: int = 4
    """validation prompts answered greedily after training (manifest and logs)"""
    max_new_tokens: int = 64

    CURVES: ClassVar = (Curve(TRAIN_LOSS, "step", "loss", "SFT loss", "loss (nats/token)"),
                        Curve(EVALUATIONS, "step", "val_loss", "SFT validation loss", "loss (nats/token)"))

    def validate(self) -> None:
        super().validate()
        if (self.prompt_column is None) != (self.completion_column is None):
            raise ConfigError("prompt_column: give both prompt_column and completion_column, or neither")


@stage_type("reward")
@dataclass
class RewardSettings(ChatTrainSettings):
    format: Literal[("auto", *FORMAT_COLUMNS)] = "auto"
    """auto: detected from the columns (pipeline/data/preferences.py lists them)"""
    use_margin: bool = False
    """subtract the pair's margin (rating/rank difference, or a `margin` column) inside the loss (Llama 2)"""
    min_rating_gap: float = 0.0
    """ratings: two responses form a pair only when their ratings differ by more than this"""

    CURVES: ClassVar = (Curve(TRAIN_LOSS, "step", "loss", "reward-model loss", "Bradley-Terry loss"),
                        Curve(EVALUATIONS, "step", "val_accuracy", "reward-model held-out accuracy", "pairwise accuracy"))

    def validate(self) -> None:
        super().validate()
        if self.min_rating_gap < 0:
            raise ConfigError(f"min_rating_gap: must be >= 0, got {self.min_rating_gap}")


@stage_type("ppo")
@dataclass
class PPOStageSettings(StageSettings, PPOSettings):
    """PPO's algorithm settings (pipeline/recipe/ppo_settings.py) plus the loop around them."""

    max_steps: int = 100
    """PPO iterations: each samples `batch_size` prompts per process, then runs ppo_epochs over them"""
    max_train_seconds: float | None = None
    """a wall-clock budget, as for the other training stages: PPO stops at max_steps or when it is spent"""
    batch_size: int = 16
    """prompts per process per iteration (episodes per iteration = batch_size x processes)"""
    learning_rate: float = 1e-5
    value_learning_rate: float | None = None
    """none: learning_rate"""
    weight_decay: float = 0.0
    max_prompt_length: int = 128
    """prompt tokens kept (from the end, so the assistant header stays)"""
    prompt_column: str = "prompt"
    columns: dict[str, str] = field(default_factory=dict)
    """rename the prompts input's columns to the names this stage reads, e.g. {question: prompt}"""
    normalize_rewards: bool = True
    """read reward_mean/reward_std from the reward model's reward_stats.json (else the values given here)"""
    save_every: int = 25
    keep_checkpoints: int = 2
    log_every: int = 1

    INPUTS: ClassVar = {"policy": "model", "reward": "model", "prompts": "dataset", "value": "model", "reference": "model"}
    OPTIONAL_INPUTS: ClassVar = ("value", "reference")  # default: the reward model, the policy's start
    OUTPUTS: ClassVar = ("model", "value")
    ACCELERATED: ClassVar = True
    CURVES: ClassVar = (Curve(TRAIN_LOSS, "step", "reward/raw", "PPO reward", "reward-model score"),
                        Curve(TRAIN_LOSS, "step", "kl", "PPO KL to reference", "KL (nats/response)"),
                        Curve(TRAIN_LOSS, "step", "response_length", "PPO response length", "tokens"))

    def validate(self) -> None:
        StageSettings.validate(self)
        PPOSettings.validate(self)
        require_at_least(self, ("max_steps", "batch_size", "save_every", "keep_checkpoints", "log_every",
                                "max_prompt_length"))
        if self.learning_rate <= 0 or (self.value_learning_rate is not None and self.value_learning_rate <= 0):
            raise ConfigError(f"learning_rate: must be positive, got {self.learning_rate}")
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise ConfigError(f"max_train_seconds: must be positive, got {self.max_train_seconds}")


@stage_type("evaluate")
@dataclass
class EvaluateSettings(StageSettings):
    n_prompts: int = 200
    """held-out prompts each causal checkpoint answers (judge score, reward-model win rate)"""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy answers; > 0: sampled at this temperature (seeded)"""
    kl_temperature: float = 1.0
    """sampling temperature for the PPO-to-SFT KL estimate (use PPO's own)"""
    batch_size: int = 32
    bpb_batches: int = 16
    """batches of packed validation blocks for bits per byte"""
    ngram: int = 8
    """word n-gram size of the contamination check"""
    columns: dict[str, str] = field(default_factory=dict)
    """rename the prompts input's columns to the names this stage reads, e.g. {question: prompt}"""
    n_samples: int = 8
    """sample generations shown in the results and the report"""

    INPUTS: ClassVar = {"prompts": "dataset", "pretrain": "model", "sft": "model", "ppo": "model", "reward": "model",
                        "data": "dataset", "corpus": "text", "sft_data": "dataset", "preferences": "dataset"}
    OPTIONAL_INPUTS: ClassVar = ("pretrain", "sft", "ppo", "reward", "data", "corpus", "sft_data", "preferences")
    OUTPUTS: ClassVar = ("results",)

    def validate(self) -> None:
        super().validate()
        require_at_least(self, ("n_prompts", "max_new_tokens", "batch_size", "bpb_batches", "ngram"))
        if self.temperature < 0 or self.kl_temperature <= 0:
            raise ConfigError("temperature: must be >= 0 (and kl_temperature > 0)")
