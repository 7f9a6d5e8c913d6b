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
  * `builtin:stdlib` — the embedded corpus (pipeline/data/corpus.py);
  * `hub:ORG/NAME[:CONFIG][@REVISION]` — a hub model or dataset, a dataset's config by name (needs a network).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.corpus import BUILTIN_CORPORA
from pipeline.recipe.config import ConfigError, apply_overrides, from_dict
from pipeline.recipe.settings import ModelSettings
from pipeline.recipe.stages import STAGE_TYPES, StageSettings

REFERENCE = re.compile(r"^([A-Za-z_][\w-]*)\.([A-Za-z_]\w*)$")
HUB_SPEC = re.compile(r"^hub:(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?(?:@(?P<revision>[\w./-]+))?$")


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`hub:ORG/NAME[:CONFIG][@REVISION]` -> (repo, config, revision)."""
    m = HUB_SPEC.match(spec)
    if m is None:
        raise ValueError(f"{spec!r} is not a hub name")
    return m.group("repo"), m.group("config"), m.group("revision")


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
        if not HUB_SPEC.match(spec):
            raise ConfigError(f"{path}: {spec!r} is not a hub name like hub:ORG/NAME, hub:ORG/NAME:CONFIG or "
                              f"hub:ORG/NAME@REVISION")
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
