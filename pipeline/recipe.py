"""Recipes: one YAML file -> a typed `Recipe` whose stages reference each other's outputs.

    run_dir: runs/tiny
    seed: 1234
    model: {family: dense, size: tiny}
    stages:
      tokenizer: {inputs: {corpus: "builtin:stdlib"}, vocab_size: 2048}
      prepare:   {inputs: {corpus: "builtin:stdlib", tokenizer: tokenizer.tokenizer}, block_size: 256}
      pretrain:  {inputs: {data: prepare.dataset, tokenizer: tokenizer.tokenizer}, max_steps: 300}

A stage key names the stage type (its module in `stages/`). An input is written as
  * `STAGE.OUTPUT` — another stage's output in this recipe (`tokenizer.tokenizer`, `pretrain.model`);
  * a path containing a slash (`./data/train.jsonl`, `/ckpt/sft`) — a local text/jsonl/parquet file or
    folder, a saved `datasets` folder, a tokenizer or checkpoint folder;
  * `builtin:stdlib` — the embedded corpus (pipeline/corpus.py);
  * `hub:ORG/NAME` (optionally `@REVISION`) — a hub model or dataset (needs a network).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pipeline.config import ConfigError, apply_overrides, from_dict, require_at_least
from pipeline.corpus import BUILTIN_CORPORA
from pipeline.hub import PushSettings
from pipeline.instruction_task import TASK_VERSION
from pipeline.ppo_settings import PPOSettings
from pipeline.settings import ModelSettings, TrainSettings, muon_under_deepspeed

REFERENCE = re.compile(r"^([A-Za-z_][\w-]*)\.([A-Za-z_]\w*)$")


@dataclass
class Launch:
    num_processes: int = 1
    # processes for `accelerate launch` (only for stages that train)
    config_file: str | None = None
    # accelerate config file (DeepSpeed ZeRO, multi-node, ...); none: plain single process
    extra_args: list[str] = field(default_factory=list)
    # passed to `accelerate launch` as they are (e.g. ["--main_process_port", "29511"])

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
    # upload the outputs to a hub after the stage succeeds (pipeline/hub.py; not part of the fingerprint)

    INPUTS: ClassVar[dict[str, str]] = {}  # input name -> what it must be (text, tokenizer, dataset, model)
    DEFAULT_INPUTS: ClassVar[dict[str, str]] = {}
    OPTIONAL_INPUTS: ClassVar[tuple[str, ...]] = ()
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    ACCELERATED: ClassVar[bool] = False  # launched with `accelerate launch` (else plain python)
    USES_MODEL: ClassVar[bool] = False  # the recipe's `model` section is part of its fingerprint
    VERSION: ClassVar[str] = "1"  # bump when the stage's outputs change for the same settings
    # what the stage imports inside `run`: the runner imports it once and forks (pipeline/stage_process.py)
    IMPORTS: ClassVar[tuple[str, ...]] = (
        "datasets", "transformers", "transformers.modeling_utils", "transformers.models.llama.modeling_llama",
        "transformers.models.qwen3_moe.modeling_qwen3_moe", "accelerate", "deepspeed", "torch.utils.tensorboard",
        "pipeline.training", "pipeline.models")

    def validate(self) -> None:
        for name in self.inputs:
            if name not in self.INPUTS:
                raise ConfigError(f"inputs.{name}: unknown input; this stage takes {', '.join(self.INPUTS) or 'none'}")
        for name in self.INPUTS:
            if name not in self.inputs and name not in self.OPTIONAL_INPUTS:
                raise ConfigError(f"inputs.{name}: required input is missing ({self.INPUTS[name]})")


@dataclass
class TokenizerSettings(StageSettings):
    vocab_size: int = 2048
    min_frequency: int = 2
    max_train_chars: int = 5_000_000
    # characters of training text fed to the BPE trainer (a prefix of the shuffled train split)
    validation_fraction: float = 0.05
    # held out from sources that have no validation split

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


@dataclass
class PrepareSettings(StageSettings):
    block_size: int = 256
    # tokens per packed training sequence
    validation_fraction: float = 0.05
    num_proc: int | None = None
    # worker processes for tokenization; none: all cores

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
    if stage.optimizer == "muon" and config is not None:
        try:
            distributed_type = (yaml.safe_load(Path(config).read_text()) or {}).get("distributed_type")
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"launch.config_file: cannot read {config}: {e}") from None
        if str(distributed_type).upper() == "DEEPSPEED":
            raise muon_under_deepspeed(f"DeepSpeed ZeRO ({config})")


@dataclass
class PretrainSettings(StageSettings, TrainSettings):
    shift_blocks: bool = False
    # every epoch after the first reads the packed token stream at a new offset (pipeline.packing.
    # ShiftedBlocks), so repeated passes over a small corpus see new contexts, not the same blocks

    INPUTS: ClassVar = {"data": "dataset", "tokenizer": "tokenizer"}
    OUTPUTS: ClassVar = ("model",)
    ACCELERATED: ClassVar = True
    USES_MODEL: ClassVar = True

    def validate(self) -> None:
        validate_training_stage(self)


@dataclass
class InstructionsSettings(StageSettings):
    """The default task's data (pipeline/instruction_task.py): demonstrations, preferences, prompts."""

    sft_train: int = 4000
    sft_eval: int = 200
    preference_kind: Literal["pairs", "rankings", "ratings"] = "pairs"
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
    # tokens per example; SFT truncates the end, the reward model keeps the end (its score is read there)

    INPUTS: ClassVar = {"model": "model", "data": "dataset"}
    OUTPUTS: ClassVar = ("model",)
    ACCELERATED: ClassVar = True

    def validate(self) -> None:
        validate_training_stage(self)
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be at least 8, got {self.max_length}")


@dataclass
class SFTSettings(ChatTrainSettings):
    messages_column: str = "messages"
    # a list of {role, content}; rendered with the tokenizer's chat template
    prompt_column: str | None = None
    completion_column: str | None = None
    # instead of messages: build a user/assistant pair from these two columns
    packing: bool = False
    # several conversations per row up to max_length, position ids restarting (no attention across them)
    sample_prompts: int = 4
    # validation prompts answered greedily after training (manifest and logs)
    max_new_tokens: int = 64

    def validate(self) -> None:
        super().validate()
        if (self.prompt_column is None) != (self.completion_column is None):
            raise ConfigError("prompt_column: give both prompt_column and completion_column, or neither")


@dataclass
class RewardSettings(ChatTrainSettings):
    format: Literal["auto", "pairs", "rankings", "ratings"] = "auto"
    # auto: detected from the columns (pipeline/preferences.py lists them)
    use_margin: bool = False
    # subtract the pair's margin (rating/rank difference, or a `margin` column) inside the loss (Llama 2)
    min_rating_gap: float = 0.0
    # ratings: two responses form a pair only when their ratings differ by more than this

    def validate(self) -> None:
        super().validate()
        if self.min_rating_gap < 0:
            raise ConfigError(f"min_rating_gap: must be >= 0, got {self.min_rating_gap}")


@dataclass
class PPOStageSettings(StageSettings, PPOSettings):
    """PPO's algorithm settings (pipeline/ppo_settings.py) plus the loop around them."""

    max_steps: int = 100
    # PPO iterations: each samples `batch_size` prompts per process, then runs ppo_epochs over them
    batch_size: int = 16
    # prompts per process per iteration (episodes per iteration = batch_size x processes)
    learning_rate: float = 1e-5
    value_learning_rate: float | None = None
    # none: learning_rate
    weight_decay: float = 0.0
    max_prompt_length: int = 128
    # prompt tokens kept (from the end, so the assistant header stays)
    prompt_column: str = "prompt"
    normalize_rewards: bool = True
    # read reward_mean/reward_std from the reward model's reward_stats.json (else the values given here)
    save_every: int = 25
    keep_checkpoints: int = 2
    log_every: int = 1

    INPUTS: ClassVar = {"policy": "model", "reward": "model", "prompts": "dataset", "value": "model", "reference": "model"}
    OPTIONAL_INPUTS: ClassVar = ("value", "reference")  # default: the reward model, the policy's start
    OUTPUTS: ClassVar = ("model", "value")
    ACCELERATED: ClassVar = True

    def validate(self) -> None:
        StageSettings.validate(self)
        PPOSettings.validate(self)
        require_at_least(self, ("max_steps", "batch_size", "save_every", "keep_checkpoints", "log_every",
                                "max_prompt_length"))
        if self.learning_rate <= 0 or (self.value_learning_rate is not None and self.value_learning_rate <= 0):
            raise ConfigError(f"learning_rate: must be positive, got {self.learning_rate}")
        if self.seed:
            raise ConfigError("seed: set the recipe's top-level seed; PPO derives its sampling seed from it")


@dataclass
class EvaluateSettings(StageSettings):
    n_prompts: int = 200
    # held-out prompts each causal checkpoint answers (judge score, reward-model win rate)
    max_new_tokens: int = 64
    temperature: float = 0.0
    # 0: greedy answers; > 0: sampled at this temperature (seeded)
    kl_temperature: float = 1.0
    # sampling temperature for the PPO-to-SFT KL estimate (use PPO's own)
    batch_size: int = 32
    bpb_batches: int = 16
    # batches of packed validation blocks for bits per byte
    ngram: int = 8
    # word n-gram size of the contamination check
    n_samples: int = 8
    # sample generations shown in the results and the report

    INPUTS: ClassVar = {"prompts": "dataset", "pretrain": "model", "sft": "model", "ppo": "model", "reward": "model",
                        "data": "dataset", "corpus": "text", "sft_data": "dataset", "preferences": "dataset"}
    OPTIONAL_INPUTS: ClassVar = ("pretrain", "sft", "ppo", "reward", "data", "corpus", "sft_data", "preferences")
    OUTPUTS: ClassVar = ("results",)

    def validate(self) -> None:
        super().validate()
        require_at_least(self, ("n_prompts", "max_new_tokens", "batch_size", "bpb_batches", "ngram"))
        if self.temperature < 0 or self.kl_temperature <= 0:
            raise ConfigError("temperature: must be >= 0 (and kl_temperature > 0)")


STAGE_TYPES: dict[str, type[StageSettings]] = {
    "tokenizer": TokenizerSettings,
    "prepare": PrepareSettings,
    "pretrain": PretrainSettings,
    "instructions": InstructionsSettings,
    "sft": SFTSettings,
    "reward": RewardSettings,
    "ppo": PPOStageSettings,
    "evaluate": EvaluateSettings,
}


@dataclass
class InputSpec:
    """One resolved input of a stage."""

    name: str
    spec: str  # as written in the recipe
    kind: str  # stage | path | builtin | hub
    stage: str | None = None
    output: str | None = None
    path: Path | None = None  # local folder or file (stage outputs too)


@dataclass
class Recipe:
    run_dir: str
    seed: int = 1234
    model: ModelSettings = field(default_factory=ModelSettings)
    stages: dict[str, Any] = field(default_factory=dict)
    # filled by load_recipe: typed stage settings and resolved inputs
    source: Path | None = field(default=None, init=False)
    overrides: list[str] = field(default_factory=list, init=False)
    settings: dict[str, StageSettings] = field(default_factory=dict, init=False)
    inputs: dict[str, dict[str, InputSpec]] = field(default_factory=dict, init=False)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir).resolve()

    def stage_dir(self, name: str) -> Path:
        return self.run_path / name

    def upstream(self, name: str) -> list[str]:
        return sorted({i.stage for i in self.inputs[name].values() if i.kind == "stage"})

    def order(self) -> list[str]:
        """Stages in dependency order (recipe order among independent ones); rejects cycles."""
        done: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                cycle = visiting[visiting.index(name):] + [name]
                raise ConfigError(f"stages: reference cycle {' -> '.join(cycle)}")
            visiting.append(name)
            for dep in self.upstream(name):
                visit(dep)
            visiting.pop()
            done.append(name)

        for name in self.settings:
            visit(name)
        return done


def _resolve_input(recipe: Recipe, stage: str, name: str, spec: str, base: Path) -> InputSpec:
    path = f"stages.{stage}.inputs.{name}"
    if spec.startswith("builtin:"):
        corpus = spec.split(":", 1)[1]
        if corpus not in BUILTIN_CORPORA:
            raise ConfigError(f"{path}: unknown builtin corpus {corpus!r}; available: {', '.join(BUILTIN_CORPORA)}")
        return InputSpec(name, spec, "builtin")
    if spec.startswith("hub:"):
        if not re.match(r"^hub:[\w.-]+(/[\w.-]+)?(@[\w./-]+)?$", spec):
            raise ConfigError(f"{path}: {spec!r} is not a hub name like hub:ORG/NAME or hub:ORG/NAME@REVISION")
        return InputSpec(name, spec, "hub")
    ref = REFERENCE.match(spec)
    if ref and "/" not in spec:
        src, output = ref.groups()
        if src not in recipe.stages:
            raise ConfigError(f"{path}: {spec!r} references stage {src!r}, which is not in this recipe "
                              f"(stages: {', '.join(recipe.stages)}); write a path with a slash for a file")
        outputs = STAGE_TYPES[src].OUTPUTS
        if output not in outputs:
            raise ConfigError(f"{path}: stage {src!r} has no output {output!r}; it produces {', '.join(outputs)}")
        return InputSpec(name, spec, "stage", src, output, recipe.stage_dir(src) / output)
    if "/" not in spec and not Path(spec).exists():
        raise ConfigError(f"{path}: {spec!r} is neither STAGE.OUTPUT, builtin:NAME, hub:ORG/NAME nor an existing path")
    local = (base / spec).resolve() if not Path(spec).is_absolute() else Path(spec)
    if not local.exists():
        raise ConfigError(f"{path}: path {spec} does not exist (looked for {local})")
    return InputSpec(name, spec, "path", path=local)


def parse_recipe(data: dict, source: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Typed, resolved recipe from already-loaded YAML data (overrides applied first)."""
    data = apply_overrides(copy.deepcopy(data), list(overrides or []))
    recipe = from_dict(Recipe, data)
    recipe.source, recipe.overrides = source, list(overrides or [])
    if not recipe.stages:
        raise ConfigError("stages: a recipe needs at least one stage")
    for name, section in recipe.stages.items():
        if name not in STAGE_TYPES:
            import difflib

            hint = difflib.get_close_matches(name, list(STAGE_TYPES), n=1)
            extra = f"; did you mean {hint[0]}?" if hint else f"; known stages: {', '.join(STAGE_TYPES)}"
            raise ConfigError(f"stages.{name}: unknown stage{extra}")
        cls = STAGE_TYPES[name]
        section = dict(section or {})
        section["inputs"] = {**cls.DEFAULT_INPUTS, **(section.get("inputs") or {})}
        recipe.settings[name] = from_dict(cls, section, f"stages.{name}")
    base = Path.cwd()
    for name, settings in recipe.settings.items():
        recipe.inputs[name] = {k: _resolve_input(recipe, name, k, v, base) for k, v in settings.inputs.items()}
    recipe.order()
    _check_across_stages(recipe)
    return recipe


def _check_across_stages(recipe: Recipe) -> None:
    prepare = recipe.settings.get("prepare")
    if prepare is not None and prepare.block_size > recipe.model.max_seq_len:
        raise ConfigError(f"stages.prepare.block_size: {prepare.block_size} exceeds the model's maximum "
                          f"model.max_seq_len={recipe.model.max_seq_len}")


def _read_yaml(path: Path, key: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{key}: recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_recipe_data(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file's mapping with its `base:` chain applied: `base: tiny.yaml` (relative to the file)
    starts from that recipe and changes only what this file sets, so variants stay a few lines long."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"base: {path.name} makes a cycle ({' -> '.join(p.name for p in (*_chain, path))})")
    data = _read_yaml(path, "base" if _chain else "recipe")
    spec = data.pop("base", None)
    if spec is None:
        return data
    if not isinstance(spec, str):
        raise ConfigError(f"base: expected a recipe file name, got {spec!r} (in {path})")
    return _merge(read_recipe_data(path.parent / spec, (*_chain, path)), data)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    return parse_recipe(read_recipe_data(path), path.resolve(), overrides)
